"""Inputs refused before any worker starts (else they fail on the workers, or quietly train something else): one
`error:` line naming the key, exit code 2, no traceback. Through `distune.cli.main`, in this process."""

from __future__ import annotations

import importlib.metadata
import os
import tempfile

import pytest
import yaml

import tiny
from conftest import SECRET
from distune.cli import main


@pytest.fixture
def write_config(tiny_model, tiny_data, tmp_path):
    """write_config(section={...}, ...) -> path of a YAML config for the tiny model and data."""

    def write(**sections) -> str:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(tiny.base_config(tiny_model, tiny_data, tmp_path / "runs", **sections)))
        return str(path)

    return write


def one_error(capsys, argv: list[str], *named: str) -> str:
    """Run the CLI; assert exit code 2 and a single `error:` line on stderr that names `named`; return the line."""
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    for text in named:
        assert text in lines[0], lines[0]
    return lines[0]


def ok(capsys, argv: list[str]) -> None:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0 and "ok: " in out, err


# -------------------------------------------------------------------------- 1. LoRA target_modules


def test_lora_target_that_matches_no_module(write_config, capsys):
    cfg = write_config(method={"name": "lora", "target_modules": ["q_proj", "vproj"]})
    line = one_error(capsys, ["validate", cfg], "method.target_modules", "'vproj'", "did you mean 'v_proj'?")
    assert "'q_proj'" not in line.split("(")[0]  # only the entry that matches nothing is named
    assert "k_proj, o_proj, q_proj, up_proj, v_proj" in line  # what the model has
    assert "lm_head" not in line  # the output head is no LoRA target to suggest


def test_lora_target_string_is_a_full_name_regex(write_config, capsys):
    cfg = write_config(method={"name": "lora", "target_modules": "q_proj"})
    one_error(capsys, ["validate", cfg], "method.target_modules: 'q_proj'", "regex", "write a list, [q_proj]")


def test_lora_targets_by_peft_rules_pass(write_config, capsys):
    # A list entry matches a module name or its last dotted parts; a string is a regex over the whole name.
    for targets in (["q_proj", "self_attn.v_proj", "model.layers.0.mlp.up_proj"], r".*\.(q|v)_proj", "all-linear"):
        ok(capsys, ["validate", write_config(method={"name": "lora", "target_modules": targets})])


def test_lora_target_invalid_regex(write_config, capsys):
    cfg = write_config(method={"name": "lora", "target_modules": "q_proj["})
    one_error(capsys, ["validate", cfg], "method.target_modules", "not a valid regular expression")


def test_distill_lora_student_target(write_config, tiny_teacher, capsys):
    cfg = write_config(method={"name": "distill", "teacher": {"path": str(tiny_teacher)},
                               "student": {"name": "lora", "target_modules": ["attn"]}})
    one_error(capsys, ["validate", cfg], "method.student.target_modules", "'attn'")


def test_adapters_entry_target_names_its_entry(tiny_model):
    from distune.methods import build_method
    from distune.models import load_model_config, meta_model

    method = build_method("adapters", {"adapters": [
        {"name": "sent", "task": "x", "method": {"name": "lora", "target_modules": ["q_proj"]}},
        {"name": "mood", "task": "y", "method": {"name": "lora", "target_modules": ["qproj"]}}]})
    with pytest.raises(ValueError, match=r"^method\.adapters\.1\.method\.target_modules: 'qproj'"):
        method.check_model(meta_model(load_model_config(str(tiny_model))))


# -------------------------------------------------------------------------- 2. divergence_params


def test_unknown_divergence_param_suggests_the_closest(write_config, tiny_teacher, capsys):
    cfg = write_config(method={"name": "distill", "teacher": {"path": str(tiny_teacher)}, "divergence": "jsd",
                               "divergence_params": {"bta": 0.5}})
    one_error(capsys, ["validate", cfg], "method.divergence_params.bta", "did you mean 'beta'?", "accepted: beta")


def test_divergence_without_params(write_config, tiny_teacher, capsys):
    cfg = write_config(method={"name": "distill", "teacher": {"path": str(tiny_teacher)},
                               "divergence_params": {"alpha": 0.1}})
    one_error(capsys, ["validate", cfg], "method.divergence_params.alpha", "'forward_kl' takes no parameters")


