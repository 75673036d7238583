"""The Universal Sparse Autoencoder (Thasarathan et al., 2025, sec. 3).

Every model i has an encoder  Z = TopK(ReLU(enc_i(standardise_i(A_i))))  into one shared code
of `n_concepts` entries, and a dictionary D_j (rows L2-normalised) that decodes any code into
model j:  standardise_j(A_j) ~= Z @ D_j + b_j.  Codes are kept sparse as (values, indices) pairs and
decoded by gathering only the k active dictionary rows.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from usae_core.atomic import atomic_path, atomic_write_json, finish_replacement
from usae_core.config import USAEConfig
from usae_core.errors import UsaeError
from usae_core.kernels.topk import relu_topk
from usae_core.sparse import SparseCode, sparse_decode, topk_encode

CHECKPOINT_FORMAT = "usae-checkpoint"
WEIGHTS_FILE = "usae.safetensors"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class Encoder(nn.Module):
    """Linear (+ BatchNorm) + ReLU into the shared concept space."""

    def __init__(self, dim: int, n_concepts: int, kind: str):
        super().__init__()
        self.linear = nn.Linear(dim, n_concepts)
        self.bn = nn.BatchNorm1d(n_concepts) if kind == "mlp_bn" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        if self.bn is not None:
            h = self.bn(h)
        return F.relu(h)

    def eval_affine(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Eval-mode BatchNorm as `gamma * h + beta` (float32), or `(None, None)` without BN."""
        if self.bn is None:
            return None, None
        bn = self.bn
        gamma = bn.weight.float() * torch.rsqrt(bn.running_var.float() + bn.eps)
        return gamma, bn.bias.float() - gamma * bn.running_mean.float()


def newest_checkpoint_step(run: Path) -> int | None:
    """The step of a run's newest checkpoint folder (`checkpoints/step-00000020`), if any."""
    steps = [int(p.name[5:]) for p in (run / CHECKPOINT_DIR).glob("step-*") if p.name[5:].isdigit()]
    return max(steps, default=None)


def not_a_run_message(directory: Path) -> str:
    """Why `directory` cannot be loaded as a run, and what to do: nothing there, a training that
    stopped before its end (only checkpoints), or something else."""
    if not directory.exists():
        beside = sorted(p.parent.name for p in directory.parent.glob(f"*/{CONFIG_FILE}"))
        return f"there is no USAE run at {directory}" + (f" (runs beside it: {', '.join(beside)})" if beside else "")
    newest = newest_checkpoint_step(directory)
    if newest is not None:
        try:
            saved = json.loads((directory / CHECKPOINT_DIR / f"step-{newest:08d}" / CONFIG_FILE).read_text())
        except (OSError, ValueError):
            saved = {}
        saved = saved if isinstance(saved, dict) else {}
        train, store = saved.get("train"), saved.get("store")
        total = train.get("steps") if isinstance(train, dict) else None
        of = f" of {total}" if isinstance(total, int) else ""
        command = (f"usae train --store {shlex.quote(store)} --out {shlex.quote(str(directory))} --resume"
                   if isinstance(store, str) else "usae train ... --resume")
        return (f"the training of {directory} did not finish (its newest checkpoint is step {newest}{of}); "
                f"continue it with `{command}` (it takes the options the run was started with)")
    return f"{directory} is not a USAE run (needs {CONFIG_FILE} and {WEIGHTS_FILE})"


