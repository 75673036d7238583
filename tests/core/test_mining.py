"""Concept mining: planted ground truth, a brute-force float64 reference, bounded memory."""

from __future__ import annotations

import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.core.planted_concept import build_planted
from usae_core.config import USAEConfig
from usae_core.errors import UsaeError
from usae_core.metrics import evaluate_usae, r2_score
from usae_core.mining import (
    DefectMasks,
    NoDefectMasks,
    MiningConfig,
    batch_bounds,
    mask_grid_coverage,
    mine_store,
    nearest_concepts,
    top_image_heatmaps,
)
from usae_core.model import USAE
from usae_core.store import ActivationStore, import_activations
from usae_core.store_layout import ShardSpan


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return build_planted(tmp_path_factory.mktemp("planted"))


def test_planted_concept_ranks_planted_images_first_in_every_model(planted) -> None:
    cfg = MiningConfig(top_n=5, batch_images=7)
    res = mine_store(planted.model, planted.store, cfg)
    c = planted.concept
    for i, name in enumerate(res.models):
        assert res.top_images[i, c, :3].tolist() == planted.images, name
        assert res.top_images[i, c, 3:].tolist() == [-1, -1], "nothing else activates the planted concept"
        assert np.all(np.diff(res.top_values[i, c, :3]) < 0)
        assert res.top_tokens[i, c, 0] in {r * 4 + col for r, col in planted.cells}
    heat = top_image_heatmaps(planted.model, planted.store, res, [c], cfg)
    planted_mask = np.zeros((4, 4), bool)
    for r, col in planted.cells:
        planted_mask[r, col] = True
    for i in range(len(res.models)):
        for rank in range(3):
            h = heat[(i, c, rank)]
            assert np.all(h[planted_mask] > 0) and np.all(h[~planted_mask] == 0)
            assert h.max() == pytest.approx(res.top_values[i, c, rank], rel=1e-5)
        assert (i, c, 3) not in heat


def _reference(model: USAE, store: ActivationStore, cfg: MiningConfig) -> dict:
    """Everything mine_store computes, from fully materialised dense codes in float64."""
    n_img, t = store.n_images, store.tokens_per_image
    dense, x_std = {}, {}
    with torch.no_grad():
        for name in model.names:
            x = torch.from_numpy(np.concatenate([store.image_tokens(name, i) for i in range(n_img)]))
            x_std[name] = model.standardize(x, name)
            v, idx = model.encode(x_std[name], name)
            dense[name] = (v, idx, model.dense_codes(v, idx).double().numpy())
    z = np.stack([dense[n][2] for n in model.names])  # [M, tokens, C]
    fires = z > cfg.tau
    per_image = z.reshape(len(model.names), n_img, t, -1).max(2)  # [M, images, C]
    edges = cfg.hist_edges()
    hist = np.zeros((len(model.names), z.shape[2], cfg.hist_bins), np.int64)
    for i in range(len(model.names)):
        for cpt in range(z.shape[2]):
            vals = z[i, :, cpt][z[i, :, cpt] > 0]
            hist[i, cpt] = np.bincount(np.searchsorted(edges[1:-1], vals, side="left"), minlength=cfg.hist_bins)
    r2 = np.array([[r2_score(x_std[tgt].numpy(), model.decode(*dense[src][:2], tgt).detach().numpy())
                    for tgt in model.names] for src in model.names])
    return dict(fire=fires.sum(1), cofire=fires.all(0).sum(0), sums=z.sum(1), per_image=per_image,
                max_act=z.max(1), hist=hist, r2=r2, z=z)


def test_streaming_pass_matches_brute_force_reference(planted) -> None:
    cfg = MiningConfig(top_n=4, batch_images=7, tau=0.1)
    res = mine_store(planted.model, planted.store, cfg)
    ref = _reference(planted.model, planted.store, cfg)
    assert np.array_equal(res.stats.fire_counts, ref["fire"])
    assert np.array_equal(res.stats.cofire_counts, ref["cofire"])
    np.testing.assert_allclose(res.stats.code_sums, ref["sums"], rtol=1e-5)
    np.testing.assert_allclose(res.max_activation, ref["max_act"], rtol=1e-6)
    np.testing.assert_allclose(res.stats.r2, ref["r2"], rtol=1e-4, atol=1e-6)
    assert np.array_equal(res.hist_counts, ref["hist"])
    assert np.array_equal(res.nonzero_counts, (ref["z"] > 0).sum(1))
    m, n_img, c = ref["per_image"].shape
    for i in range(m):
        for cpt in range(c):
            scores = ref["per_image"][i, :, cpt]
            order = np.argsort(-scores, kind="stable")[: cfg.top_n]
            expect = [int(img) if scores[img] > 0 else -1 for img in order]
            assert res.top_images[i, cpt].tolist() == expect
            np.testing.assert_allclose(res.top_values[i, cpt], np.maximum(scores[order], 0), rtol=1e-6)
    # The statistics agree with the core evaluation pass.
    ev = evaluate_usae(planted.model, planted.store, tau=cfg.tau)
    assert np.array_equal(res.stats.fire_counts, ev.fire_counts)
    np.testing.assert_allclose(res.stats.firing_entropy, ev.firing_entropy)
    np.testing.assert_allclose(res.stats.energy, ev.energy, rtol=1e-6)


