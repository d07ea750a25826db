"""What a family of the authors' checkpoints declares so that :mod:`gspn.models.reference_checkpoints`
can read it into this library's models (:class:`ReferenceKeyMap`), and the rule every family
shares: the channel order of the GSPN layer.

Each family's map stands next to its model (:mod:`gspn.models.gspn_vision_keys` for the
classifiers, :mod:`gspn.models.gspn_dit_keys` for GSPN-DiT).

Value conversion: the reference orders the direction-dependent channels ``[gate][direction][c]``
(w) and ``[direction][c]`` (λ, u, D), with its direction ``k`` = scan frame ``x``, ``xᵀ``,
``flip(x)``, ``flip(xᵀ)``; this library orders ``[direction][gate][c]`` with directions
``(tb, bt, lr, rl)``. Reference direction ``k`` goes to slot ``DIRECTION_SLOT[k]``
(``lr, tb, rl, bt``), the merger's columns likewise; GRN's ``(1, C, 1, 1)`` γ/β become ``(C,)``
(size-1 dimensions are adapted against the model when the state is fitted).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DIRECTION_SLOT", "GSPN_PARAMS", "ReferenceKeyMap", "convert_gspn_value"]

DIRECTION_SLOT: tuple[int, ...] = (2, 0, 3, 1)
"""Reference direction ``k`` (scan frames ``x, xᵀ, flip(x), flip(xᵀ)``) → slot in ``gspn.ops.DIRECTIONS``."""

GSPN_PARAMS = ("x_conv_down", "w_conv_up", "l_conv_up", "u_conv_up", "d_conv", "m_conv")
"""The parameter modules of a reference GSPN layer, named alike in :class:`gspn.nn.GSPN2d`."""


def _rows_per_block(t: torch.Tensor, blocks: int, name: str) -> int:
    if t.ndim < 1 or t.shape[0] % blocks:
        raise ValueError(f"reference tensor {name} has shape {list(t.shape)}: its rows are not {blocks} blocks")
    return t.shape[0] // blocks


def convert_gspn_value(name: str, t: torch.Tensor, ref_name: str) -> torch.Tensor:
    """Reorder the direction-dependent channels of a GSPN tensor (see the module docstring); any
    other tensor is returned as it is.

    Args:
        name: this library's name of the tensor.
        t: the reference tensor (any device, ``meta`` included).
        ref_name: its reference name (for error messages).

    Raises:
        ValueError: a malformed GSPN tensor (named).
    """
    s = DIRECTION_SLOT
    if name.endswith("gspn.w_conv_up.weight"):
        d = _rows_per_block(t, 12, ref_name)
        perm = torch.empty(12 * d, dtype=torch.long)
        for k in range(4):
            for g in range(3):  # ref row g·4D + k·D + c → ours S[k]·3D + g·D + c
                perm[s[k] * 3 * d + g * d : s[k] * 3 * d + (g + 1) * d] = torch.arange(d) + g * 4 * d + k * d
        return t.index_select(0, perm.to(t.device))
    if name.endswith(("gspn.l_conv_up.weight", "gspn.u_conv_up.weight", "gspn.d_conv.weight")):
        d = _rows_per_block(t, 4, ref_name)
        perm = torch.empty(4 * d, dtype=torch.long)
        for k in range(4):  # ref row k·D + c → ours S[k]·D + c
            perm[s[k] * d : (s[k] + 1) * d] = torch.arange(d) + k * d
        return t.index_select(0, perm.to(t.device))
    if name.endswith("gspn.m_conv.weight"):
        if t.ndim != 4 or t.shape[1] != 4:
            raise ValueError(f"reference tensor {ref_name} has shape {list(t.shape)}, expected (1, 4, 1, 1)")
        inverse = [s.index(j) for j in range(4)]  # ours column S[k] ← ref column k
        return t.index_select(1, torch.tensor(inverse, device=t.device))
    return t


@dataclass(frozen=True)
class ReferenceKeyMap:
    """One family of the authors' checkpoints, as this library reads it.

    Attributes:
        kind: the family's name (``"classifier"``, ``"generator"``).
        default_entry: the state-dict entry loaded by default: what the reference's own
            evaluation / sampler loads.
        reference_args: constructor options that reproduce the reference code's semantics.
        suggest: the registered models to name when a file of this kind meets a model of another.
        fixed: reference module name → ours, for the modules outside the repeated blocks.
        map_block: this library's name of any other reference tensor (``None``: not one of the family's).
        recognises: whether reference tensor names are this family's.
        infer_args: constructor arguments that the tensor shapes (name → shape) determine.
        file_defaults: options the file's own config fixes, given a lookup ``value(key)`` of the
            config (``None`` when absent).
        convert_value: ``(our name, tensor, reference name) → tensor`` in this library's layout.
    """

    kind: str
    default_entry: str
    reference_args: Mapping[str, Any]
    suggest: str
    fixed: Mapping[str, str]
    map_block: Callable[[str], str | None]
    recognises: Callable[[list[str]], bool]
    infer_args: Callable[[Mapping[str, tuple[int, ...]]], dict[str, Any]]
    file_defaults: Callable[[Callable[[str], Any]], dict[str, Any]]
    convert_value: Callable[[str, torch.Tensor, str], torch.Tensor] = convert_gspn_value

    def map_name(self, key: str) -> str | None:
        """This library's name of reference tensor ``key`` (``None``: no such tensor in the reference)."""
        module, _, leaf = key.rpartition(".")
        if module in self.fixed:
            return f"{self.fixed[module]}.{leaf}"
        return self.map_block(key)
