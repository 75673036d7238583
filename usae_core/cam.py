"""Coordinated activation maximisation (CAM): for one concept of a USAE, one optimised image per
model, so the models' views of the same concept can be compared side by side.

Each image is made with MACO (Fel et al. 2023, "Unlocking feature visualization for deeper
networks with MAgnitude Constrained Optimization"): it lives in the Fourier domain with a FIXED
magnitude spectrum taken from natural photos, and only the phase is optimised, so the image keeps
natural-image energy at every frequency and cannot drift into the high-frequency noise that
plain pixel optimisation finds. Every model starts from the same random phase and sees the same
sequence of crop boxes (same seed, drawn independently of the backbone's input size), so the
images differ only by what the models respond to.

The pipeline, for an image of side S:

    phase theta [3, S, S//2+1] --(Hermitian projection)--> spectrum m * exp(i phi)
    --irfft2--> spectral image x [3, S, S] in a decorrelated colour space
    --recolour + sigmoid--> pixels in (0, 255)  --random crops + noise--> backbone --> tokens
    --resample to the run's grid, standardise, encoder row of the concept--> objective

docs/cam.md explains the choices (magnitude source, colour, DC term, objective).
"""

from __future__ import annotations

import math
import operator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from usae_core.backbones.base import Backbone
from usae_core.devices import resolve_device
from usae_core.errors import UsaeError
from usae_core.extract import resample_grid
from usae_core.model import USAE

NATURAL_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "china", "flower", "grace_hopper")
"""Colour photos bundled in installed wheels (usae_core.demo_images.PHOTOS) that the magnitude
spectrum and the colour statistics are estimated from; the greyscale, astronomy and microscopy
ones are left out because their statistics are not those of everyday scenes."""
CROP_SCALES = (1.0, 0.6)
"""Square crops per photo: the largest square and squares of 0.6 of the shorter side, each at a
3 x 3 grid of positions (fewer where the photo leaves no room): 94 crops in all."""
COLOUR_SIDE = 128
"""Side at which each photo's largest square is read for the colour statistics."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UsaeError(msg)


def _integer(value: object) -> int | None:
    """`value` as a Python int when it is an integer of any kind: Python's, NumPy's (what
    `argmax` of an array gives) or a one-element integer tensor (what `argmax` of a tensor gives);
    None otherwise. A bool is not a number of steps or a concept here."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


