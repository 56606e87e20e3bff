"""The `data:` section: the file, its format and templates, the sample design (`data.design`), the eval split,
and multi-task mixtures (`data.tasks`, whose entries take the per-task `data.*` keys).

Imports only distune.config.strict and distune.errors.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, ValidationError, create_model, field_validator, model_serializer, model_validator

from distune.errors import describe_error
from distune.config.strict import Strict
from distune.paths import anchor


class DesignSection(Strict):
    """Sample design (SDE): how a sample's prompt and target are written. Exact renderings: distune/data/design.py."""

    instruction: str | list[str] | None = Field(
        None, description="Task instruction added to data.prompt; a list = several phrasings, one drawn per "
        "training row (seeded), the first used for eval rows.")
    instruction_position: Literal["first", "last"] = Field(
        "first", description="Instruction before the input (first) or after it (last).")
    aspects: list[str] | None = Field(
        None, description="Multi-aspect target: these columns (a value, a list, or empty) make up the "
        "response instead of data.response.")
    output_format: Literal["natural", "lines", "json"] = Field(
        "lines", description="How aspects are written: natural sentences, one 'aspect: value' per line, or JSON.")
    unmentioned: Literal["omit", "placeholder"] = Field(
        "omit", description="An aspect with an empty value: left out, or written with the placeholder.")
    placeholder: str = Field("none", description="Text written for an unmentioned aspect.")
    label_format: Literal["text", "numeric"] = Field(
        "text", description="Labels as their names, or as their index in data.labels.")
    reasoning: Literal["none", "cot"] = Field(
        "none", description="cot: the rationale first, then 'Answer: ...' (the loss covers both).")
    rationale: str = Field("{rationale}", description="Template for the rationale column(s) when reasoning: cot.")

    @field_validator("instruction")
    @classmethod
    def _phrasings(cls, v):
        if isinstance(v, list) and (not v or not all(isinstance(x, str) and x.strip() for x in v)):
            raise ValueError("must be a non-empty list of non-empty phrasings")
        return v

    @field_validator("aspects")
    @classmethod
    def _aspects(cls, v):
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("must be a non-empty list of distinct column names")
        return v


def _anchor_path(v: str | None) -> str | None:
    return anchor(v)


# Keys that shape the whole mixture (batches, tokens, the label set), so a task cannot set its own.
GLOBAL_DATA_KEYS = ("tasks", "mixture_temperature", "packing", "group_by_length", "max_length", "use_chat_template",
                    "train_on_inputs", "labels", "store", "store_dir")