class USAE(nn.Module):
    def __init__(self, cfg: USAEConfig):
        super().__init__()
        self.cfg = cfg
        self.names = cfg.model_names
        self._index = {n: i for i, n in enumerate(self.names)}
        c = cfg.n_concepts
        self.encoders = nn.ModuleList(Encoder(d, c, cfg.encoder) for d in cfg.model_dims.values())
        self.dictionaries = nn.ParameterList(
            nn.Parameter(F.normalize(torch.randn(c, d), dim=1)) for d in cfg.model_dims.values()
        )
        # A per-model decoder bias absorbs what is common to all tokens, so the non-negative
        # code only has to explain deviations from it.
        self.decoder_biases = nn.ParameterList(nn.Parameter(torch.zeros(d)) for d in cfg.model_dims.values())
        # Standardisation statistics travel with the weights (set from the store before training).
        for i, d in enumerate(cfg.model_dims.values()):
            self.register_buffer(f"mean_{i}", torch.zeros(d))
            self.register_buffer(f"scale_{i}", torch.ones(()))

    # --------------------------------------------------------------- helpers
    def index(self, model: str) -> int:
        try:
            return self._index[model]
        except KeyError:
            raise UsaeError(f"model {model!r} is not in this USAE (has {', '.join(self.names)})") from None

    def dictionary(self, model: str) -> torch.Tensor:
        return self.dictionaries[self.index(model)]

    def check_store(self, store) -> None:
        """UsaeError unless `store` holds exactly the models (names and dims) this USAE was trained on."""
        if self.cfg.model_dims != store.dims:
            raise UsaeError(f"the USAE was trained on models {self.cfg.model_dims}, the store has {store.dims}")

    def set_stats(self, stats: dict[str, dict]) -> None:
        """Load per-model `mean` [dim] and `scale` [] (from `ActivationStore.compute_stats`)."""
        for name in self.names:
            i = self.index(name)
            getattr(self, f"mean_{i}").copy_(torch.as_tensor(stats[name]["mean"]))
            getattr(self, f"scale_{i}").copy_(torch.as_tensor(stats[name]["scale"]))

    def standardization(self, model: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`(mean [dim], scale [])`: `standardize(x) = (x - mean) / scale`."""
        i = self.index(model)
        return getattr(self, f"mean_{i}"), getattr(self, f"scale_{i}")

    def standardize(self, x: torch.Tensor, model: str) -> torch.Tensor:
        mean, scale = self.standardization(model)
        return (x - mean) / scale

    def destandardize(self, x: torch.Tensor, model: str) -> torch.Tensor:
        i = self.index(model)
        return x * getattr(self, f"scale_{i}") + getattr(self, f"mean_{i}")

    @torch.no_grad()
    def normalize_dictionaries(self) -> None:
        """Project dictionary rows back onto the unit sphere (after every optimizer step)."""
        for d in self.dictionaries:
            d.div_(d.norm(dim=1, keepdim=True).clamp_min(1e-8))

    # --------------------------------------------------------------- encode / decode
    def pre_codes(self, x_std: torch.Tensor, model: str) -> torch.Tensor:
        """Non-negative encoder output before TopK: `[batch, n_concepts]`."""
        return self.encoders[self.index(model)](x_std)

    def encode(self, x_std: torch.Tensor, model: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse code `(values, indices)`, each `[batch, k]`, of standardised tokens `[batch, dim]`
        (`concept_codes` takes raw activations of any shape).

        In eval mode the BatchNorm folds into the fused ReLU + TopK pass over the encoder output
        (usae_core/kernels/topk.py), so the `[batch, n_concepts]` matrix is read once."""
        enc = self.encoders[self.index(model)]
        self._check_tokens(x_std, model)
        if self.training or torch.is_grad_enabled():
            return torch.topk(enc(x_std), self.cfg.k, dim=1, sorted=False)
        code, _ = relu_topk(enc.linear(x_std), self.cfg.k, *enc.eval_affine())
        return code.values, code.indices

    def _check_tokens(self, x: torch.Tensor, model: str) -> None:
        # A [images, tokens, dim] batch would otherwise run: TopK over the token axis, codes of
        # the wrong shape and no error (or BatchNorm's message about running_mean's size).
        dim = self.cfg.model_dims[model]
        if x.dim() != 2 or x.shape[1] != dim:
            raise UsaeError(f"encode takes standardised tokens [tokens, {dim}] of {model!r}, got shape "
                            f"{list(x.shape)}; for raw activations of any shape [..., {dim}], use concept_codes")

    @torch.no_grad()
    def concept_codes(self, activations: torch.Tensor | np.ndarray, model: str) -> torch.Tensor:
        """Each token's concept activations: raw activations `[..., dim]` of `model` (as stored,
        not standardised) -> dense codes `[..., n_concepts]` in float32, on the model's device.

        Uses the BatchNorm's running statistics whether the model is in train or eval mode, and
        changes nothing in it: the codes that mining, the explorer and `evaluate_usae` see."""
        self.index(model)  # an unknown model name is a UsaeError naming the USAE's models
        dim = self.cfg.model_dims[model]
        x = torch.as_tensor(activations)
        if x.dim() == 0 or x.shape[-1] != dim:
            raise UsaeError(f"activations of {model!r} must end in its dimension {dim}, got shape {list(x.shape)}")
        mean, _ = self.standardization(model)
        tokens = self.standardize(x.reshape(-1, dim).to(mean.device, torch.float32), model)
        enc = self.encoders[self.index(model)]
        code, _ = relu_topk(enc.linear(tokens), self.cfg.k, *enc.eval_affine())
        dense = self.dense_codes(code.values.float(), code.indices)
        return dense.reshape(*x.shape[:-1], self.cfg.n_concepts)

    def decode(self, values: torch.Tensor, indices: torch.Tensor, model: str) -> torch.Tensor:
        """Standardised reconstruction of `model` from a sparse code: `[batch, dim]`."""
        i = self.index(model)
        return sparse_decode(values, indices, self.dictionaries[i]) + self.decoder_biases[i]

    def encode_sparse(
        self, x_std: torch.Tensor, model: str, dead: torch.Tensor | None = None, k_aux: int = 0,
        sync_stats: bool = False,
    ) -> tuple[SparseCode, SparseCode | None]:
        """Training-time `encode` (BatchNorm in train mode) on the fused path: the TopK code, and the
        AuxK code of the `k_aux` largest dead concepts when `dead` is given. Gradients reach the
        encoder through the selected entries only (usae_core/sparse.py). Computes in x_std's dtype."""
        enc = self.encoders[self.index(model)]
        return topk_encode(x_std, enc.linear.weight, enc.linear.bias, enc.bn, self.cfg.k, dead, k_aux, sync_stats)

    def decode_sparse(self, code: SparseCode, model: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`decode` of a fused-path code, gathering dictionary rows in `dtype`."""
        i = self.index(model)
        return code.decode(self.dictionaries[i], dtype) + self.decoder_biases[i]

    def decode_loss_sparse(self, code: SparseCode, model: str, target: torch.Tensor, kind: str,
                           dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The reconstruction loss of `decode_sparse` against `target` and its sum of squared
        errors, without materialising the reconstruction (SparseCode.decode_loss)."""
        i = self.index(model)
        return code.decode_loss(self.dictionaries[i], self.decoder_biases[i], target, kind, dtype)

    def dense_codes(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The code as a dense `[batch, n_concepts]` tensor (for analysis, not the hot path)."""
        z = torch.zeros(values.shape[0], self.cfg.n_concepts, dtype=values.dtype, device=values.device)
        return z.scatter_(1, indices, values)

    def forward(self, x: torch.Tensor, source: str, target: str) -> torch.Tensor:
        """Raw activations of `source` -> raw reconstruction of `target`."""
        values, indices = self.encode(self.standardize(x, source), source)
        return self.destandardize(self.decode(values, indices, target), target)

    # --------------------------------------------------------------- checkpoints
    def tensors_by_name(self) -> dict[str, torch.Tensor]:
        """Tensors under their documented checkpoint names (docs/formats.md)."""
        out: dict[str, torch.Tensor] = {}
        for name in self.names:
            i = self.index(name)
            enc = self.encoders[i]
            out[f"encoder.{name}.weight"] = enc.linear.weight
            out[f"encoder.{name}.bias"] = enc.linear.bias
            if enc.bn is not None:
                for key, t in enc.bn.state_dict().items():
                    out[f"encoder.{name}.bn.{key}"] = t
            out[f"decoder.{name}"] = self.dictionaries[i]
            out[f"decoder_bias.{name}"] = self.decoder_biases[i]
            out[f"norm.{name}.mean"] = getattr(self, f"mean_{i}")
            out[f"norm.{name}.scale"] = getattr(self, f"scale_{i}")
        return out

    def save_pretrained(self, directory: str | Path, extra_config: dict | None = None) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors_by_name().items()}
        config = {"format": CHECKPOINT_FORMAT, "version": 1, "usae": self.cfg.to_dict(), **(extra_config or {})}
        with atomic_path(directory / WEIGHTS_FILE) as tmp:
            mode = tmp.stat().st_mode & 0o777  # what atomic_path gave it: a plain open's mode under the umask
            # One metadata entry: safetensors writes several in a random order, and the same
            # weights would then give different bytes (config already names the format).
            save_file(tensors, str(tmp), metadata={"config": json.dumps(config)})
            tmp.chmod(mode)  # save_file recreates the file private (0600): a server of another user must read it
        atomic_write_json(directory / CONFIG_FILE, config)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "USAE":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not cfg_path.exists():
            finish_replacement(directory)  # a `train --overwrite` whose swap was cut between its renames
        if not cfg_path.exists() or not weights.exists():
            raise UsaeError(not_a_run_message(directory))
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise UsaeError(f"{cfg_path} is damaged (not valid JSON: {exc}); retrain or restore the run") from None
        if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT:
            raise UsaeError(f"{cfg_path} is not a USAE checkpoint config")
        model = cls(USAEConfig.from_dict(config["usae"]))
        try:
            tensors = load_file(str(weights), device=str(map_location))
        except (SafetensorError, OSError) as exc:
            raise UsaeError(f"{weights} is damaged ({exc}); retrain or restore the run") from None
        mine = model.tensors_by_name()
        missing = sorted(set(mine) - set(tensors))
        if missing:
            raise UsaeError(f"{weights} lacks tensors {missing[:4]}")
        with torch.no_grad():
            for key, t in mine.items():
                t.copy_(tensors[key])
        # Ready for inference: in train mode, encoding used batch statistics and moved the
        # saved BatchNorm statistics. Call .train() to train on.
        return model.to(map_location).eval()
