"""The config reference page (docs/config-reference.md), generated from the pydantic schema.

    python -m distune.reference > docs/config-reference.md    # regenerate
    python -m distune.reference --check                        # exit 1 if the page is out of date

Reads `distune.config` and the built-in method plugins' `Config` classes; imports neither ray nor deepspeed.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path
from typing import Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from distune.config import RunConfig, TaskSection

PAGE = Path(__file__).resolve().parents[1] / "docs" / "config-reference.md"
COMMAND = "python -m distune.reference > docs/config-reference.md"

INTRO = f"""# Config reference

Every key of a run config: its type, its default and what it does. Generated from the schema
(`distune/config/` and the method plugins' `Config` classes), so do not edit this page by hand; regenerate it
with `{COMMAND}` (`python -m distune.reference --check` fails when it is out of date).

Unknown keys are errors (the message names the closest valid key). Any key can be overridden on the command
line with its dotted path and a YAML value, e.g. `train.lr=1e-4 eval.choices=[yes,no]`. Includes (`base:`) and
multi-stage pipelines (`stages:`) are described in [docs/pipelines.md](pipelines.md).
"""


def render() -> str:
    """The whole page, as Markdown."""
    from distune.methods import get_method, known_methods

    out = [INTRO]
    for section, field in RunConfig.model_fields.items():
        out += _tables(section, field.annotation, level=2)
    out += ["## Methods\n", "`method.name` picks one of these; the other `method.*` keys are that method's own.\n"]
    for name in known_methods():
        plugin = get_method(name)
        if not plugin.__module__.startswith("distune."):
            continue  # third-party plugins (and tests' throwaway ones) document themselves
        out.append(f"### `{name}`\n")
        about = plugin.__dict__.get("__doc__") or sys.modules[plugin.__module__].__doc__
        if about:
            out.append(_paragraph(about) + "\n")
        out.append(f"Keys of `method:` when `method.name: {name}`.\n")
        out += _tables("method", plugin.Config, level=3, heading=False)
    return "\n".join(out)


def _tables(prefix: str, model: type[BaseModel], level: int, heading: bool = True) -> list[str]:
    """A heading and a table of `model`'s keys under `prefix`, then one such block per nested model."""
    fields = dict(model.model_fields)
    if model is TaskSection:  # the other keys repeat data.*: listed in one line below the table
        fields = {k: f for k, f in fields.items() if k in TaskSection.__base__.model_fields}
    out = [f"{'#' * level} `{prefix}`\n"] if heading else []
    if model.__doc__:
        out.append(_paragraph(model.__doc__) + "\n")
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    nested = []
    for key, field in fields.items():
        sub = _model_in(field.annotation)
        if sub is not None:
            path = f"{prefix}.{key}.<i>" if get_origin(_without_none(field.annotation)) is list else f"{prefix}.{key}"
            nested.append((path, sub))
        about = " ".join(filter(None, [field.description, f"Keys: `{nested[-1][0]}.*` below." if sub else ""]))
        rows.append(f"| `{prefix}.{key}` | {_code(_type(field.annotation))} | {_default(field)} | {_prose(about)} |")
    out.append("\n".join(rows) + "\n")
    if model is TaskSection:
        others = [f"`{k}`" for k in model.model_fields if k not in fields]
        out.append(f"Any of {', '.join(others)} may also be given per task: it replaces the `data.*` key of the "
                   f"same name for that task (whole: `design` too); a key left out is inherited.\n")
    for path, sub in nested:
        out += _tables(path, sub, level + 1)
    return out


def _type(ann) -> str:
    """`int`, `str | None`, `a | b | c` for a Literal, `mapping` for a nested model."""
    if ann is type(None):
        return "None"
    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type(a) for a in args)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "mapping"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type(a) for a in args)}]"
    return getattr(ann, "__name__", str(ann))


def _default(field: FieldInfo) -> str:
    """`required`, `see below` for a nested model, else the default as YAML writes it."""
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "see below"
    text = yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True,
                          width=float("inf"))
    return _code(text.removesuffix("...\n").strip())


def _model_in(ann) -> type[BaseModel] | None:
    """The model a field holds: itself, or the items of a list of them (None included or not)."""
    ann = _without_none(ann)
    if get_origin(ann) is list:
        ann = get_args(ann)[0]
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _without_none(ann):
    if get_origin(ann) in (Union, types.UnionType):
        rest = [a for a in get_args(ann) if a is not type(None)]
        return rest[0] if len(rest) == 1 else ann
    return ann


def _paragraph(doc: str) -> str:
    """A docstring's first paragraph, on one line."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def _code(text: str) -> str:
    return f"`{_escape(text)}`"


def _prose(text: str) -> str:
    """Free text for a cell: `<name>` outside code spans would be read as an HTML tag."""
    parts = text.split("`")
    parts[::2] = [part.replace("<", "\\<") for part in parts[::2]]
    return _escape("`".join(parts))


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distune.reference", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help=f"exit 1 if {PAGE.name} differs from the schema")
    args = parser.parse_args(argv)
    page = render()
    if not args.check:
        sys.stdout.write(page)
        return 0
    if not PAGE.is_file() or PAGE.read_text(encoding="utf-8") != page:
        print(f"docs/config-reference.md is out of date: {COMMAND}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
