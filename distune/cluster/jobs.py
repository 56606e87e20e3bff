"""`distune submit | status | logs | stop | list`: runs on a remote Ray cluster through the Ray Jobs API.

`submit` takes a config that `distune` has already validated here, ships it (and this distune package,
so the cluster runs the submitter's version) in the job's runtime_env, and starts
`<python> -m distune run config.yaml --address auto` on the cluster's head. The other commands take a
submission id. The address is the head's dashboard (`http://HEAD:8265`, or `RAY_JOBS_ADDRESS`).

Token auth: a Ray >= 2.5x cluster wants its token. It is read from `RAY_AUTH_TOKEN` or the token file
(`~/.ray/auth_token`, `RAY_AUTH_TOKEN_PATH`) by Ray's own client; distune only switches the client's auth
mode on when one exists, and never reads, prints or stores the token. Imports ray only inside commands.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import tempfile
import time
from pathlib import Path

ADDRESS_ENV = "RAY_JOBS_ADDRESS"


class JobsError(RuntimeError):
    """A cluster-side problem the user can fix (address, token, job id): one line, exit 2."""


def _address(args) -> str:
    address = args.address or os.environ.get(ADDRESS_ENV)
    if not address:
        raise JobsError(f"--address: which Ray cluster? Give its dashboard, e.g. --address http://HEAD:8265 "
                        f"(or set {ADDRESS_ENV})")
    if "://" not in address:
        address = f"http://{address}"
    return address


def _client(address: str):
    from distune.cluster.auth import token_auth_if_available

    token_auth_if_available()
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # ray raises ConnectionError / RuntimeError / its auth errors, with long texts
        raise JobsError(_why(address, e)) from None


def _why(address: str, e: Exception) -> str:
    text = str(e)
    if "401" in text or "403" in text or "nauthenticated" in text or "token" in text.lower():
        return (f"--address {address}: the cluster refused this client's token (set RAY_AUTH_TOKEN or "
                f"~/.ray/auth_token to the cluster's token)")
    if isinstance(e, ConnectionError) or "Failed to connect" in text or "Connection refused" in text:
        return f"--address {address}: no Ray dashboard answers there ({type(e).__name__})"
    first = text.strip().splitlines()[0][:300] if text.strip() else type(e).__name__
    return f"--address {address}: the cluster said: {first}"


def _call(address: str, what: str, fn, *a):
    try:
        return fn(*a)
    except RuntimeError as e:
        text = str(e)
        if "does not exist" in text or "404" in text:
            raise JobsError(f"{what}: no such job on {address}") from None
        raise JobsError(_why(address, e)) from None


# ------------------------------------------------------------------------------------------- submit


def add_submit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help=f"the head's dashboard, http://HEAD:8265 (default: ${ADDRESS_ENV})")
    p.add_argument("--submission-id", help="the job's id (default: Ray picks one)")
    p.add_argument("--metadata", action="append", default=[], metavar="K=V", help="job metadata (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="K=V",
                   help="environment variable for the job (repeatable; not for secrets: set those on the nodes)")
    p.add_argument("--python", default=sys.executable,
                   help="the interpreter on the cluster that has distune's dependencies (default: this one's "
                        "path, right when the nodes share the checkout as in launch/README.md)")
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")


def submit(cfg, summary: dict, args) -> int:
    """Validated config -> a Ray job on the cluster at --address. Prints the submission id."""
    import yaml

    from distune.config import dump_config, looks_secret

    address = _address(args)
    env, metadata = _pairs(args.env, "--env"), _pairs(args.metadata, "--metadata")
    for key in env:
        if looks_secret(key):
            raise JobsError(f"--env {key}: looks like a secret; set it in the nodes' environment (or a Kubernetes "
                            f"Secret), never in a job's runtime_env, which the dashboard shows")
    client = _client(address)
    import distune

    with tempfile.TemporaryDirectory(prefix="distune-submit-") as stage:
        (Path(stage) / "config.yaml").write_text(yaml.safe_dump(dump_config(cfg), sort_keys=False))
        entrypoint = f"{args.python} -m distune run config.yaml --address auto --no-progress"
        runtime_env = {"working_dir": stage, "py_modules": [str(Path(distune.__file__).parent)]}
        if env:
            runtime_env["env_vars"] = env
        meta = {"distune_run": cfg.run.name, "user": getpass.getuser(), **metadata}
        job_id = _submit_when_ready(client, address, dict(
            entrypoint=entrypoint, runtime_env=runtime_env, submission_id=args.submission_id, metadata=meta))
    print(f"submitted {job_id} to {address}: run {cfg.run.name!r} ({summary['total_steps']} steps) -> "
          f"{cfg.store()}" + ("" if cfg.store().remote else " on the cluster"))
    print(f"  distune status {job_id} --address {address}\n  distune logs {job_id} --follow --address {address}")
    if args.follow:
        return _follow(client, address, job_id)
    return 0


def _submit_when_ready(client, address: str, job: dict, wait_s: float = 90.0) -> str:
    """A head that just started answers HTTP before its job agent runs ("No available agent to submit job,
    please try again later"): retry that, and only that, for `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise JobsError(_why(address, e)) from None
        time.sleep(2.0)


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise JobsError(f"{flag} {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


# ------------------------------------------------------------------------- status / logs / stop / list


def add_arguments(p: argparse.ArgumentParser) -> None:
    """For status / logs / stop (a submission id) and list (none); `p.prog` tells which."""
    name = p.prog.split()[-1]
    if name != "list":
        p.add_argument("job_id", help="the submission id `distune submit` printed")
    p.add_argument("--address", help=f"the head's dashboard, http://HEAD:8265 (default: ${ADDRESS_ENV})")
    if name == "logs":
        p.add_argument("--follow", action="store_true", help="stream until the job ends")


def command(args) -> int:
    address = _address(args)
    client = _client(address)
    if args.command == "list":
        jobs = _call(address, "list", client.list_jobs)
        for job in sorted(jobs, key=lambda j: j.start_time or 0):
            run = (job.metadata or {}).get("distune_run", "-")
            print(f"{job.submission_id or job.job_id}  {job.status.value:<9}  run={run}  {job.entrypoint}")
        if not jobs:
            print(f"no jobs on {address}")
        return 0
    what = f"job {args.job_id}"
    if args.command == "status":
        info = _call(address, what, client.get_job_info, args.job_id)
        print(f"{args.job_id}: {info.status.value}" + (f" — {info.message}" if info.message else ""))
        return 0
    if args.command == "stop":
        stopped = _call(address, what, client.stop_job, args.job_id)
        # Ray sends SIGTERM to the entrypoint: distune checkpoints at the next step boundary, then exits.
        print(f"{args.job_id}: stop requested (the run checkpoints at its next step boundary)" if stopped
              else f"{args.job_id}: already finished")
        return 0
    if args.follow:
        return _follow(client, address, args.job_id)
    sys.stdout.write(_call(address, what, client.get_job_logs, args.job_id))
    return 0


def _follow(client, address: str, job_id: str) -> int:
    """Print the job's log as it grows until the job ends; exit code 0 only if it SUCCEEDED."""
    shown = 0
    while True:
        status = _call(address, f"job {job_id}", client.get_job_status, job_id)
        logs = _call(address, f"job {job_id}", client.get_job_logs, job_id)
        sys.stdout.write(logs[shown:])
        sys.stdout.flush()
        shown = len(logs)
        if status.is_terminal():
            print(f"{job_id}: {status.value}")
            return 0 if status.value == "SUCCEEDED" else 1
        time.sleep(1.0)
