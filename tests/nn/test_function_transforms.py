"""Forward-mode AD and the ``torch.func`` transforms through every operator and layer.

Issue 21, kind 4: ``torch.func.jvp`` and ``torch.autograd.forward_ad`` used to return a tangent of
exactly 0 through the ``gspn::`` operators, and ``torch.func.grad``/``jacrev``/``vmap`` failed with
torch's "must override setup_context". Here every tangent is checked against the float64 oracle's
(``torch.func.jvp`` of a pure-torch loop) and against central finite differences, and every other
transform against plain autograd; where something stays unsupported the error names the operator.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import grad, jacfwd, jacrev, jvp, vjp, vmap

import gspn
from gspn.nn import GSPN2d, GSPNAttention
from gspn.ops import DIRECTIONS, available_backends, gspn_mix, line_scan, line_scan_4d
from oracle import oracle_line_scan, oracle_mix

BACKENDS = [b for b in ("reference", "cpu") if b in available_backends("cpu")]
F64 = {"rtol": 1e-9, "atol": 1e-9}


def _rand(*shape, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)


def _finite_difference(f, primals, tangents, eps=1e-6):
    plus = f(*(p + eps * t for p, t in zip(primals, tangents, strict=True)))
    minus = f(*(p - eps * t for p, t in zip(primals, tangents, strict=True)))
    return (plus - minus) / (2 * eps)


def _scan_inputs(param_shape=(2, 3, 5, 4), seed=0):
    x = _rand(2, 3, 5, 4, seed=seed)
    params = [_rand(*param_shape, seed=seed + 1 + i, scale=1.5) for i in range(4)]
    return [x, *params]


SCAN_CASES = [  # (direction, chunk_size, normalize, parameter shape)
    *((d, None, True, (2, 3, 5, 4)) for d in DIRECTIONS),
    ("tb", 2, True, (1, 3, 5, 4)),  # chunks, batch-broadcast parameters
    ("lr", 3, False, (2, 1, 5, 4)),  # raw gates, one gate channel shared by all channels
    ("rl", None, False, (2, 3, 5, 4)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SCAN_CASES, ids=[str(c) for c in SCAN_CASES])
def test_line_scan_jvp_matches_the_oracle_and_finite_differences(case, backend):
    direction, chunk_size, normalize, param_shape = case
    primals = _scan_inputs(param_shape)
    tangents = _scan_inputs(param_shape, seed=10)

    def f(*args):
        return line_scan(*args, direction=direction, chunk_size=chunk_size, normalize=normalize, backend=backend)

    def oracle(*args):
        return oracle_line_scan(*args, direction=direction, chunk_size=chunk_size, normalize=normalize)

    out, tangent = jvp(f, tuple(primals), tuple(tangents))
    expected_out, expected = jvp(oracle, tuple(primals), tuple(tangents))
    torch.testing.assert_close(out, expected_out, **F64)
    torch.testing.assert_close(tangent, expected, **F64)
    torch.testing.assert_close(tangent, _finite_difference(f, primals, tangents), rtol=1e-6, atol=1e-6)
    assert tangent.abs().max() > 0.1
    with fwAD.dual_level():
        dual = f(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)))
        torch.testing.assert_close(fwAD.unpack_dual(dual).tangent, expected, **F64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_line_scan_jvp_with_respect_to_each_input_alone(backend):
    primals = _scan_inputs()
    tangents = _scan_inputs(seed=20)
    for i in range(5):

        def f(t, i=i):
            args = list(primals)
            args[i] = t
            return line_scan(*args, direction="bt", chunk_size=3, normalize=True, backend=backend)

        def oracle(t, i=i):
            args = list(primals)
            args[i] = t
            return oracle_line_scan(*args, direction="bt", chunk_size=3, normalize=True)

        _, tangent = jvp(f, (primals[i],), (tangents[i],))
        _, expected = jvp(oracle, (primals[i],), (tangents[i],))
        torch.testing.assert_close(tangent, expected, **F64, msg=f"input {i}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_line_scan_4d_jvp_matches_the_oracle(backend, chunk_size):
    x = _rand(2, 4, 5, 3, seed=0)
    params = [_rand(2, 4, 2, 5, 3, seed=i + 1) for i in range(4)]  # 2 gate channels for 4 channels
    params[0] = _rand(1, 1, 4, 5, 3, seed=9)  # λ shared by the batch and the directions
    primals = [x, *params]
    tangents = [torch.randn_like(p) for p in primals]

    def f(*args):
        return line_scan_4d(*args, chunk_size=chunk_size, normalize=True, backend=backend)

    def oracle(x, lam, *gates):
        return torch.stack(
            [
                oracle_line_scan(
                    x,
                    *(p[:, k if p.shape[1] == 4 else 0] for p in (lam, *gates)),
                    direction=d,
                    chunk_size=chunk_size,
                    normalize=True,
                )
                for k, d in enumerate(DIRECTIONS)
            ],
            dim=1,
        )

    _, tangent = jvp(f, tuple(primals), tuple(tangents))
    _, expected = jvp(oracle, tuple(primals), tuple(tangents))
    torch.testing.assert_close(tangent, expected, **F64)
    torch.testing.assert_close(tangent, _finite_difference(f, primals, tangents), rtol=1e-6, atol=1e-6)


def _mix_inputs(batch=2, channels=4, height=5, width=3, state=3, gate_channels=2, seed=0):
    return [
        _rand(batch, channels, height, width, seed=seed),
        _rand(batch, state, height, width, seed=seed + 1),
        _rand(4, 3, gate_channels, state, seed=seed + 2, scale=2.0),
        _rand(4, channels, state, seed=seed + 3, scale=0.5),
        _rand(4, channels, state, seed=seed + 4),
        _rand(4, channels, state, seed=seed + 5),
        _rand(4, seed=seed + 6),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_gspn_mix_jvp_matches_the_oracle_and_finite_differences(backend, chunk_size):
    primals = _mix_inputs()
    tangents = _mix_inputs(seed=30)

    def f(*args):
        return gspn_mix(*args, chunk_size=chunk_size, backend=backend)

    _, tangent = jvp(f, tuple(primals), tuple(tangents))
    _, expected = jvp(lambda *a: oracle_mix(*a, chunk_size=chunk_size), tuple(primals), tuple(tangents))
    torch.testing.assert_close(tangent, expected, **F64)
    torch.testing.assert_close(tangent, _finite_difference(f, primals, tangents), rtol=1e-6, atol=1e-6)
    with fwAD.dual_level():
        dual = f(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)))
        torch.testing.assert_close(fwAD.unpack_dual(dual).tangent, expected, **F64)


LAYERS = {
    "fused": {},
    "unfused": {"fused": False},
    "local": {"chunk_size": 2},
    "compact": {"propagation_channels": 3},
    "scan_frames": {"merge_frame": "scan"},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_jvp_in_inputs_and_parameters_matches_finite_differences(name, backend):
    torch.manual_seed(0)
    layer = GSPN2d(6, d_state=3, backend=backend, **LAYERS[name]).double()
    x = _rand(2, 6, 5, 5, seed=1)
    params = dict(layer.named_parameters())
    t_params = {k: torch.randn_like(v) for k, v in params.items()}
    t_x = torch.randn_like(x)

    def f(p, x):
        return torch.func.functional_call(layer, p, (x,))

    _, tangent = jvp(f, (params, x), (t_params, t_x))
    fd = (
        f({k: v + 1e-6 * t_params[k] for k, v in params.items()}, x + 1e-6 * t_x)
        - f({k: v - 1e-6 * t_params[k] for k, v in params.items()}, x - 1e-6 * t_x)
    ) / 2e-6
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-6)
    assert tangent.abs().max() > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_vjp_jacrev_and_jacfwd_agree_with_autograd(backend):
    primals = _scan_inputs()

    def f(x, lam, *gates):
        return line_scan(x, lam, *gates, direction="lr", chunk_size=2, normalize=True, backend=backend)

    leaves = [p.clone().requires_grad_() for p in primals]
    out = f(*leaves)
    weight = _rand(*out.shape, seed=5)
    expected = torch.autograd.grad((out * weight).sum(), leaves)
    got = grad(lambda *a: (f(*a) * weight).sum(), argnums=tuple(range(5)))(*primals)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, **F64)
    _, pullback = vjp(f, *primals)
    for g, e in zip(pullback(weight), expected, strict=True):
        torch.testing.assert_close(g, e, **F64)
    small = [p[:1, :1, :3, :3].contiguous() for p in primals]
    rev = jacrev(f, argnums=(0, 2))(*small)
    fwd = jacfwd(f, argnums=(0, 2))(*small)
    for r, w in zip(rev, fwd, strict=True):
        torch.testing.assert_close(r, w, **F64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_and_per_sample_gradients_equal_a_loop(backend):
    x = _rand(3, 2, 2, 4, 5, seed=0)  # vmapped over dim 0, each (2, 2, 4, 5)
    lam = _rand(2, 2, 4, 5, seed=1)  # shared by the vmapped entries
    gates = [_rand(3, 1, 2, 4, 5, seed=2 + i) for i in range(3)]  # batch 1 within each entry

    def f(x, lam, *g):
        return line_scan(x, lam, *g, direction="tb", normalize=True, backend=backend)

    in_dims = (0, None, 0, 0, 0)
    batched = vmap(f, in_dims=in_dims)(x, lam, *gates)
    looped = torch.stack([f(x[i], lam, *(g[i] for g in gates)) for i in range(3)])
    torch.testing.assert_close(batched, looped, **F64)

    def loss(lam, x, *g):
        return f(x, lam, *g).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0, 0, 0))(lam, x, *gates)
    expected = torch.stack([grad(loss)(lam, x[i], *(g[i] for g in gates)) for i in range(3)])
    torch.testing.assert_close(per_sample, expected, **F64)

    primals = _mix_inputs()
    stacked = torch.stack([primals[0], primals[0].flip(-1)])
    mixed = vmap(lambda x: gspn_mix(x, *primals[1:], backend=backend))(stacked)
    torch.testing.assert_close(mixed[1], gspn_mix(stacked[1], *primals[1:], backend=backend), **F64)

    def mix_loss(weights, x, proxy):
        return gspn_mix(x, proxy, *weights, backend=backend).square().sum()

    xs, proxies = torch.stack([primals[0]] * 2), torch.stack([primals[1], -primals[1]])
    per_sample = vmap(grad(mix_loss), in_dims=(None, 0, 0))(tuple(primals[2:]), xs, proxies)
    for i in range(2):
        expected = grad(mix_loss)(tuple(primals[2:]), xs[i], proxies[i])
        for g, e in zip(per_sample, expected, strict=True):
            torch.testing.assert_close(g[i], e, **F64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_order_through_func_transforms(backend):
    x, *params = (p[:1, :1, :3, :3].contiguous() for p in _scan_inputs())

    def loss(x):
        return line_scan(x, *params, direction="tb", normalize=True, backend=backend).square().sum()

    def oracle(x):
        return oracle_line_scan(x, *params, direction="tb", normalize=True).square().sum()

    torch.testing.assert_close(jacrev(jacrev(loss))(x), jacrev(jacrev(oracle))(x), **F64)
    with pytest.raises(NotImplementedError, match="gspn::line_scan_backward"):
        torch.func.hessian(loss)(x)  # forward-over-reverse: a clear error, never a zero


def test_raw_operators_refuse_forward_mode_tangents_by_name():
    x, *params = _scan_inputs()
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match=r"gspn::line_scan\b.*gspn\.ops\.line_scan"):
            torch.ops.gspn.line_scan(dual, *params, "tb", None, True, "reference")
        p4 = [p.unsqueeze(1) for p in params]
        with pytest.raises(NotImplementedError, match="gspn::line_scan_4d"):
            torch.ops.gspn.line_scan_4d(dual, *p4, None, True, "reference")
        mix = _mix_inputs()
        with pytest.raises(NotImplementedError, match="gspn::gspn_mix"):
            torch.ops.gspn.gspn_mix(fwAD.make_dual(mix[0], torch.ones_like(mix[0])), *mix[1:], None, "reference")


def test_gspn_mix_forward_over_reverse_names_the_operator():
    primals = _mix_inputs()

    def loss(x):
        return gspn_mix(x, *primals[1:], backend="reference").square().sum()

    with pytest.raises(NotImplementedError, match="gspn::gspn_mix_backward"):
        jacfwd(grad(loss))(primals[0])


def test_compile_keeps_the_opaque_operators():
    layer = GSPN2d(4, d_state=2).double()
    x = _rand(1, 4, 5, 6, seed=0).requires_grad_()
    ref = copy.deepcopy(layer)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, ref(x), **F64)
    (g,) = torch.autograd.grad(y.sum(), x)
    (e,) = torch.autograd.grad(ref(x).sum(), x)
    torch.testing.assert_close(g, e, **F64)


@pytest.mark.parametrize("name", ["gspn_nano", "gspn_vit_nano"])
def test_classifier_jvp_matches_finite_differences(name):
    torch.manual_seed(0)
    model = gspn.create_model(name, num_classes=3).double().eval()
    x, t = _rand(1, 3, 32, 32, seed=1), _rand(1, 3, 32, 32, seed=2)
    _, tangent = jvp(model, (x,), (t,))
    torch.testing.assert_close(tangent, _finite_difference(model, (x,), (t,)), rtol=1e-6, atol=1e-6)
    assert tangent.abs().max() > 1e-3


def test_dit_jvp_in_the_input_and_the_timestep():
    """What consistency-model distillation asks of a diffusion model: the tangent in ``(x_t, t)``.
    The timestep embedding is computed in float32 (as in DiT), so its part is checked against reverse
    mode (``jacrev``) rather than finite differences; the input's against float64 finite differences."""
    torch.manual_seed(0)
    model = gspn.create_model("gspn_dit_tiny", input_size=8, num_classes=4).double().eval()
    with torch.no_grad():
        for p in model.parameters():  # the output layer starts at zero
            p.add_(0.05 * torch.randn_like(p))
    x, labels = _rand(2, model.in_channels, 8, 8, seed=1), torch.tensor([0, 3])
    t = torch.tensor([3.0, 400.0], dtype=torch.float64)
    t_x, t_t = _rand(*x.shape, seed=2), torch.tensor([1.0, -2.0], dtype=torch.float64)

    def f(x, t):
        return model(x, t, labels)

    _, tangent = jvp(f, (x, t), (t_x, t_t))
    by_x = _finite_difference(lambda x: f(x, t), (x,), (t_x,))
    by_t = torch.einsum("...k,k->...", jacrev(f, argnums=1)(x, t), t_t)
    torch.testing.assert_close(tangent, by_x + by_t, rtol=1e-6, atol=1e-6)
    assert by_t.abs().max() > 1e-3


