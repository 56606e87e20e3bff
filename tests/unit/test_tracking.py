"""The W&B tracker's replay window (real wandb, offline): a checkpoint carries the rows logged since the
checkpoint before it, and a resumed tracker logs them again into the same run."""

from types import SimpleNamespace

import wandb_records
from distune.tracking import WandbTracker


def _tracker(run_dir):
    cfg = SimpleNamespace(project="distune-test", entity=None, mode="offline", tags=[], group=None, job_type=None)
    return WandbTracker(cfg, run_dir, "t", {"x": 1})


def test_checkpoint_rows_span_two_intervals_and_replay_into_the_same_run(tmp_path):
    first = _tracker(tmp_path)
    for step in (1, 2, 3):
        first.log({"train/loss": float(step)}, step)
    first.checkpointed()  # checkpoint at step 3
    for step in (4, 5):
        first.log({"train/loss": float(step)}, step)
    assert [s for s, _ in first.recent()] == [1, 2, 3, 4, 5]
    first.checkpointed()  # checkpoint at step 5: what it carries
    first.log({"train/loss": 6.0}, 6)
    rows = first.recent()
    assert [s for s, _ in rows] == [4, 5, 6]  # the interval before the last checkpoint, and the one since
    first.finish()

    again = _tracker(tmp_path)  # a restart resuming the checkpoint at step 5, which held rows 1..5
    again.replay([[1, {"train/loss": 1.0}], [5, {"train/loss": 5.0}]])
    again.log({"train/loss": 6.5}, 6)
    assert [s for s, _ in again.recent()] == [1, 5, 6]
    again.finish()
    logged = wandb_records.finished(tmp_path)
    assert len(set(logged["run_ids"])) == 1
    steps = [r["_step"] for r in logged["history"] if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 1, 5, 6]
