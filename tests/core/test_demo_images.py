"""The embedded demo set: deterministic bytes, honest masks, visible defects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from usae_core.demo_images import DEFECT_TYPES, DEFECTS, MATERIALS, PHOTOS, SIZE, build_demo_set, render
from usae_core.errors import UsaeError
from usae_core.images import FolderSource, defect_types, load_masks

N = 60


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return build_demo_set(tmp_path_factory.mktemp("demo") / "set", seed=3, n_images=N, workers=2)


def all_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_the_same_bytes(demo, tmp_path, capsys):
    again = build_demo_set(tmp_path / "again", seed=3, n_images=N, workers=1)  # serial vs. 2 processes
    assert all_bytes(again) == all_bytes(demo)
    assert "100%" in capsys.readouterr().err  # a progress bar by default
    other = build_demo_set(tmp_path / "other", seed=4, n_images=N, workers=2, progress=False)
    assert capsys.readouterr().err == ""
    differing = [k for k, v in all_bytes(other).items() if k.startswith("images/") and all_bytes(demo)[k] != v]
    assert len(differing) == N


def test_layout_and_manifest(demo):
    manifest = json.loads((demo / "demo.json").read_text())
    assert manifest["defect_types"] == DEFECT_TYPES == defect_types(demo)
    src = FolderSource(demo)
    assert src.is_demo and src.ids == sorted(manifest["images"]) and len(src.ids) == N
    assert all(i.startswith("images/") for i in src.ids)  # masks are not images of the set
    records = manifest["images"].values()
    assert {r["material"] for r in records} == {*MATERIALS, "photo"}
    assert {d for r in records for d in r["defects"]} == set(DEFECT_TYPES)
    assert any(r["material"] != "photo" and not r["defects"] for r in records)  # clean surfaces
    assert {r["photo"] for r in records if r["material"] == "photo"} <= set(PHOTOS)
    for image_id in src.ids:
        assert src.load(image_id).size == (SIZE, SIZE)


def test_masks_match_the_records(demo):
    manifest = json.loads((demo / "demo.json").read_text())
    for image_id, record in manifest["images"].items():
        label_map = np.asarray(Image.open(demo / "masks" / Path(image_id).name))
        present = {DEFECT_TYPES[v - 1] for v in np.unique(label_map) if v}
        assert present == set(record["defects"]), image_id
        masks = load_masks(demo, image_id)
        assert set(masks) == set(DEFECT_TYPES)
        for i, t in enumerate(DEFECT_TYPES, start=1):
            assert masks[t].dtype == bool and masks[t].shape == (SIZE, SIZE)
            assert np.array_equal(masks[t], label_map == i)
        half = load_masks(demo, image_id, size=SIZE // 2)
        for t in record["defects"]:
            assert half[t].shape == (SIZE // 2, SIZE // 2)
            assert abs(half[t].mean() - masks[t].mean()) < 0.05


def _ring(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels within `width` of the mask, outside it."""
    grown = mask.copy()
    for _ in range(width):
        g = grown.copy()
        g[1:] |= grown[:-1]
        g[:-1] |= grown[1:]
        g[:, 1:] |= grown[:, :-1]
        g[:, :-1] |= grown[:, 1:]
        grown = g
    return grown & ~mask


@pytest.mark.parametrize("defect, sign", [("crack", -1), ("hole", -1), ("scratch", +1)])
def test_defects_are_visible_where_the_mask_says(defect, sign):
    """Cracks and holes are darker than their surroundings, scratches brighter, by a clear margin."""
    contrasts = []
    index = 0
    while len(contrasts) < 5:
        rgb, labels, record = render(11, index)
        index += 1
        if record["defects"] != [defect]:
            continue
        grey = rgb.astype(float).mean(-1)
        mask = labels == DEFECT_TYPES.index(defect) + 1
        contrasts.append(sign * (grey[mask].mean() - grey[_ring(mask, 4)].mean()))
    assert min(contrasts) > 15, contrasts


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_variety_of_position_and_size(defect):
    centres, areas = [], []
    for i in range(24):
        canvas = np.full((SIZE, SIZE, 3), 0.5, np.float32)
        mask = DEFECTS[defect](canvas, np.random.default_rng([8, i]))
        ys, xs = np.nonzero(mask)
        centres.append((ys.mean(), xs.mean()))
        areas.append(len(ys))
    assert np.array(centres).std(0).min() > 25  # spread over the image
    assert max(areas) > 2 * min(areas) > 0  # small and large ones


def test_line_defects_take_every_orientation():
    angles = []
    for i in range(40):
        mask = DEFECTS["scratch"](np.full((SIZE, SIZE, 3), 0.5, np.float32), np.random.default_rng([9, i]))
        ys, xs = np.nonzero(mask)
        cov = np.cov(np.stack([xs, ys]))
        angles.append(np.degrees(np.arctan2(*np.linalg.eigh(cov)[1][:, -1][::-1])) % 180)
    assert np.histogram(angles, bins=4, range=(0, 180))[0].min() >= 4


def test_existing_set_is_reused_and_a_different_one_refused(demo, tmp_path):
    assert build_demo_set(demo, seed=3, n_images=N) == demo
    with pytest.raises(UsaeError, match="different demo set"):
        build_demo_set(demo, seed=9, n_images=N)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    for overwrite in (False, True):  # --overwrite replaces a demo set, never someone's folder
        with pytest.raises(UsaeError, match="not a demo set"):
            build_demo_set(tmp_path / "taken", n_images=4, overwrite=overwrite)
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["file"]
