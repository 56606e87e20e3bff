"""`distune plan`: parameter counts from the meta device match real models; ZeRO / offload / teacher arithmetic."""

import json
import re

import pytest
import yaml
from transformers import AutoModelForCausalLM

import tiny
from distune.methods import build_method
from distune.methods.lora import lora_formula
from distune.plan import _meta_model, count_params, estimate, verdict


@pytest.fixture(scope="session")
def teacher_model(tmp_path_factory):
    return tiny.build_model_dir(tmp_path_factory.mktemp("teacher") / "model", hidden=96, layers=4)


def _distill(teacher_model) -> dict:
    return {"name": "distill", "student": {"name": "lora", "r": 4},
            "teacher": {"path": str(teacher_model), "dtype": "fp32"}}


def _real_counts(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters()) - trainable


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "full", "freeze_embeddings": True},
                                    {"name": "lora", "r": 4}])
def test_counts_match_the_real_model(make_config, tiny_model, method):
    cfg = make_config(method=method)
    counts = count_params(cfg, str(tiny_model))
    options = {k: v for k, v in method.items() if k != "name"}
    real = build_method(method["name"], options).adapt(AutoModelForCausalLM.from_pretrained(tiny_model))
    assert (counts["trainable"], counts["frozen"]) == _real_counts(real)
    assert counts["trainable"] > 0


def test_counts_respect_model_layers(make_config, tiny_model):
    counts = count_params(make_config(model={"layers": [1]}), str(tiny_model))
    real = AutoModelForCausalLM.from_pretrained(tiny_model)
    per_block = sum(p.numel() for p in real.model.layers[0].parameters())
    assert counts["layers"] == 1 and counts["trainable"] == sum(p.numel() for p in real.parameters()) - per_block


@pytest.mark.parametrize("options", [{"r": 4}, {"r": 2, "target_modules": ["q_proj", "v_proj"], "use_dora": True}])
def test_lora_fallback_formula_matches_peft(tiny_model, options):
    method = build_method("lora", options)
    real = method.adapt(AutoModelForCausalLM.from_pretrained(tiny_model))
    trainable, everything = lora_formula(_meta_model(str(tiny_model), False), method)
    assert (trainable, everything) == _real_counts(real)  # LoRA freezes every base weight


def test_lora_that_cannot_adapt_on_meta_falls_back_to_the_formula(make_config, tiny_model, monkeypatch):
    from distune.methods import get_method

    real = build_method("lora", {"r": 4}).adapt(AutoModelForCausalLM.from_pretrained(tiny_model))

    def needs_real_tensors(self, model):
        raise NotImplementedError("Cannot copy out of meta tensor")

    monkeypatch.setattr(get_method("lora"), "adapt", needs_real_tensors)
    counts = count_params(make_config(method={"name": "lora", "r": 4}), str(tiny_model))
    assert (counts["trainable"], counts["frozen"]) == _real_counts(real)


def test_zero_stages_shard_by_num_workers(make_config, tiny_model):
    cfg = make_config(cluster={"num_workers": 4}, model={"dtype": "bf16"})
    counts = count_params(cfg, str(tiny_model))
    stages = estimate(cfg, {}, counts)["stages"]
    pt = counts["trainable"]
    assert stages[3]["weights"] == round(stages[0]["weights"] / 4)
    assert stages[0]["grads"] == 2 * pt and stages[2]["grads"] == round(2 * pt / 4)
    assert stages[0]["optimizer"] == 12 * pt and stages[1]["optimizer"] == round(12 * pt / 4)  # fp32 master + m + v
    assert stages[1]["step"] == round((4 + 8) * pt / 4)  # fp32 gradient partition + Adam's temporaries (CPU)
    totals = [stages[s]["total"]["device"] for s in range(4)]
    assert totals[0] > totals[1] > totals[2]
    # ZeRO-3 keeps up to stage3_max_live_parameters gathered (distune's default 1e8: all of a small model), and
    # never less than the module it computes (the embedding / output matrix); bounded, it is the smallest stage.
    bounded = make_config(cluster={"num_workers": 4}, model={"dtype": "bf16"},
                          deepspeed={"stage": 3, "extra": {"zero_optimization": {"stage3_max_live_parameters": 1000}}})
    largest = counts["vocab"] * counts["hidden"]
    assert largest > 1000 and estimate(bounded, {}, counts)["stages"][3]["buffers"] == 2 * largest
    assert estimate(bounded, {}, counts)["stages"][3]["total"]["device"] < totals[2]


