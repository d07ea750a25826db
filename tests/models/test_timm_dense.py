"""timm compatibility for dense prediction, for every registered classifier.

* ``global_pool=""`` (constructor or ``reset_classifier``): no pooling, as timm — the head's
  normalised final map (hierarchical and conv models) or token sequence (isotropic models).
* ``create_model(name, features_only=True, out_indices=...)``: the list of feature maps, with a
  timm ``FeatureInfo`` (``channels()``, ``reduction()``, ``module_name()``).

The registered configurations are checked on the meta device (shapes only, no memory or compute);
values are checked on every registered entrypoint with tiny size overrides.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import gspn
from gspn.models import FeatureInfo, FeatureListNet, create_model, load_model, save_checkpoint

CLASSIFIERS = gspn.list_models(task="classification")
ISOTROPIC = {n for n in CLASSIFIERS if n.startswith(("gspn_vit_", "vit_")) or n == "baseline_vit"}

# Tiny constructor overrides per family: the registered entrypoint (and its plumbing) at a test size.
_TINY = {
    "gspn": dict(embed_dim=8, depths=(1, 1, 2, 1), d_state=2),
    "gspn_vit": dict(embed_dim=16, depth=4, patch_size=4, propagation_channels=4, d_state=4, mlp_ratio=2.0),
    "vit": dict(embed_dim=16, depth=4, patch_size=4, num_heads=2, pos_grid=4, mlp_ratio=2.0),
    "baseline_vit": dict(embed_dim=16, depth=4, patch_size=4),
    "baseline_conv": dict(width=8, depths=(1, 2, 1)),
}


def _family(name: str) -> str:
    if name.startswith("baseline_"):
        return name
    if name.startswith("gspn_vit_"):
        return "gspn_vit"
    return "vit" if name.startswith("vit_") else "gspn"


def _tiny(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, **{**_TINY[_family(name)], **kw}).eval()


def _grid(name: str, size: int, reduction: int) -> int:
    """Side of a feature map: the padded models round up, the ViT baseline's patch embedding crops."""
    return size // reduction if name == "baseline_vit" else math.ceil(size / reduction)


def test_every_registered_classifier_is_covered():
    families = {_family(n) for n in CLASSIFIERS}
    assert families == set(_TINY), families
    assert {"gspn_t", "gspn_vit_so400m", "vit_so400m", "baseline_conv"} <= set(CLASSIFIERS)


