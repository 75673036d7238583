"""`train_usae(init_from=...)` / `usae train --init-from`: a new run that starts from another
run's weights and standardisation statistics (to train a finished run further, or on another
store of the same models), what it records, how it resumes, and what it refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.core.planted import make_planted
from usae_core.config import TrainConfig, USAEConfig
from usae_core.errors import UsaeError
from usae_core.model import USAE
from usae_core.store import ActivationStore, import_activations
from usae_core.train import Trainer, read_training_log, train_usae

SHAPE = dict(n_concepts=24, k=3, encoder="linear")
"""The source run's shape: none of it `usae train`'s defaults, so the CLI test sees where each came from."""


def _planted_store(path: Path, seed: int = 0, scale: float = 1.0, shift: float = 0.0) -> ActivationStore:
    """64 images x 16 tokens of three models sharing planted concepts; `scale` and `shift` give
    the same concepts in other units (other standardisation statistics)."""
    data = make_planted(n_images=64, seed=seed)
    arrays = {name: array * scale + shift for name, array in data.arrays.items()}
    return import_activations(path, arrays, dtype="float32", shard_images=16)


def _cfgs(store, **train) -> tuple[USAEConfig, TrainConfig]:
    settings = dict(steps=30, batch_size=64, lr=1e-3, warmup_steps=5, log_every=5, checkpoint_every=10,
                    dead_after_tokens=500, seed=3, device="cpu")
    return USAEConfig(model_dims=store.dims, **SHAPE), TrainConfig(**{**settings, **train})


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ActivationStore:
    return _planted_store(tmp_path_factory.mktemp("data") / "store")


@pytest.fixture(scope="module")
def source(store, tmp_path_factory) -> Path:
    """A finished run of 400 steps (checkpoints at 300 and 400 kept): it has learnt the planted
    concepts (batch R² about 0.8, an L1 loss about a third of a random init's)."""
    run = tmp_path_factory.mktemp("runs") / "source"
    train_usae(store, run, *_cfgs(store, steps=400, batch_size=256, lr=1e-2, warmup_steps=20, log_every=50,
                                  checkpoint_every=100), progress=False)
    return run


def _weights(model: USAE) -> dict[str, torch.Tensor]:
    """By checkpoint name, statistics included (norm.<model>.mean / scale)."""
    return {key: value.detach().cpu().clone() for key, value in model.tensors_by_name().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


@pytest.fixture
def weights_at_step_0(monkeypatch) -> dict[str, torch.Tensor]:
    """Filled with the model's weights as training begins (after the init, before the first step)."""
    captured: dict[str, torch.Tensor] = {}
    run = Trainer.run

    def capture_then_run(self):
        captured.update(_weights(self.model))
        return run(self)

    monkeypatch.setattr(Trainer, "run", capture_then_run)
    return captured


def _crash_at(step: int):
    def callback(record: dict) -> None:
        if record["step"] == step:
            raise RuntimeError("killed")
    return callback


def _log(run: Path) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "tokens_per_s"} for record in read_training_log(run)]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ starting


def test_a_run_started_from_a_trained_run_begins_with_a_far_lower_loss_than_a_random_init(store, source, tmp_path):
    ucfg, tcfg = _cfgs(store, steps=1, warmup_steps=0, log_every=1)
    first = {}
    for name, init_from in (("random", None), ("from-source", source)):
        records = []
        train_usae(store, tmp_path / name, ucfg, tcfg, init_from=init_from, progress=False,
                   callbacks=[records.append])
        first[name] = records[0]["loss"]
    assert first["from-source"] < 0.5 * first["random"], first
    trained = read_training_log(source)[-1]["loss"]  # where the source ended, within the noise of a batch
    assert first["from-source"] < 1.5 * trained, (first, trained)


