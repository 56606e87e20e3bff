"""Distillation through Ray with ZeRO-2 and ZeRO-3: every teacher signal (online dense / top-k, cached,
remote), GKD on the student's own samples, hidden-state distillation, student from teacher layers."""

import json

import pytest
import ray
import torch
import yaml
from safetensors.torch import load_file

import wandb_records
from distune.cli import main as cli_main
from distune.training import fit


def _distill(make_config, tiny_teacher, stage, workers=2, name="d", **method):
    spec = {"name": "distill", "student": {"name": "lora", "r": 4}, "teacher": {"path": str(tiny_teacher),
            "dtype": "fp32"}, "kd_weight": 0.7, "temperature": 2.0, **method}
    return make_config(run={"name": name}, method=spec, deepspeed={"stage": stage},
                       cluster={"num_workers": workers}, train={"max_steps": 6, "lr": 5e-2},
                       eval={"before_training": True}, wandb={"mode": "offline"})


def _results(cfg):
    return json.loads((cfg.run_dir / "results.json").read_text())


def _history(cfg):
    return [row for row in wandb_records.logged(cfg.run_dir)["history"] if "train/kd" in row]


# Slow (40 s each): the default run has the online teacher under ZeRO-3 in test_gkd_on_policy[online-zero3].
@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)])
def test_online_teacher_lora_student(ray_cluster, make_config, tiny_teacher, stage):
    cfg = _distill(make_config, tiny_teacher, stage, divergence="jsd", divergence_params={"beta": 0.5})
    fit(cfg, str(cfg.model.path), show_progress=False)
    res = _results(cfg)
    assert res["step"] == 6 and "eval/loss" in res["after"]
    assert res["teacher"]["eval/loss"] > 0  # the online teacher is scored on the same held-out set
    rows = _history(cfg)
    # The (random, confident) teacher is not a good model of the data: what must fall is the divergence.
    assert rows[-1]["train/kd"] < 0.95 * rows[0]["train/kd"]
    for key in ("train/kd", "train/teacher_entropy", "train/top1_agreement", "train/loss"):
        assert key in rows[0]
    assert 0 <= rows[-1]["train/top1_agreement"] <= 1
    adapter = load_file(cfg.run_dir / "export" / "adapter_model.safetensors")
    assert adapter and not any("distill" in k for k in adapter)


def test_cached_topk_matches_online_and_trains_under_zero3(ray_cluster, make_config, tiny_teacher, tmp_path,
                                                          capsys):
    cache_dir = tmp_path / "cache"
    cfg = _distill(make_config, tiny_teacher, 3, name="cached", signal="cached", top_k=8,
                   cache_dir=str(cache_dir))
    path = tmp_path / "cached.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert cli_main(["run", str(path), "--no-progress"]) == 2  # no cache yet: refused before any worker
    assert "distune cache-teacher" in capsys.readouterr().err

    assert cli_main(["cache-teacher", str(path), "--shards", "3"]) == 0
    captured = capsys.readouterr()
    assert "bytes/token" in captured.out
    # The bar counts samples as the shards report them (a bar over 3 shards says little on a long cache).
    assert "teacher cache: 100%" in captured.err and "88/88" in captured.err and "sample" in captured.err
    meta = json.loads((cache_dir / "meta.json").read_text())
    assert meta["samples"] == 88 and meta["top_k"] == 8 and len(meta["shards"]) == 3
    assert meta["bytes_per_token"] < meta["dense_fp32_bytes_per_token"] / 10
    assert cli_main(["cache-teacher", str(path), "--no-progress"]) == 2  # complete cache: not overwritten
    capsys.readouterr()

    fit(cfg, str(cfg.model.path), show_progress=False)
    res = _results(cfg)
    assert res["step"] == 6 and "eval/loss" in res["after"]
    rows = _history(cfg)
    assert rows[-1]["train/kd"] < 0.95 * rows[0]["train/kd"]
    assert 0 < rows[0]["train/teacher_topk_mass"] <= 1
    assert rows[0]["train/ce"] > 0  # the loss's two terms, each on its own curve


