"""Divergences between a student and a teacher distribution, as pure functions in one registry.

Every divergence takes log-probabilities over the same bins, `[..., bins]`, and returns one value per
row `[...]`; `distill_loss` applies temperature, masking and the mean. Zero-probability bins (logits of
-inf, e.g. a padded vocabulary) contribute exactly 0, never NaN: p·log p uses the 0·log 0 = 0 convention.

Conventions (documented choices):
- Forward KL = KL(teacher || student) (mode-covering, Hinton KD); reverse KL = KL(student || teacher).
- Generalized JSD(β) = β·KL(t || m) + (1-β)·KL(s || m), m = β·t + (1-β)·s (GKD's definition);
  β=0 and β=1 give 0 by this formula, so they are mapped to the limits: forward and reverse KL.
- Skewed forward KL(α) = KL(t || α·t + (1-α)·s); skewed reverse KL(α) = KL(s || α·s + (1-α)·t) (DistiLLM).
- Temperature T divides both sets of logits; the loss is multiplied by T² so gradient magnitudes stay
  comparable across T (Hinton et al., 2015).
- Top-k teacher signal: the teacher's k kept log-probs plus one tail bin holding its remaining mass
  (1 - Σ top-k); the student is folded onto the same k+1 bins. The divergence is exact for that coarser
  distribution, so no teacher mass is dropped or renormalised away.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Divergence = Callable[..., torch.Tensor]
DIVERGENCES: dict[str, Divergence] = {}


def register_divergence(name: str):
    def deco(fn: Divergence) -> Divergence:
        DIVERGENCES[name] = fn
        return fn

    return deco


def params_of(name: str) -> list[str] | None:
    """The keyword parameters (method.divergence_params) divergence `name` takes; None when it takes any."""
    import inspect

    P = inspect.Parameter
    taken = list(inspect.signature(DIVERGENCES[name]).parameters.values())[2:]  # after student_logp, teacher_logp
    if any(p.kind is P.VAR_KEYWORD for p in taken):
        return None
    return [p.name for p in taken if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)]


_FLOOR = -1e4  # exp(-1e4) is exactly 0 in every float type: same value, but no -inf - -inf = NaN anywhere


def _kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, with 0·log 0 = 0 (and 0·(-inf) = 0)."""
    p_logp, q_logp = p_logp.clamp(min=_FLOOR), q_logp.clamp(min=_FLOOR)
    p = p_logp.exp()
    diff = torch.where(p > 0, p_logp - q_logp, torch.zeros_like(p_logp))
    return (p * diff).sum(-1)


def _mix_logp(a_logp: torch.Tensor, b_logp: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·a + (1-w)·b), computed in log space."""
    if weight_a <= 0:
        return b_logp
    if weight_a >= 1:
        return a_logp
    a_logp, b_logp = a_logp.clamp(min=_FLOOR), b_logp.clamp(min=_FLOOR)
    return torch.logaddexp(a_logp + math.log(weight_a), b_logp + math.log(1 - weight_a))


@register_divergence("forward_kl")
def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    return _kl(teacher_logp, student_logp)


@register_divergence("reverse_kl")
def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    return _kl(student_logp, teacher_logp)


@register_divergence("jsd")
def jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must lie in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logp, teacher_logp)
    if beta == 1.0:
        return reverse_kl(student_logp, teacher_logp)
    m = _mix_logp(teacher_logp, student_logp, beta)
    return beta * _kl(teacher_logp, m) + (1 - beta) * _kl(student_logp, m)


@register_divergence("skew_forward_kl")
def skew_forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    return _kl(teacher_logp, _mix_logp(teacher_logp, student_logp, alpha))


@register_divergence("skew_reverse_kl")
def skew_reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    return _kl(student_logp, _mix_logp(student_logp, teacher_logp, alpha))


@register_divergence("tvd")
def tvd(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (student_logp.exp() - teacher_logp.exp()).abs().sum(-1)


def topk_bins(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logp: torch.Tensor,
              temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a dense student and a top-k teacher onto k+1 bins (k kept tokens + the tail).

    teacher_logp are the teacher's log-probs of `teacher_ids` at this temperature. Returns
    (student_logp, teacher_logp), both `[..., k+1]`.
    """
    s_all = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    s_k = s_all.gather(-1, teacher_ids)
    t_k = teacher_logp.float()
    return torch.cat([s_k, _tail(s_k)], -1), torch.cat([t_k, _tail(t_k)], -1)


def _tail(kept_logp: torch.Tensor) -> torch.Tensor:
    """log(1 - Σ exp(kept)). The kept mass is capped just below 1 so a full top-k never yields -inf
    (whose gradient is NaN); the tail then holds <= 1e-6 of the mass, a negligible bias."""
    kept = torch.logsumexp(kept_logp, dim=-1, keepdim=True).exp().clamp(max=1 - 1e-6)
    return torch.log1p(-kept)


def distill_loss(name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None, temperature: float = 1.0,
                 teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None, **params) -> torch.Tensor:
    """Mean divergence over the positions where `mask` is true, times T².

    The teacher is either dense `teacher_logits` (same last dim as the student) or `teacher_topk` =
    (ids, log-probs at this temperature).
    """
    if name not in DIVERGENCES:
        raise KeyError(f"unknown divergence {name!r}; known: {', '.join(sorted(DIVERGENCES))}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if (teacher_logits is None) == (teacher_topk is None):
        raise ValueError("give exactly one of teacher_logits or teacher_topk")
    if teacher_topk is not None:
        s_logp, t_logp = topk_bins(student_logits, *teacher_topk, temperature=temperature)
    else:
        if teacher_logits.shape[-1] != student_logits.shape[-1]:
            raise ValueError(f"teacher has {teacher_logits.shape[-1]} logits per position, student "
                             f"{student_logits.shape[-1]}: align the vocabularies first")
        s_logp = torch.log_softmax(student_logits.float() / temperature, dim=-1)
        t_logp = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_pos = DIVERGENCES[name](s_logp, t_logp, **params)
    if mask is None:
        mask = torch.ones(per_pos.shape, dtype=torch.bool, device=per_pos.device)
    n = mask.sum()
    if n == 0:
        raise ValueError("distillation mask selects no position")
    return (per_pos * mask).sum() / n * temperature**2
