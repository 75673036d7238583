"""Command-line inputs that are refused up front with one clear line, before any work and
without touching what is there: a data directory that is a file, a CAM output folder that
cannot be made, a negative firing threshold."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from app.cli import cli
from usae_core.errors import UsaeError
from usae_core.metrics import evaluate_usae
from usae_core.mining import MiningConfig


def test_a_data_directory_that_is_a_file_is_refused(tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    for args in (["user", "list"], ["runs", "list"], ["extract", "--images", "demo", "--small", "--out", "x"]):
        result = CliRunner().invoke(cli, [*args, "--data-dir", str(afile)])
        assert result.exit_code != 0 and isinstance(result.exception, UsaeError), (args, result.output)
        assert f"the data directory {afile} is a file, not a folder" in str(result.exception)
    assert afile.read_text() == "mine"


def test_cam_refuses_an_output_folder_it_cannot_make_before_optimising(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"usae": {}}))  # no store named: would fail later, not first
    afile = tmp_path / "picture.png"
    afile.write_bytes(b"not yours to replace")
    for out in (afile, afile / "inside"):
        result = CliRunner().invoke(cli, ["cam", str(run), "--concept", "0", "--out", str(out),
                                          "--data-dir", str(tmp_path / "data")])
        assert isinstance(result.exception, UsaeError), result.output
        assert f"{afile} is a file, not a folder" in str(result.exception)
    assert afile.read_bytes() == b"not yours to replace"


@pytest.mark.parametrize("tau", [-5.0, float("nan"), float("inf")])
def test_a_firing_threshold_must_be_a_number_at_least_zero(tau):
    with pytest.raises(UsaeError, match="--tau .* must be a number >= 0"):
        MiningConfig(tau=tau)
    with pytest.raises(UsaeError, match="--tau .* must be a number >= 0"):
        evaluate_usae(None, None, tau=tau)  # refused before the model or store is looked at
    assert MiningConfig(tau=0.0).tau == 0.0 and np.isfinite(MiningConfig().tau)


def test_a_busy_port_is_refused_before_the_banner_and_before_the_demo_builds_anything(tmp_path):
    """`serve --workers 1` let uvicorn fail with its own log after the banner; the demo found out
    only after minutes of extraction and training. The message says what to do: --port."""
    import socket

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    port = held.getsockname()[1]
    try:
        for args in (["serve", "--workers", "1", "--no-job-worker"], ["serve", "--workers", "2"], ["demo", "--small"]):
            data = tmp_path / args[0] / args[-1]
            result = CliRunner().invoke(cli, [*args, "--port", str(port), "--data-dir", str(data)])
            assert isinstance(result.exception, UsaeError), (args, result.output)
            assert str(result.exception).startswith(f"cannot listen on 127.0.0.1:{port}: "), args
            assert str(result.exception).endswith(f"stop it, or pass another, e.g. --port {port + 1}"), args
            assert "USAE Concept Explorer on" not in result.output and not data.exists(), args
    finally:
        held.close()


def test_version_and_short_help_on_every_command():
    from importlib.metadata import version

    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"usae {version('usae-explorer')}"
    for args in ([], ["extract"], ["models", "list"], ["user", "add"]):
        result = CliRunner().invoke(cli, [*args, "-h"])
        assert result.exit_code == 0 and "Usage: usae" in result.output, args


def test_options_that_would_be_ignored_are_refused(tmp_path):
    """--seed and --small shape only the built-in demo set; --per-concept only the JSON."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for extra in (["--seed", "3"], ["--small"]):
        result = CliRunner().invoke(cli, ["extract", "--images", str(folder), "--out", "s", *extra,
                                          "--data-dir", str(tmp_path / "data")])
        assert isinstance(result.exception, UsaeError), result.output
        assert str(result.exception) == f"{extra[0]} applies only to --images demo"
    result = CliRunner().invoke(cli, ["eval", "somerun", "--store", "s", "--per-concept",
                                      "--data-dir", str(tmp_path / "data")])
    assert str(result.exception) == "--per-concept adds arrays to the JSON output: pass --json too"


