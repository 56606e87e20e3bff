"""Distillation without Ray: vocabulary alignment, the teacher cache (cached top-k == online top-k; the
memory-mapped and compressed layouts alike), teacher metrics against hand math, config errors, students from teacher
layers, adapter-folder teachers, hidden-state projections and the GKD sampling helper. Ray runs of the same features
live in tests/integration/test_distill_on_ray.py."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import tiny
from distune.config import ConfigError, load_config
from distune.data import DataError, collate, load_splits
from distune.signals import cache
from distune.signals import (CachedSignal, OnlineSignal, TeacherOutput, TeacherSpec, kd_positions,
                                     trained_positions)
from distune.distill.vocab import VocabMismatch, aligned_vocab_size
from distune.signals.teachers import preflight
from distune.methods import RunSettings, build_method
from distune.methods.distill import PROJECTION, teacher_metrics
from distune.models import load_model, load_model_config, load_tokenizer
from distune.validate import validate

PAD_ROWS = 37
TOP_K, TEMPERATURE = 8, 2.0
CACHED = 24  # training samples in the test cache (enough to amortise the npz headers in bytes/token)


def _teacher(path, **extra) -> dict:
    return {"name": "distill", "teacher": {"path": str(path), "dtype": "fp32"}, **extra}


def _method(teacher_dir, seed: int = 0, **options):
    return build_method("distill", {"teacher": {"path": str(teacher_dir), "dtype": "fp32"}, **options},
                        RunSettings(seed=seed))


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(str(tiny_model))


@pytest.fixture(scope="module")
def padded_teacher(tmp_path_factory) -> Path:
    return tiny.build_teacher_dir(tmp_path_factory.mktemp("padded") / "teacher", pad_rows=PAD_ROWS)


@pytest.fixture(scope="module")
def data_cfg(tiny_model, tiny_data, tmp_path_factory):
    return load_config(tiny.base_config(tiny_model, tiny_data, tmp_path_factory.mktemp("runs"))).data


def _train_samples(data_cfg, tok):
    """Fresh samples each call (`attach` writes into them)."""
    return load_splits(data_cfg, tok, 0).train


@pytest.fixture(scope="module")
def teacher_model(tiny_teacher):
    return load_model(str(tiny_teacher), "fp32").eval()


def _build_cache(out, teacher_model, tiny_teacher, data_cfg, tok, compress: bool = False):
    samples = _train_samples(data_cfg, tok)[:CACHED]
    online = OnlineSignal(teacher_model, len(tok), TOP_K, TEMPERATURE)
    shards = [cache.write_shard(samples, online, out, i, 2, 8, tok.pad_token_id, torch.device("cpu"),
                                compress=compress) for i in range(2)]
    spec = TeacherSpec(path=str(tiny_teacher), dtype="fp32", signal="cached", top_k=TOP_K,
                       temperature=TEMPERATURE, cache_dir=str(out), cache_compress=compress)
    meta = cache.write_meta(out, spec, len(tok), shards, data_cfg.path)
    return out, spec, meta


@pytest.fixture(scope="module")
def teacher_cache(tiny_teacher, teacher_model, data_cfg, tok, tmp_path_factory):
    """A two-shard top-8 cache at T=2 of the first training samples, as `distune cache-teacher` writes it
    (the memory-mapped layout)."""
    return _build_cache(tmp_path_factory.mktemp("cache") / "teacher-cache", teacher_model, tiny_teacher, data_cfg, tok)


@pytest.fixture(scope="module")
def npz_cache(tiny_teacher, teacher_model, data_cfg, tok, tmp_path_factory):
    """The same cache in the compressed layout (`method.cache_compress: true`)."""
    return _build_cache(tmp_path_factory.mktemp("cache") / "teacher-cache-npz", teacher_model, tiny_teacher,
                        data_cfg, tok, compress=True)


# ------------------------------------------------------------------------------ 1. vocabulary alignment


def test_padded_teacher_rows_are_cut_off_automatically(make_config, padded_teacher, tok):
    cfg = make_config(method=_teacher(padded_teacher))
    summary = validate(cfg)
    assert summary["teacher_vocab"] == len(tok)

    model = load_model(str(padded_teacher)).eval()
    assert model.config.vocab_size == len(tok) + PAD_ROWS  # the padding is really there
    batch = collate(load_splits(cfg.data, tok, 0).train[:2], tok.pad_token_id)
    positions = trained_positions(batch["labels"])
    out = OnlineSignal(model, summary["teacher_vocab"], None, 1.0)(batch, positions)
    assert out.logits.shape == (int(positions.sum()), len(tok))


def _other_tokenizer_model(out: Path) -> Path:
    """A teacher whose tokenizer was trained on another corpus (300 tokens, other merges and ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [f"weather report {i}: cloudy with rain, wind from the north at {i % 40} knots" for i in range(200)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<pad>", "</s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    out.mkdir(parents=True)
    fast.save_pretrained(out)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


def test_teacher_with_another_tokenizer_refused_with_sequence_level_hint(make_config, tmp_path, tok):
    other = _other_tokenizer_model(tmp_path / "other")
    assert len(load_tokenizer(str(other))) != len(tok)
    cfg = make_config(method=_teacher(other))
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    msg = str(err.value)
    assert msg.startswith("method.teacher:") and "`distune generate`" in msg and "tokenizers differ" in msg


@pytest.mark.parametrize("who", ["student", "teacher"])
def test_fewer_output_rows_than_tokens_is_a_vocab_mismatch(tok, who):
    rows = {"student_rows": len(tok), "teacher_rows": len(tok), f"{who}_rows": len(tok) - 1}
    with pytest.raises(VocabMismatch, match=f"the {who} model has {len(tok) - 1} output rows but its tokenizer "
                                            f"{len(tok)} tokens"):
        aligned_vocab_size(tok, tok, **rows)
    assert aligned_vocab_size(tok, tok, len(tok), len(tok) + PAD_ROWS) == len(tok)


# ------------------------------------------------------------------ 2. cached top-k == online top-k


def _batch_and_student(tiny_model, data_cfg, tok, cache_dir):
    samples = _train_samples(data_cfg, tok)[:4]
    cache.attach(samples, cache_dir)
    student = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    return collate(samples, tok.pad_token_id), student


def test_cached_topk_loss_equals_online_topk_loss(tiny_model, tiny_teacher, teacher_model, teacher_cache,
                                                   data_cfg, tok):
    cache_dir, _, _ = teacher_cache
    batch, student = _batch_and_student(tiny_model, data_cfg, tok, cache_dir)
    positions = trained_positions(batch["labels"])
    assert batch["teacher_topk_ids"].shape == (*batch["labels"].shape, TOP_K)

    online = OnlineSignal(teacher_model, len(tok), TOP_K, TEMPERATURE)
    options = {"top_k": TOP_K, "temperature": TEMPERATURE, "kd_weight": 0.5}
    with torch.no_grad():
        # The cache rows landed on exactly the trained positions, in order.
        want = online(batch, positions)
        got = CachedSignal()(batch, positions)
        assert torch.equal(got.topk_ids, want.topk_ids)
        torch.testing.assert_close(got.topk_logp, want.topk_logp, rtol=1e-3, atol=1e-4)  # fp16 storage

        on = _method(tiny_teacher, **options).loss(student, batch, {"teacher": online})
        cached = _method(tiny_teacher, signal="cached", cache_dir=str(cache_dir), **options).loss(
            student, batch, {"teacher": CachedSignal()})
        dense = _method(tiny_teacher, temperature=TEMPERATURE, kd_weight=0.5).loss(
            student, batch, {"teacher": OnlineSignal(teacher_model, len(tok), None, TEMPERATURE)})

    assert cached.loss.item() == pytest.approx(on.loss.item(), rel=2e-3)
    assert cached.metrics["kd"].item() == pytest.approx(on.metrics["kd"].item(), rel=2e-3)
    assert cached.metrics["teacher_topk_mass"].item() == pytest.approx(on.metrics["teacher_topk_mass"].item(),
                                                                       rel=2e-3)
    assert torch.equal(cached.metrics["ce"], on.metrics["ce"])
    assert on.metrics["trained_tokens"].item() == positions.sum().item()
    # Dense KD is another objective (no tail bin): different, and both finite.
    assert math.isfinite(dense.loss.item()) and math.isfinite(on.loss.item())
    assert abs(dense.metrics["kd"].item() - on.metrics["kd"].item()) > 0.01 * on.metrics["kd"].item()
    assert "teacher_topk_mass" not in dense.metrics


def test_cached_cuts_a_padded_student_like_online(tiny_model, tiny_teacher, teacher_model, teacher_cache,
                                                  data_cfg, tok):
    """A student with padded output rows: both signals compare over the shared vocabulary only."""
    cache_dir, _, _ = teacher_cache
    batch, student = _batch_and_student(tiny_model, data_cfg, tok, cache_dir)
    student.resize_token_embeddings(len(tok) + PAD_ROWS)  # HF's mean-resizing: the padded rows get real mass
    options = {"top_k": TOP_K, "temperature": TEMPERATURE}
    with torch.no_grad():
        on = _method(tiny_teacher, **options).loss(
            student, batch, {"teacher": OnlineSignal(teacher_model, len(tok), TOP_K, TEMPERATURE)})
        cached = _method(tiny_teacher, signal="cached", cache_dir=str(cache_dir), **options)
        cut = cached.loss(student, batch, {"teacher": CachedSignal(len(tok))})
        uncut = cached.loss(student, batch, {"teacher": CachedSignal()})
    assert cut.metrics["kd"].item() == pytest.approx(on.metrics["kd"].item(), rel=2e-3)
    # Without the vocabulary the padded rows' mass lands in the tail bin: another (wrong) objective.
    assert abs(uncut.metrics["kd"].item() - on.metrics["kd"].item()) > 5e-3 * on.metrics["kd"].item()


# ------------------------------------------------------------------------------------ 3. cache safety


def test_cache_built_at_another_temperature_is_refused(teacher_cache, tok):
    cache_dir, spec, meta = teacher_cache
    cache.check_meta(cache.read_meta(cache_dir), spec, len(tok), cache_dir)  # the matching spec passes
    with pytest.raises(cache.CacheError, match=r"temperature=2\.0.*needs 1\.0.*`distune cache-teacher"):
        cache.check_meta(meta, replace(spec, temperature=1.0), len(tok), cache_dir)
    with pytest.raises(cache.CacheError, match=r"top_k=8.*needs 16"):
        cache.check_meta(meta, replace(spec, top_k=16), len(tok), cache_dir)


@pytest.mark.parametrize("layout", ["mmap", "npz"])
def test_sample_missing_from_cache_names_its_line(request, layout, data_cfg, tok):
    cache_dir, _, _ = request.getfixturevalue("teacher_cache" if layout == "mmap" else "npz_cache")
    samples = _train_samples(data_cfg, tok)[:3]
    altered = samples[1]
    altered.input_ids = [altered.input_ids[0], (altered.input_ids[1] + 1) % len(tok), *altered.input_ids[2:]]
    with pytest.raises(DataError, match=rf"^data line {altered.line}: this sample is not in the teacher cache"):
        cache.attach(samples, cache_dir)
    relabelled = _train_samples(data_cfg, tok)[2]
    relabelled.labels = [-100 if i == len(relabelled.labels) - 1 else x for i, x in enumerate(relabelled.labels)]
    with pytest.raises(DataError, match=rf"^data line {relabelled.line}:"):
        cache.attach([relabelled], cache_dir)


def _store(samples, folder):
    from distune.data.store import SplitWriter, StoredSamples

    writer = SplitWriter(folder)
    writer.add(samples)
    return StoredSamples(folder, writer.close())


@pytest.mark.parametrize("layout", ["mmap", "npz"])
def test_a_stored_split_reads_its_cache_rows_at_read_time(request, layout, teacher_cache, data_cfg, tok, tmp_path):
    """On a memory-mapped split each sample gets its rows when it is read, equal to what a list of samples gets;
    a changed sample, or one past the end of the cache, fails when read (the first and last already at attach)."""
    cache_dir, _, _ = request.getfixturevalue("teacher_cache" if layout == "mmap" else "npz_cache")
    listed = _train_samples(data_cfg, tok)[:CACHED]
    cache.attach(listed, teacher_cache[0])
    store = _store(_train_samples(data_cfg, tok)[:CACHED], tmp_path / "train")
    cache.attach(store, cache_dir)
    for i in range(CACHED):
        got, want = store[i].extras, listed[i].extras
        assert got.keys() == want.keys() == {"teacher_topk_ids", "teacher_topk_logp"}
        for key in got:
            assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), (i, key)
    assert (got["teacher_topk_ids"].dtype, got["teacher_topk_logp"].dtype) == (np.int64, np.float32)

    samples = _train_samples(data_cfg, tok)[:CACHED]
    changed = samples[5]
    changed.labels = [-100 if i == len(changed.labels) - 1 else x for i, x in enumerate(changed.labels)]
    store = _store(samples, tmp_path / "changed")
    cache.attach(store, cache_dir)  # the first and last samples are in the cache
    with pytest.raises(DataError, match=rf"^data line {changed.line}: this sample is not in the teacher cache"):
        store[5]
    longer = _train_samples(data_cfg, tok)[:CACHED + 1]  # one sample more than the cache holds
    with pytest.raises(DataError, match=rf"^data line {longer[-1].line}: this sample is not in the teacher cache"):
        cache.attach(_store(longer, tmp_path / "longer"), cache_dir)


def test_mmap_and_npz_caches_give_the_same_kd_loss(tiny_model, tiny_teacher, teacher_cache, npz_cache, data_cfg,
                                                   tok):
    (mm_dir, spec, mm_meta), (npz_dir, _, npz_meta) = teacher_cache, npz_cache
    assert (mm_meta["format"], mm_meta["layout"], npz_meta["format"], npz_meta["layout"]) == (2, "mmap", 1, "npz")
    assert {p.name for p in mm_dir.glob("shard-*")} == cache.shard_files(mm_meta) == {
        f"shard-0000{i}-of-00002.{part}" for i in range(2) for part in ("ids", "logp", "offsets", "keys")}
    assert {p.name for p in npz_dir.glob("shard-*")} == cache.shard_files(npz_meta) == {
        "shard-00000-of-00002.npz", "shard-00001-of-00002.npz"}
    assert npz_meta["positions"] == mm_meta["positions"] and npz_meta["samples"] == mm_meta["samples"] == CACHED
    train = _train_samples(data_cfg, tok)[:CACHED]
    keys = np.fromfile(mm_dir / "shard-00001-of-00002.keys", np.uint8).reshape(-1, 10)
    assert [k.tobytes().hex() for k in keys] == [cache.sample_key(s) for s in train[1::2]]  # in split order
    for meta, where in ((mm_meta, mm_dir), (npz_meta, npz_dir)):
        cache.check_meta(meta, spec, len(tok), where)  # both formats are read
    with pytest.raises(cache.CacheError, match=r"format=3 .*this run reads 1 \(npz\) or 2 \(mmap\)"):
        cache.check_meta({**mm_meta, "format": 3}, spec, len(tok), mm_dir)
    with pytest.raises(cache.CacheError, match=r"temperature=2\.0.*needs 1\.0"):
        cache.check_meta(npz_meta, replace(spec, temperature=1.0), len(tok), npz_dir)

    assert _method(tiny_teacher, signal="cached", cache_dir=str(npz_dir),
                   cache_compress=True).frozen_models()["teacher"].cache_compress  # reaches cache-teacher's shards
    student = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    method = _method(tiny_teacher, signal="cached", cache_dir=str(mm_dir), top_k=TOP_K, temperature=TEMPERATURE)
    assert method.frozen_models()["teacher"].cache_compress is False
    out = []
    for where in (mm_dir, npz_dir):
        samples = _train_samples(data_cfg, tok)[:8]
        cache.attach(samples, where)
        with torch.no_grad():
            out.append(method.loss(student, collate(samples, tok.pad_token_id), {"teacher": CachedSignal()}))
    assert torch.equal(out[0].loss, out[1].loss) and torch.equal(out[0].metrics["kd"], out[1].metrics["kd"])
    assert out[0].metrics["kd"].item() > 0


def test_cache_dir_without_meta_is_incomplete(teacher_cache, tmp_path, data_cfg, tok):
    cache_dir, _, _ = teacher_cache
    partial = tmp_path / "partial"
    partial.mkdir()
    for shard in cache_dir.glob("shard-*"):  # shards without meta.json: an interrupted build
        (partial / shard.name).write_bytes(shard.read_bytes())
    with pytest.raises(cache.CacheError, match="no complete teacher cache.*no meta.json"):
        cache.read_meta(partial)
    with pytest.raises(cache.CacheError, match="no meta.json"):
        cache.attach(_train_samples(data_cfg, tok)[:1], partial)


def test_cache_is_small_and_complete(teacher_cache, data_cfg, tok):
    cache_dir, _, meta = teacher_cache
    train = _train_samples(data_cfg, tok)[:CACHED]
    assert meta == json.loads((cache_dir / "meta.json").read_text())
    assert meta["samples"] == CACHED and len(meta["shards"]) == 2
    assert meta["positions"] == sum(int(trained_positions(collate([s], 0)["labels"]).sum()) for s in train)
    assert meta["bytes_per_token"] < 4 * len(tok) / 10
    assert meta["dense_fp32_bytes_per_token"] == 4 * len(tok)
    assert not list(cache_dir.glob(".*"))  # shard writes are atomic: no temporary file is left


def test_kd_on_every_position_cached_equals_online(tiny_model, tiny_teacher, teacher_model, data_cfg, tok,
                                                   tmp_path):
    """kd_positions: all — the cache holds a row per position of each sample (n-1 for n tokens), the rows
    land on the positions the online teacher scores, and the KD term covers prompt tokens too."""
    samples = _train_samples(data_cfg, tok)[:6]
    online = OnlineSignal(teacher_model, len(tok), TOP_K, TEMPERATURE)
    spec = TeacherSpec(path=str(tiny_teacher), dtype="fp32", signal="cached", top_k=TOP_K,
                       temperature=TEMPERATURE, cache_dir=str(tmp_path), positions="all")
    shards = [cache.write_shard(samples, online, tmp_path, 0, 1, 4, tok.pad_token_id, torch.device("cpu"),
                                which="all")]
    meta = cache.write_meta(tmp_path, spec, len(tok), shards, data_cfg.path)
    assert meta["positions"] == sum(len(s.input_ids) - 1 for s in samples)
    cache.check_meta(meta, spec, len(tok), tmp_path)
    with pytest.raises(cache.CacheError, match=r"kd_positions='all', this run needs 'response'"):
        cache.check_meta(meta, replace(spec, positions="response"), len(tok), tmp_path)

    fresh = _train_samples(data_cfg, tok)[:6]
    cache.attach(fresh, tmp_path)
    batch = collate(fresh, tok.pad_token_id)
    every = kd_positions(batch, "all")
    response = trained_positions(batch["labels"])
    assert every.sum() == meta["positions"] and bool((every | response).eq(every).all())  # responses included
    assert every.sum() > 2 * response.sum()  # the prompts are most of the tokens
    student = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    options = {"top_k": TOP_K, "temperature": TEMPERATURE, "kd_positions": "all"}
    with torch.no_grad():
        want = online(batch, every)
        got = CachedSignal()(batch, every)
        assert torch.equal(got.topk_ids, want.topk_ids)
        on = _method(tiny_teacher, **options).loss(student, batch, {"teacher": online})
        cached = _method(tiny_teacher, signal="cached", cache_dir=str(tmp_path), **options).loss(
            student, batch, {"teacher": CachedSignal()})
        only_responses = _method(tiny_teacher, top_k=TOP_K, temperature=TEMPERATURE).loss(
            student, batch, {"teacher": online})
    assert cached.metrics["kd"].item() == pytest.approx(on.metrics["kd"].item(), rel=2e-3)
    assert torch.equal(on.metrics["ce"], only_responses.metrics["ce"])  # CE still trains the labels only
    assert on.metrics["trained_tokens"] == only_responses.metrics["trained_tokens"] == response.sum()
    assert abs(on.metrics["kd"].item() - only_responses.metrics["kd"].item()) > 1e-3


@pytest.mark.parametrize("sections,fragment", [
    ({"data": {"packing": True}}, "method.kd_positions: 'all' would distil across the joins of packed samples"),
    ({"model": {"task": "sequence_classification"}, "data": {"labels": ["negative", "positive"]}},
     "method.kd_positions: 'all' distils every token's next-token distribution; a sequence_classification"),
])
def test_kd_on_every_position_refusals(make_config, tiny_teacher, sections, fragment):
    cfg = make_config(method=_teacher(tiny_teacher, kd_positions="all"), **sections)
    with pytest.raises(ConfigError, match=fragment):
        validate(cfg)


# --------------------------------------------------------------------------------- 4. teacher_metrics


def test_teacher_metrics_dense_hand_math():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.15, 0.6]])
    # logits = T·log p, so softmax(logits / T) is exactly p
    t = TeacherOutput(logits=2.0 * probs.log())
    student = torch.tensor([[3.0, 0.0, 0.0], [3.0, 0.0, 0.0]])  # agrees on row 0 (id 0), not on row 1 (id 2)
    m = teacher_metrics(student.argmax(-1), t, temperature=2.0)
    entropy = [-sum(p * math.log(p) for p in row) for row in probs.tolist()]
    assert m["teacher_entropy"].item() == pytest.approx(sum(entropy) / 2, abs=1e-5)
    assert m["top1_agreement"].item() == 0.5
    assert "teacher_topk_mass" not in m


