"""Teacher signals: one registered class per way a teacher's distributions reach the student's loss.

- `online` (distune.signals.online): the teacher runs on the training ranks every step;
- `cached` (distune.signals.cached): top-k (or class probabilities) written once by `distune cache-teacher`;
- `remote` (distune.signals.remote): a Ray actor group of its own serves top-k to the student ranks.

The interface is `distune.signals.base.Signal`; a new signal is one module with one `@register_signal` class,
imported here, or a third-party package declaring it in the `distune.signals` entry-point group. Building teachers for a run (resolve, check, build per rank) is distune.signals.teachers.
"""

from distune.signals import cached, online, remote  # noqa: F401  (registration side effect)
from distune.signals.base import (
    DEFAULT_SIGNAL, ENTRY_POINT_GROUP, SIGNALS, BuildContext, Prepared, Signal, TeacherOutput, TeacherSpec,
    kd_positions, register_signal, topk_logprobs, trained_positions,
)
from distune.signals.cached import CachedSignal
from distune.signals.online import OnlineSignal
from distune.signals.remote import RemoteSignal


get_signal = SIGNALS.get
known_signals = SIGNALS.known


__all__ = ["DEFAULT_SIGNAL", "ENTRY_POINT_GROUP", "BuildContext", "CachedSignal", "OnlineSignal", "Prepared", "RemoteSignal", "Signal",
           "TeacherOutput", "TeacherSpec", "get_signal", "kd_positions", "known_signals", "register_signal",
           "topk_logprobs", "trained_positions"]
