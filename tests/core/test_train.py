"""Training: planted-dictionary recovery, exact resume, atomic checkpoints, clear errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.core.planted import make_planted
from usae_core.config import TrainConfig, USAEConfig
from usae_core.errors import UsaeError
from usae_core.locks import exclusive_lock
from usae_core.metrics import evaluate_usae
from usae_core.model import USAE
from usae_core.store import import_activations
from usae_core.train import Trainer, lr_factor, read_training_log, train_usae


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    data = make_planted()
    store = import_activations(tmp_path_factory.mktemp("planted") / "store", data.arrays, dtype="float32",
                               shard_images=32)
    return data, store


def _matches(model: USAE, data) -> list[tuple[list[int], list[float]]]:
    """For each shared atom: best-matching concept index and cosine in every model."""
    out = []
    for s in range(next(iter(data.shared_atoms.values())).shape[0]):
        best, cos = [], []
        for name, atoms in data.shared_atoms.items():
            sims = model.dictionary(name).detach().double().numpy() @ atoms[s]
            best.append(int(sims.argmax()))
            cos.append(float(sims.max()))
        out.append((best, cos))
    return out


def test_planted_dictionary_is_recovered_at_one_index_in_every_model(planted, tmp_path):
    data, store = planted
    ucfg = USAEConfig(model_dims=store.dims, n_concepts=32, k=4, encoder="linear")
    tcfg = TrainConfig(steps=1000, batch_size=256, lr=3e-3, loss="mse", warmup_steps=20, log_every=100,
                       checkpoint_every=0, dead_after_tokens=20_000, seed=0, device="cpu")
    model = train_usae(store, tmp_path / "run", ucfg, tcfg)

    matches = _matches(model, data)
    recovered = [min(cos) >= 0.9 for _, cos in matches]
    aligned = [len(set(best)) == 1 and min(cos) >= 0.9 for best, cos in matches]
    assert sum(recovered) >= 10, matches
    assert sum(aligned) >= 10, matches

    res = evaluate_usae(model, store)
    names = store.model_names
    for i, src in enumerate(names):
        for j, tgt in enumerate(names):
            ceiling = data.r2_ceiling[tgt] if i == j else data.cross_ceiling[tgt]
            assert res.r2[i, j] >= 0.85 * ceiling, (src, tgt, res.r2[i, j], ceiling)
    assert res.dead_fraction < 0.25


def test_paper_recipe_trains_through_the_cli(planted, tmp_path):
    from typer.testing import CliRunner

    from app.cli import cli

    data, store = planted
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, [
        "train", "--store", str(store.root), "--out", str(run), "--concepts", "32", "--k", "4",
        "--steps", "800", "--batch-size", "256", "--lr", "3e-3", "--loss", "l1", "--aux", "paper",
        "--device", "cpu", "--checkpoint-every", "400",
    ])
    assert result.exit_code == 0, result.output
    model = USAE.from_pretrained(run)
    assert model.cfg.encoder == "mlp_bn"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [50 * i for i in range(1, 17)]
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert sum(min(cos) >= 0.9 for _, cos in _matches(model, data)) >= 9

    result = CliRunner().invoke(cli, ["eval", str(run), "--store", str(store.root), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert len(summary["r2"]) == 3 and summary["r2_self"] > 0.5


def _small_cfgs(store, steps: int):
    ucfg = USAEConfig(model_dims=store.dims, n_concepts=16, k=3)
    tcfg = TrainConfig(steps=steps, batch_size=64, lr=1e-3, warmup_steps=5, log_every=5, checkpoint_every=10,
                       dead_after_tokens=500, seed=3, device="cpu")
    return ucfg, tcfg


def test_resume_reproduces_an_uninterrupted_run_exactly(planted, tmp_path):
    _, store = planted
    ucfg, tcfg = _small_cfgs(store, 30)
    straight = train_usae(store, tmp_path / "straight", ucfg, tcfg)
    threads_before = set(threading.enumerate())

    class Crash(Exception):
        pass

    def crash_at_25(record: dict) -> None:
        if record["step"] == 25:
            raise Crash

    ucfg, tcfg = _small_cfgs(store, 30)
    with pytest.raises(Crash):  # dies after the checkpoint at step 20 and a log line at 25
        train_usae(store, tmp_path / "resumed", ucfg, tcfg, callbacks=[crash_at_25])
    # A reader thread left inside torch when the process exits aborts it (seen under gloo in CI).
    assert set(threading.enumerate()) <= threads_before
    resumed = train_usae(store, tmp_path / "resumed", ucfg, tcfg, resume=True)

    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    log_a = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    log_b = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in lines]  # noqa: E731
    assert strip(log_a) == strip(log_b)


def test_checkpoints_are_complete_and_leave_no_temporaries(planted, tmp_path):
    _, store = planted
    ucfg, tcfg = _small_cfgs(store, 30)
    train_usae(store, tmp_path / "run", ucfg, tcfg)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-00000020", "step-00000030"]  # the two newest are kept
    for name in ckpts:
        files = {p.name for p in (tmp_path / "run" / "checkpoints" / name).iterdir()}
        assert files == {"usae.safetensors", "config.json", "trainer_state.pt"}
    assert not list((tmp_path / "run").rglob("*.tmp"))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["step"] == 30 and config["usae"]["n_concepts"] == 16


def test_resume_falls_back_to_the_previous_checkpoint_when_the_newest_is_damaged(planted, tmp_path):
    _, store = planted
    ucfg, tcfg = _small_cfgs(store, 30)
    straight = train_usae(store, tmp_path / "straight", ucfg, tcfg)
    ucfg, tcfg = _small_cfgs(store, 30)
    train_usae(store, tmp_path / "run", ucfg, tcfg)
    ckpts = tmp_path / "run" / "checkpoints"
    state = ckpts / "step-00000030" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:200])  # damaged on disk
    (ckpts / ".step-00000040.abcd.tmp").mkdir()  # left by a write that was killed
    trainer_steps = []
    resumed = train_usae(store, tmp_path / "run", ucfg, tcfg, resume=True,
                         callbacks=[lambda record: trainer_steps.append(record["step"])])
    assert trainer_steps and min(trainer_steps) > 20  # resumed from step 20, not from scratch
    for key, value in straight.state_dict().items():  # and training from there is exact
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert not list(ckpts.glob(".*.tmp"))
    for name in ("step-00000020", "step-00000030"):
        (ckpts / name / "trainer_state.pt").write_bytes(b"junk")
    with pytest.raises(UsaeError, match="no checkpoint .* can be read"):
        train_usae(store, tmp_path / "run", ucfg, tcfg, resume=True)


def test_existing_run_needs_resume_or_overwrite(planted, tmp_path):
    _, store = planted
    ucfg, tcfg = _small_cfgs(store, 5)
    train_usae(store, tmp_path / "run", ucfg, tcfg)
    with pytest.raises(UsaeError, match=r"--resume \(resume=True\) to continue it or --overwrite \(overwrite=True\)"):
        train_usae(store, tmp_path / "run", ucfg, tcfg)
    train_usae(store, tmp_path / "run", ucfg, tcfg, overwrite=True)


def _has_finished_checkpoint(run_dir: Path) -> bool:
    # Polled while training prunes old checkpoints: any finished one counts, and a folder that
    # vanishes between listing and reading is not an error.
    try:
        return any(p.name.startswith("step-") for p in (run_dir / "checkpoints").iterdir())
    except FileNotFoundError:
        return False


def _cli_run_cfgs(store, steps: int) -> tuple[USAEConfig, TrainConfig]:
    """The settings of `_kill_an_overwrite_after_its_first_checkpoint`'s run (CLI defaults else)."""
    return (USAEConfig(model_dims=store.dims, n_concepts=16, k=3),
            TrainConfig(steps=steps, batch_size=64, checkpoint_every=5, device="cpu"))


