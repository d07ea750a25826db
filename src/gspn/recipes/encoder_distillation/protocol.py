"""The teacher protocol, the losses and the trainable module of encoder distillation.

* :func:`load_teacher` — the teacher of a ``teacher`` setting: a ``model.safetensors`` (or a run folder
  holding one) or a ``last.pt`` / ``best.pt`` training state of ``gspn train``, with the data setup it
  was trained with;
* :func:`block_outputs` — the per-block protocol (timm's ``forward_intermediates``) as tokens;
* :func:`layer_map`, :func:`nmse`, :func:`kd_loss` — the maths of the two stages;
* :class:`Distiller` — student + adapters, whose ``forward`` runs the teacher and keeps the stage's
  feature terms so that :func:`gspn.training_utils.train_one_epoch` (and DDP) run a distillation step
  unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from ...training_utils import STATE_FORMAT, ConfigError, load_state

__all__ = ["Distiller", "block_outputs", "kd_loss", "layer_map", "load_teacher", "nmse"]

#: The data setup a classifier's weights carry (``gspn.train.*`` metadata, or the training state's entries).
_DATA_KEYS = ("model_name", "model_args", "num_classes", "in_chans", "img_size", "mean", "std", "classes")


def load_teacher(path: str) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher of a ``teacher`` setting and the data setup it was trained with.

    Args:
        path: a ``.safetensors`` file written by :func:`gspn.models.save_checkpoint` (``gspn train``'s
            ``model.safetensors``), a folder holding ``model.safetensors``, or a training state of
            ``gspn train`` (its ``last.pt`` or ``best.pt``: the ``model`` weights are used).

    Returns:
        ``(model, data)``: the model in eval mode with frozen parameters, and the data setup it
        carries (``img_size``, ``in_chans``, ``mean``, ``std``, ``num_classes``, ``classes``,
        ``model_name``, ``model_args``; empty for a safetensors file without ``gspn.train.*`` metadata).

    Raises:
        ConfigError (field ``teacher``): no such file, or a file that is neither.

    ``ConfigError`` messages follow the kit's convention (``str()`` is ``"<field> <predicate>"``).
    """
    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file():
        raise ConfigError(
            "teacher",
            f"names no checkpoint: {p} does not exist (give a model.safetensors or a last.pt / best.pt written by "
            "`gspn train`)",
        )
    with p.open("rb") as f:
        is_state = f.read(4) == b"PK\x03\x04"  # torch.save's zip archive; safetensors starts with its header size
    model, data = _teacher_from_state(p) if is_state else _teacher_from_safetensors(p)
    return model.eval().requires_grad_(False), data


def _teacher_from_safetensors(p: Path) -> tuple[nn.Module, dict[str, Any]]:
    from ...models import load_model, read_metadata

    try:
        meta = read_metadata(p)
    except (SafetensorError, OSError) as exc:
        raise ConfigError(
            "teacher",
            f"{p} is not a safetensors checkpoint ({exc}); give a model.safetensors or a last.pt / best.pt "
            "written by `gspn train`",
        ) from None
    if "gspn.architecture" not in meta:
        raise ConfigError(
            "teacher",
            f"{p} has no 'gspn.architecture' metadata (write it with gspn.models.save_checkpoint, as `gspn "
            "train` does)",
        )
    data = {k.removeprefix("gspn.train."): json.loads(v) for k, v in meta.items() if k.startswith("gspn.train.")}
    return load_model(p), data


def _teacher_from_state(p: Path) -> tuple[nn.Module, dict[str, Any]]:
    from ...models import create_model

    try:
        state = load_state(p)
    except Exception as exc:  # a damaged archive, or a pickle that would run code
        raise ConfigError("teacher", f"{p} is not a readable training state ({exc})") from None
    needed = ("model", "model_name", "num_classes", "in_chans")
    if (
        not isinstance(state, dict)
        or state.get("format") != STATE_FORMAT
        or state.get("command", "train") != "train"
        or any(k not in state for k in needed)
    ):
        what = f"a `gspn {state['command']}` training state" if isinstance(state, dict) and "command" in state else ""
        raise ConfigError(
            "teacher",
            f"{p} is {what or 'not a training state of `gspn train`'}; give a classifier's model.safetensors or "
            "the last.pt / best.pt of `gspn train`",
        )
    model = create_model(
        state["model_name"],
        pretrained=False,
        num_classes=state["num_classes"],
        in_chans=state["in_chans"],
        **(state.get("model_args") or {}),
    )
    model.load_state_dict(state["model"])
    data = {k: json.loads(json.dumps(state[k])) for k in _DATA_KEYS if k in state}  # tuples → lists, as JSON reads
    return model, data


