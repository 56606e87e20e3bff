"""Logits only where a loss reads them: the output head run on selected positions, optionally in chunks.

A causal LM's largest tensor is its [batch × seq × vocab] logits (e.g. 4 × 2048 × 152k in bf16 = 2.5 GB, twice
that once upcast to fp32 for the softmax, again for its gradient). With the loss on responses only, a few percent
of those positions are ever read. `head_at(model, positions)` makes the model's own output head (`lm_head`, found
through `get_output_embeddings`, so PEFT wrappers, tied weights and ZeRO-3's gather hooks are all kept) run on the
selected hidden states only: a forward pre-hook swaps its input for `hidden[:, :-1][positions]`, the same rows,
in the same order, as `full_logits[:, :-1][positions]`. Nothing else in the forward changes.

With `chunk` set, the hook keeps the selected hidden states and gives the head an empty input; `Selected.reduce`
then runs the head over `chunk` positions at a time under activation checkpointing, so at most one chunk's
logits (and, in backward, its recomputation) exist at once: the fused/chunked cross-entropy of Liger-Kernel and
Apple's Cut-Cross-Entropy, in plain PyTorch, for CE and KD alike. Its cost is one more head matmul per chunk.

When the head's input is not the [batch, seq, hidden] tensor the positions index (a model that calls its head
otherwise), the hook leaves it alone and `Selected.pick` selects from the full logits: correct, just not lean.
Owns no model loading and imports neither ray nor deepspeed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def output_head(model: nn.Module) -> nn.Module | None:
    """The module that maps final hidden states to vocabulary logits (None when there is none to hook)."""
    module = getattr(model, "module", model)  # a DeepSpeed engine (or inference engine) wraps the model
    get = getattr(module, "get_output_embeddings", None)
    head = get() if get is not None else None
    inputs = getattr(module, "get_input_embeddings", lambda: None)()
    # A model whose head *is* its embedding module would have its token lookup rewritten by the hook.
    return head if isinstance(head, nn.Module) and head is not inputs else None


@dataclass
class Selected:
    """What `head_at` saw: whether the head ran on the selected rows, and (chunked) the rows' hidden states."""

    positions: torch.Tensor
    head: nn.Module | None
    chunk: int | None = None
    applied: bool = False
    hidden: torch.Tensor | None = None  # [N, H] when chunked and applied
    _calls: int = field(default=0, repr=False)

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, V] logits at the positions, whether or not the head already ran on them alone."""
        if self.hidden is not None:
            raise RuntimeError("chunked selection: the logits are computed by Selected.reduce")
        return logits if self.applied else logits[:, :-1][self.positions]

    @property
    def chunked(self) -> bool:
        return self.hidden is not None

    def reduce(self, fn: Callable[[torch.Tensor, slice], torch.Tensor]) -> torch.Tensor:
        """Σ over chunks of `fn(logits[rows], rows)`: each chunk's logits freed after its forward and recomputed
        in backward. `fn` returns sums over its rows (a scalar, or a few stacked); it may run twice per chunk
        (forward, then the recompute), so any side output it records must be idempotent (keyed by `rows.start`)."""
        h, total = self.hidden, 0
        for start in range(0, h.shape[0], self.chunk):
            rows = slice(start, min(start + self.chunk, h.shape[0]))
            total = total + checkpoint(lambda x, rows=rows: fn(self.head(x), rows), h[rows], use_reentrant=False)
        return total


@contextmanager
def head_at(model: nn.Module, positions: torch.Tensor, chunk: int | None = None) -> Iterator[Selected]:
    """Within the block the model's output head runs on `positions` only ([B, S-1] bool over next-token positions:
    column j predicts token j+1). Yields a `Selected`; read the logits through its `pick` (or `reduce` when
    `chunk` is set and the selection applied)."""
    head = output_head(model)
    config = getattr(getattr(model, "module", model), "config", None)
    if getattr(config, "final_logit_softcapping", None):  # Gemma-2/3 transform logits after the head: no chunks
        chunk = None
    sel = Selected(positions=positions, head=head, chunk=chunk)
    if head is None:
        yield sel
        return

    def select(module, args, kwargs):
        h = args[0] if args else kwargs.get("input")
        sel._calls += 1
        ok = (sel._calls == 1 and isinstance(h, torch.Tensor) and h.dim() == 3
              and tuple(h.shape[:2]) == (positions.shape[0], positions.shape[1] + 1))
        if not ok:  # a second call, or a shape the positions do not index: leave the model as it is
            sel.applied, sel.hidden = False, None
            return None
        sel.applied = True
        rows = h[:, :-1][positions]
        if chunk:
            sel.hidden = rows
            rows = rows[:0]  # the model's own head call computes nothing; reduce() does it chunk by chunk
        return ((rows,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "input": rows})

    handle = head.register_forward_pre_hook(select, with_kwargs=True)
    try:
        yield sel
    finally:
        handle.remove()
