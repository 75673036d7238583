"""Extraction: image files -> backbones -> store, checked row by row against direct forward passes."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.distributed as dist
from PIL import Image

from usae_core.backbones import create_backbone
from usae_core.errors import UsaeError
from usae_core.extract import ExtractTimings, GridRows, extract_store, resample_grid
from usae_core.images import FolderSource, load_masks
from usae_core.locks import exclusive_lock
from usae_core.store import ActivationStore
from tests.core.test_images import save_exif_rotated, upright_pattern

TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny_dinov2():
    """A random-init DINOv2-shaped ViT: 16x16 patches at 224 px, so it needs resampling to 14x14."""
    torch.manual_seed(0)
    return create_backbone("timm:vit_small_patch14_dinov2", random_init=True, model_kwargs=TINY_VIT)


@pytest.fixture(scope="module")
def mobilenet():
    return create_backbone("mobilenet_v2")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Twins that must give identical activations, plus two broken files.

    alpha.png (transparent left half) / alpha_flat.png (the same, composited on white);
    grey.png (mode L) / grey_rgb.png; rotated.png (EXIF orientation 6) / upright.png."""
    root = tmp_path_factory.mktemp("messy")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((150, 200, 1), 255, np.uint8)], -1)
    rgba[:, :100, 3] = 0
    Image.fromarray(rgba, "RGBA").save(root / "alpha.png")
    flat = rgb.copy()
    flat[:, :100] = 255
    Image.fromarray(flat).save(root / "alpha_flat.png")
    grey = rng.integers(0, 256, (180, 180), dtype=np.uint8)
    Image.fromarray(grey, "L").save(root / "grey.png")
    Image.fromarray(np.stack([grey] * 3, -1)).save(root / "grey_rgb.png")
    upright = upright_pattern(120, 200)
    save_exif_rotated(root / "rotated.png", upright)
    Image.fromarray(upright).save(root / "upright.png")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not the rest of a jpeg")
    (root / "truncated.png").write_bytes((root / "upright.png").read_bytes()[:200])
    return root


TWINS = [("alpha.png", "alpha_flat.png"), ("grey.png", "grey_rgb.png"), ("rotated.png", "upright.png")]


@contextlib.contextmanager
def failing_at_batch(backbone, n: int, error: BaseException) -> Iterator[None]:
    """Inside the block, the backbone's `n`-th forward pass raises `error`."""
    calls = []

    def hook(_module, _inputs, _output):
        calls.append(1)
        if len(calls) == n:
            raise error

    handle = backbone.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def direct_tokens(backbone, src: FolderSource, image_id: str, grid: tuple[int, int]) -> np.ndarray:
    """The reference: one image through the backbone by hand, resampled to the store grid."""
    with torch.no_grad():
        tokens = backbone(backbone.preprocess(src.load(image_id))[None])
    return resample_grid(tokens, backbone.native_grid, grid)[0].numpy()


def test_resampling_matches_pil_bilinear():
    """Reference: PIL's antialiased bilinear resize of each channel as a float image."""
    rng = np.random.default_rng(0)
    for native, grid in [((16, 16), (14, 14)), ((7, 7), (14, 14)), ((28, 28), (14, 14)), ((16, 12), (14, 14))]:
        maps = rng.normal(size=(5, *native)).astype(np.float32)
        want = np.stack([np.asarray(Image.fromarray(m, "F").resize(grid[::-1], Image.Resampling.BILINEAR))
                         for m in maps])
        tokens = torch.from_numpy(maps.reshape(5, -1).T.copy())[None]
        got = resample_grid(tokens, native, grid)[0].T.reshape(5, *grid).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)
    same = torch.randn(1, 196, 3)
    assert resample_grid(same, (14, 14), (14, 14)) is same