def test_teacher_metrics_topk_hand_math():
    kept = [[0.5, 0.3], [0.6, 0.1]]  # tails: 0.2 and 0.3
    t = TeacherOutput(topk_ids=torch.tensor([[4, 1], [2, 0]]), topk_logp=torch.tensor(kept).log())
    student = torch.zeros(2, 5)
    student[0, 4] = student[1, 3] = 1.0  # row 0 agrees with the teacher's top-1, row 1 does not
    m = teacher_metrics(student.argmax(-1), t, temperature=1.0)
    rows = [row + [1 - sum(row)] for row in kept]
    entropy = [-sum(p * math.log(p) for p in row) for row in rows]
    assert m["teacher_topk_mass"].item() == pytest.approx((0.8 + 0.7) / 2, abs=1e-6)
    assert m["teacher_entropy"].item() == pytest.approx(sum(entropy) / 2, abs=1e-5)
    assert m["top1_agreement"].item() == 0.5


# ------------------------------------------------------------------------------------ 5. config errors


@pytest.mark.parametrize("method,fragments", [
    ({"signal": "cached"}, ["config: method.cache_dir: signal 'cached' needs it", "distune cache-teacher"]),
    ({"signal": "cached", "cache_dir": "/tmp/c", "gkd": {"lmbda": 0.5}}, ["config: method.gkd.lmbda:",
                                                                          "online or remote"]),
    ({"signal": "remote", "hidden": {"weight": 1.0}}, ["config: method.hidden.weight: hidden-state distillation",
                                                       "signal 'online'"]),
    ({"divergence": "kl"}, ["method.divergence:", "unknown divergence 'kl'",
                            "known: forward_kl, jsd, reverse_kl, skew_forward_kl, skew_reverse_kl, tvd"]),
    ({"student": {"name": "distill"}}, ["method.student.name:", "cannot itself be 'distill'"]),
    ({"student": {"name": "lora", "rank": 4}}, ["method.student.rank: unknown key",
                                                "did you mean 'method.student.r'?"]),
    ({"student": {"name": "lora", "r": "x"}}, ["method.student.r:", "valid integer"]),
    ({"student": {"name": "lorra"}}, ["method.student.name:", "unknown method 'lorra'", "known: ", "lora"]),
    ({"temprature": 2.0}, ["method.temprature: unknown key", "did you mean 'method.temperature'?"]),
    ({"hidden": {"weigth": 1.0}}, ["method.hidden.weigth: unknown key", "'method.hidden.weight'"]),
    ({"kd_weight": 1.5}, ["method.kd_weight:", "1.5"]),
], ids=["cached_without_cache_dir", "gkd_with_cache", "hidden_with_remote", "unknown_divergence", "distill_student",
        "student_key_typo", "student_key_type", "unknown_student", "method_key_typo", "hidden_key_typo",
        "kd_weight_range"])