def test_it_starts_from_the_sources_weights_and_statistics_not_the_stores(source, tmp_path, weights_at_step_0):
    """On a store of the same models in other units: the statistics stay the source's, since its
    weights are in their units; config.json records where the run started."""
    other = _planted_store(tmp_path / "other", seed=1, scale=3.0, shift=2.0)
    run = tmp_path / "run"
    model = train_usae(other, run, *_cfgs(other), init_from=source, progress=False)

    expected = _weights(USAE.from_pretrained(source))
    _assert_same(weights_at_step_0, expected)
    stats = other.compute_stats(progress=False)
    for name in other.model_names:
        mean, scale = model.standardization(name)
        assert torch.equal(mean.cpu(), expected[f"norm.{name}.mean"])
        assert torch.equal(scale.cpu(), expected[f"norm.{name}.scale"])
        assert not torch.allclose(scale.cpu(), torch.as_tensor(stats[name]["scale"], dtype=scale.dtype), rtol=0.1)
    config = json.loads((run / "config.json").read_text())
    assert config["init_from"] == {"path": str(source.resolve()), "step": 400}
    assert config["step"] == 30 and config["usae"] == {**SHAPE, "model_dims": other.dims}


def test_a_checkpoint_folder_may_be_the_start(store, source, tmp_path, weights_at_step_0):
    checkpoint = source / "checkpoints" / "step-00000300"
    train_usae(store, tmp_path / "run", *_cfgs(store, steps=5), init_from=checkpoint, progress=False)
    _assert_same(weights_at_step_0, _weights(USAE.from_pretrained(checkpoint)))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["init_from"] == {
        "path": str(checkpoint.resolve()), "step": 300}


def test_the_same_seed_from_the_same_run_trains_the_same_weights(store, source, tmp_path):
    trained = [_weights(train_usae(store, tmp_path / f"run-{i}", *_cfgs(store), init_from=source, progress=False))
               for i in range(2)]
    _assert_same(trained[0], trained[1])
    other_seed = _weights(train_usae(store, tmp_path / "seed-4", *_cfgs(store, seed=4), init_from=source,
                                     progress=False))
    assert any(not torch.equal(value, trained[0][key]) for key, value in other_seed.items())


def test_a_run_is_trained_further_in_place_from_its_own_weights(store, tmp_path, weights_at_step_0):
    """--overwrite with --init-from its own --out: read before anything is replaced, and the old
    run stays whole and loadable until the new one is swapped in. Without --overwrite: refused."""
    run = tmp_path / "run"
    old = _weights(train_usae(store, run, *_cfgs(store), progress=False))
    with pytest.raises(UsaeError, match=r"--init-from \(init_from\) .* is in --out \(out_dir\) .*, the run this "
                                        r"training writes: pass --overwrite \(overwrite=True\)"):
        train_usae(store, run, *_cfgs(store, steps=20), init_from=run)
    assert json.loads((run / "config.json").read_text())["step"] == 30

    def old_run_still_there(record: dict) -> None:
        assert json.loads((run / "config.json").read_text())["step"] == 30
        _assert_same(_weights(USAE.from_pretrained(run)), old)

    train_usae(store, run, *_cfgs(store, steps=20), init_from=run, overwrite=True, progress=False,
               callbacks=[old_run_still_there])
    _assert_same(weights_at_step_0, old)
    config = json.loads((run / "config.json").read_text())
    assert config["step"] == 20 and config["init_from"] == {"path": str(run.resolve()), "step": 30}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no .run.replacing / .replaced / .lock left


# ------------------------------------------------------------------ refused


