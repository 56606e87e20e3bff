"""QLoRA: CPU machines get a clear error before any worker starts; where CUDA and bitsandbytes are present,
a real 4-bit run trains and exports (the per-rank program, no Ray: GPU machines here may lack it)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

import tiny
from distune.config import ConfigError
from distune.validate import validate

HAS_QLORA = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantization_without_cuda_is_refused_before_any_worker(make_config, bits):
    cfg = make_config(model={"quantization": bits}, method={"name": "lora"})
    with pytest.raises(ConfigError, match=rf"model.quantization: {bits} \(QLoRA\) .*needs CUDA GPUs"):
        validate(cfg)


@pytest.mark.skipif(not HAS_QLORA, reason="QLoRA needs a CUDA GPU and bitsandbytes")
@pytest.mark.parametrize(("method", "stage", "match"), [("full", 2, "cannot be trained in full"),
                                                         ("lora", 3, "ZeRO-3 would partition")])
def test_quantization_refuses_what_it_cannot_train(make_config, method, stage, match):
    cfg = make_config(model={"quantization": "4bit"}, method={"name": method}, deepspeed={"stage": stage},
                      cluster={"use_gpu": True})
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


@pytest.mark.skipif(not HAS_QLORA, reason="QLoRA needs a CUDA GPU and bitsandbytes")
def test_qlora_4bit_trains_and_exports_on_gpu(tmp_path, tiny_model, tiny_data):
    cfg = tiny.base_config(tiny_model, tiny_data, tmp_path / "runs", method={"name": "lora", "r": 8},
                           model={"path": str(tiny_model), "quantization": "4bit", "dtype": "bf16"},
                           deepspeed={"stage": 2}, cluster={"num_workers": 1, "use_gpu": True},
                           train={"max_steps": 6, "lr": 3e-2}, eval={"before_training": True})
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    done = subprocess.run([sys.executable, "-m", "distune.worker", str(cfg_file)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "runs" / "t" / "results.json").read_text())
    assert results["after"]["eval/loss"] < results["before"]["eval/loss"]
    adapter = json.loads((tmp_path / "runs" / "t" / "export" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"