def test_resampling_is_interpolate_in_float64_and_stays_float32_under_autocast():
    """Reference: F.interpolate's antialiased bilinear on the [B, D, h, w] maps, in float64."""
    gen = torch.Generator().manual_seed(0)
    for native, grid in [((16, 16), (14, 14)), ((5, 9), (14, 14)), ((37, 37), (14, 14)), ((1, 6), (14, 14))]:
        tokens = torch.randn(3, native[0] * native[1], 4, generator=gen, dtype=torch.float64)
        maps = tokens.transpose(1, 2).reshape(3, 4, *native)
        want = F.interpolate(maps, size=grid, mode="bilinear", align_corners=False, antialias=True)
        got = resample_grid(tokens, native, grid)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got.transpose(1, 2).reshape(3, 4, *grid), want, rtol=1e-12, atol=1e-12)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as extraction runs it: bf16 tokens in
            low = resample_grid(tokens.bfloat16(), native, grid)
        assert low.dtype == torch.float32
        torch.testing.assert_close(low, resample_grid(tokens.bfloat16().double(), native, grid).float(),
                                   rtol=1e-6, atol=1e-6)


def test_resampling_first_met_under_inference_mode_still_differentiates():
    """Extraction meets a grid first under inference mode; CAM later differentiates through it."""
    from usae_core.extract import resample_matrix

    resample_matrix.cache_clear()
    with torch.inference_mode():
        resample_grid(torch.randn(1, 48, 2), (6, 8), (5, 5))
    tokens = torch.randn(1, 48, 2, dtype=torch.float32, requires_grad=True)
    resample_grid(tokens, (6, 8), (5, 5)).sum().backward()
    # Each output cell's weights sum to 1, so a token's gradient is its weights' total.
    torch.testing.assert_close(tokens.grad.sum(), torch.tensor(2 * 25.0))


