"""`distune adapters list | export | merge | generate`: the adapter store and switching inference from the shell.
Takes no run config. Imports neither ray nor deepspeed (torch / peft only inside the commands that need them)."""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("list", help="every adapter folder under DIR: name, PEFT type, base, size, parameters")
    ls.add_argument("dir")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ex = sub.add_parser("export", help="copy one adapter out of a run (atomically)")
    ex.add_argument("run_dir")
    ex.add_argument("name", help="the adapter's name (method adapters), or the run's name for a lora run")
    ex.add_argument("--out", required=True)
    me = sub.add_parser("merge", help="fold a LoRA-family adapter into its base: a plain save_pretrained folder")
    me.add_argument("adapter")
    me.add_argument("--out", required=True)
    me.add_argument("--base", help="the base model (default: the one the adapter names)")
    ge = sub.add_parser("generate", help="one base loaded once, several adapters; greedy answers per adapter")
    ge.add_argument("base", help="the base model, or '-' for the one the first adapter names")
    ge.add_argument("--adapter", action="append", required=True, metavar="NAME=PATH")
    ge.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    ge.add_argument("--use", action="append", metavar="NAME", help="adapters to answer with (default: all)")
    ge.add_argument("--choices", help="comma-separated: score these answers instead of generating")
    ge.add_argument("--system", help="system message for the chat template")
    ge.add_argument("--max-new-tokens", type=int, default=32)


def _adapters(specs: list[str]) -> dict[str, str]:
    from distune.adapters.store import AdapterError
    from distune.paths import named_paths

    try:
        return named_paths(specs, "--adapter")
    except ValueError as e:
        raise AdapterError(str(e)) from None


def command(args) -> int:
    from distune.adapters import store

    if args.action == "list":
        rows = store.list_adapters(Path(args.dir))
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{'name':<24} {'type':<8} {'params':>10} {'MB':>8}  base")
        for r in rows:
            print(f"{r['name']:<24} {r['peft_type'] or '?':<8} {r['params']:>10,} {r['bytes'] / 1e6:>8.2f}  {r['base_model']}")
        if not rows:
            print(f"(no adapter folders under {args.dir})")
        return 0
    if args.action == "export":
        print(f"exported: {store.export_adapter(Path(args.run_dir), args.name, Path(args.out))}")
        return 0
    if args.action == "merge":
        print(f"merged: {store.merge_adapter(Path(args.adapter), Path(args.out), args.base)}")
        return 0

    from distune.adapters.switching import AdapterSet

    served = AdapterSet(_adapters(args.adapter), None if args.base == "-" else args.base)
    choices = [c.strip() for c in args.choices.split(",")] if args.choices else None
    for name in args.use or served.names:
        served.use(name)  # refuses an unknown name before any work
        for prompt in args.prompt:
            if choices:
                scores = served.score(prompt, choices, name, args.system)
                best = max(range(len(choices)), key=scores.__getitem__)
                print(f"[{name}] {prompt!r} -> {choices[best]}  ({', '.join(f'{c}={s:.3f}' for c, s in zip(choices, scores))})")
            else:
                print(f"[{name}] {prompt!r} -> {served.generate([prompt], name, args.max_new_tokens, args.system)[0]!r}")
    return 0
