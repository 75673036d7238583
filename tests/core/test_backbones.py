"""Backbone adapters: the real offline defaults, and torchvision / timm / transformers on tiny configs.

Every adapter is checked against the wrapped library's own forward pass, so a wrong layer, a
kept CLS token or a shuffled grid shows up as a numeric mismatch."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from usae_core.backbones import create_backbone, default_backbones, list_backbones
from usae_core.backbones.base import pil_to_uint8
from usae_core.errors import UsaeError
from usae_core.images import square_view

CAT_CLASSES = set(range(281, 286))  # ImageNet tabby, tiger cat, Persian, Siamese, Egyptian cat
STORE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("USAE_OFFLINE", "1")


@pytest.fixture(scope="module")
def defaults():
    return {name: create_backbone(name) for name in default_backbones()}


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.chelsea())


def images(n: int = 2, size: int = 224, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- registry
def test_registry_lists_defaults_with_weights_on_disk():
    entries = {e.name: e for e in list_backbones()}
    assert {"torchvision:*", "timm:*", "hf:*"} <= set(entries)
    names = default_backbones()
    assert len(names) >= 3 and {"mobilenet_v2", "efficientnet_lite0", "hed_vgg16"} <= set(names)
    for name in names:
        assert entries[name].find_weights() is not None, name
    with pytest.raises(UsaeError, match="unknown backbone 'nonsense'"):
        create_backbone("nonsense")


def test_defaults_have_the_promised_geometry(defaults):
    dims = {"mobilenet_v2": 96, "efficientnet_lite0": 112, "hed_vgg16": 512}
    for name, b in defaults.items():
        assert b.native_grid == (14, 14) and b.dim == dims[name], name
        assert STORE_NAME.match(b.store_name) and b.store_name == name
        assert "package" in b.weights_source
        assert not any(m.training for m in b.modules()), name  # wrapper included: one compiled graph
        assert list_backbones()[[e.name for e in list_backbones()].index(name)].default_layer == b.layer
        assert b(images(1, b.input_size)).shape == (1, 196, b.dim)


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0"])
def test_classifiers_see_a_cat_in_chelsea(defaults, chelsea, name):
    b = defaults[name]
    with torch.no_grad():
        top5 = b.model(b.preprocess(chelsea)[None]).topk(5).indices[0].tolist()
    assert CAT_CLASSES & set(top5), top5


def test_mobilenet_tokens_equal_torchvision_features(defaults, chelsea):
    """Reference: an untouched torchvision MobileNetV2 with the package's weight file."""
    import torchvision

    from usae_core.backbones.offline import MOBILENET, package_file

    ref = torchvision.models.mobilenet_v2()
    ref.load_state_dict(torch.load(package_file(MOBILENET), weights_only=True))
    ref.eval()
    b = defaults["mobilenet_v2"]
    x = b.preprocess(chelsea)[None]
    with torch.no_grad():
        want = ref.features[:14](x).flatten(2).transpose(1, 2)
        got = b(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_preprocess_is_the_normalised_square_view(defaults, chelsea):
    b = defaults["efficientnet_lite0"]
    view = np.asarray(square_view(chelsea, 224, b.interpolation), np.float64) / 255
    want = (view - 0.5) / 0.5  # TF-trained: [-1, 1]
    got = b.preprocess(chelsea).permute(1, 2, 0).double().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_hed_weights_detect_edges(defaults):
    """The HED side outputs, fused, fire on the border of a bright square and not inside it."""
    b = defaults["hed_vgg16"]
    img = np.full((160, 160, 3), 30, np.uint8)
    img[40:120, 40:120] = 220
    x = b.normalize(pil_to_uint8(Image.fromarray(img))[None])
    with torch.no_grad():
        edges = b.model(x)[0, 0].numpy()
    border = np.concatenate([edges[38:42, 50:110].ravel(), edges[50:110, 118:122].ravel()])
    assert border.mean() > 0.5 and edges[60:100, 60:100].mean() < 0.05 and edges[:20, :20].mean() < 0.05


def test_missing_package_weights_say_where_and_how(monkeypatch, tmp_path):
    from usae_core.backbones import offline

    monkeypatch.setattr(offline, "package_file", lambda spec: None)
    with pytest.raises(UsaeError) as err:
        create_backbone("mobilenet_v2")
    msg = str(err.value)
    assert "mobilenet_v2" in msg and "mobilenet_v2-b0353104.pth" in msg and "--weights mobilenet_v2=PATH" in msg
    assert "\n" not in msg
    with pytest.raises(UsaeError, match="--weights hed_vgg16=PATH"):
        create_backbone("hed_vgg16")
    with pytest.raises(UsaeError, match=re.escape(str(tmp_path / "none.pth"))):
        create_backbone("mobilenet_v2", weights=str(tmp_path / "none.pth"))


def test_local_weight_file_overrides_the_package(monkeypatch, tmp_path):
    from usae_core.backbones import offline

    local = tmp_path / "lite0.pth"
    shutil.copy(offline.package_file(offline.EFFNET_LITE0), local)
    monkeypatch.setattr(offline, "package_file", lambda spec: None)
    b = create_backbone("efficientnet_lite0", weights=str(local))
    assert b.weights_source == str(local.resolve()) and b.dim == 112


def test_random_init_only_when_asked():
    b = create_backbone("hed_vgg16", random_init=True)
    assert b.weights_source == "random-init"
    with pytest.raises(UsaeError, match="either weights or random_init"):
        create_backbone("hed_vgg16", random_init=True, weights="x.h5")


def test_other_layers_change_the_store_name_and_grid():
    b = create_backbone("mobilenet_v2", layer="features.17")
    assert b.native_grid == (7, 7) and b.dim == 320 and b.store_name == "mobilenet_v2-features.17"
    # The error names the backbone and the real layers to pick from.
    with pytest.raises(UsaeError, match=r"backbone 'mobilenet_v2' has no layer 'features.99'; the layers under "
                                        r"features are features.0, features.1, features.2, \.\.\., "
                                        r"features.16, features.17, features.18$"):
        create_backbone("mobilenet_v2", layer="features.99")
    with pytest.raises(UsaeError, match="no layer 'featurs.3'; the layers under the model are features, classifier$"):
        create_backbone("mobilenet_v2", layer="featurs.3")
    with pytest.raises(UsaeError, match="no CLS token"):
        create_backbone("hed_vgg16", keep_cls=True, random_init=True)


# ----------------------------------------------------------------------------- torchvision
def test_torchvision_missing_weights_names_the_cache_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UsaeError) as err:
        create_backbone("torchvision:resnet18")
    msg = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in msg
    assert "--weights torchvision:resnet18=PATH" in msg