def test_distill_config_errors_name_the_key(tiny_model, tiny_data, tmp_path, tiny_teacher, method, fragments):
    raw = tiny.base_config(tiny_model, tiny_data, tmp_path, method=_teacher(tiny_teacher, **method))
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_distill_config_defaults_and_resolution(tiny_model, tiny_data, tmp_path, tiny_teacher):
    cfg = load_config(tiny.base_config(tiny_model, tiny_data, tmp_path, method=_teacher(
        tiny_teacher, signal="remote", student={"name": "lora", "r": 4})))
    options = cfg.method_config()
    assert options.top_k == 64 and options.student == {"name": "lora", "r": 4}  # remote defaults to top-64
    spec = build_method("distill", cfg.method.model_extra).frozen_models()["teacher"]
    assert (spec.signal, spec.top_k, spec.hidden_states, spec.path) == ("remote", 64, False, str(tiny_teacher))


# ------------------------------------------------------------------- 6. student from teacher layers


def test_student_from_every_second_teacher_layer(tiny_teacher, teacher_model, tok):
    student = load_model(str(tiny_teacher), "fp32", layers=2).eval()
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    for new, old in ((0, 0), (1, 2)):
        mine, theirs = student.model.layers[new].state_dict(), teacher_model.model.layers[old].state_dict()
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(student.lm_head.weight, teacher_model.lm_head.weight)
    assert [b.self_attn.layer_idx for b in student.model.layers] == [0, 1]

    prompt = tok("Sentiment: the movie was great", return_tensors="pt")
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    cached = student.generate(**prompt, use_cache=True, return_dict_in_generate=True, **kwargs)
    plain = student.generate(**prompt, use_cache=False, **kwargs)
    assert len(cached.past_key_values) == 2
    assert cached.sequences.shape[1] == prompt["input_ids"].shape[1] + 5
    assert torch.equal(cached.sequences, plain)  # the KV cache slots follow the new block indices


