"""`distune eval CFG`: the config's task scored as prompting (zero-shot, few-shot, few-shot CoT,
self-consistency) and as fine-tuned / distilled checkpoints, on the same held-out rows, with the same parser.

Every arm's output is read back by the config's own sample design (distune/data/design.py), so format errors
(unparseable, missing aspect, invalid label, extra text) are counted the same way everywhere. Generation runs as
Ray tasks (one per shard, each loading the models it needs once). `--search-instructions N` lets the prompted
model propose N instructions from a few examples (APE, Zhou et al. 2022), scores each zero-shot on a dev split
drawn from the training rows, and adds the best as the arm `zero_shot_searched`.
Imports neither ray nor deepspeed: distune.cluster.tasks is imported inside `command` only.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from distune.eval.prompts import MODES
from distune.paths import anchor

SEARCH_PROMPT = ("Here are examples of an input and the output wanted for it.\n\n{examples}\n\nWrite the one "
                 "instruction that tells someone how to turn any such input into its output. Reply with the "
                 "instruction only.")


def add_arguments(p) -> None:
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"prompting modes to run, comma-separated, or 'none' (default: all of {', '.join(MODES)})")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                   help="a fine-tuned or distilled model to score with the config's own prompt: an export folder "
                        "(full model, or PEFT adapter merged on load); repeat for several")
    p.add_argument("--prompt-model", help="the model the prompting modes use (default: model.path)")
    p.add_argument("--shots", type=int, default=4, help="demonstrations per few-shot prompt (default: 4)")
    p.add_argument("--select", choices=["random", "nearest"], default="random",
                   help="demonstrations: seeded random per query, or the nearest training rows by embedding")
    p.add_argument("--embedder", help="model whose mean-pooled hidden states embed inputs for --select nearest "
                                      "(default: the prompted model), e.g. a sentence encoder folder")
    p.add_argument("--samples", type=int, default=5, help="self-consistency: samples per query (default: 5)")
    p.add_argument("--temperature", type=float, default=0.7, help="self-consistency sampling temperature")
    p.add_argument("--max-new-tokens", type=int, default=48, help="answer budget (default: 48)")
    p.add_argument("--cot-max-new-tokens", type=int, default=160, help="budget of CoT modes (default: 160)")
    p.add_argument("--limit", type=int, help="score only the first N held-out rows")
    p.add_argument("--search-instructions", type=int, default=0, metavar="N",
                   help="propose N instructions with the prompted model and keep the best on a dev split")
    p.add_argument("--dev-size", type=int, default=40, help="training rows that score instruction candidates")
    p.add_argument("--out", help="folder for eval.json, eval.md, predictions.jsonl, eval.png "
                                 "(default: the run directory's eval/)")
    p.add_argument("--rescore", action="store_true",
                   help="generate nothing: parse and score the outputs already in --out again (after a parser or "
                        "label change); the instruction search is kept as it was")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default: 8)")
    p.add_argument("--shards", type=int, help="parallel Ray tasks (default: cluster.num_workers)")
    p.add_argument("--address", help="join this Ray cluster instead of starting one")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def command(cfg, summary: dict, args) -> int:
    from distune.errors import ConfigError
    from distune.data import Renderer, load_splits
    from distune.data.dataset import split_rows
    from distune.eval.prompts import Example, PromptBuilder, nearest
    from distune.models import load_tokenizer, resolve_model_source

    modes = [] if args.modes == "none" else [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise ConfigError(f"--modes: unknown mode {m!r}; choose from {', '.join(MODES)}")
    checkpoints = _checkpoints(args.checkpoint)
    if not modes and not checkpoints:
        raise ConfigError("nothing to score: give --modes and/or --checkpoint NAME=PATH")
    for flag, ok in [("--shots", args.shots >= 1), ("--samples", args.samples >= 1),
                     ("--temperature", args.temperature > 0), ("--max-new-tokens", args.max_new_tokens > 0),
                     ("--limit", args.limit is None or args.limit > 0), ("--dev-size", args.dev_size > 0),
                     ("--search-instructions", args.search_instructions >= 0)]:
        if not ok:
            raise ConfigError(f"{flag}: out of range")
    from distune.tasks import get_task

    if get_task(cfg.model.task).head is not None:
        raise ConfigError(f"model.task: distune eval scores generated answers; a {cfg.model.task} model is scored "
                          f"by its head in `distune run` (its eval/* metrics)")
    if getattr(cfg.data, "tasks", None):
        raise ConfigError("data.tasks: distune eval scores one task at a time; point it at one task's config")

    tok = load_tokenizer(summary["model_source"], cfg.model.trust_remote_code)
    _, rows, _ = split_rows(cfg.data, cfg.run.seed)
    by_line = dict(rows)
    splits = load_splits(cfg.data, tok, cfg.run.seed, None, cfg.model.task)
    eval_ex = [Example(s.line, by_line[s.line]) for s in splits.eval][: args.limit]
    train_ex = [Example(s.line, by_line[s.line]) for s in splits.train]
    if not eval_ex:
        raise ConfigError("data.eval_size: the held-out split is empty")
    labels = cfg.data.labels or cfg.eval.choices
    renderer = Renderer(tok, cfg.data.model_copy(update={"labels": labels}), cfg.data.path, cfg.run.seed)
    neighbours = None
    prompt_source = resolve_model_source(args.prompt_model) if args.prompt_model else summary["model_source"]
    wants_demos = any(m != "zero_shot" for m in modes)
    if wants_demos and args.select == "nearest" and not args.rescore:  # --rescore builds no prompts
        embedder = resolve_model_source(args.embedder) if args.embedder else prompt_source
        print(f"embedding {len(eval_ex)} queries and {len(train_ex)} training rows with {embedder} ...")
        neighbours = nearest([renderer.input_text(e.line, e.row) for e in eval_ex],
                             [renderer.input_text(e.line, e.row) for e in train_ex], embedder, args.shots)
    builder = PromptBuilder(renderer, train_ex, min(args.shots, len(train_ex)), args.select, cfg.run.seed,
                            neighbours)
    out = Path(anchor(args.out)) if args.out else cfg.run_dir / "eval"
    if args.rescore:  # the saved predictions carry their gold answers
        return _rescore(out, builder, labels, cfg)
    golds = []
    for e in eval_ex:
        gold = builder.design.parse(renderer.target_text(e.line, renderer.normalise(e.line, e.row)))
        if gold.errors:
            where = f"{cfg.data.eval_path} line {-e.line}" if e.line < 0 else f"{cfg.data.path} line {e.line}"
            raise ConfigError(f"{where}: the design's own target does not parse back "
                              f"({', '.join(gold.errors)}); check data.labels / eval.choices against the data")
        golds.append(gold.values)

    models = {"prompted": prompt_source, **{n: resolve_model_source(p) for n, p in checkpoints.items()}}
    settings = _settings(args)
    arms: dict[str, list] = {}  # arm -> requests (model key, settings key, prompt ids)
    for mode in modes:
        key = "sampled" if mode == "self_consistency" else ("cot" if mode == "few_shot_cot" else "greedy")
        arms[mode] = [("prompted", key, builder.prompt(mode, i, e)) for i, e in enumerate(eval_ex)]
    for name in checkpoints:
        arms[name] = [(name, "greedy", builder.prompt("zero_shot", i, e)) for i, e in enumerate(eval_ex)]

    runner = _Runner(cfg, args, models, settings)
    search = None
    if args.search_instructions:
        search = _search_instruction(builder, renderer, train_ex, runner, args, cfg, labels)
        arms["zero_shot_searched"] = [("prompted", "greedy", builder.prompt("zero_shot", i, e, search["best"]))
                                      for i, e in enumerate(eval_ex)]

    outputs, seconds, tokens = runner.run(arms)
    results, predictions = _score(arms, outputs, seconds, tokens, builder, golds, eval_ex, tok, labels)

    payload = {"config": cfg.run.name, "data": cfg.data.path, "rows": len(eval_ex), "labels": labels,
               "prompted_model": prompt_source, "checkpoints": checkpoints,
               "settings": {k: getattr(args, k) for k in ("shots", "select", "embedder", "samples", "temperature",
                                                           "max_new_tokens", "cot_max_new_tokens", "limit")},
               "results": results, "instruction_search": search}
    return _write(out, payload, predictions, cfg)


def _write(out: Path, payload: dict, predictions: list[dict], cfg) -> int:
    from distune.eval import report

    out.mkdir(parents=True, exist_ok=True)
    results = payload["results"]
    text = report.table(results)
    print(text)
    report.write_json(out / "eval.json", payload)
    (out / "eval.md").write_text(text + "\n")
    with open(out / "predictions.jsonl", "w") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
    drawn = report.plot(results, out / "eval.png", f"{cfg.run.name}: {payload['rows']} held-out rows")
    run_id = report.log_wandb(cfg.wandb, out, f"{cfg.run.name}-eval", results, predictions)
    print(f"wrote {out}/eval.json, eval.md, predictions.jsonl" + (", eval.png" if drawn else
                                                                   " (no plot: pip install matplotlib)")
          + (f"; W&B run {run_id} ({cfg.wandb.mode})" if run_id else ""))
    return 0


def _rescore(out: Path, builder, labels, cfg) -> int:
    from distune.errors import ConfigError
    from distune.eval.metrics import score
    from distune.eval.prompts import majority

    if not (out / "eval.json").is_file() or not (out / "predictions.jsonl").is_file():
        raise ConfigError(f"--rescore: {out} has no eval.json and predictions.jsonl of an earlier eval")
    payload = json.loads((out / "eval.json").read_text())
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    by_arm: dict[str, list] = {}
    for p in predictions:
        design = builder.design_for(p["arm"] if p["arm"] in MODES else "zero_shot")
        samples = [design.parse(t) for t in p["output"]]
        parsed = majority(samples) if len(samples) > 1 else samples[0]
        p["parsed"], p["errors"] = parsed.values, parsed.errors
        by_arm.setdefault(p["arm"], []).append((p["gold"], parsed))
    for arm, pairs in by_arm.items():
        payload["results"][arm]["metrics"] = score([g for g, _ in pairs], [q for _, q in pairs], labels)
    payload["rescored"] = time.strftime("%Y-%m-%d %H:%M")
    return _write(out, payload, predictions, cfg)


def _checkpoints(specs: list[str]) -> dict[str, str]:
    from distune.errors import ConfigError
    from distune.paths import named_paths

    try:
        pairs = named_paths(specs, "--checkpoint")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out = {}
    for name, path in pairs.items():
        if name in MODES or name == "zero_shot_searched":
            raise ConfigError(f"--checkpoint: the name {name!r} is taken")
        if not Path(path).expanduser().exists():
            raise ConfigError(f"--checkpoint {name}: {path} does not exist")
        out[name] = anchor(path)
    return out


def _settings(args) -> dict[str, dict]:
    base = {"temperature": 0.0, "top_p": 1.0, "num_samples": 1, "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens}
    return {"greedy": base, "cot": base | {"max_new_tokens": args.cot_max_new_tokens},
            "sampled": base | {"max_new_tokens": args.cot_max_new_tokens, "temperature": args.temperature,
                               "num_samples": args.samples},
            "propose": base | {"max_new_tokens": 48, "temperature": 0.9, "num_samples": args.search_instructions}}


class _Runner:
    """Runs request lists as Ray tasks: shard i takes every count-th request of every arm."""

    def __init__(self, cfg, args, models: dict[str, str], settings: dict):
        self.cfg, self.args, self.models, self.settings = cfg, args, models, settings

    def run(self, arms: dict[str, list]) -> tuple[dict, dict, dict]:
        from distune.cluster.tasks import run_shards
        from distune.hardware import uses_gpu, worker_env

        flat = [(arm, i, *req) for arm, reqs in arms.items() for i, req in enumerate(reqs)]
        use_gpu = uses_gpu(self.cfg.cluster.use_gpu)
        env = worker_env(self.cfg)
        count = max(1, min(self.args.shards or self.cfg.cluster.num_workers, len(flat)))
        spec = {"models": self.models, "settings": self.settings, "dtype": self.cfg.model.dtype,
                "trust_remote_code": self.cfg.model.trust_remote_code, "seed": self.cfg.run.seed,
                "cpus": self.cfg.cluster.cpus_per_worker}
        shards = run_shards(eval_shard, (spec, flat), count, use_gpu, self.cfg.cluster.cpus_per_worker,
                            self.args.address, desc="eval", show_progress=not self.args.no_progress, env=env)
        outputs = {arm: [None] * len(reqs) for arm, reqs in arms.items()}
        seconds = dict.fromkeys(arms, 0.0)
        tokens = dict.fromkeys(arms, 0)
        for s in shards:
            for arm, i, texts in s["outputs"]:
                outputs[arm][i] = texts
            for arm in s["seconds"]:
                seconds[arm] += s["seconds"][arm]
                tokens[arm] += s["tokens"][arm]
        return outputs, seconds, tokens


def eval_shard(spec: dict, flat: list, index: int, count: int) -> dict:
    """Runs in a Ray task: generates for flat[index::count], loading each model once, grouped by settings."""
    import torch

    from distune.generate import complete
    from distune.models import load_model, load_tokenizer

    torch.manual_seed(spec["seed"] + index)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(max(1, int(spec["cpus"])))
    mine = flat[index::count]
    groups: dict[tuple, list] = {}
    for arm, i, model_key, settings_key, ids in mine:
        groups.setdefault((model_key, settings_key, arm), []).append((i, ids))
    result = {"outputs": [], "seconds": {}, "tokens": {}}
    loaded: dict[str, tuple] = {}
    for (model_key, settings_key, arm), reqs in sorted(groups.items()):
        if model_key not in loaded:
            loaded.clear()  # one model in memory at a time
            source = spec["models"][model_key]
            model = load_model(source, spec["dtype"], spec["trust_remote_code"]).to(device).eval()
            loaded[model_key] = (model, load_tokenizer(source, spec["trust_remote_code"]))
        model, tok = loaded[model_key]
        t0 = time.perf_counter()
        texts, n_tokens = complete(model, tok, [ids for _, ids in reqs], spec["settings"][settings_key], device)
        result["seconds"][arm] = result["seconds"].get(arm, 0.0) + time.perf_counter() - t0
        result["tokens"][arm] = result["tokens"].get(arm, 0) + n_tokens
        result["outputs"] += [(arm, i, t) for (i, _), t in zip(reqs, texts)]
    return result


def _score(arms, outputs, seconds, tokens, builder, golds, eval_ex, tok, labels) -> tuple[dict, list]:
    from distune.eval.metrics import score
    from distune.eval.prompts import majority

    results, predictions = {}, []
    for arm, reqs in arms.items():
        design = builder.design_for(arm if arm in MODES else "zero_shot")
        parsed = []
        for (model_key, _, ids), texts, gold, e in zip(reqs, outputs[arm], golds, eval_ex):
            samples = [design.parse(t) for t in texts]
            p = majority(samples) if len(samples) > 1 else samples[0]
            parsed.append(p)
            predictions.append({"arm": arm, "line": e.line, "prompt": tok.decode(ids), "output": texts,
                                "parsed": p.values, "gold": gold, "errors": p.errors})
        results[arm] = {"metrics": score(golds, parsed, labels), "seconds": seconds[arm],
                        "generated_tokens": tokens[arm]}
    return results, predictions


def _search_instruction(builder, renderer, train_ex, runner, args, cfg, labels) -> dict:
    """APE: candidates proposed from k examples, each scored zero-shot on a dev split of training rows."""
    from distune.eval.metrics import primary, score

    rng = random.Random(f"{cfg.run.seed}:search")
    shown = rng.sample(train_ex, min(5, len(train_ex)))
    examples = "\n\n".join(f"Input: {renderer.input_text(e.line, e.row)}\nOutput: "
                           f"{renderer.target_text(e.line, renderer.normalise(e.line, e.row))}" for e in shown)
    meta = renderer.conversation([], SEARCH_PROMPT.format(examples=examples))
    texts = runner.run({"propose": [("prompted", "propose", meta)]})[0]["propose"][0]
    candidates = list(dict.fromkeys(t.strip().splitlines()[0].strip() for t in texts if t.strip()))
    hand = builder.design.instructions[0] if builder.design.instructions else None
    if hand is not None and hand not in candidates:
        candidates.insert(0, hand)
    if not candidates:
        raise ValueError("instruction search: the prompted model proposed nothing")
    dev = rng.sample(train_ex, min(args.dev_size, len(train_ex)))
    dev_golds = [builder.design.parse(renderer.target_text(e.line, renderer.normalise(e.line, e.row))).values
                 for e in dev]
    arms = {f"candidate-{j}": [("prompted", "greedy", builder.prompt("zero_shot", i, e, c)) for i, e in enumerate(dev)]
            for j, c in enumerate(candidates)}
    outputs = runner.run(arms)[0]
    scored = []
    for j, c in enumerate(candidates):
        parsed = [builder.design.parse(t[0]) for t in outputs[f"candidate-{j}"]]
        key, value = primary(score(dev_golds, parsed, labels))
        scored.append({"instruction": c, f"dev_{key}": value, "hand_written": c == hand})
    best = max(scored, key=lambda s: [v for k, v in s.items() if k.startswith("dev_")][0])
    print("instruction search (dev split, zero-shot):")
    for s in scored:
        mark = "*" if s is best else " "
        print(f" {mark} {[v for k, v in s.items() if k.startswith('dev_')][0]:.3f}  {s['instruction']!r}"
              + ("  (hand-written)" if s["hand_written"] else ""))
    return {"dev_rows": len(dev), "shown_examples": [e.line for e in shown], "candidates": scored,
            "best": best["instruction"]}
