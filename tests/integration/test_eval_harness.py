"""`distune eval` through Ray: every prompting mode, instruction search and a fine-tuned checkpoint on the same
held-out rows; the fine-tuned model answers right, the random base model's errors are counted by type."""

import json

import pytest
import yaml

import tiny
import wandb_records
from distune.cli import main as cli_main
from distune.training import fit
from distune.config import load_config
from distune.data.design import Design, Parsed
from distune.eval.metrics import score


@pytest.fixture(scope="module")
def positive_run(ray_cluster, tiny_model, tmp_path_factory):
    """A tiny model fine-tuned to always answer 'positive', on data where that is always right."""
    root = tmp_path_factory.mktemp("eval")
    data = tiny.write_jsonl(root / "pos.jsonl", [dict(r, label="positive") for r in tiny.sentiment_rows(96)])
    raw = tiny.base_config(tiny_model, data, root / "runs", run={"name": "pos", "seed": 0},
                           train={"max_steps": 30, "global_batch_size": 8, "micro_batch_size": 8, "lr": 1e-2},
                           data={"design": {"instruction": "Label the sentiment."}},
                           eval={"choices": ["negative", "positive"]}, wandb={"mode": "offline"})
    cfg = load_config(raw)
    fit(cfg, str(tiny_model), show_progress=False)
    path = root / "pos.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, cfg


def test_every_mode_and_a_checkpoint(positive_run, capsys):
    path, cfg = positive_run
    out = cfg.run_dir / "eval-all"
    assert cli_main(["eval", str(path), "--checkpoint", f"tuned={cfg.run_dir / 'export'}", "--shots", "2",
                     "--samples", "3", "--limit", "6", "--search-instructions", "3", "--dev-size", "6",
                     "--max-new-tokens", "8", "--cot-max-new-tokens", "12", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    results = report["results"]
    assert list(results) == ["zero_shot", "few_shot", "few_shot_cot", "self_consistency", "tuned",
                             "zero_shot_searched"]
    assert results["tuned"]["metrics"]["accuracy"] == 1.0 and results["tuned"]["metrics"]["format_error_rate"] == 0
    base = results["zero_shot"]["metrics"]  # a random tiny model: its answers are not labels
    assert base["accuracy"] < 1.0 and sum(base["errors"].values()) > 0
    assert "| tuned" in printed and "instruction search" in printed

    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    by_arm = {arm: [p for p in preds if p["arm"] == arm] for arm in results}
    assert all(len(v) == 6 for v in by_arm.values())
    assert all(len(p["output"]) == 3 for p in by_arm["self_consistency"])
    assert all(len(p["output"]) == 1 for p in by_arm["few_shot"])
    assert all(p["prompt"].count("Label the sentiment.") == 3 for p in by_arm["few_shot"])  # 2 demos + query
    assert all(p["prompt"].count("Label the sentiment.") == 1 for p in by_arm["tuned"])
    # The table is what the predictions say: re-score every arm from the file.
    design = Design(cfg.data.design, ["negative", "positive"], 0)
    for arm, rows in by_arm.items():
        again = score([p["gold"] for p in rows], [Parsed(p["parsed"], p["errors"]) for p in rows],
                      ["negative", "positive"])
        assert again["accuracy"] == results[arm]["metrics"]["accuracy"], arm
        assert again["errors"] == results[arm]["metrics"]["errors"], arm
    assert design.parse(by_arm["tuned"][0]["output"][0]).values == {"label": "positive"}

    search = report["instruction_search"]
    assert search["dev_rows"] == 6 and search["candidates"][0] == {
        "instruction": "Label the sentiment.", "dev_accuracy": search["candidates"][0]["dev_accuracy"],
        "hand_written": True}
    assert search["best"] in [c["instruction"] for c in search["candidates"]]

    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = wandb_records.finished(out)["history"]  # the offline W&B run: both tables, one row per arm
    row = next(r for r in logged if "eval/results/nrows" in r)
    assert row["eval/results/_type"] == "table-file" and row["eval/results/nrows"] == 6
    assert row["eval/predictions/nrows"] == 36

    # --rescore re-parses the saved outputs without generating: the same figures, instruction search kept.
    assert cli_main(["eval", str(path), "--checkpoint", f"tuned={cfg.run_dir / 'export'}", "--rescore",
                     "--out", str(out), "--no-progress"]) == 0
    again = json.loads((out / "eval.json").read_text())
    assert again["rescored"] and again["instruction_search"] == search
    assert {a: r["metrics"] for a, r in again["results"].items()} == {a: r["metrics"] for a, r in results.items()}


def test_bad_arguments_fail_before_any_work(positive_run, capsys):
    path, cfg = positive_run
    assert cli_main(["eval", str(path), "--modes", "zero_shot,telepathy"]) == 2
    assert "--modes: unknown mode 'telepathy'" in capsys.readouterr().err
    assert cli_main(["eval", str(path), "--checkpoint", "tuned"]) == 2
    assert "must be NAME=PATH" in capsys.readouterr().err
    assert cli_main(["eval", str(path), "--checkpoint", "x=/no/such/dir"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["eval", str(path), "--modes", "none"]) == 2
    assert "nothing to score" in capsys.readouterr().err


@pytest.mark.slow  # 27 s: a prompt-tuning run; prompt learning stays in the default run via the PEFT matrix
def test_a_prompt_tuned_checkpoint_is_scored(positive_run, tiny_model, tmp_path):
    """Prompt learning has nothing to merge: eval runs the base with the trained virtual tokens in front, and
    answers exactly what PEFT's own loading of the adapter generates."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = positive_run
    raw = yaml.safe_load(path.read_text())
    raw["run"]["name"] = "prompt"
    raw["method"] = {"name": "prompt_tuning", "num_virtual_tokens": 8}
    raw["train"] |= {"max_steps": 4, "lr": 0.1}
    cfg = load_config(raw)
    fit(cfg, str(tiny_model), show_progress=False)
    out = tmp_path / "eval"
    assert cli_main(["eval", str(path), "--modes", "zero_shot", "--checkpoint", f"prompt={cfg.run_dir / 'export'}",
                     "--limit", "3", "--max-new-tokens", "4", "--out", str(out), "--no-progress"]) == 0
    assert "prompt" in json.loads((out / "eval.json").read_text())["results"]
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    tuned = [p for p in preds if p["arm"] == "prompt"]
    base = {p["line"]: p["output"] for p in preds if p["arm"] == "zero_shot"}
    assert len(tuned) == 3 and any(p["output"] != base[p["line"]] for p in tuned)  # the virtual tokens steer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), cfg.run_dir / "export").eval()
    for p in tuned:
        ids = tok(p["prompt"], add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                 do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        text = tok.decode(new, skip_special_tokens=False).split("<|end|>")[0]
        assert p["output"] == [tok.decode(tok(text, add_special_tokens=False).input_ids,
                                          skip_special_tokens=True).strip()]
