"""Tests of gspn.models: reference sizes, registry, API, checkpoints and complexity counting."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import gspn
from gspn.models import (
    GSPNClassifier,
    complexity,
    count_params,
    create_model,
    get_default_cfg,
    list_models,
    load_checkpoint,
    load_model,
    read_metadata,
    save_checkpoint,
)

# Released reference configurations at 224², 1000 classes (research notes §4.3).
REFERENCE = {
    "gspn_t": (31_510_268, 5.30),
    "gspn_s": (50_773_346, 12.03),
    "gspn_b": (93_061_108, 15.86),
}


def _meta(name: str, **kwargs) -> GSPNClassifier:
    with torch.device("meta"):
        return create_model(name, **kwargs)


@pytest.fixture(scope="module")
def nano() -> GSPNClassifier:
    torch.manual_seed(0)
    return create_model("gspn_nano", num_classes=5).eval()


# --- reference sizes -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_params_and_macs(name):
    params, gmacs = REFERENCE[name]
    model = _meta(name)
    assert count_params(model) == params  # exact; the requirement is 1 %
    res = complexity(model, (3, 224, 224))
    assert res["params"] == params
    assert abs(res["gmacs"] - gmacs) / gmacs < 0.01, res["gmacs"]  # the requirement is 5 %
    assert res["macs"] == res["conv_linear_macs"] + res["scan_macs"]
    assert res["scan_macs"] == sum(n for op, n in res["flops_by_op"].items() if op.startswith("gspn."))


def test_global_block_layout_matches_the_reference_rule():
    t, s, b = (_meta(n).chunk_sizes for n in ("gspn_t", "gspn_s", "gspn_b"))
    count_global = lambda chunks: [sum(c is None for c in stage) for stage in chunks]  # noqa: E731
    assert count_global(t) == [0, 0, 7, 2]
    assert count_global(s) == [0, 0, 0, 2]
    assert count_global(b) == [0, 0, 8, 4]
    assert [i for i, c in enumerate(b[2]) if c is None] == [0, 1, 2, 3, 4, 5, 6, 13]
    assert all(c == 2 for stage in b for c in stage if c is not None)
    model = _meta("gspn_b")
    gspn_modules = [blk.mixer.gspn for blk in model.stages[2].blocks]
    assert [m.chunk_size for m in gspn_modules] == b[2]


# --- registry --------------------------------------------------------------------------------------


def test_registry():
    assert {"gspn_t", "gspn_s", "gspn_b", "gspn_micro", "gspn_nano"} <= set(list_models())
    assert gspn.list_models("gspn_?") == ["gspn_b", "gspn_s", "gspn_t"]
    with pytest.raises(ValueError, match="gspn_t"):
        create_model("gspn_tt")
    cfg = get_default_cfg("gspn_t")
    assert cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 1000 and len(cfg["mean"]) == 3
    model = _meta("gspn_s", num_classes=10, drop_path_rate=0.4)
    assert model.num_classes == 10 and model.default_cfg["architecture"] == "gspn_s"
    assert model.default_cfg["num_classes"] == 10


def test_pretrained_true_raises_clearly():
    with pytest.raises(RuntimeError, match="no pretrained weights"):
        create_model("gspn_nano", pretrained=True)
    with pytest.raises(FileNotFoundError):
        create_model("gspn_nano", pretrained="does/not/exist.safetensors")


# --- forward / API ---------------------------------------------------------------------------------


def test_forward_any_resolution_and_api(nano):
    x = torch.randn(2, 3, 37, 50)
    feats = nano.forward_features(x)
    assert feats.shape == (2, nano.num_features, math.ceil(37 / 32), math.ceil(50 / 32))
    assert nano.forward_head(feats, pre_logits=True).shape == (2, nano.num_features)
    logits = nano(x)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    torch.testing.assert_close(nano.forward_head(feats), logits)
    assert [f["num_chs"] for f in nano.feature_info] == nano.embed_dims
    final, inter = nano.forward_intermediates(x)
    torch.testing.assert_close(final, feats)
    assert [t.shape[1] for t in inter] == nano.embed_dims
    assert [t.shape[-2:] for t in inter] == [(10, 13), (5, 7), (3, 4), (2, 2)]
    assert [t.shape[1] for t in nano.forward_intermediates(x, indices=[0, -1], intermediates_only=True)] == [
        nano.embed_dims[0],
        nano.embed_dims[-1],
    ]
    last_two = nano.forward_intermediates(x, indices=2, intermediates_only=True)
    assert [t.shape[1] for t in last_two] == nano.embed_dims[2:]
    for bad in (5, [4], [-5]):  # one rule for every model (gspn.models._features.feature_indices)
        with pytest.raises(IndexError, match="stage"):
            nano.forward_intermediates(x, indices=bad)


@pytest.mark.parametrize("hw", [(1, 1), (5, 200), (33, 7)], ids=str)
def test_extreme_resolutions(nano, hw):
    with torch.no_grad():
        out = nano(torch.randn(1, 3, *hw))
    assert out.shape == (1, 5) and torch.isfinite(out).all()


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = create_model("gspn_nano", num_classes=3, drop_path_rate=0.1)
    model(torch.randn(2, 3, 24, 40)).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_reset_classifier():
    model = create_model("gspn_nano", num_classes=4)
    model.reset_classifier(0)
    x = torch.randn(1, 3, 32, 32)
    assert model(x).shape == (1, model.num_features)
    model.reset_classifier(7)
    assert model(x).shape == (1, 7) and model.default_cfg["num_classes"] == 7


def test_grad_checkpointing_matches(nano):
    x = torch.randn(1, 3, 32, 32)
    ref = nano(x)
    nano.set_grad_checkpointing(True)
    try:
        with torch.enable_grad():
            torch.testing.assert_close(nano(x), ref)
    finally:
        nano.set_grad_checkpointing(False)


def test_compact_gates_shrink_the_model():
    full, compact = _meta("gspn_t"), _meta("gspn_t", gate_group_size=8)
    assert count_params(compact) < count_params(full)
    out = create_model("gspn_nano", gate_group_size=4, num_classes=2)(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 2)
    with pytest.raises(ValueError, match="gate_group_size"):
        _meta("gspn_nano", gate_group_size=5)


# --- checkpoints -----------------------------------------------------------------------------------


def test_safetensors_round_trip(nano, tmp_path):
    path = save_checkpoint(nano, tmp_path / "nano.safetensors", metadata={"note": "test"})
    meta = read_metadata(path)
    assert meta["gspn.architecture"] == "gspn_nano" and meta["note"] == "test"
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        ref = nano(x)
        torch.testing.assert_close(load_model(path).eval()(x), ref, rtol=0, atol=0)
        from_path = create_model("gspn_nano", pretrained=str(path), num_classes=5).eval()
        torch.testing.assert_close(from_path(x), ref)
        fresh = create_model("gspn_nano", num_classes=5).eval()
        load_checkpoint(fresh, path)
        torch.testing.assert_close(fresh(x), ref, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="head.fc"):
        rehead = load_model(path, num_classes=9)
    assert rehead.num_classes == 9
    torch.testing.assert_close(rehead.stem.conv1.weight, nano.stem.conv1.weight)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temporary file


# --- classifier mismatches (timm's rule) ------------------------------------------------------------


def _headed_nano_ckpt(tmp_path, num_classes=5):
    torch.manual_seed(1)
    model = create_model("gspn_nano", num_classes=num_classes).eval()
    return model, save_checkpoint(model, tmp_path / f"nano{num_classes}.safetensors")


def _assert_body_loaded(model, source):
    ref = {k: v for k, v in source.state_dict().items() if not k.startswith("head.fc.")}
    got = model.state_dict()
    for k, v in ref.items():
        assert torch.equal(got[k], v), k


HEADLESS_ENTRY_POINTS = {
    "create_model": lambda path: create_model("gspn_nano", pretrained=path, num_classes=0),
    "load_model": lambda path: load_model(path, num_classes=0),
    "reset_classifier+load_checkpoint": lambda path: _reset_then_load(path, 0),
}


def _reset_then_load(path, num_classes):
    model = create_model("gspn_nano", num_classes=5)
    model.reset_classifier(num_classes)
    load_checkpoint(model, path)
    return model


@pytest.mark.parametrize("entry", list(HEADLESS_ENTRY_POINTS))
def test_headless_model_loads_a_headed_checkpoint(entry, tmp_path):
    source, path = _headed_nano_ckpt(tmp_path)
    with pytest.warns(UserWarning, match=r"head\.fc.*5 classes.*headless.*no classifier"):
        model = HEADLESS_ENTRY_POINTS[entry](str(path)).eval()
    assert model.num_classes == 0 and isinstance(model.get_classifier(), torch.nn.Identity)
    _assert_body_loaded(model, source)
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        feats = model(x)
        torch.testing.assert_close(feats, source.forward_head(source.forward_features(x), pre_logits=True))
    assert feats.shape == (2, source.num_features)


@pytest.mark.parametrize("entry", ["create_model", "load_model", "reset_classifier+load_checkpoint"])
@pytest.mark.parametrize(("ckpt_classes", "model_classes"), [(5, 9), (0, 7)], ids=["other-classes", "ckpt-headless"])
def test_classifier_mismatch_keeps_the_models_fresh_head(entry, ckpt_classes, model_classes, tmp_path):
    source, path = _headed_nano_ckpt(tmp_path, ckpt_classes)
    torch.manual_seed(2)
    fresh = create_model("gspn_nano", num_classes=model_classes)
    fresh_head = {k: v.clone() for k, v in fresh.head.fc.state_dict().items()}
    expected = f"{ckpt_classes} classes" if ckpt_classes else "headless"
    message = rf"head\.fc.*\({expected}\).*\({model_classes} classes\).*freshly initialised"
    with pytest.warns(UserWarning, match=message):
        if entry == "create_model":
            torch.manual_seed(2)
            model = create_model("gspn_nano", pretrained=str(path), num_classes=model_classes)
        elif entry == "load_model":
            torch.manual_seed(2)
            model = load_model(path, num_classes=model_classes)
        else:
            model = fresh
            load_checkpoint(model, path)
    assert model.num_classes == model_classes
    _assert_body_loaded(model, source)
    for k, v in model.head.fc.state_dict().items():  # the model's own initialisation, not the checkpoint's
        assert torch.equal(v, fresh_head[k]), k
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, model_classes)


def test_matching_head_loads_without_warning(tmp_path):
    source, path = _headed_nano_ckpt(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_model(path)
    assert torch.equal(model.head.fc.weight, source.head.fc.weight)


def test_keys_outside_the_classifier_still_load_strictly(tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = _headed_nano_ckpt(tmp_path)
    state = load_file(str(path))
    broken = dict(state)
    del broken["stem.conv1.weight"]
    broken["stem.extra"] = torch.zeros(1)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    model = create_model("gspn_nano", num_classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    message = r"missing key\(s\) \['stem\.conv1\.weight'\].*unexpected key\(s\) \['stem\.extra'\]"
    with pytest.raises(RuntimeError, match=message):
        load_checkpoint(model, tmp_path / "broken.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded
    # strict=False ignores them; a head mismatch is an error only when asked for
    load_checkpoint(create_model("gspn_nano", num_classes=5), tmp_path / "broken.safetensors", strict=False)
    with pytest.raises(RuntimeError, match=r"head\.fc"):
        load_checkpoint(create_model("gspn_nano", num_classes=0), path, skip_mismatched_head=False)
    shape = dict(state, **{"stem.conv1.bias": torch.zeros(3)})
    save_file(shape, str(tmp_path / "shape.safetensors"))
    with pytest.raises(RuntimeError, match=r"stem\.conv1\.bias"):
        load_checkpoint(create_model("gspn_nano", num_classes=5), tmp_path / "shape.safetensors")


def test_reset_classifier_takes_timms_signature():
    model = create_model("gspn_nano", num_classes=4)
    model.reset_classifier(3, global_pool="avg")
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    model.reset_classifier(num_classes=0, global_pool=None)
    assert model.num_classes == 0 and model.model_args["num_classes"] == 0
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="max")


@pytest.mark.parametrize("name", ["baseline_vit", "baseline_conv"])
def test_baseline_heads_follow_the_same_rule(name, tmp_path):
    from gspn.recipes.classification import build_model

    torch.manual_seed(0)
    source = build_model(name, num_classes=5, in_chans=3).eval()
    path = save_checkpoint(source, tmp_path / "b.safetensors")
    x = torch.randn(2, 3, 32, 32)
    headless = build_model(name, num_classes=0, in_chans=3).eval()
    assert headless.num_classes == 0 and isinstance(headless.get_classifier(), torch.nn.Identity)
    with pytest.warns(UserWarning, match=r"'head(\.fc)?'.*5 classes.*headless"):
        load_checkpoint(headless, path)
    with torch.no_grad():
        source.reset_classifier(0)  # the same body without its head: pooled features
        torch.testing.assert_close(headless(x), source(x))
    assert headless(x).shape == (2, source.num_features)
    other = build_model(name, num_classes=3, in_chans=3)
    with pytest.warns(UserWarning, match=r"'head(\.fc)?'.*5 classes.*3 classes"):
        load_checkpoint(other, path)
    headless_path = save_checkpoint(source, tmp_path / "b0.safetensors")
    with pytest.warns(UserWarning, match=r"'head(\.fc)?'.*headless.*3 classes"):
        load_checkpoint(other, headless_path)
    other.reset_classifier(7, global_pool="avg")
    assert other(x).shape == (2, 7) and other.default_cfg["num_classes"] == 7
    with pytest.raises(ValueError, match="global_pool"):
        other.reset_classifier(7, global_pool="max")


# --- complexity ------------------------------------------------------------------------------------


def test_complexity_counts_scan_with_the_papers_formula(nano):
    h, w = 64, 40
    res = complexity(nano, (3, h, w))
    assert res == complexity(_meta("gspn_nano", num_classes=5), (3, h, w))  # meta and real agree
    expected_scan = expected_fused = 0
    for i, stage in enumerate(nano.stages):
        sh, sw = math.ceil(h / 2 ** (i + 2)), math.ceil(w / 2 ** (i + 2))
        for blk in stage.blocks:
            c, layer = blk.mixer.d_inner, blk.mixer.gspn
            expected_scan += 2 * gspn.ops.scan_flops(1, c, sh, sw) + 2 * gspn.ops.scan_flops(1, c, sw, sh)
            expected_fused += gspn.ops.mix_flops(1, c, sh, sw, layer.d_state, layer.gate_channels)
    assert res["scan_macs"] == expected_fused == res["flops_by_op"]["gspn.gspn_mix"]
    dense = sum(v for k, v in res["flops_by_op"].items() if k.startswith("aten."))
    assert res["conv_linear_macs"] * 2 == dense
    assert nano.training is False
    # The unfused layer counts its up-projections and merger as convolutions/matmuls: same total.
    unfused_model = copy.deepcopy(nano)
    for layer in unfused_model.modules():
        if isinstance(layer, gspn.nn.GSPN2d):
            layer.fused = False
    unfused = complexity(unfused_model, (3, h, w))
    assert unfused["scan_macs"] == expected_scan == unfused["flops_by_op"]["gspn.line_scan_4d"]
    assert unfused["macs"] == res["macs"]


def test_complexity_table_cli(capsys):
    from gspn.commands import main

    main(["flops", "--model", "gspn_t", "gspn_nano", "--image-size", "64", "96"])
    out = capsys.readouterr().out
    assert "gspn_t" in out and "31,510,268" in out and "64x96" in out


def test_complexity_counts_fused_attention_layers():
    # nn.TransformerEncoderLayer takes a fused fast path in eval mode that FlopCounterMode cannot see
    from gspn.models.complexity import complexity

    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    macs = complexity(layer, input_size=(10, 32))["macs"]
    projections = 10 * (4 * 32 * 32 + 2 * 32 * 64)  # q, k, v, out + two MLP linears
    # (torch's FlopCounterMode has no formula for the CPU flash-attention kernel, so the 2·T²·D of
    # the attention itself may be missing on CPU)
    assert projections <= macs <= projections + 2 * 10 * 10 * 32