def test_a_source_of_another_shape_is_refused_naming_each_difference_and_leaves_no_folder(store, source, tmp_path):
    out = tmp_path / "runs" / "new"
    ucfg = USAEConfig(model_dims=store.dims, n_concepts=32, k=4, encoder="mlp_bn")
    with pytest.raises(UsaeError) as info:
        train_usae(store, out, ucfg, _cfgs(store)[1], init_from=source)
    message = str(info.value)
    assert message.startswith(f"--init-from (init_from) {source} holds a USAE of another shape (saved vs given): ")
    for difference in ("--concepts (n_concepts) 24 vs 32", "--k (k) 3 vs 4",
                       "--encoder (encoder) 'linear' vs 'mlp_bn'"):
        assert difference in message
    assert "model_dims" not in message and "\n" not in message

    fewer = make_planted(n_images=8).arrays
    two_models = import_activations(tmp_path / "two", {m: fewer[m] for m in ("alpha", "gamma")}, dtype="float32")
    with pytest.raises(UsaeError) as info:
        train_usae(two_models, out, *_cfgs(two_models), init_from=source)
    assert ("model_dims {'alpha': 24, 'beta': 32, 'gamma': 40} vs {'alpha': 24, 'gamma': 40}" in str(info.value)
            and "same models" in str(info.value))
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


def test_a_folder_without_a_usae_is_refused_with_what_to_start_from(store, source, tmp_path):
    with pytest.raises(UsaeError, match=r"--init-from \(init_from\) .*nowhere holds no USAE to start from: there is "
                                        r"no USAE run at"):
        train_usae(store, tmp_path / "run", *_cfgs(store), init_from=tmp_path / "nowhere")
    cut = tmp_path / "cut"  # a training stopped after step 25: checkpoints, no config.json
    with pytest.raises(RuntimeError, match="killed"):
        train_usae(store, cut, *_cfgs(store), callbacks=[_crash_at(25)], progress=False)
    with pytest.raises(UsaeError) as info:
        train_usae(store, tmp_path / "run", *_cfgs(store), init_from=cut)
    assert "did not finish" in str(info.value)
    newest = cut / "checkpoints" / "step-00000020"
    assert f"or start from its newest checkpoint: --init-from (init_from) {newest}" in str(info.value)
    assert not (tmp_path / "run").exists()


def test_resume_is_refused_when_the_run_started_elsewhere_and_nothing_changes(store, source, tmp_path):
    """A resume continues its run's own checkpoint: init_from, given, must be where that run
    started (a random init, here, or another run)."""
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        train_usae(store, run, *_cfgs(store), callbacks=[_crash_at(25)], progress=False)
    before = _snapshot(run)
    with pytest.raises(UsaeError, match=rf"--resume \(resume=True\) continues .*: --init-from \(init_from\) none "
                                        rf"\(a random init\) vs '{source.resolve()}' \(or leave it out"):
        train_usae(store, run, *_cfgs(store), resume=True, init_from=source)
    assert _snapshot(run) == before

    started = tmp_path / "started"
    with pytest.raises(RuntimeError, match="killed"):
        train_usae(store, started, *_cfgs(store), init_from=source, callbacks=[_crash_at(25)], progress=False)
    with pytest.raises(UsaeError, match=rf"--init-from \(init_from\) '{source.resolve()}' vs "
                                        rf"'{(source / 'checkpoints' / 'step-00000300').resolve()}'"):
        train_usae(store, started, *_cfgs(store), resume=True, init_from=source / "checkpoints" / "step-00000300")


# ------------------------------------------------------------------ resuming


def test_resume_continues_its_own_checkpoint_exactly_with_or_without_init_from(store, source, tmp_path):
    """With init_from given as it was (a preempted job rerunning its command) or left out, and
    with the source gone: the weights come from the run's checkpoint, never from init_from again."""
    kept = shutil.copytree(source, tmp_path / "source")
    straight = tmp_path / "straight"
    expected = _weights(train_usae(store, straight, *_cfgs(store), init_from=kept, progress=False))

    again = tmp_path / "again"  # resumed with the same init_from, after a first call that also passed resume
    with pytest.raises(RuntimeError, match="killed"):  # nothing to resume yet: it starts from init_from
        train_usae(store, again, *_cfgs(store), resume=True, init_from=kept, callbacks=[_crash_at(25)], progress=False)
    resumed = train_usae(store, again, *_cfgs(store), resume=True, init_from=kept, progress=False)
    _assert_same(_weights(resumed), expected)

    alone = tmp_path / "alone"  # resumed without init_from, the source moved away
    with pytest.raises(RuntimeError, match="killed"):
        train_usae(store, alone, *_cfgs(store), init_from=kept, callbacks=[_crash_at(25)], progress=False)
    kept.rename(tmp_path / "moved")
    resumed = train_usae(store, alone, *_cfgs(store), resume=True, progress=False)
    _assert_same(_weights(resumed), expected)

    for run in (again, alone):
        assert _log(run) == _log(straight)
        config = json.loads((run / "config.json").read_text())
        assert config["init_from"] == {"path": str(kept.resolve()), "step": 400} and config["step"] == 30


