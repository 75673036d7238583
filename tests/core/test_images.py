"""Image sources: canonical square view, robust folder reading, demo-set masks."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from usae_core.errors import UsaeError
from usae_core.images import FolderSource, defect_types, load_masks, square_view

EXIF_ORIENTATION = 0x0112


def upright_pattern(h: int = 60, w: int = 100) -> np.ndarray:
    """An image whose orientation is unambiguous: a bright block in the top-left corner."""
    ramp = np.linspace(30, 90, w, dtype=np.float64)[None, :] + np.linspace(0, 30, h)[:, None]
    img = np.stack([ramp, ramp * 0.8, ramp * 1.2], -1).astype(np.uint8)
    img[: h // 3, : w // 3] = (250, 200, 30)
    return img


def save_exif_rotated(path: Path, upright: np.ndarray, fmt: str = "PNG", **kw) -> None:
    """Store the pixels rotated 90 degrees counter-clockwise with EXIF orientation 6
    ("rotate 90 clockwise to display"), as cameras do for portrait shots."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(path, format=fmt, exif=exif.tobytes(), **kw)


def make_messy_folder(root: Path) -> dict[str, np.ndarray]:
    """A folder with every awkward case; returns the expected RGB pixels of each readable image."""
    (root / "sub" / "deeper").mkdir(parents=True)
    expected: dict[str, np.ndarray] = {}
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, 25:, 2] = 255
    rgba[:, :25, 3] = 0  # fully transparent red -> white
    rgba[:, 25:, 3] = 128  # half-transparent magenta over white
    Image.fromarray(rgba, "RGBA").save(root / "alpha.png")
    alpha = rgba[..., 3:4].astype(np.float64) / 255
    expected["alpha.png"] = np.round(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    grey = np.tile(np.arange(0, 250, 5, dtype=np.uint8), (30, 1))
    Image.fromarray(grey, "L").save(root / "sub" / "grey.png")
    expected["sub/grey.png"] = np.stack([grey] * 3, -1)
    upright = upright_pattern()
    save_exif_rotated(root / "sub" / "deeper" / "rotated.png", upright)
    expected["sub/deeper/rotated.png"] = upright
    Image.fromarray(upright).save(root / "plain.BMP")
    expected["plain.BMP"] = upright
    (root / "garbage.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    good = root / "truncated.png"
    Image.fromarray(upright).save(good)
    good.write_bytes(good.read_bytes()[:300])
    (root / "notes.txt").write_text("not an image")
    return expected


def test_square_view_takes_the_centre_square_of_any_shape():
    wide = np.zeros((200, 300, 3), np.uint8)
    wide[:, :50] = (255, 0, 0)
    wide[:, 50:250] = (0, 255, 0)
    wide[:, 250:] = (0, 0, 255)
    view = square_view(Image.fromarray(wide), 100)
    assert view.size == (100, 100) and view.mode == "RGB"
    assert (np.asarray(view) == (0, 255, 0)).all()
    tall = np.transpose(wide, (1, 0, 2))
    assert (np.asarray(square_view(Image.fromarray(tall), 64)) == (0, 255, 0)).all()
    grey = square_view(Image.fromarray(np.full((10, 10), 7, np.uint8), "L"), 10)
    assert grey.mode == "RGB" and (np.asarray(grey) == 7).all()


def test_folder_source_reads_awkward_images_and_names_corrupt_ones(tmp_path, caplog):
    expected = make_messy_folder(tmp_path)
    with caplog.at_level(logging.WARNING):
        src = FolderSource(tmp_path)
    assert src.ids == sorted(expected)  # stable relative POSIX paths, sorted; .txt ignored
    assert set(src.skipped) == {"garbage.jpg", "truncated.png"}
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "skipped 2 unreadable" in warning and "garbage.jpg" in warning and "truncated.png" in warning
    for image_id, want in expected.items():
        got = np.asarray(src.load(image_id))
        assert got.shape == want.shape, image_id
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, image_id
    assert src.path("sub/grey.png") == tmp_path.resolve() / "sub" / "grey.png"
    assert defect_types(tmp_path) == [] and load_masks(tmp_path, "alpha.png") is None


def test_exif_rotation_applies_to_jpeg_too(tmp_path):
    upright = upright_pattern()
    save_exif_rotated(tmp_path / "photo.jpg", upright, fmt="JPEG", quality=95)
    got = np.asarray(FolderSource(tmp_path).load("photo.jpg")).astype(int)
    assert got.shape == upright.shape
    assert np.abs(got - upright).mean() < 3  # only JPEG error, no rotation left
    assert got[:15, :25].mean() > 140 and got[-30:, -50:].mean() < 120  # the bright block is top-left


def test_decompression_bomb_guard_skips_huge_images(tmp_path):
    Image.new("RGB", (400, 300)).save(tmp_path / "big.png")
    Image.new("RGB", (40, 30)).save(tmp_path / "small.png")
    src = FolderSource(tmp_path, max_pixels=10_000)
    assert src.ids == ["small.png"]
    assert "decompression-bomb" in src.skipped["big.png"]


def test_sixteen_bit_grey_is_stretched_not_clipped(tmp_path):
    a = np.linspace(0, 60000, 64 * 8).reshape(8, 64).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "deep.png")
    got = np.asarray(FolderSource(tmp_path).load("deep.png"))[..., 0]
    assert got.min() == 0 and got.max() == 255
    assert np.all(np.diff(got[0].astype(int)) >= 0)


def test_empty_or_missing_folders_are_clear_errors(tmp_path):
    with pytest.raises(UsaeError, match="does not exist"):
        FolderSource(tmp_path / "nope")
    (tmp_path / "bad.png").write_bytes(b"xx")
    with pytest.raises(UsaeError, match="no readable images"):
        FolderSource(tmp_path)


def test_listing_matches_rglob_and_survives_a_link_cycle(tmp_path):
    """The fast listing gives what `Path.rglob` + `is_file` gave (the reference): linked files
    in, linked folders not entered, so a link back up the tree cannot trap it."""
    from usae_core.images import IMAGE_EXTENSIONS, list_image_files

    root = tmp_path / "images"
    for rel in ("a/b/x.JPG", "a/y.png", "a/.hidden.png", "a/notes.txt", "top.webp", ".git/z.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (root / "linked").symlink_to(root / "a", target_is_directory=True)
    (root / "broken.png").symlink_to(tmp_path / "missing.png")
    (root / "alias.png").symlink_to(root / "a" / "y.png")
    want = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith("."))
    got = list_image_files(root, root)
    assert got == want and "alias.png" in got and ".git/z.png" in got and "a/b/x.JPG" in got
    assert "broken.png" not in got and not any(i.startswith("linked/") for i in got)
    (root / "a" / "b" / "up").symlink_to(root / "a", target_is_directory=True)  # a cycle
    assert list_image_files(root, root) == got
