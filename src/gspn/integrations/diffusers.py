"""GSPN in place of the self-attention of diffusers UNets (SD-1.5, SD-2, SD-XL layouts).

The integration goes through diffusers' own extension point, the attention *processor*:

* :class:`GSPNAttnProcessor` is a trainable processor (an ``nn.Module``) that replaces the
  softmax self-attention of one ``attn1`` layer by a :class:`gspn.nn.GSPNAttention` token mixer of
  the same width whose output projection starts as the layer's ``to_out``.
* :class:`GSPNAdapter` (a diffusers ``ModelMixin`` + ``ConfigMixin``) owns the processors of a
  UNet, so ``save_pretrained``/``from_pretrained`` write and read safetensors plus a
  ``config.json``; :meth:`GSPNAdapter.mount` installs them with ``unet.set_attn_processor`` (only
  the ``attn1`` entries change; cross-attention stays) and :meth:`GSPNAdapter.unmount` restores
  the original processors.
* The UNet does not pass the spatial size to attention. :meth:`GSPNAdapter.mount` therefore
  gives every ``Transformer2DModel`` that owns a swapped layer a forward pre-hook that adds the
  ``(H, W)`` of the ``(B, C, H, W)`` map of the call to that call's ``cross_attention_kwargs``
  (``{"hw": (H, W)}``), which diffusers hands to the blocks and their attention layers: each GSPN
  processor gets the grid *as an argument of its call* (``hw=``), and the other processors of
  those transformers never see it (an attention pre-hook removes it). Nothing is guessed from the
  token count and nothing is left over from another call, so any latent shape works, square or
  not, sizes never seen in training included (GSPN has no positional embedding), and so does
  gradient checkpointing, which recomputes a block from the arguments it was called with, the
  grid included.
* Mount state lives in the UNet and its modules, not in the adapter: the hooks are stateless
  functions (and one plain-data check on the UNet), so ``copy.deepcopy(unet)``,
  ``torch.optim.swa_utils.AveragedModel(unet)`` (EMA copies), ``torch.save(unet)`` /
  ``torch.load(..., weights_only=False)`` and ``torch.compile(unet)`` compute exactly what the
  UNet computes, at every latent shape, each copy with its own processors.
* Offloading works: the processor's :meth:`~GSPNAttnProcessor.forward` receives tensors and the
  grid only (the host ``Attention`` stays out of it), and everything with weights is called
  through its module, so accelerate's hooks (``accelerate.cpu_offload``, i.e.
  ``pipe.enable_sequential_cpu_offload()``, and ``cpu_offload_with_hook``, i.e.
  ``pipe.enable_model_cpu_offload()``) load and offload the GSPN weights like any other.
* Mount state is read from the UNet: :attr:`GSPNAdapter.mounted_unet` is ``None`` once anything
  (``set_attention_slice``, ``set_attn_processor``, ...) has replaced a GSPN processor, a forward
  through such a UNet warns, and :meth:`GSPNAdapter.mount` puts the processors back.

:func:`swap_self_attention` does both steps in one call. :class:`ChunkedAttnProcessor` is an exact,
memory-frugal softmax attention (queries processed in chunks) for the remaining cross-attention
at very high resolution; :func:`enable_chunked_cross_attention` installs it on every layer that
is not a GSPN layer.

Example:
    >>> from diffusers import UNet2DConditionModel  # doctest: +SKIP
    >>> adapter = swap_self_attention(unet, d_state=8)  # doctest: +SKIP
    >>> adapter.save_pretrained("gspn-adapter")  # doctest: +SKIP
    >>> GSPNAdapter.from_pretrained("gspn-adapter").mount(pipe)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..nn import GSPNAttention

__all__ = [
    "ChunkedAttnProcessor",
    "GSPNAdapter",
    "GSPNAttnProcessor",
    "enable_chunked_cross_attention",
    "find_self_attention",
    "get_unet",
    "swap_self_attention",
]

_PROC_SUFFIX = ".processor"


def get_unet(pipe_or_unet: Any) -> nn.Module:
    """The UNet of a pipeline (its ``.unet``), or the argument itself if it is the UNet."""
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    if not hasattr(unet, "attn_processors") or not hasattr(unet, "set_attn_processor"):
        raise TypeError(f"expected a diffusers UNet or a pipeline with a .unet, got {type(pipe_or_unet).__name__}")
    return unet


def find_self_attention(unet: nn.Module) -> list[str]:
    """Processor keys (``"...attn1.processor"``) of every self-attention layer of ``unet``.

    A layer qualifies when its name ends in ``attn1`` and it is not a cross-attention layer
    (diffusers' ``Attention.is_cross_attention``). Order: ``unet.attn_processors`` order.
    """
    names = []
    for key in get_unet(unet).attn_processors:
        path = key[: -len(_PROC_SUFFIX)]
        if not path.endswith("attn1"):
            continue
        attn = unet.get_submodule(path)
        if isinstance(attn, Attention) and not attn.is_cross_attention:
            names.append(key)
    return names


class GSPNAttnProcessor(nn.Module):
    r"""A trainable diffusers attention processor: GSPN instead of softmax self-attention.

    ::

        tokens (B, H·W, C) → GSPNAttention(C) on the (H, W) grid → + bias → dropout

    The mixer's own output projection plays the part of the host's ``to_out`` (one ``C × C``
    matmul, not two); only a host whose output width differs from ``C`` gets an extra
    ``to_out`` linear ``C → out_dim``.

    The group/spatial norms, ``residual_connection`` and ``rescale_output_factor`` of the host
    ``Attention`` are honoured as in diffusers' reference processor; ``to_q``/``to_k``/``to_v``
    of the host are not used (the paper's "pure" mode).

    Calling the processor (``proc(attn, hidden_states, ..., hw=...)``, diffusers' processor
    interface) runs the host's norms, then this module's :meth:`forward` on the tokens
    (``(B, H·W, C) → (B, H·W, out_dim)``; tensors and the grid only, so hooks on the processor —
    accelerate's offload hooks, forward hooks — never receive the host module), then the host's
    output dropout, residual and rescale.

    The token grid ``(H, W)`` of a call comes, in this order, from a 4-D input ``(B, C, H, W)``, from
    the ``hw=`` argument of the call (a mounted :class:`GSPNAdapter` passes it on every call), from
    the attribute :attr:`hw` (``None`` unless you set it, for direct calls), or, for a perfect-square
    token count only, is inferred. A grid whose ``H·W`` differs from the token count raises
    ``RuntimeError``.

    Args:
        query_dim: token width ``C`` of the host layer.
        out_dim: output width of the host layer.
        out_bias: whether the output projection has a bias (as the host's ``to_out[0]``).
        d_state, expand, kernel_size, chunk_size, gate_channels, backend: options of
            :class:`gspn.nn.GSPNAttention`.
    """

    def __init__(
        self,
        query_dim: int,
        out_dim: int | None = None,
        out_bias: bool = True,
        *,
        d_state: int = 8,
        expand: float = 1.0,
        kernel_size: int = 3,
        chunk_size: int | None = None,
        gate_channels: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        out_dim = query_dim if out_dim is None else out_dim
        self.mixer = GSPNAttention(
            query_dim,
            d_state=d_state,
            expand=expand,
            kernel_size=kernel_size,
            chunk_size=chunk_size,
            gate_channels=gate_channels,
            backend=backend,
        )
        if out_dim == query_dim:
            self.to_out: nn.Linear | None = None
            self.out_bias = nn.Parameter(torch.zeros(out_dim)) if out_bias else None
        else:
            self.to_out = nn.Linear(query_dim, out_dim, bias=out_bias)
            self.out_bias = None
        self.hw: tuple[int, int] | None = None  # fixed grid for direct calls; the adapter never sets it
        self.bypass = False  # teacher mode: run the host's own softmax attention instead
        self._warned: set[str] = set()  # one-time warnings already given (shared by an adapter's processors)

    @torch.no_grad()
    def init_from_attention(self, attn: Attention) -> list[str]:
        """Initialise from the host layer where the shapes allow; returns what was copied.

        * ``mixer.out_proj`` (and the bias): copied from ``attn.to_out[0]`` — same output subspace
          and scale as the original layer — when ``d_inner`` equals the host's inner width
          (``expand=1`` in SD UNets); with a separate ``to_out`` (host output width ≠ ``C``) that
          one takes the copy and ``mixer.out_proj`` starts as the identity when square;
        * ``mixer.in_proj``: copied from ``attn.to_v`` when ``d_inner`` equals the host's inner
          width (GSPN propagates the values, as attention averages them).
        """
        copied = []
        host = attn.to_out[0]
        mixer = self.mixer
        if self.to_out is None:
            if host.weight.shape == mixer.out_proj.weight.shape:
                mixer.out_proj.weight.copy_(host.weight)
                copied.append("out_proj")
            if self.out_bias is not None and host.bias is not None and copied:
                self.out_bias.copy_(host.bias)
                copied.append("out_bias")
        else:
            if host.weight.shape == self.to_out.weight.shape:
                self.to_out.weight.copy_(host.weight)
                if self.to_out.bias is not None and host.bias is not None:
                    self.to_out.bias.copy_(host.bias)
                copied.append("to_out")
            if mixer.out_proj.weight.shape[0] == mixer.out_proj.weight.shape[1]:
                mixer.out_proj.weight.copy_(torch.eye(mixer.out_proj.weight.shape[0]))
                copied.append("out_proj=identity")
        if attn.to_v.weight.shape == mixer.in_proj.weight.shape:
            mixer.in_proj.weight.copy_(attn.to_v.weight)
            copied.append("in_proj")
        return copied

    def __call__(  # type: ignore[override]
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        scale: float | None = None,
        hw: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The diffusers processor call: ``attn`` is the host ``Attention``, ``hidden_states`` its
        input, ``(B, H·W, C)`` or ``(B, C, H, W)``; returns the same layout (channels: the host's
        output width). ``hw`` is the token grid of this call (see the class docstring). ``scale``
        (the legacy LoRA scale) and any other ``cross_attention_kwargs`` are accepted and ignored.

        The host's norms run here (through their own modules); the token mixing runs through this
        module's :meth:`forward`, which receives tensors and the grid only, so hooks on the
        processor (accelerate's offload hooks, forward hooks) never see the host module.

        Raises:
            ValueError: ``encoder_hidden_states`` is given (GSPN replaces self-attention only).
            RuntimeError: the grid does not fit the token count.
        """
        if self.bypass:
            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if encoder_hidden_states is not None:
            raise ValueError("GSPNAttnProcessor replaces self-attention only; got encoder_hidden_states")
        if attention_mask is not None and "attention_mask" not in self._warned:
            self._warned.add("attention_mask")
            warnings.warn("GSPNAttnProcessor ignores attention_mask (GSPN mixes the full grid)", stacklevel=2)
        tokens, residual, grid = _tokens_in(attn, hidden_states, temb)
        out = super().__call__(tokens, hw=grid or hw)
        return _tokens_out(attn, attn.to_out[1](out), residual, grid)

    def forward(self, tokens: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        """GSPN token mixing plus output bias (or ``to_out``): ``(B, H·W, C) → (B, H·W, out_dim)``.

        ``hw`` is the grid (default: the attribute :attr:`hw`; neither: inferred for a square token
        count only). Raises ``RuntimeError`` when ``H·W`` differs from the token count, and
        ``ValueError`` (from :func:`gspn.nn.resolve_hw`) when no grid is given and the count is not a
        perfect square.
        """
        hw = hw or self.hw
        num_tokens = tokens.shape[1]
        if hw is not None and hw[0] * hw[1] != num_tokens:
            raise RuntimeError(f"GSPN layer got {num_tokens} tokens but a grid of {tuple(hw)} for this call")
        out = self.mixer(tokens, hw=hw)
        if self.to_out is not None:
            return self.to_out(out)
        if self.out_bias is not None:
            return out + self.out_bias
        return out


def _tokens_in(
    attn: Attention, hidden_states: torch.Tensor, temb: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int] | None]:
    """diffusers' processor prologue: spatial norm, ``(B, C, H, W) → (B, H·W, C)``, group norm.

    Returns ``(tokens, residual, grid)``; ``grid`` is ``(H, W)`` for a 4-D input, else ``None``.
    """
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    grid = None
    if hidden_states.ndim == 4:
        b, c, height, width = hidden_states.shape
        grid = (height, width)
        hidden_states = hidden_states.reshape(b, c, height * width).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, residual, grid


def _tokens_out(
    attn: Attention, out: torch.Tensor, residual: torch.Tensor, grid: tuple[int, int] | None
) -> torch.Tensor:
    """diffusers' processor epilogue: back to ``(B, C, H, W)`` if needed, residual, output rescale."""
    if grid is not None:
        out = out.transpose(1, 2).reshape(out.shape[0], -1, *grid)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def _owner_path(unet: nn.Module, attn_path: str) -> str:
    """The nearest ancestor of ``attn_path`` that receives ``(B, C, H, W)`` maps (a 2-D transformer)."""
    parts = attn_path.split(".")
    for n in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:n])
        module = unet.get_submodule(prefix)
        if hasattr(module, "is_input_continuous") or type(module).__name__.endswith("Transformer2DModel"):
            return prefix
    raise ValueError(f"no 2-D transformer encloses {attn_path}; cannot recover its (H, W)")


def _grid_of_map(module: nn.Module, x: Any) -> tuple[int, int] | None:
    """The token grid of the ``(B, C, H, W)`` map ``x`` a 2-D transformer receives (``None`` if not a map)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        return None
    height, width = int(x.shape[-2]), int(x.shape[-1])
    if getattr(module, "is_input_patches", False):
        patch = int(module.patch_size)
        height, width = height // patch, width // patch
    return height, width


_GRID_KWARG = "hw"  # the cross_attention_kwargs entry that carries a transformer call's token grid


def _cross_attention_kwargs_position(transformer: nn.Module, path: str) -> int:
    """Position of ``cross_attention_kwargs`` among the positional arguments of ``transformer``'s
    forward (``self`` excluded). Raises ``ValueError`` if its forward has no such parameter."""
    params = list(inspect.signature(type(transformer).forward).parameters)[1:]
    if "cross_attention_kwargs" not in params:
        raise ValueError(f"{path} ({type(transformer).__name__}) takes no cross_attention_kwargs; cannot pass the grid")
    return params.index("cross_attention_kwargs")


def _pass_grid(transformer: nn.Module, args: tuple, kwargs: dict, *, position: int) -> tuple[tuple, dict] | None:
    """Forward pre-hook of a 2-D transformer that encloses GSPN layers (registered by
    :meth:`GSPNAdapter.mount` as ``functools.partial(_pass_grid, position=...)``).

    Adds the grid of the ``(B, C, H, W)`` map of this call to the call's ``cross_attention_kwargs``
    (a new dict; the caller's is not modified), which the transformer hands to its blocks and they
    to their attention layers. The grid thus travels with the arguments of the call: a block
    recomputed by gradient checkpointing gets it again with the arguments it is recomputed from,
    and the hook keeps no state, so a copy of the UNet (``copy.deepcopy``, pickling) works alone.
    """
    x = args[0] if args else kwargs.get("hidden_states")
    grid = _grid_of_map(transformer, x)
    if grid is None:
        return None
    if len(args) > position:
        extra = {**(args[position] or {}), _GRID_KWARG: grid}
        return (*args[:position], extra, *args[position + 1 :]), kwargs
    extra = {**(kwargs.get("cross_attention_kwargs") or {}), _GRID_KWARG: grid}
    return args, {**kwargs, "cross_attention_kwargs": extra}


def _route_grid(attn: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of every attention layer inside a transformer with GSPN layers: the grid
    (``hw=``) reaches a GSPN processor and is removed for any other processor (cross-attention, or
    a GSPN layer whose processor was replaced), which would not accept it."""
    if _GRID_KWARG not in kwargs or isinstance(getattr(attn, "processor", None), GSPNAttnProcessor):
        return None
    return args, {k: v for k, v in kwargs.items() if k != _GRID_KWARG}


class _MountCheck:
    """Forward pre-hook of a UNet with a mounted adapter: warns, once per mount, when some of the
    swapped layers no longer have a GSPN processor (``set_attention_slice``, ...).

    It holds the layers' processor keys and whether it has warned, plain data read against the
    UNet it is called on: a copy of the UNet (``copy.deepcopy``, pickling) carries its own check of
    its own layers, and a replica sharing the hook (``DataParallel``) checks the replica's layers.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.warned = False

    def __call__(self, unet: nn.Module, args: tuple) -> None:
        if self.warned:
            return
        replaced = [(name, _processor_of(unet, name)) for name in self.names]
        replaced = [(name, proc) for name, proc in replaced if not isinstance(proc, GSPNAttnProcessor)]
        if not replaced:
            return
        self.warned = True
        name, proc = replaced[0]
        warnings.warn(
            f"{len(replaced)} of the {len(self.names)} GSPN processors of this adapter were replaced in "
            f"the UNet (e.g. {name} now has {type(proc).__name__}; set_attention_slice / "
            "enable_attention_slicing / set_attn_processor do that): those layers are NOT running GSPN. "
            "Call adapter.mount(unet) to put them back (enable_chunked_cross_attention saves memory "
            "without removing them), or adapter.unmount() to run the original attention.",
            stacklevel=4,
        )


def _processor_of(unet: nn.Module, name: str) -> Any:
    """The processor of the layer with processor key ``name`` (``None`` if the layer is gone)."""
    try:
        return getattr(unet.get_submodule(name[: -len(_PROC_SUFFIX)]), "processor", None)
    except AttributeError:
        return None


@dataclass
class _Mount:
    unet: nn.Module
    originals: dict[str, Any]
    check: _MountCheck
    handles: list[Any] = field(default_factory=list)


class GSPNAdapter(ModelMixin, ConfigMixin):
    """The GSPN processors of one UNet, as a diffusers model (``save_pretrained``/``from_pretrained``).

    Build it with :meth:`from_unet` (or :func:`swap_self_attention`), install it with
    :meth:`mount`. The config records, per swapped layer, its processor key and widths, plus the
    GSPN options, so ``from_pretrained`` rebuilds the exact module tree.

    Args:
        layer_names: processor keys of the swapped layers (``"...attn1.processor"``).
        query_dims / out_dims / out_biases: per layer, the host's token width, output width and
            whether its ``to_out`` has a bias.
        d_state, expand, kernel_size, chunk_size, gate_channels, backend: GSPN options shared by
            all layers (see :class:`gspn.nn.GSPNAttention`).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        layer_names: list[str],
        query_dims: list[int],
        out_dims: list[int],
        out_biases: list[bool],
        d_state: int = 8,
        expand: float = 1.0,
        kernel_size: int = 3,
        chunk_size: int | None = None,
        gate_channels: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not len(layer_names) == len(query_dims) == len(out_dims) == len(out_biases):
            raise ValueError("layer_names, query_dims, out_dims and out_biases must have the same length")
        self.processors = nn.ModuleList(
            GSPNAttnProcessor(
                q,
                o,
                bool(bias),
                d_state=d_state,
                expand=expand,
                kernel_size=kernel_size,
                chunk_size=chunk_size,
                gate_channels=gate_channels,
                backend=backend,
            )
            for q, o, bias in zip(query_dims, out_dims, out_biases, strict=True)
        )
        self._warned: set[str] = set()
        for proc in self.processors:  # one-time warnings are given once per adapter, not per layer
            proc._warned = self._warned
        self._mount: _Mount | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_unet(
        cls,
        unet: Any,
        *,
        d_state: int = 8,
        expand: float = 1.0,
        kernel_size: int = 3,
        chunk_size: int | None = None,
        gate_channels: int | None = None,
        backend: str = "auto",
        init_from_attention: bool = True,
    ) -> GSPNAdapter:
        """An adapter with one GSPN processor per self-attention layer of ``unet`` (not mounted).

        With ``init_from_attention`` each processor copies what fits from its layer (see
        :meth:`GSPNAttnProcessor.init_from_attention`). The adapter gets the UNet's device and dtype.

        Raises:
            ValueError: the UNet has no self-attention layers, or its weights are offloaded to the
                ``meta`` device (build the adapter before ``accelerate.cpu_offload``).
        """
        unet = get_unet(unet)
        names = find_self_attention(unet)
        if not names:
            raise ValueError("the UNet has no self-attention (attn1) layers")
        attns = [unet.get_submodule(n[: -len(_PROC_SUFFIX)]) for n in names]
        adapter = cls(
            layer_names=names,
            query_dims=[int(a.query_dim) for a in attns],
            out_dims=[int(a.to_out[0].out_features) for a in attns],
            out_biases=[a.to_out[0].bias is not None for a in attns],
            d_state=d_state,
            expand=expand,
            kernel_size=kernel_size,
            chunk_size=chunk_size,
            gate_channels=gate_channels,
            backend=backend,
        )
        adapter._follow(unet)
        if init_from_attention:
            for proc, attn in zip(adapter.processors, attns, strict=True):
                proc.init_from_attention(attn)
        return adapter

    def _follow(self, unet: nn.Module) -> None:
        """Move to the device and dtype of ``unet`` (only what differs).

        Raises ``ValueError`` when the UNet's weights are offloaded to the ``meta`` device
        (``accelerate.cpu_offload``, ``enable_sequential_cpu_offload``) and the adapter's are not:
        moving there would discard the adapter's weights, and processors added after offloading
        have no offload hooks. Build and mount the adapter first, then offload.
        """
        ref = next(unet.parameters())
        own = next(self.parameters())
        if ref.device.type == "meta" and own.device.type != "meta":
            raise ValueError(
                "the UNet's weights are offloaded to the meta device (accelerate.cpu_offload / "
                "enable_sequential_cpu_offload): build and mount the GSPN adapter before offloading"
            )
        if own.dtype != ref.dtype:
            nn.Module.to(self, dtype=ref.dtype)  # (ModelMixin.to would warn about fp32 modules: none)
        if own.device != ref.device:
            nn.Module.to(self, device=ref.device)

    # ------------------------------------------------------------------ mounting
    @property
    def mounted_unet(self) -> nn.Module | None:
        """The UNet the adapter is mounted on, or ``None``: also ``None`` when any of its GSPN
        processors has since been replaced in the UNet (e.g. by ``set_attention_slice``), which is
        read from the UNet itself; :meth:`mount` puts them back."""
        if self._mount is None or self.replaced_layers():
            return None
        return self._mount.unet

    def replaced_layers(self) -> list[str]:
        """Processor keys of the mounted UNet's layers whose processor is no longer this adapter's
        (``[]`` when all are in place or the adapter is not mounted)."""
        if self._mount is None:
            return []
        unet = self._mount.unet
        return [
            name
            for name, proc in zip(self.config.layer_names, self.processors, strict=True)
            if _processor_of(unet, name) is not proc
        ]

    def mount(self, pipe_or_unet: Any) -> GSPNAdapter:
        """Install the GSPN processors into a pipeline's UNet (or a UNet); returns ``self``.

        Only the adapter's ``attn1`` entries of ``unet.attn_processors`` change; the others are
        passed back unchanged through ``set_attn_processor``. The adapter is moved to the UNet's
        device and dtype. Every 2-D transformer enclosing a swapped layer gets a forward pre-hook
        that adds the ``(H, W)`` of the map it is called with to the ``cross_attention_kwargs`` of
        that call (so each GSPN processor receives ``hw=``), its attention layers a pre-hook that
        removes that entry for processors other than GSPN ones, and the UNet a pre-hook that warns
        when GSPN processors were replaced. The hooks keep no state between calls and no
        reference to the adapter: a copy of the mounted UNet (``copy.deepcopy``,
        ``torch.optim.swa_utils.AveragedModel``, ``torch.save``/``torch.load`` of the whole module)
        computes what the UNet computes, with its own processors. Mounting again on the same UNet
        puts back any GSPN processor that was replaced since (and is a no-op otherwise); mounting
        on a second UNet unmounts from the first.

        Raises:
            ValueError: the UNet lacks one of the adapter's layers, a layer's width differs, a
                layer already has another adapter's GSPN processor, a layer is not inside a 2-D
                transformer that takes ``cross_attention_kwargs``, or the UNet's weights are
                offloaded to ``meta`` (sequential offload) and the adapter's are not: mount first,
                then offload (model offload, which moves whole modules, may come before or after).
        """
        unet = get_unet(pipe_or_unet)
        if self._mount is not None:
            if self._mount.unet is unet:
                replaced = set(self.replaced_layers())
                if replaced:
                    self._install(unet, replaced)
                    self._mount.check.warned = False
                return self
            self.unmount()
        current = unet.attn_processors
        names = list(self.config.layer_names)
        missing = [n for n in names if n not in current]
        if missing:
            raise ValueError(f"the UNet has no attention layers {missing[:3]}... (adapter built for another UNet?)")
        paths = [n[: -len(_PROC_SUFFIX)] for n in names]
        for name, path, qdim in zip(names, paths, self.config.query_dims, strict=True):
            attn = unet.get_submodule(path)
            if int(attn.query_dim) != qdim:
                raise ValueError(f"{name}: the UNet layer has width {attn.query_dim}, the adapter {qdim}")
        owners = {}  # path -> (module, position of cross_attention_kwargs), checked before anything changes
        for path in paths:
            owner = _owner_path(unet, path)
            if owner not in owners:
                module = unet.get_submodule(owner)
                owners[owner] = module, _cross_attention_kwargs_position(module, owner)
        originals = {n: current[n] for n in names}
        self._install(unet, set(names))
        check = _MountCheck(names)
        mount = _Mount(unet, originals, check)
        mount.handles.append(unet.register_forward_pre_hook(check))
        routed: set[int] = set()
        for module, position in owners.values():
            hook = functools.partial(_pass_grid, position=position)
            mount.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            for sub in module.modules():
                if hasattr(sub, "set_processor") and id(sub) not in routed:
                    routed.add(id(sub))
                    mount.handles.append(sub.register_forward_pre_hook(_route_grid, with_kwargs=True))
        self._mount = mount
        return self

    def _install(self, unet: nn.Module, names: set[str]) -> None:
        """Set this adapter's processors on the layers ``names`` of ``unet``, the others unchanged."""
        current = unet.attn_processors
        ours = dict(zip(self.config.layer_names, self.processors, strict=True))
        foreign = [n for n in sorted(names) if isinstance(current[n], GSPNAttnProcessor) and current[n] is not ours[n]]
        if foreign:
            raise ValueError(
                f"{foreign[0]} already has a GSPN processor of another adapter, or of a copy of a mounted UNet "
                "(copy.deepcopy, AveragedModel and torch.save carry the processors, which then belong to no "
                "adapter): unmount that adapter first, or copy the UNet before mounting (or after unmounting)"
            )
        self._follow(unet)
        current.update({n: ours[n] for n in names})
        unet.set_attn_processor(current)

    def unmount(self) -> None:
        """Restore the original processors of the mounted UNet and remove the hooks (no-op if unmounted)."""
        mount, self._mount = self._mount, None
        if mount is None:
            return
        for handle in mount.handles:
            handle.remove()
        current = mount.unet.attn_processors
        current.update(mount.originals)
        mount.unet.set_attn_processor(current)

    @contextlib.contextmanager
    def teacher_mode(self) -> Iterator[None]:
        """Within the context the mounted layers run the original softmax attention (with the
        host's frozen ``to_q/k/v/out``), so one UNet serves as both teacher and student."""
        for proc in self.processors:
            proc.bypass = True
        try:
            yield
        finally:
            for proc in self.processors:
                proc.bypass = False

    def layer_modules(self) -> dict[str, nn.Module]:
        """The mounted UNet's host ``Attention`` modules by layer path (for feature hooks)."""
        if self._mount is None:
            raise RuntimeError("the adapter is not mounted")
        unet = self._mount.unet
        paths = [n[: -len(_PROC_SUFFIX)] for n in self.config.layer_names]
        return {p: unet.get_submodule(p) for p in paths}


def swap_self_attention(pipe_or_unet: Any, **gspn_options: Any) -> GSPNAdapter:
    """Replace every self-attention (``attn1``) of a UNet by GSPN; returns the mounted adapter.

    ``gspn_options`` go to :meth:`GSPNAdapter.from_unet` (``d_state``, ``expand``,
    ``kernel_size``, ``chunk_size``, ``gate_channels``, ``backend``, ``init_from_attention``).
    Cross-attention layers keep their processors. ``adapter.unmount()`` undoes the swap.
    """
    return GSPNAdapter.from_unet(pipe_or_unet, **gspn_options).mount(pipe_or_unet)


class ChunkedAttnProcessor:
    """Exact softmax attention computed over chunks of ``chunk_tokens`` queries.

    Peak memory of the score matrix is ``heads · chunk_tokens · keys`` instead of
    ``heads · queries · keys``: with the 77 text tokens of cross-attention the memory no longer
    grows with the number of latent positions beyond the activations themselves.
    """

    def __init__(self, chunk_tokens: int = 4096) -> None:
        if chunk_tokens <= 0:
            raise ValueError("chunk_tokens must be positive")
        self.chunk_tokens = chunk_tokens

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        scale: float | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """diffusers' processor signature; extra keyword arguments are ignored."""
        hidden_states, residual, grid = _tokens_in(attn, hidden_states, temb)
        batch, _, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        key_len = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        outs = []
        num_q = hidden_states.shape[1]
        for start in range(0, num_q, self.chunk_tokens):
            chunk = hidden_states[:, start : start + self.chunk_tokens]
            query = attn.to_q(chunk).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            mask = attention_mask
            if mask is not None and mask.shape[-2] == num_q:
                mask = mask[..., start : start + self.chunk_tokens, :]
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scale)
            out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
            outs.append(attn.to_out[1](attn.to_out[0](out)))
        return _tokens_out(attn, torch.cat(outs, dim=1), residual, grid)


def enable_chunked_cross_attention(pipe_or_unet: Any, chunk_tokens: int = 4096) -> int:
    """Give every attention layer that is not a GSPN layer a :class:`ChunkedAttnProcessor`.

    Use it instead of ``pipe.enable_attention_slicing()``, which would also replace the GSPN
    processors. Returns the number of layers changed.
    """
    unet = get_unet(pipe_or_unet)
    procs = unet.attn_processors
    changed = 0
    for name, proc in procs.items():
        if not isinstance(proc, GSPNAttnProcessor):
            procs[name] = ChunkedAttnProcessor(chunk_tokens)
            changed += 1
    unet.set_attn_processor(procs)
    return changed
