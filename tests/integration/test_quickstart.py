"""The README's main job, end to end on the real model and data (slow: ~13 minutes on 2 cores):
stage 1 fine-tunes the teacher, stage 2 distils it into a 6-layer student."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(config: str, out: Path, *overrides: str) -> dict:
    cmd = [sys.executable, "-m", "distune", "run", str(ROOT / "configs" / config), f"run.output_dir={out}",
           *overrides, "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = config.removesuffix(".yaml")
    return json.loads((out / name / "results.json").read_text()) | {"stdout": proc.stdout}


@pytest.mark.slow
def test_quickstart_teacher_then_distilled_student(tmp_path):
    teacher = _run("quickstart-teacher.yaml", tmp_path)
    assert teacher["after"]["eval/accuracy"] > 0.5  # the base model scores 41.7 % (majority class: 42 %)
    assert (tmp_path / "quickstart-teacher" / "export" / "adapter_model.safetensors").is_file()

    student = _run("quickstart.yaml", tmp_path, f"method.teacher.path={tmp_path}/quickstart-teacher/export")
    assert "eval of the teacher" in student["stdout"] and "eval after training" in student["stdout"]
    assert student["teacher"]["eval/accuracy"] > 0.5
    assert student["after"]["eval/accuracy"] > student["before"]["eval/accuracy"] + 0.05  # measured: +8.3 points
    assert (tmp_path / "quickstart" / "export" / "model.safetensors").is_file()