def _kill_an_overwrite_after_its_first_checkpoint(store, run: Path, steps: int = 1_000_000) -> None:
    """Start `usae train --out RUN --overwrite` (16 concepts, k 3, seed 0, `_cli_run_cfgs`) and
    SIGKILL it once the new run in .RUN.replacing has a finished checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "train", "--store", str(store.root), "--out", str(run),
         "--overwrite", "--concepts", "16", "--k", "3", "--steps", str(steps), "--batch-size", "64",
         "--checkpoint-every", "5", "--device", "cpu"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not _has_finished_checkpoint(run.parent / f".{run.name}.replacing"):
            assert proc.poll() is None, f"train exited early: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "the new run never wrote a checkpoint"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


def test_an_overwrite_killed_midway_leaves_the_old_run_and_the_next_one_cleans_up(planted, tmp_path):
    """`usae train --overwrite` trains the new run beside the old one: SIGKILL while it trains
    leaves the old run loadable and unchanged, and the next --overwrite leaves only the run."""
    _, store = planted
    ucfg, tcfg = _small_cfgs(store, 10)
    old = train_usae(store, tmp_path / "run", ucfg, tcfg)
    _kill_an_overwrite_after_its_first_checkpoint(store, tmp_path / "run")
    kept = USAE.from_pretrained(tmp_path / "run")
    for key, value in old.state_dict().items():
        assert torch.equal(value, kept.state_dict()[key]), key
    assert json.loads((tmp_path / "run" / "config.json").read_text())["step"] == 10
    ucfg, tcfg = _small_cfgs(store, 20)
    train_usae(store, tmp_path / "run", ucfg, tcfg, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["step"] == 20


def test_after_a_killed_overwrite_resume_continues_the_new_run_and_a_plain_rerun_says_what_to_do(planted, tmp_path):
    """The user last asked for a new run (--overwrite, killed while training). --resume continues
    that new run from its newest checkpoint, leaves the old run whole while it trains, and swaps
    the new one in when it finishes; a rerun without either flag names both ways on. (--resume
    used to extend the old run and leave the half-trained new one lying beside it.)"""
    _, store = planted
    run, replacement = tmp_path / "run", tmp_path / ".run.replacing"
    ucfg, tcfg = _small_cfgs(store, 10)
    train_usae(store, run, ucfg, tcfg)
    _kill_an_overwrite_after_its_first_checkpoint(store, run, steps=100)  # killed well before step 100
    newest = max(int(p.name.removeprefix("step-")) for p in (replacement / "checkpoints").glob("step-*"))
    logged = [r["step"] for r in read_training_log(replacement) if r["step"] <= newest]

    with pytest.raises(UsaeError, match=rf"interrupted --overwrite .*{replacement}.*--resume.*--overwrite"):
        train_usae(store, run, ucfg, tcfg)

    old_run_steps = []  # what RUN holds while the new run trains
    ucfg, tcfg = _cli_run_cfgs(store, 100)  # the killed run's settings: a resume refuses others
    train_usae(store, run, ucfg, tcfg, resume=True,
               callbacks=[lambda _: old_run_steps.append(json.loads((run / "config.json").read_text())["step"])])
    assert old_run_steps and set(old_run_steps) == {10}  # the old run stays in place while the new one trains
    assert [r["step"] for r in read_training_log(run)] == logged + [s for s in (50, 100) if s > newest]
    assert json.loads((run / "config.json").read_text())["step"] == 100
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_a_failed_overwrite_keeps_its_new_run_and_resume_finishes_it_exactly(planted, tmp_path):
    _, store = planted
    ucfg, tcfg = _small_cfgs(store, 10)
    train_usae(store, tmp_path / "run", ucfg, tcfg)
    ucfg, tcfg = _small_cfgs(store, 30)
    straight = train_usae(store, tmp_path / "straight", ucfg, tcfg)

    def fail_at_25(record: dict) -> None:
        if record["step"] == 25:
            raise OSError("disk full")

    with pytest.raises(OSError):  # after the checkpoint at step 20
        train_usae(store, tmp_path / "run", ucfg, tcfg, overwrite=True, callbacks=[fail_at_25])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["step"] == 10
    resumed = train_usae(store, tmp_path / "run", ucfg, tcfg, resume=True)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "straight"]


def test_a_second_trainer_on_the_same_run_is_refused(planted, tmp_path):
    """Two trainers writing one run would interleave checkpoints; the second is refused before
    it touches anything, and the lock goes with the first one."""
    _, store = planted
    ucfg, tcfg = _small_cfgs(store, 10)
    train_usae(store, tmp_path / "run", ucfg, tcfg)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with exclusive_lock(tmp_path / "run", "usae train"):  # as a trainer in another process holds it
        for flags in ({"resume": True}, {"overwrite": True}):
            with pytest.raises(UsaeError, match="being written by another usae train"):
                train_usae(store, tmp_path / "run", ucfg, _small_cfgs(store, 20)[1], **flags)
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.name != ".run.lock") == before
    train_usae(store, tmp_path / "run", ucfg, tcfg, resume=True)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_resume_refuses_a_different_shape(planted, tmp_path):
    _, store = planted
    ucfg, tcfg = _small_cfgs(store, 10)
    train_usae(store, tmp_path / "run", ucfg, tcfg)
    other = USAEConfig(model_dims=store.dims, n_concepts=24, k=3)
    with pytest.raises(UsaeError, match=r"--concepts \(n_concepts\) 16 vs 24"):
        train_usae(store, tmp_path / "run", other, tcfg, resume=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "--steps"),
        ({"batch_size": 0}, "--batch-size"),
        ({"lr": -1.0}, "--lr"),
        ({"loss": "huber"}, "unknown loss"),
        ({"aux": "magic"}, "unknown aux"),
    ],
)
def test_bad_train_config_is_rejected(kwargs, message):
    with pytest.raises(UsaeError, match=message):
        TrainConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"n_concepts": 0}, "--concepts"), ({"k": 0}, "--k"), ({"k": 99, "n_concepts": 10}, "--k"),
     ({"encoder": "mlp"}, "unknown encoder")],
)
def test_bad_usae_config_is_rejected(kwargs, message):
    with pytest.raises(UsaeError, match=message):
        USAEConfig(model_dims={"a": 4}, **kwargs)


def test_cuda_request_without_cuda_is_a_clear_error(planted, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _, store = planted
    ucfg, tcfg = _small_cfgs(store, 5)
    tcfg.device = "cuda"
    with pytest.raises(UsaeError, match="no CUDA device"):
        train_usae(store, tmp_path / "run", ucfg, tcfg)
    assert not (tmp_path / "run").exists()  # refused before any folder was made


def test_the_training_log_reads_back_in_order_without_a_line_cut_short(tmp_path):
    from usae_core.train import METRICS_FILE, read_training_log

    assert read_training_log(tmp_path) == []  # no log yet
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (10, 20, 30)]
    (tmp_path / METRICS_FILE).write_text("\n".join(lines) + '\n{"step": 40, "lo\n[1, 2]\n')  # a crash mid-line
    assert [r["step"] for r in read_training_log(tmp_path)] == [10, 20, 30]


def test_learning_rate_warms_up_linearly_then_follows_a_half_cosine_to_its_floor():
    """lr_factor: (step + 1) / warmup during warmup, then min + (1 - min) (1 + cos(pi p)) / 2."""
    cfg = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)  # first step: 1 / warmup
    assert lr_factor(4, cfg) == pytest.approx(0.5)
    assert lr_factor(9, cfg) == pytest.approx(1.0)  # last warmup step reaches the peak
    assert lr_factor(10, cfg) == pytest.approx(1.0)  # the cosine starts at the peak
    assert lr_factor(60, cfg) == pytest.approx(0.55)  # half-way down: (1 + min) / 2
    # Last step (109): progress 99/100, cos(0.99 pi) = -cos(pi / 100).
    assert lr_factor(109, cfg) == pytest.approx(0.1 + 0.45 * (1 - math.cos(math.pi / 100)))
    assert lr_factor(110, cfg) == pytest.approx(0.1) and lr_factor(10_000, cfg) == pytest.approx(0.1)


def test_the_logged_learning_rate_is_the_one_that_step_used(planted, tmp_path):
    """metrics.jsonl's record of step s (1-based) shows cfg.lr * lr_factor(s - 1): the rate the
    scheduler gave that step (its 0-based index is s - 1), not the next step's."""
    _, store = planted
    ucfg = USAEConfig(model_dims=store.dims, n_concepts=16, k=2, encoder="linear")
    tcfg = TrainConfig(steps=8, batch_size=64, lr=1e-2, warmup_steps=3, min_lr_ratio=0.2, log_every=1,
                       checkpoint_every=0, seed=0, device="cpu")
    train_usae(store, tmp_path / "run", ucfg, tcfg)
    log = read_training_log(tmp_path / "run")
    assert [r["step"] for r in log] == list(range(1, 9))
    for record in log:
        assert record["lr"] == pytest.approx(tcfg.lr * lr_factor(record["step"] - 1, tcfg), rel=1e-6), record
    assert log[0]["lr"] == pytest.approx(tcfg.lr / 3)  # the first of three warmup steps
    assert log[2]["lr"] == pytest.approx(tcfg.lr)  # the last warmup step reaches the peak
    assert log[-1]["lr"] > tcfg.lr * tcfg.min_lr_ratio  # the cosine reaches its floor only after the last step


