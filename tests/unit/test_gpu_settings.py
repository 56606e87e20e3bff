"""Settings for GPU workers decided from the resolved config: offloaded ZeRO state in pinned host memory, stepped by
DeepSpeed's CPU Adam; TF32 where the GPU has it. On CPU workers none of them applies."""

import pytest
import torch

from distune.engine.ds_config import build_ds_config
from distune.engine.runtime import build_optimizer, use_tf32


@pytest.mark.parametrize("gpu", [True, False])
def test_offload_pins_host_memory_for_gpu_workers_only(make_config, gpu):
    cfg = make_config(deepspeed={"stage": 3, "offload_optimizer": True, "offload_param": True},
                      cluster={"use_gpu": gpu})
    zero = build_ds_config(cfg, 1)["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": gpu}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": gpu}


@pytest.mark.slow  # compiles DeepSpeed's cpu_adam op (minutes on 2 cores)
def test_cpu_adam_steps_as_torch_adamw(make_config):
    """The offloaded optimizer of a GPU run (DeepSpeedCPUAdam, built here for the CPU) takes the step torch's AdamW
    takes, per parameter group (weight decay on matrices only)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    cfg = make_config(train={"weight_decay": 0.1, "lr": 1e-2})
    steps = {}
    for cpu_adam in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
        optimizer, _ = build_optimizer(model, cfg.train, 10, cpu_adam=cpu_adam)
        assert isinstance(optimizer, DeepSpeedCPUAdam) == cpu_adam
        for _ in range(3):
            model(torch.ones(2, 8)).pow(2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        steps[cpu_adam] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(steps[False], steps[True]):
        # Its fused update rounds differently (~3e-6 here); a missing weight decay would be off by ~1e-3.
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_no_tf32_without_a_gpu_that_has_it():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: tests/gpu checks TF32 there")
    assert use_tf32(True) is False
    assert not torch.backends.cuda.matmul.allow_tf32
