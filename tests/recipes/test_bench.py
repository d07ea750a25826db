"""Tests of the layer benchmark (:mod:`gspn.recipes.bench`): an end-to-end tiny run, the settings, the skip
rules, exponent fits, linear attention. Its command line: ``tests/commands/test_bench_commands.py``."""

from __future__ import annotations

import importlib.util
import json
import sys
import time

import pytest
import torch
from torch import nn

from gspn.recipes import bench
from gspn.recipes.bench import (
    BenchConfig,
    LayerConfig,
    LinearAttention,
    MethodSpec,
    Result,
    Workload,
    benchmark,
    fit_exponent,
    format_table,
    linear_attention,
    ratios,
    resolutions_up_to,
    resolve_settings,
    run,
)
from gspn.recipes.bench.timing import OK
from gspn.training_utils import ConfigError

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
STATUSES = {"ok", "absent", "skip:memory", "skip:time", "over-budget", "oom", "error"}


def tiny_config(output_dir, **overrides) -> BenchConfig:
    """Three sides (8², 16², 32²) of 8-wide layers on one CPU thread, quiet."""
    fields = dict(
        device="cpu",
        threads=1,
        resolutions=[8, 16, 32],
        dim=8,
        heads=2,
        repeats=2,
        budget_seconds=5,
        output_dir=str(output_dir),
        quiet=True,
    )
    return BenchConfig(**{**fields, **overrides})


# --- end to end ----------------------------------------------------------------------------------


def test_tiny_run_writes_json_table_and_plot(tmp_path, capsys):
    threads = torch.get_num_threads()
    payload = run(tiny_config(tmp_path))
    assert torch.get_num_threads() == threads  # restored
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(payload, default=str))

    payload = json.loads((tmp_path / "results.json").read_text())
    rows = payload["results"]
    methods = set(bench.DEFAULT_METHODS)
    assert {r["method"] for r in rows} == methods
    assert len(rows) == 3 * len(methods)
    assert {r["status"] for r in rows} <= STATUSES
    by = {(r["method"], r["resolution"]): r for r in rows}
    for name in ("gspn-global", "gspn-local", "attention-math", "linear-attention"):
        for res in (8, 16, 32):
            r = by[name, res]
            assert r["status"] == "ok", r
            assert r["median_ms"] > 0 and 1 <= len(r["times_ms"]) <= 2
            assert r["pixels"] == res * res
    assert by["mamba", 8]["status"] == "absent"  # mamba_ssm needs CUDA
    assert by["attention-efficient", 8]["status"] == "absent"  # no CPU kernel in PyTorch
    assert set(payload["exponents"]) == methods
    assert payload["exponents"]["gspn-global"] is not None
    assert any(p["method"] == "attention-math" and p["gspn"] == "gspn-global" for p in payload["ratios"])
    assert payload["settings"]["resolutions"] == [8, 16, 32]

    assert "GSPN (global)" in (tmp_path / "table.md").read_text()
    out = capsys.readouterr().out
    assert "time ratio at the largest resolution both ran" in out
    if HAS_MATPLOTLIB:
        png = tmp_path / "scaling.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # replot re-renders the same numbers without measuring anything.
    again = tmp_path / "again"
    replotted = run(BenchConfig(replot=str(tmp_path / "results.json"), output_dir=str(again), plot=False))
    assert replotted == json.loads((again / "results.json").read_text())
    assert replotted["results"] == payload["results"]
    assert replotted["exponents"] == payload["exponents"] and replotted["ratios"] == payload["ratios"]
    assert not (again / "scaling.png").exists()