def test_student_layers_out_of_range_name_the_key(tiny_teacher):
    with pytest.raises(ValueError, match=r"^model\.layers: \[0, 9\] must pick .* within 0\.\.3"):
        load_model(str(tiny_teacher), "fp32", layers=[0, 9])


# ------------------------------------------------------------------------- 7. adapter-folder teacher


def test_adapter_folder_teacher_is_merged_on_load(tiny_model, tmp_path, tok):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # PEFT initialises B to zero: the adapter would be a no-op
    peft_model.eval()
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    tok.save_pretrained(adapter)

    merged = load_model(str(adapter)).eval()
    assert not isinstance(merged, PeftModel) and type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.tensor([[2, 57, 388, 264, 30, 44, 3]])
    with torch.no_grad():
        want, got = peft_model(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model)(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (want - plain).abs().max() > 1e-2  # the adapter changes the model, so the merge is really checked

    assert load_model_config(str(adapter)).to_dict() == AutoConfig.from_pretrained(tiny_model).to_dict()
    prep = preflight({"teacher": TeacherSpec(path=str(adapter), dtype="fp32")}, tok,
                     AutoConfig.from_pretrained(tiny_model))["teacher"]
    assert prep.vocab_size == len(tok) and prep.config.hidden_size == 64


# ----------------------------------------------------------------- 8. hidden-state distillation


def test_hidden_state_projection_added_trained_and_not_exported(tiny_model, tiny_teacher, teacher_model,
                                                               data_cfg, tok):
    method = _method(tiny_teacher, student={"name": "full"}, hidden={"weight": 1.0})
    assert method.layer_map(2, 4) == {1: 2, 2: 4}
    assert method.frozen_models()["teacher"].hidden_states is True
    with pytest.raises(ValueError, match="teacher's width"):  # adapt before the runner showed the teacher
        method.adapt(AutoModelForCausalLM.from_pretrained(tiny_model))

    method.see_frozen_configs({"teacher": AutoConfig.from_pretrained(tiny_teacher)})
    model = method.adapt(AutoModelForCausalLM.from_pretrained(tiny_model))
    proj = getattr(model, PROJECTION)
    assert set(proj.keys()) == {"1", "2"}
    for linear in proj.values():
        assert isinstance(linear, torch.nn.Linear) and linear.bias is None
        assert (linear.in_features, linear.out_features) == (64, 96) and linear.weight.requires_grad
    keys = method.export_keys(model)
    everything = {n for n, _ in model.named_parameters()}
    assert keys == {n for n in everything if not n.startswith(PROJECTION)}
    assert everything - keys == {f"{PROJECTION}.1.weight", f"{PROJECTION}.2.weight"}

    batch = collate(_train_samples(data_cfg, tok)[:2], tok.pad_token_id)
    teacher = OnlineSignal(teacher_model, len(tok), None, 1.0, hidden_states=True)
    out = method.loss(model, batch, {"teacher": teacher})
    assert out.metrics["hidden_cosine"].item() > 0  # the default loss
    out.loss.backward()
    assert all(linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0 for linear in proj.values())


@pytest.mark.parametrize("loss", ["cosine", "mse"])
def test_hidden_term_of_a_same_width_student_matches_hand_computed(tiny_teacher, teacher_model, data_cfg, tok, loss):
    """A student made of teacher blocks 0 and 3 (same width): the projection starts as the identity, so the
    term is the plain distance between the two residual streams, mean over the mapped layers and real tokens."""
    import copy

    method = _method(tiny_teacher, student={"name": "full"}, hidden={"weight": 1.0, "loss": loss,
                                                                      "layers": {1: 2, 2: 4}})
    method.see_frozen_configs({"teacher": AutoConfig.from_pretrained(tiny_teacher)})
    student = copy.deepcopy(teacher_model)
    student.model.layers = torch.nn.ModuleList([student.model.layers[0], student.model.layers[3]])
    student.config.num_hidden_layers = 2
    student = method.adapt(student)
    assert all(torch.equal(lin.weight, torch.eye(96)) for lin in getattr(student, PROJECTION).values())

    batch = collate(_train_samples(data_cfg, tok)[:2], tok.pad_token_id)
    teacher = OnlineSignal(teacher_model, len(tok), None, 1.0, hidden_states=True)
    out = method.loss(student, batch, {"teacher": teacher})
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        sh = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     output_hidden_states=True).hidden_states
        th = teacher_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_hidden_states=True).hidden_states
    terms = []
    for s_i, t_i in {1: 2, 2: 4}.items():
        a, b = sh[s_i][keep], th[t_i][keep]
        if loss == "cosine":
            terms.append(sum(1 - float(x @ y) / float(x.norm() * y.norm()) for x, y in zip(a, b)) / len(a))
        else:
            terms.append(float((a - b).pow(2).mean()))
    assert out.metrics[f"hidden_{loss}"].item() == pytest.approx(sum(terms) / 2, rel=1e-4)
    assert out.metrics[f"hidden_{loss}"].item() > 0.01  # the student lacks teacher blocks 1 and 2: not a no-op

    method = _method(tiny_teacher, student={"name": "full"}, hidden={"weight": 1.0, "loss": loss,
                                                                      "layers": {2: 2, 4: 4}})
    method.see_frozen_configs({"teacher": AutoConfig.from_pretrained(tiny_teacher)})
    student_is_teacher = method.adapt(copy.deepcopy(teacher_model))  # a full copy: the streams coincide
    same = method.loss(student_is_teacher, batch, {"teacher": teacher})
    assert same.metrics[f"hidden_{loss}"].item() == pytest.approx(0, abs=1e-5)


