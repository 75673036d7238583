"""USAE module: sparse decoding equals the dense product, checkpoints round-trip by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from usae_core.config import USAEConfig
from usae_core.errors import UsaeError
from usae_core.model import USAE


def _model(encoder="mlp_bn"):
    torch.manual_seed(0)
    return USAE(USAEConfig(model_dims={"vit": 6, "cnn": 9}, n_concepts=20, k=4, encoder=encoder))


def test_sparse_decode_equals_dense_code_times_dictionary():
    model = _model().eval()
    x = torch.randn(13, 6)
    values, indices = model.encode(x, "vit")
    assert values.shape == indices.shape == (13, 4)
    assert (values >= 0).all()
    dense = model.dense_codes(values, indices)
    assert ((dense > 0).sum(1) <= 4).all()
    for target in ("vit", "cnn"):
        expected = dense.double() @ model.dictionary(target).double() + model.decoder_biases[model.index(target)].double()
        torch.testing.assert_close(model.decode(values, indices, target).double(), expected, rtol=1e-5, atol=1e-6)


def test_topk_keeps_the_largest_pre_codes():
    model = _model("linear")
    x = torch.randn(7, 6)
    pre = model.pre_codes(x, "vit")
    values, _ = model.encode(x, "vit")
    torch.testing.assert_close(values.sort(1).values, pre.topk(4, 1).values.sort(1).values)


@pytest.mark.parametrize("encoder", ["mlp_bn", "linear"])
def test_inference_encode_folds_batchnorm_like_the_plain_modules(encoder):
    """Under no_grad in eval mode, encode takes the fused path (BatchNorm folded into the TopK
    pass); it must pick the same code as TopK over the plain Linear + BatchNorm + ReLU modules."""
    model = _model(encoder)
    if encoder == "mlp_bn":  # non-trivial running statistics and affine parameters
        bn = model.encoders[0].bn
        with torch.no_grad():
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.1)
    model.eval()
    x = torch.randn(50, 6)
    plain = torch.topk(model.pre_codes(x, "vit").double(), 4, dim=1)
    with torch.no_grad():
        values, indices = model.encode(x, "vit")
    order = values.argsort(1, descending=True)
    torch.testing.assert_close(values.gather(1, order).double(), plain.values, rtol=1e-5, atol=1e-6)
    assert torch.equal(indices.gather(1, order), plain.indices)


def test_dictionary_rows_are_unit_norm_after_projection():
    model = _model()
    with torch.no_grad():
        model.dictionaries[0].mul_(3)
    model.normalize_dictionaries()
    for d in model.dictionaries:
        torch.testing.assert_close(d.norm(dim=1), torch.ones(20))


def test_checkpoint_round_trip_with_documented_names(tmp_path):
    model = _model()
    model.set_stats({"vit": {"mean": torch.arange(6.0), "scale": 2.0}, "cnn": {"mean": torch.ones(9), "scale": 0.5}})
    model.save_pretrained(tmp_path, extra_config={"note": "x"})
    tensors = load_file(str(tmp_path / "usae.safetensors"))
    assert tensors["decoder.cnn"].shape == (20, 9)
    assert tensors["encoder.vit.weight"].shape == (20, 6)
    assert {"encoder.vit.bias", "decoder_bias.vit", "norm.vit.mean", "norm.vit.scale", "encoder.cnn.bn.running_var"} <= set(tensors)
    assert json.loads((tmp_path / "config.json").read_text())["note"] == "x"
    loaded = USAE.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert not loaded.training  # ready for inference, without a call to .eval()
    x = torch.randn(5, 6)
    model.eval()
    torch.testing.assert_close(model(x, "vit", "cnn"), loaded(x, "vit", "cnn"))


def test_the_same_weights_save_to_the_same_bytes(tmp_path):
    """Saved runs can be compared byte for byte (a reproduced run, a cache key): safetensors
    writes several metadata entries in a random order, so the header holds one."""
    from safetensors import safe_open

    model = _model()
    saved = set()
    for i in range(6):
        model.save_pretrained(tmp_path / str(i))
        saved.add((tmp_path / str(i) / "usae.safetensors").read_bytes())
    assert len(saved) == 1
    with safe_open(str(tmp_path / "0" / "usae.safetensors"), "pt") as f:  # the header repeats config.json
        assert json.loads(f.metadata()["config"]) == json.loads((tmp_path / "0" / "config.json").read_text())


def test_loading_a_non_run_is_a_clear_error(tmp_path):
    with pytest.raises(UsaeError, match="not a USAE run"):
        USAE.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["config", "weights"])
def test_loading_a_damaged_run_is_a_clear_error(tmp_path, damage):
    _model().save_pretrained(tmp_path)
    if damage == "config":
        (tmp_path / "config.json").write_text("{not json")
    else:
        weights = tmp_path / "usae.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])  # cut short, as by a full disk
    with pytest.raises(UsaeError, match="damaged"):
        USAE.from_pretrained(tmp_path)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(UsaeError, match="not in this USAE"):
        _model().dictionary("dino")


def _with_running_stats(model: USAE) -> USAE:
    bn = model.encoders[0].bn
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return model


def test_concept_codes_of_raw_activations_of_any_shape():
    """Raw activations [images, tokens, dim] -> dense codes [images, tokens, n_concepts]: the
    float64 recomputation (standardise, Linear, BatchNorm with running statistics, ReLU, TopK),
    in train mode too, without moving the BatchNorm's statistics."""
    model = _with_running_stats(_model())
    model.set_stats({"vit": {"mean": torch.linspace(-1, 1, 6), "scale": 3.0}, "cnn": {"mean": torch.zeros(9), "scale": 1.0}})
    raw = torch.randn(2, 5, 6) * 3 + 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    codes = model.concept_codes(raw.numpy(), "vit")  # numpy is accepted as is
    assert codes.shape == (2, 5, 20) and codes.dtype == torch.float32
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    enc = model.encoders[0]
    x = (raw.double().reshape(-1, 6) - torch.linspace(-1, 1, 6).double()) / 3.0
    pre = x @ enc.linear.weight.double().T + enc.linear.bias.double()
    bn = enc.bn
    pre = (pre - bn.running_mean.double()) / torch.sqrt(bn.running_var.double() + bn.eps) * bn.weight.double() + bn.bias.double()
    top = pre.clamp_min(0).topk(4, dim=1)
    want = torch.zeros(10, 20, dtype=torch.float64).scatter_(1, top.indices, top.values).reshape(2, 5, 20)
    torch.testing.assert_close(codes.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(UsaeError, match=r"must end in its dimension 6, got shape \[2, 5, 9\]"):
        model.concept_codes(torch.zeros(2, 5, 9), "vit")


def test_encode_refuses_batched_images_instead_of_picking_tokens():
    """[images, tokens, dim] used to run: TopK over the token axis and codes of the wrong shape."""
    model = _model().eval()
    with torch.no_grad(), pytest.raises(UsaeError, match=r"tokens \[tokens, 6\].*got shape \[4, 7, 6\].*concept_codes"):
        model.encode(torch.zeros(4, 7, 6), "vit")
    with pytest.raises(UsaeError, match=r"got shape \[3, 9\]"):
        model.encode(torch.zeros(3, 9), "vit")  # another model's tokens
