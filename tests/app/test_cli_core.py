"""`usae import-activations`, `train` and `eval` from the command line, errors included."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from app.cli import cli
from tests.conftest import restore_ctrl_c
from usae_core.errors import UsaeError


@pytest.fixture()
def npy(tmp_path):
    rng = np.random.default_rng(0)
    paths = {}
    for name, dim in (("resnet", 8), ("dino", 12)):
        path = tmp_path / f"{name}.npy"
        np.save(path, rng.standard_normal((40, 16, dim)).astype(np.float32))
        paths[name] = path
    return paths


def _run(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


def test_import_train_eval(tmp_path, npy):
    store = tmp_path / "store"
    result = _run("import-activations", "--out", store, "--model", f"resnet={npy['resnet']}",
                  "--model", f"dino={npy['dino']}")
    assert result.exit_code == 0, result.output
    assert "40 images x 16 tokens" in result.output
    result = _run("train", "--store", store, "--out", tmp_path / "run", "--concepts", "16", "--k", "2",
                  "--steps", "20", "--batch-size", "64", "--device", "cpu")
    assert result.exit_code == 0, result.output
    result = _run("eval", tmp_path / "run", "--store", store, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "R² self" in result.output and "live of 16 concepts" in result.output
    result = _run("eval", tmp_path / "run", "--store", store, "--device", "cpu", "--json", "--per-concept")
    data = json.loads(result.output)
    assert data["models"] == ["resnet", "dino"] and len(data["concepts"]["energy"]) == 16


def test_bare_names_resolve_inside_the_data_dir(tmp_path, npy):
    data = tmp_path / "data"
    result = _run("import-activations", "--out", "mystore", "--model", f"resnet={npy['resnet']}", "--data-dir", data)
    assert result.exit_code == 0, result.output
    assert (data / "stores" / "mystore" / "manifest.json").exists()


def _text_file(folder: Path) -> Path:
    (folder / "notes.npy").write_text("not an array")
    return folder / "notes.npy"


def _cli_error(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda p, o: ["--model", f"resnet={p['resnet']}", "--model", f"resnet={p['dino']}"], "duplicate model name 'resnet'"),
        (lambda p, o: ["--model", str(p["resnet"])], "NAME=FILE.npy"),
        (lambda p, o: ["--model", f"resnet={o / 'missing.npy'}"], "does not exist"),
        # numpy's own message advised allow_pickle=True
        (lambda p, o: ["--model", f"resnet={_text_file(o)}"], "notes.npy is not a .npy file (one array written by numpy.save)"),
    ],
)
def test_import_errors_are_one_line_and_write_nothing(tmp_path, npy, make_args, message):
    out = tmp_path / "store"
    proc = _cli_error("import-activations", "--out", out, *make_args(npy, tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_existing_store_requires_overwrite(tmp_path, npy):
    out = tmp_path / "store"
    assert _run("import-activations", "--out", out, "--model", f"resnet={npy['resnet']}").exit_code == 0
    proc = _cli_error("import-activations", "--out", out, "--model", f"resnet={npy['resnet']}")
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert _run("import-activations", "--out", out, "--model", f"dino={npy['dino']}", "--overwrite").exit_code == 0


@pytest.mark.parametrize("args", [("serve", "--port", "70000"), ("serve", "--port", "-1"), ("serve", "--workers", "-2"),
                                  ("worker", "--threads", "0"), ("demo", "--port", "0"),
                                  ("extract", "--images", "x", "--out", "y", "--workers", "-1")])
def test_out_of_range_sizes_are_refused_before_anything_starts(args):
    result = _run(*args)
    assert result.exit_code == 2 and "Invalid value for" in result.output, result.output



def _store_for_training(tmp_path, npy):
    store = tmp_path / "store"
    assert _run("import-activations", "--out", store, "--model", f"resnet={npy['resnet']}",
                "--model", f"dino={npy['dino']}").exit_code == 0
    return store


@pytest.mark.parametrize("out", ["store", "file"])
@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--resume"]])
def test_train_refuses_the_store_or_a_file_as_its_out_in_one_line(tmp_path, npy, out, flags):
    """`--out` at the store used to write the run into it (and --overwrite then deleted it); a
    file gave a FileExistsError traceback."""
    store = _store_for_training(tmp_path, npy)
    target = store if out == "store" else tmp_path / "notes.txt"
    if out == "file":
        target.write_text("keep me")
    before = sorted((p.relative_to(tmp_path), p.stat().st_size) for p in tmp_path.rglob("*"))
    proc = _cli_error("train", "--store", store, "--out", target, "--concepts", "16", "--k", "2",
                      "--batch-size", "64", "--device", "cpu", *flags)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert ("activation store" if out == "store" else "is a file") in proc.stderr
    assert sorted((p.relative_to(tmp_path), p.stat().st_size) for p in tmp_path.rglob("*")) == before


def test_ctrl_c_during_train_says_how_to_continue_in_one_line_and_exits_130(tmp_path, npy):
    import os
    import signal
    import time

    store, run = _store_for_training(tmp_path, npy), tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "train", "--store", str(store), "--out", str(run), "--concepts", "16",
         "--k", "2", "--steps", "1000000", "--batch-size", "64", "--checkpoint-every", "5", "--device", "cpu"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=restore_ctrl_c,
    )
    try:
        deadline = time.monotonic() + 120
        while not list((run / "checkpoints").glob("step-*")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and lines[0].startswith(f"training of {run} interrupted after step "), stderr[-2000:]
    assert "--resume" in lines[0] and "from its checkpoint of step " in lines[0]
    step = int(lines[0].split("from its checkpoint of step ")[1].split()[0])
    assert (run / "checkpoints" / f"step-{step:08d}").is_dir()  # the one a resume starts from: the newest
    assert step == max(int(p.name[5:]) for p in (run / "checkpoints").glob("step-*"))


def test_train_sets_the_warmup_from_the_command_line_and_refuses_one_longer_than_the_run(tmp_path, npy):
    """`usae train` had no --warmup-steps, and its fixed default of 100 was more than a short run's
    steps; left out, it is now min(100, steps // 10)."""
    store = _store_for_training(tmp_path, npy)
    common = ("--store", store, "--concepts", "16", "--k", "2", "--steps", "20", "--batch-size", "64",
              "--device", "cpu")
    for out, flags, warmup in (("auto", [], 2), ("given", ["--warmup-steps", "7"], 7)):
        result = _run("train", *common, "--out", tmp_path / out, *flags)
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / out / "config.json").read_text())["train"]["warmup_steps"] == warmup
    proc = _cli_error("train", *common, "--out", tmp_path / "long", "--warmup-steps", "30")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert "--warmup-steps (warmup_steps) 30 is more than --steps (steps) 20" in proc.stderr
    assert not (tmp_path / "long").exists()


