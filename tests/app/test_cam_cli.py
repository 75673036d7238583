"""`usae cam`: CAM images of a concept from the command line, for a run whose store names its
backbones (a real mobilenet_v2), and clear errors when the store does not fit the run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from app.cli import cli
from usae_core.backbones import create_backbone
from usae_core.config import USAEConfig
from usae_core.extract import extract_store
from usae_core.model import USAE
from usae_core.store import import_activations


@pytest.mark.slow
def test_usae_cam_writes_one_image_per_model(tmp_path):
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(images / f"{i}.png")
    backbone = create_backbone("mobilenet_v2")
    store = extract_store(images, [backbone], tmp_path / "store", num_workers=0, progress=False)
    torch.manual_seed(0)
    usae = USAE(USAEConfig(model_dims=store.dims, n_concepts=8, k=2, encoder="linear"))
    usae.save_pretrained(tmp_path / "run", extra_config={"store": str(store.root)})

    result = CliRunner().invoke(cli, ["cam", str(tmp_path / "run"), "--concept", "3", "--steps", "8",
                                      "--image-size", "64", "--device", "cpu", "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    png = tmp_path / "run" / "cam" / "concept-3" / "mobilenet_v2.png"
    assert Image.open(png).size == (64, 64)
    assert "concept 3 activation" in result.output

    other = import_activations(tmp_path / "other", {"a": np.zeros((2, 4, 3), np.float32)}, dtype="float32")
    bad = CliRunner().invoke(cli, ["cam", str(tmp_path / "run"), "--concept", "3", "--store", str(other.root),
                                   "--data-dir", str(tmp_path / "data")])
    assert bad.exit_code != 0 and "has no model mobilenet_v2" in str(bad.exception)
    bad = CliRunner().invoke(cli, ["cam", str(tmp_path / "run"), "--concept", "99", "--steps", "8",
                                   "--data-dir", str(tmp_path / "data")])
    assert bad.exit_code != 0 and "99" in str(bad.exception)
