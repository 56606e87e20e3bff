"""What the fault tests share: one small LoRA recipe (2 workers, ZeRO-2, a checkpoint every EVERY steps, W&B
offline) and the checks that a run which met a fault ended where an uninterrupted one did."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

import wandb_records

STEPS, EVERY = 24, 3  # enough steps left after a SIGTERM for the stop to reach the ranks (~1 s)


def sections(name: str) -> dict:
    return {"run": {"name": name}, "method": {"name": "lora", "dropout": 0.1}, "deepspeed": {"stage": 2},
            "cluster": {"num_workers": 2, "max_failures": 2}, "checkpoint": {"every": EVERY, "keep": 2},
            "wandb": {"mode": "offline"},
            "train": {"max_steps": STEPS, "lr": 1e-2, "warmup_steps": 2, "log_every": 1}}


def history(run_dir: Path) -> list[tuple[int, float]]:
    """(step, train loss) rows in logging order, restarts included."""
    return [(row["_step"], row["train/loss"]) for row in wandb_records.logged(run_dir)["history"]
            if "train/loss" in row]


def max_weight_diff(a: Path, b: Path) -> float:
    x, y = load_file(a / "export" / "adapter_model.safetensors"), load_file(b / "export" / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def same_as_straight(run_dir: Path, straight_dir: Path) -> dict:
    """Final weights within 1e-4, every step's loss as uninterrupted, one W&B run; returns the figures."""
    results = json.loads((run_dir / "results.json").read_text())
    assert results["step"] == STEPS and "export" in results
    diff = max_weight_diff(run_dir, straight_dir)
    assert diff < 1e-4
    want = dict(history(straight_dir))
    rows = history(run_dir)
    for step, loss in rows:  # redone steps too: same data, same RNG, same loss
        assert loss == pytest.approx(want[step], abs=1e-5), step
    assert sorted(set(s for s, _ in rows)) == list(range(1, STEPS + 1))
    logged = wandb_records.logged(run_dir)
    assert set(logged["run_ids"]) == {(run_dir / "wandb_run_id").read_text().strip()}
    return {"weight_diff": diff, "wandb_runs": len(set(logged["run_ids"]))}


def restarts(out: str) -> tuple[int, int]:
    """From the progress lines: (the step the restarted attempt resumed at, steps redone: those done
    before the fault after that step)."""
    starts = [int(m) for m in re.findall(r"training: step (\d+) -> ", out)]
    assert len(starts) == 2, out
    before = [int(m) for m in re.findall(r"^step (\d+)/", out.split("training: step", 2)[1], re.M)]
    return starts[1], max(before, default=0) - starts[1]