@pytest.mark.parametrize("layers", [{3: 4}, {1: 5}, {-1: 2}])
def test_hidden_layer_map_out_of_range(tiny_model, tiny_teacher, layers):
    method = _method(tiny_teacher, student={"name": "full"}, hidden={"weight": 1.0, "layers": layers})
    method.see_frozen_configs({"teacher": AutoConfig.from_pretrained(tiny_teacher)})
    with pytest.raises(ValueError, match=r"^method\.hidden\.layers: .* outside the student's 0\.\.2 or the "
                                         r"teacher's 0\.\.4"):
        method.adapt(AutoModelForCausalLM.from_pretrained(tiny_model))


# --------------------------------------------------------------------------- 9. GKD sampling helper


@pytest.fixture
def ragged_batch(make_config, tmp_path, tok):
    """Three samples whose prompts have different lengths, so the prompts are really left-padded."""
    rows = [{"text": "great", "label": "positive"},
            {"text": "the movie was really so very awful", "label": "negative"},
            {"text": "fun day", "label": "positive"}]
    data = tiny.write_jsonl(tmp_path / "ragged.jsonl", rows)
    cfg = make_config(data={"path": str(data), "eval_size": 0})
    batch = collate(load_splits(cfg.data, tok, 0).train, tok.pad_token_id)
    starts = [int((row != -100).nonzero()[0]) for row in batch["labels"]]
    assert len(set(starts)) == 3
    return batch, starts