def test_the_peak_is_the_larger_of_backward_and_step(make_config, tiny_model):
    """One fp32 rank at ZeRO-2, the case bench/perf.py --memory measures: weights + master + Adam throughout, then
    either the backward (activations, gradients, the reduction bucket) or the step (fp32 gradients + temporaries)."""
    cfg = make_config(deepspeed={"stage": 2})
    counts = count_params(cfg, str(tiny_model))
    pt, psi = counts["trainable"], counts["trainable"] + counts["frozen"]
    row = estimate(cfg, {}, counts)["stages"][2]
    assert row["optimizer"] == 12 * pt  # DeepSpeed clones an fp32 master even of fp32 weights
    assert row["buffers"] == 4 * pt  # CPU pages only what the gradients fill of the 5e8-element bucket
    backward, step = row["activations"] + row["grads"] + row["buffers"], row["step"]
    assert row["total"]["device"] == pytest.approx(4 * psi + 12 * pt + max(backward, step), abs=2)
    assert row["combined"]["device"] == row["total"]["device"]  # nothing offloaded
    gpu = estimate(cfg, {}, counts, gpu=True)["stages"][2]
    assert gpu["buffers"] == 4 * 5e8  # torch.empty(reduce_bucket_size): a GPU allocates all of it
    assert gpu["step"] == 8 * pt  # foreach AdamW: one temporary, not two
    small = make_config(deepspeed={"stage": 2, "extra": {"zero_optimization": {"reduce_bucket_size": 1000}}})
    assert estimate(small, {}, counts, gpu=True)["stages"][2]["buffers"] == 4 * 1000


def test_offload_moves_bytes_from_device_to_host(make_config, tiny_model):
    plain = make_config(deepspeed={"stage": 3})
    counts = count_params(plain, str(tiny_model))
    before = estimate(plain, {}, counts)["stages"][3]
    after = estimate(make_config(deepspeed={"stage": 3, "offload_optimizer": True}), {}, counts)["stages"][3]
    # Master, Adam state, the step's fp32 gradients and ZeRO-3's gradient partition go to host memory.
    assert after["optimizer"] == 0 and after["host"] == before["optimizer"] + before["step"] + before["grads"] > 0
    assert after["total"]["device"] <= before["total"]["device"] - before["optimizer"] - before["grads"]
    assert after["combined"] == before["combined"]  # one RAM: where the bytes sit does not change the sum
    both = estimate(make_config(deepspeed={"stage": 3, "offload_optimizer": True, "offload_param": True}), {},
                    counts)["stages"][3]
    assert both["weights"] == 0 and both["host"] == after["host"] + before["weights"]
    two = estimate(make_config(deepspeed={"stage": 2, "offload_optimizer": True}), {}, counts)["stages"][2]
    assert two["host"] == before["optimizer"] + before["step"] + 4 * counts["trainable"]  # + the staging copy


def test_gradient_checkpointing_shrinks_activations(make_config, tiny_model):
    counts = count_params(make_config(), str(tiny_model))
    plain = estimate(make_config(), {}, counts)["stages"][0]["activations"]
    ckpt = estimate(make_config(model={"gradient_checkpointing": True}), {}, counts)["stages"][0]["activations"]
    assert 0 < ckpt < plain


