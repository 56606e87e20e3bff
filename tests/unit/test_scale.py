"""`distune plan --gpu --nodes --gpus-per-node`: a cluster that is not here, on paper: per-rank GPU memory with what
shares the GPU, host RAM per node at load and checkpoint, checkpoint size, communication per rank and step."""

import json

import pytest
import yaml

import tiny
from distune.plan import count_params, estimate
from distune.scale import (GPU_MIB, GPU_RUNTIME, RAY_NODE, WORKER_PROCESS, checkpoint_bytes, cluster_plan,
                           communication)


@pytest.mark.parametrize("stage, gc, hpz", [(0, False, 1), (2, False, 1), (3, False, 1), (3, True, 1), (3, False, 4)])
def test_communication_per_rank_and_step(make_config, tiny_model, stage, gc, hpz):
    extra = {"zero_optimization": {"zero_hpz_partition_size": hpz}} if hpz > 1 else {}
    cfg = make_config(model={"dtype": "bf16", "gradient_checkpointing": gc}, deepspeed={"stage": stage, "extra": extra})
    counts = count_params(cfg, str(tiny_model))
    pt, everything, ring = counts["trainable"], counts["trainable"] + counts["frozen"], 15 / 16
    comm = communication(cfg, counts, 16)
    if stage == 0:
        assert comm == {"all_reduce": round(2 * 2 * pt * ring)}
    elif stage == 2:
        assert comm == {"reduce_scatter": round(2 * pt * ring), "all_gather": round(2 * pt * ring)}
    elif hpz > 1:  # the backward's gathers stay in the node
        assert comm["all_gather"] == round(2 * everything * ring)
        assert comm["all_gather_in_node"] == round(2 * everything * 3 / 4)
    else:
        assert comm["all_gather"] == round((3 if gc else 2) * 2 * everything * ring)
        assert comm["reduce_scatter"] == round(2 * pt * ring)


def test_a_cluster_plan_counts_every_rank_of_a_node(make_config, tiny_model):
    cfg = make_config(model={"dtype": "bf16"}, deepspeed={"stage": 3})
    counts = count_params(cfg, str(tiny_model))
    cp = cluster_plan(cfg, {}, counts, "h100", nodes=2, gpus_per_node=4)
    sized = make_config(model={"dtype": "bf16"}, deepspeed={"stage": 3}, cluster={"num_workers": 8})
    per_rank = estimate(sized, {}, counts, gpu=True)
    assert cp["num_workers"] == 8 and cp["plan"]["num_workers"] == 8
    assert cp["gpu_need"] == per_rank["stages"][3]["total"]["device"] + GPU_RUNTIME
    assert cp["gpu_memory"] == GPU_MIB["h100"] * 2**20 and cp["fits"] and not cp["advice"]
    # Stage 3 loads partitioned: each of a node's 4 ranks holds 1/8 of the model, plus its process and Ray's.
    assert cp["host_per_node"]["load"] == pytest.approx(4 * (per_rank["load"]["partitioned"] + WORKER_PROCESS)
                                                        + RAY_NODE, abs=4)
    pt, everything = counts["trainable"], counts["trainable"] + counts["frozen"]
    assert cp["checkpoint_bytes"] == checkpoint_bytes(cfg, counts) == 2 * everything + 12 * pt


def test_the_command_plans_a_cluster_that_is_not_here(tiny_model, tiny_data, tmp_path, capsys):
    """No GPU on this machine: `use_gpu: true` is the cluster's, not refused here."""
    from distune.cli import main

    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(tiny.base_config(tiny_model, tiny_data, tmp_path / "runs",
                                                    deepspeed={"stage": 3}, cluster={"use_gpu": True})))
    out_json = tmp_path / "cluster.json"
    assert main(["plan", str(path), "--gpu", "a100-40", "--nodes", "2", "--gpus-per-node", "4",
                 "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "cluster: 2 node(s) x 4 A100-40 = 8 ranks, stage 3" in out and "host RAM per node" in out
    assert json.loads(out_json.read_text())["communication"]["all_gather"] > 0
