"""Training loop for the USAE, readable in one sitting.

Each step: pick a source model (a pure function of seed and step, so every rank and every
resume agrees), encode a batch of its tokens, decode the code into every model on the same
rows, sum the reconstruction losses (+ an auxiliary dead-latent term), and take one AdamW step.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from usae_core.atomic import (
    atomic_directory,
    atomic_path,
    finish_replacement,
    replacement_folders,
    start_replacement,
    swap_in_replacement,
)
from usae_core.config import TrainConfig, USAEConfig, automatic_warmup_steps
from usae_core.devices import resolve_device
from usae_core.distributed import barrier, rank_and_world_size
from usae_core.errors import UsaeError
from usae_core.interrupt import interrupt_between_steps
from usae_core.locks import exclusive_lock
from usae_core.losses import auxk_loss, auxk_residual_loss, paper_aux_loss, reconstruction_loss
from usae_core.model import (
    CHECKPOINT_DIR,
    CHECKPOINT_FORMAT,
    CONFIG_FILE,
    USAE,
    WEIGHTS_FILE,
    newest_checkpoint_step,
    not_a_run_message,
)
from usae_core.prefetch import prefetch
from usae_core.store import ActivationStore
from usae_core.token_stream import device_token_batches

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TRAINER_STATE = "trainer_state.pt"
KEEP_CHECKPOINTS = 2
RUN_ENTRIES = frozenset({CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE, CHECKPOINT_DIR})
"""What a run folder holds (docs/formats.md); an unfinished first run may hold only some of them."""
REWRITTEN_FILES = (CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE)
"""The run's files written through `atomic_path`: a killed write leaves `.NAME.XXXXXXXX.tmp` beside them."""
RESUME_MAY_CHANGE = frozenset({"device", "autocast", "checkpoint_every"})
"""TrainConfig fields --resume accepts changed: where the run trains and how often it saves, not
what it learns (the same steps on the same batches with the same schedule; exact on the same
device). Anything else, the store and the USAE's shape included, must match the checkpoint:
--steps too, since the cosine schedule spans the run's steps (log_every too: it paces AuxK)."""
_FLAGS = {"n_concepts": "--concepts", "k": "--k", "encoder": "--encoder", "steps": "--steps",
          "batch_size": "--batch-size", "lr": "--lr", "loss": "--loss", "aux": "--aux", "seed": "--seed",
          "warmup_steps": "--warmup-steps"}
"""The `usae train` option of a setting, for messages (the others are named by their field)."""
_OVERWRITE, _RESUME, _INIT_FROM = "--overwrite (overwrite=True)", "--resume (resume=True)", "--init-from (init_from)"
"""The flags as messages name them: these errors reach users of `usae train` and of `train_usae` alike."""
SHAPE_FIELDS = ("n_concepts", "k", "encoder", "model_dims")
"""The USAEConfig fields a run started from another run's weights (--init-from) must share with it."""


def _setting(key: str) -> str:
    """A setting as messages name it: its `usae train` option and its field, or the field alone."""
    return f"{_FLAGS[key]} ({key})" if key in _FLAGS else key

Callback = Callable[[dict], None]