def test_grid_rows_is_the_whole_step_in_the_store_dtype_with_one_flag_per_image():
    """Extraction's per-batch step (normalise, forward, resample, cast, finiteness flag) against
    the same steps recomputed in float64, and a NaN planted in one image flags that image only."""
    backbone = tiny_dinov2().eval()
    views = torch.randint(0, 256, (3, 3, 224, 224), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    with torch.no_grad():
        rows, non_finite = GridRows(backbone, (14, 14), torch.float16)(views)
        reference = resample_grid(backbone.double()(backbone.normalize(views).double()), (16, 16), (14, 14))
    backbone.float()
    assert rows.dtype == torch.float16 and rows.shape == (3, 196, 32)
    torch.testing.assert_close(rows.double(), reference, rtol=2e-3, atol=2e-3)  # float32 compute, float16 storage
    assert non_finite.tolist() == [False, False, False]

    plant = backbone.register_forward_hook(lambda _m, _i, out: out.index_fill(0, torch.tensor([1]), float("nan")))
    try:
        with torch.no_grad():
            rows, non_finite = GridRows(backbone, (14, 14), torch.float16)(views)
    finally:
        plant.remove()
    assert non_finite.tolist() == [False, True, False]
    same = GridRows(create_backbone("timm:vit_base_patch16_224", random_init=True, model_kwargs=TINY_VIT), (14, 14),
                    torch.float32)
    assert same.matrix is None  # a model already on the grid is not resampled


def test_messy_folder_extracts_correctly_and_reports_corrupt_files(folder, mobilenet, tmp_path, caplog):
    dino = tiny_dinov2()
    with caplog.at_level(logging.WARNING):
        # Two worker processes decode chunks of 2 images, joined into batches of 8 that span
        # shards and carry the corrupt files' zero rows.
        store = extract_store(folder, [mobilenet, dino], tmp_path / "store", batch_size=8, shard_images=2,
                              num_workers=2, progress=False, dtype="float32")
    assert "corrupt.jpg" in caplog.text and "truncated.png" in caplog.text
    assert set(store.meta["skipped_images"]) == {"corrupt.jpg", "truncated.png"}
    assert store.image_ids == sorted(n for pair in TWINS for n in pair)
    assert store.grid == (14, 14) and store.dims == {"mobilenet_v2": 96, "vit_small_patch14_dinov2": 32}
    assert store.meta["image_root"] == str(folder.resolve()) and store.meta["demo"] is False
    assert store.meta["image_size"] == 224
    info = store.model_info("vit_small_patch14_dinov2")
    assert info["native_grid"] == [16, 16] and info["weights"] == "random-init" and info["registry_name"] == \
        "timm:vit_small_patch14_dinov2"
    assert store.model_info("mobilenet_v2")["layer"] == "features.13"
    src = FolderSource(folder)
    for b in (mobilenet, dino):
        for i, image_id in enumerate(store.image_ids):
            np.testing.assert_allclose(store.image_tokens(b.store_name, i), direct_tokens(b, src, image_id, (14, 14)),
                                       atol=2e-4, rtol=1e-3, err_msg=image_id)
        for a, twin in TWINS:
            ia, it = store.image_ids.index(a), store.image_ids.index(twin)
            np.testing.assert_allclose(store.image_tokens(b.store_name, ia), store.image_tokens(b.store_name, it),
                                       atol=1e-5, err_msg=a)


def test_timings_account_for_the_loop(folder, mobilenet, tmp_path):
    """The stage timings add up: a backbone made 50 ms slower per batch shows as backbone time."""
    hook = mobilenet.register_forward_hook(lambda *_: time.sleep(0.05))
    timings = ExtractTimings()
    started = time.perf_counter()
    try:
        store = extract_store(folder, [mobilenet], tmp_path / "store", batch_size=2, shard_images=2, num_workers=0,
                              progress=False, timings=timings)
    finally:
        hook.remove()
    wall = time.perf_counter() - started
    assert timings.images == 8 and store.n_images == 6  # two unreadable files were decoded, then dropped
    assert timings.backbones >= 4 * 0.05  # 4 batches of 2
    parts = timings.first_batch + timings.waiting_for_images + timings.backbones + timings.waiting_for_writes
    assert 0 < timings.first_batch and parts <= timings.loop + 1e-3
    assert "8 images in" in timings.summary() and "backbones" in timings.summary()
    # Around the loop: the compaction that drops the two failed images counts as finalising.
    assert timings.setup > 0 and timings.finalizing > 0 and timings.stopping_loader >= 0
    assert timings.setup + timings.loop + timings.stopping_loader + timings.finalizing <= wall
    assert "finalising" in timings.summary()


def test_interrupted_run_resumes_with_only_the_missing_shards(folder, mobilenet, tmp_path, capfd):
    out = tmp_path / "store"
    seen: list[int] = []

    def count(_module, inputs, _output):
        seen.append(inputs[0].shape[0])
        if len(seen) == 3:
            raise RuntimeError("simulated crash")

    handle = mobilenet.register_forward_hook(count)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract_store(folder, [mobilenet], out, batch_size=2, shard_images=2, num_workers=0, progress=False)
    handle.remove()
    with pytest.raises(UsaeError, match="unfinished"):
        ActivationStore.open(out)
    done = len(list((out / "done").iterdir()))
    assert 1 <= done < 4  # 8 files in 4 shards: the 2 unreadable ones are found while extracting
    seen.clear()
    handle = mobilenet.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape[0]))
    capfd.readouterr()
    try:
        store = extract_store(folder, [mobilenet], out, batch_size=2, shard_images=2, num_workers=0, progress=True)
    finally:
        handle.remove()
    assert sum(seen) == 8 - 2 * done  # finished shards were not recomputed
    bar = capfd.readouterr().err
    assert re.search(rf"extract: .*\b{2 * done}/8\b", bar) and re.search(r"\b8/8\b", bar), bar  # starts where it was
    fresh = extract_store(folder, [mobilenet], tmp_path / "fresh", batch_size=6, num_workers=0, progress=False)
    for i in range(6):
        np.testing.assert_array_equal(store.image_tokens("mobilenet_v2", i), fresh.image_tokens("mobilenet_v2", i))
    seen.clear()
    extract_store(folder, [mobilenet], out, batch_size=2, shard_images=2, num_workers=0, progress=False)
    assert not seen  # a complete store is left as it is


