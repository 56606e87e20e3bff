"""Scores of parsed answers against the gold ones: accuracy and macro-F1 over labels, entity-level F1 for
extraction, exact match, and the format errors counted by type. Pure functions; imports neither ray nor
deepspeed.

Gold and predicted answers are the `values` of `Design.parse` (aspect -> value, list, or None = not mentioned;
a single-label task has the one aspect "label"). A prediction that did not parse has every aspect None.
"""

from __future__ import annotations

from distune.data.design import ERRORS, Parsed

NONE = "(none)"


def macro_f1(gold: list[str], pred: list[str], classes: list[str]) -> float:
    """Mean F1 over `classes` (a class absent from both gold and predictions is left out of the mean)."""
    scores = []
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def _as_set(v) -> set[str]:
    if v is None:
        return set()
    return {str(x).strip().lower() for x in (v if isinstance(v, list) else [v]) if str(x).strip()}


def score(golds: list[dict], preds: list[Parsed], labels: list[str] | None) -> dict:
    """Metrics of one mode. With a label set: per aspect accuracy and macro-F1 (over the labels and "(none)"),
    averaged over aspects. Without one (free-text values such as entities): per aspect and micro-averaged
    entity precision / recall / F1 over the sets of values. Always: exact match of all aspects, error counts."""
    if len(golds) != len(preds) or not golds:
        raise ValueError(f"score needs as many predictions as gold answers, and at least one ({len(golds)}, "
                         f"{len(preds)})")
    aspects = list(golds[0])
    errors = {e: sum(e in p.errors for p in preds) for e in ERRORS}
    out: dict = {"n": len(golds), "errors": errors,
                 "format_error_rate": sum(bool(p.errors) for p in preds) / len(preds),
                 "exact_match": sum(_as_set_all(g) == _as_set_all(p.values, aspects) for g, p in zip(golds, preds))
                 / len(golds)}
    per: dict = {}
    if labels:
        for a in aspects:
            g = [NONE if x.get(a) is None else str(x[a]) for x in golds]
            p = [NONE if x.values.get(a) is None else str(x.values[a]) for x in preds]
            classes = list(labels) + ([NONE] if NONE in g or NONE in p else [])
            per[a] = {"accuracy": sum(x == y for x, y in zip(g, p)) / len(g), "macro_f1": macro_f1(g, p, classes)}
        out["accuracy"] = sum(v["accuracy"] for v in per.values()) / len(per)
        out["macro_f1"] = sum(v["macro_f1"] for v in per.values()) / len(per)
    else:
        total = [0, 0, 0]
        for a in aspects:
            tp = fp = fn = 0
            for g, p in zip(golds, preds):
                gs, ps = _as_set(g.get(a)), _as_set(p.values.get(a))
                tp, fp, fn = tp + len(gs & ps), fp + len(ps - gs), fn + len(gs - ps)
            per[a] = _prf(tp, fp, fn)
            total = [total[0] + tp, total[1] + fp, total[2] + fn]
        micro = _prf(*total)
        out |= {"entity_precision": micro["precision"], "entity_recall": micro["recall"], "entity_f1": micro["f1"]}
    out["per_aspect"] = per
    return out


def primary(metrics: dict) -> tuple[str, float]:
    """The headline figure of a result: accuracy for labelled tasks, entity F1 for extraction."""
    key = "accuracy" if "accuracy" in metrics else "entity_f1"
    return key, metrics[key]


def _prf(tp: int, fp: int, fn: int) -> dict:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0  # nothing to find and nothing found: perfect
    return {"precision": precision, "recall": recall, "f1": f1}


def _as_set_all(values: dict, aspects: list[str] | None = None) -> dict:
    return {a: _as_set(values.get(a)) for a in (aspects or values)}
