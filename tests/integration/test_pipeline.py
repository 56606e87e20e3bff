"""A pipeline: stages run in order on one Ray cluster, an earlier stage's export feeding a later one (a model, or
a dataset a generate stage wrote); a stage cut short resumes, a finished one is skipped, a changed one starts over,
the stages share a W&B group, and the report compares their held-out scores example by example."""

import json

import yaml

import tiny
import wandb_records
from distune.cli import main as cli_main
from distune.pipeline import load_pipeline


def pipeline_file(tmp_path, tiny_model, tiny_data) -> str:
    shared = tiny.base_config(tiny_model, tiny_data, tmp_path / "runs", wandb={"mode": "offline"},
                              train={"max_steps": 2}, checkpoint={"every": 1},
                              data={"limit": 56}, eval={"choices": ["positive", "negative"]})
    (tmp_path / "common.yaml").write_text(yaml.safe_dump(shared))
    raw = {"base": "common.yaml",
           "stages": {"teacher": {"method": {"name": "lora", "r": 4}},
                      # the teacher writes responses for 24 rows no other stage uses (a transfer set)
                      "label": {"generate": {"max_new_tokens": 3, "batch_size": 8},
                                "model": {"path": "${stages.teacher.export}"},
                                "data": {"skip": 56, "limit": 24, "eval_size": 0, "response": ""},
                                "eval": {"choices": None}},
                      "student": {"method": {"name": "distill", "student": {"name": "lora", "r": 2},
                                             "teacher": {"path": "${stages.teacher.export}", "dtype": "fp32"},
                                             "kd_weight": 0.5},
                                  "data": {"tasks": [{"name": "gold"},
                                                     {"name": "transfer", "path": "${stages.label.export}",
                                                      "response": "{response}", "skip": 0, "limit": None,
                                                      "eval_size": 0}]}}},
           "report": {"reference": "teacher", "paired": ["student", "teacher"]}}
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def test_pipeline_cut_resumed_skipped_and_rerun(ray_cluster, tiny_model, tiny_data, tmp_path, capsys):
    path = pipeline_file(tmp_path, tiny_model, tiny_data)
    teacher, label, student = load_pipeline(path)
    assert student.cfg.method_config().teacher.path == str(teacher.cfg.run_dir / "export")
    assert sorted(student.needs) == ["label", "teacher"]
    assert label.export == str(label.cfg.run_dir / "export" / "generated.jsonl")

    assert cli_main(["validate", path]) == 0  # the later stages wait for the teacher's export
    assert "its inputs are checked once stage teacher has run" in capsys.readouterr().out

    # Cut: the teacher stops after step 1 (checkpointed), so the pipeline stops there.
    assert cli_main(["run", path, "stages.teacher.train.stop_after_steps=1", "--no-progress"]) == 143
    out = capsys.readouterr()
    assert "== stage teacher (1/3): new" in out.out and "stage label" not in out.out
    assert not (teacher.cfg.run_dir / "export").exists()

    assert cli_main(["run", path, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "== stage teacher (1/3): resume" in out and "resumed" in out.lower()
    assert "== stage label (2/3): new" in out and "== stage student (3/3): new" in out
    assert (student.cfg.run_dir / "export").is_dir()
    generated = [json.loads(line) for line in open(label.export)]
    meta = json.loads((label.cfg.run_dir / "export" / "generated.jsonl.meta.json").read_text())
    assert meta["prompts"] == 24 and len(generated) == meta["rows"] == 24 - meta["empty_responses"] > 0
    assert all(isinstance(r["response"], str) and r["response"] for r in generated)
    assert not (label.cfg.run_dir / "generating").exists()  # published by one rename

    # The report: every trained stage on the same 8 held-out rows, the paired test, the stages' times.
    assert "report (" in out and "exact McNemar p =" in out and "| teacher |" in out
    report = json.loads((tmp_path / "runs" / "pipe-report.json").read_text())
    assert [m["stage"] for m in report["models"]] == ["teacher", "student"]
    results = json.loads((teacher.cfg.run_dir / "results.json").read_text())
    assert report["models"][0]["correct"] == sum(results["rows"]["after"].values())
    assert report["models"][0]["examples"] == len(results["rows"]["after"]) == 8
    assert results["params"]["trainable"] < results["params"]["total"]  # LoRA
    pair = report["paired"][0]
    assert pair["examples"] == 8 and 0 <= pair["p"] <= 1
    for stage in (teacher, student):
        logged = wandb_records.finished(stage.cfg.run_dir)
        assert set(logged["groups"]) == {"pipe"} and set(logged["job_types"]) == {stage.name}
        assert len(set(logged["run_ids"])) == 1  # the cut teacher's two invocations are one W&B run

    assert cli_main(["run", path, "--no-progress"]) == 0  # nothing to do
    out = capsys.readouterr().out
    assert out.count(": done (export published, config unchanged)") == 3
    assert "report (" in out  # printed again from what the stages recorded


    # The teacher's recipe changes: it starts over, and so does the student that learns from it.
    before = (student.cfg.run_dir / "wandb_run_id").read_text()
    assert cli_main(["run", path, "stages.teacher.train.lr=0.002", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "== stage teacher (1/3): start over (its config changed (train.lr))" in out
    assert "== stage label (2/3): start over (stage teacher ran again)" in out
    assert "== stage student (3/3): start over (stage " in out  # its teacher and its dataset both ran again
    assert (student.cfg.run_dir / "wandb_run_id").read_text() != before
