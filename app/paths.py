"""How CLI arguments name stores and runs: a path, or a bare name inside the data directory."""

from __future__ import annotations

from pathlib import Path

from app.settings import Settings


def _resolve(arg: str | Path, base: Path) -> Path:
    p = Path(arg)
    if p.exists() or len(p.parts) > 1 or p.is_absolute():
        return p
    return base / p


def resolve_store(arg: str | Path, settings: Settings) -> Path:
    """`demo` -> DATA_DIR/stores/demo unless ./demo exists; paths are used as given."""
    return _resolve(arg, settings.stores_dir)


def resolve_run(arg: str | Path, settings: Settings) -> Path:
    return _resolve(arg, settings.runs_dir)


def demo_images_dir(settings: Settings, small: bool, seed: int = 0) -> Path:
    """Where the built-in demo image set lives: shared by `usae extract --images demo` and `usae demo`.
    Each seed has a folder of its own, so building another seed's set never changes the images
    under stores extracted from the default one."""
    name = "demo-small" if small else "demo"
    return settings.data_dir / "images" / (name if seed == 0 else f"{name}-seed{seed}")