# ------------------------------------------------------------------ options a resume, or a run, already knows

_STARTED = ("--concepts", "12", "--k", "3", "--steps", "20", "--batch-size", "32", "--lr", "2e-3",
            "--warmup-steps", "4", "--encoder", "linear", "--loss", "mse", "--aux", "none", "--seed", "5",
            "--checkpoint-every", "5", "--device", "cpu")
"""How the run a resume continues was started: no option at `usae train`'s default."""


def _cut_short(run: Path) -> None:
    """Make a finished run of 20 steps (checkpoints at 15 and 20) look like one stopped after
    step 15: only its checkpoint of step 15 and its metrics are left."""
    for name in ("config.json", "usae.safetensors"):
        (run / name).unlink()
    shutil.rmtree(run / "checkpoints" / "step-00000020")


def _flat_help(text: str) -> str:
    """Help text without rich's box and line breaks."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_resume_takes_every_option_left_out_from_the_run_and_finishes_it_exactly(tmp_path, npy):
    """`usae train --resume` was refused against the CLI defaults (--concepts 12 vs 6144; --k 3
    vs 32; ...) unless every option was typed again."""
    from usae_core.model import USAE

    store, run = _store_for_training(tmp_path, npy), tmp_path / "run"
    result = _run("train", "--store", store, "--out", run, *_STARTED)
    assert result.exit_code == 0, result.output
    straight = USAE.from_pretrained(run).state_dict()
    config = json.loads((run / "config.json").read_text())
    _cut_short(run)

    refused = _run("train", "--store", store, "--out", run, "--resume", "--k", "4", "--steps", "20")
    assert isinstance(refused.exception, UsaeError), refused.output  # given: still compared with the run's
    assert "--k (k) 3 vs 4" in str(refused.exception) and "--concepts" not in str(refused.exception)
    assert "--steps" not in str(refused.exception)  # given as the run's: accepted

    result = _run("train", "--store", store, "--out", run, "--resume", "--device", "cpu", "--checkpoint-every", "2")
    assert result.exit_code == 0, result.output
    resumed = json.loads((run / "config.json").read_text())
    assert resumed["usae"] == config["usae"] and resumed["step"] == 20
    assert {k: v for k, v in resumed["train"].items() if k != "checkpoint_every"} == {
        k: v for k, v in config["train"].items() if k != "checkpoint_every"}
    assert resumed["train"]["checkpoint_every"] == 2
    for key, value in USAE.from_pretrained(run).state_dict().items():
        assert torch.equal(value, straight[key]), key
    assert f"trained {run}" in result.output
    again = _run("train", "--store", store, "--out", run, "--resume")  # finished: says so, trains nothing
    assert again.exit_code == 0 and f"{run} had already finished its 20 steps: nothing to train" in again.output
    assert "--init-from" in again.output and "trained " not in again.output


def test_resume_after_an_interrupted_overwrite_takes_the_new_runs_options(tmp_path, npy):
    """The run --resume continues is the new one an interrupted --overwrite left beside the old
    one: its options, not the old run's, are the ones left out."""
    store, run = _store_for_training(tmp_path, npy), tmp_path / "run"
    assert _run("train", "--store", store, "--out", run, "--concepts", "16", "--k", "2", "--steps", "10",
                "--batch-size", "64", "--device", "cpu").exit_code == 0
    new = tmp_path / "new"
    assert _run("train", "--store", store, "--out", new, *_STARTED).exit_code == 0
    _cut_short(new)
    new.rename(tmp_path / ".run.replacing")  # as a killed `--overwrite` with _STARTED leaves it

    result = _run("train", "--store", store, "--out", run, "--resume", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / ".run.replacing").exists()  # finished and swapped in
    config = json.loads((run / "config.json").read_text())
    assert config["usae"]["n_concepts"] == 12 and config["usae"]["k"] == 3 and config["train"]["steps"] == 20


