"""Data-parallel training over 2 CPU processes (gloo): every rank ends with the same weights,
BatchNorm statistics included, a run resumed from its checkpoint on all ranks ends exactly
where an uninterrupted run does, and --overwrite leaves the run's folders to rank 0."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from usae_core.config import TrainConfig, USAEConfig
from usae_core.store import ActivationStore, import_activations
from usae_core.train import train_usae

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Interrupted(Exception):
    pass


def _stop_at(step: int):
    def callback(record: dict) -> None:
        if record["step"] >= step:
            raise _Interrupted

    return callback


_CHANGES = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.chmod", "shutil.rmtree", "tempfile.mkstemp",
            "tempfile.mkdtemp"}
_WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _record_changes_to(out: Path, changes: list[str]) -> None:
    """Record every change this process makes to the run folder `out` or a hidden sibling of it
    (its replacement), seen through Python's audit events."""
    hidden = str(out.parent / f".{out.name}.")

    def concerns_the_run(path) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False
        path = os.fsdecode(path)
        return path == str(out) or path.startswith((f"{out}{os.sep}", hidden))

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            paths = [args[0]] if args[2] & _WRITING else []
        elif event in _CHANGES:
            paths = list(args[:2]) if event == "os.rename" else [args[0]]
        else:
            return
        changes.extend(f"{event} {os.fsdecode(p)}" for p in paths if concerns_the_run(p))

    sys.addaudithook(hook)


def _configs(store: ActivationStore) -> tuple[USAEConfig, TrainConfig]:
    ucfg = USAEConfig(model_dims=store.dims, n_concepts=48, k=4, encoder="mlp_bn")
    tcfg = TrainConfig(steps=8, batch_size=64, lr=3e-3, warmup_steps=2, log_every=2, checkpoint_every=3,
                       aux="auxk", aux_k=16, dead_after_tokens=256, device="cpu", seed=5)
    return ucfg, tcfg


def _worker(rank: int, port: int, store_root: str, out: str, stop: int, resume: bool, dump: str,
            overwrite: bool, rank0_late_s: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        store = ActivationStore.open(store_root)
        ucfg, tcfg = _configs(store)
        changes: list[str] = []
        if rank == 0:  # a rank that gets there later (busy, slower disk): the others must not go ahead
            time.sleep(rank0_late_s)
        else:  # only rank 0 writes the run and its replacement
            _record_changes_to(Path(out), changes)
        try:
            model = train_usae(store, out, ucfg, tcfg, resume=resume, overwrite=overwrite, callbacks=[_stop_at(stop)])
        except _Interrupted:  # both ranks stop after the same step, as if the job were killed
            model = None
        assert not changes, f"rank {rank} changed the run's folders: {changes}"
        if model is None:
            return
        torch.save({k: v.detach().clone() for k, v in model.tensors_by_name().items()}, f"{dump}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run(store: ActivationStore, out: Path, stop: int, resume: bool, dump: Path, *, overwrite: bool = False,
         rank0_late_s: float = 0.0) -> list[dict]:
    mp.spawn(_worker, args=(_free_port(), str(store.root), str(out), stop, resume, str(dump), overwrite, rank0_late_s),
             nprocs=WORLD)
    return [torch.load(f"{dump}-rank{r}.pt") for r in range(WORLD)] if stop > 8 else []


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def _store(tmp_path: Path) -> ActivationStore:
    rng = np.random.default_rng(0)
    arrays = {name: rng.standard_normal((64, 16, dim)).astype(np.float32) for name, dim in {"a": 12, "b": 20}.items()}
    return import_activations(tmp_path / "store", arrays, dtype="float32", shard_images=8)


def test_two_ranks_stay_identical_and_resume_exactly(tmp_path):
    store = _store(tmp_path)

    straight = _run(store, tmp_path / "straight", 99, False, tmp_path / "straight")
    _assert_same(straight[0], straight[1])
    assert any(key.endswith("bn.running_var") for key in straight[0])

    _run(store, tmp_path / "resumed", 4, False, tmp_path / "first-half")  # killed after step 4
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())[-1] == "step-00000003"
    resumed = _run(store, tmp_path / "resumed", 99, True, tmp_path / "resumed")
    _assert_same(resumed[0], resumed[1])
    _assert_same(resumed[0], straight[0])


def test_an_overwrite_on_two_ranks_leaves_the_run_folders_to_rank_0(tmp_path):
    """An earlier --overwrite cut between its two renames left the finished new run and the old
    one beside a missing run folder; the next --overwrite must first move the new run in. Rank 1
    used to look at the folders on its own while rank 0 was still getting there: it saw no run,
    created an empty run folder, and rank 0 then took the swap for done and deleted the old run
    while the new one was not in place either."""
    store = _store(tmp_path / "data")
    ucfg, tcfg = _configs(store)
    train_usae(store, tmp_path / "done", ucfg, tcfg)
    for folder, which in ((".run.replaced", "old"), (".run.replacing", "new")):  # the swap, cut between its renames
        shutil.copytree(tmp_path / "done", tmp_path / folder)
        (tmp_path / folder / "which").write_text(which)
    shutil.rmtree(tmp_path / "done")

    _run(store, tmp_path / "run", 4, False, tmp_path / "killed", overwrite=True, rank0_late_s=1.5)  # stops at step 4
    assert (tmp_path / "run" / "which").read_text() == "new"  # the cut swap was finished, and this overwrite
    assert json.loads((tmp_path / "run" / "config.json").read_text())["step"] == 8  # failed without harm
    assert not (tmp_path / ".run.replaced").exists()

    ranks = _run(store, tmp_path / "run", 99, False, tmp_path / "done", overwrite=True, rank0_late_s=1.5)
    _assert_same(ranks[0], ranks[1])
    assert sorted(p.name for p in tmp_path.iterdir() if "run" in p.name) == ["run"]
    assert not (tmp_path / "run" / "which").exists()  # the new run replaced it
    assert json.loads((tmp_path / "run" / "config.json").read_text())["step"] == 8
