"""k8s/: the kustomize trees render, every object passes the offline schemas, and the properties a run on a shared
cluster relies on hold in base and both overlays (memory-backed /dev/shm, non-root, W&B key from a Secret, the
shared /runs volume, an in-cluster-only dashboard, a fixed-size cluster that goes away after the job)."""

from __future__ import annotations

import copy
import shlex

import pytest
from k8s_checks import effective_security, gib, needs_kubectl, ray_pods, render_folder, schema_errors

from distune.k8s import pod_templates

pytestmark = needs_kubectl
FOLDERS = ["base", "overlays/cpu-smoke", "overlays/gpu-multinode"]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {folder: render_folder(folder) for folder in [*FOLDERS, "storage"]}


def the_job(objects: list[dict]) -> dict:
    (job,) = [o for o in objects if o["kind"] == "RayJob"]
    return job


@pytest.mark.parametrize("folder", [*FOLDERS, "storage"])
def test_every_object_passes_the_offline_schemas(rendered, folder):
    kinds = [o["kind"] for o in rendered[folder]]
    assert kinds == (["PersistentVolumeClaim"] if folder == "storage" else ["RayJob"])
    for obj in rendered[folder]:
        assert schema_errors(obj) == []


def test_the_schemas_are_not_vacuous(rendered):
    job = the_job(rendered["base"])
    misspelled = copy.deepcopy(job)
    misspelled["spec"]["rayClusterSpec"]["headGroupSpec"]["serviceTyp"] = "ClusterIP"
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    bad_pod = copy.deepcopy(job)
    bad_pod["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "x"
    assert "'serviceTyp' was unexpected" in " ".join(schema_errors(misspelled))
    assert "'two' is not of type 'integer'" in " ".join(schema_errors(wrong_type))
    assert any(e.startswith("head pod template") and "imagePullPolicyy" in e for e in schema_errors(bad_pod))


@pytest.mark.parametrize("folder", FOLDERS)
def test_shm_is_memory_backed_on_every_ray_pod(rendered, folder):
    for role, pod in ray_pods(the_job(rendered[folder])).items():
        ray_container = pod["containers"][0]
        (mount,) = [m for m in ray_container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["emptyDir"]["medium"] == "Memory", role
        # Ray's object store takes 30% of the memory limit, capped at /dev/shm's size from 10 GB up; a store
        # larger than /dev/shm moves to a slower /tmp.
        shm, memory = gib(volume["emptyDir"]["sizeLimit"]), gib(ray_container["resources"]["limits"]["memory"])
        assert shm >= 1e10 / 2**30 or shm > 0.3 * memory, role


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_container_runs_non_root_without_privileges(rendered, folder):
    job = the_job(rendered[folder])
    assert set(pod_templates(job)) == {"head", "worker group workers", "submitter"}
    for role, template in pod_templates(job).items():
        pod = template["spec"]
        for container in pod["containers"]:
            sec = effective_security(pod, container)
            assert sec["runAsNonRoot"] is True and sec["runAsUser"] == 1000, role
            assert sec["allowPrivilegeEscalation"] is False and not sec.get("privileged"), role
            assert sec["capabilities"]["drop"] == ["ALL"] and not sec["capabilities"].get("add"), role
            assert sec["seccompProfile"] == {"type": "RuntimeDefault"}, role
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), role
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), role


@pytest.mark.parametrize("folder", FOLDERS)
def test_wandb_key_comes_from_the_secret_and_runs_share_one_volume(rendered, folder):
    for role, pod in ray_pods(the_job(rendered[folder])).items():
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["WANDB_API_KEY"] == {"name": "WANDB_API_KEY", "valueFrom": {
            "secretKeyRef": {"name": "wandb", "key": "api-key", "optional": True}}}, role
        (runs,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/runs"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == runs["name"]]
        assert volume["persistentVolumeClaim"] == {"claimName": "distune-runs"}, role


def test_the_shared_volume_is_read_write_many(rendered):
    (pvc,) = rendered["storage"]
    assert pvc["metadata"]["name"] == "distune-runs"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("folder", FOLDERS)
def test_the_job_joins_its_cluster_and_cleans_up(rendered, folder):
    job = the_job(rendered[folder])
    spec, cluster = job["spec"], job["spec"]["rayClusterSpec"]
    words = shlex.split(spec["entrypoint"])
    assert words[:3] == ["distune", "run", "/config/config.yaml"] and "run.output_dir=/runs" in words
    assert words[words.index("--address") + 1] == "auto"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1
    # The dashboard stays inside the cluster: a ClusterIP service, no ingress, no NodePort / LoadBalancer.
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert not cluster["headGroupSpec"].get("enableIngress")
    assert "LoadBalancer" not in str(job) and "NodePort" not in str(job)
    # KubeRay refuses a worker group without min/max replicas when autoscaling is off.
    assert cluster["enableInTreeAutoscaling"] is False
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"]


def test_overlays_size_cpu_and_gpu_workers(rendered):
    cpu, gpu = (the_job(rendered[f"overlays/{o}"]) for o in ("cpu-smoke", "gpu-multinode"))
    (cpu_group,), (gpu_group,) = cpu["spec"]["rayClusterSpec"]["workerGroupSpecs"], \
        gpu["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert cpu_group["replicas"] == 1 and "cluster.use_gpu=false" in cpu["spec"]["entrypoint"]
    assert "nvidia.com/gpu" not in str(cpu)
    gpu_container = gpu_group["template"]["spec"]["containers"][0]
    assert int(gpu_container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert gpu_group["replicas"] >= 2 and "cluster.use_gpu=true" in gpu["spec"]["entrypoint"]
    env = {e["name"]: e.get("value") for e in gpu_container["env"]}
    assert env["NCCL_DEBUG"] == "WARN" and env["NCCL_SOCKET_IFNAME"]