def test_resume_with_nothing_to_resume_keeps_the_built_in_defaults(tmp_path, npy):
    store, run = _store_for_training(tmp_path, npy), tmp_path / "run"
    result = _run("train", "--store", store, "--out", run, "--resume", "--concepts", "16", "--k", "2",
                  "--steps", "5", "--batch-size", "64", "--device", "cpu")
    assert result.exit_code == 0, result.output
    train = json.loads((run / "config.json").read_text())["train"]
    assert (train["lr"], train["loss"], train["aux"], train["seed"], train["checkpoint_every"]) == (
        3e-4, "l1", "auxk", 0, 500)


def test_a_k_left_out_that_is_more_than_the_concepts_is_named_as_the_default(tmp_path, npy):
    """It said "--k (k) must be in [1, --concepts (n_concepts) = 16], got 32" to a user who never passed --k."""
    store = _store_for_training(tmp_path, npy)
    result = _run("train", "--store", store, "--out", tmp_path / "x5", "--concepts", "16", "--steps", "10")
    assert isinstance(result.exception, UsaeError), result.output
    assert str(result.exception) == "the default --k 32 is more than --concepts 16: pass --k 16 or less"
    assert not (tmp_path / "x5").exists()
    result = _run("train", "--store", store, "--out", tmp_path / "x6", "--concepts", "16", "--k", "20")
    assert "--k (k) must be in [1, --concepts (n_concepts) = 16], got 20" in str(result.exception)  # given: as before


def test_train_help_still_shows_the_built_in_defaults():
    result = _run("train", "--help")
    assert result.exit_code == 0, result.output
    text = _flat_help(result.output).split(" Options ", 1)[1]  # the description names options too
    for option, default in (("--concepts", "6144"), ("--k", "32"), ("--steps", "2000"), ("--batch-size", "4096"),
                            ("--lr", "0.0003"), ("--encoder", "mlp_bn"), ("--loss", "l1"), ("--aux", "auxk"),
                            ("--seed", "0"), ("--checkpoint-every", "500")):
        after = text.split(f" {option} ", 1)[1].split(" --", 1)[0]
        assert f"default: {default}" in after, (option, after)


@pytest.mark.parametrize("command", ["eval", "mine"])
def test_eval_and_mine_read_the_store_from_the_run_unless_given(tmp_path, npy, command):
    """`usae eval RUN` and `usae mine RUN` required --store although the run's config.json names it."""
    store, run = _store_for_training(tmp_path, npy), tmp_path / "run"
    assert _run("train", "--store", store, "--out", run, "--concepts", "16", "--k", "2", "--steps", "5",
                "--batch-size", "64", "--device", "cpu").exit_code == 0
    common = ("--device", "cpu", "--data-dir", tmp_path / "data")
    result = _run(command, run, *common)
    assert result.exit_code == 0, result.output
    assert ("R² self" if command == "eval" else "mined run run: 16 concepts") in result.output

    moved = store.rename(tmp_path / "moved")
    result = _run(command, run, *common)
    assert isinstance(result.exception, UsaeError), result.output
    assert str(result.exception) == (f"the store {run} was trained on, {store.resolve()}, is no longer there "
                                     "(moved or deleted?); pass --store")
    result = _run(command, run, "--store", moved, *common)
    assert result.exit_code == 0, result.output