def test_a_folder_named_demo_is_not_taken_silently_for_the_demo_set(tmp_path, monkeypatch):
    (tmp_path / "demo").mkdir()
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["extract", "--images", "demo", "--out", str(tmp_path / "photos"),
                                      "--weights", "malformed", "--data-dir", str(tmp_path / "data")])
    assert "--images demo is the built-in demo set, not the folder ./demo here" in result.output
    assert isinstance(result.exception, UsaeError)  # stopped at --weights, before building anything


def test_a_mistyped_model_layer_or_dtype_fails_before_the_demo_set_is_built(tmp_path):
    """The full demo set takes seconds to minutes to build; a typo in --models, --layer or
    --dtype used to surface only after it."""
    data = tmp_path / "data"
    for extra, message in ((["--models", "mobilenet_v3"], "unknown backbone 'mobilenet_v3'; did you mean"),
                           (["--models", "mobilenet_v2", "--layer", "mobilenet_v2=features.99"], "features.99"),
                           (["--dtype", "fp16"], "unknown store dtype 'fp16'; choose one of float16, bfloat16, float32")):
        result = CliRunner().invoke(cli, ["extract", "--images", "demo", "--out", "s", *extra, "--data-dir", str(data)])
        assert isinstance(result.exception, UsaeError), result.output
        assert message in str(result.exception)
        assert not (data / "images").exists() and not (data / "stores").exists()


def test_listing_a_data_directory_that_is_not_there_refuses_instead_of_making_it(tmp_path, monkeypatch):
    monkeypatch.delenv("USAE_DATABASE_URL", raising=False)
    typo = tmp_path / "usae-dta"
    for args in (["runs", "list"], ["user", "list"], ["runs", "delete", "x", "--yes"]):
        result = CliRunner().invoke(cli, [*args, "--data-dir", str(typo)])
        assert isinstance(result.exception, UsaeError), (args, result.output)
        assert str(result.exception).startswith(f"there is no data directory at {typo}: check --data-dir"), args
    assert not typo.exists()
    made = CliRunner().invoke(cli, ["user", "add", "first", "--password", "long-enough-1", "--data-dir", str(typo)])
    assert made.exit_code == 0 and (typo / "usae.db").exists()  # adding the first analyst may make it


def test_a_run_or_store_named_in_a_missing_data_directory_says_the_directory_is_missing(tmp_path, monkeypatch):
    """`usae eval demo` outside the folder holding ./usae-data said only "there is no USAE run at
    usae-data/runs/demo", as if the run were missing, not the whole data directory."""
    monkeypatch.delenv("USAE_DATABASE_URL", raising=False)
    typo = tmp_path / "usae-dta"
    for args, what in ((["eval", "demo"], "run demo"), (["mine", "demo"], "run demo"),
                       (["cam", "demo", "--concept", "0"], "run demo"),
                       (["train", "--store", "demo", "--out", "run"], "store demo")):
        result = CliRunner().invoke(cli, [*args, "--data-dir", str(typo)])
        assert isinstance(result.exception, UsaeError), (args, result.output)
        assert str(result.exception).startswith(
            f"there is no data directory at {typo} (looking for the {what} in it): check --data-dir"), args
    assert not typo.exists()


def test_commands_that_render_pages_say_so_at_once_when_the_templates_are_not_installed(tmp_path, monkeypatch):
    """A built package (not the editable install) has no templates/ or static/: serve failed
    with a FileNotFoundError traceback, and the demo only at its mine, after minutes of work."""
    import app.templating

    monkeypatch.setattr(app.templating, "STATIC_DIR", tmp_path / "site-packages" / "static")
    for args in (["serve", "--no-job-worker"], ["demo", "--small", "--no-serve"], ["mine", "somerun"]):
        data = tmp_path / args[0]
        result = CliRunner().invoke(cli, [*args, "--data-dir", str(data)])
        assert isinstance(result.exception, UsaeError), (args, result.output)
        assert str(result.exception).startswith("the explorer's page templates are not where it reads them "
                                                f"({tmp_path / 'site-packages' / 'static'} missing)"), args
        assert "bash scripts/install.sh" in str(result.exception) and not data.exists(), args
