"""The authors' checkpoints: safe reading, conversion, reference semantics, the hub, ``gspn convert``.

Checkpoints are laid out here from the documented facts of the reference code (NVlabs/GSPN):
key names, shapes, channel layouts, the pickled ``yacs`` config / ``argparse.Namespace`` — and the
reference forward passes are re-written in this file from the same facts, independently of the
library (plain torch, a Python loop for the scan), to check that converted models compute them.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gspn
from gspn._pickle import CheckpointFormatError, UnsafeCheckpointError, load_torch_archive
from gspn.models import create_model, load_model, read_metadata
from gspn.models._reference_keys import DIRECTION_SLOT
from gspn.models.reference_checkpoints import convert_reference_state, fit_state_dict

# --- fake yacs (the classifier checkpoint pickles a yacs.config.CfgNode) ---------------------------


class CfgNode(dict):
    """Pickles like yacs' CfgNode: a dict subclass whose instance dict holds flags and a set."""

    def __init__(self, init: dict | None = None) -> None:
        super().__init__(init or {})
        self.__dict__["__immutable__"] = False
        self.__dict__["__deprecated_keys__"] = set()
        self.__dict__["__new_allowed__"] = False


CfgNode.__module__ = "yacs.config"


@pytest.fixture
def fake_yacs(monkeypatch):
    yacs, config = types.ModuleType("yacs"), types.ModuleType("yacs.config")
    config.CfgNode = CfgNode
    yacs.config = config
    monkeypatch.setitem(sys.modules, "yacs", yacs)
    monkeypatch.setitem(sys.modules, "yacs.config", config)


# --- reference layouts (names and shapes from the facts) ------------------------------------------


