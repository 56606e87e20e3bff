"""The README's main job, end to end on the real model and data (slow: ~25 minutes on 2 AVX2 cores in fp32):
`distune run configs/quickstart.yaml` fine-tunes the teacher, has it label a transfer set, trains the SFT-only and
the distilled student, and prints the report; then `distune plan` and a second `run` (every stage done)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "configs" / "quickstart.yaml"


def _distune(*args: str, timeout: int = 3600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "distune", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_quickstart_pipeline_reports_distillation_against_sft(tmp_path):
    out = _distune("run", str(PIPELINE), f"run.output_dir={tmp_path}", "--no-progress").stdout
    for stage in ("teacher", "label", "sft", "distilled"):
        assert f"== stage {stage} (" in out
    assert "report (" in out and "exact McNemar p =" in out
    report = json.loads((tmp_path / "quickstart-report.json").read_text())
    acc = {(m["stage"], m["when"]): m["accuracy"] for m in report["models"]}
    assert {m["examples"] for m in report["models"]} == {300}
    # Measured on a 2-core AVX2 EPYC in fp32 (the README's table): the teacher far above the majority class (42 %),
    # the distilled student above the SFT-only one and close to the teacher.
    assert acc["teacher", "after"] >= 0.60
    assert acc["distilled", "after"] > acc["sft", "after"]
    assert acc["distilled", "after"] >= 0.85 * acc["teacher", "after"]
    assert acc["student", "before"] < 0.45  # the pruned student starts near chance
    distilled = next(m for m in report["models"] if m["stage"] == "distilled")
    assert 0.3 < distilled["params_share"] < 0.45  # 49.5M of 134.5M
    pair = report["paired"][0]
    assert pair["a"] == "distilled" and pair["b"] == "sft" and pair["only_a"] > pair["only_b"]
    assert (tmp_path / "distilled" / "export" / "model.safetensors").is_file()
    assert (tmp_path / "teacher" / "export" / "adapter_model.safetensors").is_file()

    again = _distune("run", str(PIPELINE), f"run.output_dir={tmp_path}", "--no-progress").stdout
    assert again.count(": done (export published, config unchanged)") == 5 and "report (" in again

    plan = _distune("plan", str(PIPELINE), f"run.output_dir={tmp_path}").stdout
    assert plan.count("(fits") == 4  # teacher, student, sft, distilled (the label stage trains nothing)
