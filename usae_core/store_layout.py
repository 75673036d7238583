"""Where a store's files live, which shard holds which image, and how a shard's done marker
reads: shared by the store's writer (`usae_core.store`) and the compaction that drops images
which failed to decode (`usae_core.store_compact`). The format is documented in docs/formats.md."""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from usae_core.atomic import atomic_path


@dataclass(frozen=True)
class ShardSpan:
    index: int
    start: int
    """First image of the shard."""
    stop: int
    """One past the last image."""

    @property
    def n_images(self) -> int:
        return self.stop - self.start


def fixed_shard_sizes(n_images: int, shard_images: int) -> list[int]:
    """`shard_images` images a shard, the last one shorter: the layout an extraction writes."""
    return [min(shard_images, n_images - start) for start in range(0, n_images, shard_images)]


def shard_sizes(manifest: Mapping) -> list[int]:
    """Images in each shard: the manifest's `shard_sizes` when a compaction made shards shrink,
    else the fixed layout (every store written before `shard_sizes` existed)."""
    sizes = manifest.get("shard_sizes")
    return list(sizes) if sizes is not None else fixed_shard_sizes(manifest["n_images"], manifest["shard_images"])


def spans_of(sizes: Sequence[int]) -> list[ShardSpan]:
    """Consecutive shards of the given image counts (a count may be 0: a shard whose images all
    failed to decode, kept as an empty file so that no later shard is renumbered)."""
    stops = np.cumsum(sizes, dtype=np.int64).tolist()
    return [ShardSpan(i, stop - n, stop) for i, (n, stop) in enumerate(zip(sizes, stops))]


def manifest_spans(manifest: Mapping) -> list[ShardSpan]:
    return spans_of(shard_sizes(manifest))


def with_shard_sizes(manifest: dict, sizes: Sequence[int]) -> dict:
    """`manifest` laid out in shards of `sizes`: `shard_sizes` is recorded only where it differs
    from the fixed layout, so a store that never shrank reads as before."""
    out = {k: v for k, v in manifest.items() if k != "shard_sizes"}
    out["n_images"] = int(sum(sizes))
    if list(sizes) != fixed_shard_sizes(out["n_images"], out["shard_images"]):
        out["shard_sizes"] = [int(n) for n in sizes]
    return out


def span_of_image(spans: Sequence[ShardSpan], image_index: int) -> ShardSpan:
    """The shard holding image `image_index` (bisection over the spans' starts; an empty shard
    is never the answer, because the shard after it starts where it does)."""
    at = bisect.bisect_right(spans, image_index, key=lambda s: s.start) - 1
    if image_index < 0 or at < 0 or image_index >= spans[at].stop:
        raise IndexError(f"image {image_index} is not in the store ({spans[-1].stop if spans else 0} images)")
    return spans[at]


def shard_file(root: Path, model: str, index: int) -> Path:
    return root / model / f"shard-{index:06d}.npy"


def done_marker(root: Path, index: int) -> Path:
    return root / "done" / f"shard-{index:06d}"


def shard_shape(path: Path) -> tuple[int, ...] | None:
    """Shape of a complete shard file, or None when it is missing, damaged or cut short."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    return tuple(arr.shape)


def write_done_marker(path: Path, failed: Mapping[str, str] | None = None) -> None:
    """Mark a shard done: `ok` when every image decoded, else JSON naming the images that did
    not ({"failed": {image id: reason}}; their rows are zeros until the store is compacted)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, durable=False) as tmp:
        tmp.write_text(json.dumps({"failed": dict(failed)}) + "\n" if failed else "ok\n")


def read_done_marker(path: Path) -> dict[str, str]:
    """The images a done shard failed to decode (empty for an `ok` marker)."""
    text = path.read_text()
    return json.loads(text)["failed"] if text.startswith("{") else {}
