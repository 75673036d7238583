"""docs/python-api.md runs as written: its Python blocks, in order, on a small folder of photos."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DOC = Path(__file__).resolve().parents[2] / "docs" / "python-api.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def write_photos(folder: Path, n: int) -> None:
    """Crops of scikit-image's photos, as a user's folder would hold: differing sizes, a subfolder."""
    from skimage import data

    photos = [data.chelsea(), data.astronaut(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(0)
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(120, min(photo.shape[:2])))
        top, left = (int(rng.integers(0, d - side + 1)) for d in photo.shape[:2])
        out = folder / ("more" if i % 3 == 0 else "") / f"photo-{i:02d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[top : top + side, left : left + side]).save(out, quality=90)


@pytest.mark.slow
def test_the_python_guide_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 9, "the guide lost its examples"
    write_photos(tmp_path / "photos", 12)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name} block {i + 1}", "exec"), namespace)  # noqa: S102 - the guide's own code
    # What the blocks printed and built is what the guide says they do.
    store, usae, res = namespace["store"], namespace["usae"], namespace["res"]
    assert store.n_images == 12 and store.model_names == ["mobilenet_v2", "efficientnet_lite0", "hed_vgg16"]
    assert not usae.training and res.r2.shape == (3, 3) and np.all(np.diag(res.r2) > 0)
    assert namespace["own"].dims == {"a": 6, "b": 3}
    assert tuple(namespace["heatmap"].shape) == store.grid
    assert namespace["all_codes"].shape == (12, store.tokens_per_image, 256)
    assert set(namespace["images"]) == set(store.model_names)
    assert all(r.image.shape == (96, 96, 3) for r in namespace["images"].values())
    assert namespace["codes"].shape == (store.tokens_per_image, 256)  # the new image's, last model
    printed = capsys.readouterr().out
    assert "{'a': 6, 'b': 3}" in printed and "universal concepts of 256" in printed