def test_quick_defaults_and_explicit_options_win():
    s = resolve_settings(BenchConfig(quick=True, device="cpu"))
    assert (s["channels"], s["heads"], s["repeats"], s["budget_seconds"]) == (32, 2, 3, 2.0)
    assert s["resolutions"] == [32, 64, 128, 256]
    s = resolve_settings(BenchConfig(quick=True, device="cpu", dim=16, max_resolution=64))
    assert s["channels"] == 16 and s["resolutions"] == [32, 64]
    s = resolve_settings(BenchConfig(device="cpu"))
    assert s["resolutions"] == [64, 128, 256, 512, 1024] and s["dtype"] == "float32"
    assert resolve_settings(BenchConfig(device="cpu", precision="bf16"))["dtype"] == "bfloat16"
    assert resolve_settings(BenchConfig(device="auto"))["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"max_resolution": 32}, "max_resolution"),  # below the default minimum of 64
        ({"dim": 10, "heads": 3}, "dim"),
        ({"repeats": 0}, "repeats"),
        ({"batch_size": 0}, "batch_size"),
        ({"local_chunk": 0}, "local_chunk"),
        ({"methods": ["transformer-xl"]}, "methods"),
        ({"precision": "float32"}, "precision"),
        ({"device": "gpu"}, "device"),
        ({"gspn_backend": "no_such_backend"}, "gspn_backend"),
    ],
)
def test_bad_settings_name_their_field_and_write_nothing(overrides, field, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as info:
        run(BenchConfig(**{"device": "cpu", "output_dir": str(out), **overrides}))
    assert info.value.field == field
    assert "--" not in info.value.message  # the library names fields; the command line shows flags
    assert not out.exists()
    assert capsys.readouterr().out == ""  # not even the header line


def test_interrupt_writes_nothing_and_restores_threads(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.job, "benchmark", interrupted)
    threads = torch.get_num_threads()
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(tmp_path / "out", threads=threads + 1))
    assert torch.get_num_threads() == threads
    assert not (tmp_path / "out").exists()


def test_resolutions_up_to():
    assert resolutions_up_to(64, 512) == [64, 128, 256, 512]
    assert resolutions_up_to(64, 300) == [64, 128, 256, 300]
    with pytest.raises(ValueError):
        resolutions_up_to(64, 32)


# --- skip rules ----------------------------------------------------------------------------------


class _Sleep(nn.Module):
    """Sleeps ``seconds_per_pixel · pixels`` (``slow_seconds`` from ``slow_from`` pixels on); raises
    ``error`` from ``fail_from`` pixels on."""

    def __init__(
        self,
        seconds_per_pixel: float = 0.0,
        fail_from: int | None = None,
        error: Exception | None = None,
        slow_from: int | None = None,
        slow_seconds: float = 0.0,
    ):
        super().__init__()
        self.seconds_per_pixel = seconds_per_pixel
        self.fail_from = fail_from
        self.error = error
        self.slow_from = slow_from
        self.slow_seconds = slow_seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x.shape[-1] * x.shape[-2]
        if self.fail_from is not None and pixels >= self.fail_from:
            raise self.error
        slow = self.slow_from is not None and pixels >= self.slow_from
        time.sleep(self.slow_seconds if slow else self.seconds_per_pixel * pixels)
        return x


def _fake(
    name: str, exponent: float = 1.0, memory: int = 0, unavailable: str | None = None, **sleep_kwargs
) -> MethodSpec:
    def build(cfg: LayerConfig, h: int, w: int) -> Workload:
        return Workload(_Sleep(**sleep_kwargs), (torch.zeros(1, 1, h, w),))

    return MethodSpec(name, name, exponent, build, lambda cfg, h, w: memory, lambda cfg: unavailable)


