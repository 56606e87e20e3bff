"""Packing: no attention across packed samples, positions restart, the same loss as unpacked; length grouping."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distune.config import DataSection
from distune.data import IGNORE, ShardedBatches, collate, load_splits, model_inputs, pack, pack_groups
from distune.data.render import Sample
from distune.tasks.causal_lm import causal_lm_loss


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def model(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def test_pack_groups_respect_capacity_and_use_every_sample():
    lengths = [5, 9, 3, 7, 2, 8, 1, 4]
    groups = pack_groups(lengths, 10)
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert all(sum(lengths[i] for i in g) <= 10 for g in groups)
    assert len(groups) == 4  # 39 tokens: first-fit decreasing reaches the lower bound here
    assert groups == pack_groups(lengths, 10)


def _first_fit_by_scanning(lengths: list[int], capacity: int) -> list[list[int]]:
    """First fit by decreasing length, spelled out: each sample to the lowest-numbered row with room."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if r is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[r].append(i)
            room[r] -= lengths[i]
    return rows


def test_pack_groups_is_first_fit_decreasing():
    """The O(N log N) tree search picks the same rows as scanning them (lengths over the capacity included)."""
    import random

    rng = random.Random(0)
    for _ in range(300):
        capacity = rng.randint(4, 64)
        lengths = [rng.randint(1, capacity + 3) for _ in range(rng.randint(0, 200))]
        assert pack_groups(lengths, capacity) == _first_fit_by_scanning(lengths, capacity)


def test_packed_rows_see_only_their_own_sample(tok, model, tiny_data):
    samples = load_splits(DataSection(path=str(tiny_data), prompt="Sentiment: {text}", response="{label}",
                                      eval_size=2, max_length=64), tok, seed=0).train[:6]
    groups = pack_groups([len(s.input_ids) for s in samples], 64)
    assert any(len(g) > 1 for g in groups)
    packed = collate(pack(samples, groups), tok.pad_token_id)
    assert "position_ids" in packed and set(model_inputs(packed)) == {"input_ids", "position_ids", "use_cache"}
    with torch.no_grad():
        logits = model(**model_inputs(packed)).logits
        for row, group in enumerate(groups):
            at = 0
            for i in group:
                ids = torch.tensor([samples[i].input_ids])
                alone = model(input_ids=ids).logits[0]
                n = ids.shape[1]
                torch.testing.assert_close(logits[row, at:at + n], alone, atol=1e-4, rtol=1e-4)
                at += n
        plain = collate(samples, tok.pad_token_id)
        loss_plain, n_plain = causal_lm_loss(model(**model_inputs(plain)).logits, plain["labels"])
        loss_packed, n_packed = causal_lm_loss(logits, packed["labels"])
    assert int(n_plain) == int(n_packed)  # the same trained tokens, none predicted across a boundary
    torch.testing.assert_close(loss_packed, loss_plain, atol=1e-5, rtol=1e-5)


def test_packing_keeps_per_position_extras_in_order():
    a = Sample([1, 2, 3, 4], [IGNORE, IGNORE, 3, 4], 1, extras={"x": np.array([[10.0], [11.0]])})
    b = Sample([5, 6, 7], [IGNORE, 6, 7], 2, extras={"x": np.array([[20.0], [21.0]])})
    row = pack([a, b], [[0, 1]])[0]
    assert row.labels == [IGNORE, IGNORE, 3, 4, IGNORE, 6, 7] and row.positions == [0, 1, 2, 3, 0, 1, 2]
    batch = collate([row], pad_id=0)
    # Extras sit on the positions that predict a trained token (p predicts p+1): 1, 2 and 4, 5.
    assert batch["x"][0, :, 0].tolist() == [0, 10, 11, 0, 20, 21, 0]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]


def test_a_sample_trained_from_its_first_token_loses_only_that_token_when_packed():
    a = Sample([1, 2], [1, 2], 1)
    b = Sample([3, 4], [3, 4], 2)
    assert pack([a, b], [[0, 1]])[0].labels == [IGNORE, 2, IGNORE, 4]


def test_group_by_length_batches_similar_lengths():
    lengths = [int(x) for x in np.random.default_rng(0).integers(2, 200, size=400)]
    samples = [Sample(list(range(n)), list(range(n)), i) for i, n in enumerate(lengths)]

    def padding(group: bool) -> int:
        b = ShardedBatches(samples, 4, 0, 2, seed=1, pad_id=0, group_by_length=group)
        idx = b.order(0)
        chunks = [[lengths[i] for i in idx[k:k + 4]] for k in range(0, len(idx), 4)]
        return sum(max(c) * len(c) - sum(c) for c in chunks)

    assert padding(True) < padding(False) / 5
    grouped = ShardedBatches(samples, 4, 1, 2, seed=1, pad_id=0, group_by_length=True)
    assert grouped.order(0) == grouped.order(0) and grouped.order(0) != grouped.order(1)  # seeded, per epoch
    both = set(grouped.order(0)) | set(ShardedBatches(samples, 4, 0, 2, 1, 0, True).order(0))
    assert len(both) == 400  # the two ranks split the samples without overlap
