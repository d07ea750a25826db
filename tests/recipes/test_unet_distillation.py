"""UNet distillation (gspn.recipes.unet_distillation) on the runner, with the tiny SD pipelines of
``tests/tiny_diffusers.py``: the loss falls, resume is exact, old run folders continue, the runner's
contract (checks before writing, Ctrl-C, changed settings, non-finite stops, one header and closing line)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from gspn.recipes.unet_distillation import (
    CaptionData,
    UNetDistillationConfig,
    UNetDistillationRecipe,
    load_captions,
)
from gspn.training_utils import (
    STATE_KEYS,
    ConfigError,
    DistContext,
    RunInterrupted,
    load_state,
    read_metrics,
    save_state,
)
from gspn.training_utils import run as run_recipe
from tiny_diffusers import CROSS_DIM, tiny_pipe, tiny_unet


def _distiller(tmp_path: Path, out: str, steps: int, **kw) -> UNetDistillationRecipe:
    """A distillation of the tiny SD-1.5 pipeline on three captions (no images), 16 px, batch 2."""
    caps = tmp_path / "captions.txt"
    caps.write_text("a red cat\na blue dog\n# comment\ngreen tree\n")
    fields = dict(
        captions=str(caps),
        output_dir=str(tmp_path / out),
        image_size=16,
        batch_size=2,
        steps=steps,
        lr=5e-3,
        save_every=0,
        log_every=100,
        d_state=4,
        device="cpu",
        progress=False,
        quiet=True,
    )
    fields.update(kw)
    return UNetDistillationRecipe(
        UNetDistillationConfig(**fields), pipe=tiny_pipe(tmp_path / "tok"), data=load_captions(caps)
    )


def _train(recipe: UNetDistillationRecipe) -> list[dict[str, float]]:
    """Run the recipe; the per-step loss parts of this invocation."""
    run_recipe(recipe)
    return recipe.history


def test_distillation_lowers_the_loss_and_resumes_exactly(tmp_path, capsys):
    ref = _distiller(tmp_path, "a", steps=4)
    ref.build(DistContext())  # built by hand to look at batches first; the run uses it as built
    batches = [ref.make_batch(10_000 + i) for i in range(2)]

    def eval_loss(d):
        with torch.no_grad():
            return sum(d.compute_loss(b)[0].item() for b in batches)

    before = eval_loss(ref)
    history = _train(ref)
    assert len(history) == 4 and set(history[0]) >= {"output", "feature", "loss"}
    assert "noise" not in history[0]  # caption file only: no ground-truth noise term
    assert eval_loss(ref) < 0.9 * before
    assert (tmp_path / "a" / "last.pt").is_file()
    assert (tmp_path / "a" / "adapter" / "config.json").is_file()
    # only the GSPN parameters trained: the UNet's own weights are untouched
    pristine = tiny_unet("sd15").state_dict()
    own = {k: v for k, v in ref.unet.state_dict().items() if ".processor." not in k}
    assert own.keys() == pristine.keys() and all(torch.equal(own[k], pristine[k]) for k in own)

    _train(_distiller(tmp_path, "b", steps=2))
    capsys.readouterr()
    resumed = _distiller(tmp_path, "b", steps=4, resume="auto", allow_changes=True, quiet=False)
    _train(resumed)
    logs = capsys.readouterr().out.splitlines()
    assert any("resumed" in line and "step 3/4" in line for line in logs)  # after step 2, at step 3 of 4
    assert any("steps: 2 → 4" in line and "stays constant" in line for line in logs)
    a, b = ref.adapter.state_dict(), resumed.adapter.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in history[2:]]


def test_distill_refuses_a_run_without_loss_terms(tmp_path):
    with pytest.raises(ValueError, match="every loss term is off"):
        run_recipe(_distiller(tmp_path, "none", steps=1, output_weight=0.0, feature_weight=0.0))
    assert not (tmp_path / "none").exists()


def test_distill_train_all_uses_a_frozen_copy_as_teacher(tmp_path):
    d = _distiller(tmp_path, "all", steps=1, train_all=True)
    d.build(DistContext())
    before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    conv = d.unet.conv_in.weight.detach().clone()
    history = _train(d)
    assert {"output", "feature"} <= history[0].keys()
    assert not torch.equal(d.unet.conv_in.weight, conv)  # the whole student trains
    assert all(torch.equal(v, before[k]) for k, v in d.teacher.state_dict().items())


def test_distillation_with_an_sdxl_pipeline(tmp_path):
    """SD-XL: two text encoders, pooled `text_embeds` and `time_ids` added conditions."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    base = tiny_pipe(tmp_path / "tok")
    tok = base.tokenizer
    cfg = dict(
        vocab_size=len(tok.get_vocab()),
        hidden_size=CROSS_DIM // 2,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=12,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline(
        vae=base.vae,
        text_encoder=CLIPTextModel(CLIPTextConfig(**cfg)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg, projection_dim=CROSS_DIM)),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=tiny_unet("sdxl"),
        scheduler=base.scheduler,
    )
    distiller = UNetDistillationRecipe(
        UNetDistillationConfig(
            output_dir=str(tmp_path / "xl"),
            image_size=16,
            batch_size=2,
            steps=2,
            save_every=0,
            d_state=4,
            device="cpu",
            progress=False,
        ),
        pipe=pipe,
        data=CaptionData(["a red cat", "a blue dog"]),
    )
    distiller.build(DistContext())
    batch = distiller.make_batch(0)
    assert batch["added"]["text_embeds"].shape == (2, CROSS_DIM)
    assert batch["added"]["time_ids"].shape == (2, 6)
    history = _train(distiller)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert len(distiller.adapter.processors) == 8