def test_distill_teacher_placements(make_config, tiny_model, teacher_model):
    from distune.validate import validate

    cfg = make_config(method=_distill(teacher_model), cluster={"num_workers": 2})
    summary = validate(cfg)
    counts = count_params(cfg, summary["model_source"])
    assert counts["teacher"]["params"] == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(
        teacher_model).parameters())
    real = build_method("lora", {"r": 4}).adapt(AutoModelForCausalLM.from_pretrained(tiny_model))
    assert (counts["trainable"], counts["frozen"]) == _real_counts(real)
    plan = estimate(cfg, summary, counts)
    for stage, row in plan["stages"].items():
        assert row["teacher_colocated"] > 0
        assert row["total"]["cached"] == row["total"]["remote"] >= row["weights"] + row["optimizer"]
        assert row["total"]["colocated"] == pytest.approx(row["total"]["cached"] + row["teacher_colocated"], abs=2)
    teacher_weights = 4 * counts["teacher"]["params"]
    # auto: replicated below stage 3; at stage 3 half the weights a rank, plus what its forward gathers (all of a
    # teacher under distune's 1e8 max live parameters).
    assert plan["stages"][3]["teacher_colocated"] - plan["stages"][0]["teacher_colocated"] == teacher_weights // 2
    t = plan["teacher"]
    assert t["signal"] == "colocated" and t["cache_disk"] == round(t["trained_tokens"] * 64 * (2 + 2))
    assert t["remote_actor"] > teacher_weights
    assert t["partitioned"] == plan["stages"][3]["teacher_colocated"]
    assert t["replicated"] == plan["stages"][0]["teacher_colocated"]
    weights = 4 * (counts["trainable"] + counts["frozen"])
    assert plan["load"] == {"whole": weights, "partitioned": weights // 2}

    # A placement of its own: partitioned next to a ZeRO-2 student.
    spec = _distill(teacher_model)
    spec["teacher"] = dict(spec["teacher"], placement="partitioned")
    cfg = make_config(method=spec, cluster={"num_workers": 2})
    counts = count_params(cfg, summary["model_source"])
    plan = estimate(cfg, summary, counts)
    assert plan["stages"][2]["teacher_colocated"] == plan["stages"][3]["teacher_colocated"] == t["partitioned"]
    assert "teacher placement: recommended replicated" in verdict(plan, cfg, summary, counts, False)["text"]


def test_the_verdict_counts_what_shares_the_machine(make_config, tiny_model, monkeypatch):
    """CPU workers: every rank with its process, Ray's processes and the driver, against Ray's kill threshold less
    what other processes use; a GPU: the estimate plus the CUDA context and NCCL, against its memory."""
    import types

    import torch

    import distune.plan as plan_module
    from distune.scale import DRIVER, GPU_RUNTIME, RAY_NODE, WORKER_PROCESS

    cfg = make_config(cluster={"num_workers": 2})
    counts = count_params(cfg, str(tiny_model))
    plan = estimate(cfg, {}, counts)
    gib = 2**30
    monkeypatch.setattr(plan_module, "_meminfo", lambda: {"MemTotal": 24 * gib, "MemAvailable": 20 * gib})
    monkeypatch.setattr(plan_module, "_own_rss", lambda: gib)
    v = verdict(plan, cfg, {}, counts, False)
    combined = plan["stages"][cfg.deepspeed.stage]["combined"]["device"]
    assert v["need"] == pytest.approx(2 * (combined + WORKER_PROCESS) + RAY_NODE + DRIVER)
    assert v["limit"] == pytest.approx(0.95 * 24 * gib - 3 * gib)  # others: 4 GiB used now, 1 GiB of it is plan
    assert v["fits"] and not v["near"] and "Ray kills workers above 95%" in v["text"] and not v["advice"]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=2**20))
    v = verdict(estimate(cfg, {}, counts, gpu=True), cfg, {}, counts, True)
    assert "GPU 0 has 1.00 MiB" in v["text"] and "DOES NOT FIT" in v["text"] and v["need"] > GPU_RUNTIME


def test_a_run_that_does_not_fit_is_told_the_cheapest_settings_that_do(make_config, tiny_model, monkeypatch):
    """Long rows on a small machine: the verdict names settings that make room, cheapest first, each with its
    predicted peak under the limit (10 % kept free)."""
    import distune.plan as plan_module
    from distune.scale import DRIVER, RAY_NODE, WORKER_PROCESS

    cfg = make_config(cluster={"num_workers": 2}, data={"max_length": 16384},
                      train={"micro_batch_size": 16, "global_batch_size": 32})
    counts = count_params(cfg, str(tiny_model))
    plan = estimate(cfg, {}, counts)
    fixed = 2 * WORKER_PROCESS + RAY_NODE + DRIVER
    need = verdict(plan, cfg, {}, counts, False)["need"]
    # A machine where 60 % of this run's own memory fits in the limit's first 90 %.
    assert need - fixed > fixed / 3
    total = (fixed + 0.6 * (need - fixed)) / 0.9 / 0.95
    monkeypatch.setattr(plan_module, "_meminfo", lambda: {"MemTotal": total, "MemAvailable": total})
    monkeypatch.setattr(plan_module, "_own_rss", lambda: 0)
    v = verdict(plan, cfg, {}, counts, False)
    assert not v["fits"] and "DOES NOT FIT" in v["text"] and "to make room: " in v["text"]
    assert v["advice"] and all(p <= 0.9 * v["limit"] for _, p, _ in v["advice"])
    labels = [label for label, _, _ in v["advice"]]
    order = ["train.loss_chunk", "train.micro_batch_size", "model.gradient_checkpointing", "deepspeed.stage",
             "deepspeed.offload_optimizer"]
    ranks = [next(i for i, key in enumerate(order) if label.startswith(key)) for label in labels]
    assert ranks == sorted(ranks), labels  # cheapest first


