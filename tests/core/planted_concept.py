"""A store with one planted concept and a USAE whose weights are set by hand to find it.

Every model sees small Gaussian noise on every token, plus `strength * u_m` (a fixed unit
direction per model) on the planted cells of the planted images. The USAE's planted concept
encodes with weights u_m and bias -THRESHOLD, so it is exactly zero everywhere except on the
planted tokens, where it is `strength + noise - THRESHOLD`. The other concepts have random
weights and fire all over the place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from usae_core.config import USAEConfig
from usae_core.model import USAE
from usae_core.store import ActivationStore, import_activations

THRESHOLD = 2.0
NOISE = 0.3


@dataclass
class Planted:
    store: ActivationStore
    model: USAE
    concept: int
    images: list[int]
    """Planted image indices, strongest first."""
    cells: list[tuple[int, int]]
    """Planted grid cells (row, column)."""


def build_planted(
    root: Path,
    *,
    dims: dict[str, int] | None = None,
    n_images: int = 40,
    grid: tuple[int, int] = (4, 4),
    n_concepts: int = 8,
    k: int = 3,
    concept: int = 5,
    images: tuple[int, ...] = (17, 3, 29),
    strengths: tuple[float, ...] = (8.0, 6.0, 4.0),
    cells: tuple[tuple[int, int], ...] = ((0, 2), (0, 3), (1, 2), (1, 3)),
    image_files: tuple[int, int] | None = None,
    demo_set: bool = False,
    shard_images: int = 16,
    seed: int = 0,
) -> Planted:
    """Build the store under `root / "store"` and the matching USAE.

    With `image_files=(height, width)` the store points at a folder of random images of that
    size; with `demo_set` too, the folder is laid out as a demo set whose one defect type,
    "scratch", covers exactly the planted cells of the planted images."""
    dims = dims or {"vit": 8, "dino": 12, "clip": 16}
    rng = np.random.default_rng(seed)
    t = grid[0] * grid[1]
    arrays, directions = {}, {}
    for name, d in dims.items():
        u = rng.standard_normal(d)
        directions[name] = u / np.linalg.norm(u)
        a = NOISE * rng.standard_normal((n_images, t, d))
        for img, s in zip(images, strengths):
            for r, c in cells:
                a[img, r * grid[1] + c] += s * directions[name]
        arrays[name] = a.astype(np.float32)
    image_ids = [f"{'images/' if demo_set else ''}img-{i:04d}.png" for i in range(n_images)]
    store_dir = root / "store"
    store = import_activations(store_dir, arrays, grid=grid, image_ids=image_ids, dtype="float32",
                               shard_images=shard_images)
    if image_files is not None:
        image_root = root / "images"
        write_images(image_root, image_ids, image_files, rng)
        if demo_set:
            write_demo_masks(image_root, [image_ids[i] for i in images], image_files, grid, cells)
        _set_meta(store_dir, {"image_root": str(image_root.resolve()), "image_size": 32})
        store = ActivationStore.open(store_dir)
    model = USAE(USAEConfig(model_dims=dims, n_concepts=n_concepts, k=k, encoder="linear"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, (name, d) in enumerate(dims.items()):
            enc = model.encoders[i].linear
            enc.weight.copy_(torch.randn(n_concepts, d, generator=gen) / d**0.5)
            enc.bias.zero_()
            enc.weight[concept] = torch.as_tensor(directions[name], dtype=torch.float32)
            enc.bias[concept] = -THRESHOLD
            model.dictionaries[i][concept] = torch.as_tensor(directions[name], dtype=torch.float32)
    return Planted(store, model.eval(), concept, list(images), list(cells))


def write_images(folder: Path, image_ids: list[str], size: tuple[int, int], rng: np.random.Generator) -> None:
    for image_id in image_ids:
        pixels = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
        (folder / image_id).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / image_id)


def write_demo_masks(folder: Path, image_ids: list[str], size: tuple[int, int], grid: tuple[int, int],
                     cells: tuple[tuple[int, int], ...]) -> None:
    """demo.json plus label maps (1 = scratch) covering `cells` of the centre square view."""
    import json

    h, w = size
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    ch, cw = side // grid[0], side // grid[1]
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for image_id in image_ids:
        label = np.zeros((h, w), np.uint8)
        for r, c in cells:
            label[top + r * ch : top + (r + 1) * ch, left + c * cw : left + (c + 1) * cw] = 1
        Image.fromarray(label).save(folder / "masks" / Path(image_id).name)
    (folder / "demo.json").write_text(json.dumps({"defect_types": ["scratch"], "images": {}}))


def _set_meta(store_dir: Path, meta: dict) -> None:
    import json

    from usae_core.atomic import atomic_write_json

    manifest = json.loads((store_dir / "manifest.json").read_text())
    manifest["meta"].update(meta)
    atomic_write_json(store_dir / "manifest.json", manifest)