def read_training_log(run_dir: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl (see docs/formats.md), in the order written; a line
    cut short by a crash, or anything else that is not a JSON object with a step, is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def source_for_step(seed: int, step: int, n_models: int) -> int:
    return int(np.random.default_rng([seed, 7, step]).integers(n_models))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@contextlib.contextmanager
def _seeded_rng(seed: int, device: torch.device):
    """Draws inside come from `seed` alone (on the CPU and on `device`), and the caller's random
    streams go on afterwards as if nothing had drawn from them: a library call that trains
    reproducibly must not reseed its caller. Only those two generators are seeded:
    torch.manual_seed would reseed every GPU (or queue that until CUDA starts), beyond what
    fork_rng restores."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def _batch_r2(sse: torch.Tensor, target: torch.Tensor) -> float:
    """R^2 of a reconstruction of `target` whose sum of squared errors is `sse`."""
    target = target.to(torch.promote_types(target.dtype, torch.float32))
    total = (target - target.mean(0)).square().sum().clamp_min(1e-12)
    return float(1 - sse / total)


class Trainer:
    """Holds everything one training run needs; `run()` is the loop."""

    def __init__(self, store, out_dir: Path, usae_cfg: USAEConfig, cfg: TrainConfig, callbacks: list[Callback],
                 *, progress: bool = True, init_from: dict | None = None):
        self.store, self.out, self.cfg, self.callbacks = store, out_dir, cfg, callbacks
        self.progress = progress
        # Where the run's weights started (`_load_init_source`'s record), or None for a random init;
        # config.json keeps it, and a resume takes the run's own from its checkpoint.
        self.init_from = init_from
        self.device = resolve_device(cfg.device)
        self.autocast = cfg.autocast if cfg.autocast is not None else self.device.type == "cuda"
        self.rank, self.world_size = rank_and_world_size()
        # The initial weights are the only random draws of a training (the data order and the
        # source of each step come from NumPy generators seeded with cfg.seed).
        with _seeded_rng(cfg.seed, self.device):
            self.model = USAE(usae_cfg).to(self.device)
        self.names = usae_cfg.model_names
        on_cuda = self.device.type == "cuda"
        # On one GPU every fused step is captured once into a CUDA graph and replayed: no kernel
        # launch or Python overhead per step (it dominates at the paper's 6272-token batches).
        self.cuda_graphs = on_cuda and self.world_size == 1
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
            fused=on_cuda, capturable=self.cuda_graphs,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        # Captured optimizer steps read the learning rate from this device tensor.
        self._lr = torch.tensor(cfg.lr, device=self.device) if self.cuda_graphs else None
        self._bind_lr()
        self._graphs: dict[tuple[str, int], tuple] = {}
        self._graph_pool = None
        self._stream: torch.cuda.Stream | None = None
        # Tokens since each concept last fired, for dead-latent detection (AuxK and logging).
        self.since_fired = torch.zeros(usae_cfg.n_concepts, dtype=torch.long, device=self.device)
        self.step = 0
        # The fused sparse path (usae_core/sparse.py) computes the same step as the plain one;
        # the paper's auxiliary term is dense by construction and keeps the plain path.
        self.fused = cfg.aux != "paper"
        self._n_dead, self._steps_to_dead_check = 0, 0

    # ------------------------------------------------------------ checkpoints
    def run_config(self) -> dict:
        return {
            "train": self.cfg.to_dict(),
            "store": str(Path(self.store.root).resolve()),
            "store_fingerprint": self.store_fingerprint,
            "store_models": self.store.model_names,
            "world_size": self.world_size,
            "grid": list(self.store.grid),
            "step": self.step,
            **({"init_from": self.init_from} if self.init_from else {}),
        }

    @functools.cached_property
    def store_fingerprint(self) -> str:
        """Once per training: it hashes the store's image list, which can be large."""
        return store_fingerprint(self.store)

    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        ckpt = self.out / CHECKPOINT_DIR / f"step-{self.step:08d}"
        with atomic_directory(ckpt, overwrite=True) as tmp:
            self.model.save_pretrained(tmp, extra_config=self.run_config())
            state = {
                "step": self.step,
                "optimizer": self._optimizer_state(),
                "scheduler": self.scheduler.state_dict(),
                "since_fired": self.since_fired.cpu(),
                # the AuxK width's dead count and when it is next read: resuming at any step is exact
                "dead_check": [self._n_dead, self._steps_to_dead_check],
            }
            torch.save(state, tmp / TRAINER_STATE)
        old = sorted((self.out / CHECKPOINT_DIR).glob("step-*"))[:-KEEP_CHECKPOINTS]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)

    def load_latest_checkpoint(self) -> bool:
        """Resume from the newest readable checkpoint. Checkpoints are written atomically, but a
        disk can still damage one: then the one before it is used (KEEP_CHECKPOINTS are kept).
        Temporaries of a write that was killed are removed (by rank 0: every rank then reads the
        same checkpoints, and none deletes what rank 0 writes)."""
        directory = self.out / CHECKPOINT_DIR
        if self.rank == 0:
            _clear_unfinished_checkpoints(directory)
        barrier(self.world_size)
        ckpts = sorted(directory.glob("step-*"))
        for ckpt in reversed(ckpts):
            try:
                loaded = USAE.from_pretrained(ckpt, map_location=self.device)
                state = torch.load(ckpt / TRAINER_STATE, map_location=self.device, weights_only=True)
                saved = json.loads((ckpt / CONFIG_FILE).read_text())
            except Exception as exc:  # noqa: BLE001 - a damaged file fails in many ways (zip, pickle, struct, ...)
                log.warning("checkpoint %s cannot be read (%s); trying the one before it", ckpt, exc)
                continue
            self._check_resume_settings(saved, ckpt)
            self.init_from = saved.get("init_from")  # the run's own start, whatever init_from was given
            if loaded.cfg != self.model.cfg:
                raise UsaeError(f"{ckpt} was trained with a different USAE shape; start a new run")
            self.model.load_state_dict(loaded.state_dict())
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self._bind_lr()
            self._graphs.clear()
            self.since_fired.copy_(state["since_fired"])
            self.step = int(state["step"])
            self._n_dead, self._steps_to_dead_check = state.get("dead_check", (0, 0))  # read at once if absent
            if self.rank == 0:
                self._truncate_metrics(self.step)
            if self.step >= self.cfg.steps:
                log.info("%s had already finished its %d steps: nothing left to train", self.out, self.cfg.steps)
            else:
                log.info("resumed %s at step %d of %d", self.out, self.step, self.cfg.steps)
            return True
        if ckpts:
            raise UsaeError(f"no checkpoint in {directory} can be read; start again with {_OVERWRITE}")
        return False

    def _check_resume_settings(self, saved: dict, ckpt: Path) -> None:
        """UsaeError naming every setting that differs from the checkpoint's (saved vs given):
        a resume with other settings would continue a different training than the one started,
        and its config.json would then describe neither."""
        # A run saved before warm-up defaulted to min(100, steps // 10) holds the old fixed 100
        # (more than its steps, in a short run); a resume given the automatic value continues
        # with the run's own, as it does any warm-up the run was started with.
        saved_warmup = saved.get("train", {}).get("warmup_steps")
        if isinstance(saved_warmup, int) and self.cfg.warmup_steps == automatic_warmup_steps(self.cfg.steps):
            self.cfg.warmup_steps = saved_warmup
        given = {"usae": self.model.cfg.to_dict(), "train": self.cfg.to_dict()}
        given = json.loads(json.dumps(given))  # as read back from config.json: tuples become lists
        changed = [(key, old, given[part].get(key)) for part in ("usae", "train")
                   for key, old in saved.get(part, {}).items()
                   if key not in RESUME_MAY_CHANGE and old != given[part].get(key)]
        differences = [f"{_setting(key)} {old!r} vs {new!r}" for key, old, new in changed]
        store = _store_difference(saved, self.store, self.store_fingerprint)
        differences += [store] if store else []
        ranks = saved.get("world_size")  # absent in runs from before it was recorded: not checked
        if ranks is not None and ranks != self.world_size:  # each rank's share of the token stream depends on it
            differences.append(f"torchrun ranks {ranks} vs {self.world_size}")
        start = _init_difference(saved, self.init_from)
        differences += [start] if start else []
        if differences:
            # Settings `usae train` has no option for came from `usae demo` or the Python API.
            unflagged = [key for key, _, _ in changed if key not in _FLAGS and key != "model_dims"]
            where = (f" ({', '.join(unflagged)} {'has' if len(unflagged) == 1 else 'have'} no `usae train` option: "
                     "continue the run with the command or code that started it, e.g. `usae demo`)" if unflagged else "")
            raise UsaeError(
                f"{_RESUME} continues {ckpt.parent.parent} with the settings it was started with, but these "
                f"differ (saved vs given): {'; '.join(differences)}; resume with the saved values{where}, or start "
                f"a new run with {_OVERWRITE} or another --out (out_dir); only --device (device) and "
                f"--checkpoint-every (checkpoint_every) may change{_extend_hint(saved, ckpt, self.cfg.steps)}")

    def start_from(self, source: USAE) -> None:
        """Take the weights and standardisation statistics of `source` (a USAE of this shape),
        matched by model name: the weights are in the units of its statistics."""
        with torch.no_grad():
            mine = self.model.tensors_by_name()
            for key, tensor in source.tensors_by_name().items():
                mine[key].copy_(tensor)

    def _truncate_metrics(self, step: int) -> None:
        path = self.out / METRICS_FILE
        if not path.exists():
            return
        kept = [r for r in read_training_log(self.out) if r["step"] <= step]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))

    # ------------------------------------------------------------ one step
    @property
    def batch_dtype(self) -> torch.dtype | None:
        """What `train_step` converts batches to: bf16 where the fused step computes in bf16 (its
        loss kernels then read bf16 targets, and a CUDA graph's input copy moves half the bytes;
        rounding standardised activations to bf16 moves R^2 by ~1e-6), else None (kept as given)."""
        return torch.bfloat16 if self.autocast and self.fused else None

    def train_step(self, batch: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """One optimizer step on `batch` (standardised, every model) encoded from `source`."""
        if self.batch_dtype is not None:
            batch = {m: t.to(self.batch_dtype) for m, t in batch.items()}
        k_aux = self._auxk_width() if self.fused and self.cfg.aux == "auxk" else 0
        if self.cuda_graphs and self.fused:
            # Warm-up, capture and replay all run on one side stream (capturing work that must
            # sync with the legacy default stream is illegal), fenced against the default stream.
            self._stream = self._stream or torch.cuda.Stream(self.device)
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                out = self._graph_step(batch, source, k_aux)
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
        else:
            out = self._step(batch, source, k_aux)
        self.scheduler.step()
        self._bind_lr()
        return out

    def _step(self, batch: dict[str, torch.Tensor], source: str, k_aux: int) -> dict[str, torch.Tensor]:
        cfg, model = self.cfg, self.model
        dead = self.since_fired > cfg.dead_after_tokens
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast, cache_enabled=False):
            if self.fused:
                total, losses, sse, values, indices = self._fused_forward(batch, source, dead, k_aux)
            else:
                total, losses, sse, values, indices = self._plain_forward(batch, source, dead)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.world_size > 1:
            self._all_reduce_gradients()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        model.normalize_dictionaries()
        fired = torch.zeros_like(self.since_fired).scatter_add_(
            0, indices.flatten(), (values.flatten() > cfg.fire_threshold).long()
        )
        if self.world_size > 1:
            dist.all_reduce(fired)
        self.since_fired.add_(values.shape[0] * self.world_size).masked_fill_(fired > 0, 0)
        return {"loss": total.detach(), "losses": losses, "sse": sse, "values": values.detach()}

    def _graph_step(self, batch: dict[str, torch.Tensor], source: str, k_aux: int) -> dict[str, torch.Tensor]:
        """`_step` through a CUDA graph per (source, AuxK width): the first call of each runs
        eagerly (creating optimizer state) and captures the graph; later calls copy the batch
        into the graph's inputs and replay it. Outputs are valid until the next step. All graphs
        share one memory pool: nothing a graph computes is needed after its own replay."""
        key = (source, k_aux)
        if key not in self._graphs:
            out = self._step(batch, source, k_aux)
            static_in = {m: t.clone() for m, t in batch.items()}
            graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)
            try:
                # thread_local: the data loader's thread may allocate pinned memory meanwhile
                with torch.cuda.graph(graph, pool=self._graph_pool, stream=torch.cuda.current_stream(self.device),
                                      capture_error_mode="thread_local"):
                    static_out = self._step(static_in, source, k_aux)
            except RuntimeError as exc:  # keep training, without graphs
                log.warning("CUDA graph capture failed (%s); continuing with eager steps", str(exc).splitlines()[0])
                self.cuda_graphs = False
                self.optimizer.zero_grad(set_to_none=True)
                return out
            self._graph_pool = graph.pool()
            self._graphs[key] = (graph, static_in, static_out)
            return out
        graph, static_in, static_out = self._graphs[key]
        for m, t in batch.items():
            static_in[m].copy_(t, non_blocking=True)
        graph.replay()
        return static_out

    def _bind_lr(self) -> None:
        """Point the optimizer at the device learning-rate tensor (the scheduler may have replaced it)."""
        group = self.optimizer.param_groups[0]
        if self._lr is not None and group["lr"] is not self._lr:
            self._lr.fill_(float(group["lr"]))
            group["lr"] = self._lr

    def _optimizer_state(self) -> dict:
        state = self.optimizer.state_dict()
        for group in state["param_groups"]:
            group["lr"] = float(group["lr"])  # checkpoints keep a plain number, whatever the device
        return state

    def _plain_forward(self, batch: dict[str, torch.Tensor], source: str, dead: torch.Tensor) -> tuple:
        """The reference step: dense encoder output, torch.topk, embedding_bag decode."""
        cfg, model = self.cfg, self.model
        pre = model.pre_codes(batch[source], source)
        values, indices = torch.topk(pre, model.cfg.k, dim=1, sorted=False)
        losses, sse = {}, {}
        total = torch.zeros((), device=self.device)
        for target in self.names:
            d = model.dictionary(target)
            recon = model.decode(values, indices, target)
            rec_loss = reconstruction_loss(recon, batch[target], cfg.loss)
            residual = (batch[target] - recon).detach()
            if cfg.aux == "paper":
                aux = paper_aux_loss(pre, values, indices, residual, d, cfg.loss)
            elif cfg.aux == "auxk":
                aux = auxk_loss(pre, dead, residual, d, cfg.aux_k)
            else:
                aux = torch.zeros((), device=self.device)
            total = total + rec_loss + cfg.aux_weight * aux
            losses[target] = rec_loss
            sse[target] = residual.square().sum()
        return total, losses, sse, values, indices

    def _fused_forward(self, batch: dict[str, torch.Tensor], source: str, dead: torch.Tensor, k_aux: int) -> tuple:
        """The same losses as `_plain_forward` (auxk/none), computed from the k active entries
        per token (usae_core/sparse.py): no dense [batch, n_concepts] tensor is kept or differentiated."""
        cfg, model = self.cfg, self.model
        compute = torch.bfloat16 if self.autocast else batch[source].dtype
        code, aux_code = model.encode_sparse(batch[source].to(compute), source, dead if k_aux else None, k_aux,
                                             sync_stats=self.world_size > 1)
        losses, sse = {}, {}
        total = torch.zeros((), device=self.device)
        for target in self.names:
            if aux_code is None:  # the common case: loss and gradient without a reconstruction tensor
                rec_loss, sse[target] = model.decode_loss_sparse(code, target, batch[target], cfg.loss, compute)
            else:
                recon = model.decode_sparse(code, target, compute)
                x = batch[target]  # the residual AuxK fits stays at least float32, as on the plain path
                x = x.to(torch.promote_types(x.dtype, torch.float32))
                rec_loss = reconstruction_loss(recon, x, cfg.loss)
                residual = (x - recon).detach()
                aux_recon = aux_code.decode(model.dictionary(target), compute)
                total = total + cfg.aux_weight * auxk_residual_loss(aux_recon, residual, dead)
                sse[target] = residual.square().sum()
            total = total + rec_loss
            losses[target] = rec_loss
        return total, losses, sse, code.values, code.indices

    def _auxk_width(self) -> int:
        """Latents the AuxK term must consider: min(aux_k, dead count, rounded up to a power of two).

        Alive latents enter AuxK with value 0 and change nothing, so any width >= the number of
        dead latents gives the exact AuxK loss, at a cost proportional to the dead count instead
        of aux_k. The width shapes the step's tensors (and keys its CUDA graph), so the host
        needs it before the step: the count is read from the device every `log_every` steps,
        with the logging's host sync. A latent that dies between two reads gets its AuxK term on
        the fused path from the next read on, up to `log_every - 1` steps later than on the
        plain path. Counting ahead (latents that would die before the next read) closed that
        lag but made the width aux_k at every step wherever `log_every` batches exceed
        `dead_after_tokens` (the demo's settings), paying for AuxK when no latent was dead."""
        if self._steps_to_dead_check <= 0:
            self._n_dead = int((self.since_fired > self.cfg.dead_after_tokens).sum())
            self._steps_to_dead_check = self.cfg.log_every
        self._steps_to_dead_check -= 1
        if self._n_dead == 0:
            return 0
        return min(self.cfg.aux_k, self.model.cfg.n_concepts, max(8, 1 << (self._n_dead - 1).bit_length()))

    def _all_reduce_gradients(self) -> None:
        # Every rank encodes with the same source model (source_for_step), so all ranks touch
        # the same parameters; average their gradients, treating untouched ones as absent.
        for p in self.model.parameters():
            if p.grad is None:
                continue
            dist.all_reduce(p.grad)
            p.grad.div_(self.world_size)

    # ------------------------------------------------------------ the loop
    def run(self) -> USAE:
        cfg, model = self.cfg, self.model
        position = dict(seed=cfg.seed, start_batch=self.step, shuffle_shards=cfg.shuffle_shards,
                        rank=self.rank, world_size=self.world_size)
        if self.device.type == "cuda":  # the same batches, shuffled and converted on the GPU
            stream = device_token_batches(self.store, cfg.batch_size, device=self.device, **position)
        else:
            stream = prefetch({m: torch.from_numpy(a) for m, a in b.items()}
                               for b in self.store.iter_token_batches(cfg.batch_size, **position))
        model.train()
        metrics_file = self.out / METRICS_FILE
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step",
                   disable=not self.progress or self.rank != 0, dynamic_ncols=True)
        t0, tokens_since_log = time.perf_counter(), 0
        # One process: Ctrl-C stops between two steps (usae_core/interrupt.py). The ranks of a
        # distributed run could each stop at another step and wait on each other's collectives,
        # so they keep Python's default.
        between_steps = (interrupt_between_steps() if self.world_size == 1
                         else contextlib.nullcontext(threading.Event()))
        # The stream closes (its reader thread stops) and the bar too, even when a callback or a step raises.
        with between_steps as stop_requested, contextlib.closing(stream), bar:
            while self.step < cfg.steps:
                raw = next(stream)
                with torch.no_grad():
                    batch = {m: model.standardize(raw[m].to(self.device, non_blocking=True), m) for m in self.names}
                source = self.names[source_for_step(cfg.seed, self.step, len(self.names))]
                out = self.train_step(batch, source)
                self.step += 1
                tokens_since_log += cfg.batch_size * self.world_size
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    if self.device.type == "cuda":  # time finished work, not queued kernels
                        torch.cuda.synchronize(self.device)
                    elapsed = time.perf_counter() - t0
                    record = self._log_record(out, batch, source, tokens_since_log / max(elapsed, 1e-9))
                    t0, tokens_since_log = time.perf_counter(), 0
                    bar.set_postfix(loss=f"{record['loss']:.4f}", r2_self=f"{record['r2'][source]:.3f}")
                    if self.rank == 0:
                        with open(metrics_file, "a") as fh:
                            fh.write(json.dumps(record) + "\n")
                    for cb in self.callbacks:
                        cb(record)
                stopping = stop_requested.is_set()  # Ctrl-C: between two steps, a state worth keeping
                if stopping or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                                and self.step < cfg.steps):
                    self.save_checkpoint()
                if stopping:
                    raise KeyboardInterrupt
        self.save_checkpoint()
        if self.rank == 0:
            model.save_pretrained(self.out, extra_config=self.run_config())
        model.eval()
        return model

    def _log_record(self, out: dict, batch: dict, source: str, tokens_per_s: float) -> dict:
        return {
            "step": self.step,
            "source": source,
            "loss": float(out["loss"]),
            "losses": {m: float(v.detach()) for m, v in out["losses"].items()},
            "r2": {m: _batch_r2(out["sse"][m], batch[m]) for m in self.names},
            "l0": float((out["values"] > self.cfg.fire_threshold).sum(1).float().mean()),
            "dead_fraction": float((self.since_fired > self.cfg.dead_after_tokens).float().mean()),
            "lr": self.cfg.lr * lr_factor(self.step - 1, self.cfg),  # the rate this step used (0-based step - 1)
            "tokens_per_s": tokens_per_s,
        }


