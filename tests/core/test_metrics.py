"""Known-answer checks for every metric, and the streaming evaluation against float64 brute force."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from usae_core.config import USAEConfig
from usae_core.errors import UsaeError
from usae_core.metrics import (
    EvalResult,
    R2Accumulator,
    cofire_proportion,
    concept_energy,
    evaluate_usae,
    firing_entropy,
    r2_score,
)
from usae_core.model import USAE
from usae_core.store import import_activations


def test_r2_uses_a_per_dimension_mean():
    # Two dimensions with very different means: predicting each dimension's mean gives R^2 = 0
    # with the per-dimension definition (a global-mean definition would report ~1).
    x = np.array([[0.0, 100.0], [2.0, 102.0], [4.0, 98.0]])
    assert r2_score(x, np.tile(x.mean(0), (3, 1))) == pytest.approx(0.0)
    assert r2_score(x, x) == pytest.approx(1.0)
    x_hat = x + np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # residual 3, total variance (8) + (8) = 16
    assert r2_score(x, x_hat) == pytest.approx(1 - 3 / 16)


def test_r2_accumulator_streams_to_the_one_shot_value():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((101, 5)) * [1, 10, 0.1, 3, 7] + [0, 50, -3, 1, 2]
    x_hat = x + 0.3 * rng.standard_normal(x.shape)
    acc = R2Accumulator(5)
    for chunk in np.array_split(np.arange(101), 7):
        acc.update(torch.from_numpy(x[chunk]).float(), torch.from_numpy(x_hat[chunk]).float())
    assert acc.value() == pytest.approx(r2_score(x, x_hat), abs=1e-5)


def test_firing_entropy_known_answers():
    counts = np.array([
        [5, 10, 0, 3, 0],
        [5, 0, 0, 1, 0],
    ])
    h = firing_entropy(counts)
    p = np.array([0.75, 0.25])
    assert h[0] == pytest.approx(1.0)  # equal in both models: universal
    assert h[1] == pytest.approx(0.0)  # one model only
    assert h[2] == 0.0  # never fires
    assert h[3] == pytest.approx(-(p * np.log(p)).sum() / math.log(2))
    three = firing_entropy(np.array([[4], [4], [4]]))
    assert three[0] == pytest.approx(1.0)


def test_cofire_proportion_known_answers():
    fire = np.array([[10, 4, 0], [5, 4, 0]])
    co = np.array([5, 2, 0])
    np.testing.assert_allclose(cofire_proportion(co, fire), [[0.5, 0.5, 0.0], [1.0, 0.5, 0.0]])


def test_energy_is_the_sum_over_models_of_the_mean_code():
    sums = np.array([[10.0, 0.0], [30.0, 4.0]])
    np.testing.assert_allclose(concept_energy(sums, n_tokens=10), [4.0, 0.4])


def _result_with_r2(r2: list[list[float]]) -> EvalResult:
    m = len(r2)
    return EvalResult(models=[f"m{i}" for i in range(m)], n_tokens=10, tau=0.1, r2=np.array(r2),
                      fire_counts=np.ones((m, 3), np.int64), cofire_counts=np.ones(3, np.int64),
                      code_sums=np.ones((m, 3)), l0=np.ones(m))


def test_r2_self_averages_the_diagonal_and_r2_cross_the_off_diagonal():
    """r2_self is the mean of R^2[i, i], r2_cross of R^2[i, j != i] (also in summary()); one model has no cross R^2."""
    res = _result_with_r2([[1.0, 0.2], [0.4, 0.9]])
    assert res.r2_self == pytest.approx(0.95) and res.r2_cross == pytest.approx(0.3)
    summary = res.summary()
    assert summary["r2_self"] == pytest.approx(0.95) and summary["r2_cross"] == pytest.approx(0.3)
    one = _result_with_r2([[0.8]])
    assert one.r2_self == pytest.approx(0.8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain nan, not NumPy's "mean of empty slice" warning
        assert math.isnan(one.r2_cross)
    # The summary is strict JSON (`usae eval --json`): no cross R^2 is null, not NaN.
    assert one.summary()["r2_cross"] is None
    assert json.loads(json.dumps(one.summary(), allow_nan=False))["r2"] == [[0.8]]


def test_evaluate_matches_a_float64_brute_force(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {"a": rng.standard_normal((12, 4, 5)).astype(np.float32),
              "b": rng.standard_normal((12, 4, 7)).astype(np.float32) + 3}
    store = import_activations(tmp_path / "s", arrays, dtype="float32", shard_images=5)
    torch.manual_seed(0)
    model = USAE(USAEConfig(model_dims=store.dims, n_concepts=10, k=3, encoder="linear"))
    model.set_stats(store.compute_stats())
    with torch.no_grad():
        for b in model.decoder_biases:
            b.normal_()
    tau = 0.1
    res = evaluate_usae(model, store, tau=tau, batch_images=5)

    # Brute force in float64 with dense codes: Z = topk(relu(W x + c)), x_hat = Z D + b.
    names = ["a", "b"]
    p = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    x = {n: ((arrays[n].reshape(-1, store.dims[n]) - p[f"mean_{i}"]) / p[f"scale_{i}"]) for i, n in enumerate(names)}
    z = {}
    for i, n in enumerate(names):
        pre = np.maximum(x[n] @ p[f"encoders.{i}.linear.weight"].T + p[f"encoders.{i}.linear.bias"], 0)
        keep = np.argsort(-pre, axis=1)[:, :3]
        z[n] = np.zeros_like(pre)
        np.put_along_axis(z[n], keep, np.take_along_axis(pre, keep, 1), 1)
    for i, src in enumerate(names):
        for j, tgt in enumerate(names):
            recon = z[src] @ p[f"dictionaries.{j}"] + p[f"decoder_biases.{j}"]
            assert res.r2[i, j] == pytest.approx(r2_score(x[tgt], recon), abs=1e-5)
    fire = np.stack([(z[n] > tau).sum(0) for n in names])
    np.testing.assert_array_equal(res.fire_counts, fire)
    np.testing.assert_array_equal(res.cofire_counts, ((z["a"] > tau) & (z["b"] > tau)).sum(0))
    np.testing.assert_allclose(res.energy, np.abs(np.stack([z[n].mean(0) for n in names])).sum(0), rtol=1e-5)
    np.testing.assert_allclose(res.l0, [(z[n] > tau).sum(1).mean() for n in names], rtol=1e-6)
    np.testing.assert_allclose(res.firing_entropy, firing_entropy(fire))
    assert res.dead_fraction == pytest.approx((fire.sum(0) == 0).mean())


def test_evaluating_on_a_store_of_other_models_is_a_clear_error(tmp_path):
    rng = np.random.default_rng(2)
    store = import_activations(tmp_path / "s", {"a": rng.standard_normal((3, 4, 5)).astype(np.float32)})
    model = USAE(USAEConfig(model_dims={"a": 6}, n_concepts=8, k=2, encoder="linear"))
    with pytest.raises(UsaeError, match="trained on models"):
        evaluate_usae(model, store)



@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_a_gpu_that_is_not_there_is_named_not_a_torch_error(tmp_path):
    """evaluate_usae, mine_store and CAM say the device is missing (torch's own error was
    "Found no NVIDIA driver" from deep inside the first tensor moved)."""
    from usae_core.cam import CamConfig, coordinated_activation_maximization
    from usae_core.config import USAEConfig
    from usae_core.mining import mine_store
    from usae_core.model import USAE
    from usae_core.store import import_activations

    store = import_activations(tmp_path / "s", {"a": np.zeros((2, 4, 3), np.float32)}, grid=(2, 2))
    model = USAE(USAEConfig(model_dims={"a": 3}, n_concepts=4, k=1))
    for call in (lambda: evaluate_usae(model, store, device="cuda"), lambda: mine_store(model, store, device="cuda:1"),
                 lambda: coordinated_activation_maximization(model, {}, 0, CamConfig(device="cuda"))):
        with pytest.raises(UsaeError, match="no CUDA device is available"):
            call()
    with pytest.raises(UsaeError, match="unknown device 'gpu'"):
        evaluate_usae(model, store, device="gpu")


def test_evaluating_zero_images_is_refused_not_read_as_every_image(tmp_path):
    from usae_core.model import USAE
    from usae_core.store import import_activations

    store = import_activations(tmp_path / "s", {"a": np.ones((3, 4, 3), np.float32)}, grid=(2, 2))
    model = USAE(USAEConfig(model_dims={"a": 3}, n_concepts=4, k=1))
    with pytest.raises(UsaeError, match="max_images must be >= 1"):
        evaluate_usae(model, store, max_images=0)
    assert evaluate_usae(model, store, max_images=2).n_tokens == 8