def _tokens(t: torch.Tensor, who: str) -> torch.Tensor:
    """``(B, C, h, w)`` → ``(B, h·w, C)``; ``(B, N, C)`` unchanged."""
    if t.dim() == 4:
        return t.flatten(2).transpose(1, 2)
    if t.dim() == 3:
        return t
    raise ConfigError(who, f"gives a block output of shape {tuple(t.shape)}; it must be (B, C, h, w) or (B, N, C)")


def block_outputs(model: nn.Module, x: torch.Tensor, who: str = "teacher") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(final, [block outputs])`` of ``model`` on ``x``, each as tokens ``(B, N, C)``.

    Raises:
        ConfigError (field ``who``): ``model`` has no ``forward_intermediates`` (the per-block protocol
            of :mod:`gspn.recipes.encoder_distillation`), or returns something else than
            ``(tensor, [tensors])``.
    """
    fn = getattr(model, "forward_intermediates", None)
    if not callable(fn):
        raise ConfigError(
            who,
            f"{type(model).__name__} has no per-block outputs: it needs forward_intermediates(x) -> "
            "(final, [block outputs]) as timm's and gspn's ViTs have (see docs/distillation.md)",
        )
    out = fn(x)
    if not (
        isinstance(out, tuple)
        and len(out) == 2
        and torch.is_tensor(out[0])
        and isinstance(out[1], (list, tuple))
        and len(out[1]) > 0
        and all(torch.is_tensor(t) for t in out[1])
    ):
        raise ConfigError(
            who, f"{type(model).__name__}.forward_intermediates(x) must return (final tensor, [one tensor per block])"
        )
    return _tokens(out[0], who), [_tokens(t, who) for t in out[1]]


def layer_map(student_depth: int, teacher_depth: int) -> list[int]:
    """The teacher block each student block is supervised with: ``round((i + 1)·Dt / Ds) − 1``.

    >>> layer_map(4, 4), layer_map(2, 4), layer_map(4, 2)
    ([0, 1, 2, 3], [1, 3], [0, 0, 1, 1])
    """
    return [max(0, math.floor((i + 1) * teacher_depth / student_depth + 0.5) - 1) for i in range(student_depth)]


def nmse(s: torch.Tensor, t: torch.Tensor, normalise: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """``mean((s − t)²) / mean(t²)`` (``normalise=False``: the plain MSE); float32 scalar.

    The normaliser is the target's mean square over the whole batch (detached): ``1`` is the error
    of predicting zeros, whatever the scale of the layer's activations.
    """
    s, t = s.float(), t.float()
    err = F.mse_loss(s, t)
    return err / (t.detach().pow(2).mean() + eps) if normalise else err


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))``, averaged over the batch (Hinton et al. 2015)."""
    t = temperature
    return (
        F.kl_div(
            F.log_softmax(student_logits.float() / t, -1),
            F.log_softmax(teacher_logits.float() / t, -1),
            reduction="batchmean",
            log_target=True,
        )
        * t
        * t
    )


