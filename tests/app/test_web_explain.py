"""Explain an image: uploads are validated, a real backbone + USAE explain it, and a model
whose backbone is unknown is reported plainly instead of failing the page."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from app.db import session_factory
from app.models import Concept, Run, RunModel
from app.services.explain import UploadRejected, framed_square, framing_note, validate_upload
from tests.app.webapp import csrf_from, sign_in_as
from usae_core.backbones import create_backbone
from usae_core.config import USAEConfig
from usae_core.extract import resample_grid
from usae_core.model import USAE


def _image_bytes(kind: str = "PNG", size=(64, 48), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=kind)
    return buf.getvalue()


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"GIF89a not really", "not a readable image"),
    (_image_bytes("GIF"), "GIF files are not accepted"),
    (_image_bytes("PNG", size=(8, 8)), "at least 16"),
    (_image_bytes("PNG")[:200], "not a readable image"),
])
def test_bad_uploads_are_refused_plainly(data, message):
    with pytest.raises(UploadRejected, match=message):
        validate_upload(data, max_bytes=10_000_000)


def test_upload_size_limit():
    data = _image_bytes("PNG", size=(256, 256))
    with pytest.raises(UploadRejected, match="the limit is"):
        validate_upload(data, max_bytes=len(data) - 1)
    assert validate_upload(data, max_bytes=len(data)).size == (256, 256)


def _thirds(width: int = 90, height: int = 30) -> Image.Image:
    """A wide image: red, green and blue thirds."""
    a = np.zeros((height, width, 3), np.uint8)
    for i in range(3):
        a[:, i * width // 3:(i + 1) * width // 3, i] = 255
    return Image.fromarray(a)


def test_whole_framing_pads_the_image_into_the_middle_of_a_square_of_the_fill_colour():
    square = np.asarray(framed_square(_thirds(), "whole", (0.5, 0.25, 0.0)))
    assert square.shape == (90, 90, 3)
    assert (square[:30] == (128, 64, 0)).all() and (square[60:] == (128, 64, 0)).all()  # bands above and below
    assert (square[30:60] == np.asarray(_thirds())).all()  # the image, every third of it
    tall = np.asarray(framed_square(_thirds().rotate(90, expand=True), "whole", (0, 0, 0)))
    assert tall.shape == (90, 90, 3) and (tall[:, :30] == 0).all() and (tall[:, 60:] == 0).all()
    image = _thirds()
    assert framed_square(image, "centre", (0, 0, 0)) is image  # cut to its centre square by preprocessing
    with pytest.raises(UploadRejected, match="Unknown framing 'stretch'; use one of: centre, whole"):
        framed_square(image, "stretch", (0, 0, 0))


def test_the_framing_note_says_what_part_was_seen():
    assert "centre 30×30 square of this 90×30 image" in framing_note(_thirds(), "centre")
    assert "the edges were not seen" in framing_note(_thirds(), "centre")
    assert "whole 90×30 image, padded" in framing_note(_thirds(), "whole")
    assert framing_note(_thirds(30, 30), "centre") is None and framing_note(_thirds(30, 30), "whole") is None


def test_explain_page_refuses_bad_files_and_visitors(web_client, web, seeded):
    page = web_client.get("/explain")
    r = web_client.post("/explain", data={"csrf_token": csrf_from(page.text), "run_id": str(seeded.run.run_id)},
                        files={"image": ("notes.txt", b"hello", "text/plain")})
    assert r.status_code == 422 and "not a readable image" in r.text
    # The seeded run has no weights on disk: a clear message, not a crash.
    r = web_client.post("/explain", data={"csrf_token": csrf_from(page.text), "run_id": str(seeded.run.run_id)},
                        files={"image": ("a.png", _image_bytes(), "image/png")})
    assert r.status_code == 422 and "are not at" in r.text
    web_client.cookies.clear()
    r = web_client.post("/api/explain", data={"run_id": "1"}, files={"image": ("a.png", _image_bytes(), "image/png")})
    assert r.status_code == 401


@pytest.mark.slow
def test_explain_with_a_real_backbone(web_client, seeded, tmp_path):
    """mobilenet_v2 (weights ship with torchvision's package cache) on a 7x7 run grid, plus a
    model whose activations were imported (no backbone): explained and reported respectively."""
    torch.manual_seed(0)
    backbone = create_backbone("mobilenet_v2")
    usae = USAE(USAEConfig(model_dims={"mnet": backbone.dim, "imported": 8}, n_concepts=16, k=4, encoder="linear")).eval()
    run_dir = tmp_path / "run"
    usae.save_pretrained(run_dir)
    with session_factory(seeded.settings.db_url)() as session:
        run = Run(name="explained", run_dir=str(run_dir), store_dir="", n_concepts=16, k=4, status="mined")
        run.models = [RunModel(position=0, name="mnet", family="torchvision", dim=backbone.dim, grid_h=7, grid_w=7,
                               info={"registry_name": "mobilenet_v2"}),
                      RunModel(position=1, name="imported", family="", dim=8, grid_h=7, grid_w=7, info={})]
        session.add(run)
        session.flush()
        session.add_all(Concept(run_id=run.id, index=i, label=f"concept {i} <b>" if i % 2 else "") for i in range(16))
        session.commit()
        run_id = run.id

    image = _image_bytes("JPEG", size=(300, 200), seed=3)
    headers = {"X-CSRF-Token": web_client.get("/api/auth/csrf").json()["csrf_token"]}
    r = web_client.post("/api/explain", data={"run_id": str(run_id)}, headers=headers,
                        files={"image": ("photo.jpg", image, "image/jpeg")})
    assert r.status_code == 200, r.text
    body = {m["model"]: m for m in r.json()["models"]}
    assert "does not record which backbone" in body["imported"]["error"] and body["imported"]["concepts"] == []

    # Reference: the same image through the backbone, the extractor's grid resampling and the USAE.
    with torch.no_grad():
        pil = Image.open(io.BytesIO(image)).convert("RGB")
        tokens = resample_grid(backbone(backbone.preprocess(pil)[None]), backbone.native_grid, (7, 7))[0]
        codes = usae.dense_codes(*usae.encode(usae.standardize(tokens, "mnet"), "mnet"))
    peak = codes.max(0).values
    expected = [int(i) for i in torch.argsort(peak, descending=True)[:5] if peak[i] > 0]
    concepts = body["mnet"]["concepts"]
    assert [c["index"] for c in concepts] == expected
    assert [c["max_activation"] for c in concepts] == pytest.approx([float(peak[i]) for i in expected], rel=1e-4)
    heat = Image.open(io.BytesIO(base64.b64decode(concepts[0]["heatmap_data_url"].split(",", 1)[1])))
    assert heat.size == (320, 320)

    # A wide image, whole: the backbone sees it padded with its own mean colour (zeros once normalised).
    wide = io.BytesIO()
    _thirds(270, 90).save(wide, format="PNG")
    r = web_client.post("/api/explain", data={"run_id": str(run_id), "framing": "whole"}, headers=headers,
                        files={"image": ("wide.png", wide.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    padded = framed_square(_thirds(270, 90), "whole", backbone.mean)
    x = backbone.preprocess(padded)
    assert x[:, :70].abs().max() < 0.02 and x[:, -70:].abs().max() < 0.02  # the bands carry no signal
    with torch.no_grad():
        tokens = resample_grid(backbone(x[None]), backbone.native_grid, (7, 7))[0]
        peak = usae.dense_codes(*usae.encode(usae.standardize(tokens, "mnet"), "mnet")).max(0).values
    whole = r.json()
    assert whole["framing"] == "whole" and "whole 270×90 image, padded" in whole["framing_note"]
    assert [c["index"] for c in {m["model"]: m for m in whole["models"]}["mnet"]["concepts"]] == \
        [int(i) for i in torch.argsort(peak, descending=True)[:5] if peak[i] > 0]
    view = np.asarray(Image.open(io.BytesIO(base64.b64decode(whole["image_data_url"].split(",", 1)[1]))), np.float32)
    assert view[160, 300, 2] > 200 and view[160, 300, 0] < 60  # the right third (blue) is in the view
    r = web_client.post("/api/explain", data={"run_id": str(run_id), "framing": "stretch"}, headers=headers,
                        files={"image": ("wide.png", wide.getvalue(), "image/png")})
    assert r.status_code == 422 and "Unknown framing" in r.json()["detail"]

    page = web_client.get("/explain")
    r = web_client.post("/explain", data={"csrf_token": csrf_from(page.text), "run_id": str(run_id)},
                        files={"image": ("photo <1>.jpg", image, "image/jpeg")})
    assert "centre 200×200 square of this 300×200 image" in r.text  # what the models saw, said
    assert 'name="framing" value="centre" checked' in r.text
    assert r.status_code == 200 and r.text.count('class="explain-item"') == len(concepts)
    assert '<p class="small" id="explained-file" style="margin-bottom: 0.4rem">photo &lt;1&gt;.jpg</p>' in r.text
    assert "<b>" not in r.text.split('id="explanation"')[1]  # labels escaped


def test_request_bodies_are_limited_before_they_are_read(seeded):
    """Forms and JSON may have 1 MiB, uploads USAE_MAX_UPLOAD_BYTES more; beyond that 413 as the
    bytes arrive (declared or streamed), before a sign-in body fills the server's memory or an
    upload its disk."""
    from fastapi.testclient import TestClient

    from app.main import FORM_BODY_LIMIT, create_app

    settings = seeded.settings.model_copy(update={"max_upload_bytes": 100_000})
    with TestClient(create_app(settings), base_url="http://testserver") as client:
        token = client.get("/api/auth/csrf").json()["csrf_token"]
        big_name = {"username": "x" * (FORM_BODY_LIMIT + 1), "password": "wrong-guess"}
        r = client.post("/api/auth/login", json=big_name, headers={"X-CSRF-Token": token})
        assert r.status_code == 413
        streamed = (b"x" * 65536 for _ in range(FORM_BODY_LIMIT // 65536 + 2))  # no Content-Length
        r = client.post("/api/auth/login", content=streamed,
                        headers={"X-CSRF-Token": token, "Content-Type": "application/json"})
        assert r.status_code == 413
        sign_in_as(client, seeded, "alice")
        page = client.get("/explain")
        assert page.status_code == 200 and 'id="explain-form"' in page.text
        upload = {"csrf_token": csrf_from(page.text), "run_id": str(seeded.run.run_id)}
        r = client.post("/explain", data=upload, files={"image": ("a.png", b"\0" * (100_000 + FORM_BODY_LIMIT + 1))})
        assert r.status_code == 413
        # Within the body limit, the upload limit itself still answers in words.
        r = client.post("/explain", data=upload, files={"image": ("a.png", _image_bytes("PNG", size=(400, 400)))})
        assert r.status_code == 422 and "the limit is" in r.text


def test_explain_and_cam_load_the_weights_file_the_extraction_read(tmp_path):
    """A store extracted with `--weights PATH` records that file; the explorer's backbones (the
    explain page, CAM jobs) load it, where they rebuilt the backbone by name and got the hub's
    weights (or, offline, none), and a file that has gone is named."""
    from safetensors.torch import save_file

    from app.services.explain import load_backbone
    from usae_core.extract import extract_store

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.open(io.BytesIO(_image_bytes(seed=i))).save(folder / f"{i}.png")
    torch.manual_seed(0)
    save_file(create_backbone("timm:test_vit", random_init=True).model.state_dict(), tmp_path / "vit.safetensors")
    vit = create_backbone("timm:test_vit", weights=str(tmp_path / "vit.safetensors"))
    store = extract_store(folder, [vit], tmp_path / "store", device="cpu", num_workers=0, progress=False)
    info = store.model_info("test_vit")

    loaded = load_backbone("test_vit", info)
    assert not isinstance(loaded, str), loaded
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), vit.state_dict().values()))
    (tmp_path / "vit.safetensors").unlink()
    assert "vit.safetensors, which are no longer there" in load_backbone("test_vit", info)