def test_skip_logic_marks_and_never_crashes(one_thread):
    # Side s costs 2e-5·s² seconds: 8² 1.3 ms, 16² 5 ms, 32² 20 ms, 64² 82 ms, 128² 330 ms.
    methods = [
        _fake("predicted", exponent=1.0, seconds_per_pixel=2e-5),  # 64² predicted 2×82 ms > 120 ms
        # predicted fast from 32², but 64² takes 0.2 s > budget on its first call
        _fake("underestimated", exponent=1.0, seconds_per_pixel=1e-6, slow_from=64 * 64, slow_seconds=0.2),
        _fake(
            "oom",
            seconds_per_pixel=0.0,
            fail_from=16 * 16,
            error=torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB"),
        ),
        _fake("broken", seconds_per_pixel=0.0, fail_from=32 * 32, error=RuntimeError("kernel exploded")),
        _fake("huge", memory=1 << 50, seconds_per_pixel=0.0),
        _fake("missing", unavailable="not installed", seconds_per_pixel=0.0),
    ]
    results = benchmark(
        LayerConfig(),
        methods,
        [8, 16, 32, 64, 128],
        budget_s=0.12,
        repeats=2,
        memory_limit_bytes=1 << 40,
        measure_memory=False,
        log=None,
    )
    status = {}
    for r in results:
        status.setdefault(r.method, []).append(r.status)
    assert status["predicted"] == ["ok", "ok", "ok", "skip:time", "skip:time"]
    assert status["underestimated"] == ["ok", "ok", "ok", "over-budget", "skip:time"]
    assert status["oom"] == ["ok", "oom", "oom", "oom", "oom"]
    assert status["broken"] == ["ok", "ok", "error", "error", "error"]
    assert status["huge"] == ["skip:memory"] * 5
    assert status["missing"] == ["absent"] * 5

    by = {(r.method, r.resolution): r for r in results}
    assert by["predicted", 64].predicted_ms == pytest.approx(by["predicted", 32].median_ms * 4)
    assert "kernel exploded" in by["broken", 32].note
    assert by["missing", 8].note == "not installed"
    assert by["underestimated", 64].median_ms >= 200  # the over-budget call's time is kept
    # statuses show up in the table instead of times; an over-budget time is shown with ">".
    table = format_table(results, "time", fits={})
    assert "skip:time" in table and "OOM" in table and "skip:mem" in table and "absent" in table


def test_attention_memory_estimate_skips_large_math_attention():
    method = bench.methods.get_method("attention-math")
    cfg = LayerConfig(channels=96, heads=3)
    # 1024² tokens: the 3 × N² float32 score matrix alone is 12 TiB.
    assert method.memory_bytes(cfg, 1024, 1024) > 3 * (1024**2) ** 2 * 4
    results = benchmark(cfg, [method], [1024], memory_limit_bytes=1 << 30, log=None)
    assert results[0].status == "skip:memory"


# --- fits and ratios -----------------------------------------------------------------------------


def test_fit_exponent_synthetic():
    pixels = [(64 * 2**i) ** 2 for i in range(6)]
    assert fit_exponent(pixels, [3e-7 * p for p in pixels]) == pytest.approx(1.0)
    assert fit_exponent(pixels, [1e-9 * p**2 for p in pixels]) == pytest.approx(2.0)
    # A large fixed overhead at the smallest size only is ignored with skip_smallest=1.
    times = [1e-6 * p for p in pixels]
    times[0] += 50.0
    assert fit_exponent(pixels, times, skip_smallest=1) == pytest.approx(1.0)
    assert fit_exponent(pixels, times, skip_smallest=0) < 0.9
    # Multiplicative noise of ±10 % barely moves the slope.
    noisy = [1e-9 * p**2 * (1.1 if i % 2 else 0.9) for i, p in enumerate(pixels)]
    assert fit_exponent(pixels, noisy) == pytest.approx(2.0, abs=0.1)
    # Two points are fitted as they are; fewer give None.
    assert fit_exponent(pixels[:2], [1.0, 8.0]) == pytest.approx(1.5)
    assert fit_exponent(pixels[:1], [1.0]) is None
    assert fit_exponent([], []) is None


def _result(method: str, res: int, ms: float | None, status: str = OK) -> Result:
    return Result(method, method, res, res * res, status, median_ms=ms)


def test_ratios_use_the_largest_common_resolution():
    results = [
        _result("gspn-global", 64, 1.0),
        _result("gspn-global", 128, 4.0),
        _result("gspn-global", 256, 16.0),
        _result("attention-math", 64, 2.0),
        _result("attention-math", 128, 32.0),
        _result("attention-math", 256, None, "skip:memory"),
    ]
    (pair,) = ratios(results)
    assert (pair["method"], pair["gspn"], pair["resolution"]) == ("attention-math", "gspn-global", 128)
    assert pair["ratio"] == pytest.approx(8.0)


# --- linear attention ----------------------------------------------------------------------------