def test_batches_ramp_up_then_tile_every_shard_in_order() -> None:
    spans = [ShardSpan(0, 0, 40), ShardSpan(1, 40, 100), ShardSpan(2, 100, 103)]
    bounds = list(batch_bounds(spans, 16))
    assert [stop - start for _, start, stop in bounds] == [2, 4, 8, 16, 10, 16, 16, 16, 12, 3]
    assert [start for _, start, _ in bounds] == [0, 2, 6, 14, 30, 40, 56, 72, 88, 100]
    for span_i, start, stop in bounds:  # never across a shard
        assert spans[span_i].start <= start < stop <= spans[span_i].stop
    assert [stop - start for _, start, stop in batch_bounds([ShardSpan(0, 0, 5)], 4)] == [1, 2, 2]


def test_heatmaps_match_dense_codes(planted) -> None:
    cfg = MiningConfig(top_n=3, batch_images=5)
    res = mine_store(planted.model, planted.store, cfg)
    ref = _reference(planted.model, planted.store, cfg)
    concepts = [0, 1, planted.concept]
    heat = top_image_heatmaps(planted.model, planted.store, res, concepts, cfg)
    t = planted.store.tokens_per_image
    for (i, cpt, rank), h in heat.items():
        img = res.top_images[i, cpt, rank]
        expect = ref["z"][i, img * t : (img + 1) * t, cpt].reshape(planted.store.grid)
        np.testing.assert_allclose(h, expect, rtol=1e-5, atol=1e-6)
        assert int(np.argmax(h)) == res.top_tokens[i, cpt, rank]
    assert {k[1] for k in heat} == set(concepts)


def test_mask_grid_coverage_crops_to_the_square_view() -> None:
    mask = np.zeros((40, 60), bool)  # crop keeps columns 10..49
    mask[0:20, 10:30] = True  # exactly the top-left quarter of the square view
    mask[:, 0:10] = True  # outside the crop: ignored
    cov = mask_grid_coverage(mask, (2, 2))
    np.testing.assert_allclose(cov, [1.0, 0.0, 0.0, 0.0])
    half = np.zeros((40, 40), bool)
    half[0:10, 0:20] = True
    np.testing.assert_allclose(mask_grid_coverage(half, (2, 2)), [0.5, 0.0, 0.0, 0.0])


def test_defect_iou_finds_the_planted_concept(planted) -> None:
    grid = planted.store.grid
    h, w = 48, 64  # masks at image resolution, wider than tall (centre-cropped to 48 x 48)
    cell = h // grid[0]
    left = (w - h) // 2

    def load(image_index: int):
        if image_index not in planted.images:
            return None
        scratch = np.zeros((h, w), bool)
        for r, c in planted.cells:
            scratch[r * cell : (r + 1) * cell, left + c * cell : left + (c + 1) * cell] = True
        dent = np.zeros((h, w), bool)
        dent[-cell:, left : left + cell] = True  # bottom-left cell, where the concept is off
        return {"scratch": scratch, "dent": dent}

    res = mine_store(planted.model, planted.store, MiningConfig(batch_images=6),
                     masks=DefectMasks(["scratch", "dent"], load))
    assert res.defect_types == ["scratch", "dent"]
    c = planted.concept
    np.testing.assert_allclose(res.defect_iou[:, c, 0], 1.0)
    np.testing.assert_allclose(res.defect_iou[:, c, 1], 0.0)
    # Reference for every concept: binary firing against the cell masks, summed over the set.
    ref = _reference(planted.model, planted.store, MiningConfig())
    t = planted.store.tokens_per_image
    truth = np.zeros((planted.store.n_images * t, 2))
    for img in planted.images:
        for r, col in planted.cells:
            truth[img * t + r * grid[1] + col, 0] = 1
        truth[img * t + (grid[0] - 1) * grid[1], 1] = 1
    np.testing.assert_allclose(res.defect_iou, _best_threshold_iou(ref["z"], truth), rtol=1e-6, atol=1e-9)


