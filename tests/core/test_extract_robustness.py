"""What killed, interrupted or mistyped extractions leave, and what the next run makes of it:
stale temporary files, a store folder without a manifest, a folder of unreadable images,
options naming no model, outputs that are files, Ctrl-C."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import usae_core.demo_images
import usae_core.extract
from app.cli import cli
from usae_core.errors import UsaeError
from usae_core.extract import ExtractInterrupted, extract_store
from usae_core.images import FolderSource
from usae_core.store import ActivationStore, import_activations
from tests.core.test_extract import tiny_dinov2

MODEL = "vit_small_patch14_dinov2"


@pytest.fixture(scope="module")
def backbone():
    return tiny_dinov2()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(out / f"{i:02d}.png")
    return out


def _extract(folder: Path, backbone, out: Path, **kw) -> ActivationStore:
    return extract_store(folder, [backbone], out, batch_size=2, shard_images=2, num_workers=0, progress=False,
                         dtype="float32", **kw)


def _interrupt_at_batch(backbone, n: int, exc: BaseException):
    seen = []

    def hook(*_):
        seen.append(1)
        if len(seen) == n:
            raise exc
    return backbone.register_forward_hook(hook)


def test_a_rerun_removes_temporary_files_that_a_killed_run_left(folder, backbone, tmp_path):
    out = tmp_path / "store"
    handle = _interrupt_at_batch(backbone, 2, RuntimeError("simulated crash"))
    try:
        with pytest.raises(RuntimeError):
            _extract(folder, backbone, out)
    finally:
        handle.remove()
    # What a SIGKILL during a shard write and a marker write leaves (atomic_path's temp names).
    (out / MODEL / ".shard-000001.npy.a3pz837s.tmp").write_bytes(b"\0" * 4096)
    (out / "done" / ".shard-000001.x1y2z3.tmp").write_text("ok\n")
    store = _extract(folder, backbone, out)
    assert store.n_images == 6
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_a_store_folder_killed_before_its_manifest_is_treated_as_empty(folder, backbone, tmp_path):
    """A hard exit between creating the folder and writing the manifest used to block every
    rerun: 'already exists', and with --overwrite 'holds no activation store'."""
    out = tmp_path / "store"
    script = (
        "import os, sys\n"
        "import usae_core.store as store\n"
        "real = store.atomic_write_json\n"
        "def dying(target, obj):\n"
        "    if str(target).endswith('manifest.json'):\n"
        "        os._exit(9)\n"
        "    real(target, obj)\n"
        "store.atomic_write_json = dying\n"
        f"store.ActivationStore.create({str(out)!r}, models={{'m': 4}}, grid=(1, 1), image_ids=['a'])\n")
    assert subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2]).returncode == 9
    assert [p.name for p in out.iterdir()] == ["image_ids.json"]
    left = tmp_path / "left"
    shutil.copytree(out, left)
    assert _extract(folder, backbone, out).n_images == 6  # a plain rerun
    assert _extract(folder, backbone, left, overwrite=True).n_images == 6  # or one with --overwrite
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no replacement was needed


def test_a_folder_of_unreadable_images_leaves_no_store_and_the_rerun_reads_the_fixed_files(backbone, tmp_path):
    images = tmp_path / "bad"
    images.mkdir()
    for name in ("a.png", "b.png"):
        (images / name).write_bytes(b"not an image")
    out = tmp_path / "store"
    with pytest.raises(UsaeError, match="none of the 2 images could be read .*no store was written"):
        _extract(images, backbone, out)
    assert not out.exists()  # nothing cached: a rerun tries the files again
    for name in ("a.png", "b.png"):
        Image.new("RGB", (32, 32), (10, 20, 30)).save(images / name)
    store = _extract(images, backbone, out)
    assert store.n_images == 2 and not store.meta["skipped_images"]


def test_weights_or_layers_of_a_model_not_extracted_are_refused(folder, tmp_path):
    with pytest.raises(UsaeError, match="--weights names mobilenetv2, which is not one of the models: mobilenet_v2"):
        extract_store(folder, ["mobilenet_v2"], tmp_path / "s", weights={"mobilenetv2": "/my.pth"})
    with pytest.raises(UsaeError, match="--layer names mobilenetv2, which is not one of the models: mobilenet_v2"):
        extract_store(folder, ["mobilenet_v2"], tmp_path / "s", layers={"mobilenetv2": "features.10"})
    assert not (tmp_path / "s").exists()


def test_a_weights_file_that_is_not_a_checkpoint_is_named(folder, tmp_path):
    bad = tmp_path / "my.pth"
    bad.write_text("hello")
    with pytest.raises(UsaeError, match=r"--weights mobilenet_v2=.*my.pth is not a PyTorch checkpoint"):
        extract_store(folder, ["mobilenet_v2"], tmp_path / "s", weights={"mobilenet_v2": str(bad)})
    # A path that is not there is said so (the advice to pass --weights was what the user had done).
    with pytest.raises(UsaeError, match=r"--weights mobilenet_v2=.*nosuch.pth: there is no such file or folder$"):
        extract_store(folder, ["mobilenet_v2"], tmp_path / "s", weights={"mobilenet_v2": str(tmp_path / "nosuch.pth")})
    assert not (tmp_path / "s").exists()


def test_outputs_that_are_files_are_refused_and_left_alone(folder, backbone, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(UsaeError, match="is a file, not a folder"):
            _extract(folder, backbone, afile, overwrite=overwrite)
        with pytest.raises(UsaeError, match="is a file, not a folder"):
            import_activations(afile, {"m": np.zeros((2, 4, 3), np.float32)}, overwrite=overwrite)
    with pytest.raises(UsaeError, match="lies under .*afile, which is a file"):
        _extract(folder, backbone, afile / "store")
    assert afile.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # no .afile.replaced, no lock left


def test_an_image_folder_that_is_a_file_is_named_as_such(tmp_path):
    (tmp_path / "f.png").write_text("x")
    with pytest.raises(UsaeError, match="is a file, not a folder"):
        FolderSource(tmp_path / "f.png")


def test_ctrl_c_says_how_far_the_extraction_got(folder, backbone, tmp_path):
    out = tmp_path / "store"
    handle = _interrupt_at_batch(backbone, 3, KeyboardInterrupt())  # shards 0 and 1 are done
    try:
        with pytest.raises(ExtractInterrupted, match="interrupted after 4 of 6 images; rerun the same command"):
            _extract(folder, backbone, out)
    finally:
        handle.remove()
    assert _extract(folder, backbone, out).n_images == 6


def test_the_cli_prints_the_interruption_in_one_line_and_exits_130(folder, tmp_path, monkeypatch):
    def interrupted(*_a, **_kw):
        raise ExtractInterrupted("interrupted after 4 of 6 images; rerun the same command to continue")

    monkeypatch.setattr(usae_core.extract, "extract_store", interrupted)
    result = CliRunner().invoke(cli, ["extract", "--images", str(folder), "--out", str(tmp_path / "s"),
                                      "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 130
    assert result.output.strip() == "interrupted after 4 of 6 images; rerun the same command to continue"


def test_a_demo_set_of_another_seed_gets_a_folder_of_its_own(tmp_path, monkeypatch):
    """`--seed 1` builds images/demo-small-seed1 beside the default set, which stays as it was
    (stores extracted from it keep showing their own images); it needs no --overwrite."""
    calls = []
    real = usae_core.demo_images.build_demo_set

    def small_build(out_dir, seed=0, small=False, **kw):
        calls.append((Path(out_dir).name, seed))
        return real(out_dir, seed=seed, small=small, n_images=3, workers=1, overwrite=kw.get("overwrite", False))

    monkeypatch.setattr(usae_core.demo_images, "build_demo_set", small_build)
    monkeypatch.setattr(usae_core.extract, "extract_store", lambda *a, **kw: (_ for _ in ()).throw(UsaeError("stop")))
    data = tmp_path / "data"
    args = ["extract", "--images", "demo", "--small", "--out", "s", "--data-dir", str(data)]
    assert str(CliRunner().invoke(cli, args).exception) == "stop"
    default = {p.name: p.read_bytes() for p in (data / "images" / "demo-small").rglob("*") if p.is_file()}
    assert str(CliRunner().invoke(cli, [*args, "--seed", "1"]).exception) == "stop"
    assert ("demo-small-seed1", 1) in calls
    assert usae_core.demo_images.demo_set_is_current(data / "images" / "demo-small-seed1", 1, n_images=3)
    assert usae_core.demo_images.demo_set_is_current(data / "images" / "demo-small", 0, n_images=3)
    assert {p.name: p.read_bytes() for p in (data / "images" / "demo-small").rglob("*") if p.is_file()} == default


def test_a_grid_finer_than_every_models_own_is_allowed_and_said(folder, backbone, tmp_path, caplog):
    """--grid 100x100 on a 14x14 model silently wrote 51x the rows, all interpolated."""
    import logging

    native = tuple(backbone.native_grid)
    finer = (native[0] + 2, native[1] + 2)
    with caplog.at_level(logging.WARNING, logger="usae_core.extract"):
        store = _extract(folder, backbone, tmp_path / "fine", grid=finer)
    assert store.grid == finer
    assert (f"--grid {finer[0]}x{finer[1]} has more cells than any model's own grid "
            f"(the finest is {native[0]}x{native[1]})") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="usae_core.extract"):
        _extract(folder, backbone, tmp_path / "own", grid=native)
    assert "more cells" not in caplog.text


def test_a_grid_far_finer_than_every_models_own_is_refused_before_anything_is_written(folder, backbone, tmp_path):
    """--grid 1000x1000 on 7x7 models was killed for memory, leaving an unfinished store."""
    from usae_core.extract import MAX_GRID_FACTOR

    native = tuple(backbone.native_grid)
    limit = (MAX_GRID_FACTOR * native[0], MAX_GRID_FACTOR * native[1])
    with pytest.raises(UsaeError, match=rf"--grid \(grid\) {limit[0] + 1}x{limit[1]} is more than {MAX_GRID_FACTOR}x "
                                        rf"finer than the finest model grid \({native[0]}x{native[1]}\): at most "
                                        rf"{limit[0]}x{limit[1]}"):
        _extract(folder, backbone, tmp_path / "huge", grid=(limit[0] + 1, limit[1]))
    assert not (tmp_path / "huge").exists() and not list(tmp_path.glob(".huge*"))  # no store, no lock
    assert _extract(folder, backbone, tmp_path / "edge", grid=limit).grid == limit  # the limit itself is allowed
