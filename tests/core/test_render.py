"""Heatmap pictures: the layer the explorer stacks over a thumbnail equals the blended overlay."""

import numpy as np
from PIL import Image

from usae_core.render import colormap, heatmap_layer, heatmap_overlay, upsample_heat


def test_layer_over_image_equals_the_overlay():
    rng = np.random.default_rng(0)
    square = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    heat = np.zeros((4, 4), np.float32)
    heat[1, 2] = 3.0
    heat[3, 0] = 1.5
    layer = heatmap_layer(heat, vmax=3.0, size=64)
    assert layer.mode == "RGBA" and layer.size == (64, 64)
    stacked = np.asarray(Image.alpha_composite(square.convert("RGBA"), layer).convert("RGB"), np.float32)
    overlay = np.asarray(heatmap_overlay(square, heat, vmax=3.0, max_alpha=0.75), np.float32)
    assert np.abs(stacked - overlay).max() <= 2  # 8-bit alpha rounding


def test_layer_is_transparent_where_the_concept_is_off_and_hottest_at_its_peak():
    heat = np.zeros((7, 7), np.float32)
    heat[3, 3] = 2.0
    alpha = np.asarray(heatmap_layer(heat, vmax=2.0, size=70))[..., 3]
    assert alpha[:10, :10].max() == 0
    peak = np.unravel_index(alpha.argmax(), alpha.shape)
    assert 30 <= peak[0] < 40 and 30 <= peak[1] < 40  # inside cell (3, 3)
    # Pixel centres sit half a pixel off the cell centre, so bilinear gives slightly under the peak.
    assert 0.85 * 255 * 0.75 <= alpha.max() <= 255 * 0.75


def test_colormap_and_upsampling_known_values():
    np.testing.assert_array_equal(colormap(np.array([0.0, 1.0])), [[0, 0, 4], [252, 255, 164]])
    up = upsample_heat(np.array([[0.0, 1.0]], np.float32), 4)
    assert up.shape == (4, 4) and up[:, 0].max() < up[:, -1].min()
