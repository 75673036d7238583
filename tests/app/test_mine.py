"""`usae mine` into a real database: planted concept end to end, SQLite = Postgres, re-mining,
and interrupted mines (an exception, and a process killed with SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image as PILImage
from typer.testing import CliRunner

from app import pipeline
from app.cli import cli
from app.db import session_factory
from app.migrations import upgrade_database
from app.models import (
    Concept,
    ConceptDefectIoU,
    ConceptHistogram,
    ConceptModelStats,
    ConceptNeighbour,
    ConceptTopImage,
    Image,
    MiningGeneration,
    Run,
    RunModel,
)
from app.services import mining as mining_service
from app.services.mining import LAYER_SIZE, THUMBNAIL_SIZE, VIEW_SIZE, mine_run
from app.services.runs_view import list_runs
from app.settings import Settings
from tests.core.planted_concept import Planted, build_planted
from usae_core.images import load_image, square_view
from usae_core.mining import MiningConfig, mine_store

IMAGE_HW = (48, 64)


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory) -> tuple[Planted, Path]:
    """A planted store with image files, and the hand-set USAE saved as a run directory."""
    root = tmp_path_factory.mktemp("planted-run")
    planted = build_planted(root, image_files=IMAGE_HW, n_concepts=12)
    run_dir = root / "runs" / "planted"
    planted.model.save_pretrained(run_dir)
    return planted, run_dir


def _mine(url: str, media: Path, planted_run, **kwargs):
    planted, run_dir = planted_run
    return mine_run(url, media, run_dir, planted.store, planted.model, **kwargs)


def snapshot(url: str) -> dict:
    """Everything the explorer reads about every run, keyed by natural keys (no row ids, no times)."""
    with session_factory(url)() as s:
        out = {}
        for run in s.scalars(sa.select(Run).order_by(Run.name)):
            gen = run.active_generation_id
            models = {m.id: m.name for m in run.models}
            concepts = {c.id: c for c in s.scalars(sa.select(Concept).where(Concept.run_id == run.id))}

            def rows(table, *cols):
                query = sa.select(table).where(table.generation_id == gen)
                return sorted((models[r.run_model_id], concepts[r.concept_id].index,
                               *(getattr(r, col) for col in cols)) for r in s.scalars(query))

            tops = sorted((models[t.run_model_id], concepts[t.concept_id].index, t.rank, t.image.image_key,
                           t.image.store_index, t.image.thumbnail_path, t.activation, t.max_token, t.heatmap_path)
                          for t in s.scalars(sa.select(ConceptTopImage).where(ConceptTopImage.generation_id == gen)))
            out[run.name] = {
                "run": (run.run_dir, run.store_dir, run.image_set, run.n_images, run.n_tokens, run.n_concepts, run.k,
                        run.config, run.metrics),
                "models": [(m.position, m.name, m.family, m.dim, m.grid_h, m.grid_w, m.info) for m in run.models],
                "generation": s.get(MiningGeneration, gen).media_prefix if gen else None,
                "concepts": sorted((c.index, c.energy, c.firing_entropy, c.cofire, c.fire_count, c.frequency, c.dead,
                                    c.label, c.description, c.version, tuple(c.tags)) for c in concepts.values()),
                "model_stats": sorted((models[m.run_model_id], concepts[m.concept_id].index, m.fire_count, m.frequency,
                                       m.share, m.cofire, m.mean_activation, m.max_activation)
                                      for m in s.scalars(sa.select(ConceptModelStats).join(Concept)
                                                         .where(Concept.run_id == run.id))),
                "top_images": tops,
                "histograms": rows(ConceptHistogram, "bin_edges", "counts", "n_zero"),
                "neighbours": sorted((models[n.run_model_id], concepts[n.concept_id].index, n.rank,
                                      concepts[n.neighbour_id].index, n.cosine)
                                     for n in s.scalars(sa.select(ConceptNeighbour)
                                                        .where(ConceptNeighbour.generation_id == gen))),
                "iou": rows(ConceptDefectIoU, "defect_type", "iou"),
            }
        return out


def _cell_centre_diff(overlay: PILImage.Image, base: PILImage.Image, grid: tuple[int, int]) -> np.ndarray:
    """Mean absolute colour change at the centre pixel of each token cell: [gh, gw]."""
    diff = np.abs(np.asarray(overlay, np.float32) - np.asarray(base, np.float32)).mean(-1)
    size = overlay.width
    ys = ((np.arange(grid[0]) + 0.5) * size / grid[0]).astype(int)
    xs = ((np.arange(grid[1]) + 0.5) * size / grid[1]).astype(int)
    return diff[np.ix_(ys, xs)]


def test_mine_ranks_the_planted_images_first_with_heatmaps_on_the_planted_region(db_url, data_dir, planted_run):
    planted, run_dir = planted_run
    media = data_dir / "media"
    out = _mine(db_url, media, planted_run, cfg=MiningConfig(top_n=4, batch_images=8), batch_concepts=5)
    snap = snapshot(db_url)["planted"]
    ids = planted.store.image_ids
    for model in planted.store.model_names:
        tops = [t for t in snap["top_images"] if t[0] == model and t[1] == planted.concept]
        assert [t[3] for t in tops] == [ids[i] for i in planted.images], model
        for _, _, rank, key, _, thumb, activation, _, heatmap in tops:
            layer = PILImage.open(media / heatmap)
            assert layer.mode == "RGBA" and layer.size == (LAYER_SIZE, LAYER_SIZE)
            # What the explorer shows: the layer stacked over the image.
            base = square_view(load_image(planted.store.meta["image_root"] + "/" + key), LAYER_SIZE).convert("RGBA")
            overlay = PILImage.alpha_composite(base, layer).convert("RGB")
            diff = _cell_centre_diff(overlay, base.convert("RGB"), planted.store.grid)
            lit = np.zeros(planted.store.grid, bool)
            for r, c in planted.cells:
                lit[r, c] = True
            # Colour change depends on the random pixel under it, so compare lit against unlit.
            assert diff[lit].min() > 5, f"planted cells barely coloured: {diff}"
            assert diff[~lit].max() < diff[lit].min() / 10, f"heat outside the planted cells: {diff}"
            assert PILImage.open(media / thumb).size == (THUMBNAIL_SIZE, THUMBNAIL_SIZE)
    assert out.n_top_images == len(snap["top_images"])
    # The stored statistics are the core pass's numbers.
    result = mine_store(planted.model, planted.store, MiningConfig(top_n=4))
    stats, n_tokens, n_models = result.stats, planted.store.n_tokens, len(result.models)
    by_index = {c[0]: c for c in snap["concepts"]}
    for c in range(result.n_concepts):
        total = stats.fire_counts[:, c].sum()
        assert by_index[c][1] == pytest.approx(stats.energy[c])
        assert by_index[c][2] == pytest.approx(stats.firing_entropy[c])
        assert by_index[c][3] == pytest.approx(stats.cofire[:, c].mean())  # mean over models
        assert by_index[c][4] == total
        assert by_index[c][5] == pytest.approx(total / (n_tokens * n_models))
        assert by_index[c][6] == bool(stats.dead[c])
    # concept_model_stats: fire_count, frequency, share, cofire, mean_activation, max_activation.
    per_model = {(row[0], row[1]): row[2:] for row in snap["model_stats"]}
    assert len(per_model) == n_models * result.n_concepts
    for i, m in enumerate(result.models):
        for c in range(result.n_concepts):
            fires, total = stats.fire_counts[i, c], stats.fire_counts[:, c].sum()
            assert per_model[(m, c)] == pytest.approx((
                fires, fires / n_tokens, fires / total if total else 0.0, stats.cofire[i, c],
                stats.code_sums[i, c] / n_tokens, result.max_activation[i, c])), (m, c)
    np.testing.assert_allclose(snap["run"][8]["r2"], result.stats.r2, atol=1e-6)
    hist = {(h[0], h[1]): h for h in snap["histograms"]}
    for i, m in enumerate(result.models):
        for c in range(result.n_concepts):
            _, _, edges, counts, n_zero = hist[(m, c)]
            assert sum(counts) + n_zero == planted.store.n_tokens
            assert sum(counts) == result.hist_counts[i, c].sum()
            assert len(edges) == (len(counts) + 1 if counts else 0)
    assert len(snap["neighbours"]) == 3 * 12 * 8
    with session_factory(db_url)() as s:
        run = s.scalars(sa.select(Run)).one()
        assert run.status == "mined" and run.mined_at is not None
        assert [m.name for m in run.models] == planted.store.model_names


def test_mine_records_defect_iou_for_a_demo_set(db_url, tmp_path):
    planted = build_planted(tmp_path, image_files=IMAGE_HW, demo_set=True)
    run_dir = tmp_path / "runs" / "demo"
    planted.model.save_pretrained(run_dir)
    mine_run(db_url, tmp_path / "media", run_dir, planted.store, planted.model, cfg=MiningConfig(top_n=2))
    iou = {(m, c, kind): v for m, c, kind, v in snapshot(db_url)["demo"]["iou"]}
    assert len(iou) == 3 * 8
    for model in planted.store.model_names:
        assert iou[(model, planted.concept, "scratch")] == pytest.approx(1.0)
        # At its best threshold another concept may also isolate the planted cells (they carry the
        # largest activations), but none beats the planted one and most do not come close.
        others = [v for (m, c, _), v in iou.items() if m == model and c != planted.concept]
        assert max(others) <= iou[(model, planted.concept, "scratch")]
        assert sorted(others)[len(others) // 2] < 0.5


def test_the_same_mined_run_reads_identically_from_sqlite_and_postgres(sqlite_and_postgres_urls, tmp_path,
                                                                       planted_run):
    snaps = {}
    for backend, url in sqlite_and_postgres_urls.items():
        _mine(url, tmp_path / backend, planted_run, cfg=MiningConfig(top_n=3))
        snaps[backend] = snapshot(url)
    assert snaps["sqlite"]["planted"]["top_images"]
    assert snaps["sqlite"] == snaps["postgres"]


def test_remining_replaces_mined_data_and_keeps_labels(db_url, data_dir, planted_run):
    media = data_dir / "media"
    first = _mine(db_url, media, planted_run, cfg=MiningConfig(top_n=4))
    Session = session_factory(db_url)
    with Session.begin() as s:
        concept = s.scalars(sa.select(Concept).where(Concept.index == 5)).one()
        concept.label = "planted blob"
        concept.replace_tags(["synthetic"])
    old_prefix = snapshot(db_url)["planted"]["generation"]
    second = _mine(db_url, media, planted_run, cfg=MiningConfig(top_n=2))
    snap = snapshot(db_url)["planted"]
    assert second.generation_id != first.generation_id
    assert max(t[2] for t in snap["top_images"]) == 1, "only the new top-2 lists remain"
    assert snap["generation"] != old_prefix and not (media / old_prefix).exists()
    assert all((media / t[8]).is_file() for t in snap["top_images"])
    label = next(c for c in snap["concepts"] if c[0] == 5)
    assert (label[7], label[9], label[10]) == ("planted blob", 2, ("synthetic",))
    with Session() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(MiningGeneration)) == 1
        assert s.scalar(sa.select(sa.func.count()).select_from(Image)) == len({t[4] for t in snap["top_images"]})


def _stop_in_second_batch(monkeypatch, error: BaseException) -> None:
    """The second concept batch writes its rows, then `error` is raised inside its transaction."""
    real = mining_service._insert_concept_rows
    calls = []

    def insert_then_fail(*args, **kwargs):
        calls.append(1)
        written = real(*args, **kwargs)
        if len(calls) == 2:
            raise error
        return written

    monkeypatch.setattr(mining_service, "_insert_concept_rows", insert_then_fail)


def _fail_in_second_batch(monkeypatch) -> None:
    _stop_in_second_batch(monkeypatch, RuntimeError("disk on fire"))


def _fail_in_final_flip(monkeypatch) -> None:
    """The final transaction has swapped the statistics and is marking the generation active
    when it fails."""
    def fail() -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(mining_service, "utcnow", fail)


def _remine_stopped_midway(db_url: str, media: Path, planted_run, monkeypatch, stop, error: type) -> Run:
    """Mine, then re-mine with `stop(monkeypatch)` making it raise `error` before its switch:
    the previous mine must be exactly as it was. Returns the run's row afterwards."""
    _mine(db_url, media, planted_run, cfg=MiningConfig(top_n=4))
    before = snapshot(db_url)
    files_before = sorted(p for p in media.rglob("*") if p.is_file())
    stop(monkeypatch)
    with pytest.raises(error):
        _mine(db_url, media, planted_run, cfg=MiningConfig(top_n=2), batch_concepts=3)
    monkeypatch.undo()
    assert snapshot(db_url) == before
    assert sorted(p for p in media.rglob("*") if p.is_file()) == files_before
    with session_factory(db_url)() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(MiningGeneration)) == 1
        return s.scalars(sa.select(Run)).one()


