"""run.output_dir in object storage, against a real S3 API server on loopback (moto_server): a run checkpoints
there, stops, resumes from there and exports there. And a save that fails half-way (a size-limited tmpfs as the
output folder) leaves no checkpoint that looks complete, ends with one line, and the rerun resumes from the last
complete one, through Ray and without it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import tiny
from ray_nodes import cli, free_port

SECRET_KEY = "s3-secret-7f3e9c"  # the server accepts any key: planted to prove it is written nowhere


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto_server on a free loopback port, a bucket, and the environment a user's nodes would have."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ACCESS_KEY_ID": "distune-test", "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        import boto3

        deadline = time.time() + 60
        while True:
            try:
                client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                                      aws_access_key_id="distune-test", aws_secret_access_key=SECRET_KEY)
                client.create_bucket(Bucket="runs")
                break
            except Exception:
                assert server.poll() is None and time.time() < deadline, log.read_text()
                time.sleep(0.5)
        yield {"env": env, "client": client, "log": log}
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # only the server this fixture started
        server.wait(timeout=30)


def _objects(client, prefix: str) -> dict[str, int]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="runs", Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def _text(client, key: str) -> str:
    return client.get_object(Bucket="runs", Key=key)["Body"].read().decode()


def _config(tmp_path, tiny_model, tiny_data, output_dir: str, name: str, **sections) -> Path:
    sections = {"method": {"name": "lora"}, "cluster": {"num_workers": 2}, "deepspeed": {"stage": 2},
                "checkpoint": {"every": 2, "keep": 2}, "train": {"max_steps": 4}} | sections
    cfg = tiny.base_config(tiny_model, tiny_data, tmp_path / "unused", run={"name": name, "output_dir": output_dir},
                           **sections)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_run_checkpoints_resumes_and_exports_in_s3(s3, tmp_path, tiny_model, tiny_data):
    client = s3["client"]
    cfg = _config(tmp_path, tiny_model, tiny_data, "s3://runs/team", "s3run")
    first = cli("run", str(cfg), "train.stop_after_steps=2", "--no-progress", env=s3["env"])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]  # stopped where asked, resumable
    stored = _objects(client, "team/s3run/")
    assert {"team/s3run/config.yaml", "team/s3run/results.json", "team/s3run/step_2/meta.json",
            "team/s3run/step_2/complete_rank0", "team/s3run/step_2/complete_rank1"} <= stored.keys(), sorted(stored)
    assert json.loads(_text(client, "team/s3run/results.json"))["step"] == 2
    assert not any(k.startswith("team/s3run/export/") for k in stored)

    second = cli("run", str(cfg), "--no-progress", env=s3["env"])
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert "training: step 2 -> 4" in out, out[-3000:]  # resumed from S3, not from scratch
    assert "run directory: s3://runs/team/s3run" in out
    stored = _objects(client, "team/s3run/")
    results = json.loads(_text(client, "team/s3run/results.json"))
    assert results["step"] == 4 and results["export"] == "s3://runs/team/s3run/export"
    # The export is complete, and says so last.
    assert {"team/s3run/export/adapter_model.safetensors", "team/s3run/export/adapter_config.json",
            "team/s3run/export/DONE"} <= stored.keys(), sorted(stored)
    assert {"team/s3run/step_4/complete_rank0", "team/s3run/step_4/complete_rank1"} <= stored.keys()
    # The credentials are in the environment only: in no output, and in no object of the bucket.
    assert SECRET_KEY not in first.stdout + first.stderr + out
    for key in stored:
        body = client.get_object(Bucket="runs", Key=key)["Body"].read()
        assert SECRET_KEY.encode() not in body, key


def _tmpfs(path: Path, size: str, remount: bool = False) -> None:
    path.mkdir(exist_ok=True)
    opts = f"remount,size={size}" if remount else f"size={size}"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode and not remount:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({done.stderr.strip()})")
    assert done.returncode == 0, done.stderr


# Without Ray, a torn save is a temp folder never renamed in: tests/reliability/test_faults.py covers a save killed
# half-way in the default run; this cell adds the full disk and the one-line error.
@pytest.mark.parametrize("launcher", ["ray", pytest.param("no-ray", marks=pytest.mark.slow)])
def test_a_save_that_fails_half_way_leaves_nothing_that_looks_complete(launcher, tmp_path, tiny_model, tiny_data):
    disk = tmp_path / "disk"
    # A tiny LoRA checkpoint is ~0.8 MiB: step_2 fits, step_4 beside it does not.
    _tmpfs(disk, "1600k" if launcher == "ray" else "1200k")
    try:
        cfg = _config(tmp_path, tiny_model, tiny_data, str(disk), "torn",
                      **({} if launcher == "ray" else {"cluster": {"num_workers": 1}}))
        runner = (lambda *a: cli("run", *a, "--no-progress")) if launcher == "ray" else (
            lambda *a: subprocess.run([sys.executable, "-m", "distune.worker", *a], capture_output=True, text=True,
                                      timeout=400, env={**os.environ, "DS_ACCELERATOR": "cpu"}))
        failed = runner(str(cfg))
        out = failed.stdout + failed.stderr
        assert failed.returncode == 1, out[-3000:]
        # One line (after Ray's own INFO lines), naming the path and the space a checkpoint needs. Which write
        # meets the full disk first varies: a rank's upload, or Ray's controller recording the checkpoint.
        assert "Traceback" not in out and out.count("error:") == 1, out[-3000:]
        error = next(line for line in failed.stderr.splitlines() if line.startswith("error:"))
        assert error.startswith(("error: checkpoint step_4: writing to ", "error: the run's storage ")), out[-3000:]
        assert str(disk) in error and "No space left on device" in error and "MiB" in error, error
        steps = disk / "torn" if launcher == "ray" else disk / "torn" / "checkpoints"
        from distune.reporting import checkpoint_dirs
        from distune.rundir import latest_complete
        from distune.storage import RunStore

        if launcher == "ray":
            assert latest_complete(RunStore(str(steps))) == "step_2"
        else:
            assert [p.name for p in checkpoint_dirs(steps)] == ["step_2"]  # the torn one was never renamed in
        # Space freed (the tmpfs grown): the rerun resumes from the last complete checkpoint and finishes.
        _tmpfs(disk, "8m", remount=True)
        again = runner(str(cfg))
        out = again.stdout + again.stderr
        assert again.returncode == 0, out[-3000:]
        assert json.loads((disk / "torn" / "results.json").read_text())["step"] == 4
        if launcher == "ray":
            assert "step_4 in" in out and "never finished writing: resuming from step_2" in out, out[-3000:]
            assert "training: step 2 -> 4" in out, out[-3000:]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