def _trainer(store, out: Path, n_concepts: int, **train) -> Trainer:
    """A CPU trainer with a linear encoder, standardisation statistics set (as train_usae does)."""
    ucfg = USAEConfig(model_dims=store.dims, n_concepts=n_concepts, k=2, encoder="linear")
    trainer = Trainer(store, out, ucfg, TrainConfig(batch_size=64, checkpoint_every=0, seed=0, device="cpu",
                                                    **train), [])
    trainer.model.set_stats(store.compute_stats())
    return trainer


def test_a_step_zeroes_the_counter_of_concepts_that_fired_and_ages_the_others_by_its_tokens(planted, tmp_path):
    """since_fired after a step: 0 for every concept whose code exceeded tau on the batch, the
    old count + the batch's tokens for the rest (fired set recomputed in float64)."""
    _, store = planted
    trainer = _trainer(store, tmp_path, n_concepts=64, fire_threshold=1.2)
    model, source = trainer.model, store.model_names[0]
    batch = {m: model.standardize(torch.from_numpy(np.concatenate([store.image_tokens(m, i) for i in range(4)])), m)
             for m in store.model_names}
    n = batch[source].shape[0]
    with torch.no_grad():
        enc = model.encoders[0].linear
        values, indices = torch.relu(batch[source].double() @ enc.weight.double().T + enc.bias.double()).topk(2)
    fired = torch.zeros(64, dtype=torch.bool)
    fired[indices[values > 1.2]] = True
    assert 0 < fired.sum() < len(indices.unique())  # some selected concepts stay below tau
    before = torch.arange(64) * 1000 + 7
    trainer.since_fired.copy_(before)
    trainer.train_step(batch, source)
    assert torch.equal(trainer.since_fired, torch.where(fired, 0, before + n))


