"""Resume on another worker count (2 -> 1 and 1 -> 2 processes, torchrun, no Ray): the ZeRO shards are
re-partitioned through DeepSpeed's universal checkpoint, the global batch is kept by recomputing gradient
accumulation, the data continues at the same global sample, and the run ends where the uninterrupted one
does. Here to 1e-4: the tiny rows all have one length, so regrouping a global batch into other micro-batches
keeps every token mean, and there is no dropout. In general the curve continues but is not bit-equal (token
means per micro-batch, and the dropout RNG of a rank the old run did not have starts from its seed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

import tiny

STEPS, STOP = 8, 4


def _launch(cfg_file: Path, procs: int, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if procs == 1:
        cmd = [sys.executable, "-m", "distune.worker", str(cfg_file), *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
               "-m", "distune.worker", str(cfg_file), *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def _losses(run_dir: Path) -> dict[int, float]:
    return {int(k): v for k, v in json.loads((run_dir / "losses.json").read_text()).items()}


@pytest.mark.parametrize("stage,before,after", [pytest.param(2, 2, 1, marks=pytest.mark.slow), (3, 1, 2)],
                         ids=["zero2-2to1", "zero3-1to2"])
def test_resume_on_another_worker_count(tmp_path, tiny_model, tiny_data, stage, before, after):
    def cfg(name: str, workers: int) -> Path:
        raw = tiny.base_config(tiny_model, tiny_data, tmp_path / "runs", run={"name": name},
                               method={"name": "lora"}, deepspeed={"stage": stage},
                               cluster={"num_workers": workers}, checkpoint={"every": 2, "keep": 1},
                               train={"max_steps": STEPS, "lr": 2e-2, "global_batch_size": 4,
                                      "micro_batch_size": 2, "log_every": 1})
        path = tmp_path / f"{name}-{workers}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    _launch(cfg("straight", before), before)
    _launch(cfg("resized", before), before, f"train.stop_after_steps={STOP}")
    second = _launch(cfg("resized", after), after)
    text = second.stdout + second.stderr
    assert f"resumed step {STOP} written by {before} workers on {after}" in text, text[-3000:]

    runs = tmp_path / "runs"
    done = json.loads((runs / "resized" / "results.json").read_text())
    ref = json.loads((runs / "straight" / "results.json").read_text())
    assert done["step"] == STEPS
    assert done["after"]["eval/loss"] == pytest.approx(ref["after"]["eval/loss"], abs=1e-4)
    a = load_file(runs / "straight" / "export" / "adapter_model.safetensors")
    b = load_file(runs / "resized" / "export" / "adapter_model.safetensors")
    rel = max(float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)) for k in a if a[k].norm() > 0)
    assert rel < 1e-4, rel
    print(f"\n{before}->{after} workers at ZeRO-{stage}: eval loss {done['after']['eval/loss']:.4f} vs "
          f"{ref['after']['eval/loss']:.4f} uninterrupted; max relative weight difference {rel:.2e}")