def _naive_linear_attention(q, k, v, eps=1e-6):
    """The quadratic, softmax-free form: weights φ(q_i)·φ(k_j), normalised over j."""
    phi_q, phi_k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    weights = phi_q @ phi_k.transpose(-2, -1)  # (..., N, N), all positive
    return (weights @ v) / (weights.sum(-1, keepdim=True) + eps)


def test_linear_attention_matches_naive_formula():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 50, 8, dtype=torch.float64), torch.randn(2, 3, 50, 8, dtype=torch.float64)
    v = torch.randn(2, 3, 50, 5, dtype=torch.float64)
    out = linear_attention(q, k, v)
    assert out.shape == (2, 3, 50, 5)
    torch.testing.assert_close(out, _naive_linear_attention(q, k, v))


def test_linear_attention_is_not_causal_and_permutation_equivariant():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 20, 4, dtype=torch.float64) for _ in range(3))
    out = linear_attention(q, k, v)
    v2 = v.clone()
    v2[..., -1, :] += 1.0  # the last token changes the first output: no causal mask
    assert not torch.allclose(linear_attention(q, k, v2)[..., 0, :], out[..., 0, :])
    perm = torch.randperm(20)  # permuting tokens permutes the outputs
    torch.testing.assert_close(linear_attention(q[..., perm, :], k[..., perm, :], v[..., perm, :]), out[..., perm, :])


def test_linear_attention_module_shapes_and_projections():
    torch.manual_seed(2)
    layer = LinearAttention(12, num_heads=3).double()
    x = torch.randn(2, 30, 12, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (2, 30, 12)
    q, k, v = layer.qkv(x).view(2, 30, 3, 3, 4).permute(2, 0, 3, 1, 4)
    expected = layer.proj(_naive_linear_attention(q, k, v).transpose(1, 2).reshape(2, 30, 12))
    torch.testing.assert_close(y, expected)
    with pytest.raises(ValueError):
        LinearAttention(10, num_heads=3)


def test_self_attention_matches_explicit_softmax():
    from torch.nn.attention import SDPBackend

    torch.manual_seed(3)
    layer = bench.SelfAttention(8, heads=2, backend=SDPBackend.MATH).double()
    x = torch.randn(1, 10, 8, dtype=torch.float64)
    q, k, v = layer.qkv(x).view(1, 10, 3, 2, 4).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)
    expected = layer.proj((attn @ v).transpose(1, 2).reshape(1, 10, 8))
    torch.testing.assert_close(layer(x), expected)


# --- every method, forward+backward and bfloat16 ---------------------------------------------------


@pytest.mark.parametrize(("backward", "dtype"), [(True, torch.float32), (False, torch.bfloat16)])
def test_all_methods_run_backward_and_bfloat16(backward, dtype, one_thread):
    cfg = LayerConfig(channels=8, heads=2, backward=backward, dtype=dtype)
    methods = list(bench.methods.iter_methods(["all"]))
    assert {m.name for m in methods} == {m.name for m in bench.METHODS}
    results = benchmark(cfg, methods, [8, 16], budget_s=5, repeats=1, log=None)
    status = {(r.method, r.resolution): r.status for r in results}
    for name in (
        "gspn-global",
        "gspn-local",
        "gspn-global-unfused",
        "gspn-scan-global",
        "gspn-scan-local",
        "attention-math",
        "linear-attention",
    ):
        assert status[name, 8] == status[name, 16] == "ok", (name, [r for r in results if r.method == name])
    assert status["mamba", 8] == "absent"


def test_plot_is_skipped_with_a_message_without_matplotlib(tmp_path, monkeypatch, capsys):
    from gspn.recipes.bench.plot import plot_results

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert plot_results([_result("gspn-global", 64, 1.0)], tmp_path / "x.png") is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "x.png").exists()


def test_bench_attention_layers_are_the_library_ones():
    import gspn.nn

    assert bench.LinearAttention is gspn.nn.LinearAttention
    assert bench.linear_attention is gspn.nn.linear_attention
    assert issubclass(bench.SelfAttention, gspn.nn.MultiHeadSelfAttention)