def test_remote_teacher_actor_group(ray_cluster, make_config, tiny_teacher):
    cfg = _distill(make_config, tiny_teacher, 2, name="remote", signal="remote", top_k=16)
    fit(cfg, str(cfg.model.path), show_progress=False)
    res = _results(cfg)
    assert res["step"] == 6 and "eval/loss" in res["after"]
    rows = _history(cfg)
    assert rows[-1]["train/kd"] < 0.95 * rows[0]["train/kd"]
    # Prefetch (the default): every micro-batch but each rank's first was asked for before its turn.
    assert sum(r["train/teacher_prefetched"] for r in rows) / len(rows) > 0.8
    assert all(r["train/teacher_wait_s"] >= 0 for r in rows)


def test_remote_teacher_prefetch_serves_the_announced_batches(ray_cluster, make_config, tiny_teacher):
    """A prefetched answer is the synchronous answer; a batch the loop did not announce (GKD's own samples)
    is asked for when it comes, and the announced batch it replaced is dropped once a later one is served."""
    from distune.cluster.teachers import RemoteTeacher, start_teachers
    from distune.data.dataset import load_splits
    from distune.data.loader import collate
    from distune.signals import kd_positions
    from distune.methods import frozen_models
    from distune.signals.teachers import preflight
    from distune.models import load_model_config, load_tokenizer

    cfg = _distill(make_config, tiny_teacher, 2, signal="remote", top_k=16)
    tok = load_tokenizer(str(cfg.model.path))
    prep = preflight(frozen_models(cfg), tok, load_model_config(str(cfg.model.path)))["teacher"]
    actors = start_teachers(prep, use_gpu=False)
    # A 0-GPU actor sees no GPU at all (Ray leaves CUDA_VISIBLE_DEVICES unset for it, which shows them all).
    assert ray.get(actors[0].devices.remote()) == {"CUDA_VISIBLE_DEVICES": "", "gpus": 0, "weights": ["cpu"]}
    samples = load_splits(cfg.data, tok, 0).train
    batches = [collate(samples[4 * i:4 * i + 4], tok.pad_token_id) for i in range(4)]
    positions = [kd_positions(b, "response") for b in batches]
    sync = RemoteTeacher(actors, prep.vocab_size, prefetch=False)
    ahead = RemoteTeacher(actors, prep.vocab_size)
    for b in batches[:3]:
        ahead.prefetch(b)
        sync.prefetch(b)  # disabled: asks nothing
    assert len(ahead.pending) == 3 and not sync.pending
    got, want = ahead(batches[0], positions[0]), sync(batches[0], positions[0])
    assert got.prefetched and not want.prefetched
    assert torch.equal(got.topk_ids, want.topk_ids) and torch.equal(got.topk_logp, want.topk_logp)
    assert not ahead(batches[3], positions[3]).prefetched  # batch 1's place taken by an unannounced batch
    assert len(ahead.pending) == 2
    third = ahead(batches[2], positions[2])
    assert third.prefetched and not ahead.pending  # the stale batch 1 went with it
    assert torch.equal(third.topk_logp, sync(batches[2], positions[2]).topk_logp)


def test_zero_gpu_shard_task_sees_no_gpu(ray_cluster):
    """A cache-teacher / generate / eval shard without GPUs cannot put a model on a GPU a training rank uses."""
    from distune.cluster.tasks import run_shards

    def visible(index, count):  # nested: Ray ships it by value
        import os

        return os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count()

    assert run_shards(visible, (), 2, use_gpu=False, cpus=1, show_progress=False) == [("", 0), ("", 0)]


@pytest.mark.parametrize("stage, signal", [(3, {}), pytest.param(2, {"signal": "remote", "top_k": 16},
                                                                   marks=pytest.mark.slow)],
                         ids=["online-zero3", "remote-zero2"])
def test_gkd_on_policy(ray_cluster, make_config, tiny_teacher, stage, signal):
    """The student's own samples scored by the teacher: colocated (ZeRO-3), or on its Ray actor (top-k)."""
    cfg = _distill(make_config, tiny_teacher, stage, name=f"gkd{stage}", divergence="jsd",
                   divergence_params={"beta": 0.5}, gkd={"lmbda": 0.5, "max_new_tokens": 6}, **signal)
    fit(cfg, str(cfg.model.path), show_progress=False)
    res = _results(cfg)
    assert res["step"] == 6 and "eval/loss" in res["after"]
    rows = _history(cfg)
    share = sum(r["train/on_policy"] for r in rows) / len(rows)
    assert 0 < share < 1  # some batches were the student's own samples, some the data's
    for key in ("train/kd", "train/teacher_entropy", "train/top1_agreement", "train/loss"):
        assert key in rows[0]
    if not signal:  # the online teacher is scored on the same held-out set
        assert res["teacher"]["eval/loss"] > 0


