"""Sample design (SDE): how the prompt and the target text of a sample are written — and read back.

Owns both directions of the output format, so training text and the eval parser can never drift apart:
`Design.prompt` places the instruction, `Design.target` writes the answer (natural / Lines / JSON, omitted
or placeholder aspects, text or numeric labels, optional rationale first), `Design.parse` turns generated text
back into values and names each format error. Imports neither ray nor deepspeed.

Exact renderings (a = aspect, v = value; list values are joined with ", "):
    lines    "a1: v1\\na2: v2"
    json     '{"a1": "v1", "a2": ["x", "y"]}'            (lists stay lists)
    natural  "The a1 is v1. The a2 is v2."
    cot      "<rationale>\\nAnswer: <answer>"    ("Answer:\\n<answer>" when the answer spans lines)
Without aspects the target is the response template's text (mapped to its index in data.labels when
label_format is numeric).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field

from distune.data.sources import DataError

ERRORS = ("unparseable", "missing_aspect", "invalid_label", "extra_text")
ANSWER = "Answer:"


@dataclass
class Parsed:
    """What a generated answer said: aspect -> value (None = the placeholder / not mentioned), and its errors."""

    values: dict[str, object]
    errors: list[str] = field(default_factory=list)


class Design:
    def __init__(self, design_cfg, labels: list[str] | None, seed: int):
        self.cfg, self.labels, self.seed = design_cfg, labels, seed
        ins = design_cfg.instruction
        self.instructions = [ins] if isinstance(ins, str) else list(ins or [])

    # -- prompt ------------------------------------------------------------------------------------

    def instruction(self, line: int, canonical: bool) -> str | None:
        """The phrasing for this row: seeded per row (every rank picks the same), the first one for eval rows."""
        if not self.instructions:
            return None
        if canonical or len(self.instructions) == 1:
            return self.instructions[0]
        return random.Random(f"{self.seed}:{line}").choice(self.instructions)

    def prompt(self, text: str, instruction: str | None) -> str:
        if instruction is None:
            return text
        return f"{instruction}\n\n{text}" if self.cfg.instruction_position == "first" else f"{text}\n\n{instruction}"

    # -- target ------------------------------------------------------------------------------------

    def target(self, response: str | None, row: dict, rationale: str | None, where: str) -> str:
        answer = self._label_out(response.strip(), where) if not self.cfg.aspects else self._aspects(row, where)
        if self.cfg.reasoning == "cot":
            sep = "\n" if "\n" in answer else " "
            return f"{rationale.strip()}\n{ANSWER}{sep}{answer}"
        return answer

    def _aspects(self, row: dict, where: str) -> str:
        c = self.cfg
        values: dict[str, object] = {}
        for a in c.aspects:
            if a not in row:
                raise DataError(f"{where}: data.design.aspects names column {a!r}, row has "
                                f"{', '.join(map(repr, row))}")
            v = row[a]
            if _empty(v):
                if c.unmentioned == "placeholder":
                    values[a] = c.placeholder
                continue
            values[a] = [self._label_out(str(x), where) for x in v] if isinstance(v, list) else \
                self._label_out(str(v), where)
        if c.output_format == "json":
            return json.dumps(values, ensure_ascii=False)
        text = {a: ", ".join(v) if isinstance(v, list) else v for a, v in values.items()}
        if c.output_format == "lines":
            return "\n".join(f"{a}: {v}" for a, v in text.items())
        return " ".join(f"The {a} is {v}." for a, v in text.items())

    def _label_out(self, value: str, where: str) -> str:
        if self.cfg.label_format == "text":
            return value
        if value not in self.labels:
            raise DataError(f"{where}: {value!r} is not one of data.labels {self.labels} "
                            f"(data.design.label_format: numeric writes a label's index)")
        return str(self.labels.index(value))

    # -- parse (eval) ------------------------------------------------------------------------------

    def parse(self, text: str) -> Parsed:
        """Read a generated answer back. Errors: unparseable (no structure found), missing_aspect (an aspect
        absent although the design writes every aspect, i.e. placeholder mode), invalid_label (a value
        outside data.labels, when labels are set), extra_text (anything besides the answer)."""
        errors: list[str] = []
        text = text.strip()
        if self.cfg.reasoning == "cot":
            at = text.rfind(ANSWER)
            if at < 0:
                return Parsed({}, ["unparseable"])
            text = text[at + len(ANSWER):].strip()
        if not self.cfg.aspects:
            value, extra = _single(text, self._label_names())
            if extra:
                errors.append("extra_text")
            value = self._label_in(value, errors)
            return Parsed({"label": value}, errors)
        found, extra = {"json": _parse_json, "lines": _parse_lines, "natural": _parse_natural}[
            self.cfg.output_format](text, self.cfg.aspects)
        if found is None:
            return Parsed({}, ["unparseable"])
        if extra:
            errors.append("extra_text")
        values: dict[str, object] = {}
        for a in self.cfg.aspects:
            if a not in found:
                if self.cfg.unmentioned == "placeholder":
                    errors.append("missing_aspect")
                values[a] = None
                continue
            v = found[a]
            if v == self.cfg.placeholder or _empty(v):
                values[a] = None
            elif isinstance(v, list):
                values[a] = [self._label_in(str(x), errors) for x in v]
            else:
                values[a] = self._label_in(str(v), errors)
        return Parsed(values, sorted(set(errors), key=ERRORS.index))

    def _label_names(self) -> list[str] | None:
        if not self.labels:
            return None
        return [str(i) for i in range(len(self.labels))] if self.cfg.label_format == "numeric" else self.labels

    def _label_in(self, value: str, errors: list[str]) -> str:
        """A written label back to its name; outside the label set -> invalid_label (the text is kept)."""
        if not self.labels:
            return value
        names = self._label_names()
        if value not in names:
            errors.append("invalid_label")
            return value
        return self.labels[names.index(value)]


def _empty(v) -> bool:
    return v is None or (isinstance(v, (str, list)) and not (v.strip() if isinstance(v, str) else v))


def _single(text: str, names: list[str] | None) -> tuple[str, bool]:
    """A single label. With a label set: a label at the start (anything after it is extra text), else the first
    label named anywhere in the answer ("The sentiment is neutral." -> neutral, extra text), as lm-eval-harness's
    first-match filters do; no label named -> the first line, which then is an invalid label."""
    first, _, rest = text.partition("\n")
    first = first.strip().rstrip(".")
    if names:
        for n in sorted(names, key=len, reverse=True):
            if first.lower().startswith(n.lower()):
                return n, bool(first[len(n):].strip(" .") or rest.strip())
        hits = [(m.start(), n) for n in names
                for m in [re.search(rf"(?<!\w){re.escape(n)}(?!\w)", text, re.IGNORECASE)] if m]
        if hits:
            return min(hits)[1], True
    return first, bool(rest.strip())


def _parse_json(text: str, aspects: list[str]):
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return None, False
    try:
        obj = json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return None, False
    if not isinstance(obj, dict):
        return None, False
    extra = bool(text[:start].strip() or text[end + 1:].strip()) or any(k not in aspects for k in obj)
    return {k: v for k, v in obj.items() if k in aspects}, extra


def _split_list(v: str) -> str | list[str]:
    parts = [p.strip() for p in v.split(",")]
    return parts if len(parts) > 1 else v.strip()


def _parse_lines(text: str, aspects: list[str]):
    found, extra = {}, False
    for line in text.splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if sep and key.strip() in aspects:
            found[key.strip()] = _split_list(value)
        else:
            extra = True
    return (found, extra) if found or not text else (None, False)


_NATURAL = re.compile(r"The (.+?) is (.+?)\.(?=\s|$)")


def _parse_natural(text: str, aspects: list[str]):
    found, rest = {}, text
    for m in _NATURAL.finditer(text):
        if m.group(1) in aspects:
            found[m.group(1)] = _split_list(m.group(2))
            rest = rest.replace(m.group(0), "", 1)
    if not found and text:
        return None, False
    return found, bool(rest.strip())
