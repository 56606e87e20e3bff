"""`distune k8s render`: the config travels in a ConfigMap that round-trips through load_config, the RayJob is
fitted to it (name, namespace, image, worker pods, GPUs), errors are one line with exit code 2, and no secret
reaches the output."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from k8s_checks import needs_kubectl, schema_errors

from distune.cli import main
from distune.k8s import K8sError, pod_templates, render
from distune.config import dump_config, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TEACHER, STUDENT = CONFIGS / "sentiment-teacher.yaml", CONFIGS / "sentiment-distill.yaml"
PLANTED = "sk-planted-0c7e55d1a9f24b6e"
IMAGE = "registry.example/distune:0.1.0"


def split(text: str) -> tuple[dict, dict]:
    config_map, *objects = yaml.safe_load_all(text)
    (job,) = [o for o in objects if o["kind"] == "RayJob"]
    return config_map, job


def worker_group(job: dict) -> dict:
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    return group


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["k8s", "render", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def smoke() -> tuple[str, list]:
    """The sentiment teacher on the CPU overlay, rendered with a planted W&B key in the environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_API_KEY", PLANTED)
        return render(str(TEACHER), overlay="cpu-smoke", image=IMAGE, name="smoke", namespace="ml")


@needs_kubectl
def test_the_config_map_round_trips_through_load_config(smoke, tmp_path):
    config_map, job = split(smoke[0])
    assert config_map["metadata"] == {"name": "smoke-config", "namespace": "ml",
                                      "labels": {"app.kubernetes.io/part-of": "distune"}}
    (tmp_path / "config.yaml").write_text(config_map["data"]["config.yaml"])
    assert yaml.safe_load(config_map["data"]["config.yaml"])["model"]["dtype"] == "auto"  # the pods resolve it
    expected = dump_config(load_config(TEACHER))
    # The documented changes: output on the shared mount, and "auto" decided by the worker pods (no GPU here).
    expected["run"]["output_dir"], expected["cluster"]["use_gpu"] = "/runs", False
    assert dump_config(load_config(tmp_path / "config.yaml")) == expected
    assert smoke[1] == []  # no path of this machine left in the config, nothing else to say


@needs_kubectl
def test_the_job_is_fitted_to_name_namespace_image_and_config(smoke):
    config_map, job = split(smoke[0])
    assert job["metadata"]["name"] == "smoke" and job["metadata"]["namespace"] == "ml"
    head = pod_templates(job)["head"]["spec"]
    (config_volume,) = [v for v in head["volumes"] if "configMap" in v]
    assert config_volume["configMap"]["name"] == "smoke-config"
    images = {c["image"] for t in pod_templates(job).values() for c in t["spec"]["containers"]}
    assert images == {IMAGE}
    assert worker_group(job)["replicas"] == 1  # 2 Ray workers x 1 CPU fit one 2-CPU pod
    for obj in yaml.safe_load_all(smoke[0]):
        assert schema_errors(obj) == []


@needs_kubectl
def test_a_planted_key_never_reaches_the_output(smoke):
    assert PLANTED not in smoke[0]
    assert "secretKeyRef" in smoke[0]


@needs_kubectl
def test_a_key_in_cluster_env_is_refused_pointing_to_the_secret(capsys, monkeypatch):
    code, out, err = cli(capsys, TEACHER, f"cluster.env.WANDB_API_KEY={PLANTED}")
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert "cluster.env: WANDB_API_KEY looks like a secret" in err and "Secret" in err
    monkeypatch.setenv("WANDB_API_KEY", PLANTED)  # the same value under a harmless name is caught as well
    code, out, err = cli(capsys, TEACHER, f"cluster.env.WB_LOGIN={PLANTED}")
    assert code == 2 and out == "" and "$WANDB_API_KEY" in err
    assert PLANTED not in err


@needs_kubectl
def test_an_unknown_key_is_one_line_and_exit_code_2(capsys):
    code, out, err = cli(capsys, TEACHER, "train.learning_rate=1e-4")
    assert code == 2 and out == ""
    assert err.splitlines() == [f"error: {TEACHER}: train.learning_rate: unknown key; did you mean 'train.lr'? "
                                f"valid keys here: " + err.split("valid keys here: ")[1].strip()]
    assert "Traceback" not in err


@needs_kubectl
def test_an_earlier_stage_export_moves_with_the_output_dir():
    text, notes = render(str(STUDENT), overlay="cpu-smoke")
    config_map, job = split(text)
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert config["method"]["teacher"]["path"] == "/runs/sentiment-teacher/export"
    assert job["metadata"]["name"] == "distune-sentiment-distill" and notes == []


@needs_kubectl
def test_workers_sets_the_worker_pods(capsys, tmp_path):
    out_file = tmp_path / "job.yaml"
    code, out, err = cli(capsys, TEACHER, "--workers", 3, "--out", out_file)
    assert code == 0 and out == ""
    group = worker_group(split(out_file.read_text())[1])
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 3
    assert "2 of the 3 worker pods stay idle" in err


@needs_kubectl
def test_the_gpu_overlay_requests_gpus_and_counts_pods():
    sixteen = ["cluster.num_workers=16", "train.global_batch_size=192"]
    text, _ = render(str(TEACHER), sixteen, overlay="gpu-multinode")
    config_map, job = split(text)
    assert yaml.safe_load(config_map["data"]["config.yaml"])["cluster"]["use_gpu"] is True
    group = worker_group(job)
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == 8 and group["replicas"] == 2  # 16 Ray workers, one GPU each
    assert all(schema_errors(obj) == [] for obj in yaml.safe_load_all(text))
    with pytest.raises(K8sError, match="--workers 1: cluster.num_workers=16 needs 2 worker pods of 64 CPUs"):
        render(str(TEACHER), sixteen, overlay="gpu-multinode", workers=1)


@needs_kubectl
def test_gpu_settings_that_contradict_the_overlay_are_refused(capsys):
    code, _, err = cli(capsys, TEACHER, "cluster.use_gpu=true")
    assert code == 2 and "cluster.use_gpu: true, but the worker pods of overlay cpu-smoke" in err
    code, _, err = cli(capsys, TEACHER, "--name", "Smoke_1")
    assert code == 2 and err.startswith("error: --name 'Smoke_1': a RayJob name must be a DNS-1035 label")


@needs_kubectl
def test_files_are_checked_only_when_asked(capsys):
    code, out, err = cli(capsys, TEACHER, "model.path=/nonexistent/model")
    assert code == 0 and "warning: model.path=/nonexistent/model is a path on this machine" in err
    code, out, err = cli(capsys, TEACHER, "model.path=/nonexistent/model", "--check-files")
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("error: model.path: ") and "/nonexistent/model does not exist" in err


def test_without_kubectl_the_error_says_it_is_needed(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    code, out, err = cli(capsys, TEACHER)
    assert code == 2 and out == ""
    assert err == ("error: distune k8s render needs kubectl on PATH: it renders the overlay with `kubectl "
                   "kustomize` (no cluster is contacted)\n")