@pytest.mark.parametrize("inject", [_fail_in_second_batch, _fail_in_final_flip])
def test_a_mine_that_fails_midway_leaves_the_previous_run_intact(db_url, data_dir, planted_run, monkeypatch, inject):
    run = _remine_stopped_midway(db_url, data_dir / "media", planted_run, monkeypatch, inject, RuntimeError)
    assert run.status == "failed" and "disk on fire" in run.error


def test_ctrl_c_during_a_re_mine_leaves_the_run_as_it_was(db_url, data_dir, planted_run, monkeypatch):
    """The previous mine is still active and whole, so the run stays "mined" (the list and the
    overview show it so); only the error notes the interruption."""
    run = _remine_stopped_midway(db_url, data_dir / "media", planted_run, monkeypatch,
                                 lambda patch: _stop_in_second_batch(patch, KeyboardInterrupt()), KeyboardInterrupt)
    assert run.status == "mined" and "interrupted" in run.error
    with session_factory(db_url)() as s:
        assert [r.status for r in list_runs(s)] == ["mined"]
    # `usae demo` reuses a finished mine only: this one it mines again.
    planted, run_dir = planted_run
    _, _, reused = pipeline.mine(Settings(data_dir=data_dir, database_url=db_url), pipeline.SMALL, run_dir,
                                 planted.store, planted.model, "cpu", rebuild=False)
    assert not reused
    with session_factory(db_url)() as s:
        run = s.scalars(sa.select(Run)).one()
        assert run.status == "mined" and run.error is None


