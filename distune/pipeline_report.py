"""A pipeline's report: its stages' held-out accuracy side by side, with the statistics that say what is noise.

Each training stage scored with `eval.choices` records, in results.json, which held-out example it got right
(`rows`: by source line) before and after training, its parameter count, and the pipeline records its wall time
(stage.json). The report prints one row per model: accuracy with its 95 % Wilson interval, its share of the
reference stage's accuracy (paired bootstrap 95 % interval over the same examples) and of its parameters, and the
stage's wall time; then, for each `paired: [A, B]`, the difference A - B with its paired bootstrap interval, the
discordant examples (right only by A / only by B) and the exact McNemar p-value (two-sided binomial test on the
discordant pairs). Written beside the stages as NAME-report.{md,json}. Imports neither ray nor deepspeed.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from distune.paths import write_atomic

BOOTSTRAP = 5000  # resamples of the examples (seeded: the same report every time)


def wilson(hits: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (sound near 0 and 1, unlike the normal approximation)."""
    if n == 0:
        return 0.0, 0.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs b (A right, B wrong) and c (A wrong, B right) under
    H0 are Binomial(b + c, 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_bootstrap(a: list[int], b: list[int], stat, seed: int = 0, draws: int = BOOTSTRAP) -> tuple[float, float]:
    """95 % percentile interval of stat(mean_a, mean_b) over resamples of the paired examples."""
    rng = random.Random(seed)
    n = len(a)
    values = []
    for _ in range(draws):
        idx = [rng.randrange(n) for _ in range(n)]
        values.append(stat(sum(a[i] for i in idx) / n, sum(b[i] for i in idx) / n))
    values.sort()
    return values[int(0.025 * draws)], values[int(0.975 * draws) - 1]


def _plain_keys(rows: dict) -> dict:
    """{line: hit}: a data.tasks run keys its examples TASK:line; with one task the prefix says nothing."""
    prefixes = {k.split(":", 1)[0] for k in rows if ":" in k}
    if len(prefixes) == 1 and all(":" in k for k in rows):
        return {k.split(":", 1)[1]: v for k, v in rows.items()}
    return dict(rows)


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def _minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def collect(stages, spec: dict) -> list[dict]:
    """One entry per scored model: label, rows (which example it got right), params, seconds."""
    models = []
    shown_before: list[dict] = []
    for stage in stages:
        if stage.generate is not None:
            continue
        store = stage.cfg.store()
        text = store.read_text("results.json")
        if text is None:
            continue
        res = json.loads(text)
        timing = json.loads(store.read_text("stage.json") or "{}")
        label = spec["labels"].get(stage.name, stage.name)
        per = res.get("rows", {})
        params = (res.get("params") or {}).get("total")
        before = _plain_keys(per["before"]) if "before" in per else None
        if before is not None and before not in shown_before:  # two students from one start: shown once
            shown_before.append(before)
            models.append({"stage": stage.name, "label": f"{label}, before training", "rows": before,
                           "params": params, "seconds": None, "when": "before"})
        if "after" in per:
            models.append({"stage": stage.name, "label": label, "rows": _plain_keys(per["after"]),
                           "params": params, "seconds": timing.get("seconds"), "resumed": timing.get("resumed"),
                           "when": "after"})
    return models


def pipeline_report(path: str | Path, stages, spec: dict) -> str:
    """The report as printed; also written (markdown and JSON) next to the last stage's run directory."""
    models = collect(stages, spec)
    if not models:
        return "report: no stage recorded per-example held-out results (they need eval.choices)"
    ref = next((m for m in models if m["stage"] == spec["reference"] and m["when"] == "after"), None)
    out_json: dict = {"pipeline": str(path), "models": [], "paired": []}
    sizes = {len(m["rows"]) for m in models}
    ref_name = spec["labels"].get(spec["reference"], spec["reference"]) if ref else None
    lines = [f"report ({path}): accuracy on {'/'.join(map(str, sorted(sizes)))} held-out examples (the highest-scored "
             f"of eval.choices), 95 % intervals: Wilson for accuracy, paired bootstrap ({BOOTSTRAP} resamples) "
             f"for shares and differences", "",
             "| model | parameters | accuracy | 95 % interval" + (f" | of {ref_name} (95 % interval)" if ref else "")
             + " | wall time |",
             "|---|---:|---:|---" + ("|---:" if ref else "") + "|---:|"]
    for m in models:
        hits, n = sum(m["rows"].values()), len(m["rows"])
        lo, hi = wilson(hits, n)
        entry = {"label": m["label"], "stage": m["stage"], "when": m["when"], "examples": n, "correct": hits,
                 "accuracy": hits / n if n else 0.0, "interval": [lo, hi], "params": m["params"],
                 "seconds": m["seconds"]}
        params = _millions(m["params"]) if m["params"] else "-"
        cells = [m["label"], params, f"{100 * entry['accuracy']:.1f} %", f"{100 * lo:.1f}–{100 * hi:.1f} %"]
        if ref:
            if m is ref:
                cells.append("100 %")
            else:
                keys = sorted(m["rows"].keys() & ref["rows"].keys())
                a, r = [m["rows"][k] for k in keys], [ref["rows"][k] for k in keys]
                share = (sum(a) / sum(r)) if sum(r) else float("nan")
                rlo, rhi = paired_bootstrap(a, r, lambda x, y: x / y if y else float("nan"))
                entry["of_reference"] = {"share": share, "interval": [rlo, rhi], "examples": len(keys)}
                cells.append(f"{100 * share:.1f} % ({100 * rlo:.1f}–{100 * rhi:.1f} %)")
            if m["params"] and ref["params"]:
                entry["params_share"] = m["params"] / ref["params"]
                if m is not ref:
                    cells[1] += f" ({100 * entry['params_share']:.0f} %)"
        seconds = m["seconds"]
        cells.append("-" if seconds is None else _minutes(seconds) + (" (resumed)" if m.get("resumed") else ""))
        lines.append("| " + " | ".join(cells) + " |")
        out_json["models"].append(entry)
    after = {m["stage"]: m for m in models if m["when"] == "after"}
    for a_name, b_name in spec["paired"]:
        if a_name not in after or b_name not in after:
            lines.append(f"\npaired {a_name} vs {b_name}: not both scored")
            continue
        A, B = after[a_name], after[b_name]
        keys = sorted(A["rows"].keys() & B["rows"].keys())
        a, b = [A["rows"][k] for k in keys], [B["rows"][k] for k in keys]
        only_a = sum(x and not y for x, y in zip(a, b))
        only_b = sum(y and not x for x, y in zip(a, b))
        diff = (sum(a) - sum(b)) / len(keys)
        lo, hi = paired_bootstrap(a, b, lambda x, y: x - y)
        p = mcnemar_exact(only_a, only_b)
        out_json["paired"].append({"a": a_name, "b": b_name, "examples": len(keys), "difference": diff,
                                   "interval": [lo, hi], "only_a": only_a, "only_b": only_b, "p": p})
        lines.append(f"\n{A['label']} vs {B['label']}, the same {len(keys)} examples: {100 * diff:+.1f} points "
                     f"(95 % interval {100 * lo:+.1f} to {100 * hi:+.1f}); right only by {A['label']}: {only_a}, "
                     f"only by {B['label']}: {only_b}; exact McNemar p = {p:.3f}")
    timed = [m["seconds"] for m in models if m["seconds"] is not None]
    gen = [s for s in stages if s.generate is not None]
    for s in gen:
        t = json.loads(s.cfg.store().read_text("stage.json") or "{}").get("seconds")
        if t is not None:
            timed.append(t)
            lines.append(f"\nstage {s.name} (generate) took {_minutes(t)}")
    if timed:
        lines.append(f"stages' wall time together: {_minutes(sum(timed))}")
    text = "\n".join(lines)
    last = stages[-1].cfg
    if not last.store().remote:
        folder = Path(last.run.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        stem = Path(path).stem
        write_atomic(folder / f"{stem}-report.md", text + "\n")
        write_atomic(folder / f"{stem}-report.json", json.dumps(out_json, indent=2) + "\n")
        text += f"\n(saved: {folder / (stem + '-report.md')}, .json)"
    return text