def test_resume_with_more_steps_says_to_start_from_the_runs_weights(store, tmp_path):
    """The schedule spans a run's steps, so a run is trained further by a new run from its weights;
    the message names the finished run, or the checkpoint of one that stopped, and that works."""
    run = tmp_path / "run"
    train_usae(store, run, *_cfgs(store), progress=False)
    with pytest.raises(UsaeError) as info:
        train_usae(store, run, *_cfgs(store, steps=60), resume=True)
    message = str(info.value)
    assert "--steps (steps) 30 vs 60" in message
    assert (f"to train it beyond its 30 steps, start a new run from its weights of step 30: --init-from (init_from) "
            f"{run} with --steps (steps) counting the new steps alone" in message)
    with pytest.raises(UsaeError, match="30 vs 20") as info:  # fewer steps: no such advice
        train_usae(store, run, *_cfgs(store, steps=20), resume=True)
    assert "--init-from" not in str(info.value)

    cut = tmp_path / "cut"
    with pytest.raises(RuntimeError, match="killed"):
        train_usae(store, cut, *_cfgs(store), callbacks=[_crash_at(25)], progress=False)
    with pytest.raises(UsaeError, match=rf"--init-from \(init_from\) {cut / 'checkpoints' / 'step-00000020'} with"):
        train_usae(store, cut, *_cfgs(store, steps=60), resume=True)

    train_usae(store, run, *_cfgs(store, steps=30), init_from=run, overwrite=True, progress=False)  # as advised
    assert json.loads((run / "config.json").read_text())["init_from"]["step"] == 30


# ------------------------------------------------------------------ the CLI


def test_the_cli_takes_the_shape_from_init_from_unless_given(store, source, tmp_path):
    from typer.testing import CliRunner

    from app.cli import cli

    def train(out: Path, *options: str):
        return CliRunner().invoke(cli, ["train", "--store", str(store.root), "--out", str(out), "--init-from",
                                        str(source), "--steps", "5", "--batch-size", "64", "--device", "cpu",
                                        *options])

    result = train(tmp_path / "run")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["usae"] == {**SHAPE, "model_dims": store.dims}
    assert config["init_from"] == {"path": str(source.resolve()), "step": 400}

    result = train(tmp_path / "given", "--k", "4", "--encoder", "mlp_bn")  # given: checked against it
    assert isinstance(result.exception, UsaeError), result.output
    assert ("--k (k) 3 vs 4; --encoder (encoder) 'linear' vs 'mlp_bn'" in str(result.exception)
            and "--concepts (n_concepts)" not in str(result.exception))
    assert not (tmp_path / "given").exists()

    result = train(tmp_path / "run", "--resume")  # the same command, resumed: the run is finished
    assert result.exit_code == 0, result.output

    result = CliRunner().invoke(cli, ["train", "--store", str(store.root), "--out", str(tmp_path / "plain"),
                                      "--steps", "1", "--batch-size", "64", "--device", "cpu", "--concepts", "16"])
    assert result.exit_code != 0 and str(result.exception) == (
        "the default --k 32 is more than --concepts 16: pass --k 16 or less")  # without --init-from: USAEConfig's
