"""Where a store's files live and how a shard's done marker reads: shared by the store's writer
(`usae_core.store`) and the compaction that drops images which failed to decode
(`usae_core.store_compact`). The format is documented in docs/formats.md."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

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


def shard_spans(n_images: int, shard_images: int) -> list[ShardSpan]:
    return [
        ShardSpan(i, start, min(start + shard_images, n_images))
        for i, start in enumerate(range(0, n_images, shard_images))
    ]


def shard_file(root: Path, model: str, index: int) -> Path:
    return root / model / f"shard-{index:06d}.npy"


def done_marker(root: Path, index: int) -> Path:
    return root / "done" / f"shard-{index:06d}"


def shard_index(path: Path) -> int | None:
    """The index in a shard file's or marker's name (`shard-000012[.npy]`), None for other names."""
    stem = path.name.removesuffix(".npy")
    digits = stem.removeprefix("shard-")
    return int(digits) if stem.startswith("shard-") and digits.isdigit() else None


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