def _check_prompts(out, batch, starts, pad):
    width = max(starts)
    for i, n in enumerate(starts):
        assert torch.equal(out["input_ids"][i, width - n:width], batch["input_ids"][i, :n])
        assert (out["input_ids"][i, :width - n] == pad).all()
        assert out["attention_mask"][i, :width].tolist() == [0] * (width - n) + [1] * n
    assert (out["labels"][:, :width] == -100).all()
    return width


def test_student_samples_left_pad_prompts_and_mask_after_eos(world_of_one, tiny_model, tiny_teacher,
                                                             ragged_batch, tok):
    batch, starts = ragged_batch
    method = _method(tiny_teacher, gkd={"lmbda": 1.0, "max_new_tokens": 6})
    model = load_model(str(tiny_model)).train()
    torch.manual_seed(0)
    out = method._student_samples(model, batch)
    assert model.training  # the train/eval mode is restored
    pad, eos = tok.pad_token_id, tok.eos_token_id
    width = _check_prompts(out, batch, starts, pad)
    new, labels, mask = out["input_ids"][:, width:], out["labels"][:, width:], out["attention_mask"][:, width:]
    assert 1 <= new.shape[1] <= 6
    for i in range(len(starts)):
        is_eos = (new[i] == eos).nonzero()
        end = int(is_eos[0]) + 1 if len(is_eos) else new.shape[1]
        assert labels[i, :end].tolist() == new[i, :end].tolist() and mask[i, :end].tolist() == [1] * end
        assert (labels[i, end:] == -100).all() and (mask[i, end:] == 0).all() and (new[i, end:] == pad).all()
    assert ((out["labels"] != -100).sum(1) >= 1).all()