class Distiller(nn.Module):
    """Student + adapters (the trainable part; the teacher is held outside the module tree).

    ``forward(x)`` runs the teacher (no grad) and the student, keeps the feature terms of the
    current stage, and returns the student's logits; :meth:`criterion` adds the logit terms. This lets
    :func:`gspn.training_utils.train_one_epoch` (and DDP) run a distillation step unchanged.

    ``cfg`` is the run's :class:`~gspn.recipes.encoder_distillation.EncoderDistillationConfig` (its
    ``stage1_inputs``, ``feature_loss`` and loss weights).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        cfg: Any,
        mapping: list[int],
        s_widths: list[int],
        t_widths: list[int],
        s_final: int,
        t_final: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.student = student
        self._teacher = (teacher,)  # not a submodule: frozen, not in state dicts or DDP
        self.cfg = cfg
        self.mapping = mapping
        self.num_classes = num_classes

        def adapter(cs: int, ct: int) -> nn.Module:
            return nn.Linear(cs, ct) if cs != ct else nn.Identity()

        self.adapters = nn.ModuleList(adapter(s_widths[i], t_widths[j]) for i, j in enumerate(mapping))
        self.final_adapter = adapter(s_final, t_final)
        self.stage = 1
        self.reset_sums()

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def reset_sums(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self._parts: dict[str, torch.Tensor] = {}
        self._teacher_logits: torch.Tensor | None = None

    def set_stage(self, stage: int) -> None:
        """Freeze what the stage's loss does not reach (DDP needs every trainable parameter used)."""
        cfg = self.cfg
        self.stage = stage
        layers = stage == 1 or cfg.feature_weight > 0
        logits = stage == 2 and (cfg.kd_weight > 0 or cfg.label_weight > 0)
        self.student.requires_grad_(True)
        self.adapters.requires_grad_(layers)
        self.final_adapter.requires_grad_(stage == 2 and cfg.output_weight > 0)
        head = getattr(self.student, "head", None)
        if head is not None:
            head.requires_grad_(logits)

    def _layer_loss(self, s_blocks: list[torch.Tensor], t_blocks: list[torch.Tensor]) -> torch.Tensor:
        norm = self.cfg.feature_loss == "nmse"
        terms = [nmse(a(s), t_blocks[j], norm) for a, s, j in zip(self.adapters, s_blocks, self.mapping, strict=True)]
        return torch.stack(terms).mean()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg, stage = self.cfg, self.stage
        teacher = self.teacher
        need_t_logits = stage == 2 and cfg.kd_weight > 0
        with torch.no_grad():
            t_final_map, t_maps = teacher.forward_intermediates(x)
            t_final, t_blocks = _tokens(t_final_map, "teacher"), [_tokens(t, "teacher") for t in t_maps]
            self._teacher_logits = teacher.forward_head(t_final_map) if need_t_logits else None
        parts: dict[str, torch.Tensor] = {}
        if stage == 1 and cfg.stage1_inputs == "teacher":
            student = self.student
            h = student.patch_embed(x).permute(0, 2, 3, 1)  # (B, h, w, D)
            outs = []
            for i, block in enumerate(student.blocks):
                inp = h if i == 0 else t_blocks[i - 1].reshape(h.shape)  # the teacher's tokens on the grid
                outs.append(_tokens(block(inp).permute(0, 3, 1, 2), "model"))
            parts["layer"] = self._layer_loss(outs, t_blocks)
            self._parts = parts
            return torch.zeros(x.shape[0], self.num_classes, device=x.device)
        s_final_map, s_maps = self.student.forward_intermediates(x)
        s_final, s_blocks = _tokens(s_final_map, "model"), [_tokens(t, "model") for t in s_maps]
        if stage == 1 or cfg.feature_weight > 0:
            parts["layer"] = self._layer_loss(s_blocks, t_blocks)
        if stage == 2 and cfg.output_weight > 0:
            parts["output"] = nmse(self.final_adapter(s_final), t_final, cfg.feature_loss == "nmse")
        self._parts = parts
        if stage == 1:
            with torch.no_grad():
                return self.student.forward_head(s_final_map)
        return self.student.forward_head(s_final_map)

    def criterion(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The stage's loss from the terms :meth:`forward` kept and the logits; accumulates the parts."""
        cfg, parts = self.cfg, dict(self._parts)
        if self.stage == 2:
            if cfg.kd_weight > 0:
                parts["kd"] = kd_loss(logits, self._teacher_logits, cfg.kd_temperature)
            if cfg.label_weight > 0:
                parts["label"] = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        weights = (
            {"layer": 1.0}
            if self.stage == 1
            else {
                "layer": cfg.feature_weight,
                "output": cfg.output_weight,
                "kd": cfg.kd_weight,
                "label": cfg.label_weight,
            }
        )
        loss = sum(weights[k] * v for k, v in parts.items())
        bs = y.numel()
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, torch.zeros((), dtype=torch.float64, device=v.device)) + v.detach() * bs
        self._parts, self._teacher_logits = {}, None
        return loss