def test_ctrl_c_during_a_first_mine_marks_the_run_failed(db_url, data_dir, planted_run, monkeypatch):
    media = data_dir / "media"
    _stop_in_second_batch(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        _mine(db_url, media, planted_run, cfg=MiningConfig(top_n=2), batch_concepts=3)
    with session_factory(db_url)() as s:
        run = s.scalars(sa.select(Run)).one()
        assert run.status == "failed" and "interrupted" in run.error and run.active_generation_id is None
        assert s.scalar(sa.select(sa.func.count()).select_from(MiningGeneration)) == 0
    assert not list(media.rglob("*.png"))


def test_the_next_mine_removes_media_a_mine_stopped_after_its_switch_left_behind(db_url, data_dir, planted_run,
                                                                                   monkeypatch):
    """A mine stopped after the switch, between deleting the old generation's rows and its
    files, leaves a media folder nothing points at; the next mine deletes it, and only it."""
    media = data_dir / "media"
    _mine(db_url, media, planted_run, cfg=MiningConfig(top_n=2))
    old = snapshot(db_url)["planted"]["generation"]

    def stopped(_path, **_kwargs):
        raise KeyboardInterrupt  # Ctrl-C (or a kill) just before the old generation's files go

    monkeypatch.setattr(mining_service, "shutil", SimpleNamespace(rmtree=stopped))
    with pytest.raises(KeyboardInterrupt):
        _mine(db_url, media, planted_run, cfg=MiningConfig(top_n=3))
    monkeypatch.undo()
    switched = snapshot(db_url)["planted"]
    assert switched["generation"] != old and (media / old).is_dir()
    with session_factory(db_url)() as s:
        assert s.scalar(sa.select(MiningGeneration).where(MiningGeneration.media_prefix == old)) is None
    _mine(db_url, media, planted_run, cfg=MiningConfig(top_n=3))
    after = snapshot(db_url)["planted"]
    assert not (media / old).exists() and not (media / switched["generation"]).exists()
    assert [p.name for p in (media / after["generation"]).parent.iterdir()] == [after["generation"].split("/")[-1]]
    assert all((media / t[5]).is_file() and (media / t[8]).is_file() for t in after["top_images"])


@pytest.mark.slow
def test_a_killed_mine_process_leaves_the_previous_run_intact(data_dir, tmp_path):
    db_url = f"sqlite:///{data_dir / 'usae.db'}"  # the data directory's default database
    upgrade_database(db_url)
    planted = build_planted(tmp_path, image_files=IMAGE_HW, n_concepts=24)
    run_dir = tmp_path / "runs" / "planted"
    planted.model.save_pretrained(run_dir)
    media = data_dir / "media"
    mine_run(db_url, media, run_dir, planted.store, planted.model, cfg=MiningConfig(top_n=4))
    before = snapshot(db_url)
    active = before["planted"]["generation"]
    env = {**os.environ, "USAE_DATABASE_URL": db_url, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "mine", str(run_dir), "--store", str(planted.store.root),
         "--data-dir", str(data_dir), "--top-n", "8", "--batch-concepts", "1", "--device", "cpu"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    Session = session_factory(db_url)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with Session() as s:
                written = s.scalar(sa.select(sa.func.count()).select_from(ConceptTopImage).join(MiningGeneration)
                                   .where(MiningGeneration.status == "building"))
            if written:
                break
            assert proc.poll() is None, f"mine exited early: {proc.stderr.read().decode()[-2000:]}"
            time.sleep(0.02)
        else:
            pytest.fail("the mine never wrote a batch")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert snapshot(db_url) == before
    with Session() as s:  # the list says the mine died instead of "mining" forever
        assert [r.status for r in list_runs(s)] == ["interrupted"]
    assert all((media / t[8]).is_file() for t in before["planted"]["top_images"])
    with Session() as s:
        leftover = s.scalars(sa.select(MiningGeneration).where(MiningGeneration.status == "building")).one()
        leftover_media = leftover.media_prefix
    assert (media / leftover_media).exists()
    # The next mine cleans up what the killed one left behind.
    mine_run(db_url, media, run_dir, planted.store, planted.model, cfg=MiningConfig(top_n=2))
    after = snapshot(db_url)["planted"]
    with Session() as s:
        assert [r.status for r in list_runs(s)] == ["mined"]
    assert not (media / leftover_media).exists() and not (media / active).exists()
    with Session() as s:
        assert [g.status for g in s.scalars(sa.select(MiningGeneration))] == ["active"]
    assert after["concepts"] == before["planted"]["concepts"]


def test_cli_mines_into_the_data_directory(tmp_path, planted_run):
    planted, run_dir = planted_run
    data_dir = tmp_path / "data"
    res = CliRunner().invoke(cli, ["mine", str(run_dir), "--store", str(planted.store.root), "--data-dir",
                                   str(data_dir), "--top-n", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "mined run planted: 12 concepts" in res.output
    snap = snapshot(f"sqlite:///{data_dir / 'usae.db'}")["planted"]
    assert all((data_dir / "media" / t[8]).is_file() for t in snap["top_images"])
    with session_factory(f"sqlite:///{data_dir / 'usae.db'}")() as s:
        assert [m.name for m in s.scalars(sa.select(RunModel).order_by(RunModel.position))] == ["vit", "dino", "clip"]


def test_images_larger_than_the_thumbnail_get_an_enlarged_view_of_the_same_square(db_url, data_dir, tmp_path):
    # 300 x 700 sources: the centre 300 x 300 square, at 300 px (<= VIEW_SIZE, never upscaled)
    planted = build_planted(tmp_path, image_files=(300, 700), n_images=12, images=(7, 3), strengths=(8.0, 6.0))
    root = Path(planted.store.meta["image_root"])
    y, x = np.mgrid[0:300, 0:700]
    for i, key in enumerate(planted.store.image_ids):  # smooth pictures (JPEG keeps them), each its own
        PILImage.fromarray(np.stack([x * 255 // 699, y * 255 // 299, np.full_like(x, 20 * i)], -1).astype(np.uint8)
                           ).save(root / key)
    run_dir = tmp_path / "runs" / "large"
    planted.model.save_pretrained(run_dir)
    mine_run(db_url, data_dir / "media", run_dir, planted.store, planted.model, cfg=MiningConfig(top_n=2))
    with session_factory(db_url)() as s:
        images = s.scalars(sa.select(Image)).all()
    assert images
    for image in images:
        source = load_image(Path(planted.store.meta["image_root"]) / image.image_key)
        view = PILImage.open(data_dir / "media" / image.view_path)
        thumb = PILImage.open(data_dir / "media" / image.thumbnail_path)
        assert view.size == (300, 300) and thumb.size == (THUMBNAIL_SIZE, THUMBNAIL_SIZE)
        pixels = np.asarray(view, np.float32)
        assert np.abs(pixels - np.asarray(square_view(source, 300), np.float32)).mean() < 2  # the centre square
        assert np.abs(pixels - np.asarray(source.crop((0, 0, 300, 300)), np.float32)).mean() > 20  # not another
        # and the thumbnail shows that square too: the view shrunk to the thumbnail agrees with it
        shrunk = np.asarray(view.resize(thumb.size, PILImage.Resampling.BICUBIC), np.float32)
        assert np.abs(shrunk - np.asarray(thumb, np.float32)).mean() < 2


def test_a_view_is_at_most_view_size_and_small_sources_get_none(db_url, data_dir, planted_run, tmp_path):
    planted = build_planted(tmp_path, image_files=(900, 1200), n_images=6, images=(2,), strengths=(8.0,))
    planted.model.save_pretrained(tmp_path / "runs" / "huge")
    mine_run(db_url, data_dir / "media", tmp_path / "runs" / "huge", planted.store, planted.model,
             cfg=MiningConfig(top_n=1))
    _mine(db_url, data_dir / "media", planted_run, cfg=MiningConfig(top_n=1))  # 48 x 64 sources
    with session_factory(db_url)() as s:
        runs = {run.name: run.active_generation_id for run in s.scalars(sa.select(Run))}
        views = {name: s.scalars(sa.select(Image.view_path).where(Image.generation_id == gen)).all()
                 for name, gen in runs.items()}
    assert views["huge"] and all(PILImage.open(data_dir / "media" / v).size == (VIEW_SIZE, VIEW_SIZE)
                                 for v in views["huge"])
    assert views["planted"] and set(views["planted"]) == {None}


def test_cli_refuses_a_run_that_does_not_match_the_store(tmp_path, planted_run):
    planted, _ = planted_run
    other = build_planted(tmp_path / "other", dims={"vit": 8, "dino": 12})
    other.model.save_pretrained(tmp_path / "runs" / "two-models")
    res = CliRunner().invoke(cli, ["mine", str(tmp_path / "runs" / "two-models"), "--store", str(planted.store.root),
                                   "--data-dir", str(tmp_path / "data"), "--device", "cpu"])
    assert res.exit_code != 0
    assert "has" in str(res.exception) and "store" in str(res.exception)


def test_mine_keeps_the_training_log_thinned_for_the_overview(db_url, data_dir, planted_run, tmp_path):
    import json
    import shutil

    from app.services.runs import TRAINING_CURVE_POINTS, training_curve

    planted, run_dir = planted_run
    logged = tmp_path / "runs" / "logged"
    shutil.copytree(run_dir, logged)
    models = planted.store.model_names
    n = 2 * TRAINING_CURVE_POINTS + 5
    with open(logged / "metrics.jsonl", "w") as fh:
        for s in range(1, n + 1):
            r2 = {m: (float("nan") if (s == n and i == 0) else 1 - 1 / s - 0.01 * i) for i, m in enumerate(models)}
            fh.write(json.dumps({"step": 10 * s, "loss": 1 / s, "r2": r2}) + "\n")
    curve = training_curve(logged)
    assert len(curve["step"]) == TRAINING_CURVE_POINTS
    assert curve["step"][0] == 10 and curve["step"][-1] == 10 * n  # the first and the last are kept
    assert curve["step"] == sorted(set(curve["step"]))
    assert curve["loss"] == [pytest.approx(10 / s) for s in curve["step"]]
    assert list(curve["r2"]) == models and curve["r2"][models[0]][-1] is None  # NaN is no value
    mine_run(db_url, data_dir / "media", logged, planted.store, planted.model, cfg=MiningConfig(top_n=2))
    with session_factory(db_url)() as s:
        run = s.scalars(sa.select(Run).where(Run.name == "logged")).one()
        assert run.metrics["training"] == curve
    assert training_curve(run_dir) is None  # a run without a log: no curve, no chart
