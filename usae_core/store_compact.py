"""Dropping images that could not be read from a store before it is declared complete.

Extraction decodes each image once, in its DataLoader workers, instead of test-decoding every
file up front. An image that fails there gets zero rows in its shard and is named in the
shard's done marker. `StoreWriter.finalize` then calls `compact_failed_images`: each shard that
holds a failed image is rewritten without those rows and shrinks by as many images; every other
shard stays as it is, byte for byte. The manifest records the new sizes (`shard_sizes`), so the
cost of a failure is one shard, wherever it sits, and the result holds the same rows, image for
image, as the store that the folder without those files would have given (only the shard
boundaries differ). A shard whose images all failed stays, as an empty file: no later shard is
renumbered, so nothing but the failed shards' files is touched. Readers skip empty shards.

Crash safety, in this order:
1. Staging: the rewritten shards are written under `STORE/.compact/` (same layout, each file
   atomic, each shard with its own done marker), after the new `image_ids.json` and
   `manifest.json`. The store itself is not touched, so a crash here leaves it as it was (every
   shard done, `complete: false`); the rerun's finalize resumes staging where it stopped.
2. Commit: `.compact/COMMITTED` (naming the rewritten shards) is written durably. From here on
   the staged store is the truth.
3. Roll forward (`finish_compaction`, idempotent): staged shards are renamed over the old ones,
   their markers become `ok`, the directories are flushed, then `image_ids.json` and last
   `manifest.json` (`complete: true`) are moved in, and the staging directory is removed. A
   crash anywhere here is finished by the next run that opens the store for writing
   (`ActivationStore.create` calls `finish_compaction` before it compares layouts or looks at
   shards).

Memory stays bounded: each new shard file is written run by run from the memory-mapped old
shard, without a shard-sized buffer. Under torchrun every rank stages its share of the
rewritten shards (`stage_shards` with a rank) before rank 0 commits, so the rewrite is split
over the ranks and none of them waits at a barrier for all of it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from usae_core.atomic import atomic_path, atomic_write_json, fsync_dir, start_writeback
from usae_core.errors import UsaeError
from usae_core.store_layout import (
    done_marker,
    manifest_spans,
    shard_file,
    shard_shape,
    span_of_image,
    with_shard_sizes,
    write_done_marker,
)

STAGING = ".compact"
COMMITTED = "COMMITTED"


class NoImageReadable(UsaeError):
    """Every image of the store failed to decode: there is no store to finish."""


@dataclass(frozen=True)
class CompactionPlan:
    """What the store becomes: shard `s` of `keep` is rewritten with only its images
    `keep[s]` (offsets within the shard, ascending); every other shard stays as it is."""

    manifest: dict
    """The new manifest, complete."""
    image_ids: list[str]
    keep: dict[int, np.ndarray]


def plan_compaction(manifest: dict, image_ids: Sequence[str], failed: Mapping[str, str]) -> CompactionPlan:
    """The store without the images in `failed` (image id -> reason), which join
    `meta["skipped_images"]`."""
    if len(failed) >= len(image_ids):
        first_id = next(iter(failed))
        raise NoImageReadable(f"none of the {len(image_ids)} images could be read (e.g. {first_id}: {failed[first_id]})")
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    spans = manifest_spans(manifest)
    dropped: dict[int, list[int]] = {}
    for image_id in failed:
        span = span_of_image(spans, position[image_id])
        dropped.setdefault(span.index, []).append(position[image_id] - span.start)
    keep = {s: np.setdiff1d(np.arange(spans[s].n_images), local) for s, local in sorted(dropped.items())}
    sizes = [len(keep[s.index]) if s.index in keep else s.n_images for s in spans]
    meta = dict(manifest.get("meta", {}))
    skipped = {**meta.get("skipped_images", {}), **failed}
    meta["skipped_images"] = {i: skipped[i] for i in sorted(skipped)}
    new_manifest = json.loads(json.dumps(with_shard_sizes({**manifest, "meta": meta, "complete": True}, sizes)))
    return CompactionPlan(new_manifest, [i for i in image_ids if i not in failed], keep)


def compact_failed_images(root: Path, manifest: dict, image_ids: Sequence[str], failed: Mapping[str, str]) -> dict:
    """Rewrite the shards of the store at `root` (every shard done) that hold images in
    `failed` (image id -> reason), without them; returns the store's new manifest. Shards that
    other processes staged already (`stage_shards` with a rank) are kept."""
    if finish_compaction(root):  # a committed compaction of this store is already the truth
        return json.loads((root / "manifest.json").read_text())
    plan = plan_compaction(manifest, image_ids, failed)
    start_staging(root, plan)
    stage_shards(root, manifest, plan)
    atomic_write_json(root / STAGING / COMMITTED, {"shards": list(plan.keep)})
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
    """Write the rewritten shards (with a rank, every world_size-th of them) under the staging
    area that `start_staging` began; `manifest` is the old one."""
    staging = root / STAGING
    dims = {m["name"]: m["dim"] for m in manifest["models"]}
    tokens = manifest["tokens_per_image"]
    for k, (index, kept) in enumerate(plan.keep.items()):
        if k % world_size != rank:
            continue
        rows = len(kept) * tokens
        marker = done_marker(staging, index)
        if marker.exists() and all(shard_shape(shard_file(staging, m, index)) == (rows, d) for m, d in dims.items()):
            continue  # staged before an interruption, or by another rank
        for model, dim in dims.items():
            source = np.load(shard_file(root, model, index), mmap_mode="r")
            target = shard_file(staging, model, index)
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target, durable=False) as tmp:
                with open(tmp, "wb") as fh:
                    # An .npy header, then whole runs of kept rows straight from the old file's
                    # pages: no gather and no shard-sized buffer.
                    np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(source.dtype),
                                                              "fortran_order": False, "shape": (rows, dim)})
                    for lo, hi in _runs(kept):
                        fh.write(memoryview(source[lo * tokens : hi * tokens]))
                    start_writeback(fh)
        write_done_marker(marker)


def _runs(kept: np.ndarray) -> list[tuple[int, int]]:
    """Ascending image offsets as runs of consecutive images: (first, one past the last)."""
    breaks = np.flatnonzero(np.diff(kept) != 1) + 1
    starts, stops = np.r_[0, breaks], np.r_[breaks, len(kept)]
    return [(int(kept[a]), int(kept[b - 1]) + 1) for a, b in zip(starts, stops) if b > a]


def finish_compaction(root: Path) -> bool:
    """Move a committed compaction of the store at `root` into place (idempotent); True if
    there was one. An uncommitted staging area is left for the next finalize to resume."""
    staging = root / STAGING
    commit = staging / COMMITTED
    if not commit.exists():
        return False
    rewritten = json.loads(commit.read_text())["shards"]
    staged_manifest = staging / "manifest.json"
    manifest = json.loads((staged_manifest if staged_manifest.exists() else root / "manifest.json").read_text())
    models = [m["name"] for m in manifest["models"]]
    for model in models:
        for staged in sorted((staging / model).glob("shard-*.npy")):
            os.replace(staged, root / model / staged.name)
    for index in rewritten:
        write_done_marker(done_marker(root, index))  # rewritten shards hold no failed image
    for folder in [root / "done", *(root / m for m in models)]:
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