def test_the_logged_dead_fraction_counts_concepts_silent_for_longer_than_dead_after_tokens(planted, tmp_path):
    """Each record's dead_fraction equals the share of concepts whose tokens-since-firing count,
    read when the record is written, exceeds dead_after_tokens."""
    _, store = planted
    trainer = _trainer(store, tmp_path, n_concepts=64, steps=8, log_every=1, dead_after_tokens=128,
                       fire_threshold=1.2)
    counts = []
    trainer.callbacks.append(lambda record: counts.append(trainer.since_fired.clone()))
    trainer.run()
    log = read_training_log(tmp_path)
    assert len(log) == len(counts) == 8
    previous = torch.zeros(64, dtype=torch.long)
    for record, count in zip(log, counts):
        assert torch.all((count == 0) | (count == previous + 64)), record["step"]  # fired, or 64 tokens older
        assert (count == 0).any(), record["step"]  # every batch fires some concept
        assert record["dead_fraction"] == int((count > 128).sum()) / 64, record["step"]
        previous = count
    assert max(r["dead_fraction"] for r in log) > 0  # some concept did go quiet


# ------------------------------------------------------------------ the Python API


def _weights(model: USAE) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}


def test_training_is_seeded_by_its_config_and_leaves_the_callers_random_state_alone(planted, tmp_path):
    """It called torch.manual_seed(cfg.seed): a caller's torch.rand after training no longer
    continued the sequence the caller had seeded."""
    _, store = planted
    ucfg, tcfg = _small_cfgs(store, 5)
    trained = []
    for caller_seed in (123, 456):  # whatever the caller seeded, the same weights
        torch.manual_seed(caller_seed)
        expected = torch.rand(3)
        torch.manual_seed(caller_seed)
        state = torch.get_rng_state()
        trained.append(_weights(train_usae(store, tmp_path / f"run-{caller_seed}", ucfg, tcfg, progress=False)))
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(torch.rand(3), expected)
    assert trained[0].keys() == trained[1].keys()
    for key, value in trained[0].items():
        assert torch.equal(value, trained[1][key]), key
    reseeded = TrainConfig(**{**tcfg.to_dict(), "seed": 4})
    other = _weights(train_usae(store, tmp_path / "seed-4", ucfg, reseeded, progress=False))
    assert any(not torch.equal(value, trained[0][key]) for key, value in other.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_trainer_on_a_gpu_leaves_the_cpu_and_gpu_random_state_alone(planted, tmp_path):
    _, store = planted
    ucfg, _ = _small_cfgs(store, 5)
    torch.manual_seed(11)
    torch.cuda.manual_seed(11)
    cpu, gpu = torch.get_rng_state(), torch.cuda.get_rng_state()
    first = Trainer(store, tmp_path, ucfg, TrainConfig(steps=5, batch_size=64, seed=3, device="cuda"), [])
    assert torch.equal(torch.get_rng_state(), cpu) and torch.equal(torch.cuda.get_rng_state(), gpu)
    torch.manual_seed(12)
    second = Trainer(store, tmp_path, ucfg, TrainConfig(steps=5, batch_size=64, seed=3, device="cuda"), [])
    for key, value in _weights(first.model).items():
        assert torch.equal(value, _weights(second.model)[key]), key


def test_progress_false_trains_without_progress_bars(planted, tmp_path, capfd):
    _, store = planted
    ucfg, tcfg = _small_cfgs(store, 5)
    train_usae(store, tmp_path / "quiet", ucfg, tcfg, progress=False)
    assert "%|" not in capfd.readouterr().err
    train_usae(store, tmp_path / "shown", ucfg, tcfg)  # the default: the statistics pass and the steps
    err = capfd.readouterr().err
    assert "statistics:" in err and "train:" in err


def test_the_store_may_be_given_by_its_path(planted, tmp_path):
    """A str used to fail with AttributeError: 'str' object has no attribute 'model_names'."""
    _, store = planted
    ucfg, tcfg = _small_cfgs(store, 5)
    reference = _weights(train_usae(store, tmp_path / "object", ucfg, tcfg, progress=False))
    for kind, given in (("str", str(store.root)), ("path", Path(store.root))):
        trained = _weights(train_usae(given, tmp_path / kind, ucfg, tcfg, progress=False))
        for key, value in reference.items():
            assert torch.equal(value, trained[key]), (kind, key)
    with pytest.raises(UsaeError, match="no activation store at"):
        train_usae(str(tmp_path / "missing"), tmp_path / "run", ucfg, tcfg)
    assert not (tmp_path / "run").exists()


def test_trained_store_opens_the_store_a_run_records(planted, tmp_path, caplog):
    """Loading a run back from Python: its USAE, and the store it was trained on without
    retyping the path (it lived only in the CLI's `usae eval`)."""
    import shutil

    from usae_core.train import trained_store

    _, store = planted
    copy = tmp_path / "store"
    shutil.copytree(store.root, copy)
    ucfg, tcfg = _small_cfgs(store, 6)
    run = tmp_path / "run"
    trained = train_usae(str(copy), run, ucfg, replace(tcfg, checkpoint_every=2), progress=False)
    for folder in (run, *sorted((run / "checkpoints").glob("step-*"))):
        opened = trained_store(folder)
        assert Path(opened.root).resolve() == copy.resolve() and opened.dims == store.dims
    res = evaluate_usae(USAE.from_pretrained(run), trained_store(run))
    np.testing.assert_array_equal(res.r2, evaluate_usae(trained, store).r2)

    with caplog.at_level("WARNING", logger="usae_core.train"):
        zeros = {m: np.zeros((4, store.tokens_per_image, d), np.float32) for m, d in store.dims.items()}
        import_activations(copy, zeros, grid=store.grid, overwrite=True)
        assert trained_store(run).n_images == 4
    assert "holds other activations than" in caplog.text
    copy.rename(tmp_path / "moved")
    with pytest.raises(UsaeError, match=r"the store .*run was trained on, .*store, is no longer there .*ActivationStore"):
        trained_store(run)
    with pytest.raises(UsaeError, match="there is no USAE run at"):
        trained_store(tmp_path / "nothing")


def test_a_short_run_warms_up_over_a_tenth_of_its_steps(planted, tmp_path):
    """warmup_steps was 100 whatever the steps: a 100-step run reached its peak rate only at its
    last step. Left out, it is min(100, steps // 10), as `usae demo` sets it."""
    _, store = planted
    ucfg = USAEConfig(model_dims=store.dims, n_concepts=16, k=2, encoder="linear")
    tcfg = TrainConfig(steps=100, batch_size=64, lr=1e-2, log_every=1, checkpoint_every=0, device="cpu")
    assert tcfg.warmup_steps == 10
    train_usae(store, tmp_path / "run", ucfg, tcfg, progress=False)
    lrs = [r["lr"] for r in read_training_log(tmp_path / "run")]
    assert lrs[9] == pytest.approx(1e-2)  # the tenth step runs at the peak
    assert max(lrs) == pytest.approx(1e-2) and lrs[-1] < lrs[50] < lrs[10]  # then the cosine decays
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["warmup_steps"] == 10


def test_the_auxk_width_follows_the_dead_count_read_every_log_every_steps(planted, tmp_path):
    """The width covers every latent dead at the last read, stays as small as that count allows
    (no AuxK work while none is dead), and latents that die between reads are covered from the
    next read on."""
    _, store = planted
    trainer = _trainer(store, tmp_path, n_concepts=512, aux_k=512, log_every=10, dead_after_tokens=1000)
    trainer.since_fired.copy_(torch.arange(512) * 2)  # 0 .. 1022 tokens: 11 dead, more at every step
    widths = []
    for step in range(30):
        dead = int((trainer.since_fired > 1000).sum())
        width = trainer._auxk_width()
        if step % 10 == 0:  # a read: every dead latent, rounded up to a power of two (8 at least)
            assert dead <= width < max(16, 2 * dead), (step, width, dead)
        else:  # between reads the width stays, while more latents die
            assert width == widths[-1], step
        widths.append(width)
        trainer.since_fired.add_(64)
    assert widths[0] == 16 and widths[1] == 16 and widths[10] == 512  # 11 dead, then 331
    trainer.since_fired.zero_()
    trainer._steps_to_dead_check = 0
    assert trainer._auxk_width() == 0  # none dead: the step takes its path without AuxK