def test_torchvision_resnet_from_a_local_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet18().eval()
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    b = create_backbone("torchvision:resnet18", weights=str(tmp_path / "r18.pth"))
    assert b.layer == "layer3" and b.native_grid == (14, 14) and b.dim == 256
    x = images()
    with torch.no_grad():
        h = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        want = ref.layer3(ref.layer2(ref.layer1(h))).flatten(2).transpose(1, 2)
        torch.testing.assert_close(b(x), want, atol=1e-4, rtol=1e-4)


def test_torchvision_vit_drops_cls():
    """The ViT path of the adapter, on a one-layer torchvision VisionTransformer."""
    from torchvision.models import VisionTransformer

    from usae_core.backbones.torchvision import TorchvisionBackbone

    torch.manual_seed(0)
    tiny = VisionTransformer(image_size=224, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64)
    b = TorchvisionBackbone(name="torchvision:vit_b_16", arch="vit_b_16", model=tiny, layer=None,
                            weights_source="random-init")
    assert b.native_grid == (14, 14) and b.dim == 32 and b.num_prefix_tokens == 1 and b.layer == "encoder"
    x = images(1)
    with torch.no_grad():
        tokens = tiny._process_input(x)
        full = tiny.encoder(torch.cat([tiny.class_token.expand(1, -1, -1), tokens], 1))
        torch.testing.assert_close(b(x), full[:, 1:])


