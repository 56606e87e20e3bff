"""`distune k8s render`: a run config as Kubernetes objects for KubeRay.

Owns: rendering a k8s/ overlay with `kubectl kustomize`, fitting its RayJob to the config (name, namespace,
image, worker pods, GPU or CPU), the config as the pods see it (a ConfigMap; output under the shared /runs
mount), and keeping secrets out of the output. Checks the config's schema only: its files may exist on the
cluster alone (`--check-files` runs `distune validate`'s checks here). Imports no ray; the CLI parser imports
this module, so heavy imports stay inside functions.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

MOUNT = "/runs"  # every Ray pod mounts the distune-runs volume here (k8s/base/rayjob.yaml)
CONFIG_MOUNT = "/config"  # the head mounts the ConfigMap here; the entrypoint reads config.yaml from it
OVERLAYS = ("cpu-smoke", "gpu-multinode")
K8S_DIR = Path(__file__).resolve().parents[1] / "k8s"  # a source checkout's k8s/ folder
MAX_NAME = 47  # KubeRay: a RayJob name is a DNS-1035 label of at most 47 characters (its cluster adds a suffix)
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


class K8sError(ValueError):
    """A render problem, phrased for the user (one line)."""


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="k8s_command", required=True, metavar="render")
    r = sub.add_parser("render", help="print a KubeRay RayJob + the config's ConfigMap (pipe to kubectl apply -f -)")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*", help="key.path=value")
    r.add_argument("--overlay", default="cpu-smoke",
                   help=f"{' | '.join(OVERLAYS)} (k8s/overlays), or a kustomization folder whose output holds one "
                        f"RayJob (default: cpu-smoke)")
    r.add_argument("--image", help="container image of every pod (default: the overlay's)")
    r.add_argument("--name", help="RayJob name (default: distune-<run.name>); the ConfigMap is NAME-config")
    r.add_argument("--namespace", help="namespace of the objects (default: kubectl's current one)")
    r.add_argument("--workers", type=_positive_int, help="worker pods (default: as many as cluster.num_workers needs)")
    r.add_argument("--out", help="write the YAML to this file instead of stdout")
    r.add_argument("--check-files", action="store_true",
                   help="also run `distune validate`'s checks (files, model, data) on this machine: for configs "
                        "whose paths exist here as they will on the pods")


def _positive_int(text: str) -> int:
    import argparse

    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def command(args) -> int:
    try:
        text, notes = render(args.config, args.overrides, overlay=args.overlay, image=args.image, name=args.name,
                             namespace=args.namespace, workers=args.workers, check_files=args.check_files)
    except K8sError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in notes:  # stderr: stdout is the YAML alone, for `| kubectl apply -f -`
        print(note, file=sys.stderr)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def render(config, overrides=(), overlay: str = "cpu-smoke", image: str | None = None, name: str | None = None,
           namespace: str | None = None, workers: int | None = None, check_files: bool = False) -> tuple[str, list]:
    """(multi-document YAML, notes for the user): the overlay's objects fitted to the config + its ConfigMap."""
    from distune.config import CPU_WORKERS, fit_workers, load_config

    cfg = load_config(config, list(overrides), resolve=False)  # `dtype: auto` is the pods' to resolve
    objects = kustomize(overlay_dir(overlay))
    jobs = [o for o in objects if o.get("kind") == "RayJob"]
    if len(jobs) != 1:
        raise K8sError(f"--overlay {overlay}: its output must hold exactly one RayJob, found {len(jobs)}")
    job = jobs[0]
    groups = job["spec"]["rayClusterSpec"].get("workerGroupSpecs") or []
    if len(groups) != 1:
        raise K8sError(f"--overlay {overlay}: its RayJob must have exactly one worker group, found {len(groups)}")
    pod_cpus, pod_gpus = _pod_capacity(groups[0], overlay)
    # On Kubernetes the driver runs on the head, which has no GPU: "auto" asks the worker pods instead.
    cfg.cluster.use_gpu = _use_gpu(cfg.cluster.use_gpu, pod_gpus, overlay)
    _check_entrypoint(job["spec"]["entrypoint"], cfg.cluster.use_gpu, overlay)
    if cfg.cluster.num_workers == "auto":  # a worker per GPU of the worker pods (--workers of them), else 2
        fit_workers(cfg, (workers or 1) * pod_gpus if cfg.cluster.use_gpu else CPU_WORKERS)
    cfg.grad_accum_steps()  # batch arithmetic: cheap, needs no files
    notes = []
    needed = _pods_needed(cfg, pod_cpus, pod_gpus)
    if workers is not None and workers < needed:
        raise K8sError(f"--workers {workers}: cluster.num_workers={cfg.cluster.num_workers} needs {needed} worker "
                       f"pods of {_capacity(pod_cpus, pod_gpus)} (overlay {overlay})")
    if workers is not None and workers > needed:
        notes.append(f"note: {workers - needed} of the {workers} worker pods stay idle "
                     f"(cluster.num_workers={cfg.cluster.num_workers} fills {needed})")
    if check_files:
        from distune.validate import validate

        summary = validate(cfg, local_cluster=False)
        notes.append("ok: " + ", ".join(f"{k}={v}" for k, v in summary.items() if k != "warnings"))
        notes += [f"warning: {w}" for w in summary.get("warnings", [])]
    name = _job_name(name, cfg.run.name)
    if namespace is not None and not (len(namespace) <= 63 and DNS_1123.fullmatch(namespace)):
        raise K8sError(f"--namespace {namespace!r}: must be a DNS-1123 label (lowercase letters, digits, '-'), "
                       f"at most 63 characters")
    config_map = _config_map(f"{name}-config", _as_seen_by_pods(cfg, notes), config)
    _fit_job(job, name, image, workers or needed, config_map["metadata"]["name"], overlay)
    out = [config_map, *objects]
    if namespace:
        for o in out:
            o["metadata"]["namespace"] = namespace
    if cfg.wandb.mode == "online":
        notes.append(f"note: wandb.mode online: the pods read WANDB_API_KEY from Secret 'wandb' (key api-key) in "
                     f"namespace {namespace or '(current)'}; see k8s/README.md to create it")
    text = yaml.dump_all(out, Dumper=_BlockDumper, sort_keys=False, width=120)
    _refuse_secrets(text)
    return text, notes