def test_student_samples_after_eos_is_padding_and_not_trained(world_of_one, tiny_model, tiny_teacher,
                                                             ragged_batch, tok):
    """The post-processing of generate's output, with the sampled tokens fixed."""
    batch, starts = ragged_batch
    pad, eos = tok.pad_token_id, tok.eos_token_id
    a, b, c = 57, 264, 391
    new = torch.tensor([[a, eos, b, c], [a, b, c, a], [eos, a, eos, b]])
    method = _method(tiny_teacher, gkd={"lmbda": 1.0, "max_new_tokens": 4, "temperature": 0.7, "top_p": 0.9})
    model = load_model(str(tiny_model)).train()
    seen = {}

    def fake_generate(input_ids, attention_mask, **kwargs):
        seen.update(kwargs, training=model.training, prompts=input_ids.clone(), mask=attention_mask.clone())
        return torch.cat([input_ids, new], 1)

    model.generate = fake_generate
    out = method._student_samples(model, batch)
    assert seen["training"] is False and model.training
    assert (seen["do_sample"], seen["max_new_tokens"], seen["min_new_tokens"]) == (True, 4, 1)
    assert (seen["temperature"], seen["top_p"], seen["pad_token_id"], seen["synced_gpus"]) == (0.7, 0.9, pad, False)
    width = _check_prompts(out, batch, starts, pad)
    assert torch.equal(seen["prompts"], out["input_ids"][:, :width])
    assert out["input_ids"][:, width:].tolist() == [[a, eos, pad, pad], [a, b, c, a], [eos, pad, pad, pad]]
    assert out["labels"][:, width:].tolist() == [[a, eos, -100, -100], [a, b, c, a], [eos, -100, -100, -100]]
    assert out["attention_mask"][:, width:].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_student_samples_come_from_the_untruncated_distribution(world_of_one, tiny_model, tiny_teacher,
                                                                 ragged_batch, tok):
    batch, _ = ragged_batch
    model = load_model(str(tiny_model))
    vocab = model.config.vocab_size
    # Logits that ignore the input: almost uniform, with a fixed order, so "the 50 most likely ids" is one set.
    model.lm_head = torch.nn.Linear(model.config.hidden_size, vocab, bias=True)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.copy_(torch.linspace(0.0, 0.01, vocab))
        model.lm_head.bias[tok.eos_token_id] = -5.0  # long samples
    top50 = set(range(vocab - 50, vocab))
    method = _method(tiny_teacher, gkd={"lmbda": 1.0, "max_new_tokens": 48})
    torch.manual_seed(0)
    out = method._student_samples(model, batch)
    sampled = set(out["labels"][out["labels"] != -100].tolist())
    # ~144 draws from a near-uniform distribution over 400 ids: P(all in one fixed set of 50) ~ 1e-130
    assert sampled - top50


