"""Coordinated activation maximisation (usae_core/cam.py) on tiny models with known answers.

The planted backbones turn each patch into two colour-opponent features (red minus the other
channels, blue minus the other channels) and the planted USAE reads one of them per concept, so the
image that maximises a concept must be red, or blue (as red or blue as the fixed magnitude's DC
term lets the mean colour go: about 60 levels above the other channels here). Random tiny models check that the
optimisation climbs, that the Fourier magnitude never moves, and that a seed fixes every byte."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision.ops
from PIL import Image
from torch import nn

from tests.core.test_extract import tiny_dinov2
from usae_core.backbones.base import Backbone
from usae_core.cam import (
    CamConfig,
    MacoImage,
    concept_response,
    coordinated_activation_maximization,
    maximize_concept,
    natural_magnitude,
    photos_mean_magnitude,
)
from usae_core.config import USAEConfig
from usae_core.errors import UsaeError
from usae_core.extract import resample_grid
from usae_core.model import USAE

RED, BLUE = 0, 1
FAST = {"steps": 30, "image_size": 32, "crops": 4}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Many small ops: with two threads on a busy 2-core machine they ran 10x slower than with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def colour_backbone(name: str, patch: int, input_size: int) -> Backbone:
    """Per patch: [mean R - mean(G, B), mean B - mean(R, G)] of the pixels in [0, 1]."""
    conv = nn.Conv2d(3, 2, patch, stride=patch, bias=False)
    opponents = torch.tensor([[1.0, -0.5, -0.5], [-0.5, -0.5, 1.0]])
    with torch.no_grad():
        conv.weight.copy_(opponents[:, :, None, None].expand(2, 3, patch, patch) / patch**2)
    return Backbone(name=name, family="planted", model=nn.Sequential(conv), input_size=input_size, mean=(0.0,) * 3,
                    std=(1.0,) * 3, interpolation="bilinear", layer="0", default_layer="0", weights_source="planted")


@pytest.fixture(scope="module")
def planted():
    """Two colour backbones at different patch sizes and a USAE whose concept 0 reads 'red' and
    concept 1 reads 'blue' in both (identity standardisation, no BatchNorm)."""
    backbones = {"coarse": colour_backbone("coarse", 8, 32), "fine": colour_backbone("fine", 4, 16)}
    usae = USAE(USAEConfig(model_dims={"coarse": 2, "fine": 2}, n_concepts=4, k=1, encoder="linear")).eval()
    with torch.no_grad():
        for encoder in usae.encoders:
            encoder.linear.weight.zero_()
            encoder.linear.bias.zero_()
            encoder.linear.weight[RED, 0] = encoder.linear.weight[BLUE, 1] = 1.0
    return usae, backbones


class TinyCNN(Backbone):
    """A random two-layer CNN (stride 4, 8 x 8 grid at 32 px)."""

    def __init__(self) -> None:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 12, 3, 2, 1))
        super().__init__(name="tiny-cnn", family="test", model=model, input_size=32, mean=(0.5,) * 3,
                         std=(0.25,) * 3, interpolation="bilinear", layer="2", default_layer="2",
                         weights_source="random")


@pytest.fixture(scope="module")
def random_models():
    """A random tiny ViT (DINOv2-shaped, 16 x 16 tokens at 224 px) and a random tiny CNN, under a
    random USAE with BatchNorm whose running statistics are not the identity."""
    backbones = {"vit": tiny_dinov2(), "cnn": TinyCNN()}
    torch.manual_seed(0)
    usae = USAE(USAEConfig(model_dims={"vit": 32, "cnn": 12}, n_concepts=16, k=4, encoder="mlp_bn")).eval()
    with torch.no_grad():
        for encoder in usae.encoders:
            encoder.bn.running_mean.normal_(0, 0.3)
            encoder.bn.running_var.uniform_(0.5, 2)
            encoder.bn.weight.uniform_(0.5, 1.5)
            encoder.bn.bias.normal_(0, 0.1)
    return usae, backbones


def mean_rgb(image: np.ndarray) -> np.ndarray:
    return image.reshape(-1, 3).astype(np.float64).mean(0)


# ----------------------------------------------------------------------------- 1. the magnitude is fixed
def assert_natural_magnitude(image: MacoImage) -> None:
    """|rfft2| of the image before the pixel mapping, in float64: the fixed magnitude at every
    frequency but DC, which is the channel's (real) mean and may only shrink: m * |cos(phase)|."""
    with torch.no_grad():
        spectrum = torch.fft.rfft2(image.spectral_image().double()).abs()
        magnitude = natural_magnitude(image.size)
        dc = magnitude[:, 0, 0] * torch.cos(image.phase[:, 0, 0].double()).abs()
    ac = torch.ones_like(magnitude, dtype=torch.bool)
    ac[:, 0, 0] = False
    torch.testing.assert_close(spectrum[ac], magnitude[ac], rtol=1e-9, atol=1e-9 * float(magnitude.max()))
    torch.testing.assert_close(spectrum[:, 0, 0], dc, rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize("size", [32, 33])
def test_start_image_has_the_natural_magnitude_at_every_frequency(size):
    assert_natural_magnitude(MacoImage(size, seed=3, dtype=torch.float64))


def test_optimisation_changes_only_the_phase(planted):
    usae, backbones = planted
    image = MacoImage(32, seed=0, dtype=torch.float64)
    before = image.phase.detach().clone()
    maximize_concept(usae, backbones["coarse"], "coarse", RED, CamConfig(**{**FAST, "steps": 5}), image=image)
    assert (image.phase.detach() - before).abs().max() > 0.1  # it did move
    assert_natural_magnitude(image)


@pytest.mark.parametrize("size", [32, 33])
def test_natural_magnitude_is_deterministic_and_hermitian_only_where_a_real_image_needs_it(size):
    from usae_core.cam import _natural_magnitude

    first = natural_magnitude(size)
    _natural_magnitude.cache_clear()
    again = natural_magnitude(size)
    assert torch.equal(first, again)
    assert (first > 0).all()
    # Natural images: energy falls with frequency.
    assert first[:, 1, 1].mean() > 5 * first[:, 12, 12].mean()

    real = [0, size // 2] if size % 2 == 0 else [0]
    other = [col for col in range(size // 2 + 1) if col not in real]
    mirrored = first[:, (-torch.arange(size)) % size]
    # Columns 0 and S/2 hold (k, l) and its conjugate (-k, l): those must agree exactly.
    assert torch.equal(first[:, :, real], mirrored[:, :, real])
    # Elsewhere (-k, l) is another frequency: the photos' magnitude is kept bit for bit (mirroring
    # those rows too had moved entries by up to 22 %).
    raw = torch.from_numpy(photos_mean_magnitude(size))
    assert torch.equal(first[:, :, other], raw[:, :, other])
    assert not torch.equal(first[:, :, other], mirrored[:, :, other])


@pytest.mark.parametrize("size", [32, 33])
def test_natural_magnitude_is_the_magnitude_of_a_real_image(size):
    """irfft2 keeps only what a real image can have; the magnitude must survive the round trip."""
    magnitude = natural_magnitude(size)
    image = torch.fft.irfft2(magnitude.to(torch.complex128), s=(size, size))
    back = torch.fft.rfft2(image).abs()
    ac = torch.ones_like(magnitude, dtype=torch.bool)
    ac[:, 0, 0] = False
    torch.testing.assert_close(back[ac], magnitude[ac], rtol=1e-12, atol=1e-12 * float(magnitude.max()))


# ----------------------------------------------------------------------------- 2. planted ground truth
def test_concept_response_is_pre_codes_before_the_relu(random_models):
    usae, _ = random_models
    x = torch.randn(50, 32)
    response = torch.stack([concept_response(usae, x, "vit", c) for c in range(16)], 1)
    torch.testing.assert_close(response.relu(), usae.pre_codes(x, "vit"))
    assert (response < 0).any()  # the part CAM still climbs where the concept is off


@pytest.mark.parametrize(("concept", "colour"), [(RED, 0), (BLUE, 2)])
def test_planted_colour_concept_gives_an_image_of_that_colour_in_every_model(planted, concept, colour):
    usae, backbones = planted
    results = coordinated_activation_maximization(usae, backbones, concept, CamConfig(**FAST))
    assert list(results) == ["coarse", "fine"]
    for name, result in results.items():
        assert result.model == name
        assert result.image.shape == (32, 32, 3) and result.image.dtype == np.uint8
        rgb = mean_rgb(result.image)
        assert rgb[colour] > np.delete(rgb, colour).max() + 30, (name, rgb)
        # The opponent feature of the saved image, e.g. mean R - mean(G, B) for red, over 1/5 of the range.
        assert result.final_activation > max(result.start_activation, 0.2), (name, result)


def test_planted_activation_matches_the_colour_of_the_saved_image(planted):
    """final_activation is the concept measured on the uint8 image itself: here mean R - mean(G, B)."""
    usae, backbones = planted
    results = coordinated_activation_maximization(usae, {"coarse": backbones["coarse"]}, RED, CamConfig(**FAST))
    result = results["coarse"]
    rgb = mean_rgb(result.image) / 255
    assert result.final_activation == pytest.approx(rgb[0] - (rgb[1] + rgb[2]) / 2, abs=1e-5)


# ----------------------------------------------------------------------------- 3. it maximises
def test_random_tiny_models_climb(random_models):
    usae, backbones = random_models
    calls = []
    results = coordinated_activation_maximization(usae, backbones, 5, CamConfig(**FAST),
                                                  grids={"vit": (8, 8), "cnn": (8, 8)},
                                                  on_step=lambda *args: calls.append(args))
    assert calls == [(m, s, 30) for m in ("vit", "cnn") for s in range(1, 31)]
    for name, result in results.items():
        trace = result.activation_trace
        assert len(trace) == 30
        assert np.mean(trace[-5:]) > np.mean(trace[:5]) + 0.1, (name, trace)
        assert result.final_activation > result.start_activation + 0.1, (name, result)


# ----------------------------------------------------------------------------- 4. reproducible
def test_same_seed_same_bytes_other_seed_other_image(random_models):
    usae, backbones = random_models
    cfg = CamConfig(**{**FAST, "steps": 8})
    first = coordinated_activation_maximization(usae, backbones, 2, cfg)
    again = coordinated_activation_maximization(usae, backbones, 2, cfg)
    other = coordinated_activation_maximization(usae, backbones, 2, CamConfig(**{**FAST, "steps": 8, "seed": 1}))
    for name in backbones:
        assert first[name].image.tobytes() == again[name].image.tobytes()
        assert first[name].activation_trace == again[name].activation_trace
        assert np.abs(first[name].image.astype(int) - other[name].image.astype(int)).mean() > 10


def test_runs_the_same_inside_inference_mode(planted):
    """A web worker may call it under inference_mode or no_grad; the phase still gets gradients."""
    usae, backbones = planted
    cfg = CamConfig(**{**FAST, "steps": 5})
    plain = coordinated_activation_maximization(usae, backbones, RED, cfg)
    with torch.inference_mode():
        inside = coordinated_activation_maximization(usae, backbones, RED, cfg)
    for name in backbones:
        assert inside[name].image.tobytes() == plain[name].image.tobytes()


def test_every_model_gets_the_same_crop_boxes_at_every_step(planted, monkeypatch):
    """The noise is as large as each backbone's input (32 and 16 px here); it must not shift the crops."""
    usae, backbones = planted
    assert backbones["coarse"].input_size != backbones["fine"].input_size
    boxes: dict[int, list[torch.Tensor]] = {}
    roi_align = torchvision.ops.roi_align

    def spy(pixels, rois, *, output_size, **kwargs):
        boxes.setdefault(output_size, []).append(rois.detach().clone())
        return roi_align(pixels, rois, output_size=output_size, **kwargs)

    monkeypatch.setattr(torchvision.ops, "roi_align", spy)
    coordinated_activation_maximization(usae, backbones, RED, CamConfig(**{**FAST, "steps": 3}))
    assert sorted(boxes) == [16, 32] and [len(b) for b in boxes.values()] == [3, 3]
    for step, (coarse, fine) in enumerate(zip(boxes[32], boxes[16]), 1):
        assert torch.equal(coarse, fine), step
    assert not torch.equal(boxes[32][0], boxes[32][1])  # new crops every step


# ----------------------------------------------------------------------------- 5. what is reported
def explain_peak(usae: USAE, backbone: Backbone, model: str, concept: int, grid: tuple[int, int],
                 image: np.ndarray) -> float:
    """What the explain page shows for the concept on the image, from the unfused encoder: TopK of
    every token's pre-codes, the concept's entry (0 where it lost), maximum over tokens."""
    with torch.no_grad():
        native = backbone(backbone.preprocess(Image.fromarray(image))[None])
        tokens = resample_grid(native, backbone.native_grid, grid)[0]
        pre = usae.pre_codes(usae.standardize(tokens, model), model)
        top = torch.topk(pre, usae.cfg.k, dim=1)
        won = (top.indices == concept).any(dim=1)
        return float(torch.where(won, pre[:, concept], torch.zeros(())).max())


def test_final_peak_code_is_the_explain_pages_number(random_models):
    usae, backbones = random_models
    grids = {"vit": (8, 8), "cnn": (8, 8)}
    results = coordinated_activation_maximization(usae, backbones, 5, CamConfig(**{**FAST, "steps": 10}), grids=grids)
    for name, result in results.items():
        expected = explain_peak(usae, backbones[name], name, 5, grids[name], result.image)
        assert expected > 0, name  # the concept wins TopK somewhere, so the peak is not trivially 0
        assert result.final_peak_code == pytest.approx(expected, rel=1e-5, abs=1e-6), name


def test_a_concept_that_never_wins_topk_has_a_zero_peak_code_but_a_positive_activation(planted):
    """final_activation is before TopK; final_peak_code says the explain page would show nothing."""
    usae, backbones = planted
    usae = copy.deepcopy(usae)
    with torch.no_grad():
        usae.encoders[usae.index("coarse")].linear.bias[2] = 10.0  # always on, always above red: wins TopK (k = 1)
    result = maximize_concept(usae, backbones["coarse"], "coarse", RED, CamConfig(**FAST))
    assert result.final_activation > 0.2
    assert result.final_peak_code == 0.0
    assert explain_peak(usae, backbones["coarse"], "coarse", RED, backbones["coarse"].native_grid, result.image) == 0.0


# ----------------------------------------------------------------------------- frozen models
def test_models_are_unchanged_and_their_flags_restored(random_models):
    usae, backbones = random_models
    usae.train()  # BatchNorm in train mode would update its running statistics if it were used
    backbones["cnn"].model[0].weight.requires_grad_(False)  # a mix of flags, all to be restored
    states = {name: copy.deepcopy(b.state_dict()) for name, b in backbones.items()}
    usae_state = copy.deepcopy(usae.state_dict())
    flags = {name: [m.training for m in b.modules()] for name, b in backbones.items()}
    grads = {name: [p.requires_grad for p in b.parameters()] for name, b in backbones.items()}
    try:
        coordinated_activation_maximization(usae, backbones, 1, CamConfig(**{**FAST, "steps": 3}))
        assert usae.training and all(m.training for m in usae.modules())
        assert all(p.requires_grad for p in usae.parameters())
        for k, v in usae.state_dict().items():
            assert torch.equal(v, usae_state[k]), k
        for name, backbone in backbones.items():
            assert [m.training for m in backbone.modules()] == flags[name]
            assert [p.requires_grad for p in backbone.parameters()] == grads[name]
            assert all(p.grad is None for p in backbone.parameters())
            for k, v in backbone.state_dict().items():
                assert torch.equal(v, states[name][k]), (name, k)
    finally:
        usae.eval()
        backbones["cnn"].model[0].weight.requires_grad_(True)


# ----------------------------------------------------------------------------- 6. errors
@pytest.mark.parametrize(("concept", "message"), [
    (4, "concept 4 is out of range: this USAE has concepts 0 to 3"),
    (-1, "concept -1 is out of range"),
    (np.int64(4), "concept 4 is out of range"),
    (True, "concept must be an integer .*got True"),
    (1.0, "concept must be an integer .*got 1.0"),
    (torch.tensor(1.0), "concept must be an integer"),
])
def test_concept_out_of_range(planted, concept, message):
    usae, backbones = planted
    with pytest.raises(UsaeError, match=message):
        coordinated_activation_maximization(usae, backbones, concept, CamConfig(**FAST))


def test_numpy_and_tensor_integers_are_concepts_grids_and_settings(planted):
    """What a notebook passes: the concept from an argmax (NumPy or torch), grid sides and steps
    read from arrays. They were refused: an np.int64 concept as 'out of range', np.int64 steps as
    not an integer. Each gives the same bytes as the same plain ints."""
    usae, backbones = planted
    grids = {"coarse": (4, 4), "fine": (4, 4)}
    expected = coordinated_activation_maximization(usae, backbones, RED, CamConfig(**{**FAST, "steps": 4}), grids=grids)
    red = np.array([5.0, 1.0, 0.0]).argmax()  # np.int64(0)
    assert type(red) is np.int64 and red == RED
    for concept in (red, torch.tensor([5.0, 1.0]).argmax()):
        cfg = CamConfig(**{**FAST, "steps": np.int64(4), "image_size": np.int32(32), "seed": np.uint8(0)})
        assert type(cfg.steps) is int and type(cfg.image_size) is int and type(cfg.seed) is int
        got = coordinated_activation_maximization(usae, backbones, concept, cfg,
                                                  grids={m: tuple(np.array(g)) for m, g in grids.items()})
        for name in backbones:
            assert np.array_equal(got[name].image, expected[name].image), name
            assert got[name].activation_trace == expected[name].activation_trace


def test_unknown_model_wrong_backbone_and_missing_grid(planted, random_models):
    usae, backbones = planted
    with pytest.raises(UsaeError, match=r"model 'other' is not in this USAE \(has coarse, fine\)"):
        coordinated_activation_maximization(usae, {"other": backbones["coarse"]}, 0, CamConfig(**FAST))
    with pytest.raises(UsaeError, match="gives 12-dim tokens but the USAE's model 'coarse' reads 2-dim"):
        coordinated_activation_maximization(usae, {"coarse": random_models[1]["cnn"]}, 0, CamConfig(**FAST))
    with pytest.raises(UsaeError, match="no token grid given for model 'fine'"):
        coordinated_activation_maximization(usae, backbones, 0, CamConfig(**FAST), grids={"coarse": (4, 4)})
    with pytest.raises(UsaeError, match="at least one model"):
        coordinated_activation_maximization(usae, {}, 0, CamConfig(**FAST))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("steps", 0, "steps must be an integer >= 1"),
    ("steps", 2.5, "steps must be an integer"),
    ("image_size", 8, r"image_size must be an integer in \[16, 2048\]"),
    ("crops", 0, "crops must be an integer >= 1"),
    ("crop_scale", (0.5, 0.25), "crop_scale must be"),
    ("crop_scale", (0.0, 1.0), "crop_scale must be"),
    ("crop_scale", (0.5, 1.5), "crop_scale must be"),
    ("noise", -0.1, "noise must be a finite number >= 0"),
    ("lr", 0.0, "lr must be a finite number > 0"),
    ("lr", float("nan"), "lr must be"),
    ("seed", -1, "seed must be an integer"),
    ("device", "gpu0", "device 'gpu0' is not a torch device"),
])
def test_bad_config_values(field, value, message):
    with pytest.raises(UsaeError, match=message):
        CamConfig(**{field: value})


def test_device_auto_is_picked_when_the_run_starts(planted):
    usae, backbones = planted
    cfg = CamConfig(**{**FAST, "steps": 1}, device="auto")
    results = coordinated_activation_maximization(usae, backbones, RED, cfg)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(usae.parameters()).device.type == expected and set(results) == set(backbones)
    with pytest.raises(UsaeError, match="CAM device 'gpu' is not a torch device"):
        CamConfig(device="gpu")


def test_the_photos_behind_the_magnitude_are_read_once_per_process(monkeypatch):
    """Each new image size measured the photos' spectrum again and read every photo again
    (~1.5 s per size); the photos are read once, whatever the sizes."""
    from usae_core import cam, demo_images

    reads = []
    for name, load in list(demo_images.PHOTOS.items()):
        monkeypatch.setitem(demo_images.PHOTOS, name, lambda load=load, name=name: reads.append(name) or load())
    demo_images.photo.cache_clear()
    cam.colour_statistics.cache_clear()
    try:
        cam.colour_statistics()
        for size in (16, 24):
            cam.photos_mean_magnitude(size)
        assert sorted(reads) == sorted(cam.NATURAL_PHOTOS)
        shared = demo_images.photo("chelsea")
        with pytest.raises(ValueError, match="read-only"):  # one array for every caller: none may write it
            shared[0, 0, 0] = 0
    finally:
        demo_images.photo.cache_clear()
        cam.colour_statistics.cache_clear()


def test_cam_without_a_config_runs_the_default_one(planted):
    """`cfg` may be left out: CAM then runs CamConfig() (its steps are what on_step counts to)."""
    usae, backbones = planted
    totals = []

    class Stop(Exception):
        pass

    def first_step(model: str, step: int, total: int) -> None:
        totals.append((step, total))
        raise Stop

    with pytest.raises(Stop):
        coordinated_activation_maximization(usae, {"coarse": backbones["coarse"]}, RED, on_step=first_step)
    assert totals == [(1, CamConfig().steps)]
