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


def demo_images_dir(settings: Settings, small: bool) -> Path:
    """Where the built-in demo image set lives: shared by `usae extract --images demo` and `usae demo`."""
    return settings.data_dir / "images" / ("demo-small" if small else "demo")