def ref_classifier_shapes(
    embed_dim, depths, d_state, num_classes=1000, in_chans=3, expand=1.5, mlp_ratio=4.0, kernel=7
):
    """name → shape of a reference ``VSSM`` state dict (classification, GSPN core v1)."""
    c = embed_dim
    s = {
        "patch_embed.0.weight": (c // 2, in_chans, 3, 3),
        "patch_embed.0.bias": (c // 2,),
        "patch_embed.2.weight": (c // 2,),
        "patch_embed.2.bias": (c // 2,),
        "patch_embed.5.weight": (c, c // 2, 3, 3),
        "patch_embed.5.bias": (c,),
        "patch_embed.7.weight": (c,),
        "patch_embed.7.bias": (c,),
    }
    dims = [c * 2**i for i in range(len(depths))]
    for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
        di, hid = round(expand * dim), round(mlp_ratio * dim)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            s |= {
                p + "norm.weight": (dim,),
                p + "norm.bias": (dim,),
                p + "op.in_proj.weight": (di, dim),
                p + "op.conv2d.weight": (di, 1, kernel, kernel),
                p + "op.x_conv_down.weight": (d_state, di, 1, 1),
                p + "op.w_conv_up.weight": (12 * di, d_state, 1, 1),
                p + "op.l_conv_up.weight": (4 * di, d_state, 1, 1),
                p + "op.u_conv_up.weight": (4 * di, d_state, 1, 1),
                p + "op.d_conv.weight": (4 * di, d_state, 1, 1),
                p + "op.m_conv.weight": (1, 4, 1, 1),
                p + "op.out_norm.weight": (di,),
                p + "op.out_norm.bias": (di,),
                p + "op.grn.gamma": (1, di, 1, 1),
                p + "op.grn.beta": (1, di, 1, 1),
                p + "op.out_proj.weight": (dim, di),
                p + "norm2.weight": (dim,),
                p + "norm2.bias": (dim,),
                p + "mlp.fc1.weight": (hid, dim),
                p + "mlp.fc1.bias": (hid,),
                p + "mlp.fc2.weight": (dim, hid),
                p + "mlp.fc2.bias": (dim,),
            }
        if i < len(depths) - 1:
            s |= {
                f"layers.{i}.downsample.1.weight": (dims[i + 1], dim, 3, 3),
                f"layers.{i}.downsample.1.bias": (dims[i + 1],),
                f"layers.{i}.downsample.3.weight": (dims[i + 1],),
                f"layers.{i}.downsample.3.bias": (dims[i + 1],),
            }
    s |= {"classifier.norm.weight": (dims[-1],), "classifier.norm.bias": (dims[-1],)}
    if num_classes:
        s |= {"classifier.head.weight": (num_classes, dims[-1]), "classifier.head.bias": (num_classes,)}
    return s


def ref_generator_shapes(
    hidden, depth, patch=2, in_ch=4, num_classes=1000, learn_sigma=True, kernel=7, in_proj_4d=True
):
    """name → shape of a reference generation ``GSPN`` state dict."""
    d, ds = hidden, hidden // 16
    out_ch = 2 * in_ch if learn_sigma else in_ch
    s = {
        "x_embedder.proj.weight": (d, in_ch, patch, patch),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (num_classes + 1, d),
        "norm_f.weight": (d,),
        "norm_f.bias": (d,),
        "final_layer.linear.weight": (patch * patch * out_ch, d),
        "final_layer.linear.bias": (patch * patch * out_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    half = range(depth // 2)
    names = [f"in_blocks.{i}" for i in half] + ["mid_block"] + [f"out_blocks.{i}" for i in half]
    for n in names:
        p = n + "."
        s |= {
            p + "norm.weight": (d,),
            p + "norm.bias": (d,),
            p + "in_proj.weight": (d, d, 1, 1) if in_proj_4d else (d, d),
            p + "conv2d.weight": (d, 1, kernel, kernel),
            p + "conv2d.bias": (d,),
            p + "x_conv_down.weight": (ds, d, 1, 1),
            p + "w_conv_up.weight": (12 * d, ds, 1, 1),
            p + "l_conv_up.weight": (4 * d, ds, 1, 1),
            p + "u_conv_up.weight": (4 * d, ds, 1, 1),
            p + "d_conv.weight": (4 * d, ds, 1, 1),
            p + "m_conv.weight": (1, 4, 1, 1),
            p + "out_conv.weight": (d, d, 1, 1),
            p + "out_dconv.weight": (d, 1, 3, 3),
            p + "out_proj.weight": (d, d),
        }
        if n.startswith("out_blocks"):
            s |= {p + "skip_linear.weight": (d, 2 * d), p + "skip_linear.bias": (d,)}
    return s


def random_state(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    out = collections.OrderedDict()
    for k, shape in shapes.items():
        if k.endswith(
            (
                "norm.weight",
                "norm2.weight",
                "norm_f.weight",
                "patch_embed.2.weight",
                "patch_embed.7.weight",
                "downsample.3.weight",
                "out_norm.weight",
            )
        ):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif "w_conv_up" in k or "l_conv_up" in k:
            t = torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            t = torch.randn(shape, generator=g) / math.sqrt(max(fan_in, 1)) * (1.0 if len(shape) > 1 else 0.3)
        out[k] = t
    return out


def save_classifier_ckpt(path, model_sd, ema_sd, img_size=None):
    cfg = CfgNode({"MODEL": CfgNode({"TYPE": "gspn", "NAME": "gspn_tiny"}), "DATA": CfgNode({})})
    if img_size:
        cfg["DATA"]["IMG_SIZE"] = img_size
    names = list(model_sd)
    optimizer = {
        "state": {
            i: {
                "step": torch.tensor(10.0),
                "exp_avg": torch.zeros_like(model_sd[n]),
                "exp_avg_sq": torch.zeros_like(model_sd[n]),
            }
            for i, n in enumerate(names)
        },
        "param_groups": [{"lr": 1e-3, "weight_decay": 0.05, "params": list(range(len(names)))}],
    }
    torch.save(
        {
            "model": model_sd,
            "model_ema": ema_sd,
            "optimizer": optimizer,
            "lr_scheduler": {"t_initial": 300, "base_values": [1e-3]},
            "max_accuracy": 83.0,
            "scaler": {
                "scale": 65536.0,
                "growth_factor": 2.0,
                "backoff_factor": 0.5,
                "growth_interval": 2000,
                "_growth_tracker": 0,
            },
            "epoch": 299,
            "config": cfg,
            "max_accuray_ema": 83.1,
        },
        path,
    )
    return path


def save_generator_ckpt(path, model_sd, ema_sd, image_size=256):
    args = argparse.Namespace(
        model="GSPN-XL/2",
        image_size=image_size,
        num_classes=1000,
        epochs=1400,
        global_batch_size=256,
        vae="ema",
        results_dir="results",
    )
    opt = {"state": {}, "param_groups": [{"lr": 1e-4, "weight_decay": 0, "params": []}]}
    torch.save({"model": model_sd, "ema": ema_sd, "opt": opt, "args": args}, path)
    return path


# --- the reference forward, written from the facts ------------------------------------------------


def ref_core(x, p, prefix, chunk):
    """The reference GSPN core on the dw-conv output ``x (B, D, H, W)``, H == W."""
    _, d, h, w = x.shape
    z = F.conv2d(x, p[prefix + "x_conv_down.weight"])
    ws = F.conv2d(z, p[prefix + "w_conv_up.weight"])  # channel g·4D + k·D + c
    lam = F.conv2d(z, p[prefix + "l_conv_up.weight"])  # channel k·D + c
    u = F.conv2d(z, p[prefix + "u_conv_up.weight"])
    dd = F.conv2d(z, p[prefix + "d_conv.weight"])
    frames = [x, x.transpose(2, 3), x.flip(-1), x.transpose(2, 3).flip(-1)]
    rows = torch.arange(h).view(1, 1, h)
    ys = []
    for k, xk in enumerate(frames):
        sl = slice(k * d, (k + 1) * d)
        g = [torch.sigmoid(ws[:, gi * 4 * d + k * d : gi * 4 * d + (k + 1) * d]) for gi in range(3)]
        total = g[0] * (rows.unsqueeze(-1) > 0) + g[1] + g[2] * (rows.unsqueeze(-1) < h - 1)
        total = total.clamp_min(1e-7)
        g = [gi / total for gi in g]
        hid = torch.zeros_like(xk)
        for j in range(w):
            prev = hid[..., j - 1] if j % chunk else torch.zeros_like(xk[..., 0])
            up = F.pad(prev, (1, 0))[..., :h]  # h[i-1, j-1]
            down = F.pad(prev, (0, 1))[..., 1:]  # h[i+1, j-1]
            hid[..., j] = lam[:, sl, :, j] * xk[..., j] + g[0][..., j] * up + g[1][..., j] * prev + g[2][..., j] * down
        ys.append(u[:, sl] * hid + dd[:, sl] * xk)
    m = p[prefix + "m_conv.weight"].view(4)
    return sum(m[k] * ys[k] for k in range(4))


def ln2d(x, p, prefix, eps=1e-5):
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], p[prefix + "weight"], p[prefix + "bias"], eps).permute(
        0, 3, 1, 2
    )


def lin2d(x, weight, bias=None):
    return F.conv2d(x, weight.reshape(weight.shape[0], -1, 1, 1), bias)


def ref_classifier_forward(p, x, depths, global_layers, feat_size, chunk=2):
    x = F.conv2d(x, p["patch_embed.0.weight"], p["patch_embed.0.bias"], stride=2, padding=1)
    x = F.gelu(ln2d(x, p, "patch_embed.2."))
    x = F.conv2d(x, p["patch_embed.5.weight"], p["patch_embed.5.bias"], stride=2, padding=1)
    x = ln2d(x, p, "patch_embed.7.")
    for i, depth in enumerate(depths):
        for dblk in range(depth):
            q = f"layers.{i}.blocks.{dblk}."
            glob = i in global_layers and (dblk < 7 or (dblk + 1) % 7 == 0)
            y = lin2d(ln2d(x, p, q + "norm."), p[q + "op.in_proj.weight"])
            y = F.conv2d(
                y, p[q + "op.conv2d.weight"], padding=p[q + "op.conv2d.weight"].shape[-1] // 2, groups=y.shape[1]
            )
            y = ref_core(y, p, q + "op.", feat_size[i] if glob else chunk)
            y = ln2d(y, p, q + "op.out_norm.")
            gx = torch.linalg.vector_norm(y, dim=(2, 3), keepdim=True)
            nx = gx / (gx.mean(dim=1, keepdim=True) + 1e-6)
            y = p[q + "op.grn.gamma"] * (y * nx) + p[q + "op.grn.beta"] + y
            x = x + lin2d(y, p[q + "op.out_proj.weight"])
            y = lin2d(ln2d(x, p, q + "norm2."), p[q + "mlp.fc1.weight"], p[q + "mlp.fc1.bias"])
            x = x + lin2d(F.gelu(y), p[q + "mlp.fc2.weight"], p[q + "mlp.fc2.bias"])
        if i < len(depths) - 1:
            x = F.conv2d(
                x, p[f"layers.{i}.downsample.1.weight"], p[f"layers.{i}.downsample.1.bias"], stride=2, padding=1
            )
            x = ln2d(x, p, f"layers.{i}.downsample.3.")
    x = ln2d(x, p, "classifier.norm.").mean(dim=(2, 3))
    return F.linear(x, p["classifier.head.weight"], p["classifier.head.bias"])


def ref_generator_forward(p, x, t, y, depth, patch=2):
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(x.dtype)
    c = F.linear(
        F.silu(F.linear(emb, p["t_embedder.mlp.0.weight"], p["t_embedder.mlp.0.bias"])),
        p["t_embedder.mlp.2.weight"],
        p["t_embedder.mlp.2.bias"],
    )
    c = c + p["y_embedder.embedding_table.weight"][y]
    hmap = F.conv2d(x, p["x_embedder.proj.weight"], p["x_embedder.proj.bias"], stride=patch)
    b, d, gh, gw = hmap.shape
    h = hmap.flatten(2).transpose(1, 2) + c[:, None]  # (B, N, D), row-major tokens

    def branch(q, tokens):
        z = tokens.transpose(1, 2).reshape(b, d, gh, gw)
        z = lin2d(z, p[q + "in_proj.weight"])
        z = F.conv2d(z, p[q + "conv2d.weight"], p[q + "conv2d.bias"], padding=3, groups=d)
        z = ref_core(z, p, q, 2)
        z = F.conv2d(z, p[q + "out_conv.weight"])
        z = F.conv2d(z, p[q + "out_dconv.weight"], padding=1, groups=d)
        z = z * F.relu(z)
        return F.linear(z.flatten(2).transpose(1, 2), p[q + "out_proj.weight"])

    def block(q, h, res, skip=None):
        if skip is not None:
            h = F.linear(torch.cat([h, skip], dim=-1), p[q + "skip_linear.weight"], p[q + "skip_linear.bias"])
        res = h if res is None else res + h
        return branch(q, F.layer_norm(res, (d,), p[q + "norm.weight"], p[q + "norm.bias"], 1e-5)), res

    res, skips = None, []
    for i in range(depth // 2):
        h, res = block(f"in_blocks.{i}.", h, res)
        skips.append(h)
    h, res = block("mid_block.", h, res)
    for i in range(depth // 2):
        h, res = block(f"out_blocks.{i}.", h, res, skips.pop())
    res = res + h
    out = F.layer_norm(res, (d,), p["norm_f.weight"], p["norm_f.bias"], 1e-5)
    shift, scale = F.linear(
        F.silu(c), p["final_layer.adaLN_modulation.1.weight"], p["final_layer.adaLN_modulation.1.bias"]
    ).chunk(2, dim=1)
    out = F.layer_norm(out, (d,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    out = F.linear(out, p["final_layer.linear.weight"], p["final_layer.linear.bias"])
    cout = out.shape[-1] // patch**2
    out = out.reshape(b, gh, gw, patch, patch, cout).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(b, cout, gh * patch, gw * patch)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# --- tiny configurations ----------------------------------------------------------------------------

CLS = dict(embed_dim=8, depths=(1, 1, 8, 1), d_state=4, global_stages=(2, 3), num_classes=5)
CLS_IMG = 64  # configured size: FEAT_SIZE = (16, 8, 4, 2)
GEN = dict(hidden_size=32, depth=4, d_state=2, in_channels=4, num_classes=10, input_size=8)


@pytest.fixture
def cls_ckpt(tmp_path, fake_yacs):
    shapes = ref_classifier_shapes(8, (1, 1, 8, 1), 4, num_classes=5)
    model_sd, ema_sd = random_state(shapes, 0), random_state(shapes, 1)
    path = save_classifier_ckpt(tmp_path / "ckpt_epoch_0.pth", model_sd, ema_sd, img_size=CLS_IMG)
    return path, model_sd, ema_sd


@pytest.fixture
def gen_ckpt(tmp_path):
    shapes = ref_generator_shapes(32, 4, in_ch=4, num_classes=10)
    model_sd, ema_sd = random_state(shapes, 2), random_state(shapes, 3)
    return save_generator_ckpt(tmp_path / "0000001.pt", model_sd, ema_sd, image_size=64), model_sd, ema_sd


# --- reading ----------------------------------------------------------------------------------------


def test_the_reference_file_is_refused_by_torch_load_but_read_through_the_allow_list(cls_ckpt, monkeypatch):
    path, model_sd, _ = cls_ckpt
    with pytest.raises(Exception, match=r"[Ww]eights only load failed"):
        torch.load(path)
    monkeypatch.delitem(sys.modules, "yacs.config")  # our reader needs no yacs
    monkeypatch.delitem(sys.modules, "yacs")
    obj = load_torch_archive(path)
    assert obj["config"].MODEL.TYPE == "gspn" and obj["config"].source_class == "yacs.config.CfgNode"
    assert obj["config"].__dict__["__deprecated_keys__"] == set()
    assert obj["max_accuray_ema"] == 83.1 and obj["epoch"] == 299
    assert all(torch.equal(obj["model"][k], v) for k, v in model_sd.items())


def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"
    torch.save({"model": {"patch_embed.0.weight": torch.zeros(1)}, "config": Evil()}, evil)
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system|nt\.system"):
        load_torch_archive(evil)
    with pytest.raises(UnsafeCheckpointError, match="could run arbitrary code"):
        create_model("gspn_nano", pretrained=evil)
    assert not marker.exists()


def test_truncated_file_is_a_clear_error(cls_ckpt, tmp_path):
    data = cls_ckpt[0].read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        create_model("gspn_nano", pretrained=cut, **CLS)


# --- conversion: layouts ------------------------------------------------------------------------------


def test_direction_and_gate_channel_layouts_are_converted():
    d = 3
    w = torch.arange(12 * d, dtype=torch.float32).view(12 * d, 1, 1, 1)  # value = reference row
    lam = torch.arange(4 * d, dtype=torch.float32).view(4 * d, 1, 1, 1)
    m = torch.tensor([10.0, 11.0, 12.0, 13.0]).view(1, 4, 1, 1)
    out = convert_reference_state(
        {"mid_block.w_conv_up.weight": w, "mid_block.l_conv_up.weight": lam, "mid_block.m_conv.weight": m}, "generator"
    )
    gw = out["mid_block.gspn.w_conv_up.weight"].view(4, 3, d)  # ours: [direction slot][gate][c]
    gl = out["mid_block.gspn.l_conv_up.weight"].view(4, d)
    for k in range(4):
        slot = DIRECTION_SLOT[k]
        assert gspn.ops.DIRECTIONS[slot] == ("lr", "tb", "rl", "bt")[k]
        for g in range(3):
            assert gw[slot, g].tolist() == [g * 4 * d + k * d + c for c in range(d)]
        assert gl[slot].tolist() == [k * d + c for c in range(d)]
        assert out["mid_block.gspn.m_conv.weight"].view(4)[slot] == 10 + k


@pytest.mark.parametrize(
    "name, cfg",
    [
        ("gspn_t", (96, (2, 2, 7, 2), 8)),
        ("gspn_s", (108, (5, 5, 10, 2), 16)),
        ("gspn_b", (120, (4, 4, 15, 4), 8)),
    ],
)
def test_every_tensor_of_the_full_classifiers_maps(name, cfg):
    ref = {k: torch.empty(s, device="meta") for k, s in ref_classifier_shapes(*cfg).items()}
    converted = convert_reference_state(ref, "classifier")
    with torch.device("meta"):
        model = create_model(name, semantics="reference")
    assert len(converted) == len(ref) == len(model.state_dict())
    fit_state_dict(model, converted)  # raises on any missing, extra or misshapen tensor


@pytest.mark.parametrize(
    "name, cfg", [("gspn_dit_b_2", (900, 30)), ("gspn_dit_l_2", (1200, 56)), ("gspn_dit_xl_2", (1500, 56))]
)
def test_every_tensor_of_the_full_generators_maps(name, cfg):
    ref = {k: torch.empty(s, device="meta") for k, s in ref_generator_shapes(*cfg).items()}
    converted = convert_reference_state(ref, "generator")
    with torch.device("meta"):
        model = create_model(name, semantics="reference")
    assert len(converted) == len(ref) == len(model.state_dict())
    fit_state_dict(model, converted)
    assert sum(math.prod(s) for s in ref_generator_shapes(*cfg).values()) == model.default_cfg["reference_params"]


# --- reference semantics -------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", [None, "model_ema"])
def test_classifier_computes_what_the_reference_computes(cls_ckpt, entry):
    path, model_sd, ema_sd = cls_ckpt
    model = create_model("gspn_nano", pretrained=path, pretrained_entry=entry, **CLS).eval()
    weights = ema_sd if entry else model_sd
    assert model.pretrained_cfg["checkpoint_entry"] == (entry or "model")
    assert model.pretrained_cfg["file"] == str(path) and model.pretrained_cfg["source"] == "file"
    assert model.model_args["global_chunk_sizes"] == (16, 8, 4, 2)  # from the file's config, IMG_SIZE 64
    g = torch.Generator().manual_seed(5)
    for size in (CLS_IMG, 96):  # 96: maps 24/12/6/3, chunks not multiples of the configured sizes
        x = torch.randn(2, 3, size, size, generator=g)
        with torch.no_grad():
            expected = ref_classifier_forward(weights, x, CLS["depths"], (2, 3), (16, 8, 4, 2))
            assert rel_err(model(x), expected) <= 1e-5
    aligned = create_model("gspn_nano", pretrained=path, semantics="aligned", **CLS).eval()
    with torch.no_grad():
        assert rel_err(aligned(x), expected) > 1e-2  # the semantics matter


def test_generator_computes_what_the_reference_computes(gen_ckpt):
    path, model_sd, ema_sd = gen_ckpt
    model = create_model("gspn_dit_tiny", pretrained=path, **GEN).eval()
    assert model.pretrained_cfg["checkpoint_entry"] == "ema"  # what the reference's sampler loads
    raw = create_model("gspn_dit_tiny", pretrained=path, pretrained_entry="model", **GEN).eval()
    g = torch.Generator().manual_seed(6)
    t, y = torch.tensor([3.0, 700.0]), torch.tensor([1, 10])  # 10 = the null class
    for size in (8, 10):  # token grids 4×4 and 5×5 (chunks of 2 left-aligned in every frame)
        x = torch.randn(2, 4, size, size, generator=g)
        with torch.no_grad():
            assert rel_err(model(x, t, y), ref_generator_forward(ema_sd, x, t, y, 4)) <= 1e-5
            assert rel_err(raw(x, t, y), ref_generator_forward(model_sd, x, t, y, 4)) <= 1e-5


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("chunk, size, gate_scale", [(2, 5, 1), (3, 7, 1), (None, 6, 1), (2, 6, 60)])
def test_gspn2d_scan_frames_on_every_backend(backend, chunk, size, gate_scale):
    """gate_scale=60 saturates the gates: the reference's sum clamp (1e-7) then matters."""
    if backend not in gspn.ops.available_backends():
        pytest.skip(f"{backend} backend unavailable")
    d, ds = 6, 3
    ref = random_state(
        {
            "x_conv_down.weight": (ds, d, 1, 1),
            "w_conv_up.weight": (12 * d, ds, 1, 1),
            "l_conv_up.weight": (4 * d, ds, 1, 1),
            "u_conv_up.weight": (4 * d, ds, 1, 1),
            "d_conv.weight": (4 * d, ds, 1, 1),
            "m_conv.weight": (1, 4, 1, 1),
        },
        7,
    )
    ref["w_conv_up.weight"] = ref["w_conv_up.weight"] * gate_scale
    layer = gspn.nn.GSPN2d(d, d_state=ds, chunk_size=chunk, merge_frame="scan", backend=backend)
    ours = convert_reference_state({f"mid_block.{k}": v for k, v in ref.items()}, "generator")
    layer.load_state_dict({k.removeprefix("mid_block.gspn."): v for k, v in ours.items()})
    x = torch.randn(2, d, size, size, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert rel_err(layer(x), ref_core(x, ref, "", chunk or size)) <= 1e-5


def test_scan_frame_merge_needs_a_square_map(cls_ckpt):
    model = create_model("gspn_nano", pretrained=cls_ckpt[0], **CLS)
    with pytest.raises(ValueError, match="square"):
        model(torch.randn(1, 3, 64, 96))


# --- bad input --------------------------------------------------------------------------------------


def test_wrong_kind_of_model_is_named(cls_ckpt, gen_ckpt):
    with pytest.raises(ValueError, match="classifier checkpoint but gspn_dit_tiny is a generator"):
        create_model("gspn_dit_tiny", pretrained=cls_ckpt[0])
    with pytest.raises(ValueError, match="generator checkpoint but gspn_nano is a classifier"):
        create_model("gspn_nano", pretrained=gen_ckpt[0])


def test_tiny_into_base_names_what_does_not_fit(tmp_path):
    # A full GSPN-T layout whose tensors are stride-0 views of one element: tiny on disk.
    shapes = ref_classifier_shapes(96, (2, 2, 7, 2), 8)
    sd = collections.OrderedDict((k, torch.zeros(1).expand(s)) for k, s in shapes.items())
    path = tmp_path / "tiny.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match=r"does not fit gspn_b.*stem\.conv1\.weight.*that is gspn_t"):
        create_model("gspn_b", pretrained=path)


def test_missing_and_extra_tensors_are_named(tmp_path, cls_ckpt):
    _, model_sd, _ = cls_ckpt
    sd = collections.OrderedDict(model_sd)
    del sd["layers.2.blocks.3.op.d_conv.weight"]
    torch.save({"model": sd}, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing from the file \(stages\.2\.blocks\.3\.mixer\.gspn\.d_conv\.weight"):
        create_model("gspn_nano", pretrained=tmp_path / "missing.pth", **CLS)
    sd = collections.OrderedDict(model_sd)
    sd["layers.0.blocks.0.op.extra.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "extra.pth")  # a bare state dict
    with pytest.raises(ValueError, match=r"no counterpart.*layers\.0\.blocks\.0\.op\.extra\.weight"):
        create_model("gspn_nano", pretrained=tmp_path / "extra.pth", **CLS)
    with pytest.raises(ValueError, match=r"no 'nope' entry.*model, model_ema"):
        create_model("gspn_nano", pretrained=cls_ckpt[0], pretrained_entry="nope", **CLS)


def test_a_different_head_is_dropped_with_a_warning(cls_ckpt, gen_ckpt):
    with pytest.warns(UserWarning, match="classifier"):
        model = create_model("gspn_nano", pretrained=cls_ckpt[0], **{**CLS, "num_classes": 3})
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    # a generator's output layer is not a head to replace: learn_sigma=False does not fit
    with pytest.raises(ValueError, match=r"final_layer\.linear\.weight: file \[32, 32\] vs model \[16, 32\]"):
        create_model("gspn_dit_tiny", pretrained=gen_ckpt[0], **{**GEN, "learn_sigma": False})


# --- pretrained=True through the Hugging Face cache ---------------------------------------------------


def _fill_hub_cache(cache: Path, filename: str, src: Path) -> Path:
    repo = cache / "models--whj363636--GSPN"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / filename).write_bytes(src.read_bytes())
    return snap / filename


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    hf_constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


def test_pretrained_true_reads_the_hub_cache(hub_cache, cls_ckpt):
    cached = _fill_hub_cache(hub_cache, "tiny.pth", cls_ckpt[0])
    model = create_model("gspn_t", pretrained=True, **CLS)
    cfg = model.pretrained_cfg
    assert (cfg["source"], cfg["hf_hub_id"], cfg["hf_hub_filename"]) == ("hf-hub", "whj363636/GSPN", "tiny.pth")
    assert Path(cfg["file"]) == cached and cfg["checkpoint_entry"] == "model" and cfg["reported_top1"] == 83.0
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (
            rel_err(model.eval()(x), ref_classifier_forward(cls_ckpt[1], x, CLS["depths"], (2, 3), (16, 8, 4, 2)))
            <= 1e-5
        )


def test_pretrained_true_offline_without_the_file_says_what_to_do(hub_cache):
    expected = r"not in the Hugging Face cache.*HF_HUB_OFFLINE.*hf download whj363636/GSPN small\.pth"
    with pytest.raises(RuntimeError, match=expected):
        create_model("gspn_s", pretrained=True)


def test_pretrained_true_download_failure_and_missing_package(hub_cache, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def fake_download(repo_id, filename, revision=None, local_files_only=False):
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(RuntimeError, match=r"could not download whj363636/GSPN/base\.pth.*no network"):
        create_model("gspn_b", pretrained=True)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r"pip install 'gspn\[hub\]'"):
        create_model("gspn_b", pretrained=True)
    with pytest.raises(RuntimeError, match="no pretrained weights are published for 'gspn_nano'"):
        create_model("gspn_nano", pretrained=True)


# --- gspn convert -----------------------------------------------------------------------------------


def test_convert_writes_our_format(cls_ckpt, tmp_path, capsys):
    from gspn.commands import main

    out = tmp_path / "tiny.safetensors"
    argv = ["convert", str(cls_ckpt[0]), str(out), "--model", "gspn_nano", "--entry", "model_ema"]
    argv += [f"--model-arg={k}={v!r}" for k, v in CLS.items()]
    assert main(argv) == 0
    meta = read_metadata(out)
    assert meta["gspn.architecture"] == "gspn_nano" and "model_ema" in meta["gspn.source"]
    reloaded = load_model(out).eval()  # no pickle, reference semantics restored
    direct = create_model("gspn_nano", pretrained=cls_ckpt[0], pretrained_entry="model_ema", **CLS).eval()
    structural = {k: v for k, v in CLS.items()}
    again = create_model("gspn_nano", pretrained=out, **structural).eval()  # semantics from the file
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(reloaded(x), direct(x)) and torch.equal(again(x), direct(x))
    assert main(["convert", str(cls_ckpt[0]), str(tmp_path / "x.safetensors"), "--model", "gspn_dit_tiny"]) == 2
    assert "classifier checkpoint but gspn_dit_tiny is a generator" in capsys.readouterr().err


def test_convert_infers_the_model_from_the_shapes(tmp_path):
    from gspn.models import convert_checkpoint

    shapes = ref_classifier_shapes(16, (1, 1, 1, 1), 4)  # gspn_nano's configuration
    torch.save({"model": random_state(shapes, 9)}, tmp_path / "nano.pth")
    out = convert_checkpoint(tmp_path / "nano.pth", tmp_path / "nano.safetensors")
    assert read_metadata(out)["gspn.architecture"] == "gspn_nano"
    shapes = ref_classifier_shapes(24, (1, 1, 1, 1), 4)  # no registered model has this width
    torch.save({"model": random_state(shapes, 9)}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"none fits.*embed_dim=24.*--model NAME"):
        convert_checkpoint(tmp_path / "odd.pth", tmp_path / "odd.safetensors")


def test_sample_runs_on_a_reference_generator_checkpoint(gen_ckpt, tmp_path):
    from gspn.recipes.diffusion.sample import load_for_sampling

    model, schedule, data = load_for_sampling(
        gen_ckpt[0], model_name="gspn_dit_tiny", model_args={k: v for k, v in GEN.items() if k != "input_size"}
    )
    assert model.pretrained_cfg["checkpoint_entry"] == "ema" and model.input_size == 8  # image_size 64 / 8
    assert schedule == {"num_train_timesteps": 1000, "beta_schedule": "linear", "learn_sigma": True}
    assert data["kind"] == "latents" and data["scaling_factor"] == 0.18215 and data["shape"] == [4, 8, 8]
    assert data["vae"] == "stabilityai/sd-vae-ft-ema"


def test_gspn_sample_command_on_a_reference_checkpoint(gen_ckpt, tmp_path, capsys):
    pytest.importorskip("diffusers")
    from gspn.commands import main

    argv = [
        "sample",
        "--checkpoint",
        str(gen_ckpt[0]),
        "--labels",
        "1,null",
        "--steps",
        "2",
        "--sampler",
        "ddim",
        "--save-latents",
        "--output-dir",
        str(tmp_path / "s"),
        "--no-progress",
        "--model",
        "gspn_dit_tiny",
    ]
    argv += [f"--model-arg={k}={v!r}" for k, v in GEN.items() if k != "input_size"]
    assert main(argv) == 0
    latents = torch.load(tmp_path / "s" / "latents.pt")["latents"]
    assert latents.shape == (2, 4, 8, 8) and torch.isfinite(latents).all()