# --- the registered configurations, on the meta device -------------------------------------------


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_features_only_of_registered_config_matches_feature_info(name):
    """Default out_indices as timm, and channels / reductions / module names that describe the maps."""
    with torch.device("meta"):
        full = create_model(name)
        net = create_model(name, features_only=True)
        h, w = 224, 448  # divisible by every reduction (4 … 32, 14, 16)
        feats = net(torch.empty(2, 3, h, w))
    assert isinstance(net, FeatureListNet) and isinstance(net.feature_info, FeatureInfo)
    n = len(full.feature_info)
    expected = tuple(range(n - 3, n)) if name in ISOTROPIC else tuple(range(n))
    assert net.out_indices == expected == net.feature_info.out_indices
    assert len(net.feature_info) == n
    info = net.feature_info
    assert len(feats) == len(expected) == len(info.channels()) == len(info.reduction())
    for f, c, r in zip(feats, info.channels(), info.reduction(), strict=True):
        assert tuple(f.shape) == (2, c, h // r, w // r), (name, tuple(f.shape), c, r)
    assert info.channels() == [full.feature_info[i]["num_chs"] for i in expected]
    assert info.reduction() == [full.feature_info[i]["reduction"] for i in expected]
    modules = dict(full.named_modules())
    assert all(m in modules for m in info.module_name())
    if name in ISOTROPIC:
        assert set(info.reduction()) == {full.patch_size}
    else:
        assert info.reduction() == sorted(info.reduction()) and len(set(info.reduction())) == n
    assert net.default_cfg["architecture"] == name and net.pretrained_cfg is net.default_cfg


@pytest.mark.parametrize("name", ["gspn_t", "gspn_vit_small", "vit_base"])
def test_global_pool_empty_on_registered_config(name):
    with torch.device("meta"):
        model = create_model(name, global_pool="")
        out = model(torch.empty(2, 3, 224, 224))
        headless = create_model(name, num_classes=0, global_pool="")
        feats = headless(torch.empty(2, 3, 224, 224))
    side = 224 // model.feature_info[-1]["reduction"]
    if name in ISOTROPIC:  # the token sequence, as timm's ViT
        assert tuple(out.shape) == (2, side * side, 1000)
        assert tuple(feats.shape) == (2, side * side, model.num_features)
    else:  # the final map
        assert tuple(out.shape) == (2, 1000, side, side)
        assert tuple(feats.shape) == (2, model.num_features, side, side)
    assert model.global_pool == "" and model.model_args["global_pool"] == ""


# --- values, on every registered entrypoint at a tiny size ---------------------------------------


def _hooked_outputs(model: torch.nn.Module, names: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of the named modules in a forward of the unmodified classifier (how timm's hook
    extractor reads ``module_name()``), as ``(B, C, h, w)``."""
    modules = dict(model.named_modules())
    caught: dict[str, torch.Tensor] = {}
    handles = [
        modules[n].register_forward_hook(lambda _m, _i, out, n=n: caught.__setitem__(n, out.detach())) for n in names
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return [caught[n] for n in names]


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_features_equal_the_full_models_intermediate_maps(name):
    full = _tiny(name, num_classes=5)
    n = len(full.feature_info)
    x = torch.randn(2, 3, 20, 28)
    with torch.no_grad():
        final, all_maps = full.forward_intermediates(x)
    for out_indices in (None, (0, n - 1), [-2], 1):
        net = _tiny(name, num_classes=5, features_only=True, out_indices=out_indices)
        with torch.no_grad():
            feats = net(x)
        info = net.feature_info
        assert len(feats) == len(net.out_indices)
        for f, i, c, r in zip(feats, net.out_indices, info.channels(), info.reduction(), strict=True):
            assert tuple(f.shape) == (2, c, _grid(name, 20, r), _grid(name, 28, r)), (name, out_indices)
            torch.testing.assert_close(f, all_maps[i], rtol=1e-5, atol=1e-6)
        # the same maps as hooks on the named modules of the untouched classifier
        hooked = _hooked_outputs(full, info.module_name(), x)
        for f, h, c in zip(feats, hooked, info.channels(), strict=True):
            h = h if h.shape[1] == c else h.permute(0, 3, 1, 2)  # isotropic blocks run channels-last
            torch.testing.assert_close(f, h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(all_maps[-1], final)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_features_only_prunes_head_and_later_levels(name):
    """Only what the selected maps need is left, so every parameter gets a gradient (DDP's rule)."""
    net = _tiny(name, num_classes=5, features_only=True, out_indices=(0,)).train()
    keys = list(net.state_dict())
    assert all(k.startswith("model.") for k in keys)
    assert not any(k.startswith("model.head.") for k in keys)
    trunk = "blocks" if name in ISOTROPIC else "stages"
    kept = {k.split(".")[2] for k in keys if k.startswith(f"model.{trunk}.")}
    first = net.feature_info.module_name(0).split(".")[1]
    assert kept == {str(i) for i in range(int(first) + 1)}, kept
    feats = net(torch.randn(2, 3, 16, 16))
    sum(f.square().mean() for f in feats).backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_reset_classifier_without_pooling_returns_the_pre_pool_map(name):
    model = _tiny(name, num_classes=5)
    x = torch.randn(2, 3, 20, 28)
    with torch.no_grad():
        final = model.forward_features(x)
        pooled_logits = model(x)
        pre_pool = model.head.norm(final) if hasattr(model.head, "norm") else final
        fc = copy.deepcopy(model.get_classifier())
        model.reset_classifier(0, "")
        out = model(x)
        head_out = model.forward_head(final)
        pre_logits = model.forward_head(final, pre_logits=True)
    expected = pre_pool.flatten(2).transpose(1, 2) if name in ISOTROPIC else pre_pool  # tokens / map
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(head_out, expected)
    torch.testing.assert_close(pre_logits, expected)
    assert model.num_classes == 0 and model.global_pool == ""
    assert model.model_args["num_classes"] == 0 and model.model_args["global_pool"] == ""

    # global_pool="" with a classifier: the Linear at every position (its mean = the pooled logits)
    with torch.no_grad():
        model.reset_classifier(5)  # global_pool=None keeps "no pooling"
        model.get_classifier().load_state_dict(fc.state_dict())
        dense = model(x)
    position = 1 if name in ISOTROPIC else (2, 3)
    channels_last = expected if name in ISOTROPIC else expected.permute(0, 2, 3, 1)
    manual = fc(channels_last) if name in ISOTROPIC else fc(channels_last).permute(0, 3, 1, 2)
    torch.testing.assert_close(dense, manual)
    torch.testing.assert_close(dense.mean(dim=position), pooled_logits, rtol=1e-5, atol=1e-5)

    # back to timm's default pooling
    model.reset_classifier(5, "avg")
    model.get_classifier().load_state_dict(fc.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), pooled_logits)
    assert model.global_pool == "avg" and "global_pool" not in model.model_args


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_create_model_global_pool_empty(name):
    """``create_model(name, global_pool="")`` is the model ``reset_classifier(0, "")`` gives."""
    x = torch.randn(2, 3, 20, 28)
    reset = _tiny(name, num_classes=0)
    reset.reset_classifier(0, "")
    built = _tiny(name, num_classes=0, global_pool="")
    with torch.no_grad():
        torch.testing.assert_close(built(x), reset(x))
    assert built.global_pool == ""
    with pytest.raises(ValueError, match="global_pool"):
        _tiny(name, global_pool="max")
    with pytest.raises(ValueError, match="global_pool"):
        reset.reset_classifier(0, "token")


@pytest.mark.parametrize("name", ["gspn_nano", "gspn_vit_nano", "baseline_conv"])
def test_unpooled_model_and_features_round_trip_through_a_file(name, tmp_path):
    source = _tiny(name, num_classes=5)
    source.reset_classifier(0, "")
    path = save_checkpoint(source, tmp_path / "m.safetensors")
    x = torch.randn(1, 3, 16, 24)
    with torch.no_grad():
        torch.testing.assert_close(load_model(path).eval()(x), source(x))
        full = _tiny(name, num_classes=5)
        weights = save_checkpoint(full, tmp_path / "full.safetensors")
        tiny = _TINY[_family(name)]
        net = create_model(name, pretrained=str(weights), num_classes=5, features_only=True, **tiny).eval()
        _, maps = full.forward_intermediates(x)
        for f, i in zip(net(x), net.out_indices, strict=True):
            torch.testing.assert_close(f, maps[i])


# --- errors and the FeatureInfo API ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "bad", "valid"),
    [
        ("gspn_nano", (4,), "[-4, 4)"),
        ("gspn_nano", (0, -5), "[-4, 4)"),
        ("gspn_nano", 5, "[1, 4]"),
        ("gspn_nano", 0, "[1, 4]"),
        ("gspn_nano", (1, -3), "twice"),
        ("gspn_nano", (), "empty"),
        ("gspn_nano", (1.0,), "not an int"),
        ("gspn_vit_nano", (4,), "[-4, 4)"),
        ("vit_so400m", (27,), "[-27, 27)"),
        ("baseline_conv", (3,), "[-3, 3)"),
    ],
)
def test_invalid_out_indices_name_the_valid_range(name, bad, valid):
    with torch.device("meta"), pytest.raises(ValueError, match="out_indices") as info:
        create_model(name, features_only=True, out_indices=bad)
    assert valid in str(info.value)


def test_out_indices_needs_features_only_and_a_classifier():
    with pytest.raises(ValueError, match="features_only"):
        create_model("gspn_nano", out_indices=(0, 1))
    with torch.device("meta"), pytest.raises(ValueError, match=r"features_only.*classifier"):
        create_model("gspn_dit_micro", features_only=True)


def test_feature_info_api_as_timm():
    with torch.device("meta"):
        net = create_model("gspn_nano", features_only=True, out_indices=(-1, 1))
    info = net.feature_info
    assert info.out_indices == net.out_indices == (1, 3)  # sorted, non-negative: the output order
    assert info.channels() == [32, 128] and info.reduction() == [8, 32]
    assert info.module_name() == ["stages.1", "stages.3"]
    assert info.channels(0) == 16 and info.reduction([0, 2]) == [4, 16]  # idx ignores the selection
    assert len(info) == 4 and info[2]["module"] == "stages.2" and info[2]["index"] == 2
    assert info.get_dicts(keys=["num_chs"]) == [{"num_chs": 32}, {"num_chs": 128}]
    assert info.from_other(2).channels() == [64, 128]
    with torch.device("meta"):
        assert create_model("gspn_vit_nano", features_only=True, out_indices=2).out_indices == (2, 3)
        # fewer blocks than timm's default of 3: all of them
        assert create_model("vit_nano", depth=2, features_only=True).out_indices == (0, 1)