@dataclass(frozen=True)
class CamConfig:
    """How the images are optimised. Frozen, so the checks of `__post_init__` stay true."""

    steps: int = 256
    """Optimisation steps per model (MACO's default)."""
    image_size: int = 224
    """Side of each output image in pixels; the image is optimised at this size and each augmented
    crop is resized to the backbone's `input_size`."""
    crops: int = 8
    """Augmented views per step; the objective is their mean."""
    crop_scale: tuple[float, float] = (0.25, 1.0)
    """Range of a crop's side as a fraction of the image side (square crops, uniform in between)."""
    noise: float = 0.05
    """Standard deviation of the Gaussian noise added to every view, as a fraction of the pixel range."""
    lr: float = 0.2
    """NAdam learning rate on the phase (radians per step at the start)."""
    seed: int = 0
    """Seeds the initial phase, the crops and the noise: same seed, same images (bit-for-bit on a CPU)."""
    device: str = "cpu"
    """Where the image, the backbones and the USAE compute (they are moved there for the run);
    "auto" is a GPU when there is one."""

    def __post_init__(self) -> None:
        for name in ("steps", "image_size", "crops", "seed"):  # NumPy and tensor integers kept as plain ints
            value = _integer(getattr(self, name))
            if value is not None:
                object.__setattr__(self, name, value)

        def integer(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        _check(integer(self.steps) and self.steps >= 1, f"CAM steps must be an integer >= 1, got {self.steps!r}")
        _check(integer(self.image_size) and 16 <= self.image_size <= 2048,
               f"CAM image_size must be an integer in [16, 2048] pixels, got {self.image_size!r}")
        _check(integer(self.crops) and self.crops >= 1, f"CAM crops must be an integer >= 1, got {self.crops!r}")
        scale = tuple(self.crop_scale) if isinstance(self.crop_scale, (tuple, list)) else ()
        _check(len(scale) == 2 and all(isinstance(s, (int, float)) for s in scale) and 0 < scale[0] <= scale[1] <= 1,
               f"CAM crop_scale must be (low, high) with 0 < low <= high <= 1, got {self.crop_scale!r}")
        object.__setattr__(self, "crop_scale", (float(scale[0]), float(scale[1])))
        _check(isinstance(self.noise, (int, float)) and math.isfinite(self.noise) and self.noise >= 0,
               f"CAM noise must be a finite number >= 0, got {self.noise!r}")
        _check(isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0,
               f"CAM lr must be a finite number > 0, got {self.lr!r}")
        _check(integer(self.seed) and 0 <= self.seed < 2**63,
               f"CAM seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.device != "auto":  # picked when the run starts
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                example = "e.g. 'auto', 'cpu', 'cuda', 'cuda:1'"
                raise UsaeError(f"CAM device {self.device!r} is not a torch device ({example})") from None


@dataclass
class CamResult:
    model: str
    image: np.ndarray
    """uint8 `[image_size, image_size, 3]`."""
    activation_trace: list[float] = field(default_factory=list)
    """Per step, the mean over that step's augmented views and their tokens of
    `pre_codes[:, concept]` (the encoder's ReLU'd output, BEFORE TopK), before the step's update."""
    start_activation: float = 0.0
    """The mean over the tokens of the run's grid of `pre_codes[:, concept]` (ReLU'd, BEFORE TopK)
    on the uint8 start image, full view, preprocessed as the explain page does. Not the explain
    page's number: a concept that never wins TopK still scores here (see `final_peak_code`)."""
    final_activation: float = 0.0
    """The same mean pre-TopK activation on the final (saved) image: what CAM climbed."""
    final_peak_code: float = 0.0
    """The explain page's number for this concept on the saved image: its code AFTER TopK (usae.encode),
    maximum over tokens; 0 where it wins TopK on no token."""


# ----------------------------------------------------------------------------- the fixed magnitude
def _photos() -> list[np.ndarray]:
    from usae_core.demo_images import photo

    return [np.asarray(photo(name), dtype=np.uint8) for name in NATURAL_PHOTOS]


def _square(photo: np.ndarray, side: int, top: int, left: int, size: int) -> np.ndarray:
    """float64 `[3, size, size]` in [0, 1]: a square of the photo, resized with antialiasing."""
    crop = Image.fromarray(photo[top : top + side, left : left + side])
    resized = crop.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.float64).transpose(2, 0, 1) / 255


def _squares(photo: np.ndarray, size: int) -> Iterator[np.ndarray]:
    h, w = photo.shape[:2]
    for scale in CROP_SCALES:
        side = int(min(h, w) * scale)
        tops = sorted({int(t) for t in np.linspace(0, h - side, 3)})
        lefts = sorted({int(t) for t in np.linspace(0, w - side, 3)})
        for top in tops:
            for left in lefts:
                yield _square(photo, side, top, left, size)


@lru_cache(maxsize=1)
def colour_statistics() -> tuple[np.ndarray, np.ndarray]:
    """Mean colour `[3]` and colour covariance `[3, 3]` of the photos' pixels in [0, 1] (float64)."""
    pixels = []
    for photo in _photos():
        h, w = photo.shape[:2]
        side = min(h, w)
        pixels.append(_square(photo, side, (h - side) // 2, (w - side) // 2, COLOUR_SIDE).reshape(3, -1))
    flat = np.concatenate(pixels, axis=1)
    return flat.mean(axis=1), np.cov(flat)


def _matrix_power(cov: np.ndarray, power: float) -> np.ndarray:
    values, vectors = np.linalg.eigh(cov)
    return (vectors * values**power) @ vectors.T


def _periodic_component(channels: np.ndarray) -> np.ndarray:
    """Moisan's periodic + smooth decomposition, periodic part (float64 `[C, H, W]`).

    A photo is not periodic, and its border jumps put a bright cross on the frequency axes of its
    spectrum; a fixed magnitude with that cross would draw horizontal and vertical streaks into
    every image. The smooth part removed here carries exactly those jumps (and no mean)."""
    _, h, w = channels.shape
    jumps = np.zeros_like(channels)
    jumps[:, 0, :] += channels[:, -1, :] - channels[:, 0, :]
    jumps[:, -1, :] += channels[:, 0, :] - channels[:, -1, :]
    jumps[:, :, 0] += channels[:, :, -1] - channels[:, :, 0]
    jumps[:, :, -1] += channels[:, :, 0] - channels[:, :, -1]
    q = np.arange(h)[:, None]
    r = np.arange(w)[None, :]
    denominator = 2 * np.cos(2 * np.pi * q / h) + 2 * np.cos(2 * np.pi * r / w) - 4
    denominator[0, 0] = 1.0
    smooth = np.fft.fft2(jumps) / denominator
    smooth[:, 0, 0] = 0
    return channels - np.fft.ifft2(smooth).real


def _real_columns(size: int) -> torch.Tensor:
    """bool `[size // 2 + 1]`: the rfft2 columns l with l == -l (mod size), 0 and, for even sizes,
    size / 2. Only there does rfft2 store a frequency (k, l) and its conjugate (-k, -l) = (-k, l)
    both, so only there must a real image's spectrum be Hermitian along k."""
    columns = torch.zeros(size // 2 + 1, dtype=torch.bool)
    columns[0] = True
    if size % 2 == 0:
        columns[-1] = True
    return columns


def _mirror_rows(spectrum: torch.Tensor) -> torch.Tensor:
    """`spectrum[..., (-k) mod H, :]`: the rfft2 entry of frequency (-k, l) stored at row k."""
    h = spectrum.shape[-2]
    return spectrum[..., (-torch.arange(h, device=spectrum.device)) % h, :]


def photos_mean_magnitude(size: int) -> np.ndarray:
    """The mean `|rfft2|` over the decorrelated, periodic photo crops of side `size`, as measured."""
    mean, cov = colour_statistics()
    whiten = _matrix_power(cov, -0.5)
    spectra = []
    for photo in _photos():
        for square in _squares(photo, size):
            decorrelated = np.einsum("ij,jhw->ihw", whiten, square - mean[:, None, None])
            spectra.append(np.abs(np.fft.rfft2(_periodic_component(decorrelated))))
    return np.mean(spectra, axis=0)


@lru_cache(maxsize=4)
def _natural_magnitude(size: int) -> torch.Tensor:
    magnitude = torch.from_numpy(photos_mean_magnitude(size))
    # A real image's spectrum has m(k, l) = m(-k, -l). On the real columns rfft2 holds both entries,
    # and the photos' mean is symmetric there only up to rounding: irfft2 would drop the asymmetric
    # rest, and the image would miss the fixed magnitude by that much. Averaging with the mirrored
    # rows makes it exact. On the other columns row -k holds (-k, l), another frequency whose
    # conjugate rfft2 does not store, so they keep the photos' magnitude as measured.
    return torch.where(_real_columns(size), (magnitude + _mirror_rows(magnitude)) / 2, magnitude)


def natural_magnitude(size: int) -> torch.Tensor:
    """The fixed magnitude spectrum for images of side `size`: float64 `[3, size, size // 2 + 1]`.

    The mean of |rfft2| over 94 square crops of the NATURAL_PHOTOS (resized to `size`, colours
    decorrelated with `colour_statistics`, borders made periodic). Deterministic; computed once per
    size (1.6 to 2.9 s at 224 px on the dev box) and cached. A copy, so callers may modify it."""
    _check(isinstance(size, int) and size >= 16, f"the magnitude spectrum needs a side >= 16, got {size!r}")
    return _natural_magnitude(size).clone()


def recolour_matrix() -> torch.Tensor:
    """float64 `[3, 3]`: decorrelated channels -> RGB logits with the photos' colour correlation.

    The square root of the colour covariance, scaled so that the logits have unit variance on
    average over the channels when the decorrelated channels do."""
    _, cov = colour_statistics()
    return torch.from_numpy(_matrix_power(cov, 0.5) / math.sqrt(np.trace(cov) / 3))


# ----------------------------------------------------------------------------- the image
class MacoImage(nn.Module):
    """One image as a trainable phase under a fixed magnitude spectrum.

    `spectral_image()` is `irfft2(magnitude * exp(i * phase))` in a decorrelated colour space; its
    rfft2 has exactly `magnitude` at every frequency except DC, whose entry is real (the channel's
    mean) and equals `magnitude * cos(phase)` there, so the optimiser may move the mean colour
    within the photos' natural range as in MACO. `forward()` maps it to pixels in (0, 255)."""

    def __init__(self, size: int, seed: int = 0, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.size = size
        magnitude = natural_magnitude(size)
        # The initial phase comes from a CPU generator, so it is the same on every device.
        generator = torch.Generator().manual_seed(seed)
        phase = (torch.rand(magnitude.shape, generator=generator, dtype=torch.float64) * 2 - 1) * math.pi
        self.phase = nn.Parameter(phase.to(device, dtype))
        self.register_buffer("magnitude", magnitude.to(device, dtype))
        self.register_buffer("real_columns", _real_columns(size).to(device))
        dc = torch.zeros(magnitude.shape[-2:], dtype=torch.bool)
        dc[0, 0] = True
        self.register_buffer("dc", dc.to(device))
        # The AC part of every image has the same energy (Parseval; the magnitude fixes it), so one
        # constant scales it to unit RMS before the colours are mixed back.
        ac = magnitude.clone()
        ac[:, 0, 0] = 0
        ac_rms = torch.fft.irfft2(ac.to(torch.complex128), s=(size, size)).pow(2).mean().sqrt()
        self.register_buffer("recolour", (recolour_matrix() / ac_rms).to(device, dtype))

    def hermitian_phase(self) -> torch.Tensor:
        """The phase actually used: on the columns that hold conjugate pairs, the antisymmetric part
        (phi(-k) = -phi(k)), so the spectrum is that of a real image and irfft2 discards nothing."""
        antisymmetric = (self.phase - _mirror_rows(self.phase)) / 2
        return torch.where(self.real_columns, antisymmetric, self.phase)

    def spectral_image(self) -> torch.Tensor:
        """`[3, S, S]` decorrelated colour channels, before the pixel mapping."""
        phase = self.hermitian_phase()
        # DC: the antisymmetric phase is 0 there; the free phase sets the real value m * cos(theta).
        cos_phase = torch.where(self.dc, torch.cos(self.phase), torch.cos(phase))
        spectrum = torch.complex(self.magnitude * cos_phase, self.magnitude * torch.sin(phase))
        return torch.fft.irfft2(spectrum, s=(self.size, self.size))

    def forward(self) -> torch.Tensor:
        """Pixels `[3, S, S]` in (0, 255): recoloured logits through a sigmoid (smooth, never clipped,
        so every pixel keeps a gradient)."""
        logits = torch.einsum("ij,jhw->ihw", self.recolour, self.spectral_image())
        return 255 * torch.sigmoid(logits)

    @torch.no_grad()
    def to_uint8(self) -> np.ndarray:
        """uint8 `[S, S, 3]`."""
        return self().round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


# ----------------------------------------------------------------------------- the objective
def concept_response(usae: USAE, x_std: torch.Tensor, model: str, concept: int) -> torch.Tensor:
    """The encoder's response of one concept BEFORE its ReLU, `x_std [..., dim] -> [...]`, in eval mode:
    `relu(concept_response(...)) == usae.pre_codes(x_std, model)[..., concept]`.

    CAM ascends this rather than `pre_codes`: where the concept is on they are equal, and where it
    is off everywhere (common for a sparse concept on a random start image) the ReLU would give no
    gradient at all while this still says which way is up."""
    encoder = usae.encoders[usae.index(model)]
    weight = encoder.linear.weight[concept : concept + 1]
    bias = encoder.linear.bias[concept : concept + 1]
    response = F.linear(x_std, weight, bias)[..., 0]
    gamma, beta = encoder.eval_affine()
    return response if gamma is None else response * gamma[concept] + beta[concept]


def _responses(usae: USAE, backbone: Backbone, model: str, concept: int, grid: tuple[int, int],
               pixels: torch.Tensor) -> torch.Tensor:
    """Pixels `[V, 3, in, in]` in 0..255 -> the concept's pre-ReLU response per token `[V, tokens]`."""
    tokens = resample_grid(backbone(backbone.normalize(pixels)), backbone.native_grid, grid)  # as extraction did
    return concept_response(usae, usae.standardize(tokens.float(), model), model, concept)


def _crop_boxes(cfg: CamConfig, generator: torch.Generator) -> torch.Tensor:
    """float64 `[cfg.steps, cfg.crops, 4]`: every step's square crops as (left, top, right, bottom)
    in units of the image side, the side uniform in `cfg.crop_scale`, anywhere inside the image."""
    shape = (cfg.steps, cfg.crops)
    low, high = cfg.crop_scale
    side = low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)
    left = torch.rand(shape, generator=generator, dtype=torch.float64) * (1 - side)
    top = torch.rand(shape, generator=generator, dtype=torch.float64) * (1 - side)
    return torch.stack([left, top, left + side, top + side], -1)


def _augmented_views(pixels: torch.Tensor, boxes: torch.Tensor, input_size: int, noise: float,
                     generator: torch.Generator) -> torch.Tensor:
    """The crops `boxes [V, 4]` (units of the side) of `pixels [3, S, S]`, resized to `input_size`,
    plus Gaussian noise of standard deviation `noise` x 255: `[V, 3, input_size, input_size]`.

    roi_align averages several samples per output pixel when a crop is shrunk (antialiasing) and
    interpolates bilinearly when it is enlarged; its CPU backward is deterministic."""
    from torchvision.ops import roi_align

    rois = torch.cat([torch.zeros(len(boxes), 1, dtype=boxes.dtype), boxes * pixels.shape[-1]], 1)
    views = roi_align(pixels[None], rois.to(pixels), output_size=input_size, sampling_ratio=-1, aligned=True)
    return views + (torch.randn(views.shape, generator=generator) * (noise * 255)).to(views)


@torch.no_grad()
def _full_view_measures(usae: USAE, backbone: Backbone, model: str, concept: int, grid: tuple[int, int],
                        image: np.ndarray) -> tuple[float, float]:
    """The concept on the tokens of the uint8 image, preprocessed as explain does: the mean over
    tokens of `pre_codes[:, concept]` (before TopK), and the maximum over tokens of its code after
    TopK (the explain page's number)."""
    tokens = resample_grid(backbone(backbone.preprocess(Image.fromarray(image))[None]), backbone.native_grid, grid)[0]
    x_std = usae.standardize(tokens.float(), model)
    mean = concept_response(usae, x_std, model, concept).relu().mean()
    values, indices = usae.encode(x_std, model)
    return float(mean), float(usae.dense_codes(values, indices)[:, concept].max())


# ----------------------------------------------------------------------------- optimisation
@contextmanager
def _frozen(*modules: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the run. Every submodule's training flag (a
    Backbone is itself in train mode around an eval-mode model) and every parameter's
    requires_grad are restored afterwards, also when the run fails."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    grads = [(p, p.requires_grad) for module in modules for p in module.parameters()]
    try:
        for module in modules:
            module.eval().requires_grad_(False)
        yield
    finally:
        for m, training in flags:
            m.training = training
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)


def maximize_concept(usae: USAE, backbone: Backbone, model: str, concept: int, cfg: CamConfig, *,
                     grid: tuple[int, int] | None = None, on_step: Callable[[str, int, int], None] | None = None,
                     image: MacoImage | None = None) -> CamResult:
    """One model's CAM image (`coordinated_activation_maximization` checks the inputs and calls
    this per model). `usae` and `backbone` must be on `cfg.device`; they are frozen for the run.
    `image` (default: a fresh `MacoImage(cfg.image_size, cfg.seed)`) is optimised in place."""
    grid = tuple(grid or backbone.native_grid)
    # Callers may be inside no_grad or inference_mode (a web worker); the phase needs gradients.
    with torch.inference_mode(False), torch.enable_grad(), _frozen(usae, backbone):
        image = image if image is not None else MacoImage(cfg.image_size, cfg.seed, cfg.device)
        generator = torch.Generator().manual_seed(cfg.seed)  # crops and noise: the same on every device
        # Every step's boxes come before any noise: the noise is as large as the backbone's input, so
        # drawn in between it would move later steps' crops by a different amount in each model.
        boxes = _crop_boxes(cfg, generator)
        optimizer = torch.optim.NAdam([image.phase], lr=cfg.lr)
        start, _ = _full_view_measures(usae, backbone, model, concept, grid, image.to_uint8())
        trace: list[float] = []
        for step in range(1, cfg.steps + 1):
            optimizer.zero_grad(set_to_none=True)
            views = _augmented_views(image().float(), boxes[step - 1], backbone.input_size, cfg.noise, generator)
            response = _responses(usae, backbone, model, concept, grid, views)
            (-response.mean()).backward()
            optimizer.step()
            trace.append(float(response.detach().relu().mean()))
            if on_step is not None:
                on_step(model, step, cfg.steps)
        final = image.to_uint8()
        final_activation, final_peak_code = _full_view_measures(usae, backbone, model, concept, grid, final)
        return CamResult(model=model, image=final, activation_trace=trace, start_activation=start,
                         final_activation=final_activation, final_peak_code=final_peak_code)


def _validate(usae: USAE, backbones: Mapping[str, Backbone], concept: int,
              grids: Mapping[str, tuple[int, int]] | None) -> tuple[int, dict[str, tuple[int, int]]]:
    """Everything checked before the first step: the concept as a Python int, the grid per model."""
    n = usae.cfg.n_concepts
    index = _integer(concept)
    _check(index is not None, f"concept must be an integer (a concept index), got {concept!r}")
    _check(0 <= index < n, f"concept {index} is out of range: this USAE has concepts 0 to {n - 1}")
    _check(len(backbones) > 0, "CAM needs at least one model's backbone")
    out = {}
    for name, backbone in backbones.items():
        usae.index(name)  # raises "model 'x' is not in this USAE (has ...)"
        want = usae.cfg.model_dims[name]
        _check(backbone.dim == want,
               f"backbone {backbone.name!r} gives {backbone.dim}-dim tokens but the USAE's model {name!r} reads "
               f"{want}-dim ones; is it the backbone (and layer) of that model?")
        _check(not backbone.keep_cls, f"backbone {backbone.name!r}: keep_cls tokens do not fit a token grid")
        if grids is None:
            out[name] = tuple(backbone.native_grid)
            continue
        _check(name in grids, f"no token grid given for model {name!r} (grids has {', '.join(grids) or 'none'})")
        grid = tuple(_integer(g) for g in grids[name])
        _check(len(grid) == 2 and all(g is not None and g >= 1 for g in grid),
               f"the token grid of model {name!r} must be two positive integers, got {grids[name]!r}")
        out[name] = grid
    return index, out


def coordinated_activation_maximization(usae: USAE, backbones: Mapping[str, Backbone], concept: int,
                                        cfg: CamConfig | None = None, grids: Mapping[str, tuple[int, int]] | None = None,
                                        on_step: Callable[[str, int, int], None] | None = None,
                                        ) -> dict[str, CamResult]:
    """One image per model (keys of `backbones` = USAE model names) for the same concept.

    `concept` is an index into the USAE's code: a Python int, or a NumPy or one-element tensor
    integer as `argmax` returns. `cfg` defaults to `CamConfig()`.
    Every model's image starts from the same phase and sees the same crop boxes at every step
    (`cfg.seed`); the noise comes from the same seed too, identical between models of the same
    input size.
    `grids`: the run's common token grid per model (tokens are resampled to it as extraction did);
    None uses each backbone's native grid. `on_step(model, step, total)` is called after every
    step, `step` counting from 1 to `total = cfg.steps`. The USAE and the backbones are moved to
    `cfg.device` (and stay there), put in eval mode and their parameters get no gradients; their
    training flags and requires_grad are restored afterwards."""
    cfg = cfg or CamConfig()
    # "auto" picks here; a GPU that is not there is a UsaeError, not torch's from the first move
    cfg = replace(cfg, device=str(resolve_device(cfg.device)))
    concept, grid_of = _validate(usae, backbones, concept, grids)
    usae.to(cfg.device)
    return {name: maximize_concept(usae, backbone.to(cfg.device), name, concept, cfg, grid=grid_of[name],
                                   on_step=on_step)
            for name, backbone in backbones.items()}
