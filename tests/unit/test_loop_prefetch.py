"""The loop announces each micro-batch to prefetching signals one turn ahead (distune.loop._announced)."""

from distune.loop import _announced


def test_each_batch_is_announced_before_the_one_before_it_is_trained():
    seen: list[str] = []
    batches = iter([(0, i, f"b{i}") for i in range(4)])
    trained = []
    for epoch, index, batch in _announced(batches, [lambda b: seen.append(f"ask {b}")]):
        seen.append(f"train {batch}")
        trained.append((epoch, index, batch))
    assert trained == [(0, i, f"b{i}") for i in range(4)]  # the same batches, in order, positions unchanged
    assert seen == ["ask b0", "ask b1", "train b0", "ask b2", "train b1", "ask b3", "train b2", "train b3"]


def test_every_hook_hears_every_batch():
    a, b = [], []
    list(_announced(iter([(0, 0, "x"), (0, 1, "y")]), [a.append, b.append]))
    assert a == b == ["x", "y"]
