"""Every gspn:: operator, forward and backward, for every input layout: eager, fake and compiled agree.

The rule (docs/operator.md, "dtypes, devices, layouts"): the operators return dense row-major
tensors whatever the layouts of their inputs, and their fake implementations say so, so that
``torch.compile`` (whose generated code asserts the strides the fake implementation promised) works
for channels-last, transposed, expanded and sliced inputs, forward and backward.
"""

from __future__ import annotations

import pytest
import torch

from gspn.ops import line_scan, line_scan_4d

SHAPE = (2, 4, 6, 5)
SHAPE_4D = (2, 4, 4, 6, 5)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.to(memory_format=torch.channels_last if t.ndim == 4 else torch.channels_last_3d)


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values seen through (H, W)-swapped strides."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _expanded(t: torch.Tensor) -> torch.Tensor:
    """Batch and (for parameters) channel strides 0: the first batch/channel broadcast."""
    if t.ndim == 4:
        return t[:1].expand_as(t)
    return t[:1, :, :1].expand_as(t)


def _sliced(t: torch.Tensor) -> torch.Tensor:
    """Every other batch entry and channel of a larger tensor, with padded rows (the plane is not dense)."""
    size = list(t.shape)
    size[0] *= 2
    size[-3] *= 2
    size[-1] += 3
    big = t.new_zeros(size)
    view = big[::2, ..., 1::2, :, 1 : t.shape[-1] + 1]
    view.copy_(t)
    return view


def _permuted(t: torch.Tensor) -> torch.Tensor:
    """A (B, H, W, C)-ordered memory layout reached through a permute (as models produce it)."""
    if t.ndim == 4:
        return t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    return t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


LAYOUTS = {
    "channels_last": _channels_last,
    "transposed": _transposed,
    "expanded": _expanded,
    "sliced": _sliced,
}


DIFFERENTIATED_LAYOUTS = ("channels_last", "sliced")


def _tensors(shape, count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(count)]


def _laid_out(tensors, layout, requires_grad):
    out = [LAYOUTS[layout](t) for t in tensors]
    return [t.requires_grad_(requires_grad) for t in out]


# --- opcheck: schema, fake tensors (sizes *and strides*), autograd registration, AOT dispatch -------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_opcheck_line_scan_layouts(layout):
    x, lam, wl, wm, wr = _laid_out(_tensors(SHAPE, 5), layout, requires_grad=True)
    torch.library.opcheck(torch.ops.gspn.line_scan.default, (x, lam, wl, wm, wr, "lr", 2, True, "cpu"))
    # The backward operator is differentiable too (double backward): with inputs that require grad,
    # opcheck also checks its autograd formula (traced by AOT autograd: slower, so two layouts).
    grad_too = layout in DIFFERENTIATED_LAYOUTS
    g, h = _laid_out(_tensors(SHAPE, 2, seed=1), layout, requires_grad=grad_too)
    args = [t if grad_too else t.detach() for t in (g, h, x, lam, wl, wm, wr)]
    torch.library.opcheck(torch.ops.gspn.line_scan_backward.default, (*args, "tb", None, True, "cpu"))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_opcheck_line_scan_4d_layouts(layout):
    (x,) = _laid_out(_tensors(SHAPE, 1), layout, requires_grad=True)
    params = _laid_out(_tensors(SHAPE_4D, 4, seed=2), layout, requires_grad=True)
    torch.library.opcheck(torch.ops.gspn.line_scan_4d.default, (x, *params, 3, False, "cpu"))
    grad_too = layout == DIFFERENTIATED_LAYOUTS[0]
    g, h = _laid_out(_tensors(SHAPE_4D, 2, seed=3), layout, requires_grad=grad_too)
    args = [t if grad_too else t.detach() for t in (g, h, x, *params)]
    torch.library.opcheck(torch.ops.gspn.line_scan_4d_backward.default, (*args, None, True, "cpu"))


@pytest.mark.parametrize("layout", ["channels_last", "expanded"])
def test_opcheck_reference_backend_layouts(layout):
    x, lam, wl, wm, wr = _laid_out(_tensors(SHAPE, 5), layout, requires_grad=True)
    torch.library.opcheck(torch.ops.gspn.line_scan.default, (x, lam, wl, wm, wr, "rl", None, True, "reference"))
    g, h = _laid_out(_tensors(SHAPE, 2, seed=1), layout, requires_grad=True)
    args = (g, h, x, lam, wl, wm, wr, "bt", 2, False, "reference")
    torch.library.opcheck(torch.ops.gspn.line_scan_backward.default, args)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_results_are_row_major(layout):
    """The documented rule itself: outputs and gradients are contiguous, whatever the input layout."""
    x, lam, wl, wm, wr = _laid_out(_tensors(SHAPE, 5), layout, requires_grad=True)
    out = line_scan(x, lam, wl, wm, wr, direction="bt", normalize=True)
    assert out.is_contiguous()
    grads = torch.autograd.grad(out.square().sum(), (x, lam, wl, wm, wr))
    assert all(g.is_contiguous() and g.shape == SHAPE for g in grads)
    out4 = line_scan_4d(x, *(p[:, None] for p in (lam, wl, wm, wr)), chunk_size=2)
    assert out4.is_contiguous()
    grads = torch.autograd.grad(out4.sum(), (x, lam, wl, wm, wr))
    assert all(g.is_contiguous() and g.shape == SHAPE for g in grads)


# --- the compiled backward --------------------------------------------------------------------------

COMPILED_LAYOUTS = ["channels_last", "transposed", "expanded", "sliced", "permuted_inside"]


def _compiled_inputs(layout, four_directions):
    """x and the four parameters; the layout is applied to x and to w_mid (a mix of layouts)."""
    x, *params = _tensors(SHAPE, 5, seed=4)
    x, params = x.float(), [p.float() for p in params]
    if four_directions:
        params = [p[:, None].expand(-1, 4, -1, -1, -1).contiguous() for p in params]
    if layout in LAYOUTS:
        x = LAYOUTS[layout](x)
        params[2] = LAYOUTS[layout](params[2])
    return [t.requires_grad_() for t in (x, *params)]


@pytest.mark.parametrize("op", ["line_scan", "line_scan_4d"])
@pytest.mark.parametrize("layout", COMPILED_LAYOUTS)
def test_compiled_backward_any_layout(layout, op):
    """``torch.compile(fullgraph=True)`` forward *and* backward (inductor checks the strides the fake
    backward promised) with non-row-major inputs, or inputs made non-row-major inside the function."""

    def fn(x, lam, wl, wm, wr):
        if layout == "permuted_inside":
            x, wm = _permuted(x), _permuted(wm)
        if op == "line_scan":
            return line_scan(x, lam, wl, wm, wr, direction="tb", normalize=True).sum()
        return line_scan_4d(x, lam, wl, wm, wr, chunk_size=2, normalize=True).square().sum()

    inputs = _compiled_inputs(layout, op == "line_scan_4d")
    expected = torch.autograd.grad(fn(*inputs), inputs)
    torch._dynamo.reset()
    # No cached compiled graphs: the cache key does not cover the operators' Python fake functions.
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        compiled = torch.compile(fn, fullgraph=True, backend="inductor")
        got = torch.autograd.grad(compiled(*inputs), inputs)
    for g, e, t in zip(got, expected, inputs, strict=True):
        assert g.shape == t.shape
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
