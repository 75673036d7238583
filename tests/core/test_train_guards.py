"""What `train_usae` refuses before it writes, and what it leaves behind: an --out that is or
holds the store, a file, or a folder that is no run; a resume with other settings or another
store; a batch larger than the store; stale temporaries; file modes; Ctrl-C."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from usae_core import atomic
from usae_core.config import TrainConfig, USAEConfig
from usae_core.errors import UsaeError
from usae_core.model import USAE
from usae_core.store import ActivationStore, import_activations
from usae_core.train import Trainer, TrainingInterrupted, _check_batch_fits, train_usae


def _store(path: Path, seed: int = 0) -> ActivationStore:
    """64 images x 16 tokens (1,024 tokens) of two models; another seed gives other activations."""
    rng = np.random.default_rng(seed)
    arrays = {name: rng.standard_normal((64, 16, dim)).astype(np.float32) for name, dim in {"a": 12, "b": 20}.items()}
    return import_activations(path, arrays, dtype="float32", shard_images=8)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ActivationStore:
    return _store(tmp_path_factory.mktemp("data") / "store")


def _cfgs(store, **train) -> tuple[USAEConfig, TrainConfig]:
    settings = dict(steps=30, batch_size=64, lr=1e-3, warmup_steps=5, log_every=5, checkpoint_every=10,
                    dead_after_tokens=500, seed=3, device="cpu")
    return USAEConfig(model_dims=store.dims, n_concepts=16, k=3), TrainConfig(**{**settings, **train})


def _crash_at(step: int):
    def callback(record: dict) -> None:
        if record["step"] == step:
            raise RuntimeError("killed")
    return callback


def _killed_after_25(store, run: Path) -> None:
    """A run of 30 steps stopped after step 25: its newest checkpoint is step 20, no config.json."""
    with pytest.raises(RuntimeError, match="killed"):
        train_usae(store, run, *_cfgs(store), callbacks=[_crash_at(25)])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_loading_a_run_whose_training_stopped_says_how_to_continue_it(store, tmp_path):
    """Not 'is not a USAE run': the newest checkpoint, the steps planned and the command that
    continues it; a folder that does not exist says so."""
    run = tmp_path / "run"
    _killed_after_25(store, run)
    with pytest.raises(UsaeError) as info:
        USAE.from_pretrained(run)
    message = str(info.value)
    assert f"the training of {run} did not finish (its newest checkpoint is step 20 of 30)" in message
    assert f"`usae train --store {Path(store.root).resolve()} --out {run} --resume`" in message
    with pytest.raises(UsaeError, match=f"there is no USAE run at {tmp_path / 'nosuch'}$"):
        USAE.from_pretrained(tmp_path / "nosuch")  # the unfinished run beside it is no run to name
    # A checkpoint's config that is not an object, and paths with spaces, still give a usable line.
    newest = sorted((run / "checkpoints").glob("step-*"))[-1] / "config.json"
    good = newest.read_text()
    newest.write_text("[1, 2]")
    with pytest.raises(UsaeError, match=r"did not finish \(its newest checkpoint is step 20\); .*usae train \.\.\. --resume"):
        USAE.from_pretrained(run)
    newest.write_text(good)
    spaced = tmp_path / "my runs" / "run 1"
    shutil.copytree(run, spaced)
    with pytest.raises(UsaeError, match=rf"--out '{spaced}' --resume`"):
        USAE.from_pretrained(spaced)
    train_usae(store, tmp_path / "done", *_cfgs(store, steps=5))
    with pytest.raises(UsaeError, match=rf"there is no USAE run at {tmp_path / 'nosuch'} \(runs beside it: done\)$"):
        USAE.from_pretrained(tmp_path / "nosuch")


def test_ctrl_c_stops_between_two_steps_and_keeps_a_checkpoint_there(store, tmp_path, ctrl_c_as_in_a_terminal):
    """The first Ctrl-C lets the step finish and saves it (step 25, between the checkpoints of
    20 and 30); resuming then trains only what was left, and ends as an uninterrupted run does."""
    import os
    import signal

    def ctrl_c_at_25(record: dict) -> None:
        if record["step"] == 25:
            os.kill(os.getpid(), signal.SIGINT)

    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match=r"after step 25 of 30; .* from its checkpoint of step 25"):
        train_usae(store, run, *_cfgs(store), callbacks=[ctrl_c_at_25])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    steps = []
    resumed = train_usae(store, run, *_cfgs(store), resume=True, callbacks=[lambda r: steps.append(r["step"])])
    assert steps == [30]
    whole = train_usae(store, tmp_path / "whole", *_cfgs(store))
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_resume_says_where_it_continues_and_that_a_finished_run_has_nothing_left(store, tmp_path, caplog):
    import logging

    run = tmp_path / "run"
    _killed_after_25(store, run)
    with caplog.at_level(logging.INFO, logger="usae_core.train"):
        train_usae(store, run, *_cfgs(store), resume=True)
    assert f"resumed {run} at step 20 of 30" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="usae_core.train"):
        train_usae(store, run, *_cfgs(store), resume=True)
    assert f"{run} had already finished its 30 steps: nothing left to train" in caplog.text


def test_resume_with_nothing_to_resume_says_it_starts_a_new_run(store, tmp_path, caplog):
    """A mistyped --out with --resume used to start a new run without a word."""
    import logging

    with caplog.at_level(logging.WARNING, logger="usae_core.train"):
        train_usae(store, tmp_path / "typo", *_cfgs(store, steps=5), resume=True)
    assert f"nothing to resume in {tmp_path / 'typo'}" in caplog.text and "starting a new run" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="usae_core.train"):
        train_usae(store, tmp_path / "typo", *_cfgs(store, steps=5), resume=True)
    assert "nothing to resume" not in caplog.text


# ------------------------------------------------------------------ --out


@pytest.mark.parametrize("where", ["the store", "inside", "around"])
@pytest.mark.parametrize("flags", [{}, {"overwrite": True}, {"resume": True}])
def test_an_out_that_is_inside_or_around_the_store_is_refused_and_the_store_is_untouched(tmp_path, where, flags):
    """`--out` at the store used to write the run into it, and a later --overwrite deleted every shard."""
    store = _store(tmp_path / "stores" / "sc")
    out = {"the store": store.root, "inside": store.root / "run", "around": tmp_path / "stores"}[where]
    before = _snapshot(tmp_path)
    with pytest.raises(UsaeError, match="activation store"):
        train_usae(store, out, *_cfgs(store), **flags)
    assert _snapshot(tmp_path) == before  # not even a lock file
    ActivationStore.open(store.root)


@pytest.mark.parametrize("flags", [{}, {"overwrite": True}, {"resume": True}])
def test_an_out_that_is_a_file_is_refused_and_left_as_it_was(store, tmp_path, flags):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    with pytest.raises(UsaeError, match="is a file"):
        train_usae(store, out, *_cfgs(store), **flags)
    assert out.read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("content", [{"thesis.tex": "years of work"}, {"config.json": '{"model_type": "vit"}'},
                                     {"train.py": "import torch", "checkpoints/epoch=3.ckpt": "weights"},
                                     {"checkpoints/epoch=3.ckpt": "weights"}])
@pytest.mark.parametrize("flags", [{}, {"overwrite": True}, {"resume": True}])
def test_a_folder_that_holds_no_run_is_neither_trained_in_nor_replaced(store, tmp_path, content, flags):
    out = tmp_path / "folder"
    out.mkdir()
    for name, text in content.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text(text)
    with pytest.raises(UsaeError, match=r"holds no USAE run; .*--overwrite \(overwrite=True\) only replaces a run"):
        train_usae(store, out, *_cfgs(store), **flags)
    assert _snapshot(out) == {name: text.encode() for name, text in content.items()}
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]


def test_overwrite_replaces_runs_finished_or_not(store, tmp_path):
    """A finished run (with `usae cam` images added), a run cut short, and a first run stopped
    before its first checkpoint (only its log) are all runs that --overwrite may replace."""
    finished = tmp_path / "finished"
    train_usae(store, finished, *_cfgs(store, steps=10))
    (finished / "cam").mkdir()
    (finished / "cam" / "concept-1.png").write_bytes(b"png")
    _killed_after_25(store, tmp_path / "cut")
    early = tmp_path / "early"
    early.mkdir()
    (early / "metrics.jsonl").write_text('{"step": 5}\n')
    for run in (finished, tmp_path / "cut", early):
        train_usae(store, run, *_cfgs(store, steps=10), overwrite=True)
        assert json.loads((run / "config.json").read_text())["step"] == 10
        assert not (run / "cam").exists()


# ------------------------------------------------------------------ --resume


def test_resume_with_other_settings_is_refused_naming_each_and_changes_nothing(store, tmp_path):
    """It used to resume on the old schedule and rewrite config.json with the new values."""
    run = tmp_path / "run"
    _killed_after_25(store, run)
    before = _snapshot(run)
    ucfg, tcfg = _cfgs(store, lr=0.01, seed=7, batch_size=32, loss="mse", aux="none", steps=60)
    with pytest.raises(UsaeError) as info:
        train_usae(store, run, ucfg, tcfg, resume=True)
    message = str(info.value)
    # Named as `usae train` and `train_usae` users set them: the option, then the field.
    for difference in ("--lr (lr) 0.001 vs 0.01", "--seed (seed) 3 vs 7", "--batch-size (batch_size) 64 vs 32",
                       "--loss (loss) 'l1' vs 'mse'", "--aux (aux) 'auxk' vs 'none'", "--steps (steps) 30 vs 60"):
        assert difference in message
    assert message.startswith("--resume (resume=True) continues")
    assert "--store" not in message and "--overwrite (overwrite=True)" in message and "\n" not in message
    assert _snapshot(run) == before

    ucfg, _ = _cfgs(store)
    with pytest.raises(UsaeError, match=r"--concepts \(n_concepts\) 16 vs 32; --k \(k\) 3 vs 4"):
        train_usae(store, run, USAEConfig(model_dims=store.dims, n_concepts=32, k=4), _cfgs(store)[1], resume=True)
    assert _snapshot(run) == before


def test_resume_under_another_number_of_torchrun_ranks_is_refused(store, tmp_path):
    """Each rank's share of the token stream depends on how many ranks there are, so a run
    started on two ranks does not continue on one (checkpoints record `world_size`)."""
    run = tmp_path / "run"
    _killed_after_25(store, run)
    newest = sorted((run / "checkpoints").iterdir())[-1] / "config.json"
    config = json.loads(newest.read_text())
    assert config["world_size"] == 1
    newest.write_text(json.dumps({**config, "world_size": 2}))
    with pytest.raises(UsaeError, match="torchrun ranks 2 vs 1"):
        train_usae(store, run, *_cfgs(store), resume=True)


def test_a_setting_with_no_train_option_says_where_it_came_from(store, tmp_path):
    """`usae demo` sets dead_after_tokens, which `usae train` has no option for: asking for the
    saved value alone would leave the user stuck, so the message says to continue the run as it began."""
    run = tmp_path / "run"
    _killed_after_25(store, run)
    with pytest.raises(UsaeError, match=r"dead_after_tokens 500 vs 700; .*dead_after_tokens has no `usae train` "
                                        r"option.*usae demo"):
        train_usae(store, run, *_cfgs(store, dead_after_tokens=700), resume=True)
    for changed, named in (({"lr": 0.01}, "--lr (lr) 0.001 vs 0.01"),  # warmup_steps: set by `usae train` too now
                           ({"warmup_steps": 7}, "--warmup-steps (warmup_steps) 5 vs 7")):
        with pytest.raises(UsaeError) as flagged:
            train_usae(store, run, *_cfgs(store, **changed), resume=True)
        assert named in str(flagged.value) and "no `usae train` option" not in str(flagged.value)


def test_resume_may_change_how_often_it_saves_and_still_finishes_exactly(store, tmp_path):
    """From a checkpoint between two reads of the dead count (step 21, read every 5 steps), with
    another --checkpoint-every: the same weights as a run never stopped."""
    straight = train_usae(store, tmp_path / "straight", *_cfgs(store))
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):  # after its checkpoints at 7, 14 and 21
        train_usae(store, run, *_cfgs(store, checkpoint_every=7), callbacks=[_crash_at(25)])
    trainer = Trainer(store, run, *_cfgs(store), [])
    assert trainer.load_latest_checkpoint() and trainer.step == 21
    assert trainer._steps_to_dead_check == 4  # read at step 20 of every 5 (without the saved state: at once)
    resumed = train_usae(store, run, *_cfgs(store, checkpoint_every=10), resume=True)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert json.loads((run / "config.json").read_text())["train"]["checkpoint_every"] == 10


def test_a_resume_given_no_warm_up_continues_with_the_runs_own(store, tmp_path):
    """--resume without --warmup-steps (the automatic value) keeps the warm-up the run started
    with, also the fixed 100 of runs saved before the automatic default (more than 30 steps)."""
    straight = train_usae(store, tmp_path / "straight", *_cfgs(store))  # warm-up 5
    run = tmp_path / "run"
    _killed_after_25(store, run)
    resumed = train_usae(store, run, *_cfgs(store, warmup_steps=None), resume=True)  # automatic: 3
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert json.loads((run / "config.json").read_text())["train"]["warmup_steps"] == 5

    old = tmp_path / "old"
    _killed_after_25(store, old)
    for config_file in (old / "checkpoints").glob("step-*/config.json"):
        config = json.loads(config_file.read_text())
        config["train"]["warmup_steps"] = 100
        config_file.write_text(json.dumps(config))
    train_usae(store, old, *_cfgs(store, warmup_steps=None), resume=True)
    assert json.loads((old / "config.json").read_text())["train"]["warmup_steps"] == 100
    with pytest.raises(UsaeError, match=r"--warmup-steps \(warmup_steps\) 5 vs 4"):  # a value given is checked
        _killed_after_25(store, tmp_path / "again")
        train_usae(store, tmp_path / "again", *_cfgs(store, warmup_steps=4), resume=True)


def test_resume_on_another_store_is_refused_and_on_the_same_store_moved_continues(store, tmp_path):
    run = tmp_path / "run"
    _killed_after_25(store, run)
    before = _snapshot(run)
    other = _store(tmp_path / "other", seed=1)  # the same models and dims, other activations
    with pytest.raises(UsaeError, match=rf"--store \(store\) '{store.root.resolve()}' vs '{other.root.resolve()}'"):
        train_usae(other, run, *_cfgs(other), resume=True)
    assert _snapshot(run) == before

    moved = ActivationStore.open(shutil.copytree(store.root, tmp_path / "moved"))
    train_usae(moved, run, *_cfgs(moved), resume=True)
    config = json.loads((run / "config.json").read_text())
    assert config["step"] == 30 and config["store"] == str(moved.root.resolve())


def test_a_run_from_before_fingerprints_resumes_on_its_store_moved(store, tmp_path, caplog):
    """Checkpoints written before `store_fingerprint` and `world_size` were recorded: a store with
    the run's models and grid is accepted, with a warning, and no rank count is demanded."""
    run = tmp_path / "run"
    _killed_after_25(store, run)
    for config_file in (run / "checkpoints").glob("step-*/config.json"):
        config = json.loads(config_file.read_text())
        del config["store_fingerprint"], config["world_size"]
        config_file.write_text(json.dumps(config))
    moved = ActivationStore.open(shutil.copytree(store.root, tmp_path / "moved"))
    with caplog.at_level("WARNING", logger="usae_core.train"):
        train_usae(moved, run, *_cfgs(moved), resume=True)
    assert "same models and token grid" in caplog.text
    assert json.loads((run / "config.json").read_text())["step"] == 30