def _clear_unfinished_checkpoints(directory: Path) -> None:
    for aside in directory.glob(".step-*.replaced"):  # a rewrite of a checkpoint cut between its renames
        finish_replacement(directory / aside.name.removeprefix(".").removesuffix(".replaced"))
    for stale in directory.glob(".step-*"):  # hidden: never a finished checkpoint
        shutil.rmtree(stale, ignore_errors=True)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during `train_usae`; its message says where training stopped and how to continue."""


def train_usae(
    store: ActivationStore | str | os.PathLike,
    out_dir: str | Path,
    usae_cfg: USAEConfig,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    init_from: str | os.PathLike | None = None,
    callbacks: list[Callback] | None = None,
    progress: bool = True,
) -> USAE:
    """Train a USAE on `store` (an ActivationStore, or the path of one) into the run directory
    `out_dir` and return it (in eval mode).

    `resume` continues from the newest checkpoint in `out_dir` exactly as if never stopped; it
    refuses settings that differ from the checkpoint's (RESUME_MAY_CHANGE lists the exceptions).
    `overwrite` trains a new run beside an existing one, which is replaced only once the new
    run is complete; an interrupted overwrite leaves the old run as it was, and the new one
    beside it: `resume` then continues the new run (the one last started) and swaps it in.
    `init_from` (a run, or a checkpoint folder under one) starts a new run from its weights and
    standardisation statistics instead of a random init and the store's statistics: a USAE of
    the same shape, trained from step 0 with a fresh optimizer and `cfg`'s schedule, to train a
    finished run further or on another store of the same models; config.json records it.
    `resume` continues the run's own checkpoint, never init_from's weights: init_from, given,
    must be where the run started, and with nothing to resume the run starts from it (so the
    same call with `resume` continues either way).

    Ctrl-C raises `TrainingInterrupted`, which says how to continue. `progress` shows bars for
    the statistics pass and the steps (on rank 0). Training draws its initial weights (but for
    init_from's) from `cfg.seed` and leaves torch's global random state as it found it.
    """
    store = ActivationStore.of(store)
    out = Path(out_dir)
    if set(usae_cfg.model_dims) != set(store.model_names) or any(
        usae_cfg.model_dims[m] != store.dims[m] for m in store.model_names
    ):
        raise UsaeError(f"USAE models {usae_cfg.model_dims} do not match the store's {store.dims}")
    resolve_device(cfg.device)  # a wrong --device fails before any folder is made
    rank, world_size = rank_and_world_size()  # only rank 0 writes the run's files
    _check_batch_fits(store, cfg.batch_size, world_size)
    _check_out_folder(out, store)
    with exclusive_lock(out, "usae train", held=rank == 0):
        source, start = (None, None) if init_from is None else _init_source(
            Path(init_from), usae_cfg, out, resume=resume, overwrite=overwrite, world_size=world_size)
        build, replacing = _training_folder(out, resume=resume, overwrite=overwrite, rank=rank, world_size=world_size)
        if rank == 0:
            _clear_stale_temporaries(build)
        trainer = Trainer(store, build, usae_cfg, cfg, callbacks or [], progress=progress, init_from=start)
        try:
            if not (resume and trainer.load_latest_checkpoint()):
                if source is not None:
                    trainer.start_from(source)  # its statistics too: its weights are in their units
                else:
                    trainer.model.set_stats(store.compute_stats(progress=progress and rank == 0))
                if rank == 0:
                    (build / METRICS_FILE).unlink(missing_ok=True)
            source = None  # copied, or not needed: not held through training
            model = trainer.run()
        except KeyboardInterrupt:
            raise TrainingInterrupted(_interrupted_message(out, build, replacing, trainer.step, cfg.steps)) from None
        except BaseException:
            if replacing and rank == 0:  # kept, as a kill would leave it, for --resume to continue
                log.warning("the unfinished new run stays in %s beside %s: %s continues it, %s starts it again",
                            build, out, _RESUME, _OVERWRITE)
            raise
        if replacing and rank == 0:
            swap_in_replacement(out)
        barrier(world_size)  # no rank returns before the run is in place
    return model


def _interrupted_message(out: Path, build: Path, replacing: bool, step: int, steps: int) -> str:
    """Where an interrupted training stopped, and what `--resume` continues from: the newest
    checkpoint. Ctrl-C in one process stops between two steps and saves one there; an interrupt
    inside a step (a second Ctrl-C, a distributed run) leaves no consistent state to save, so
    the steps after the last checkpoint are trained again."""
    newest = newest_checkpoint_step(build)
    start = f"from its checkpoint of step {newest}" if newest is not None else "from step 0 (no checkpoint yet)"
    where = f" (the new run in {build}; {out} stays as it was until it finishes)" if replacing else ""
    instead = f" in place of {_OVERWRITE}" if replacing else ""
    return (f"training of {out} interrupted after step {step} of {steps}; rerun the same `usae train` command "
            f"or `train_usae` call with {_RESUME}{instead} to continue {start}{where}")


def init_source_config(init_from: str | os.PathLike) -> USAEConfig:
    """The USAE shape saved in `init_from` (a run, or a checkpoint folder under one), from its
    config.json alone: what `usae train --init-from` takes the shape options a user leaves out from."""
    path = Path(init_from)
    try:
        return USAEConfig.from_dict(json.loads((path / CONFIG_FILE).read_text())["usae"])
    except Exception:  # noqa: BLE001 - no run's config there: loading it says what is wrong
        return _load_init_source(path)[0].cfg


def trained_store(run: str | os.PathLike) -> ActivationStore:
    """The activation store a run (or a checkpoint folder under one) was trained on, opened where
    its config.json records it: `evaluate_usae(USAE.from_pretrained(run), trained_store(run))`.

    UsaeError when `run` is no finished run, records no store, or the store is no longer at that
    path (open it where it is now with `ActivationStore.open`). A store that holds other
    activations than the run was trained on (extracted again in the same place) opens with a warning."""
    path, saved = _store_record(Path(run), "open it where it is now with ActivationStore.open(path)")
    store = ActivationStore.open(path)
    if saved.get("store_fingerprint") not in (None, store_fingerprint(store)):
        log.warning("the store at %s holds other activations than %s was trained on (extracted again?)", path, run)
    return store


def trained_store_path(run: str | os.PathLike, instead: str) -> Path:
    """Where a run's config.json says its store is (`trained_store` opens it; the CLI's optional
    --store defaults to it). UsaeError when `run` is no finished run, records no store, or the
    store is no longer there: `instead` says what to do then ("pass --store")."""
    return _store_record(Path(run), instead)[0]


def _store_record(run: Path, instead: str) -> tuple[Path, dict]:
    """(the recorded store's path, the run's saved config), as `trained_store_path` says."""
    try:
        saved = json.loads((run / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        raise UsaeError(not_a_run_message(run)) from None
    recorded = saved.get("store") if isinstance(saved, dict) else None
    if not isinstance(recorded, str) or not recorded:
        raise UsaeError(f"{run} does not record the store it was trained on; {instead}")
    if not Path(recorded).exists():
        raise UsaeError(f"the store {run} was trained on, {recorded}, is no longer there (moved or deleted?); {instead}")
    return Path(recorded), saved


def resume_config(out: str | os.PathLike) -> dict | None:
    """The saved config (config.json) that `usae train --out OUT --resume` (`train_usae(resume=True)`) continues, or None
    with nothing to resume: that of the newest checkpoint with a readable one (else the run's
    own config.json) in the folder training resumes in: the new run an interrupted --overwrite
    left beside OUT, else OUT. Read only: `train_usae` finishes a swap cut between its renames,
    after which the run is the new folder's, or else the old one's (read in that order)."""
    out = Path(out)
    new, old = replacement_folders(out)
    for folder in (new, out, old):
        if not folder.is_dir():
            continue
        for config in [*sorted((folder / CHECKPOINT_DIR).glob("step-*"), reverse=True), folder]:
            try:
                saved = json.loads((config / CONFIG_FILE).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(saved, dict) and isinstance(saved.get("usae"), dict):
                return saved
        if folder == new:  # an interrupted --overwrite before its first checkpoint: resumed from step 0
            return None
    return None


def _init_source(init_from: Path, usae_cfg: USAEConfig, out: Path, *, resume: bool, overwrite: bool,
                 world_size: int) -> tuple[USAE, dict]:
    """The USAE a run starts from and the record config.json keeps of it, checked against the
    run's shape and --out. Every rank reads it before any folder changes: init_from may be the run
    that --overwrite replaces (which stays whole until the new run is swapped in)."""
    source, record = _load_init_source(init_from)
    _check_init_shape(source.cfg, usae_cfg, init_from)
    run, start = out.resolve(), init_from.resolve()
    if not (overwrite or resume) and (start == run or run in start.parents):
        raise UsaeError(f"{_INIT_FROM} {init_from} is in --out (out_dir) {out}, the run this training writes: pass "
                        f"{_OVERWRITE} to replace that run with one started from its weights (it stays as it is "
                        "until the new run finishes), or choose another --out (out_dir)")
    barrier(world_size)  # no rank is still reading it when rank 0 starts changing folders
    return source, record


def _load_init_source(init_from: Path) -> tuple[USAE, dict]:
    """The USAE in `init_from` and the record of it a run started from it keeps: its resolved
    path, and the step its weights are from (None where its config.json does not say)."""
    try:
        source = USAE.from_pretrained(init_from)
        saved = json.loads((init_from / CONFIG_FILE).read_text())
    except UsaeError as exc:
        newest = newest_checkpoint_step(init_from) if init_from.is_dir() else None
        checkpoint = (f", or start from its newest checkpoint: {_INIT_FROM} "
                      f"{init_from / CHECKPOINT_DIR / f'step-{newest:08d}'}" if newest is not None else "")
        raise UsaeError(f"{_INIT_FROM} {init_from} holds no USAE to start from: {exc}{checkpoint}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign folder fails in many ways
        raise UsaeError(f"{_INIT_FROM} {init_from} cannot be read as a USAE run ({exc}); "
                        "name a run folder or one of its checkpoints (RUN/checkpoints/step-XXXXXXXX)") from None
    step = saved.get("step")
    return source, {"path": str(init_from.resolve()), "step": step if isinstance(step, int) else None}


def _check_init_shape(saved: USAEConfig, given: USAEConfig, init_from: Path) -> None:
    """UsaeError naming every shape field in which the USAE of `init_from` differs from the run's
    (saved vs given): its weights fit no other shape."""
    changed = [key for key in SHAPE_FIELDS if getattr(saved, key) != getattr(given, key)]
    if not changed:
        return
    differences = "; ".join(f"{_setting(key)} {getattr(saved, key)!r} vs {getattr(given, key)!r}" for key in changed)
    advice = []
    if set(changed) - {"model_dims"}:
        advice.append("give the saved values (`usae train --init-from` takes them from the run when "
                      "--concepts, --k and --encoder are left out)")
    if "model_dims" in changed:  # the given ones are the store's (checked before)
        advice.append("model_dims are --store (store)'s models: start from a run trained on the same models")
    raise UsaeError(f"{_INIT_FROM} {init_from} holds a USAE of another shape (saved vs given): {differences}; "
                    f"{'; '.join(advice)}")


def _init_difference(saved: dict, given: dict | None) -> str | None:
    """How the start a resume is given (init_from) differs from the run's own, or None. A resume
    continues the run's checkpoint: init_from, given, must only name where the run started (a
    job rerun after preemption passes it every time); left out, there is nothing to compare."""
    if given is None:
        return None
    own = saved.get("init_from")
    own_path = own.get("path") if isinstance(own, dict) else None
    if own_path == given["path"]:
        return None
    started = repr(own_path) if own_path else "none (a random init)"
    return f"{_INIT_FROM} {started} vs {given['path']!r} (or leave it out: a resume needs only the run's checkpoint)"


def _extend_hint(saved: dict, ckpt: Path, steps: int) -> str:
    """For a resume given more steps than its run's: how to train the run further, or ''. Its
    schedule spans its own steps, so more steps are a new run that starts from its weights."""
    train = saved.get("train")
    planned = train.get("steps") if isinstance(train, dict) else None
    if not isinstance(planned, int) or steps <= planned:
        return ""
    run = ckpt.parent.parent
    weights = run if saved.get("step") == planned and (run / CONFIG_FILE).is_file() else ckpt
    return (f"; to train it beyond its {planned} steps, start a new run from its weights of step {saved.get('step')}: "
            f"{_INIT_FROM} {weights} with --steps (steps) counting the new steps alone (a fresh optimizer and "
            f"warm-up), and another --out (out_dir) or {_OVERWRITE}")


def store_fingerprint(store) -> str:
    """What the store holds, not where: its manifest (models, grid, shards), image list, and the
    activations of its first and last image (imported stores of one shape share the rest). A store
    moved elsewhere keeps it; one extracted or imported again with other data changes it."""
    digest = hashlib.sha256()
    for name in ("manifest.json", "image_ids.json"):
        path = Path(store.root) / name
        if path.is_file():
            digest.update(path.read_bytes())
    for model in store.model_names:
        for image in sorted({0, store.n_images - 1}):
            digest.update(store.image_tokens(model, image).tobytes())
    return digest.hexdigest()


def _store_difference(saved: dict, store, fingerprint: str) -> str | None:
    """How `store` (whose `store_fingerprint` is `fingerprint`) differs from the one a checkpoint
    was trained on, or None. Compared by content when the checkpoint has a fingerprint (a moved
    store is the same store); a checkpoint from before fingerprints accepts its own path, or a
    store with its models and grid (with a warning: it cannot tell more)."""
    given = str(Path(store.root).resolve())
    if "store_fingerprint" in saved:
        if saved["store_fingerprint"] == fingerprint:
            return None
        if saved.get("store") == given:
            return f"--store (store) {given} holds other activations than when the run started (extracted again?)"
        return f"--store (store) {saved.get('store')!r} vs {given!r}"
    if saved.get("store") in (None, given):
        return None
    if saved.get("store_models") == list(store.model_names) and saved.get("grid") == list(store.grid):
        log.warning("resuming a run trained on %s with %s, which has the same models and token grid "
                    "(a run from before store fingerprints cannot be checked further)", saved.get("store"), given)
        return None
    return f"--store (store) {saved.get('store')!r} vs {given!r}"


def _check_batch_fits(store, batch_size: int, world_size: int) -> None:
    """Refuse a batch larger than the tokens a rank reads (its share of the store), before a
    batch buffer that size is allocated: it would be filled by repeating the store, or exhaust
    memory trying."""
    share = store.n_tokens // world_size
    if batch_size > share:
        per_rank = f" split over {world_size} ranks ({share:,} each)" if world_size > 1 else ""
        raise UsaeError(f"--batch-size (batch_size) {batch_size:,} is more than the {store.n_tokens:,} tokens of "
                        f"{store.root}{per_rank}; use --batch-size {share} (batch_size={share}) or less")


def _check_out_folder(out: Path, store) -> None:
    """Refuse an --out that training must not write to or replace: a file, the store itself (or
    a folder inside it, or one holding it: --overwrite would delete the store), or a folder with
    other things than a run in it."""
    if out.exists() and not out.is_dir():
        raise UsaeError(f"--out (out_dir) {out} is a file, not a run folder; choose a folder path")
    run, data = out.resolve(), Path(store.root).resolve()
    if run == data or data in run.parents or run in data.parents:
        raise UsaeError(f"--out (out_dir) {out} is, or is inside or around, the activation store {store.root}; "
                        "a run must be a folder of its own (e.g. DATA_DIR/runs/NAME)")
    if out.is_dir() and not _holds_a_run(out):
        raise UsaeError(f"{out} is not empty and holds no USAE run; training writes only to a new or empty "
                        f"folder or a run's ({_OVERWRITE} only replaces a run), so choose another --out (out_dir)")


def _holds_a_run(folder: Path) -> bool:
    """Whether `folder` is empty or a run: its config.json is a USAE checkpoint's (a finished run,
    whatever was added to it, e.g. `usae cam` images), or it holds only what a run writes, with
    checkpoints as a run names them (a run cut short). Many projects have a `checkpoints/`
    folder of their own: that alone does not make a run, and --overwrite would delete it."""
    if (folder / CONFIG_FILE).exists():  # written atomically: a run's is whole, another is someone else's
        try:
            config = json.loads((folder / CONFIG_FILE).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(config, dict) and config.get("format") == CHECKPOINT_FORMAT
    checkpoints = folder / CHECKPOINT_DIR
    if checkpoints.exists() and not (checkpoints.is_dir() and all(
            _RUN_CHECKPOINT.fullmatch(p.name) for p in checkpoints.iterdir())):
        return False
    return all(p.name in RUN_ENTRIES or _is_temporary(p.name) for p in folder.iterdir())


_RUN_CHECKPOINT = re.compile(r"\.?step-\d{8}(\..+)?")
"""A run's checkpoint folder (`step-00000500`), or one of a checkpoint write cut short (hidden)."""


