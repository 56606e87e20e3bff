"""Teachers for a run: resolve and check the frozen models a method asks for, then build each one's signal.

`preflight` runs on the driver before scheduling (from validate) and again in every worker: it resolves
the teacher, checks the vocabularies align (distune.distill.vocab) and lets its signal check what it reads
(e.g. a cache). `build` runs in the worker after the student, with what the runner gives it (BuildContext).
Imports neither ray nor deepspeed.
"""

from __future__ import annotations

from distune.errors import ConfigError
from distune.distill.vocab import VocabMismatch, aligned_vocab_size
from distune.models import load_model_config, load_tokenizer, resolve_model_source
from distune.signals import BuildContext, Prepared, TeacherSpec, get_signal
from distune.tasks import get_task


def preflight(specs: dict[str, TeacherSpec], student_tok, student_config, check_cache: bool = True,
              task: str = "causal_lm") -> dict[str, Prepared]:
    """Resolve and check every teacher. A student whose task learns from class probabilities (another
    architecture, another tokenizer) needs a signal that serves them: no vocabulary check."""
    student = get_task(task)
    out = {}
    for name, spec in specs.items():
        if not isinstance(spec, TeacherSpec):
            raise ConfigError(f"method asks for a frozen model {name!r} of unknown kind {type(spec).__name__}")
        signal = get_signal(spec.signal)
        try:
            source = resolve_model_source(spec.path, key=f"method.{name}.path")
            config = load_model_config(source, spec.trust_remote_code)
            tok = load_tokenizer(source, spec.trust_remote_code)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None  # already names the key and the path
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"method.{name}.path: cannot load {spec.path!r}: {first}") from None
        if student.distills == "classes":
            if not signal.classes:
                serving = [n for n in _known() if get_signal(n).classes]
                raise ConfigError(f"method.signal: a {task} student learns from the {name}'s class probabilities, "
                                  f"which `distune cache-teacher` computes over data.labels; set signal: "
                                  f"{' or '.join(serving)}")
            vocab = None
        else:
            try:
                vocab = aligned_vocab_size(student_tok, tok, student_config.vocab_size, config.vocab_size)
            except VocabMismatch as e:
                raise ConfigError(f"method.{name}: {e}") from None
        prep = Prepared(spec, source, config, vocab)
        try:
            signal.preflight(prep, student, check_cache)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        out[name] = prep
    return out


def _known() -> list[str]:
    from distune.signals import known_signals

    return known_signals()


def build(prepared: dict[str, Prepared], ctx: BuildContext) -> dict:
    """name -> teacher signal, ready for `method.loss(..., frozen)`."""
    frozen = {}
    for name, prep in prepared.items():
        try:
            frozen[name] = get_signal(prep.spec.signal).build(name, prep, ctx)
        except ValueError as e:
            if isinstance(e, ConfigError) or not str(e).startswith("method."):
                raise
            raise ConfigError(str(e)) from None
    return frozen


def actor_groups(specs: dict[str, TeacherSpec]) -> dict[str, dict]:
    """name -> the Ray actor group ({actors, cpus_per_actor, gpus_per_actor, ...}) of each teacher whose signal
    runs in one (what the cluster layer starts and sizes the cluster for)."""
    return {name: groups for name, spec in specs.items()
            if (groups := get_signal(spec.signal).actors(spec)) is not None}