# ----------------------------------------------------------------------------- timm
@pytest.mark.parametrize("model_name, prefix, grid", [
    ("vit_small_patch14_dinov2", 1, (16, 16)),  # 224 / 14: the paper's 16x16 DINOv2 grid
    ("vit_small_patch14_reg4_dinov2", 5, (16, 16)),  # CLS + 4 registers
    ("vit_base_patch16_siglip_224", 0, (14, 14)),  # SigLIP has no CLS token
    ("vit_base_patch16_224", 1, (14, 14)),
])
def test_timm_vits_drop_prefix_tokens(model_name, prefix, grid):
    torch.manual_seed(0)
    b = create_backbone(f"timm:{model_name}", random_init=True, model_kwargs=TINY_VIT)
    assert (b.native_grid, b.dim, b.num_prefix_tokens, b.family) == (grid, 32, prefix, "timm")
    assert not any(m.training for m in b.modules())
    x = images()
    with torch.no_grad():
        full = b.model.forward_features(x)
        assert full.shape[1] == prefix + grid[0] * grid[1]
        torch.testing.assert_close(b(x), full[:, prefix:])
    if prefix:
        keep = create_backbone(f"timm:{model_name}", random_init=True, model_kwargs=TINY_VIT, keep_cls=True)
        keep.load_state_dict(b.state_dict())
        with torch.no_grad():
            out = keep(x)
        torch.testing.assert_close(out[:, 0], full[:, 0])
        torch.testing.assert_close(out[:, 1:], full[:, prefix:])
    else:
        with pytest.raises(UsaeError, match="no CLS token"):
            create_backbone(f"timm:{model_name}", random_init=True, model_kwargs=TINY_VIT, keep_cls=True)


def test_random_init_is_drawn_from_its_seed_and_leaves_the_global_generator_alone():
    def weights(**kw):
        b = create_backbone("timm:vit_small_patch14_dinov2", random_init=True, model_kwargs=TINY_VIT, **kw)
        return torch.cat([p.flatten() for p in b.state_dict().values() if p.is_floating_point()])

    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = weights()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(weights(), first)  # the same name and seed: the same weights
    torch.manual_seed(7)  # the global seed plays no part
    assert torch.equal(weights(seed=0), first)
    other = weights(seed=1)
    assert other.shape == first.shape and not torch.equal(other, first)


def test_timm_intermediate_block_and_convnext():
    torch.manual_seed(0)
    b = create_backbone("timm:vit_base_patch16_224", random_init=True, model_kwargs=TINY_VIT, layer="blocks.0")
    x = images()
    with torch.no_grad():
        m = b.model
        want = m.blocks[0](m.norm_pre(m._pos_embed(m.patch_embed(x))))[:, 1:]
        torch.testing.assert_close(b(x), want)
    c = create_backbone("timm:convnext_atto", random_init=True)
    assert c.native_grid == (7, 7) and c.dim == 320
    with torch.no_grad():
        torch.testing.assert_close(c(x), c.model.forward_features(x).flatten(2).transpose(1, 2))


def test_timm_local_weights_and_missing_hub_weights(tmp_path, monkeypatch):
    import timm

    torch.manual_seed(1)
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=224, **TINY_VIT)
    from safetensors.torch import save_file

    save_file(ref.state_dict(), tmp_path / "model.safetensors")
    b = create_backbone("timm:vit_small_patch14_dinov2", weights=str(tmp_path), model_kwargs=TINY_VIT)
    assert b.weights_source == str((tmp_path / "model.safetensors").resolve())
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(b(x), ref.eval().forward_features(x)[:, 1:])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UsaeError, match=r"hub id timm/vit_small_patch14_dinov2\.lvd142m.*--weights"):
        create_backbone("timm:vit_small_patch14_dinov2", model_kwargs=TINY_VIT)


def test_a_whole_pickled_model_is_refused_with_what_to_save_instead(tmp_path):
    """A file holding a pickled module, not a state dict, is not unpickled (that can run code);
    the error says to save its state_dict() instead of torch's weights_only=False advice."""
    from usae_core.backbones.base import load_state_dict_file

    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pth")
    with pytest.raises(UsaeError, match=r"holds pickled Python objects.*state_dict\(\)") as refused:
        load_state_dict_file(tmp_path / "whole.pth", "timm:vit_small_patch14_dinov2")
    assert "weights_only" not in str(refused.value)
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "state.pth")
    assert set(load_state_dict_file(tmp_path / "state.pth", "x")) == {"weight", "bias"}


# ----------------------------------------------------------------------------- transformers
def _tiny_hf(kind: str, tmp_path):
    import transformers as T

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model = {
        "dinov2": lambda: T.Dinov2Model(T.Dinov2Config(patch_size=14, image_size=56, **small)),
        "dinov2_reg": lambda: T.Dinov2WithRegistersModel(
            T.Dinov2WithRegistersConfig(patch_size=14, image_size=56, num_register_tokens=4, **small)),
        "siglip": lambda: T.SiglipVisionModel(T.SiglipVisionConfig(patch_size=16, image_size=64, **small)),
        "clip": lambda: T.CLIPVisionModel(T.CLIPVisionConfig(patch_size=16, image_size=64, **small)),
        "vit": lambda: T.ViTModel(T.ViTConfig(patch_size=16, image_size=64, **small), add_pooling_layer=False),
    }[kind]()
    path = tmp_path / kind
    model.save_pretrained(path)
    return model.eval(), path