def test_resume_refuses_a_store_extracted_again_in_the_same_place(tmp_path):
    store = _store(tmp_path / "store")
    run = tmp_path / "run"
    _killed_after_25(store, run)
    manifest = (store.root / "manifest.json").read_bytes()
    # The same layout (shards, image ids, manifest): only the activations differ.
    again = import_activations(store.root, {"a": np.ones((64, 16, 12), np.float32), "b": np.ones((64, 16, 20), np.float32)},
                               dtype="float32", shard_images=8, overwrite=True)
    assert (again.root / "manifest.json").read_bytes() == manifest
    with pytest.raises(UsaeError, match="holds other activations than when the run started"):
        train_usae(again, run, *_cfgs(again), resume=True)


# ------------------------------------------------------------------ batch size


def test_a_batch_larger_than_the_store_is_refused_before_anything_is_written(store, tmp_path):
    """It used to be OOM-killed, or fail with a NumPy allocation traceback."""
    ucfg, tcfg = _cfgs(store, batch_size=100_000_000)
    with pytest.raises(UsaeError, match=r"--batch-size \(batch_size\) 100,000,000 is more than the 1,024 tokens .*; "
                                        r"use --batch-size 1024 \(batch_size=1024\) or less"):
        train_usae(store, tmp_path / "run", ucfg, tcfg)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UsaeError, match=r"split over 2 ranks \(512 each\); "
                                        r"use --batch-size 512 \(batch_size=512\) or less"):
        _check_batch_fits(store, 513, 2)
    _check_batch_fits(store, 512, 2)
    whole = _cfgs(store, steps=3, warmup_steps=1, batch_size=1024)  # the whole store is fine
    train_usae(store, tmp_path / "run", *whole)


