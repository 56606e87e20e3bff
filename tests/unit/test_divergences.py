"""Each divergence against values computed by hand (math.log on explicit probabilities)."""

import math

import pytest
import torch

from distune.distill.divergences import DIVERGENCES, distill_loss, topk_bins

T = [0.5, 0.5]  # teacher
S = [0.9, 0.1]  # student


def _logp(probs):
    return torch.tensor([probs]).log()


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def mix(a, b, w):
    return [w * x + (1 - w) * y for x, y in zip(a, b)]


@pytest.mark.parametrize("name,params,expected", [
    ("forward_kl", {}, kl(T, S)),
    ("reverse_kl", {}, kl(S, T)),
    ("jsd", {"beta": 0.5}, 0.5 * kl(T, mix(T, S, 0.5)) + 0.5 * kl(S, mix(T, S, 0.5))),
    ("jsd", {"beta": 0.2}, 0.2 * kl(T, mix(T, S, 0.2)) + 0.8 * kl(S, mix(T, S, 0.2))),
    ("jsd", {"beta": 0.0}, kl(T, S)),
    ("jsd", {"beta": 1.0}, kl(S, T)),
    ("skew_forward_kl", {"alpha": 0.1}, kl(T, mix(T, S, 0.1))),
    ("skew_reverse_kl", {"alpha": 0.3}, kl(S, mix(S, T, 0.3))),
    ("tvd", {}, 0.4),
])
def test_divergence_matches_hand_math(name, params, expected):
    got = DIVERGENCES[name](_logp(S), _logp(T), **params)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_every_divergence_is_zero_on_equal_distributions_and_nonnegative():
    torch.manual_seed(0)
    a = torch.log_softmax(torch.randn(5, 7), -1)
    b = torch.log_softmax(torch.randn(5, 7), -1)
    for name, fn in DIVERGENCES.items():
        assert fn(a, a).abs().max() < 1e-6, name
        assert (fn(a, b) >= -1e-7).all(), name


def test_minus_inf_logits_are_safe():
    # A padded vocabulary: the last two ids have -inf logits in both models.
    student = torch.tensor([[1.0, 0.5, -1.0, float("-inf"), float("-inf")]], requires_grad=True)
    teacher = torch.tensor([[0.2, 1.5, 0.0, float("-inf"), float("-inf")]])
    for name in DIVERGENCES:
        loss = distill_loss(name, student, teacher, temperature=2.0)
        loss.backward()
        assert torch.isfinite(loss), name
        assert torch.isfinite(student.grad).all(), name
        student.grad = None
    # Same value as on the unpadded three-token vocabulary.
    plain = distill_loss("forward_kl", student[:, :3].detach(), teacher[:, :3])
    assert distill_loss("forward_kl", student.detach(), teacher).item() == pytest.approx(plain.item(), abs=1e-6)


def test_temperature_scales_by_t_squared_and_mask_averages_selected_positions():
    torch.manual_seed(1)
    s, t = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    per_pos = DIVERGENCES["forward_kl"](torch.log_softmax(s / 2, -1), torch.log_softmax(t / 2, -1))
    expected = per_pos[mask].mean() * 4
    assert distill_loss("forward_kl", s, t, mask, temperature=2.0).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="selects no position"):
        distill_loss("forward_kl", s, t, torch.zeros(2, 3, dtype=torch.bool))


def test_topk_keeps_teacher_tail_mass_in_one_bin():
    teacher = [0.6, 0.3, 0.05, 0.05]
    student = [0.25, 0.25, 0.25, 0.25]
    ids = torch.tensor([[0, 1]])
    t_logp = torch.tensor([[math.log(0.6), math.log(0.3)]])
    got = distill_loss("forward_kl", torch.tensor([student]).log(), teacher_topk=(ids, t_logp))
    assert got.item() == pytest.approx(kl([0.6, 0.3, 0.1], [0.25, 0.25, 0.5]), abs=1e-6)
    s_bins, t_bins = topk_bins(torch.tensor([student]).log(), ids, t_logp)
    assert s_bins.exp().sum().item() == pytest.approx(1.0) and t_bins.exp().sum().item() == pytest.approx(1.0)


def test_topk_with_all_ids_equals_dense():
    torch.manual_seed(2)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    t_logp = torch.log_softmax(t, -1)
    ids = torch.arange(5).expand(4, 5)
    dense = distill_loss("jsd", s, t, beta=0.5)
    sparse = distill_loss("jsd", s, teacher_topk=(ids, t_logp), beta=0.5)
    assert sparse.item() == pytest.approx(dense.item(), abs=1e-5)


def test_errors_name_the_problem():
    s = torch.zeros(1, 4)
    with pytest.raises(KeyError, match="unknown divergence 'kl'"):
        distill_loss("kl", s, s)
    with pytest.raises(ValueError, match="teacher has 5 logits per position, student 4"):
        distill_loss("forward_kl", s, torch.zeros(1, 5))
    with pytest.raises(ValueError, match="beta must lie in"):
        distill_loss("jsd", s, s, beta=1.5)
