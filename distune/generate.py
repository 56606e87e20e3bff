"""`distune generate`: a model writes responses into a new dataset (sequence-level distillation).

The teacher (method.teacher for a `distill` config, else model.path) answers every data.prompt of
data.path; each row comes back with a `response` column (replacing one it had), so a student config
trains on the teacher's outputs with `data.response: "{response}"` (Kim & Rush, 2016). `--rationale`
asks for step-by-step reasoning and a last line "Answer: ...", parsed into `rationale` and `answer` columns
("distilling step by step", Hsieh et al., 2023): `response` then holds both, and a student evaluated on
the answer alone can use `data.response: "{answer}"`. The config is validated first, so a file of
prompts only (no reference column) needs the override `data.response=` (empty).

Owns the command and the per-shard generation function. Imports neither ray nor deepspeed: the shard
function runs in Ray tasks started through distune.cluster.tasks, imported inside `command` only.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from distune.paths import anchor, write_atomic

RATIONALE_INSTRUCTION = ("Think step by step and explain your reasoning. Then give the final answer on its own "
                         "last line, as: Answer: <answer>")
# The last such line wins: a rationale may quote the format before it answers.
ANSWER_LINE = re.compile(r"^[ \t]*answer[ \t]*:[ \t]*(\S.*?)[ \t]*$", re.IGNORECASE | re.MULTILINE)


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="dataset to write (.jsonl); FILE.meta.json is written beside it "
                                                "with the settings and counts")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest response, in tokens (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy, deterministic (default); "
                                                                   "> 0: sample at this temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass when sampling (default: 1.0, off)")
    p.add_argument("--num-samples", type=int, default=1, help="responses per prompt, one row each (default: 1; "
                                                              "more needs --temperature > 0)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call in a shard, left-padded "
                                                             "(default: 8)")
    p.add_argument("--seed", type=int, help="sampling seed (default: run.seed); shard i seeds with seed + i")
    p.add_argument("--rationale", action="store_true",
                   help="ask for step-by-step reasoning and a last line 'Answer: <answer>'; adds the columns "
                        "rationale and answer; responses without that line are counted and dropped")
    p.add_argument("--rationale-instruction", default=RATIONALE_INSTRUCTION,
                   help="text appended to each prompt with --rationale (default: %(default)r)")
    p.add_argument("--choices", nargs="+", metavar="CHOICE",
                   help="keep only responses that are one of these, compared without surrounding spaces (labels "
                        "for a classification task: a teacher-labelled transfer set); the rest are counted and "
                        "dropped")
    p.add_argument("--shards", type=int, help="parallel Ray tasks, each with one worker's resources "
                                              "(default: cluster.num_workers)")
    p.add_argument("--address", help="join this Ray cluster (e.g. 10.0.0.1:6379) instead of starting one")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def command(cfg, summary: dict, args) -> int:
    from distune.errors import ConfigError
    from distune.data import Renderer
    from distune.data import DataError
    from distune.data.dataset import sampled_rows
    from distune.data.sources import BadRows
    from distune.models import load_tokenizer, resolve_model_source
    from distune.hardware import uses_gpu, worker_env

    for flag, value, ok in [("--max-new-tokens", args.max_new_tokens, args.max_new_tokens > 0),
                            ("--temperature", args.temperature, args.temperature >= 0),
                            ("--top-p", args.top_p, 0 < args.top_p <= 1),
                            ("--num-samples", args.num_samples, args.num_samples > 0),
                            ("--batch-size", args.batch_size, args.batch_size > 0),
                            ("--shards", args.shards, args.shards is None or args.shards > 0)]:
        if not ok:
            raise ConfigError(f"{flag}: {value} is out of range")
    if args.num_samples > 1 and args.temperature == 0:
        raise ConfigError("--num-samples > 1 needs --temperature > 0 (greedy decoding repeats one response)")
    out = Path(anchor(args.out))
    if out.suffix != ".jsonl":
        raise ConfigError(f"--out: {args.out} must end in .jsonl")
    if out.exists() and not args.force:
        raise ConfigError(f"--out: {out} exists; pass --force to overwrite it")
    if cfg.data.format not in ("prompt_response", "alpaca"):
        raise ConfigError("generate needs a single-turn data.format (prompt_response or alpaca): a prompt to answer")

    # The model as the config builds it: the method's teacher (a distillation config), or model.path (with its
    # layer subset).
    from distune.methods import frozen_models

    teacher = frozen_models(cfg).get("teacher") or cfg.model
    use_gpu = uses_gpu(cfg.cluster.use_gpu)
    if teacher.dtype == "fp16" and not use_gpu:
        raise ConfigError(f"{teacher.path}: dtype fp16 is not supported on CPU; use bf16 or fp32")
    source = resolve_model_source(teacher.path)
    tokenizer = load_tokenizer(source, teacher.trust_remote_code)

    bad = BadRows() if cfg.data.bad_rows == "skip" else None
    data_source, rows = sampled_rows(cfg.data, cfg.run.seed, bad)  # the rows training uses...
    rows.sort(key=lambda r: r[0])  # ...written back in file order
    # Prompts are rendered here, not in the shards: a bad row fails before any model loads, naming its line.
    renderer = Renderer(tokenizer, cfg.data, data_source, cfg.run.seed)
    items = []
    for line, row in rows:
        try:
            prompt = renderer.prompt_text(line, row)
        except DataError as e:
            if bad is None:
                raise
            bad.add(str(e))
            continue
        if args.rationale:
            prompt = f"{prompt}\n\n{args.rationale_instruction}"
        items.append((line, row, renderer.pair(prompt, "")[0]))

    if bad is not None and bad.count:
        print(f"warning: {bad.summary()}")
    from distune.cluster.tasks import run_shards

    settings = {"source": source, "dtype": teacher.dtype, "trust_remote_code": teacher.trust_remote_code,
                "layers": getattr(teacher, "layers", None), "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature, "top_p": args.top_p, "num_samples": args.num_samples,
                "batch_size": args.batch_size, "seed": cfg.run.seed if args.seed is None else args.seed,
                "rationale": args.rationale, "cpus": cfg.cluster.cpus_per_worker,
                "choices": getattr(args, "choices", None)}
    count = min(args.shards or cfg.cluster.num_workers, len(items))
    env = worker_env(cfg)
    began = time.time()
    shards = run_shards(generate_shard, (settings, items), count, use_gpu, cfg.cluster.cpus_per_worker,
                        args.address, desc="generate", show_progress=not args.no_progress, env=env,
                        total=len(items), unit="prompt")
    # Back to file order (a stable sort keeps a prompt's samples in the order they were drawn).
    written = [row for _, row in sorted((pair for s in shards for pair in s["rows"]), key=lambda p: p[0])]
    counts = {key: sum(s[key] for s in shards) for key in ("generated_tokens", "empty", "unparsed")}
    seconds = round(time.time() - began, 2)

    write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in written))
    meta = {"teacher": teacher.path, "data": data_source.name, "prompt": cfg.data.prompt, "shards": count,
            "settings": {k: settings[k] for k in ("max_new_tokens", "temperature", "top_p", "num_samples",
                                                   "batch_size", "seed", "rationale", "choices")}
            | ({"rationale_instruction": args.rationale_instruction} if args.rationale else {}),
            "prompts": len(items), "rows": len(written), "generated_tokens": counts["generated_tokens"],
            "empty_responses": counts["empty"], "unparsed_answers": counts["unparsed"], "seconds": seconds}
    write_atomic(out.with_name(out.name + ".meta.json"), json.dumps(meta, indent=2) + "\n")
    print(f"wrote {len(written)} rows to {out} ({counts['generated_tokens']} tokens generated in {seconds}s)")
    if counts["empty"] or counts["unparsed"]:
        why = " or ".join(w for w, on in [("without an 'Answer:' line", args.rationale),
                                          ("not one of --choices", settings["choices"])] if on) or "unparsed"
        print(f"dropped {counts['empty']} empty responses and {counts['unparsed']} {why} "
              f"(of {len(items) * args.num_samples})")
    return 0


def generate_shard(settings: dict, items: list, index: int, count: int, progress=None) -> dict:
    """Runs in a Ray task: generate for items[index::count]; returns (line, row) pairs and counts.
    `progress(n)`, when given, hears of every finished batch of prompts."""
    import torch

    from distune.models import load_model, load_tokenizer

    torch.manual_seed(settings["seed"] + index)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(max(1, int(settings["cpus"])))  # the task's CPU share, not the whole node
    tok = load_tokenizer(settings["source"], settings["trust_remote_code"])
    model = load_model(settings["source"], settings["dtype"], settings["trust_remote_code"], settings["layers"])
    model.to(device).eval()
    mine = items[index::count]
    choices = {c.strip() for c in settings["choices"] or ()}  # compared without surrounding spaces
    texts, tokens = complete(model, tok, [ids for _, _, ids in mine], settings, device, progress)
    result = {"rows": [], "generated_tokens": tokens, "empty": 0, "unparsed": 0}
    for (line, row, _), samples in zip(mine, texts):
        for text in samples:
            made = _columns(text, settings["rationale"]) if text else None
            if made is not None and choices and made.get("answer", made["response"]).strip() not in choices:
                made = None
            if made is None:
                result["unparsed" if text else "empty"] += 1
            else:
                result["rows"].append((line, {**row, **made}))
    return result


def complete(model, tok, prompts: list[list[int]], settings: dict, device,
             progress=None) -> tuple[list[list[str]], int]:
    """settings["num_samples"] texts per prompt (token ids, chat template applied), in the order given, and the
    number of tokens generated. Batched by similar length, left-padded; stops at the model's end tokens.
    settings: max_new_tokens, temperature (0 = greedy), top_p, num_samples, batch_size."""
    import torch

    from distune.tasks.choices import left_padded

    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos if eos is not None else tok.eos_token_id])
    sampling = ({"do_sample": True, "temperature": settings["temperature"], "top_p": settings["top_p"],
                 "top_k": 0}  # top_k=0: no hidden top-50 cut beyond what the user asked for
                if settings["temperature"] > 0 else {"do_sample": False})
    n, size = settings["num_samples"], settings["batch_size"]
    # Similar lengths share a batch, so less compute goes to padding; results go back to the given order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[list[str]] = [[] for _ in prompts]
    tokens = 0
    for start in range(0, len(order), size):
        batch = order[start:start + size]
        # Left padding: every prompt ends where generation starts; the mask hides the pads.
        input_ids, mask = left_padded([prompts[i] for i in batch], tok.pad_token_id)
        width = input_ids.shape[1]
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=settings["max_new_tokens"], num_return_sequences=n,
                                 pad_token_id=tok.pad_token_id, use_cache=True, **sampling)
        for k, seq in enumerate(out[:, width:].tolist()):
            length = next((i + 1 for i, t in enumerate(seq) if t in stops), len(seq))
            tokens += length
            # generate returns a prompt's n samples next to each other
            texts[batch[k // n]].append(tok.decode(seq[:length], skip_special_tokens=True).strip())
        if progress is not None:
            progress(len(batch))
    return texts, tokens


def _columns(text: str, rationale: bool) -> dict | None:
    """The new columns for one (non-empty) response; None when --rationale finds no answer line."""
    if not rationale:
        return {"response": text}
    matches = list(ANSWER_LINE.finditer(text))
    if not matches:
        return None
    reasoning, answer = text[: matches[-1].start()].strip(), matches[-1].group(1)
    # Ends at the answer line: whatever the teacher wrote after it is not part of the target.
    return {"rationale": reasoning, "answer": answer,
            "response": f"{reasoning}\nAnswer: {answer}" if reasoning else f"Answer: {answer}"}


