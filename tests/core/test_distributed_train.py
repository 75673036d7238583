"""Data-parallel training over 2 CPU processes (gloo): every rank ends with the same weights,
BatchNorm statistics included, and a run resumed from its checkpoint on all ranks ends exactly
where an uninterrupted run does."""

from __future__ import annotations

import os
import socket
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


def _worker(rank: int, port: int, store_root: str, out: str, stop: int, resume: bool, dump: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        store = ActivationStore.open(store_root)
        ucfg = USAEConfig(model_dims=store.dims, n_concepts=48, k=4, encoder="mlp_bn")
        tcfg = TrainConfig(steps=8, batch_size=64, lr=3e-3, warmup_steps=2, log_every=2, checkpoint_every=3,
                           aux="auxk", aux_k=16, dead_after_tokens=256, device="cpu", seed=5)
        try:
            model = train_usae(store, out, ucfg, tcfg, resume=resume, callbacks=[_stop_at(stop)])
        except _Interrupted:  # both ranks stop after the same step, as if the job were killed
            return
        torch.save({k: v.detach().clone() for k, v in model.tensors_by_name().items()}, f"{dump}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run(store: ActivationStore, out: Path, stop: int, resume: bool, dump: Path) -> list[dict]:
    mp.spawn(_worker, args=(_free_port(), str(store.root), str(out), stop, resume, str(dump)), nprocs=WORLD)
    return [torch.load(f"{dump}-rank{r}.pt") for r in range(WORLD)] if stop > 8 else []


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_two_ranks_stay_identical_and_resume_exactly(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {name: rng.standard_normal((64, 16, dim)).astype(np.float32) for name, dim in {"a": 12, "b": 20}.items()}
    store = import_activations(tmp_path / "store", arrays, dtype="float32", shard_images=8)

    straight = _run(store, tmp_path / "straight", 99, False, tmp_path / "straight")
    _assert_same(straight[0], straight[1])
    assert any(key.endswith("bn.running_var") for key in straight[0])

    _run(store, tmp_path / "resumed", 4, False, tmp_path / "first-half")  # killed after step 4
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())[-1] == "step-00000003"
    resumed = _run(store, tmp_path / "resumed", 99, True, tmp_path / "resumed")
    _assert_same(resumed[0], resumed[1])
    _assert_same(resumed[0], straight[0])
