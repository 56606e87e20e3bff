"""docs/config-reference.md is generated from the schema (distune.reference) and must stay in step with it."""

from __future__ import annotations

from typing import get_args, get_origin

from pydantic import BaseModel

from distune.config import RunConfig, TaskSection
from distune.methods import get_method, known_methods
from distune.reference import PAGE, render


def test_page_is_up_to_date():
    assert PAGE.read_text(encoding="utf-8") == render(), \
        "docs/config-reference.md is out of date: python -m distune.reference > docs/config-reference.md"


def _keys(prefix: str, model: type[BaseModel]):
    """Every dotted key of `model` under `prefix`, nested models (and list items, as `<i>`) included."""
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}"
        yield key
        sub, in_list = _nested(field.annotation)
        if sub is TaskSection:  # name and weight get rows; the data.* keys a task may repeat are listed by name
            own = TaskSection.__base__.model_fields
            yield from (f"{key}.<i>.{k}" if k in own else f"`{k}`" for k in TaskSection.model_fields)
        elif isinstance(sub, type) and issubclass(sub, BaseModel):
            yield from _keys(f"{key}.<i>" if in_list else key, sub)


def _nested(ann) -> tuple[object, bool]:
    """What a field holds inside an optional and/or a list, and whether it is a list."""
    for arg in (ann, *get_args(ann)):
        if get_origin(arg) is list:
            return get_args(arg)[0], True
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg, False
    return None, False


def _missing(keys, text: str) -> list[str]:
    return [k for k in dict.fromkeys(keys) if (k if k.startswith("`") else f"`{k}`") not in text]


def test_every_key_is_on_the_page():
    page = render()
    keys = [k for section, f in RunConfig.model_fields.items() for k in _keys(section, f.annotation)]
    assert not _missing(keys, page), f"keys missing from the config reference: {_missing(keys, page)}"
    methods = page.partition("\n## Methods\n")[2]
    for name in known_methods():
        if get_method(name).__module__.startswith("distune."):  # the built-in plugins: each has its own section
            section = methods.partition(f"### `{name}`\n")[2].split("\n### ")[0]
            missing = _missing(_keys("method", get_method(name).Config), section)
            assert section and not missing, f"method {name}: keys missing from the config reference: {missing}"
