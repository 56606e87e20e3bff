"""`cluster.num_workers: auto`: a worker per GPU where the job runs, 2 on CPUs, the micro-batch fitted to them."""

import pytest

import tiny
from distune.config import load_config, resolve_for_hardware
from distune.hardware import Facts


def config(tiny_model, tiny_data, tmp_path, global_batch, micro, use_gpu):
    raw = tiny.base_config(tiny_model, tiny_data, tmp_path / "runs", cluster={"num_workers": "auto", "use_gpu": use_gpu},
                           train={"global_batch_size": global_batch, "micro_batch_size": micro})
    return load_config(raw, resolve=False)


def test_two_workers_on_cpus(tiny_model, tiny_data, tmp_path):
    cfg = config(tiny_model, tiny_data, tmp_path, 24, 12, False)
    resolve_for_hardware(cfg)
    assert (cfg.cluster.num_workers, cfg.train.micro_batch_size, cfg.grad_accum_steps()) == (2, 12, 1)


@pytest.mark.parametrize("gpus, global_batch, micro, expected", [
    (1, 24, 12, (1, 12, 2)),
    (8, 24, 12, (8, 3, 1)),   # 24 rows over 8 GPUs: 3 each
    (8, 32, 3, (8, 2, 2)),    # 3 x 8 does not divide 32: the largest micro-batch that does
    (8, 4, 2, (4, 1, 1)),     # fewer rows than GPUs: a worker per row
])
def test_a_worker_per_gpu_with_the_micro_batch_fitted(tiny_model, tiny_data, tmp_path, gpus, global_batch, micro,
                                                      expected):
    cfg = config(tiny_model, tiny_data, tmp_path, global_batch, micro, "auto")
    resolve_for_hardware(cfg, Facts(known=False), gpu=True, gpus=gpus)
    assert (cfg.cluster.num_workers, cfg.train.micro_batch_size, cfg.grad_accum_steps()) == expected


def test_a_fixed_count_is_kept(tiny_model, tiny_data, tmp_path):
    raw = tiny.base_config(tiny_model, tiny_data, tmp_path / "runs", cluster={"num_workers": 3, "use_gpu": False},
                           train={"global_batch_size": 6, "micro_batch_size": 2})
    assert load_config(raw).cluster.num_workers == 3


def test_bad_values_name_the_key(tiny_model, tiny_data, tmp_path):
    from distune.config import ConfigError

    raw = tiny.base_config(tiny_model, tiny_data, tmp_path / "runs", cluster={"num_workers": "many"})
    with pytest.raises(ConfigError, match="cluster.num_workers"):
        load_config(raw)
