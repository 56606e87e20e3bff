"""The pipeline report's statistics and its checks: Wilson intervals, the exact McNemar test, paired bootstrap
intervals, and a report computed from stages' recorded results."""

import json
import math
import random

import pytest
import yaml

from distune.config import ConfigError
from distune.pipeline import load_pipeline, load_report
from distune.pipeline_report import mcnemar_exact, paired_bootstrap, pipeline_report, wilson


def test_wilson_matches_the_closed_form_and_stays_in_0_1():
    lo, hi = wilson(60, 100)
    # Wilson (1927) for p = 0.6, n = 100 at z = 1.96: 0.502 to 0.691 (standard tables)
    assert (round(lo, 3), round(hi, 3)) == (0.502, 0.691)
    assert wilson(0, 10)[0] == 0.0 and 0 < wilson(0, 10)[1] < 0.35
    assert math.isclose(wilson(10, 10)[1], 1.0)


def test_mcnemar_exact_is_the_two_sided_binomial_tail():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    # b=1, c=9: 2 * P(X <= 1), X ~ Binomial(10, 1/2) = 2 * 11 / 1024
    assert math.isclose(mcnemar_exact(1, 9), 22 / 1024)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    assert mcnemar_exact(31, 16) < 0.05 < mcnemar_exact(25, 16)


def test_paired_bootstrap_interval_covers_the_difference_and_is_seeded():
    rng = random.Random(1)
    a = [int(rng.random() < 0.7) for _ in range(300)]
    b = [int(rng.random() < 0.6) for _ in range(300)]
    diff = (sum(a) - sum(b)) / 300
    lo, hi = paired_bootstrap(a, b, lambda x, y: x - y)
    assert lo < diff < hi and hi - lo < 0.2
    assert paired_bootstrap(a, b, lambda x, y: x - y) == (lo, hi)
    same = paired_bootstrap(a, a, lambda x, y: x - y)
    assert same == (0.0, 0.0)  # identical answers: no difference in any resample


def pipeline(tmp_path, report) -> str:
    shared = {"run": {"output_dir": str(tmp_path / "runs")}, "model": {"path": str(tmp_path)},
              "data": {"path": str(tmp_path / "d.jsonl")}, "eval": {"choices": ["a", "b"]}}
    raw = {**shared, "stages": {"teacher": {}, "label": {"generate": {"max_new_tokens": 2}},
                                "sft": {}, "distilled": {}}, "report": report}
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def record(stage, after: list[int], before: list[int] | None = None, params: int = 1000, seconds: float = 61):
    rows = {"after": {f"gold:{i}": h for i, h in enumerate(after)}}
    if before is not None:
        rows["before"] = {f"gold:{i}": h for i, h in enumerate(before)}
    stage.cfg.run_dir.mkdir(parents=True)
    (stage.cfg.run_dir / "results.json").write_text(json.dumps({"rows": rows, "params": {"total": params}}))
    (stage.cfg.run_dir / "stage.json").write_text(json.dumps({"seconds": seconds}))


def test_report_from_recorded_stages(tmp_path):
    path = pipeline(tmp_path, {"reference": "teacher", "paired": ["distilled", "sft"],
                               "labels": {"sft": "student, SFT only"}})
    stages = load_pipeline(path, resolve=False)
    spec = load_report(path, stages)
    teacher, _, sft, distilled = stages
    n = 40
    start = [0] * n
    record(teacher, [1] * 30 + [0] * 10, params=4000)
    record(sft, [1] * 20 + [0] * 20, before=start)
    record(distilled, [1] * 28 + [0] * 12, before=start)  # right on 8 more, wrong on none of sft's
    text = pipeline_report(path, stages, spec)
    assert "| student, SFT only, before training | 0.0M (25 %) | 0.0 % |" in text  # the shared start, once
    assert text.count("before training") == 1
    assert "| teacher | 0.0M | 75.0 % | 59.8–85.8 % | 100 % |" in text
    assert "| student, SFT only | 0.0M (25 %) | 50.0 % |" in text
    assert "right only by distilled: 8, only by student, SFT only: 0; exact McNemar p = 0.008" in text
    saved = json.loads((tmp_path / "runs" / "pipe-report.json").read_text())
    d = next(m for m in saved["models"] if m["stage"] == "distilled")
    assert d["correct"] == 28 and d["examples"] == 40 and math.isclose(d["of_reference"]["share"], 28 / 30)
    assert saved["paired"][0]["only_a"] == 8 and math.isclose(saved["paired"][0]["difference"], 0.2)


@pytest.mark.parametrize("report, message", [
    ({"paired": ["distilled", "label"]}, "report.paired[0]: 'label' is not a training stage"),
    ({"reference": "nope"}, "report.reference: 'nope' is not a training stage"),
    ({"paired": [["sft"]]}, "report.paired[0]: expected two stage names"),
    ({"compare": 1}, "report.compare: unknown key"),
])
def test_report_errors_name_the_key(tmp_path, report, message):
    path = pipeline(tmp_path, report)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_report(path, load_pipeline(path, resolve=False))


@pytest.mark.parametrize("generate, message", [
    ({"max_new_token": 2}, "stages.label.generate.max_new_token: unknown option"),
    ({"max_new_tokens": "two"}, "stages.label.generate.max_new_tokens: 'two' is not a valid value"),
    ({"rationale": 1}, "stages.label.generate.rationale: 1 is not a valid value"),
    ([1], "stages.label.generate: expected a mapping"),
])
def test_generate_stage_options_are_checked(tmp_path, generate, message):
    path = pipeline(tmp_path, None)
    raw = yaml.safe_load(open(path))
    raw["stages"]["label"]["generate"] = generate
    open(path, "w").write(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message):
        load_pipeline(path, resolve=False)


def test_generate_stage_gets_defaults_and_its_export_is_a_file(tmp_path):
    path = pipeline(tmp_path, None)
    label = load_pipeline(path, resolve=False)[1]
    assert label.generate["max_new_tokens"] == 2 and label.generate["temperature"] == 0.0
    assert label.generate["choices"] is None
    assert label.export.endswith("label/export/generated.jsonl")


def test_a_changed_generate_option_starts_the_stage_over(tmp_path):
    from distune.config import dump_config
    from distune.pipeline import state

    path = pipeline(tmp_path, None)
    label = load_pipeline(path, resolve=False)[1]
    label.cfg.run_dir.mkdir(parents=True)
    record = dump_config(label.cfg) | {"generate": label.generate}
    (label.cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(record))
    (label.cfg.run_dir / "export").mkdir()
    assert state(label, set()) == ("done", "export published, config unchanged")
    changed = load_pipeline(path, ["stages.label.generate.max_new_tokens=3"], resolve=False)[1]
    assert state(changed, set()) == ("start over", "its config changed (generate)")