# ------------------------------------------------------------------ what a run leaves


def test_temporaries_of_killed_writes_are_removed_when_training_resumes(store, tmp_path):
    """A kill during the final save left `.usae.safetensors.XXXXXXXX.tmp`; --resume kept it."""
    run = tmp_path / "run"
    _killed_after_25(store, run)
    stale = [run / ".usae.safetensors.k2j3h4g5.tmp", run / ".config.json.a_b1c2d3.tmp", run / ".metrics.jsonl.zz9y8x7w.tmp"]
    for path in stale:
        path.write_bytes(b"half written")
    train_usae(store, run, *_cfgs(store), resume=True)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl", "usae.safetensors"]

    (run / "notes.tmp").write_text("mine")  # not a temporary of the run's files: kept
    stale[0].write_bytes(b"half written")
    train_usae(store, run, *_cfgs(store), resume=True)  # a finished run: resumed at its last step
    assert not stale[0].exists() and (run / "notes.tmp").read_text() == "mine"


def test_every_file_and_folder_of_a_run_follows_the_umask(store, tmp_path):
    """safetensors' save_file left usae.safetensors 0600, unreadable to a server of another user."""
    file_mode, dir_mode = 0o666 & ~atomic._UMASK, 0o777 & ~atomic._UMASK
    if file_mode == 0o600:
        pytest.skip("under umask 077 private files are what the umask asks for")
    run = tmp_path / "run"
    train_usae(store, run, *_cfgs(store, steps=20))
    paths = [run, *run.rglob("*")]
    assert run / "usae.safetensors" in paths and run / "checkpoints" / "step-00000020" / "usae.safetensors" in paths
    for path in paths:
        assert path.stat().st_mode & 0o777 == (dir_mode if path.is_dir() else file_mode), path