@pytest.mark.parametrize("kind, prefix, grid, size", [
    ("dinov2", 1, (16, 16), 224),  # DINOv2 runs at 224 like the paper (position embeddings interpolated)
    ("dinov2_reg", 5, (16, 16), 224),
    ("siglip", 0, (4, 4), 64),
    ("clip", 1, (4, 4), 64),
    ("vit", 1, (4, 4), 64),
])
def test_transformers_towers(kind, prefix, grid, size, tmp_path):
    torch.manual_seed(0)
    ref, path = _tiny_hf(kind, tmp_path)
    b = create_backbone(f"hf:{path}")
    assert (b.native_grid, b.dim, b.num_prefix_tokens, b.input_size) == (grid, 32, prefix, size)
    assert b.family == "transformers" and b.store_name == kind
    assert not any(m.training for m in b.modules())
    x = images(2, size)
    with torch.no_grad():
        out = ref(pixel_values=x, output_hidden_states=True)
        torch.testing.assert_close(b(x), out.last_hidden_state[:, prefix:])
        layer1 = create_backbone(f"hf:{path}", layer="1")
        torch.testing.assert_close(layer1(x), out.hidden_states[1][:, prefix:])
    assert layer1.store_name == f"{kind}-1"


def test_transformers_reads_preprocessor_config_and_reports_missing(tmp_path):
    _, path = _tiny_hf("clip", tmp_path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 48, "width": 48}, "do_center_crop": True, "image_mean": [0.1, 0.2, 0.3],
        "image_std": [0.5, 0.5, 0.5], "resample": 2}))
    b = create_backbone(f"hf:{path}")
    assert (b.input_size, b.mean, b.interpolation, b.native_grid) == (48, (0.1, 0.2, 0.3), "bilinear", (3, 3))
    with pytest.raises(UsaeError, match=r"no weights for backbone 'hf:facebook/dinov2-small'.*--weights"):
        create_backbone("hf:facebook/dinov2-small")


def test_transformers_refuses_partly_random_weights(tmp_path):
    _, path = _tiny_hf("vit", tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 3  # the file holds weights for 2 layers only
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsaeError, match="lacks .* weights of a ViTModel"):
        create_backbone(f"hf:{path}")


