"""The per-rank program without Ray: 2 gloo processes under torchrun, local atomic checkpoints, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

import tiny


def _torchrun(cfg_file: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "distune.worker", str(cfg_file), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def test_torchrun_two_ranks_checkpoint_stop_resume_export(tmp_path, tiny_model, tiny_data):
    cfg = tiny.base_config(tiny_model, tiny_data, tmp_path / "runs", method={"name": "lora"},
                           deepspeed={"stage": 3}, cluster={"num_workers": 2}, checkpoint={"every": 2, "keep": 1},
                           train={"max_steps": 6, "lr": 3e-2}, eval={"choices": ["positive", "negative"]})
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "runs" / "t"

    first = _torchrun(cfg_file, "train.stop_after_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    # keep=1: only the newest published checkpoint stays; no temp folder is left behind.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_3"]
    meta = json.loads((run_dir / "checkpoints" / "step_3" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 3

    second = _torchrun(cfg_file)
    assert second.returncode == 0, second.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["step"] == 6 and results["after"]["eval/accuracy"] >= 0.0
    assert (run_dir / "export" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_6"]