def test_distillation_writes_the_shared_state_and_metrics_jsonl(tmp_path):
    d = _distiller(tmp_path, "run", steps=3, log_every=1)
    history = _train(d)
    out = tmp_path / "run"
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for rec, parts in zip(records, history, strict=True):
        assert {k: rec[k] for k in parts} == parts  # the logged losses are the step's
        assert rec["lr"] == pytest.approx(5e-3) and rec["steps_per_sec"] > 0
    state = load_state(out / "last.pt")
    assert set(STATE_KEYS) <= state.keys() and state["step"] == 3 and state["scheduler"] is not None
    assert state["model"].keys() == d.adapter.state_dict().keys()
    assert "trainable" not in state and "lr_scheduler" not in state
    assert state["command"] == "distill" and state["unit"] == 2

    # an old run folder: its state is ``checkpoint.pt`` in the old format (trainable / lr_scheduler / one RNG
    # dict, no format tag); it resumes, and the records past the checkpoint (a run cut short after logging)
    # are dropped before the continuation logs its own
    old = {
        "step": 2,
        "trainable": state["model"],
        "optimizer": state["optimizer"],
        "lr_scheduler": state["scheduler"],
        "rng": state["rng"][0],
        "config": state["config"],
    }
    (out / "last.pt").unlink()
    save_state(out / "checkpoint.pt", old)
    resumed = _distiller(tmp_path, "run", steps=4, log_every=1, resume="auto", allow_changes=True)
    _train(resumed)
    assert resumed.step == 4 and len(resumed.history) == 2  # it went on from step 2
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert Path(out / "last.pt").is_file() and load_state(out / "last.pt")["step"] == 4


# ------------------------------------------------------------------------------------ the runner's contract
def test_settings_and_data_are_checked_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="lr must be a finite number > 0"):
        run_recipe(_distiller(tmp_path, "lr", steps=1, lr=0.0))
    with pytest.raises(ConfigError, match="precision must be fp32 or bf16"):
        run_recipe(_distiller(tmp_path, "prec", steps=1, precision="no"))
    missing = UNetDistillationConfig(model="m", captions=str(tmp_path / "nope.txt"), output_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="captions cannot be read: "):
        run_recipe(UNetDistillationRecipe(missing))
    # a pipeline that cannot be loaded fails while building: still no folder
    caps = tmp_path / "captions.txt"
    bad = UNetDistillationConfig(
        model=str(tmp_path / "no-pipeline"), captions=str(caps), output_dir=str(tmp_path / "m"), device="cpu"
    )
    with pytest.raises((OSError, ValueError), match="no-pipeline"):
        run_recipe(UNetDistillationRecipe(bad))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.txt", "tok"]


def test_one_header_line_and_one_closing_line(tmp_path, capsys):
    summary = run_recipe(_distiller(tmp_path, "v", steps=2, quiet=False))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3, lines  # the header, the final step's log line, the closing line
    assert lines[0].startswith("distill ") and "4 GSPN layers" in lines[0] and "2 steps × batch 2" in lines[0]
    assert lines[1].startswith("step 2/2 output=")
    assert lines[2].startswith("distilled 2/2 steps") and str(tmp_path / "v" / "adapter") in lines[2]
    assert summary["step"] == 2 and summary["finished"] and (tmp_path / "v" / "summary.json").is_file()
    run_recipe(_distiller(tmp_path, "q", steps=2, log_every=1))  # quiet: nothing but errors
    assert capsys.readouterr().out == ""


def test_resume_with_other_settings_is_refused_unless_allowed(tmp_path):
    _train(_distiller(tmp_path, "r", steps=2))
    before = (tmp_path / "r" / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"batch_size: 2 → 1"):
        run_recipe(_distiller(tmp_path, "r", steps=2, batch_size=1, resume="auto"))
    assert (tmp_path / "r" / "last.pt").read_bytes() == before
    with pytest.raises(ValueError, match="already holds a run"):
        run_recipe(_distiller(tmp_path, "r", steps=2))


def test_ctrl_c_saves_the_state_and_resume_is_exact(tmp_path, monkeypatch):
    straight = _distiller(tmp_path, "straight", steps=4)
    _train(straight)
    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # Ctrl-C during step 2: the step finishes, the state is saved
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(RunInterrupted, match=r"holds the state after step 2.*resume"):
        run_recipe(_distiller(tmp_path, "split", steps=4))
    monkeypatch.undo()
    assert load_state(tmp_path / "split" / "last.pt")["step"] == 2
    assert (tmp_path / "split" / "adapter" / "config.json").is_file()
    resumed = _distiller(tmp_path, "split", steps=4, resume="auto")
    _train(resumed)
    a, b = straight.adapter.state_dict(), resumed.adapter.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_divergence_stops_and_names_the_state_that_was_kept(tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* in step 2: the training diverged") as exc:
        run_recipe(_distiller(tmp_path, "nan", steps=3, lr=1e30, clip_grad=None, save_every=1))
    assert "keeps the state after step 1" in str(exc.value)
    assert load_state(tmp_path / "nan" / "last.pt")["step"] == 1


def test_non_finite_data_is_named_as_the_cause(tmp_path, monkeypatch):
    recipe = _distiller(tmp_path, "data", steps=2)
    make_batch = recipe.make_batch

    def poisoned(step):
        batch = make_batch(step)
        batch["noisy"][0, 0, 0, 0] = float("nan")
        return batch

    monkeypatch.setattr(recipe, "make_batch", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite values in the batch") as exc:
        run_recipe(recipe)
    assert "no training state was saved yet" in str(exc.value)
    assert not (tmp_path / "data" / "last.pt").exists()
