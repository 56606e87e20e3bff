"""Pipelines: several training stages in one file, run in order by one command on one Ray cluster.

    wandb: {group: quickstart}          # every top-level key but `stages` is the shared base
    base: common.yaml                    # (which may itself name base files)
    stages:                              # run in this order
      teacher: {base: teacher.yaml}
      student:
        method: {name: distill, teacher: {path: "${stages.teacher.export}"}}

Each stage is merged over the shared base (config.merge: the stage wins key by key) and trains into its own run
directory: `run.name` is the stage's name unless the stage sets one. `${stages.NAME.export}` and
`${stages.NAME.run_dir}` name an earlier stage's export and run directory. Command-line overrides `a.b=v` apply to
every stage (over what the stages say); `stages.NAME.a.b=v` to one.

A stage with a `generate:` mapping does not train: the stage's model (its method.teacher for a distill config)
writes a response for every prompt of its data, as `distune generate` does (the mapping holds that command's
options: max_new_tokens, temperature, choices, ...), and its export is the dataset `export/generated.jsonl`, which a
later stage trains on (a teacher-labelled transfer set). A pipeline-level `report:` compares the stages' held-out
scores (distune/pipeline_report.py) once they have run.

Running a pipeline walks the stages: a stage whose export is published and whose recorded config matches is done
(skipped) unless a stage it refers to ran again; a stage cut short resumes from its checkpoint; a stage whose
recipe changed starts over. The stages log to one W&B group (wandb.group, default the file's name), each with its
name as job_type. Imports neither ray nor deepspeed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from distune.config import ConfigError, RunConfig, apply_overrides, load_config, merge, read_yaml, with_bases

REF = re.compile(r"\$\{stages\.([^.}]+)\.([^}]+)\}")
REF_KINDS = ("export", "run_dir")


@dataclass
class Stage:
    name: str
    cfg: RunConfig
    needs: list[str] = field(default_factory=list)  # the earlier stages its config refers to
    generate: dict | None = None  # a generate stage's options (distune generate's, by their dest names)

    @property
    def export(self) -> str:
        from distune.storage import join

        folder = join(self.cfg.run_location, "export")
        return join(folder, GENERATED) if self.generate is not None else folder


GENERATED = "generated.jsonl"
# distune generate's options a stage may set (the rest are the stage's own: where to write, the cluster).
NOT_STAGE_OPTIONS = ("out", "force", "address", "no_progress", "help")


def generate_options(given, where: str) -> dict:
    """A stage's `generate:` mapping checked against distune generate's own options (their types included),
    with the defaults of those it leaves out."""
    import argparse

    from distune.generate import add_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    actions = {a.dest: a for a in parser._actions if a.dest not in NOT_STAGE_OPTIONS}
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ConfigError(f"{where}: expected a mapping of distune generate's options ({', '.join(actions)})")
    out = {dest: a.default for dest, a in actions.items()}
    for key, value in given.items():
        a = actions.get(str(key).replace("-", "_"))
        if a is None:
            raise ConfigError(f"{where}.{key}: unknown option; valid keys: {', '.join(actions)}")
        if isinstance(a, argparse._StoreTrueAction):
            ok = isinstance(value, bool)
        elif a.nargs in ("+", "*"):
            ok = isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value)
            value = [str(v) for v in value] if ok else value
        elif a.type in (int, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (a.type is float
                                                                                     or isinstance(value, int))
        else:
            ok = isinstance(value, str)
        if not ok:
            raise ConfigError(f"{where}.{key}: {value!r} is not a valid value ({a.help})")
        out[a.dest] = value
    return out


def is_pipeline(path: str | Path) -> bool:
    """A config file with a top-level `stages:` (a plain config, or no readable YAML, is not one)."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and "stages" in raw


def load_pipeline(path: str | Path, overrides: list[str] = (), resolve: bool = True) -> list[Stage]:
    """The stages of the pipeline file, in order, each a validated RunConfig with its references resolved."""
    path = Path(path)
    raw = read_yaml(path)
    per_stage = [o for o in overrides if o.startswith("stages.")]
    everywhere = [o for o in overrides if not o.startswith("stages.")]
    raw = apply_overrides(raw, per_stage)
    stages_raw = raw.pop("stages")
    raw.pop("report", None)  # read by load_report
    where = f"{path}: stages"
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise ConfigError(f"{where}: expected a mapping of stage names to configs, in the order they run")
    shared = with_bases(raw, path.parent, str(path), (path.resolve(),))
    stages: list[Stage] = []
    for name, own in stages_raw.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ConfigError(f"{where}: stage name {name!r}: use letters, digits, '-' and '_'")
        if own is None:
            own = {}
        if not isinstance(own, dict):
            raise ConfigError(f"{where}.{name}: expected a mapping of config sections (or base: FILE)")
        own = with_bases(own, path.parent, f"{where}.{name}")
        generate = None
        if "generate" in own:
            own = dict(own)
            generate = generate_options(own.pop("generate"), f"{where}.{name}.generate")
        stage_raw = merge(shared, own)
        stage_raw["run"] = {**stage_raw.get("run", {}), "name": own.get("run", {}).get("name", name)}
        stage_raw["wandb"] = {"group": path.stem, **stage_raw.get("wandb", {}), "job_type": name}
        done = {s.name: s for s in stages}
        needs: list[str] = []
        stage_raw = _resolve_refs(stage_raw, done, needs, f"{where}.{name}", list(stages_raw))
        try:
            cfg = load_config(stage_raw, everywhere, resolve=resolve, base_dir=path.parent)
        except ConfigError as e:
            raise ConfigError(f"{path}: stage {name}: {str(e).removeprefix('config: ')}") from None
        clash = next((s.name for s in stages if s.cfg.run_location == cfg.run_location), None)
        if clash:
            raise ConfigError(f"{where}.{name}: run.name: trains into {cfg.run_location}, as stage {clash} does; "
                              f"give each stage its own run.name")
        if generate is not None and cfg.store().remote:
            raise ConfigError(f"{where}.{name}.generate: writes its dataset on this machine; run.output_dir "
                              f"{cfg.run.output_dir} is remote storage")
        stages.append(Stage(name, cfg, needs, generate))
    return stages


