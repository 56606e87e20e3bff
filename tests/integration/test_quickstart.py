"""The README's main job, end to end on the real model and data (slow: ~10 minutes on 2 cores)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quickstart_improves_accuracy(tmp_path):
    cmd = [sys.executable, "-m", "distune", "run", str(ROOT / "configs" / "quickstart.yaml"),
           f"run.output_dir={tmp_path}", "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "quickstart" / "results.json").read_text())
    assert results["after"]["eval/accuracy"] > results["before"]["eval/accuracy"] + 0.1
    assert results["after"]["eval/loss"] < results["before"]["eval/loss"]
    assert (tmp_path / "quickstart" / "export" / "adapter_model.safetensors").is_file()