class DataSection(Strict):
    path: str | None = Field(None, description="JSONL / CSV / TSV / parquet file, a datasets folder (save_to_disk), "
                             "or hf:<hub id>[:config] (pkg:<package>/<file> is allowed). Required unless every "
                             "data.tasks entry gives its own.")

    @field_validator("path", "eval_path", "store_dir")
    @classmethod
    def _anchor(cls, v: str | None) -> str | None:
        return _anchor_path(v)
    split: str = Field("train", description="Split of a datasets folder or hub dataset.")
    format: Literal["prompt_response", "alpaca", "sharegpt", "messages"] = Field(
        "prompt_response", description="prompt_response: the prompt/response templates; alpaca: instruction, "
        "input, output columns; sharegpt: a 'conversations' list of {from, value}; messages: a 'messages' list "
        "of {role, content}. Multi-turn formats train on assistant turns only.")
    columns: dict[str, str] = Field(
        {}, description="Rename columns before anything reads them: {name the format expects: column in the file}.")
    bad_rows: Literal["fail", "skip"] = Field(
        "fail", description="A malformed row stops validation (naming file and line), or is skipped and counted.")
    prompt: str = Field("{prompt}", description="Template over the row's columns, e.g. 'Review: {text}'.")
    response: str = Field("{response}", description="Template over the row's columns for the target.")
    system: str | None = Field(None, description="Optional system message when the chat template is used.")
    use_chat_template: bool = Field(True, description="Render with the tokenizer's chat template if it has one.")
    train_on_inputs: bool = Field(False, description="Also train on prompt tokens (SDE's input modelling; "
                                  "default: response only).")
    design: DesignSection = Field(default_factory=DesignSection, description="Sample design: how a row becomes a "
                                  "sample (keys below).")
    max_length: int = Field(512, gt=1, description="Samples longer than this are truncated (from the right).")
    limit: int | None = Field(None, gt=0, description="Use only this many rows (after a seeded shuffle).")
    skip: int = Field(0, ge=0, description="Rows of the seeded order passed over before data.limit applies: with "
                      "the same run.seed, `skip: N` takes rows no run with `limit: N` saw (a disjoint sample of "
                      "the same file, e.g. unlabelled inputs for a teacher to label).")
    # None, not 0.1, as the default: a dumped config (what the workers load) must not look as if it set both.
    eval_size: int | float | None = Field(None, description="Held-out rows: a count, or a fraction in (0, 1); "
                                          "default 10 % of the rows, at most 1,000 (a 10M-row dataset is not "
                                          "scored a million rows at a time). Not used with data.eval_path.")
    eval_path: str | None = Field(
        None, description="A separate held-out file (same format, columns and templates as data.path): every row is "
        "an eval row, and data.path's rows all train (data.limit cuts those only). Lets every arm of a comparison "
        "score the same fixed rows while the training file changes. Local files and datasets folders.")
    labels: list[str] | None = Field(
        None, description="The label set: class names for model.task sequence_classification (default: the "
        "distinct responses in the data, sorted), tag names for token_classification (default: every tag in "
        "the data, sorted), the order for design.label_format numeric, and the valid values when eval parses "
        "answers.")
    packing: bool = Field(False, description="Pack short training samples into rows of max_length; each keeps "
                          "its own positions and attends only to itself.")
    group_by_length: bool = Field(False, description="Batch training samples of similar length together "
                                  "(less padding; ignored with packing).")
    store: bool = Field(
        True, description="Tokenize the data once into a memory-mapped store that every rank reads its share of "
        "(`distune prepare CFG` builds it; `distune validate` / `run` build it when it is missing). false: every "
        "rank reads and tokenizes the whole data itself.")
    store_dir: str | None = Field(
        None, description="Where tokenized stores live (default: <DISTUNE_CACHE or ~/.cache/distune>/data). A store "
        "is a folder named by a hash of everything that changes its tokens (data files with their sizes and mtimes, "
        "the data section, the tokenizer and chat template, the task, run.seed): it is reused while none changes. "
        "On a cluster without a shared filesystem each node builds its own.")
    encoding: str = Field("utf-8", description="Text encoding of JSONL / CSV / TSV files.")
    encoding_errors: Literal["strict", "replace"] = Field(
        "strict", description="replace: undecodable bytes become U+FFFD instead of an error.")
    tasks: list[TaskSection] | None = Field(
        None, description="A multi-task mixture: each entry has a name, a weight and data.* keys that replace the "
        "top-level ones for that task (its own file, templates, design, limit, eval split).")
    mixture_temperature: float = Field(
        1.0, gt=0, description="Task i is drawn in proportion to (weight_i x rows_i) ** (1 / T): 1 = by size, "
        "large = uniform over tasks (small tasks upsampled).")

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_entries(cls, v):
        # Validated entry by entry so that every message names data.tasks.<i>.<key>.
        if v is None:
            return v
        if not isinstance(v, list) or not v:
            raise ValueError("must be a non-empty list of task mappings")
        out, seen = [], {}
        for i, item in enumerate(v):
            if not isinstance(item, (dict, TaskSection)):
                raise ValueError(f"data.tasks.{i}: must be a mapping with a name, a weight and data.* keys")
            if isinstance(item, dict):
                for key in item:
                    if key in GLOBAL_DATA_KEYS:
                        raise ValueError(f"data.tasks.{i}.{key}: applies to the whole mixture; set data.{key} "
                                         f"instead")
                try:
                    item = TaskSection.model_validate(item)
                except ValidationError as e:
                    raise ValueError(describe_error(e, TaskSection, prefix=("data", "tasks", str(i)))) from None
            if item.name in seen:
                raise ValueError(f"data.tasks.{i}.name: {item.name!r} is already data.tasks.{seen[item.name]}'s name")
            seen[item.name] = i
            out.append(item)
        return out

    @model_validator(mode="after")
    def _path_or_tasks(self) -> DataSection:
        if self.tasks:
            self.task_sections()  # every task's merged section must validate now, not on the workers
        elif self.path is None:
            raise ValueError("data.path: required key is missing (or give data.tasks)")
        return self

    def task_sections(self) -> list[tuple[str, float, DataSection]]:
        """(name, weight, effective data section) per task: the top-level keys, replaced by the task's own."""
        base = self.model_dump(exclude={"tasks", "mixture_temperature"})
        out = []
        for i, task in enumerate(self.tasks or ()):
            merged = {**base, **task.model_dump(include=task.model_fields_set - {"name", "weight"})}
            if merged["path"] is None:
                raise ValueError(f"data.tasks.{i}.path: required key is missing (no data.path to default to)")
            try:
                # model_validate, not model_copy: a task's format must still suit the design it ends up with.
                out.append((task.name, task.weight, DataSection.model_validate(merged)))
            except ValidationError as e:
                at = f"data.tasks.{i}"
                # The section's own checks name `data.<key>`: say which task's key it is.
                raise ValueError(describe_error(e, DataSection, prefix=tuple(at.split(".")))
                                 .replace(f"{at}: data.", f"{at}.", 1)) from None
        return out

    @model_validator(mode="after")
    def _design_fits(self) -> DataSection:
        d = self.design
        if d.label_format == "numeric" and not self.labels:
            raise ValueError("data.design.label_format: numeric writes a label's index in data.labels; set "
                             "data.labels")
        if self.format in ("sharegpt", "messages"):
            changed = [k for k in ("instruction", "aspects") if getattr(d, k) is not None]
            changed += ["reasoning"] if d.reasoning != "none" else []
            if changed:
                raise ValueError(f"data.design.{changed[0]}: applies to single-turn formats "
                                 f"(prompt_response, alpaca), not data.format: {self.format}")
        return self

    @model_validator(mode="after")
    def _one_eval_split(self) -> DataSection:
        if self.eval_path is not None and self.eval_size is not None:
            raise ValueError("data.eval_size: not used with data.eval_path (every row of that file is an eval row); "
                             "remove one of them")
        if self.eval_path is not None and self.eval_path.startswith("hf:"):
            raise ValueError("data.eval_path: a hub id is not read here; save the split with "
                             "datasets' save_to_disk and give that folder")
        return self

    @field_validator("eval_size")
    @classmethod
    def _eval_size(cls, v: int | float | None) -> int | float | None:
        if isinstance(v, float) and not 0.0 < v < 1.0:
            raise ValueError("a fraction must lie in (0, 1); give an int for a row count")
        if isinstance(v, int) and v < 0:
            raise ValueError("must be >= 0")
        return v


class _TaskKeys(Strict):
    """One task of data.tasks. Its other keys are the per-task data.* keys (TaskSection below): a key given
    here replaces the top-level value whole (design included), a key left out inherits it."""

    name: str = Field(..., description="Task name (a plain word, unique): tags its samples, warnings and stats.")
    weight: float = Field(1.0, gt=0, description="Multiplies the task's row count in the mixture.")

    @field_validator("name")
    @classmethod
    def _plain_word(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", v):
            raise ValueError("must be a plain word (letters, digits, '_' or '-')")
        return v

    @field_validator("path", check_fields=False)
    @classmethod
    def _anchor(cls, v: str | None) -> str | None:
        return _anchor_path(v)

    @model_serializer(mode="wrap")
    def _given_keys_only(self, handler):
        # Unset keys inherit; dumped as nulls they would come back as overrides when workers re-read the config.
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set or k in ("name", "weight")}


TaskSection = create_model(
    "TaskSection", __base__=_TaskKeys, __module__=__name__,
    **{k: (f.annotation, Field(None, description=f.description))
       for k, f in DataSection.model_fields.items() if k not in GLOBAL_DATA_KEYS})
DataSection.model_rebuild()
