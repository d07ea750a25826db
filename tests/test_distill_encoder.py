"""The attention ViT teachers (``vit_*``) and ``gspn distill-encoder`` (C-GSPN's two-stage distillation)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gspn
from gspn.distill_encoder import EncoderDistillConfig, layer_map, nmse, run
from gspn.distill_encoder.data import build_data
from gspn.distill_encoder.trainer import kd_loss
from gspn.models import GSPNViT, create_model, get_default_cfg, load_model, save_checkpoint
from gspn.models.vit import VisionTransformer, sincos_pos_embed

# --------------------------------------------------------------------------------------------- the ViT


def test_registered_classifiers_shaped_like_gspn_vit():
    names = gspn.list_models("vit_*")
    assert names == ["vit_base", "vit_nano", "vit_small", "vit_so400m", "vit_tiny"]
    assert set(names) <= set(gspn.list_models(task="classification"))
    for name in names:
        assert get_default_cfg(name)["task"] == "classification"
        with torch.device("meta"):
            vit, gv = create_model(name), create_model("gspn_" + name)
        assert (vit.embed_dim, len(vit.blocks), vit.patch_size) == (gv.embed_dim, len(gv.blocks), gv.patch_size)
        assert vit.blocks[0].mlp.fc1.out_features == gv.blocks[0].mlp.fc1.out_features
        assert vit.default_cfg["architecture"] == name and vit.feature_info == gv.feature_info


@pytest.mark.parametrize(("hw", "grid"), [((32, 32), (8, 8)), ((30, 17), (8, 5)), ((64, 48), (16, 12))])
def test_shapes_any_input_size(hw, grid):
    model = create_model("vit_nano", num_classes=7, in_chans=1)
    x = torch.randn(2, 1, *hw)
    assert model(x).shape == (2, 7)
    assert model.forward_features(x).shape == (2, 64, *grid)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 64)


def _naive_block(block, x):
    """A transformer block in float64 from its weights: softmax(q kᵀ/√d) v per head."""
    b, h, w, c = x.shape
    t = x.reshape(b, h * w, c).double()
    a = block.attn
    y = F.layer_norm(t, (c,), block.norm1.weight.double(), block.norm1.bias.double(), block.norm1.eps)
    qkv = (y @ a.qkv.weight.double().T + a.qkv.bias.double()).view(b, h * w, 3, a.num_heads, a.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(a.head_dim), -1) @ v
    t = t + att.transpose(1, 2).reshape(b, h * w, c) @ a.proj.weight.double().T + a.proj.bias.double()
    y = F.layer_norm(t, (c,), block.norm2.weight.double(), block.norm2.bias.double(), block.norm2.eps)
    m = block.mlp
    y = F.gelu(y @ m.fc1.weight.double().T + m.fc1.bias.double()) @ m.fc2.weight.double().T + m.fc2.bias.double()
    return (t + y).reshape(b, h, w, c)


def test_forward_is_patch_embed_plus_position_then_attention_blocks(assert_close):
    torch.manual_seed(0)
    model = create_model("vit_nano", num_classes=3, depth=2).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    h = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=4) + model.pos_embed
    h = h.permute(0, 2, 3, 1)
    for block in model.blocks:
        h = _naive_block(block, h)
    assert_close(model.forward_features(x), h.permute(0, 3, 1, 2), rtol=1e-10)
    # another grid: the learned embedding is resized bicubically
    x = torch.randn(1, 3, 20, 24, dtype=torch.float64)
    pos = F.interpolate(model.pos_embed, size=(5, 6), mode="bicubic", align_corners=False)
    assert_close(model.position_embedding(5, 6), pos)


def test_sincos_position_embedding_values():
    pe = sincos_pos_embed(8, 3, 4)
    assert pe.shape == (1, 8, 3, 4)
    # channels: sin(row·ω), cos(row·ω), sin(col·ω), cos(col·ω) with ω = (1, 10000^-1/2)
    omega = torch.tensor([1.0, 0.01])
    assert torch.allclose(pe[0, 0:2, 2, 1], torch.sin(2 * omega))
    assert torch.allclose(pe[0, 2:4, 2, 1], torch.cos(2 * omega))
    assert torch.allclose(pe[0, 4:6, 2, 3], torch.sin(3 * omega))
    assert torch.allclose(pe[0, 6:8, 0, 0], torch.ones(2))
    model = create_model("vit_nano", pos_embed="sincos")
    assert model.pos_embed is None and model(torch.randn(1, 3, 12, 20)).shape == (1, 1000)


def test_forward_intermediates_are_the_block_outputs():
    torch.manual_seed(0)
    model = create_model("vit_nano", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    final, blocks = model.forward_intermediates(x)
    assert len(blocks) == 4 and all(b.shape == (2, 64, 8, 8) for b in blocks)
    h = model._embed(x)
    for i, block in enumerate(model.blocks):
        h = block(h)
        torch.testing.assert_close(blocks[i], h.permute(0, 3, 1, 2))
    torch.testing.assert_close(final, model.forward_features(x))
    torch.testing.assert_close(blocks[-1], final)
    only = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
    torch.testing.assert_close(only[0], blocks[0])
    torch.testing.assert_close(only[1], blocks[3])
    assert len(model.forward_intermediates(x, indices=2, intermediates_only=True)) == 2
    with pytest.raises(IndexError):
        model.forward_intermediates(x, indices=[4])


def test_reset_classifier_and_bad_arguments():
    model = create_model("vit_nano", num_classes=10)
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3) and model.default_cfg["num_classes"] == 3
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 64)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="token")
    with pytest.raises(ValueError, match="pos_embed"):
        VisionTransformer(pos_embed="rope")
    with pytest.raises(ValueError, match="divisible"):
        VisionTransformer(embed_dim=64, num_heads=3)
    with pytest.raises(RuntimeError, match="no pretrained weights"):
        create_model("vit_nano", pretrained=True)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = create_model("vit_nano", num_classes=10, in_chans=1).eval()
    save_checkpoint(model, tmp_path / "vit.safetensors")
    back = load_model(tmp_path / "vit.safetensors").eval()
    assert isinstance(back, VisionTransformer)
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(back(x), model(x))


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_flops_count_attention(device):
    """On CPU tensors too: SDPA's CPU flash kernel has no flop formula, so complexity() uses the math path."""
    from gspn.models.complexity import complexity

    with torch.device(device):
        model = create_model("vit_nano", num_classes=10)
    c = complexity(model, input_size=(3, 32, 32))
    n, d = 64, 64  # tokens, width
    attention = n * d * 3 * d + n * d * d + 2 * n * n * d  # qkv, proj, q kᵀ and (·) v
    mlp = 2 * n * d * 4 * d
    expected = 4 * (attention + mlp) + n * (3 * 4 * 4) * d + d * 10  # 4 blocks, patch embedding, classifier
    assert c["macs"] == expected