def overlay_dir(overlay: str) -> Path:
    if overlay in OVERLAYS:
        folder = K8S_DIR / "overlays" / overlay
        if not (folder / "kustomization.yaml").is_file():
            raise K8sError(f"--overlay {overlay}: {folder} is missing (the overlays ship in distune's source "
                           f"checkout); pass the path of a kustomization folder instead")
        return folder
    folder = Path(overlay)
    if not any((folder / n).is_file() for n in ("kustomization.yaml", "kustomization.yml", "Kustomization")):
        raise K8sError(f"--overlay {overlay}: neither one of {', '.join(OVERLAYS)} nor a folder holding a "
                       f"kustomization.yaml")
    return folder


def kustomize(folder: Path) -> list[dict]:
    """The objects `kubectl kustomize FOLDER` renders (client side: no cluster needed)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise K8sError("distune k8s render needs kubectl on PATH: it renders the overlay with `kubectl kustomize` "
                       "(no cluster is contacted)")
    done = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True)
    if done.returncode:
        reason = "; ".join(line.strip() for line in done.stderr.splitlines() if line.strip())
        raise K8sError(f"kubectl kustomize {folder} failed: {reason or f'exit code {done.returncode}'}")
    return [o for o in yaml.safe_load_all(done.stdout) if o]


def pod_templates(job: dict) -> dict[str, dict]:
    """{role: pod template} of a RayJob: head, worker group(s) by name, submitter (when given)."""
    spec = job["spec"]
    out = {"head": spec["rayClusterSpec"]["headGroupSpec"]["template"]}
    for i, group in enumerate(spec["rayClusterSpec"].get("workerGroupSpecs") or []):
        out[f"worker group {group.get('groupName', i)}"] = group["template"]
    if spec.get("submitterPodTemplate"):
        out["submitter"] = spec["submitterPodTemplate"]
    return out


def _pod_capacity(group: dict, overlay: str) -> tuple[float, int]:
    """(CPUs, GPUs) Ray sees on one worker pod: KubeRay passes the Ray container's limits (else requests)."""
    res = group["template"]["spec"]["containers"][0].get("resources") or {}
    limits, requests = res.get("limits") or {}, res.get("requests") or {}
    cpu = limits.get("cpu", requests.get("cpu"))
    if cpu is None:
        raise K8sError(f"--overlay {overlay}: the worker container sets no cpu limit or request (Ray sizes itself "
                       f"from it)")
    cpu = str(cpu)
    cpus = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    gpus = limits.get("nvidia.com/gpu", requests.get("nvidia.com/gpu", 0))
    return cpus, int(gpus)


def _use_gpu(wanted, pod_gpus: int, overlay: str) -> bool:
    if wanted == "auto":
        return pod_gpus > 0
    if wanted and not pod_gpus:
        raise K8sError(f"cluster.use_gpu: true, but the worker pods of overlay {overlay} have no nvidia.com/gpu; "
                       f"use --overlay gpu-multinode")
    if not wanted and pod_gpus:
        raise K8sError(f"cluster.use_gpu: false, but overlay {overlay} gives each worker pod {pod_gpus} GPUs; "
                       f"use --overlay cpu-smoke, or set cluster.use_gpu to true or auto")
    return wanted


def _check_entrypoint(entrypoint: str, use_gpu: bool, overlay: str) -> None:
    # The entrypoint's overrides win over the ConfigMap: they must agree with what the pods offer.
    words = shlex.split(entrypoint)
    if f"{CONFIG_MOUNT}/config.yaml" not in words:
        raise K8sError(f"--overlay {overlay}: the RayJob's entrypoint does not read {CONFIG_MOUNT}/config.yaml")
    for word in words:
        if word.startswith("cluster.use_gpu=") and yaml.safe_load(word.partition("=")[2]) is not use_gpu:
            raise K8sError(f"--overlay {overlay}: its entrypoint sets {word}, but its worker pods "
                           f"{'have' if use_gpu else 'have no'} GPUs")