@pytest.mark.parametrize("error", [RuntimeError("backbone on fire"), KeyboardInterrupt()])
def test_a_first_extraction_that_fails_before_any_shard_leaves_nothing(folder, mobilenet, tmp_path, error):
    """Nothing finished, nothing to resume: no stub that could pass for a store, and a folder
    that was there (empty) before stays as it was."""
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty"):
        with failing_at_batch(mobilenet, 1, error), pytest.raises(type(error)):
            extract_store(folder, [mobilenet], out, batch_size=2, shard_images=2, num_workers=0, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["empty"] and not list((tmp_path / "empty").iterdir())


def test_an_unfinished_store_is_refused_by_train_mine_and_eval_with_the_way_out(folder, mobilenet, tmp_path):
    """A store whose extraction stopped after some shards stays, to be resumed; the commands
    that read a store refuse it, naming it and the command that finishes it."""
    from typer.testing import CliRunner

    from app.cli import cli
    from usae_core.config import USAEConfig
    from usae_core.model import USAE

    out = tmp_path / "store"
    with failing_at_batch(mobilenet, 3, RuntimeError("backbone on fire")), pytest.raises(RuntimeError):
        extract_store(folder, [mobilenet], out, batch_size=2, shard_images=2, num_workers=0, progress=False)
    assert list((out / "done").iterdir())  # finished shards are kept for the rerun
    run = tmp_path / "run"
    USAE(USAEConfig(model_dims={"mobilenet_v2": 96}, n_concepts=8, k=2)).save_pretrained(run)
    common = ["--store", str(out), "--data-dir", str(tmp_path / "data"), "--device", "cpu"]
    for args in (["train", "--out", str(tmp_path / "new-run"), "--steps", "1"], ["mine", str(run)], ["eval", str(run)]):
        result = CliRunner().invoke(cli, args + common)
        assert result.exit_code != 0, args
        message = str(result.exception)
        assert str(out) in message and "unfinished" in message and "usae extract" in message, (args, message)
    assert not (tmp_path / "new-run").exists() and not (tmp_path / "data" / "usae.db").exists()


def test_activations_beyond_the_store_dtype_stop_with_a_clear_error(folder, tmp_path):
    """The extractor checks finiteness itself (on the device) and skips the store's host scan,
    so its check must still refuse values that overflow float16, and write no shard."""
    backbone = tiny_dinov2()
    handle = backbone.register_forward_hook(lambda _m, _i, out: out * 1e6)
    try:
        with pytest.raises(UsaeError, match="NaN or Inf in float16"):
            extract_store(folder, [backbone], tmp_path / "store", batch_size=3, num_workers=0, progress=False)
    finally:
        handle.remove()
    assert not (tmp_path / "store").exists()


def test_a_store_never_overlaps_its_image_folder(folder, mobilenet, tmp_path):
    """Writing (or overwriting) a store over the images it reads would destroy them."""
    images = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    for out, overwrite in ((Path(folder), True), (Path(folder) / "store", False), (Path(folder).parent, True)):
        with pytest.raises(UsaeError, match="overlap"):
            extract_store(folder, [mobilenet], out, num_workers=0, progress=False, overwrite=overwrite)
    assert sorted(p for p in Path(folder).rglob("*") if p.is_file()) == images


def test_an_unknown_compile_mode_is_refused_before_anything_is_written(folder, mobilenet, tmp_path):
    # CUDA-graph modes would let the next replay overwrite outputs the shard copies still read
    with pytest.raises(UsaeError, match="unknown compile mode 'reduce-overhead'"):
        extract_store(folder, [mobilenet], tmp_path / "store", num_workers=0, progress=False,
                      compile="reduce-overhead")
    assert not (tmp_path / "store").exists()


def test_a_different_layout_needs_overwrite(folder, mobilenet, tmp_path):
    out = tmp_path / "store"
    extract_store(folder, [mobilenet], out, num_workers=0, progress=False)
    dino = tiny_dinov2()
    with pytest.raises(UsaeError, match="different layout"):
        extract_store(folder, [mobilenet, dino], out, num_workers=0, progress=False)
    store = extract_store(folder, [mobilenet, dino], out, num_workers=0, progress=False, overwrite=True, grid=(7, 7))
    assert store.model_names == ["mobilenet_v2", "vit_small_patch14_dinov2"] and store.grid == (7, 7)
    with pytest.raises(UsaeError, match="share a store name"):
        extract_store(folder, [mobilenet, mobilenet], tmp_path / "dup", num_workers=0, progress=False)


def test_a_second_extraction_into_the_same_store_is_refused(folder, mobilenet, tmp_path):
    """While one extraction writes a store, another into it (resume or --overwrite) is refused
    before it creates anything; the lock goes with the first one."""
    out = tmp_path / "store"
    with exclusive_lock(out, "usae extract"):  # as an extraction in another process holds it
        for overwrite in (False, True):
            with pytest.raises(UsaeError, match="being written by another usae extract"):
                extract_store(folder, [mobilenet], out, num_workers=0, progress=False, overwrite=overwrite)
        assert [p.name for p in tmp_path.iterdir()] == [".store.lock"]
    extract_store(folder, [mobilenet], out, num_workers=0, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["store"]


def test_a_failed_overwrite_leaves_the_old_store_whole(folder, mobilenet, tmp_path):
    """--overwrite builds the new store beside the old one: a backbone that fails midway leaves
    the old store readable, row for row, and nothing else beside it."""
    out = tmp_path / "store"
    old = extract_store(folder, [mobilenet], out, shard_images=2, num_workers=0, progress=False)
    rows = [old.image_tokens("mobilenet_v2", i) for i in range(old.n_images)]
    with failing_at_batch(mobilenet, 2, RuntimeError("backbone on fire")), pytest.raises(RuntimeError):
        extract_store(folder, [mobilenet], out, batch_size=2, shard_images=2, grid=(7, 7), num_workers=0,
                      progress=False, overwrite=True)
    kept = ActivationStore.open(out)
    assert kept.grid == (14, 14) and kept.n_images == len(rows)
    for i, want in enumerate(rows):
        np.testing.assert_array_equal(kept.image_tokens("mobilenet_v2", i), want)
    assert [p.name for p in tmp_path.iterdir()] == ["store"]
    replaced = extract_store(folder, [mobilenet], out, grid=(7, 7), num_workers=0, progress=False, overwrite=True)
    assert replaced.grid == (7, 7) and [p.name for p in tmp_path.iterdir()] == ["store"]


# ----------------------------------------------------------------------------- torchrun-style sharding
def _rank_main(rank: int, world_size: int, init_file: str, folder: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        extract_store(folder, [tiny_dinov2()], out, batch_size=2, shard_images=1, num_workers=0, progress=False,
                      device="cpu")
    finally:
        dist.destroy_process_group()


def test_two_ranks_fill_disjoint_shards_into_one_store(folder, tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "dist"
    mp.spawn(_rank_main, args=(2, str(tmp_path / "pg-init"), str(folder), str(out)), nprocs=2, join=True)
    store = ActivationStore.open(out)
    single = extract_store(folder, [tiny_dinov2()], tmp_path / "single", batch_size=2, shard_images=1,
                           num_workers=0, progress=False)
    assert store.n_images == single.n_images == 6 and store.manifest["complete"]
    # The two unreadable files failed on the ranks that read them and were dropped at the end.
    assert store.image_ids == single.image_ids and set(store.meta["skipped_images"]) == {"corrupt.jpg", "truncated.png"}
    for i in range(6):
        np.testing.assert_allclose(store.image_tokens("vit_small_patch14_dinov2", i),
                                   single.image_tokens("vit_small_patch14_dinov2", i), atol=1e-3)


# ----------------------------------------------------------------------------- CLI
def test_cli_extract_and_models_list(folder, data_dir):
    from typer.testing import CliRunner

    from app.cli import cli

    runner = CliRunner()
    result = runner.invoke(cli, ["extract", "--images", str(folder), "--models", "mobilenet_v2", "--out", "messy",
                                 "--workers", "0", "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert "wrote " in result.output and "6 images x 14x14 tokens" in result.output
    assert "skipped 2 unreadable" in result.output
    assert "8 images in" in result.output and "waiting for images" in result.output  # where the time went
    again = runner.invoke(cli, ["extract", "--images", str(folder), "--models", "mobilenet_v2", "--out", "messy",
                                "--workers", "0", "--data-dir", str(data_dir)])
    assert again.exit_code == 0 and "images in" not in again.output  # finished: nothing extracted again
    assert "already complete, nothing to extract:" in again.output and "wrote" not in again.output
    assert ActivationStore.open(data_dir / "stores" / "messy").dims == {"mobilenet_v2": 96}
    listing = runner.invoke(cli, ["models", "list", "--json", "--data-dir", str(data_dir)])
    rows = {r["name"]: r for r in json.loads(listing.output)}
    assert all(rows[n]["offline"] for n in ("mobilenet_v2", "efficientnet_lite0", "hed_vgg16"))
    assert rows["timm:*"]["offline"] is None
    bad = runner.invoke(cli, ["extract", "--images", str(folder), "--out", "x", "--weights", "oops",
                              "--data-dir", str(data_dir)])
    assert bad.exit_code != 0 and "NAME=VALUE" in str(bad.exception)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_demo_extract_train_eval_round_trip(tmp_path):
    """The embedded default on a small demo set: real backbones -> store -> USAE -> metrics."""
    from usae_core.backbones import default_backbones
    from usae_core.config import TrainConfig, USAEConfig
    from usae_core.demo_images import build_demo_set
    from usae_core.metrics import evaluate_usae
    from usae_core.train import train_usae

    demo = build_demo_set(tmp_path / "demo", seed=0, n_images=96, workers=2)
    store = extract_store(demo, default_backbones(), tmp_path / "store", batch_size=32, progress=False)
    assert store.meta["demo"] is True and store.meta["defect_types"][0] == "crack"
    assert store.dims == {"efficientnet_lite0": 112, "hed_vgg16": 512, "mobilenet_v2": 96}
    manifest = json.loads((demo / "demo.json").read_text())
    cracked = next(i for i, r in manifest["images"].items() if "crack" in r["defects"])
    assert load_masks(store.meta["image_root"], cracked, size=store.meta["image_size"])["crack"].any()
    model = train_usae(store, tmp_path / "run", USAEConfig(model_dims=store.dims, n_concepts=128, k=8, encoder="linear"),
                       TrainConfig(steps=150, batch_size=256, lr=1e-2, loss="mse", warmup_steps=5, device="cpu",
                                   checkpoint_every=0, log_every=100))
    result = evaluate_usae(model, store)
    assert result.models == list(store.dims) and np.isfinite(result.r2).all()
    # Each model is reconstructed from its own code and from the others' (about 0.49 / 0.35 here).
    assert result.r2_self > 0.3 and result.r2_cross > 0.2, result.r2


def test_loader_chunks_are_joined_into_whole_batches_in_order():
    """Chunks of 2 images join into batches of at most 5 (so 4), views and failures aligned."""
    from torch.utils.data import DataLoader

    from usae_core.extract import _joined_batches

    items = [(i, [torch.full((3, 2, 2), i, dtype=torch.uint8)], "bad" if i == 6 else "") for i in range(11)]
    batches = list(_joined_batches(DataLoader(items, batch_size=2), torch.device("cpu"), 5))
    assert [b[0] for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    for indices, views, failures in batches:
        assert views[0][:, 0, 0, 0].tolist() == indices
        assert failures == ["bad" if i == 6 else "" for i in indices]


def test_fast_pinning_is_added_to_the_allocator_options_unless_pinning_is_configured():
    from usae_core.extract import FAST_PINNING, use_fast_pinning

    env: dict[str, str] = {}
    use_fast_pinning(env)
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == FAST_PINNING
    env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    use_fast_pinning(env)
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == f"expandable_segments:True,{FAST_PINNING}"
    env = {"PYTORCH_CUDA_ALLOC_CONF": "pinned_use_background_threads:True"}
    use_fast_pinning(env)
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "pinned_use_background_threads:True"
    env = {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}  # the newer name: the options join it
    use_fast_pinning(env)
    assert env == {"PYTORCH_ALLOC_CONF": f"expandable_segments:True,{FAST_PINNING}"}
    env = {"PYTORCH_ALLOC_CONF": "pinned_use_background_threads:True"}
    use_fast_pinning(env)
    assert env == {"PYTORCH_ALLOC_CONF": "pinned_use_background_threads:True"}


def test_shard_buffers_reach_the_writer_page_aligned(folder, mobilenet, tmp_path, monkeypatch):
    """Every model's rows leave the shard buffers page-aligned, so a large shard can go to the
    disk directly (usae_core.npy_direct), whatever the buffer's offsets inside its allocation."""
    import usae_core.store as store_module
    from usae_core.npy_direct import is_aligned

    handed = []
    real_save = store_module.save_npy

    def spy(path, array):
        handed.append(is_aligned(array))
        return real_save(path, array)

    monkeypatch.setattr(store_module, "save_npy", spy)
    extract_store(folder, [mobilenet], tmp_path / "store", batch_size=3, shard_images=3, num_workers=0, progress=False)
    assert handed and all(handed)


def test_a_backbone_keeps_its_compiled_wrapper_for_the_next_extraction():
    """Compiled graphs are reused by the next extraction with the same backbone (a fresh
    wrapper had Dynamo trace it again in the first batch); nothing joins the backbone's state."""
    from usae_core.extract import NormalizedBackbone, normalized_tokens

    backbone = tiny_dinov2()
    keys = set(backbone.state_dict())
    first = normalized_tokens(backbone, True)
    assert normalized_tokens(backbone, True) is first
    assert normalized_tokens(backbone, "max-autotune-no-cudagraphs") is not first  # one per mode
    assert normalized_tokens(tiny_dinov2(), True) is not first  # kept per backbone, not per name
    assert isinstance(normalized_tokens(backbone, False), NormalizedBackbone)  # eager: nothing kept
    assert set(backbone.state_dict()) == keys and not any("compiled" in n for n, _ in backbone.named_modules())


def test_the_warm_up_runs_each_backbone_once_on_zeros_of_its_input_size():
    """On a GPU the extraction queues every backbone once on zeros while the loader's workers
    decode the first images (its one-time costs then overlap that wait)."""
    from usae_core.extract import GridRows, _warm_up

    backbone = tiny_dinov2()
    rows = GridRows(backbone, (3, 3), torch.float16)
    seen = []
    rows.tokens.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    _warm_up({backbone.store_name: rows}, [backbone], 4, torch.device("cpu"))()
    size = backbone.input_size
    assert [(t.shape, t.dtype) for t in seen] == [((4, 3, size, size), torch.uint8)]
    assert not seen[0].any() and not seen[0].is_inference()  # as the loader's batches: no recompile