# ----------------------------------------------------------------------------- a store's backbones
def test_store_backbones_rebuild_the_backbones_a_store_was_extracted_with(tmp_path):
    """A store names its models by alias (`test_vit-blocks.0`), which create_backbone does not
    know; store_backbones rebuilds each from the manifest (registry name, layer, local weights
    file), and the rebuilt backbones give the store's own rows again."""
    from safetensors.torch import save_file

    from usae_core.backbones import store_backbones
    from usae_core.extract import extract_store, resample_grid
    from usae_core.images import load_image
    from usae_core.store import import_activations

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (90 + 20 * i, 120, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    torch.manual_seed(0)
    save_file(create_backbone("timm:test_vit", random_init=True).model.state_dict(), tmp_path / "vit.safetensors")
    vit = create_backbone("timm:test_vit", weights=str(tmp_path / "vit.safetensors"), layer="blocks.0")
    store = extract_store(folder, [vit, "mobilenet_v2"], tmp_path / "store", layers={"mobilenet_v2": "features.6"},
                          dtype="float32", device="cpu", num_workers=0, progress=False)
    assert store.model_names == ["test_vit-blocks.0", "mobilenet_v2-features.6"]
    with pytest.raises(UsaeError, match="unknown backbone 'test_vit-blocks.0'"):
        create_backbone("test_vit-blocks.0")

    rebuilt = store_backbones(store)
    assert list(rebuilt) == store.model_names
    for name, backbone in rebuilt.items():
        assert backbone.layer == store.model_info(name)["layer"] and not backbone.training
        with torch.no_grad():
            tokens = backbone(backbone.preprocess(load_image(folder / store.image_ids[2]))[None])
        tokens = resample_grid(tokens, backbone.native_grid, store.grid)[0].numpy()
        np.testing.assert_allclose(tokens, store.image_tokens(name, 2), rtol=1e-4, atol=1e-4 * np.abs(tokens).max())
    assert list(store_backbones(store, ["mobilenet_v2-features.6"])) == ["mobilenet_v2-features.6"]

    # The recorded weights file moved: refused (other weights would give other tokens), unless told where.
    (tmp_path / "vit.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(UsaeError, match=r"'test_vit-blocks.0' was extracted with the weights .*vit\.safetensors, "
                                        r"which are no longer there; pass weights="):
        store_backbones(store)
    moved = store_backbones(store, weights={"test_vit-blocks.0": str(tmp_path / "moved.safetensors")})
    for a, b in zip(moved["test_vit-blocks.0"].state_dict().values(), vit.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(UsaeError, match=r"the store has no model vit \(it has test_vit-blocks.0, mobilenet_v2-features.6\)"):
        store_backbones(store, weights={"vit": "x"})

    # Random weights were never saved; imported activations name no backbone.
    torch.manual_seed(0)
    random = extract_store(folder, ["timm:test_vit"], tmp_path / "random", random_init=True, device="cpu",
                           num_workers=0, progress=False)
    with pytest.raises(UsaeError, match="'test_vit' was extracted with random weights"):
        store_backbones(random)
    own = import_activations(tmp_path / "own", {"a": np.zeros((2, 4, 3), np.float32)}, grid=(2, 2))
    with pytest.raises(UsaeError, match="records no backbone for 'a' .*imported"):
        store_backbones(own)


def test_store_backbones_refuse_a_backbone_that_is_not_the_stores(tmp_path):
    """A backbone built with options a store does not record (timm's model_kwargs) is rebuilt
    by name at another width: named, not returned."""
    from usae_core.backbones import store_backbones
    from usae_core.extract import extract_store

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "a.png")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    narrow = create_backbone("timm:test_vit", random_init=True, model_kwargs={"embed_dim": 32, "num_heads": 2})
    save_file(narrow.model.state_dict(), tmp_path / "narrow.safetensors")
    narrow = create_backbone("timm:test_vit", weights=str(tmp_path / "narrow.safetensors"),
                             model_kwargs={"embed_dim": 32, "num_heads": 2})
    store = extract_store(folder, [narrow], tmp_path / "store", device="cpu", num_workers=0, progress=False)
    assert store.dims == {"test_vit": 32}
    with pytest.raises(UsaeError, match=r"cannot load .*narrow\.safetensors"):  # timm's default width, 64
        store_backbones(store)


@pytest.mark.parametrize("name, suggested", [
    ("resnet50", "did you mean torchvision:resnet50 or timm:resnet50?"),  # a family's model without its prefix
    ("vit_base_patch16_224", "did you mean timm:vit_base_patch16_224?"),
    ("mobilenetv2", "did you mean mobilenet_v2 or "),  # the embedded backbone before a family's look-alike
    ("hed_vgg", "did you mean hed_vgg16?"),
    ("timm:vit_small_patch14_dino", "did you mean vit_small_patch14_dinov2 or "),  # timm's own typo
    ("torchvision:resnet5", "did you mean resnet50 or "),
])
def test_a_mistyped_backbone_name_gets_the_closest_names(name, suggested):
    with pytest.raises(UsaeError) as caught:
        create_backbone(name, random_init=True)
    assert suggested in str(caught.value)


def test_a_name_like_nothing_gets_no_suggestion():
    with pytest.raises(UsaeError) as caught:
        create_backbone("zzz", random_init=True)
    assert "did you mean" not in str(caught.value) and "known: efficientnet_lite0" in str(caught.value)


@pytest.mark.parametrize("recorded", ["/elsewhere/.cache/torch/hub/checkpoints/mobilenet_v2-7ebf99e0.pth",
                                      "/opt/venv/lib/python3.12/site-packages/weights/mobilenet_v2.pth"])
def test_a_cache_or_package_weights_path_of_another_machine_is_found_again_by_name(recorded):
    """A store extracted on another machine (or before a container was rebuilt) records that
    machine's hub-cache or package path; the backbone is rebuilt by name from this machine's,
    where a user's own weights file that is gone is refused (test above)."""
    from usae_core.backbones.registry import recorded_backbone

    info = {"registry_name": "mobilenet_v2", "layer": "features.13", "weights": recorded, "dim": 96,
            "native_grid": [14, 14]}
    rebuilt = recorded_backbone("mobilenet_v2", info)
    reference = create_backbone("mobilenet_v2")
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), reference.state_dict().values()))