def _pods_needed(cfg, pod_cpus: float, pod_gpus: int) -> int:
    """Worker pods for cfg's Ray Train workers (cpus_per_worker CPUs + a GPU each) and its teachers' actor groups."""
    from distune.methods import frozen_models
    from distune.signals.teachers import actor_groups

    cpw, n, use_gpu = cfg.cluster.cpus_per_worker, cfg.cluster.num_workers, cfg.cluster.use_gpu
    per_pod = math.floor(pod_cpus / cpw + 1e-9)
    if use_gpu:
        per_pod = min(per_pod, pod_gpus)
    if per_pod < 1:
        raise K8sError(f"cluster.cpus_per_worker={cpw:g}: one Ray worker does not fit a worker pod of "
                       f"{_capacity(pod_cpus, pod_gpus)}")
    pods = math.ceil(n / per_pod)
    remote = actor_groups(frozen_models(cfg)).values()
    actor_cpus = sum(r["actors"] * r["cpus_per_actor"] for r in remote)
    actor_gpus = sum(r["actors"] * r["gpus_per_actor"] for r in remote) if use_gpu else 0
    # Remote teacher actors take what the training workers leave (counted by totals).
    more = (actor_cpus - (pods * pod_cpus - n * cpw)) / pod_cpus
    if use_gpu:
        more = max(more, (actor_gpus - (pods * pod_gpus - n)) / pod_gpus)
    return pods + max(0, math.ceil(more - 1e-9))


def _capacity(cpus: float, gpus: int) -> str:
    return f"{cpus:g} CPUs" + (f" + {gpus} GPUs" if gpus else "")


def _job_name(given: str | None, run_name: str) -> str:
    if given is None:  # run.name allows '_' and capitals; a RayJob name does not
        slug = re.sub(r"[^a-z0-9-]+", "-", f"distune-{run_name}".lower())
        return slug[:MAX_NAME].strip("-")
    if len(given) > MAX_NAME or not DNS_1035.fullmatch(given):
        raise K8sError(f"--name {given!r}: a RayJob name must be a DNS-1035 label (lowercase letters, digits, '-', "
                       f"starting with a letter) of at most {MAX_NAME} characters")
    return given


def _as_seen_by_pods(cfg, notes: list) -> dict:
    """The dumped config with run.output_dir on the shared mount. Paths under the old output_dir (an earlier
    stage's export, a teacher cache) move with it; other paths on this machine are reported."""
    from distune.config import dump_config
    from distune.storage import is_uri

    local = cfg.run.output_dir  # absolute on this machine (load_config anchors it), or an object store's URI
    if is_uri(local):
        local = "\0"  # the pods write there themselves: nothing moves to the mount

    def move(value, key: str):
        if isinstance(value, dict):
            return {k: move(v, f"{key}.{k}" if key else k) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v, f"{key}.{i}") for i, v in enumerate(value)]
        if isinstance(value, str) and (value == local or value.startswith(local + "/")):
            return MOUNT + value[len(local):]
        if isinstance(value, str) and value.startswith("/") and not value.startswith(MOUNT + "/"):
            notes.append(f"warning: {key}={value} is a path on this machine: the pods must see it at the same "
                         f"path (in the image, or copied under {MOUNT} with the config pointing there)")
        return value

    return move(dump_config(cfg), "")


def _config_map(name: str, config: dict, source) -> dict:
    origin = f"# distune k8s render of {source}: run.output_dir on the shared {MOUNT}, cluster.use_gpu resolved\n"
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "distune"}},
            "data": {"config.yaml": origin + yaml.safe_dump(config, sort_keys=False, width=120)}}


def _fit_job(job: dict, name: str, image: str | None, pods: int, config_map: str, overlay: str) -> None:
    job["metadata"]["name"] = name
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["replicas"] = group["minReplicas"] = group["maxReplicas"] = pods  # fixed size: no autoscaling
    for template in pod_templates(job).values():
        for container in template["spec"]["containers"]:
            container["image"] = image or container["image"]
    head = pod_templates(job)["head"]["spec"]
    mounted = {m["name"] for m in head["containers"][0].get("volumeMounts", []) if m["mountPath"] == CONFIG_MOUNT}
    volumes = [v for v in head.get("volumes", []) if v["name"] in mounted and "configMap" in v]
    if not volumes:
        raise K8sError(f"--overlay {overlay}: the head container mounts no ConfigMap at {CONFIG_MOUNT}")
    volumes[0]["configMap"]["name"] = config_map


def _refuse_secrets(text: str) -> None:
    """Last line of defence: no value of a secret-named environment variable (WANDB_API_KEY, ...) may be printed,
    whatever key of the config it hid under."""
    from distune.config import looks_secret

    for key, value in os.environ.items():
        if looks_secret(key) and len(value) >= 8 and value in text:
            raise K8sError(f"the manifests would contain the value of ${key}: take it out of the config (the pods "
                           f"read WANDB_API_KEY from the Secret 'wandb', see k8s/README.md)")


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the ConfigMap's config.yaml) as readable `|` blocks."""


_BlockDumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))