def _is_temporary(name: str) -> bool:
    """A temporary file `atomic_path` makes for one of the run's files: `.NAME.XXXXXXXX.tmp`."""
    return name.endswith(".tmp") and any(name.startswith(f".{f}.") for f in REWRITTEN_FILES)


def _clear_stale_temporaries(run: Path) -> None:
    """Remove the temporary files a killed write of config.json, usae.safetensors or metrics.jsonl
    left in the run folder (the caller holds the run's lock: no write of them is under way)."""
    if run.is_dir():
        for path in run.iterdir():
            if _is_temporary(path.name) and path.is_file():
                path.unlink(missing_ok=True)


def _training_folder(out: Path, *, resume: bool, overwrite: bool, rank: int, world_size: int) -> tuple[Path, bool]:
    """The folder to train in, and whether it replaces a run at `out`: --overwrite trains the
    new run beside the old one, which stays whole until the finished new run is swapped in.
    A new run an interrupted --overwrite left there is the run the user last started: --resume
    continues it, --overwrite starts it again, and a run with neither flag is refused.

    Only rank 0 changes folders. The others wait for it at barriers: each rank deciding alone
    could see a swap half-finished by rank 0 and act on it (a rank that created the missing run
    folder made rank 0 take the swap for done and delete the old run)."""
    if rank == 0:
        finish_replacement(out)  # an earlier --overwrite cut between its renames
    barrier(world_size)  # every rank decides from the finished swap
    new = replacement_folders(out)[0]
    has_run = (out / CHECKPOINT_DIR).exists() or (out / "config.json").exists()
    interrupted = new.is_dir()
    if resume:
        replacing = interrupted
        if not (has_run or interrupted) and rank == 0:
            # kept going rather than refused: a job restarted after preemption passes --resume every time
            log.warning("nothing to resume in %s (no run or checkpoint there yet): starting a new run", out)
    elif interrupted and not overwrite:
        raise UsaeError(_interrupted_overwrite_message(out, new, has_run))
    elif has_run and not overwrite:
        raise UsaeError(f"{out} already holds a run; pass {_RESUME} to continue it or {_OVERWRITE} to replace it")
    else:
        replacing = has_run or interrupted
    build = new if replacing else out
    barrier(world_size)  # and has decided before rank 0 changes anything
    if rank == 0:
        if replacing and resume:
            log.info("continuing the new run that an interrupted --overwrite left in %s; it replaces %s "
                     "when it finishes", new, out)
        elif replacing:
            start_replacement(out)
        build.mkdir(parents=True, exist_ok=True)
    return build, replacing


def _interrupted_overwrite_message(out: Path, new: Path, has_run: bool) -> str:
    newest = newest_checkpoint_step(new)
    progress = f"checkpointed at step {newest}" if newest is not None else "no checkpoint yet"
    keep = f"to keep the run in {out} as it is" if has_run else "to start a run from scratch"
    return (f"an interrupted {_OVERWRITE} of {out} left its new run in {new} ({progress}); pass {_RESUME} to "
            f"continue that new run (it replaces {out.name} when it finishes), {_OVERWRITE} to start it again, "
            f"or delete {new} {keep}")
