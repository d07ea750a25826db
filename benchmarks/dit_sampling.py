"""Side-by-side sampling latency: GSPN-DiT vs an attention DiT of the same width and depth.

One *sampling step* is one guided network evaluation: ``forward_with_cfg`` on a batch of ``B``
latents (the network runs on ``2B``: conditional + null label). Both models are timed in the same
process, interleaved round by round, so machine noise hits both alike; the reported ratio is
``median(attention) / median(GSPN)`` (> 1: GSPN is faster).

Token grids ("latent-equivalent"): a 256² image is a 32×32×4 SD-VAE latent, 16×16 tokens with
patch 2; a 512² image is a 64×64×4 latent, 32×32 tokens. ``--latents 32 64`` (default) measures
both.

The attention baseline (:class:`AttnDiT`) is written here from the DiT paper's description (not
copied): patch embedding + fixed 2-D sin-cos positions, ``depth`` blocks of
``x += g1·Attn(mod(LN x))``, ``x += g2·MLP(mod(LN x))`` with adaLN-Zero modulation from
``c = t_emb + y_emb``, MLP ratio 4, multi-head SDPA (:class:`gspn.nn.MultiHeadSelfAttention`) with
head dim 64 (or the nearest divisor), and the same final layer. The GSPN model is
:class:`gspn.models.GSPNDiT` with the same width and number of blocks.

    python benchmarks/dit_sampling.py                      # width 384, 13 blocks (CPU friendly)
    python benchmarks/dit_sampling.py --preset b           # GSPN-B/2 width 900, 31 blocks
    python benchmarks/dit_sampling.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gspn.models import GSPNDiT, count_params
from gspn.models.gspn_dit import FinalLayer, LabelEmbedder, TimestepEmbedder
from gspn.nn import MultiHeadSelfAttention

PRESETS = {
    "s": (384, 12),
    "b": (900, 30),
    "l": (1200, 56),
    "xl": (1500, 56),
}  # (width, depth); blocks = depth + 1


def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions ``(h, w, dim)``: half the channels encode rows, half columns."""
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1)))
    rows = torch.arange(h, dtype=torch.float32)[:, None] * freqs
    cols = torch.arange(w, dtype=torch.float32)[:, None] * freqs
    r = torch.cat([rows.sin(), rows.cos()], dim=-1)[:, None, :].expand(h, w, 2 * quarter)
    c = torch.cat([cols.sin(), cols.cos()], dim=-1)[None, :, :].expand(h, w, 2 * quarter)
    return F.pad(torch.cat([r, c], dim=-1), (0, dim - 4 * quarter))


class AttnBlock(nn.Module):
    """adaLN-Zero transformer block on tokens ``(B, T, D)`` conditioned on ``c (B, D)``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = MultiHeadSelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, sc1, g1, s2, sc2, g2 = self.modulation(c)[:, None, :].chunk(6, dim=-1)
        x = x + g1 * self.attn(self.norm1(x) * (1 + sc1) + s1)
        h = self.norm2(x) * (1 + sc2) + s2
        return x + g2 * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class AttnDiT(nn.Module):
    """Minimal class-conditional attention DiT with the GSPN-DiT interface (``forward_with_cfg``)."""

    def __init__(self, in_channels: int, width: int, blocks: int, patch: int = 2, num_classes: int = 1000) -> None:
        super().__init__()
        heads = max(1, round(width / 64))
        while width % heads:
            heads -= 1
        self.patch, self.in_channels, self.out_channels = patch, in_channels, 2 * in_channels
        self.null_label = num_classes
        self.x_embedder = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = LabelEmbedder(num_classes, width, 0.1)
        self.blocks = nn.ModuleList([AttnBlock(width, heads) for _ in range(blocks)])
        self.final_layer = FinalLayer(width, patch, self.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.t_embedder(t) + self.y_embedder(y)
        h = self.x_embedder(x).permute(0, 2, 3, 1)
        gh, gw = h.shape[1:3]
        h = (h + sincos_2d(h.shape[-1], gh, gw).to(h)).reshape(h.shape[0], gh * gw, -1)
        for blk in self.blocks:
            h = blk(h, c)
        out = self.final_layer(h.view(h.shape[0], gh, gw, -1), c)
        p, co = self.patch, self.out_channels
        return out.view(-1, gh, gw, p, p, co).permute(0, 5, 1, 3, 2, 4).reshape(-1, co, gh * p, gw * p)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        out = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, self.null_label)]))
        cond, uncond = out.chunk(2)
        c = self.in_channels
        return torch.cat([uncond[:, :c] + cfg_scale * (cond[:, :c] - uncond[:, :c]), cond[:, c:]], dim=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    """Seconds of one guided denoising step."""
    t = torch.full((x.shape[0],), 500, device=device)
    _sync(device)
    start = time.perf_counter()
    model.forward_with_cfg(x, t, y, 4.0)
    _sync(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="s", help="width/depth (blocks = depth + 1)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--depth", type=int, default=None, help="GSPN depth; both models get depth + 1 blocks")
    parser.add_argument("--latents", type=int, nargs="+", default=[32, 64], help="latent sides (patch 2)")
    parser.add_argument("--batch", type=int, default=1, help="images per step (network batch = 2× for CFG)")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    width, depth = PRESETS[args.preset]
    width, depth = args.width or width, args.depth or depth
    torch.manual_seed(0)
    gspn_model = GSPNDiT(input_size=32, in_channels=4, hidden_size=width, depth=depth, num_classes=1000)
    attn_model = AttnDiT(4, width, len(gspn_model.blocks))
    models = {"gspn": gspn_model.to(device).eval(), "attn": attn_model.to(device).eval()}
    header = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "width": width,
        "blocks": len(gspn_model.blocks),
        "params_gspn": count_params(gspn_model),
        "params_attn": count_params(attn_model),
    }
    print(json.dumps(header))
    results = []
    for side in args.latents:
        x = torch.randn(args.batch, 4, side, side, device=device)
        y = torch.randint(0, 1000, (args.batch,), device=device)
        times: dict[str, list[float]] = {"gspn": [], "attn": []}
        for _ in range(args.warmup):
            for m in models.values():
                time_step(m, x, y, device)
        for _ in range(args.rounds):
            for name, m in models.items():
                times[name].append(time_step(m, x, y, device))
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {
            "latent": f"{side}x{side}x4",
            "image_equiv": f"{side * 8}x{side * 8}",
            "tokens": f"{side // 2}x{side // 2}",
            "batch": args.batch,
            "gspn_s_per_step": round(med["gspn"], 4),
            "attn_s_per_step": round(med["attn"], 4),
            "attn_over_gspn": round(med["attn"] / med["gspn"], 3),
            "gspn_all": [round(v, 4) for v in times["gspn"]],
            "attn_all": [round(v, 4) for v in times["attn"]],
        }
        results.append(row)
        print(json.dumps(row))
    out = {**header, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
