"""Dropping images that could not be read from a store before it is declared complete.

Extraction decodes each image once, in its DataLoader workers, instead of test-decoding every
file up front. An image that fails there gets zero rows in its shard and is named in the
shard's done marker. `StoreWriter.finalize` then calls `compact_failed_images`: the failed
images' rows are dropped, later rows move up, and every shard from the first failure on is
rewritten, so the result is the store that the folder without those files would have given.

Crash safety, in this order:
1. Staging: the new shards are written under `STORE/.compact/` (same layout, each file atomic,
   each shard with its own done marker), after the new `image_ids.json` and `manifest.json`.
   The store itself is not touched, so a crash here leaves it as it was (every shard done,
   `complete: false`); the rerun's finalize resumes staging where it stopped.
2. Commit: `.compact/COMMITTED` is written durably. From here on the staged store is the truth.
3. Roll forward (`finish_compaction`, idempotent): staged shards are renamed over the old ones,
   rewritten shards' markers become `ok`, shards and markers past the new end are deleted, the
   directories are flushed, then `image_ids.json` and last `manifest.json` (`complete: true`)
   are moved in, and the staging directory is removed. A crash anywhere here is finished by the
   next run that opens the store for writing (`ActivationStore.create` calls
   `finish_compaction` before it compares layouts or looks at shards).

Memory stays bounded: each new shard file is written run by run from the memory-mapped old
shards, without a shard-sized buffer. Under torchrun every rank stages its share of the new
shards (`stage_shards` with a rank) before rank 0 commits, so the rewrite is split over the
ranks and none of them waits at a barrier for all of it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from usae_core.atomic import atomic_path, atomic_write_json, fsync_dir
from usae_core.errors import UsaeError
from usae_core.store_layout import (
    done_marker,
    shard_file,
    shard_index,
    shard_shape,
    shard_spans,
    write_done_marker,
)

STAGING = ".compact"
COMMITTED = "COMMITTED"


@dataclass(frozen=True)
class CompactionPlan:
    """What the store becomes: old image `keep[i]` is new image i; shards before `first_shard`
    stay as they are."""

    manifest: dict
    """The new manifest, complete."""
    image_ids: list[str]
    keep: np.ndarray
    first_shard: int


def plan_compaction(manifest: dict, image_ids: Sequence[str], failed: Mapping[str, str]) -> CompactionPlan:
    """The store without the images in `failed` (image id -> reason), which join
    `meta["skipped_images"]`."""
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    drop = sorted(position[i] for i in failed)
    keep = np.delete(np.arange(len(image_ids)), drop)
    if len(keep) == 0:
        first_id = next(iter(failed))
        raise UsaeError(f"none of the {len(image_ids)} images could be read (e.g. {first_id}: {failed[first_id]})")
    meta = dict(manifest.get("meta", {}))
    skipped = {**meta.get("skipped_images", {}), **failed}
    meta["skipped_images"] = {i: skipped[i] for i in sorted(skipped)}
    new_manifest = json.loads(json.dumps({**manifest, "n_images": len(keep), "meta": meta, "complete": True}))
    return CompactionPlan(new_manifest, [image_ids[i] for i in keep], keep, drop[0] // manifest["shard_images"])


def compact_failed_images(root: Path, manifest: dict, image_ids: Sequence[str], failed: Mapping[str, str]) -> dict:
    """Rewrite the store at `root` (every shard done) without the images in `failed`
    (image id -> reason); returns its new manifest. Shards that other processes staged already
    (`stage_shards` with a rank) are kept."""
    if finish_compaction(root):  # a committed compaction of this store is already the truth
        return json.loads((root / "manifest.json").read_text())
    plan = plan_compaction(manifest, image_ids, failed)
    start_staging(root, plan)
    stage_shards(root, manifest, plan)
    atomic_write_json(root / STAGING / COMMITTED, {"first_shard": plan.first_shard})
    finish_compaction(root)
    return plan.manifest


def start_staging(root: Path, plan: CompactionPlan) -> None:
    """Reuse a staging area left by an interrupted compaction to the same result, else start one."""
    staging = root / STAGING
    if staging.exists():
        try:
            same = (json.loads((staging / "manifest.json").read_text()) == plan.manifest
                    and json.loads((staging / "image_ids.json").read_text()) == plan.image_ids)
        except (OSError, ValueError):
            same = False
        if same:
            return
        shutil.rmtree(staging)
    atomic_write_json(staging / "image_ids.json", plan.image_ids)
    atomic_write_json(staging / "manifest.json", plan.manifest)  # last: its presence means the plan is whole


def stage_shards(root: Path, manifest: dict, plan: CompactionPlan, *, rank: int = 0, world_size: int = 1) -> None:
    """Write the new shards from `plan.first_shard` on (with a rank, every world_size-th of
    them) under the staging area that `start_staging` began; `manifest` is the old one."""
    staging = root / STAGING
    dims = {m["name"]: m["dim"] for m in manifest["models"]}
    tokens = manifest["tokens_per_image"]
    per_shard = manifest["shard_images"]
    for span in shard_spans(len(plan.keep), per_shard)[plan.first_shard :]:
        if span.index % world_size != rank:
            continue
        rows = span.n_images * tokens
        marker = done_marker(staging, span.index)
        if marker.exists() and all(shard_shape(shard_file(staging, m, span.index)) == (rows, d)
                                   for m, d in dims.items()):
            continue  # staged before an interruption, or by another rank
        runs = _runs(plan.keep[span.start : span.stop], per_shard)
        for model, dim in dims.items():
            sources = {s: np.load(shard_file(root, model, s), mmap_mode="r") for s, _, _ in runs}
            dtype = next(iter(sources.values())).dtype
            target = shard_file(staging, model, span.index)
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target, durable=False) as tmp:
                with open(tmp, "wb") as fh:
                    # An .npy header, then whole runs of kept rows straight from the old files'
                    # pages: no gather and no shard-sized buffer.
                    np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                              "fortran_order": False, "shape": (rows, dim)})
                    for s, lo, hi in runs:
                        fh.write(memoryview(sources[s][lo * tokens : hi * tokens]))
        write_done_marker(marker)


def _runs(old: np.ndarray, per_shard: int) -> list[tuple[int, int, int]]:
    """Sorted old image indices as runs of consecutive images within one old shard:
    (old shard, first local image, one past the last)."""
    shard = old // per_shard
    breaks = np.flatnonzero((np.diff(old) != 1) | (np.diff(shard) != 0)) + 1
    starts, stops = np.r_[0, breaks], np.r_[breaks, len(old)]
    return [(int(shard[a]), int(old[a] - shard[a] * per_shard), int(old[b - 1] - shard[a] * per_shard + 1))
            for a, b in zip(starts, stops)]


def finish_compaction(root: Path) -> bool:
    """Move a committed compaction of the store at `root` into place (idempotent); True if
    there was one. An uncommitted staging area is left for the next finalize to resume."""
    staging = root / STAGING
    commit = staging / COMMITTED
    if not commit.exists():
        return False
    first_shard = json.loads(commit.read_text())["first_shard"]
    staged_manifest = staging / "manifest.json"
    manifest = json.loads((staged_manifest if staged_manifest.exists() else root / "manifest.json").read_text())
    models = [m["name"] for m in manifest["models"]]
    n_shards = len(shard_spans(manifest["n_images"], manifest["shard_images"]))
    for model in models:
        for staged in sorted((staging / model).glob("shard-*.npy")):
            os.replace(staged, root / model / staged.name)
    for index in range(first_shard, n_shards):
        write_done_marker(done_marker(root, index))  # rewritten shards hold no failed image
    folders = [root / "done", *(root / m for m in models)]
    for folder in folders:
        for path in folder.glob("shard-*"):
            index = shard_index(path)
            if index is not None and index >= n_shards:
                path.unlink()
        fsync_dir(folder)  # the new shards are in place on disk before the manifest says so
    if (staging / "image_ids.json").exists():
        os.replace(staging / "image_ids.json", root / "image_ids.json")
    if staged_manifest.exists():
        os.replace(staged_manifest, root / "manifest.json")
    fsync_dir(root)
    # COMMITTED goes last: until it does, a rerun repeats the steps above, which find their work done.
    for child in staging.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        elif child != commit:
            child.unlink()
    commit.unlink()
    staging.rmdir()
    return True