def load_report(path: str | Path, stages: list[Stage]) -> dict | None:
    """The pipeline's `report:` mapping, checked against its stages (None when it has none)."""
    raw = read_yaml(Path(path)).get("report")
    if raw is None:
        return None
    where = f"{path}: report"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping (reference, paired, labels)")
    names = [s.name for s in stages if s.generate is None]
    unknown = set(raw) - {"reference", "paired", "labels"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key; valid keys: reference, paired, labels")

    def stage(value, key: str) -> str:
        if value not in names:
            raise ConfigError(f"{where}.{key}: {value!r} is not a training stage; stages: {', '.join(names)}")
        return value

    spec = {"reference": None, "paired": [], "labels": {}}
    if raw.get("reference") is not None:
        spec["reference"] = stage(raw["reference"], "reference")
    pairs = raw.get("paired") or []
    if pairs and not isinstance(pairs[0], list):
        pairs = [pairs]  # one pair may be written flat: [distilled, sft]
    for i, pair in enumerate(pairs):
        if not isinstance(pair, list) or len(pair) != 2:
            raise ConfigError(f"{where}.paired[{i}]: expected two stage names [A, B] (A is tested against B)")
        spec["paired"].append([stage(p, f"paired[{i}]") for p in pair])
    labels = raw.get("labels") or {}
    if not isinstance(labels, dict):
        raise ConfigError(f"{where}.labels: expected a mapping of stage names to display names")
    spec["labels"] = {stage(k, f"labels.{k}"): str(v) for k, v in labels.items()}
    return spec


def _resolve_refs(value, done: dict[str, Stage], needs: list[str], where: str, names: list[str]):
    if isinstance(value, dict):
        return {k: _resolve_refs(v, done, needs, where, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_refs(v, done, needs, where, names) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        stage, kind = m.group(1), m.group(2)
        if kind not in REF_KINDS:
            raise ConfigError(f"{where}: {m.group(0)}: a stage offers {' and '.join(REF_KINDS)}")
        if stage not in done:
            later = " (it runs later: a stage can use only earlier ones)" if stage in names else ""
            raise ConfigError(f"{where}: {m.group(0)}: no earlier stage {stage!r}{later}; earlier: "
                              f"{', '.join(done) or 'none'}")
        if stage not in needs:
            needs.append(stage)
        return done[stage].export if kind == "export" else done[stage].cfg.run_location

    return REF.sub(one, value)


def state(stage: Stage, reran: set[str]) -> tuple[str, str]:
    """("done" | "resume" | "start over" | "new", why) for a stage, given the stages that ran again before it."""
    from distune.rundir import differences, latest_complete

    store = stage.cfg.store()
    saved_text = store.read_text("config.yaml")
    if saved_text is None:
        return "new", ""
    upstream = [n for n in stage.needs if n in reran]
    if upstream:
        return "start over", f"stage {upstream[0]} ran again"
    try:
        saved = yaml.safe_load(saved_text)
    except yaml.YAMLError:
        saved = None
    if not isinstance(saved, dict):
        return "start over", "its recorded config.yaml is unreadable"
    changed = differences(saved, stage.cfg)
    if stage.generate is not None and saved.get("generate") != stage.generate:
        changed = ["generate"] + changed
    if changed:
        return "start over", f"its config changed ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''})"
    if published(store, "export"):
        return "done", "export published, config unchanged"
    if latest_complete(store) or "checkpoints" in store.names():
        return "resume", "cut short: resuming from its checkpoint"
    return "new", ""


def published(store, rel: str) -> bool:
    """A folder `store.publish` put at `rel` and finished (locally a rename; in object storage its DONE marker)."""
    from distune.storage import DONE

    return store.exists(f"{rel}/{DONE}") if store.remote else store.exists(rel)
