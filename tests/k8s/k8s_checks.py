"""Offline validation of rendered manifests, no cluster: core objects against kubernetes-validate's bundled schemas
(strict: unknown fields fail), KubeRay's RayJob against the real CRD schema vendored in schemas/ (made strict the
way the API server's field validation treats unknown fields), and each pod template inside the RayJob as a core
PodTemplate. Not checked: the CRD's CEL rules (x-kubernetes-validations) and that KubeRay schedules the job."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest

from distune.k8s import kustomize, pod_templates

K8S_VERSION = "1.32.0"  # the kubectl client on these machines
K8S = Path(__file__).resolve().parents[2] / "k8s"
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None,
                                   reason="kubectl is not installed (it renders the kustomize trees)")


def render_folder(folder: str) -> list[dict]:
    return kustomize(K8S / folder)


def strict(schema):
    """additionalProperties: false wherever the CRD lists properties and does not keep unknown fields: what
    `kubectl apply` (server-side field validation, Strict) does with a misspelled field."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def rayjob_validator():
    from jsonschema import Draft7Validator

    schema = json.loads((Path(__file__).parent / "schemas" / "ray.io_rayjobs.v1.json").read_text())
    return Draft7Validator(strict(schema))


def schema_errors(obj: dict) -> list[str]:
    """Every schema problem of one rendered object, as 'path: message' lines."""
    import kubernetes_validate

    if obj.get("apiVersion") == "ray.io/v1" and obj.get("kind") == "RayJob":
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in rayjob_validator().iter_errors(obj)]
        for role, template in pod_templates(obj).items():
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
            errors += _core_errors(wrapped, f"{role} pod template", kubernetes_validate)
        return errors
    return _core_errors(obj, obj.get("kind"), kubernetes_validate)


def _core_errors(obj: dict, what: str, kubernetes_validate) -> list[str]:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{what}: {'/'.join(map(str, e.path))}: {e.message}"]
    return []


def ray_pods(job: dict) -> dict[str, dict]:
    """The pod specs that run Ray (head, workers): the submitter only runs `ray job submit`."""
    return {role: t["spec"] for role, t in pod_templates(job).items() if role != "submitter"}


def effective_security(pod: dict, container: dict) -> dict:
    """A container's security settings: its own, falling back to the pod's (as the kubelet applies them)."""
    return {**(pod.get("securityContext") or {}), **(container.get("securityContext") or {})}


def gib(quantity: str) -> float:
    units = {"Mi": 1 / 1024, "Gi": 1, "Ti": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]
