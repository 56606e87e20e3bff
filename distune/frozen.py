"""Build the frozen models a method asks for (teachers) and turn them into teacher signals.

`preflight` runs on the driver before scheduling (from validate) and again in every worker: it resolves
the teacher, checks the vocabularies align (distune.distill.vocab) and that a cache matches. `build`
runs in the worker after the student: online -> the teacher on this rank (replicated, or ZeRO-3
partitioned by distune.engine and built partitioned: method.teacher.placement); cached -> the cache attached
to the training samples; remote -> the client the cluster layer passed in. Imports no ray; deepspeed only through distune.engine, lazily.
"""

from __future__ import annotations

from dataclasses import dataclass

from distune.config import ConfigError
from distune.distill import cache
from distune.distill.teacher import CachedTeacher, OnlineTeacher, TeacherSpec
from distune.distill.vocab import VocabMismatch, aligned_vocab_size
from distune.models import (load_model, load_model_config, load_tokenizer, partitioned_blueprint,
                            resolve_model_source, source_on_this_node)


@dataclass
class Prepared:
    spec: TeacherSpec
    source: str
    config: object  # transformers PretrainedConfig
    vocab_size: int  # logit columns shared with the student


def preflight(specs: dict[str, TeacherSpec], student_tok, student_config, check_cache: bool = True,
              task: str = "causal_lm") -> dict[str, Prepared]:
    """Resolve and check every teacher. A classifier student (another architecture, another tokenizer)
    learns from the teacher's class probabilities, which only the cache provides: no vocabulary check."""
    out = {}
    for name, spec in specs.items():
        if not isinstance(spec, TeacherSpec):
            raise ConfigError(f"method asks for a frozen model {name!r} of unknown kind {type(spec).__name__}")
        try:
            source = resolve_model_source(spec.path, key=f"method.{name}.path")
            config = load_model_config(source, spec.trust_remote_code)
            tok = load_tokenizer(source, spec.trust_remote_code)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None  # already names the key and the path
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"method.{name}.path: cannot load {spec.path!r}: {first}") from None
        if task == "sequence_classification":
            if spec.signal != "cached":
                raise ConfigError(f"method.signal: a {task} student learns from the {name}'s class probabilities, "
                                  "which `distune cache-teacher` computes over data.labels; set signal: cached")
            vocab = None
        else:
            try:
                vocab = aligned_vocab_size(student_tok, tok, student_config.vocab_size, config.vocab_size)
            except VocabMismatch as e:
                raise ConfigError(f"method.{name}: {e}") from None
        if spec.signal == "cached" and check_cache:
            try:
                cache.check_meta(cache.read_meta(spec.cache_dir), spec, vocab, spec.cache_dir, task)
            except cache.CacheError as e:
                raise ConfigError(str(e)) from None
        out[name] = Prepared(spec, source, config, vocab)
    return out


def load_teacher(prep: Prepared):
    return load_model(prep.source, prep.spec.dtype, prep.spec.trust_remote_code)


def place_teacher(prep: Prepared, device):
    """(the teacher whole, in eval mode, the device its inputs go to): on `device`, or spread over every visible
    GPU when there are several (a teacher bigger than one GPU: a layer range on each, inputs enter on the first)."""
    import torch

    if torch.cuda.device_count() > 1:
        model = load_model(prep.source, prep.spec.dtype, prep.spec.trust_remote_code, device_map="auto").eval()
        return model, model.get_input_embeddings().weight.device
    return load_teacher(prep).to(device).eval(), device


def _load_partitioned_teacher(prep: Prepared, ds_config: dict):
    """The teacher built already partitioned across the ranks, each reading only its own slices; loaded whole (and
    partitioned by DeepSpeed) where its checkpoint cannot be read that way (validate printed why)."""
    from distune.engine.runtime import frozen_ds_config
    from distune.engine.sharded_load import load_partitioned

    plan, _ = teacher_blueprint(prep)
    if plan is None:
        return load_teacher(prep)
    return load_partitioned(plan, frozen_ds_config(ds_config, prep.spec.dtype), prep.spec.dtype)


def teacher_blueprint(prep: Prepared):
    """(blueprint, None) or (None, why the teacher cannot be loaded partitioned)."""
    spec = prep.spec
    return partitioned_blueprint(prep.source, False, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code,
                                 key="method.teacher.path")


