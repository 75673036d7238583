"""USAEConfig and TrainConfig: the values they accept, the defaults they work out, the configs
of saved runs they load, and errors that name a setting as both `usae train` and Python set it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from usae_core.config import TrainConfig, USAEConfig
from usae_core.errors import UsaeError


def test_model_dims_read_from_numpy_shapes_are_accepted_as_plain_ints():
    """np.int64(3) was refused ("invalid dim"): a dimension read from an array's shape had to be
    cast first. It is kept as an int, so the config still serialises to JSON."""
    shape = np.zeros((2, 5, 7)).shape
    cfg = USAEConfig(model_dims={"a": np.int64(3), "b": np.int32(5), "c": np.uint16(6), "d": shape[2]},
                     n_concepts=16, k=2)
    assert cfg.model_dims == {"a": 3, "b": 5, "c": 6, "d": 7}
    assert all(type(dim) is int for dim in cfg.model_dims.values())
    assert list(cfg.model_dims) == ["a", "b", "c", "d"]  # the store's model order
    assert USAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("dim", [True, np.bool_(True), 3.0, np.float64(3), 0, -2, np.int64(0), np.int64(-1), "3", None])
def test_model_dims_that_are_no_positive_integer_are_refused(dim):
    with pytest.raises(UsaeError, match=r"model 'a' has invalid dim"):
        USAEConfig(model_dims={"a": dim})


def test_the_default_warmup_is_a_tenth_of_the_steps_up_to_100():
    """It was 100 whatever the steps (with 100 steps the peak rate came at the last one); left
    out it is now min(100, steps // 10), what `usae demo` passes, and config.json keeps the number."""
    for steps, warmup in ((5, 0), (10, 1), (100, 10), (400, 40), (1000, 100), (2000, 100), (10**6, 100)):
        cfg = TrainConfig(steps=steps)
        assert cfg.warmup_steps == warmup == min(100, steps // 10), steps
        assert cfg.to_dict()["warmup_steps"] == warmup
    assert TrainConfig(steps=400, warmup_steps=100).warmup_steps == 100  # given: kept
    assert TrainConfig(steps=50, warmup_steps=50).warmup_steps == 50  # warming up over the whole run is allowed
    assert TrainConfig(steps=50, warmup_steps=0).warmup_steps == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 50, "warmup_steps": 100},
     r"--warmup-steps \(warmup_steps\) 100 is more than --steps \(steps\) 50, .*never reach --lr .*"
     r"pass at most 50, or leave it out for min\(100, steps // 10\) = 5"),
    ({"warmup_steps": -1}, r"--warmup-steps \(warmup_steps\) must be >= 0, got -1"),
    ({"steps": 0}, r"--steps \(steps\) must be >= 1, got 0"),
    ({"batch_size": 0}, r"--batch-size \(batch_size\) must be >= 1, got 0"),
    ({"lr": 0}, r"--lr \(lr\) must be > 0, got 0"),
])
def test_bad_train_settings_are_named_as_the_option_and_the_field(kwargs, message):
    """A Python caller sets fields, not flags: the message names both (it named only the flag)."""
    with pytest.raises(UsaeError, match=message):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"n_concepts": 0}, r"--concepts \(n_concepts\) must be >= 1, got 0"),
    ({"n_concepts": 8, "k": 9}, r"--k \(k\) must be in \[1, --concepts \(n_concepts\) = 8\], got 9"),
])
def test_bad_usae_settings_are_named_as_the_option_and_the_field(kwargs, message):
    with pytest.raises(UsaeError, match=message):
        USAEConfig(model_dims={"a": 4}, **kwargs)


def test_saved_train_configs_load_unchanged():
    """config.json keeps the warmup a run trained with: one written before the default changed
    (100) loads as 100, even where that exceeds the steps (the old default in a short run)."""
    new = TrainConfig(steps=300)
    assert TrainConfig.from_dict(json.loads(json.dumps(new.to_dict()))) == new
    old = {**new.to_dict(), "steps": 2000, "warmup_steps": 100, "a_field_from_later": 1}
    assert TrainConfig.from_dict(old).warmup_steps == 100
    short = {**new.to_dict(), "steps": 20, "warmup_steps": 100}
    loaded = TrainConfig.from_dict(short)
    assert (loaded.steps, loaded.warmup_steps) == (20, 100)
    with pytest.raises(UsaeError, match="--lr"):  # the other checks still apply
        TrainConfig.from_dict({**short, "lr": -1})


def test_a_negative_firing_threshold_or_dead_horizon_is_refused():
    with pytest.raises(UsaeError, match="fire_threshold must be >= 0, got -0.1"):
        TrainConfig(fire_threshold=-0.1)
    with pytest.raises(UsaeError, match="dead_after_tokens must be >= 0"):
        TrainConfig(dead_after_tokens=-1)


def test_numpy_integer_concepts_and_k_are_kept_as_plain_ints():
    cfg = USAEConfig(model_dims={"a": 3}, n_concepts=np.int64(8), k=np.int32(2))
    assert type(cfg.n_concepts) is int and type(cfg.k) is int
    json.dumps(cfg.to_dict())  # config.json is written with the json module
    with pytest.raises(UsaeError, match="k must be an integer, got 2.5"):
        USAEConfig(model_dims={"a": 3}, n_concepts=8, k=2.5)