def test_known_divergence_params_pass(make_config, tiny_teacher):
    cfg = make_config(method={"name": "distill", "teacher": {"path": str(tiny_teacher)},
                              "divergence": "skew_forward_kl", "divergence_params": {"alpha": 0.2}})
    assert cfg.method_config().divergence_params == {"alpha": 0.2}


# -------------------------------------------------------------------------- 3. run.output_dir


def test_output_dir_below_a_file(write_config, tmp_path, capsys):
    (tmp_path / "plain").write_text("x")
    cfg = write_config(run={"output_dir": str(tmp_path / "plain" / "runs")})
    one_error(capsys, ["validate", cfg], "run.output_dir", "is a file, not a folder")


def test_output_dir_that_cannot_be_written(write_config, capsys):
    # sysfs refuses new files to every user, root included (chmod would not stop root).
    try:
        fd, probe = tempfile.mkstemp(dir="/sys")
    except OSError:
        pass
    else:
        os.close(fd)
        os.unlink(probe)
        pytest.skip("/sys is writable here: no folder this process cannot write")
    cfg = write_config(run={"output_dir": "/sys/distune-test-runs"})
    one_error(capsys, ["validate", cfg], "run.output_dir: /sys/distune-test-runs does not exist and cannot be "
                                         "created: /sys is not writable")


def test_output_dir_object_store_is_not_probed(make_config):
    from distune.validate import _check_output_dir

    _check_output_dir(make_config(run={"output_dir": "s3://bucket/runs"}))  # opened by distune.storage instead


# -------------------------------------------------------------------------- 4. W&B credentials


@pytest.fixture
def no_wandb_key(monkeypatch, tmp_path):
    """No WANDB_API_KEY and an empty home: the conftest's sentinel key is gone, no ~/.netrc is read."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("HOME", str(home))
    return home


def test_wandb_online_without_credentials(write_config, no_wandb_key, capsys):
    cfg = write_config(wandb={"mode": "online"})
    line = one_error(capsys, ["validate", cfg], "wandb.mode", "wandb login", "WANDB_API_KEY", "wandb.mode: offline")
    assert SECRET not in line


@pytest.mark.parametrize("where", ["home", "NETRC"])
def test_wandb_online_with_a_netrc_entry(write_config, no_wandb_key, monkeypatch, tmp_path, capsys, where):
    netrc = no_wandb_key / ".netrc" if where == "home" else tmp_path / "other-netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {SECRET}\n")
    netrc.chmod(0o600)
    if where == "NETRC":
        monkeypatch.setenv("NETRC", str(netrc))
    cfg = write_config(wandb={"mode": "online"})
    ok(capsys, ["validate", cfg])
    # The entry is for api.wandb.ai: a self-hosted server needs its own.
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    line = one_error(capsys, ["validate", cfg], "wandb.mode", "machine wandb.example.com")
    assert SECRET not in line


def test_wandb_online_with_the_key_in_the_environment(write_config, no_wandb_key, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    ok(capsys, ["validate", write_config(wandb={"mode": "online"})])


# -------------------------------------------------------------------------- 5. adapters merge


def test_merge_a_folder_without_an_adapter(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_error(capsys, ["adapters", "merge", str(empty), "--out", str(tmp_path / "out")],
              f"{empty}: not a PEFT adapter folder (no adapter_config.json)")
    one_error(capsys, ["adapters", "merge", str(tmp_path / "nope"), "--out", str(tmp_path / "out")],
              f"{tmp_path / 'nope'}: no such folder")
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------- 6. --version


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"distune {importlib.metadata.version('distune')}\n"



def test_overrides_may_follow_options(make_config, tmp_path, capsys):
    """`distune plan CFG --show-samples 1 k=v`: an override after an option is still an override; an unknown
    option is still argparse's error."""
    import yaml

    from distune.cli import main
    from distune.config import dump_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(dump_config(make_config())))
    assert main(["plan", str(path), "--show-samples", "1", "train.global_batch_size=6"]) == 0
    assert "grad_accum=3" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["plan", str(path), "--show-samples", "1", "--bogus", "train.lr=1"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