def build(prepared: dict[str, Prepared], ds_config: dict, train_samples: list, remote: dict | None = None) -> dict:
    """name -> teacher signal, ready for `method.loss(..., frozen)`."""
    from distune.engine.runtime import build_frozen_engine

    frozen = {}
    for name, prep in prepared.items():
        spec = prep.spec
        if spec.signal == "online":
            partitioned = spec.partitioned(ds_config["zero_optimization"]["stage"])
            model = _load_partitioned_teacher(prep, ds_config) if partitioned else load_teacher(prep)
            engine = build_frozen_engine(model, ds_config, spec.dtype, partitioned)
            frozen[name] = OnlineTeacher(engine, prep.vocab_size, spec.top_k, spec.temperature, spec.hidden_states)
        elif spec.signal == "cached":
            cache.attach(train_samples, spec.cache_dir)
            frozen[name] = CachedTeacher(prep.vocab_size)
        elif spec.signal == "remote":
            if not remote or name not in remote:
                raise ConfigError("method.signal: remote needs the Ray actor group `distune run` starts; "
                                  "running without Ray, use signal online or cached")
            frozen[name] = remote[name]
        else:
            raise ConfigError(f"method.signal: unknown teacher signal {spec.signal!r}")
    return frozen


def teacher_specs(cfg) -> dict[str, TeacherSpec]:
    """The frozen models `cfg`'s method asks for (for the cluster layer, which must not import methods)."""
    from distune.methods import build_method

    return build_method(cfg.method.name, cfg.method.model_extra or {}).frozen_models()


def cache_shard(cfg_dict: dict, model_source: str, index: int, count: int, progress=None) -> dict:
    """Run the teacher over shard `index` of the training split and write it to method.cache_dir.

    Runs anywhere (a Ray task from `distune cache-teacher`, or in-process); the same samples as training
    sees, since every process renders and splits the data identically (seeded). For a causal student:
    top-k per trained position; for a classifier student: the teacher's class log-probs, from the
    summed log-probability it gives each class name (the verbalizer) after the prompt. `progress(n)`, when
    given, is called with the number of samples each batch finished.
    """
    from pathlib import Path

    import torch

    from distune.config import load_config
    from distune.data import load_splits

    cfg = load_config(cfg_dict)
    spec = teacher_specs(cfg)["teacher"]
    model_source = source_on_this_node(cfg.model.path, model_source)
    tokenizer = load_tokenizer(model_source, cfg.model.trust_remote_code)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(spec.cache_dir)
    if cfg.model.task == "sequence_classification":
        labels = load_splits(cfg.data, tokenizer, cfg.run.seed, None, cfg.model.task).labels
        source = resolve_model_source(spec.path)
        teacher_tok = load_tokenizer(source, spec.trust_remote_code)
        # The teacher's own rendering: its tokenizer, chat template, and prompt (same rows, same split). It
        # scores whole prompts: data.max_length is the student's input budget, not the teacher's.
        data = cfg.data.model_copy(update={"max_length": 1 << 20, **{k: v for k, v in (
            ("prompt", spec.prompt), ("system", spec.system)) if v is not None}})
        samples = load_splits(data, teacher_tok, cfg.run.seed).train
        model = load_model(source, spec.dtype, spec.trust_remote_code).to(device).eval()
        return cache.write_class_shard(samples, model, teacher_tok, data, labels, out_dir, index, count,
                                       cfg.eval.micro_batch_size, device, progress)
    student_config = load_model_config(model_source, cfg.model.trust_remote_code)
    prep = preflight({"teacher": _uncached(spec)}, tokenizer, student_config)["teacher"]
    splits = load_splits(cfg.data, tokenizer, cfg.run.seed, cfg.eval.choices)
    model, device = place_teacher(prep, device)  # the task's GPUs (cache-teacher --gpus-per-shard)
    teacher = OnlineTeacher(model, prep.vocab_size, spec.top_k, spec.temperature)
    return cache.write_shard(splits.train, teacher, out_dir, index, count, cfg.eval.micro_batch_size,
                             tokenizer.pad_token_id, device, progress, which=spec.positions)


def _uncached(spec: TeacherSpec) -> TeacherSpec:
    """The same teacher, as an online signal (a cache being built cannot be checked against itself)."""
    from dataclasses import replace

    return replace(spec, signal="online")