@pytest.mark.slow  # 32 s; the layer map and projection are unit-tested in tests/unit/test_distill.py
def test_hidden_states_full_student_from_teacher_layers(ray_cluster, make_config, tiny_teacher):
    cfg = _distill(make_config, tiny_teacher, 2, name="hidden", student={"name": "full"},
                   hidden={"weight": 1.0, "layers": {1: 2, 2: 4}})
    cfg.model.path, cfg.model.layers = str(tiny_teacher), [0, 3]  # student = teacher blocks 0 and 3
    cfg.train.lr = 1e-3
    fit(cfg, str(tiny_teacher), show_progress=False)
    rows = _history(cfg)
    assert rows[-1]["train/hidden_cosine"] < rows[0]["train/hidden_cosine"]
    export = cfg.run_dir / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    weights = load_file(export / "model.safetensors")
    assert not any("distill" in k for k in weights)  # the projection is training-only
    assert "model.layers.1.self_attn.q_proj.weight" in weights and "model.layers.2.mlp.up_proj.weight" not in weights


def test_cross_architecture_llm_teacher_to_encoder_classifier(ray_cluster, make_config, tiny_teacher, tiny_encoder,
                                                            tmp_path, capsys):
    """The LLM teacher's class probabilities (its verbalizer scores of each label) into a BERT classifier
    with another tokenizer: the cache carries class distributions, never token ids."""
    from transformers import AutoModelForSequenceClassification

    cfg = make_config(run={"name": "cross"}, model={"path": str(tiny_encoder), "task": "sequence_classification"},
                      method={"name": "distill", "student": {"name": "full"}, "signal": "cached",
                              "cache_dir": str(tmp_path / "classes"), "kd_weight": 1.0, "temperature": 2.0,
                              "teacher": {"path": str(tiny_teacher), "dtype": "fp32"}},
                      deepspeed={"stage": 2}, cluster={"num_workers": 2}, train={"max_steps": 6, "lr": 5e-3},
                      eval={"before_training": True}, wandb={"mode": "offline"})
    path = tmp_path / "cross.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    online = yaml.safe_load(path.read_text())
    online["method"]["signal"] = "online"
    (tmp_path / "online.yaml").write_text(yaml.safe_dump(online))
    assert cli_main(["validate", str(tmp_path / "online.yaml")]) == 2  # classes come from the cache only
    assert "set signal: cached" in capsys.readouterr().err

    assert cli_main(["cache-teacher", str(path)]) == 0
    captured = capsys.readouterr()
    assert "class probabilities over ['negative', 'positive']" in captured.out
    total = json.loads((tmp_path / "classes" / "meta.json").read_text())["samples"]
    assert f"{total}/{total}" in captured.err and "sample" in captured.err
    fit(cfg, str(tiny_encoder), show_progress=False)
    res = _results(cfg)
    assert res["step"] == 6 and "eval/accuracy" in res["after"]
    rows = _history(cfg)
    assert rows[-1]["train/kd"] < rows[0]["train/kd"]
    student = AutoModelForSequenceClassification.from_pretrained(cfg.run_dir / "export")
    assert student.config.id2label == {0: "negative", 1: "positive"}


@pytest.mark.slow  # 40 s; the remote teacher is in the default run through test_remote_teacher_actor_group
def test_packed_rows_with_a_remote_teacher_under_zero3(ray_cluster, make_config, tiny_teacher, tiny_data, tmp_path):
    """Packing end to end: parquet data, position ids crossing to the teacher's actor, a ZeRO-3 student."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distune.validate import validate

    rows = [json.loads(line) for line in tiny_data.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    cfg = _distill(make_config, tiny_teacher, 3, name="packed", signal="remote", top_k=16)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={
        "path": str(tmp_path / "d.parquet"), "packing": True, "max_length": 96})})
    summary = validate(cfg)
    assert summary["packed_rows"] < summary["train_rows"] / 2 and summary["pack_fill"] > 0.8
    fit(cfg, str(cfg.model.path), show_progress=False)
    assert _results(cfg)["step"] == 6
    rows = _history(cfg)
    assert rows[-1]["train/kd"] < 0.95 * rows[0]["train/kd"]
    # Several samples per row: more trained tokens per step than the unpacked runs' micro-batches hold.
    assert rows[0]["train/trained_tokens"] > 2 * cfg.train.global_batch_size