def test_cli_prints_every_stage(tiny_model, tiny_data, teacher_model, tmp_path, capsys):
    from distune.cli import main

    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(tiny.base_config(tiny_model, tiny_data, tmp_path / "runs",
                                                    method=_distill(teacher_model))))
    out_json = tmp_path / "plan.json"
    assert main(["plan", str(path), "deepspeed.stage=2", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    for row in ["0", "1", "2\\*", "3"]:  # the configured stage is starred
        assert re.search(rf"^\s*{row}\s+\d", out, re.M), out
    assert "colocated*" in out and "cached" in out and "remote" in out and "CPU workers" in out
    assert set(json.loads(out_json.read_text())["stages"]) == {"0", "1", "2", "3"}


def test_show_samples_marks_trained_tokens_and_counts_truncation(make_config, tmp_path, capsys):
    from distune.cli import main as cli_main

    cfg = make_config(data={"prompt": "Sentiment: {text}", "response": "{label}", "max_length": 31,
                            "design": {"instruction": "Label the tweet.", "instruction_position": "last"}})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert cli_main(["plan", str(path), "--show-samples", "2"]) == 0
    out = capsys.readouterr().out
    samples = re.findall(r"--- sample \d \(data #\d+, (\d+) tokens, (\d+) trained «marked»( TRUNCATED)?\)\n(.*?)(?=\n---)",
                         out, re.S)
    assert len(samples) == 2
    for n_tokens, n_trained, cut, text in samples:
        marked = re.findall("«(.*?)»", text, re.S)
        assert len(marked) == 1 and "Sentiment:" not in marked[0]  # only the response trains
        assert text.index("Sentiment:") < text.index("Label the tweet.")  # instruction placed last
        assert bool(cut) == (int(n_tokens) >= 31)
    # Every tiny sample renders to 32 tokens: at 31 each loses its last token and says so.
    assert "--- 96 of 96 samples truncated at data.max_length=31" in out
    assert "warning: 96 samples are cut at data.max_length=31" in out


def test_logits_count_only_the_rows_a_loss_reads(make_config, tiny_model):
    cfg = make_config(train={"micro_batch_size": 2, "global_batch_size": 4}, data={"max_length": 64})
    counts = count_params(cfg, str(tiny_model))
    every = estimate(cfg, {"trained_token_fraction": 1.0}, counts)["stages"][0]["activations"]
    tenth = estimate(cfg, {"trained_token_fraction": 0.1}, counts)["stages"][0]["activations"]
    logits_every = 2 * 64 * counts["vocab"] * (4 + 4 + 4)  # fp32 run: head output, upcast, its gradient
    assert every - tenth == pytest.approx(0.9 * logits_every, abs=2)
    chunked = make_config(train={"micro_batch_size": 2, "global_batch_size": 4, "loss_chunk": 16},
                          data={"max_length": 64})
    assert every - estimate(chunked, {"trained_token_fraction": 1.0}, counts)["stages"][0]["activations"] == \
        pytest.approx((2 * 64 - 16) * counts["vocab"] * 12, abs=2)


def test_run_refuses_a_plan_that_does_not_fit_before_any_worker(tiny_model, tiny_data, tmp_path, capsys):
    """Rows of up to 32k tokens in micro-batches of 32 need far more than this machine has: `distune run` says so
    in one line, with what would make room, and starts nothing (no Ray, no run directory)."""
    from distune.cli import main

    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(tiny.base_config(
        tiny_model, tiny_data, tmp_path / "runs", cluster={"num_workers": 2}, data={"max_length": 32768},
        train={"micro_batch_size": 32, "global_batch_size": 64})))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: this run does not fit this machine (distune plan): it needs ")
    assert "--ignore-plan runs it anyway" in err[0]
    assert not (tmp_path / "runs").exists()