def _best_threshold_iou(z: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """IoU of dense codes `z` [models, tokens, concepts] with defect cells `truth` [tokens, types]
    at the best threshold among the histogram's bin edges (and "any activation")."""
    best = np.zeros((z.shape[0], z.shape[2], truth.shape[1]))
    for threshold in [0.0, *MiningConfig().hist_edges()[1:-1]]:
        fires = z > threshold
        inter = np.einsum("mtc,td->mcd", fires, truth)
        union = fires.sum(1)[:, :, None] + truth.sum(0)[None, None, :] - inter
        best = np.maximum(best, np.divide(inter, union, out=np.zeros_like(inter, dtype=float), where=union > 0))
    return best


def test_defect_masks_of_a_demo_set_store_and_the_concepts_of_a_defect(tmp_path, monkeypatch) -> None:
    """DefectMasks.from_store reads the masks of the demo set a store was extracted from (the
    planted set's one defect type, "scratch", covers the planted cells of the planted images), so
    the planted concept is every model's scratch detector; demo.json is parsed once, not once
    per image. defect_concepts ranks each model's concepts by that IoU (the planted concept ties at
    1 with a random one that the planted tokens' strength also lifts above its other tokens)."""
    import usae_core.images

    planted = build_planted(tmp_path, image_files=(48, 64), demo_set=True)
    reads = []
    real_read = usae_core.images._read_demo_manifest
    monkeypatch.setattr(usae_core.images, "_read_demo_manifest", lambda root: reads.append(root) or real_read(root))
    masks = DefectMasks.from_store(planted.store)
    res = mine_store(planted.model, planted.store, MiningConfig(batch_images=6), masks=masks)
    assert masks.defect_types == res.defect_types == ["scratch"] and len(reads) == 1
    c = planted.concept
    np.testing.assert_allclose(res.defect_iou[:, c, 0], 1.0)
    t, gw = planted.store.tokens_per_image, planted.store.grid[1]
    truth = np.zeros((planted.store.n_images * t, 1))
    for img in planted.images:
        for r, col in planted.cells:
            truth[img * t + r * gw + col, 0] = 1
    ref = _best_threshold_iou(_reference(planted.model, planted.store, MiningConfig())["z"], truth)
    np.testing.assert_allclose(res.defect_iou, ref, rtol=1e-6, atol=1e-9)

    best = res.defect_concepts("scratch", top=3)
    assert list(best) == res.models
    for m, model in enumerate(res.models):
        expect = sorted(range(res.n_concepts), key=lambda k: (-ref[m, k, 0], k))[:3]
        assert [k for k, _ in best[model]] == expect and (c, 1.0) in best[model]
        np.testing.assert_allclose([iou for _, iou in best[model]], ref[m, expect, 0], rtol=1e-6, atol=1e-9)
    with pytest.raises(UsaeError, match=r"no defect type 'crack' in this mine \(it has scratch\)"):
        res.defect_concepts("crack")
    with pytest.raises(UsaeError, match=r"no defect masks: pass masks=DefectMasks.from_store\(store\)"):
        mine_store(planted.model, planted.store).defect_concepts("scratch")
    plain = build_planted(tmp_path / "plain", image_files=(48, 64))
    with pytest.raises(UsaeError, match=r"has no defect masks: its images \(.*\) are not a demo set"):
        DefectMasks.from_store(plain.store)
    with pytest.raises(NoDefectMasks, match=r"activations were imported"):
        DefectMasks.from_store(build_planted(tmp_path / "imported").store)
    with pytest.raises(NoDefectMasks):  # the kind of error a caller may take as "mine without masks"
        DefectMasks.from_store(plain.store)
    # A demo set whose manifest broke is an error of its own, not "no masks": its defect IoU would vanish unsaid.
    (Path(planted.store.meta["image_root"]) / "demo.json").write_text("{ not json")
    with pytest.raises(UsaeError, match=r"demo.json is unreadable") as broken:
        DefectMasks.from_store(planted.store)
    assert not isinstance(broken.value, NoDefectMasks)


def test_a_cell_shows_a_defect_only_when_the_mask_covers_at_least_a_tenth_of_it(planted) -> None:
    """Defect truth per token cell is mask coverage >= 10% (defect_cell_fraction): a mask on 20%
    of one planted cell counts, a 5% sliver of another does not (coverage counted in pixels here)."""
    gh, gw = planted.store.grid
    cell = 20  # 80 x 80 masks: 400 pixels per cell
    (r1, c1), (r2, c2) = planted.cells[:2]
    mask = np.zeros((gh * cell, gw * cell), bool)
    mask[r1 * cell : r1 * cell + 8, c1 * cell : c1 * cell + 10] = True  # 80 pixels
    mask[r2 * cell : r2 * cell + 4, c2 * cell : c2 * cell + 5] = True  # 20 pixels
    res = mine_store(planted.model, planted.store, MiningConfig(batch_images=6),
                     masks=DefectMasks(["scratch"], lambda i: {"scratch": mask} if i in planted.images else None))
    coverage = mask.reshape(gh, cell, gw, cell).mean(axis=(1, 3)).reshape(-1)
    np.testing.assert_allclose(coverage[[r1 * gw + c1, r2 * gw + c2]], [0.2, 0.05])
    t = planted.store.tokens_per_image
    truth = np.zeros((planted.store.n_images * t, 1))
    for img in planted.images:
        truth[img * t : (img + 1) * t, 0] = coverage >= 0.1
    assert truth.sum() == len(planted.images)  # one cell per planted image
    ref = _reference(planted.model, planted.store, MiningConfig())
    np.testing.assert_allclose(res.defect_iou, _best_threshold_iou(ref["z"], truth), rtol=1e-6, atol=1e-9)


def test_nearest_concepts_by_decoder_cosine() -> None:
    torch.manual_seed(0)
    model = USAE(USAEConfig(model_dims={"a": 6, "b": 9}, n_concepts=20, k=2, encoder="linear"))
    idx, cos = nearest_concepts(model, 3, chunk=7)
    for i, name in enumerate(model.names):
        d = model.dictionary(name).detach().double().numpy()
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        sim = d @ d.T
        np.fill_diagonal(sim, -np.inf)
        expect = np.argsort(-sim, axis=1)[:, :3]
        assert np.array_equal(idx[i], expect)
        np.testing.assert_allclose(cos[i], np.take_along_axis(sim, expect, 1), rtol=1e-5)


def test_a_store_path_works_wherever_a_store_does(planted) -> None:
    """train_usae took a store's path; evaluate_usae, mine_store and top_image_heatmaps failed on
    one with "'str' object has no attribute 'dims'". Each now opens it, with the same result."""
    root = planted.store.root
    cfg = MiningConfig(top_n=3, batch_images=7)
    by_store = mine_store(planted.model, planted.store, cfg)
    for path in (str(root), Path(root)):
        by_path = mine_store(planted.model, path, cfg)
        np.testing.assert_array_equal(by_path.top_images, by_store.top_images)
        np.testing.assert_array_equal(by_path.stats.r2, by_store.stats.r2)
        heat = top_image_heatmaps(planted.model, path, by_path, [planted.concept], cfg)
        expect = top_image_heatmaps(planted.model, planted.store, by_store, [planted.concept], cfg)
        assert heat.keys() == expect.keys() and all(np.array_equal(heat[k], expect[k]) for k in heat)
        expect_r2 = evaluate_usae(planted.model, planted.store).r2
        np.testing.assert_array_equal(evaluate_usae(planted.model, path).r2, expect_r2)
    with pytest.raises(UsaeError, match="there is no activation store at"):
        evaluate_usae(planted.model, str(root) + "-missing")


def test_model_and_store_must_match(planted) -> None:
    other = USAE(USAEConfig(model_dims={"vit": 8, "dino": 12}, n_concepts=8, k=3))
    with pytest.raises(UsaeError, match="store has"):
        mine_store(other, planted.store)


def _rss_anon_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


@pytest.fixture
def one_torch_thread():
    """What is measured here is memory; one thread keeps it quick on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_mining_memory_stays_bounded_on_a_store_larger_than_the_cap(tmp_path, one_torch_thread) -> None:
    cap = 24 * 2**20
    # Wide activations and few concepts: a big store that is quick to encode.
    dims = {"a": 256, "b": 384, "c": 384}
    n_images, grid = 600, (8, 8)
    store_bytes = n_images * grid[0] * grid[1] * sum(dims.values()) * 4
    assert store_bytes > 5 * cap
    # Written shard by shard so building the fixture does not need the memory either.
    writer = ActivationStore.create(tmp_path / "big", models=dims, grid=grid, dtype="float32", shard_images=50,
                                    image_ids=[f"i{n}" for n in range(n_images)])
    rng = np.random.default_rng(0)
    for span in writer.spans:
        writer.write_shard(span.index, {m: rng.standard_normal((span.n_images, 64, d), dtype=np.float32)
                                        for m, d in dims.items()})
    store = writer.finalize()
    torch.manual_seed(0)
    model = USAE(USAEConfig(model_dims=dims, n_concepts=64, k=4, encoder="linear")).eval()
    cfg = MiningConfig(top_n=16, batch_images=4, neighbours=4)
    mine_store(model, ActivationStore.open(store.root), MiningConfig(top_n=2, batch_images=4))  # warm up allocators

    baseline = _rss_anon_bytes()
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_anon_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    tracemalloc.start()
    try:
        res = mine_store(model, ActivationStore.open(store.root), cfg)
        _, traced_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        done.set()
        sampler.join()
    assert res.stats.n_tokens == n_images * 64
    print(f"store {store_bytes / 2**20:.0f} MiB, traced peak {traced_peak / 2**20:.2f} MiB, "
          f"anonymous RSS growth {(peak - baseline) / 2**20:.2f} MiB")
    assert traced_peak < cap, f"Python/NumPy peak {traced_peak / 2**20:.1f} MiB"
    assert peak - baseline < cap, f"anonymous RSS grew {(peak - baseline) / 2**20:.1f} MiB for a " \
                                  f"{store_bytes / 2**20:.0f} MiB store"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_stores_decode_like_the_core_reader(tmp_path, planted, dtype) -> None:
    src = planted.store
    arrays = {m: np.stack([src.image_tokens(m, i).reshape(-1, src.dims[m]) for i in range(src.n_images)])
              for m in src.model_names}
    store = import_activations(tmp_path / dtype, arrays, grid=src.grid, dtype=dtype, shard_images=16)
    res = mine_store(planted.model, store, MiningConfig(batch_images=7))
    ev = evaluate_usae(planted.model, store, tau=0.1)
    assert np.array_equal(res.stats.fire_counts, ev.fire_counts)
    np.testing.assert_allclose(res.stats.code_sums, ev.code_sums, rtol=1e-5)
    assert res.top_images[:, planted.concept, :3].tolist() == [planted.images] * 3


def test_evaluation_and_mining_hand_the_model_back_as_it_was(tmp_path):
    """They compute on their device in eval mode and give the caller's model back on its device
    and in its mode (a notebook's model was left in eval mode, and on a GPU box on the GPU)."""
    from usae_core.devices import borrowed
    from usae_core.metrics import evaluate_usae
    from usae_core.mining import mine_store, top_image_heatmaps

    store = import_activations(tmp_path / "s", {"a": np.random.default_rng(0).standard_normal((4, 9, 6), np.float32),
                                                "b": np.random.default_rng(1).standard_normal((4, 9, 5), np.float32)})
    torch.manual_seed(0)
    model = USAE(USAEConfig(model_dims={"a": 6, "b": 5}, n_concepts=16, k=2)).train()
    for call in (lambda: evaluate_usae(model, store, device="cpu"),
                 lambda: top_image_heatmaps(model, store, mine_store(model, store, device="cpu"), [0, 1], device="cpu")):
        call()
        assert model.training and all(p.device.type == "cpu" for p in model.parameters())
    with borrowed(model, torch.device("cpu")) as inside:
        assert inside is model and not model.training
    assert model.training
    # Where a GPU is asked for, the model goes there and comes back (the moves recorded, not made:
    # this machine may have no GPU).
    moves = []
    model.to = lambda device: moves.append(torch.device(device)) or model
    with borrowed(model, torch.device("cuda:1")):
        assert moves == [torch.device("cuda:1")]
    assert moves == [torch.device("cuda:1"), torch.device("cpu")]


def test_long_passes_show_their_progress_unless_told_not_to(tmp_path, capsys):
    """Evaluation and mining stream the whole store: like training and extraction they show a
    progress bar by default (a notebook sat silent through them)."""
    store = import_activations(tmp_path / "s", {"a": np.random.default_rng(0).standard_normal((4, 9, 6), np.float32)})
    model = USAE(USAEConfig(model_dims={"a": 6}, n_concepts=8, k=2))
    evaluate_usae(model, store, device="cpu")
    mine_store(model, store, device="cpu")
    err = capsys.readouterr().err
    assert "eval: 100%" in err and "mine: 100%" in err
    evaluate_usae(model, store, device="cpu", progress=False)
    mine_store(model, store, device="cpu", progress=False)
    assert capsys.readouterr().err == ""
