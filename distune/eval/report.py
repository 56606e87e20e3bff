"""An eval's results as a terminal table, JSON, a PNG bar chart and a W&B table. Imports neither ray nor
deepspeed (matplotlib and wandb load inside the functions that need them)."""

from __future__ import annotations

import json
from pathlib import Path

from distune.data.design import ERRORS
from distune.eval.metrics import primary
from distune.paths import write_atomic


def table(results: dict[str, dict]) -> str:
    """One row per mode / checkpoint: the headline metric, macro-F1 or entity P/R, exact match, format errors."""
    first = next(iter(results.values()))["metrics"]
    labelled = "accuracy" in first
    head = ["arm", "accuracy", "macro-F1"] if labelled else ["arm", "entity F1", "precision", "recall"]
    head += ["exact match", "format errors", *ERRORS, "s"]
    rows = []
    for name, r in results.items():
        m = r["metrics"]
        figures = ([m["accuracy"], m["macro_f1"]] if labelled
                   else [m["entity_f1"], m["entity_precision"], m["entity_recall"]])
        rows.append([name, *(f"{100 * x:.1f}%" for x in figures), f"{100 * m['exact_match']:.1f}%",
                     f"{100 * m['format_error_rate']:.1f}%", *(str(m["errors"][e]) for e in ERRORS),
                     f"{r['seconds']:.0f}"])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def write_json(path: Path, payload: dict) -> None:
    write_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


def plot(results: dict[str, dict], path: Path, title: str) -> bool:
    """A bar per arm (headline metric) with its format-error rate; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(results)
    key, _ = primary(next(iter(results.values()))["metrics"])
    values = [100 * primary(results[n]["metrics"])[1] for n in names]
    errors = [100 * results[n]["metrics"]["format_error_rate"] for n in names]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names) + 2), 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], values, width=0.4, label=key.replace("_", " "))
    ax.bar([x + 0.2 for x in xs], errors, width=0.4, label="format errors", color="tab:red", alpha=0.6)
    for x, v in zip(xs, values):
        ax.text(x - 0.2, v + 1, f"{v:.1f}", ha="center", fontsize=8)
    ax.set_xticks(list(xs), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def log_wandb(wandb_cfg, out_dir: Path, name: str, results: dict[str, dict], predictions: list[dict]) -> str | None:
    """A W&B run (the config's project and mode) with the results table and every prediction."""
    if wandb_cfg.mode == "disabled":
        return None
    import wandb

    (out_dir / "wandb").mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, mode=wandb_cfg.mode, dir=str(out_dir),
                     name=name, job_type="eval", tags=wandb_cfg.tags, settings=wandb.Settings(console="off",
                                                                                                silent=True))
    first = next(iter(results.values()))["metrics"]
    key, _ = primary(first)
    cols = ["arm", key, "exact_match", "format_error_rate", *ERRORS]
    rows = [[n, r["metrics"][key], r["metrics"]["exact_match"], r["metrics"]["format_error_rate"],
             *(r["metrics"]["errors"][e] for e in ERRORS)] for n, r in results.items()]
    pred_cols = ["arm", "line", "prompt", "output", "parsed", "gold", "errors"]
    run.log({"eval/results": wandb.Table(columns=cols, data=rows),
             "eval/predictions": wandb.Table(columns=pred_cols, data=[[p[c] if isinstance(p[c], (str, int))
                                                                       else json.dumps(p[c]) for c in pred_cols]
                                                                      for p in predictions])})
    run.summary.update({f"{n}/{key}": r["metrics"][key] for n, r in results.items()})
    run.finish()
    return run.id
