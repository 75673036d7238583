"""`usae import-activations`, `train` and `eval` from the command line, errors included."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from app.cli import cli


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


def _cli_error(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda p, o: ["--model", f"resnet={p['resnet']}", "--model", f"resnet={p['dino']}"], "duplicate model name 'resnet'"),
        (lambda p, o: ["--model", str(p["resnet"])], "NAME=FILE.npy"),
        (lambda p, o: ["--model", f"resnet={o / 'missing.npy'}"], "does not exist"),
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

