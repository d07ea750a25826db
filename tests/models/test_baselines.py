"""The training baselines (baseline_vit, baseline_conv): any resolution, matched size, old weights."""

from __future__ import annotations

import copy
import importlib
from pathlib import Path

import pytest
import torch

from gspn.models.baselines import count_params, match_params
from gspn.recipes.classification import build_model
from tiny import TINY_CONV, TINY_VIT


def test_baselines_any_resolution_and_matched_size() -> None:
    for name, kw in (("baseline_vit", TINY_VIT), ("baseline_conv", TINY_CONV)):
        m = build_model(name, num_classes=7, in_chans=1, **kw).eval()
        for s in (16, 24):
            assert m(torch.randn(2, 1, s, s)).shape == (2, 7)
        assert m.default_cfg["num_classes"] == 7
    target = 200_000
    for name in ("baseline_vit", "baseline_conv"):
        kw = match_params(name, target, num_classes=10)
        n = count_params(build_model(name, num_classes=10, **kw))
        assert abs(n - target) / target < 0.15, (name, kw, n)


def _old_vit_baseline(
    num_classes: int, embed_dim: int, depth: int, heads: int, hidden: int, patch: int, grid: int
) -> torch.nn.Module:
    """The ViT baseline as it was before it became a VisionTransformer: the modules (hence the state-dict
    keys) of its ``nn.TransformerEncoderLayer`` era, with random values everywhere (norms included)."""
    layer = torch.nn.TransformerEncoderLayer(
        embed_dim, heads, dim_feedforward=hidden, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    old = torch.nn.Module()
    old.patch_embed = torch.nn.Conv2d(3, embed_dim, patch, stride=patch)
    old.pos_embed = torch.nn.Parameter(torch.zeros(1, embed_dim, grid, grid))
    old.blocks = torch.nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
    old.norm = torch.nn.LayerNorm(embed_dim)
    old.head = torch.nn.Linear(embed_dim, num_classes)
    with torch.no_grad():
        for t in old.parameters():
            t.copy_(torch.randn_like(t) * 0.3 + (1.0 if t.ndim == 1 and t.shape[0] == embed_dim else 0.0))
    return old


def _old_vit_baseline_forward(
    sd: dict[str, torch.Tensor], x: torch.Tensor, depth: int, heads: int, patch: int
) -> torch.Tensor:
    """The old ViT baseline's computation in plain torch, from its (old-key) state dict ``sd``: unpadded
    patchify, bilinear position resize, pre-norm blocks (LN eps 1e-5, exact GELU), LN, token mean, Linear."""
    import math

    import torch.nn.functional as F

    x = F.conv2d(x, sd["patch_embed.weight"], sd["patch_embed.bias"], stride=patch)
    pos = sd["pos_embed"]
    if pos.shape[-2:] != x.shape[-2:]:
        pos = F.interpolate(pos, size=x.shape[-2:], mode="bilinear", align_corners=False)
    t = (x + pos).flatten(2).transpose(1, 2)  # (B, N, D)
    d = t.shape[-1]
    for i in range(depth):
        q = f"blocks.layers.{i}."
        h = F.layer_norm(t, (d,), sd[q + "norm1.weight"], sd[q + "norm1.bias"], 1e-5)
        qkv = F.linear(h, sd[q + "self_attn.in_proj_weight"], sd[q + "self_attn.in_proj_bias"])
        qh, kh, vh = (z.unflatten(-1, (heads, d // heads)).transpose(1, 2) for z in qkv.chunk(3, dim=-1))
        a = torch.softmax(qh @ kh.transpose(-2, -1) / math.sqrt(d // heads), dim=-1) @ vh
        t = t + F.linear(
            a.transpose(1, 2).flatten(2), sd[q + "self_attn.out_proj.weight"], sd[q + "self_attn.out_proj.bias"]
        )
        h = F.layer_norm(t, (d,), sd[q + "norm2.weight"], sd[q + "norm2.bias"], 1e-5)
        h = F.linear(
            F.gelu(F.linear(h, sd[q + "linear1.weight"], sd[q + "linear1.bias"])),
            sd[q + "linear2.weight"],
            sd[q + "linear2.bias"],
        )
        t = t + h
    t = F.layer_norm(t, (d,), sd["norm.weight"], sd["norm.bias"], 1e-5)
    return F.linear(t.mean(dim=1), sd["head.weight"], sd["head.bias"])


def test_vit_baseline_is_a_vision_transformer_and_loads_old_weights(tmp_path: Path) -> None:
    """The ViT baseline is a configuration of ``VisionTransformer``; weights with the key names of its
    ``nn.TransformerEncoderLayer`` era load (``load_state_dict``, ``load_model``, ``create_model``) and give
    the old computation's outputs; it then writes VisionTransformer's key names."""
    import gspn.models
    import gspn.models.baselines as baselines
    from gspn.models import create_model, get_default_cfg, list_models, load_model, save_checkpoint
    from gspn.models.vit import TransformerBlock, VisionTransformer

    torch.manual_seed(0)
    # embed_dim 32 → 2 heads by the default rule; mlp_ratio 1.99 → hidden int(63.68) = 63 (round() would give 64)
    args = dict(num_classes=5, in_chans=3, embed_dim=32, depth=2, mlp_ratio=1.99, pos_grid=4, drop=0.0)
    old = _old_vit_baseline(5, 32, depth=2, heads=2, hidden=63, patch=4, grid=4)
    old_sd = {k: v.detach().clone() for k, v in old.state_dict().items()}
    assert "blocks.layers.1.self_attn.in_proj_weight" in old_sd and "head.weight" in old_sd
    xs = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 30, 27)]  # grid 4, 8, 7×6
    with torch.no_grad():  # the plain-torch reference is the old model's computation
        old.eval()
        for x in xs:
            t = old.patch_embed(x)
            t = t + torch.nn.functional.interpolate(old.pos_embed, size=t.shape[-2:], mode="bilinear")
            want = old.head(old.norm(old.blocks.train()(t.flatten(2).transpose(1, 2))).mean(dim=1))
            torch.testing.assert_close(_old_vit_baseline_forward(old_sd, x, 2, 2, 4), want, rtol=0, atol=1e-6)

    new = build_model("baseline_vit", **args)
    assert isinstance(new, baselines.ViTBaseline) and isinstance(new, VisionTransformer)
    assert all(type(b) is TransformerBlock for b in new.blocks) and new.blocks[0].attn.num_heads == 2
    assert new.blocks[0].mlp.fc1.out_features == 63 and new.pos_interp == "bilinear"
    new.load_state_dict(dict(old_sd))  # strict: every old key is renamed by the pre-hook
    assert "blocks.1.attn.qkv.weight" in new.state_dict()
    assert not any(k.startswith("blocks.layers.") or k in ("head.weight", "norm.weight") for k in new.state_dict())
    torch.testing.assert_close(
        new.state_dict()["blocks.1.attn.qkv.weight"], old_sd["blocks.layers.1.self_attn.in_proj_weight"], rtol=0, atol=0
    )
    for mode in (new.eval, new.train):  # drop=0.0: training mode computes the same
        mode()
        with torch.no_grad():
            for x in xs:
                torch.testing.assert_close(new(x), _old_vit_baseline_forward(old_sd, x, 2, 2, 4), rtol=0, atol=1e-6)
    # parameters in the old order, so an old last.pt's optimizer state (matched by position) resumes
    renames = baselines._old_key_names(2)
    assert [n for n, _ in new.named_parameters()] == [renames.get(n, n) for n, _ in old.named_parameters()]
    stepped = copy.deepcopy(old)  # an optimizer state written by the old layout
    opt_old = torch.optim.AdamW(stepped.parameters())
    for t in stepped.parameters():
        t.grad = torch.ones_like(t)
    opt_old.step()
    opt_new = torch.optim.AdamW(new.parameters())
    opt_new.load_state_dict(opt_old.state_dict())
    for p_new, (name, _) in zip(new.parameters(), old.named_parameters(), strict=True):
        assert opt_new.state[p_new]["exp_avg"].shape == p_new.shape, name
    new(xs[0]).sum().backward()
    opt_new.step()  # used to fail: "The size of tensor a (96) must match the size of tensor b (32)"
    new.load_state_dict(dict(old_sd))
    assert baselines.count_params is count_params is importlib.import_module("gspn.models").count_params
    assert count_params(new) == sum(p.numel() for p in old.parameters())

    # a weight file written with the old names (as save_checkpoint wrote them) loads by load_model and create_model
    old.default_cfg, old.model_args = {"architecture": "baseline_vit"}, dict(args)
    path = save_checkpoint(old, tmp_path / "old_vit.safetensors")
    for loaded in (load_model(path), create_model("baseline_vit", pretrained=path, **args)):
        assert isinstance(loaded, baselines.ViTBaseline) and loaded.default_cfg["architecture"] == "baseline_vit"
        with torch.no_grad():
            for x in xs:
                torch.testing.assert_close(
                    loaded.eval()(x), _old_vit_baseline_forward(old_sd, x, 2, 2, 4), rtol=0, atol=1e-6
                )
    fresh = build_model("baseline_vit", **args)
    gspn.models.load_checkpoint(fresh, path)  # strict, through upgrade_state_dict
    want0 = _old_vit_baseline_forward(old_sd, xs[0], 2, 2, 4)
    torch.testing.assert_close(fresh.eval()(xs[0]), want0, rtol=0, atol=1e-6)
    with pytest.warns(UserWarning, match=r"'head\.fc'.*5 classes.*3 classes"):  # the head rule sees the new names
        rehead = load_model(path, num_classes=3)
    torch.testing.assert_close(rehead.blocks[1].mlp.fc2.weight, old_sd["blocks.layers.1.linear2.weight"])
    # and what it writes now has VisionTransformer's names, and loads back
    new_path = save_checkpoint(load_model(path), tmp_path / "new_vit.safetensors")
    assert "blocks.0.attn.qkv.weight" in gspn.models.checkpoint.load_file(str(new_path))
    torch.testing.assert_close(load_model(new_path).eval()(xs[1]), new.eval()(xs[1]), rtol=0, atol=0)
    # the registry entry and task tag are unchanged
    assert "baseline_vit" in list_models(task="classification")
    assert get_default_cfg("baseline_vit")["task"] == "classification"


def test_vit_baseline_dropout_placement() -> None:
    """``drop`` is where ``nn.TransformerEncoderLayer`` put it: attention weights, after the attention's
    output projection, after the MLP activation and after its output; no stochastic depth, none before the
    classifier."""
    m = build_model("baseline_vit", num_classes=3, embed_dim=32, depth=2, drop=0.25)
    for b in m.blocks:
        assert b.attn.attn_drop == 0.25 and b.attn.proj_drop.p == 0.25
        assert b.mlp.drop.p == 0.25 and b.mlp_drop.p == 0.25
        assert isinstance(b.drop_path, torch.nn.Identity)
    assert m.head.drop.p == 0.0
    assert all(b.mlp_drop.p == 0.0 for b in build_model("vit_nano", num_classes=10).blocks)  # vit_* defaults: none