# --------------------------------------------------------------------------------------------- the recipe


def test_losses_and_layer_map():
    t = torch.randn(2, 16, 8)
    assert nmse(t, t).item() == 0.0
    assert nmse(torch.zeros_like(t), t).item() == pytest.approx(1.0, rel=1e-5)
    assert nmse(torch.zeros_like(t), t, normalise=False).item() == pytest.approx(t.pow(2).mean().item())
    z = torch.randn(4, 10)
    assert kd_loss(z, z, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    p, q = F.log_softmax(z.flip(-1) / 2, -1), F.log_softmax(z / 2, -1)
    expected = 4 * (q.exp() * (q - p)).sum(-1).mean()
    assert kd_loss(z.flip(-1), z, 2.0).item() == pytest.approx(expected.item(), rel=1e-5)
    assert layer_map(4, 4) == [0, 1, 2, 3] and layer_map(2, 4) == [1, 3] and layer_map(3, 12) == [3, 7, 11]


def test_data_is_gspn_trains():
    """The recipe builds its data with gspn train's own function: a teacher sees the same split and transforms."""
    from gspn.datasets import build_data as shared
    from gspn.train.data import build_data as train_data

    assert build_data is shared is train_data
    data = build_data("digits", 24, 2, train_limit=40, val_limit=20)
    assert len(data.train) == 40 and len(data.val) == 20 and data.classes == [str(c) for c in range(10)]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A vit_nano with the data setup ``gspn train`` records (random weights: the tests check the machinery)."""
    torch.manual_seed(0)
    teacher = create_model("vit_nano", num_classes=10, in_chans=1)
    meta = {
        "gspn.train.img_size": "32",
        "gspn.train.in_chans": "1",
        "gspn.train.mean": "[0.3053]",
        "gspn.train.std": "[0.376]",
        "gspn.train.num_classes": "10",
    }
    path = tmp_path_factory.mktemp("teacher") / "model.safetensors"
    save_checkpoint(teacher, path, metadata=meta)
    return path


def _cfg(out, teacher, **kw):
    base = dict(
        teacher=str(teacher) if teacher else None,
        output_dir=str(out),
        epochs=2,
        stage1_epochs=1,
        batch_size=32,
        train_limit=64,
        val_limit=32,
        workers=0,
        progress=False,
        plot=False,
        verbose=False,
        warmup_epochs=0.0,
    )
    return EncoderDistillConfig(**{**base, **kw})


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_two_stages_and_exported_student(tmp_path, teacher_file, one_thread):
    out = tmp_path / "run"
    summary = run(_cfg(out, teacher_file))
    recs = _records(out)
    assert [r["stage"] for r in recs] == [1, 2]
    assert "train_layer_loss" in recs[0] and "train_output_loss" not in recs[0]
    assert {"train_output_loss", "train_kd_loss", "train_label_loss"} <= set(recs[1])
    assert recs[1]["train_loss"] == pytest.approx(
        recs[1]["train_output_loss"] + recs[1]["train_kd_loss"] + recs[1]["train_label_loss"], rel=1e-6
    )
    student = load_model(out / "model.safetensors")
    assert isinstance(student, GSPNViT) and student.patch_embed.proj.in_channels == 1
    data = build_data("digits", 32, 1, (0.3053,), (0.376,), val_limit=32)
    x, y = zip(*(data.val[i] for i in range(len(data.val))), strict=True)
    acc = (student.eval()(torch.stack(x)).argmax(-1) == torch.tensor(y)).float().mean().item()
    assert acc == pytest.approx(recs[-1]["val_acc"]) and summary["final"]["val_acc"] == recs[-1]["val_acc"]
    # the student started from the teacher's patch embedding and head (then trained)
    assert summary["teacher_val_acc"] is not None and summary["epochs_done"] == 2


def test_exact_resume_across_and_within_stages(tmp_path, teacher_file, one_thread):
    full, parts = tmp_path / "full", tmp_path / "parts"
    run(_cfg(full, teacher_file, epochs=3))
    run(_cfg(parts, teacher_file, epochs=3, stop_after_epochs=1))  # ends stage 1
    run(_cfg(parts, teacher_file, epochs=3, stop_after_epochs=1, resume="auto"))  # first epoch of stage 2
    run(_cfg(parts, teacher_file, epochs=3, resume="auto"))  # resumes inside stage 2 (optimizer state)
    a, b = load_model(full / "model.safetensors"), load_model(parts / "model.safetensors")
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    strip = ("epoch_s", "train_imgs_per_s", "elapsed_s")
    ra = [{k: v for k, v in r.items() if k not in strip} for r in _records(full)]
    rb = [{k: v for k, v in r.items() if k not in strip} for r in _records(parts)]
    assert ra == rb and [r["stage"] for r in ra] == [1, 2, 2]


def test_stage1_loss_decreases_both_input_modes(tmp_path, teacher_file, one_thread):
    for mode in ("student", "teacher"):
        out = tmp_path / mode
        run(_cfg(out, teacher_file, epochs=3, stage1_epochs=3, stage1_inputs=mode, init_from_teacher=False, lr=3e-3))
        losses = [r["train_layer_loss"] for r in _records(out)]
        assert losses[-1] < 0.7 * losses[0], (mode, losses)


def test_teacher_without_per_block_outputs_is_a_clear_error(tmp_path):
    teacher = nn.Sequential(nn.Conv2d(1, 8, 4, 4), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    cfg = _cfg(tmp_path / "run", None)
    with pytest.raises(ValueError, match="--teacher: Sequential has no per-block outputs"):
        run(cfg, teacher=teacher)


def test_mismatched_token_grid_and_bad_settings(tmp_path, teacher_file):
    with pytest.raises(ValueError, match="token grid"):
        run(_cfg(tmp_path / "a", teacher_file, model_args={"patch_size": 8}))
    with pytest.raises(ValueError, match="--stage1-inputs teacher needs a student of the teacher's depth"):
        run(_cfg(tmp_path / "b", teacher_file, stage1_inputs="teacher", model_args={"depth": 2}))
    with pytest.raises(ValueError, match="--stage1-epochs"):
        run(_cfg(tmp_path / "c", teacher_file, stage1_epochs=3))
    with pytest.raises(ValueError, match="--teacher is required"):
        run(_cfg(tmp_path / "d", None))


def test_student_narrower_than_teacher_uses_adapters(tmp_path, teacher_file, one_thread):
    out = tmp_path / "narrow"
    run(
        _cfg(
            out,
            teacher_file,
            epochs=1,
            stage1_epochs=1,
            model_args={"embed_dim": 32, "depth": 2, "propagation_channels": 8},
        )
    )
    state = torch.load(out / "last.pt", weights_only=True)["distiller"]
    assert state["adapters.0.weight"].shape == (64, 32) and "adapters.1.weight" in state


# --------------------------------------------------------------------------------------------- the command


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required: --teacher"),
        (["--teacher", "{t}", "--epochs", "0"], "--epochs must be a positive integer"),
        (["--teacher", "{t}", "--stage1-epochs", "11"], "--stage1-epochs (11) must not exceed --epochs (10)"),
        (["--teacher", "{t}", "--kd-temperature", "0"], "--kd-temperature must be"),
        (["--teacher", "{d}/missing.safetensors"], "--teacher: no checkpoint at"),
        (["--teacher", "{junk}"], "is not a safetensors checkpoint"),
        (["--teacher", "{t}", "--stage1-inputs", "both"], "invalid choice: 'both'"),
        # the conv baseline has stage outputs (forward_intermediates), on other grids than the student's
        (["--teacher", "{conv}"], "token grid (64 tokens) differs from the teacher's (1024)"),
    ],
)
def test_command_bad_arguments_one_line_exit_2(argv, message, tmp_path, teacher_file, capsys):
    from gspn.commands import main

    conv = tmp_path / "conv.safetensors"
    save_checkpoint(create_model("baseline_conv", num_classes=10, width=4, depths=(1,)), conv)
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a checkpoint")
    args = [a.format(t=teacher_file, d=tmp_path, conv=conv, junk=junk) for a in argv] + [
        "--output-dir",
        str(tmp_path / "o"),
    ]
    try:
        rc = main(["distill-encoder", *args])
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_command_builds_the_config():
    from gspn.commands import build_parser
    from gspn.commands.distill_encoder import distill_encoder_config

    args = build_parser().parse_args(
        [
            "distill-encoder",
            "--teacher",
            "t.safetensors",
            "--model",
            "gspn_vit_nano",
            "--model-arg",
            "d_state=4",
            "--epochs",
            "6",
            "--stage1-epochs",
            "2",
            "--output-dir",
            "o",
            "--clip-grad",
            "none",
            "--no-init-from-teacher",
            "--stage1-inputs",
            "teacher",
            "--kd-weight",
            "0",
            "--precision",
            "fp32",
            "--resume",
            "--quiet",
        ]
    )
    cfg = distill_encoder_config(args)
    assert (cfg.teacher, cfg.model_args, cfg.epochs, cfg.stage1_epochs, cfg.output_dir, cfg.clip_grad) == (
        "t.safetensors",
        {"d_state": 4},
        6,
        2,
        "o",
        None,
    )
    assert (cfg.init_from_teacher, cfg.stage1_inputs, cfg.kd_weight, cfg.precision, cfg.resume, cfg.verbose) == (
        False,
        "teacher",
        0.0,
        "fp32",
        "auto",
        False,
    )
