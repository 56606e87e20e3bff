"""Errors phrased for the user: `DataError` (names the file and line), `ConfigError` (names the key path), and
`describe_error`, which turns a pydantic ValidationError into one line that names the key path (and, for an unknown
key, the closest valid one: a near spelling, or our name for another framework's key).

Imports nothing from distune: the config sections, the data layer and the plugins (methods, tasks, signals) all
phrase their errors here, so none has to import another for it.
"""

from __future__ import annotations

import difflib

from pydantic import BaseModel, ValidationError


class DataError(ValueError):
    """A data problem, naming the file and line."""


class ConfigError(ValueError):
    """A config problem, phrased for the user: names the key path or the file."""


# Names other frameworks use for our keys: spelling is not the only way to miss a key.
_SYNONYMS = {
    "learning_rate": "lr", "batch_size": "global_batch_size", "train_batch_size": "global_batch_size",
    "per_device_train_batch_size": "micro_batch_size", "gradient_accumulation_steps": "global_batch_size",
    "num_train_epochs": "epochs", "num_epochs": "epochs", "steps": "max_steps", "zero_stage": "stage",
    "num_gpus": "num_workers", "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "max_seq_length": "max_length", "seq_len": "max_length", "warmup": "warmup_steps",
    "max_grad_norm": "grad_clip", "gradient_clipping": "grad_clip", "init": "layers", "teacher_layers": "layers",
    "alpha_kd": "kd_weight", "kd_alpha": "kd_weight", "kd_ratio": "kd_weight", "distillation_weight": "kd_weight",
    "loss_type": "divergence", "kd_temperature": "temperature", "teacher_model": "teacher", "student_method": "student",
}


def closest_key(key: str, valid: list[str]) -> str | None:
    if _SYNONYMS.get(key) in valid:
        return _SYNONYMS[key]
    close = difflib.get_close_matches(key, valid, n=1)
    return close[0] if close else None


def describe_error(err: ValidationError, root: type[BaseModel], prefix: tuple = ()) -> str:
    """First error as one line: `train.lr: Input should be greater than 0 (got -1)`."""
    first = err.errors()[0]
    loc = tuple(str(p) for p in first["loc"])
    # Union members show up as extra loc entries ("int", "float"); keep only real field names.
    loc = _field_path(root, loc)
    path = ".".join(prefix + loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        parent = _model_at(root, loc[:-1])
        valid = sorted(parent.model_fields) if parent else []
        close = closest_key(loc[-1], valid)
        hint = f"did you mean {'.'.join(prefix + loc[:-1] + (close,))!r}? " if close else ""
        return f"{path}: unknown key; {hint}valid keys here: {', '.join(valid)}"
    if first["type"] == "missing":
        return f"{path}: required key is missing"
    got = first.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    if isinstance(got, bool) and first["type"] == "string_type":
        # YAML 1.1 reads unquoted yes/no/on/off as booleans: `choices: [yes, no]` is [True, False].
        shown = f" (got {got!r}: YAML reads unquoted yes/no/on/off/true/false as booleans; quote the value)"
    msg = first["msg"].removeprefix("Value error, ")
    if msg.startswith(path + ".") or not (loc or prefix):  # the message names its keys (a plugin, a cross-section check)
        return msg
    return f"{path}: {msg}{shown}"


def _field_path(root: type[BaseModel], loc: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    model: type[BaseModel] | None = root
    for part in loc:
        if model is not None and part in model.model_fields:
            out.append(part)
            ann = model.model_fields[part].annotation
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        elif model is not None and not model.model_fields.get(part) and (model.model_config.get("extra") == "forbid"):
            out.append(part)  # an unknown key: keep it so the message names it
            model = None
        elif model is None and part.isdigit():
            out.append(part)  # list index
    return tuple(out)


def _model_at(root: type[BaseModel], loc: tuple[str, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = root
    for part in loc:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model
