"""A pipeline: stages run in order on one Ray cluster, an earlier stage's export feeding a later one; a stage cut
short resumes, a finished one is skipped, a changed one starts over, and the stages share a W&B group."""

import yaml

import tiny
import wandb_records
from distune.cli import main as cli_main
from distune.pipeline import load_pipeline


def pipeline_file(tmp_path, tiny_model, tiny_data) -> str:
    shared = tiny.base_config(tiny_model, tiny_data, tmp_path / "runs", wandb={"mode": "offline"},
                              train={"max_steps": 2}, checkpoint={"every": 1})
    (tmp_path / "common.yaml").write_text(yaml.safe_dump(shared))
    raw = {"base": "common.yaml",
           "stages": {"teacher": {"method": {"name": "lora", "r": 4}},
                      "student": {"method": {"name": "distill", "student": {"name": "lora", "r": 2},
                                             "teacher": {"path": "${stages.teacher.export}", "dtype": "fp32"},
                                             "kd_weight": 0.5}}}}
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def test_pipeline_cut_resumed_skipped_and_rerun(ray_cluster, tiny_model, tiny_data, tmp_path, capsys):
    path = pipeline_file(tmp_path, tiny_model, tiny_data)
    teacher, student = load_pipeline(path)
    assert student.cfg.method_config().teacher.path == str(teacher.cfg.run_dir / "export")
    assert student.needs == ["teacher"]

    assert cli_main(["validate", path]) == 0  # the student waits for the teacher's export
    assert "its inputs are checked once stage teacher has run" in capsys.readouterr().out

    # Cut: the teacher stops after step 1 (checkpointed), so the pipeline stops there.
    assert cli_main(["run", path, "stages.teacher.train.stop_after_steps=1", "--no-progress"]) == 143
    out = capsys.readouterr()
    assert "== stage teacher (1/2): new" in out.out and "stage student" not in out.out
    assert not (teacher.cfg.run_dir / "export").exists()

    assert cli_main(["run", path, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "== stage teacher (1/2): resume" in out and "resumed" in out.lower()
    assert "== stage student (2/2): new" in out
    assert (student.cfg.run_dir / "export").is_dir()
    for stage in (teacher, student):
        logged = wandb_records.finished(stage.cfg.run_dir)
        assert set(logged["groups"]) == {"pipe"} and set(logged["job_types"]) == {stage.name}
        assert len(set(logged["run_ids"])) == 1  # the cut teacher's two invocations are one W&B run

    assert cli_main(["run", path, "--no-progress"]) == 0  # nothing to do
    out = capsys.readouterr().out
    assert out.count(": done (export published, config unchanged)") == 2

    # The teacher's recipe changes: it starts over, and so does the student that learns from it.
    before = (student.cfg.run_dir / "wandb_run_id").read_text()
    assert cli_main(["run", path, "stages.teacher.train.lr=0.002", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "== stage teacher (1/2): start over (its config changed (train.lr))" in out
    assert "== stage student (2/2): start over (stage teacher ran again)" in out
    assert (student.cfg.run_dir / "wandb_run_id").read_text() != before