def test_gspn_attention_jvp_matches_finite_differences():
    torch.manual_seed(0)
    attn = GSPNAttention(8, chunk_size=2).double()
    x, t = _rand(2, 5 * 3, 8, seed=1), _rand(2, 5 * 3, 8, seed=2)

    def f(x):
        return attn(x, hw=(5, 3))

    _, tangent = jvp(f, (x,), (t,))
    torch.testing.assert_close(tangent, _finite_difference(f, (x,), (t,)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_backward_through_plain_autograd(backend):
    """``is_grads_batched`` / ``jacobian(vectorize=True)`` vmap the backward operators themselves (was:
    "Batching rule not implemented for gspn::line_scan_backward")."""
    leaves = [p.clone().requires_grad_() for p in _scan_inputs()]
    out = line_scan(*leaves, direction="rl", chunk_size=2, normalize=True, backend=backend)
    cotangents = _rand(3, *out.shape, seed=40)
    batched = torch.autograd.grad(out, leaves, cotangents, is_grads_batched=True, retain_graph=True)
    for i in range(3):
        for b, e in zip(batched, torch.autograd.grad(out, leaves, cotangents[i], retain_graph=True), strict=True):
            torch.testing.assert_close(b[i], e, **F64)
    x, *params = _scan_inputs()
    p4 = [p.unsqueeze(1) for p in params]
    mix = _mix_inputs()
    functions = {
        "line_scan_4d": (lambda x: line_scan_4d(x, *p4, normalize=True, backend=backend), x),
        "gspn_mix": (lambda x: gspn_mix(x, *mix[1:], backend=backend), mix[0]),
    }
    for name, (f, x0) in functions.items():
        torch.testing.assert_close(
            torch.autograd.functional.jacobian(f, x0, vectorize=True),
            torch.autograd.functional.jacobian(f, x0),
            **F64,
            msg=lambda m, n=name: f"{n}: {m}",
        )
