"""Extraction throughput next to the backbones' bare forward throughput, measured in one run.

    python benchmarks/extract_throughput.py                       # embedded defaults, CPU
    python benchmarks/extract_throughput.py --device cuda --random-init --compile --n-images 20000 \
        --models timm:vit_small_patch14_dinov2,timm:vit_base_patch16_siglip_224,timm:vit_base_patch16_224 \
        --disk-check-gb 8

Bare forward: uint8 batches already on the device -> normalise -> every backbone (bf16 autocast on
CUDA), timed after warm-up; with --compile, normalisation and backbone are one compiled graph, as
in extraction. All backbones together run over as many images as the extraction reads (unless
--forward-batches says otherwise), so both measurements keep the GPU busy for as long.
Extraction: `extract_store` from image files on disk (JPEGs written by this script unless
--images is given) to a finished store, the whole path included (folder scan, decoding,
resizing, copies, grid resampling, writing). The ratio of the two is the share of the GPU's
speed the pipeline keeps. Prints one JSON object (also written to --json).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from usae_core.backbones import Backbone, create_backbone, default_backbones
from usae_core.extract import COMPILE_MODES, ExtractTimings, extract_store, normalized_tokens, use_fast_pinning
from usae_core.images import FolderSource
from usae_core.devices import resolve_device

log = logging.getLogger("extract_throughput")
UNIQUE_IMAGES = 512
"""Distinct rendered images; larger sets repeat their bytes under new names (decoding cost is the same)."""


def _jpeg(index: int) -> bytes:
    from PIL import Image

    from usae_core.demo_images import render

    rgb, _, _ = render(0, index)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_images(folder: Path, n: int) -> None:
    """`n` 224 px JPEG files of demo surfaces and photo crops."""
    folder.mkdir(parents=True, exist_ok=True)
    unique = min(n, UNIQUE_IMAGES)
    with ProcessPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        blobs = list(pool.map(_jpeg, range(unique), chunksize=8))
    for i in range(n):
        (folder / f"{i:07d}.jpg").write_bytes(blobs[i % unique])


def disk_write_speed(folder: Path, gigabytes: float) -> dict:
    """The file system under `folder` and its sequential write speed, flushed to disk: what the
    store's final durable write waits on when extraction produces faster than the disk writes
    (a store grows by (sum of model dims) x tokens x 2 bytes per image in float16)."""
    chunk = os.urandom(64 << 20)  # random bytes: a compressing file system cannot shortcut them
    n = max(1, round(gigabytes * 1e9 / len(chunk)))
    path = folder / "disk-check.bin"
    start = time.perf_counter()
    try:
        with open(path, "wb") as fh:
            for _ in range(n):
                fh.write(chunk)
            os.fsync(fh.fileno())
        seconds = time.perf_counter() - start
    finally:
        path.unlink(missing_ok=True)
    return {"file_system": _file_system(folder), "gigabytes": round(n * len(chunk) / 1e9, 2),
            "seconds": round(seconds, 2), "write_gb_s": round(n * len(chunk) / 1e9 / seconds, 2)}


def _file_system(folder: Path) -> str:
    """`type (mount options)` of the mount holding `folder`, from /proc/mounts (Linux)."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    where = str(folder.resolve())
    best = max((m for m in mounts if len(m) >= 4 and (where + "/").startswith(m[1].rstrip("/") + "/")),
               key=lambda m: len(m[1]), default=None)
    return f"{best[2]} ({best[3]})" if best else "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_throughput(models: list[Backbone], device: torch.device, batch_size: int, batches: int,
                       compile: bool | str, model_batches: int = 20) -> dict[str, float]:
    """Images/s of normalise + forward on uint8 input already on the device: each model alone over
    `model_batches` batches, and all together ("all", the reference) over `batches`."""
    cuda = device.type == "cuda"
    runners = {m.store_name: normalized_tokens(m, compile) for m in models}  # the extraction reuses them
    inputs = {m.input_size: torch.randint(0, 256, (batch_size, 3, m.input_size, m.input_size), dtype=torch.uint8,
                                          device=device) for m in models}

    def run(selected: list[Backbone]) -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            for m in selected:
                runners[m.store_name](inputs[m.input_size])

    def rate(selected: list[Backbone], batches: int) -> float:
        for _ in range(3 if compile or cuda else 1):  # warm-up (and compilation)
            run(selected)
        _sync(device)
        start = time.perf_counter()
        for _ in range(batches):
            run(selected)
        _sync(device)
        return batch_size * batches / (time.perf_counter() - start)

    out = {m.store_name: rate([m], min(batches, model_batches)) for m in models}
    out["all"] = rate(models, batches)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(default_backbones()), help="comma-separated registry names")
    p.add_argument("--random-init", action="store_true", help="random weights (timing only)")
    p.add_argument("--device", default="auto")
    p.add_argument("--images", type=Path, help="image folder to read (default: JPEGs written to a temp dir)")
    p.add_argument("--n-images", type=int, default=None, help="images to write (default 300 on CPU, 20000 on CUDA)")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 on CPU, 256 on CUDA")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (extract_store's default if unset)")
    p.add_argument("--forward-batches", type=int, default=None,
                   help="timed batches of the bare forward of all backbones (default: as many images as "
                        "the extraction reads; each backbone alone runs at most 20)")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbones in both measurements")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=None, help="a torch.compile mode (implies --compile)")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--work-dir", type=Path, default=None, help="where the images and the store go (temp dir)")
    p.add_argument("--store-dir", type=Path, default=None,
                   help="put the store (and the disk check) in a temp dir here instead, e.g. images on "
                        "disk and the store on a faster volume")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    p.add_argument("--disk-check-gb", type=float, default=0.0,
                   help="first time a flushed sequential write of this many GB in the work folder (0: skip)")
    args = p.parse_args(argv)
    compile = args.compile_mode or args.compile

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    batch_size = args.batch_size or (256 if cuda else 32)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    models = [create_backbone(n, random_init=args.random_init).to(device) for n in names]
    work = Path(tempfile.mkdtemp(prefix="usae-bench-", dir=args.work_dir))
    store_dir = Path(tempfile.mkdtemp(prefix="usae-bench-store-", dir=args.store_dir)) if args.store_dir else work
    try:
        images = args.images
        n_images = args.n_images or (20000 if cuda else 300)
        if images is None:
            images = work / "images"
            log.info("writing %d JPEG images to %s", n_images, images)
            write_images(images, n_images)
        disk = disk_write_speed(store_dir, args.disk_check_gb) if args.disk_check_gb > 0 else None
        log.info("bare forward of %s on %s", ", ".join(names), device)
        forward_batches = args.forward_batches or -(-len(FolderSource(images, check=False)) // batch_size)
        forward = forward_throughput(models, device, batch_size, forward_batches, compile)
        log.info("extraction")
        start = time.perf_counter()
        timings = ExtractTimings()
        store = extract_store(images, models, store_dir / "store", batch_size=batch_size, device=str(device),
                              num_workers=args.workers, dtype=args.dtype, progress=True, compile=compile,
                              timings=timings)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(store_dir, ignore_errors=True)
    extract_rate = store.n_images / seconds
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({os.cpu_count()} cores)",
        "models": names,
        "random_init": args.random_init,
        "n_images": store.n_images,
        "batch_size": batch_size,
        "workers": args.workers,
        "compile": compile,
        "store_dtype": args.dtype,
        "grid": list(store.grid),
        "images_on": _file_system(images),
        "store_on": _file_system(store_dir),
        "forward_img_s": {k: round(v, 1) for k, v in forward.items()},
        "forward_batches": forward_batches,
        "extract_img_s": round(extract_rate, 1),
        "extract_seconds": round(seconds, 2),
        "extract_vs_forward": round(extract_rate / forward["all"], 3),
        "extract_stages_s": {k: round(v, 2) for k, v in vars(timings).items() if k != "images"},
        "disk": disk,
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     **_optional_versions()},
    }
    text = json.dumps(result, indent=2)
    sys.stdout.write(text + "\n")
    if args.json:
        args.json.write_text(text + "\n")
    return result


def _optional_versions() -> dict[str, str]:
    out = {}
    for module in ("torchvision", "timm", "transformers", "PIL"):
        try:
            out[module] = __import__(module).__version__
        except ImportError:
            pass
    return out


if __name__ == "__main__":
    use_fast_pinning()  # as the `usae` command does
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