def test_ctrl_c_says_where_training_stopped_and_which_checkpoint_resume_uses(store, tmp_path):
    def ctrl_c_at_25(record: dict) -> None:
        if record["step"] == 25:
            raise KeyboardInterrupt

    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as info:
        train_usae(store, run, *_cfgs(store), callbacks=[ctrl_c_at_25])
    assert isinstance(info.value, KeyboardInterrupt)  # callers that stop on Ctrl-C still do
    message = str(info.value)
    assert f"training of {run} interrupted after step 25 of 30" in message
    assert "`usae train` command or `train_usae` call with --resume (resume=True) to continue" in message
    assert "checkpoint of step 20" in message
    assert "--overwrite" not in message  # not used, so not named
    steps = []
    train_usae(store, run, *_cfgs(store), resume=True, callbacks=[lambda r: steps.append(r["step"])])
    assert steps == [25, 30]  # it did continue from step 20

    with pytest.raises(TrainingInterrupted, match=r"with --resume \(resume=True\) in place of --overwrite "
                                                  r"\(overwrite=True\) to continue from step 0 "
                                                  r"\(no checkpoint yet\) \(the new run in .*\.run\.replacing"):
        train_usae(store, run, *_cfgs(store, checkpoint_every=0), overwrite=True, callbacks=[ctrl_c_at_25])
    assert json.loads((run / "config.json").read_text())["step"] == 30  # the old run stays