def test_gkd_coin_is_a_function_of_the_batch_and_seed(world_of_one, tiny_teacher, ragged_batch):
    batch, _ = ragged_batch
    method = _method(tiny_teacher, gkd={"lmbda": 0.5})
    first = method._coin(batch)
    assert 0 <= first < 1
    assert method._coin({k: v.clone() for k, v in batch.items()}) == first
    assert _method(tiny_teacher, gkd={"lmbda": 0.5})._coin(batch) == first  # another process, same draw
    assert _method(tiny_teacher, seed=1, gkd={"lmbda": 0.5})._coin(batch) != first
    other = dict(batch, input_ids=batch["input_ids"].clone())
    other["input_ids"][0, 0] += 1
    assert method._coin(other) != first


def test_gkd_with_train_on_inputs_is_refused_before_scheduling(tiny_model, tiny_data, tmp_path, tiny_teacher):
    # The prompt of an on-policy sample ends at the first trained token: training on inputs leaves none.
    cfg = load_config(tiny.base_config(tiny_model, tiny_data, tmp_path, method=_teacher(tiny_teacher, gkd={"lmbda": 0.5}),
                                       data={"train_on_inputs": True}))
    with pytest.raises(ConfigError, match=r"^method\.gkd\.lmbda: .*data\.train_on_inputs"):
        validate(cfg)


def test_layers_on_a_model_without_a_block_list_is_refused_before_scheduling(tiny_encoder, tiny_data, tmp_path):
    cfg = load_config(tiny.base_config(tiny_encoder, tiny_data, tmp_path,
                                       model={"task": "sequence_classification", "layers": 2}))
    with pytest.raises(ConfigError, match=r"model\.layers: BertForSequenceClassification has no model\.layers"):
        validate(cfg)


def test_relative_teacher_and_cache_paths_reach_workers_absolute(tiny_model, tiny_data, tmp_path, tiny_teacher,
                                                                 monkeypatch):
    """Ray workers re-read the dumped config in another working directory: local paths must be absolute."""
    from distune.config import dump_config

    monkeypatch.chdir(tiny_teacher.parent)
    raw = tiny.base_config(tiny_model, tiny_data, tmp_path, method=_teacher(
        f"./{tiny_teacher.name}", signal="cached", cache_dir="caches/c"))
    dumped = dump_config(load_config(raw))["method"]
    assert dumped["teacher"]["path"] == str(tiny_teacher)
    assert dumped["cache_dir"] == str(tiny_teacher.parent / "caches" / "c")
    monkeypatch.chdir(tmp_path)
    assert load_config({**raw, "method": dumped}).method_config().teacher.path == str(tiny_teacher)


def test_missing_teacher_names_the_key(tiny_model, tiny_data, tmp_path):
    cfg = load_config(tiny.base_config(tiny_model, tiny_data, tmp_path, method=_teacher(tmp_path / "nope")))
    with pytest.raises(ConfigError, match=r"^method\.teacher\.path: .*nope does not exist$"):
        validate(cfg)
