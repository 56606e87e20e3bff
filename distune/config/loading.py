"""Loading a run config: YAML (duplicate keys are errors) -> `base:` includes merged -> `a.b.c=value` overrides
-> RunConfig validated, the method's own keys by its plugin -> `auto` values resolved for the hardware; and the
resolved config back to a plain dict.

Imports the other config modules; inside its functions, distune.methods (to look up the method) and
distune.hardware.
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path

import yaml
from pydantic import ValidationError

from distune.errors import ConfigError, describe_error
from distune.config.method import MethodSection
from distune.config.run_config import RunConfig


def load_config(source: str | Path | dict, overrides: list[str] = (), resolve: bool = True,
                base_dir: Path | None = None) -> RunConfig:
    """Read YAML (or a dict), merge its `base:` files under it, apply `a.b.c=value` overrides, validate; raise
    ConfigError on any problem. `resolve`: turn `use_gpu: auto` / `dtype: auto` into this machine's choice (off
    where the config runs elsewhere: `--address`, submit and k8s render resolve them from the cluster).
    `base_dir`: where a dict's `base:` names are found (a file's are beside it)."""
    if isinstance(source, dict):
        raw, where = with_bases(source, Path(base_dir or "."), "config"), "config"
    else:
        path = Path(source)
        raw, where = with_bases(read_yaml(path), path.parent, str(path), (path.resolve(),)), str(path)
    raw = apply_overrides(raw, overrides)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{where}: {describe_error(e, RunConfig)}") from None
    _validate_method(cfg, where)
    if resolve:
        resolve_for_hardware(cfg)
    return cfg


def read_yaml(path: Path) -> dict:
    """A config file's top-level mapping; ConfigError naming the file (and line) otherwise."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{at}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if raw is None:
        raise ConfigError(f"{path}: the file is empty (a config needs at least model.path and data.path)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def with_bases(raw: dict, here: Path, where: str, chain: tuple[Path, ...] = ()) -> dict:
    """`raw` over the files its `base:` names (one, or a list merged in order; each may have bases of its own;
    names are relative to `here`, the including file's folder). Mappings merge key by key and the including side
    wins; lists and scalars are replaced whole; a section whose `name` differs from its base's (another method)
    replaces the base's section."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections")
    raw = dict(raw)
    names = raw.pop("base", None)
    if names is None:
        return raw
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{where}: base: expected a config file name or a list of them, got {names!r}")
    merged: dict = {}
    for name in names:
        path = (here / Path(name).expanduser()).resolve()
        if path in chain:
            loop = " -> ".join(str(p) for p in chain + (path,))
            raise ConfigError(f"{where}: base: {name} includes itself ({loop})")
        if not path.is_file():
            raise ConfigError(f"{where}: base: {name}: file not found ({path})")
        merged = merge(merged, with_bases(read_yaml(path), path.parent, str(path), chain + (path,)))
    return merge(merged, raw)


def merge(base: dict, over: dict) -> dict:
    """`over` merged onto `base` (see with_bases)."""
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict) and old.get("name", value.get("name")) == value.get(
                "name", old.get("name")):
            out[key] = merge(old, value)
        else:
            out[key] = value
    return out


def resolve_for_hardware(cfg: RunConfig, seen=None, gpu: bool | None = None, gpus: int | None = None) -> None:
    """`cluster.use_gpu: auto`, `cluster.num_workers: auto` and `dtype: auto` (the student's and a teacher's) ->
    concrete values for the hardware the workers use, once: the workers get the resolved config, so every rank
    agrees.

    `gpu`, `gpus` (how many) and `seen` (hardware.Facts from a worker's machine) come from the cluster for a run on
    one (distune.cluster.target); by default this machine decides, right for a local run, where it is the cluster."""
    from distune.hardware import auto_dtype, gpu_count, uses_gpu

    if cfg.cluster.use_gpu == "auto":
        cfg.cluster.use_gpu = uses_gpu("auto") if gpu is None else gpu
    if cfg.cluster.num_workers == "auto":
        n = (gpu_count() if gpus is None else gpus) if cfg.cluster.use_gpu else CPU_WORKERS
        fit_workers(cfg, max(1, n))
    from distune.methods import get_method

    resolved = functools.cache(lambda: auto_dtype(cfg.cluster.use_gpu, seen))
    if cfg.model.dtype == "auto":
        cfg.model.dtype = resolved()
    # The method's own dtypes (e.g. a teacher's), which only it knows.
    cfg.method.model_extra.update(get_method(cfg.method.name).resolve_dtypes(dict(cfg.method.model_extra), resolved))


CPU_WORKERS = 2  # `num_workers: auto` on CPUs: two ranks show every distributed path (ZeRO partitions, all-reduce)


def fit_workers(cfg: RunConfig, n: int) -> None:
    """`n` workers (at most one per row of the global batch), and the largest micro-batch up to the configured one
    that splits the global batch evenly over them."""
    t = cfg.train
    n = min(n, t.global_batch_size)
    micro = min(t.micro_batch_size, t.global_batch_size // n)
    while t.global_batch_size % (micro * n):
        micro -= 1
    cfg.cluster.num_workers, t.micro_batch_size = n, micro


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: PyYAML would silently keep
    the last one, and a second `train:` section would quietly drop the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}, first given on line {seen[key] + 1}", key_node.start_mark)
                seen[key] = key_node.start_mark.line
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                pass
        return super().construct_mapping(node, deep)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`train.lr=1e-4` sets raw['train']['lr'] = 1e-4; values are parsed as YAML (numbers, lists, bools)."""
    import copy

    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected key.path=value")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.load(value, Loader=UniqueKeyLoader) if value != "" else ""
        except yaml.YAMLError:
            node[parts[-1]] = value
    return raw


def _validate_method(cfg: RunConfig, where: str) -> None:
    from distune.methods import get_method, known_methods

    try:
        plugin = get_method(cfg.method.name)
    except KeyError:
        names = known_methods()
        close = difflib.get_close_matches(cfg.method.name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: method.name: unknown method {cfg.method.name!r}{hint}; "
                          f"known: {', '.join(names)}") from None
    try:
        options = plugin.Config(**(cfg.method.model_extra or {}))
    except ValidationError as e:
        raise ConfigError(f"{where}: {describe_error(e, plugin.Config, prefix=('method',))}") from None
    # Keep the plugin's normalised values (absolute local paths, filled defaults): the config is dumped and
    # re-read by Ray workers, which run in another working directory.
    cfg.method = MethodSection(name=cfg.method.name, **options.model_dump(mode="json"))


def dump_config(cfg: RunConfig) -> dict:
    """Plain dict of the resolved config (for W&B and the run directory). Holds no secrets by construction:
    keys are read from the environment, never from the config."""
    return cfg.model_dump(mode="json")
