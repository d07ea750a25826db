"""One UNet denoising step: original softmax self-attention vs GSPN, at increasing latent sizes.

A randomly initialised UNet with SD-1.5-like widths and attention (320/640/1280 channels, 8 heads,
768-d text context of 77 tokens) but fewer layers (3 levels, 1 ResNet per level) runs one forward
step (batch 1, no grad) per latent size. The same UNet object is timed with its original
processors and with a mounted GSPN adapter (``adapter.mount`` / ``adapter.unmount``), alternating
the two in every repeat so both see the same machine load; the speed-up is the ratio of medians.

    python benchmarks/unet_swap.py                     # CPU, default sizes
    python benchmarks/unet_swap.py --device cuda --dtype float16 --sizes 64 128 256 512
    python benchmarks/unet_swap.py --widths 160 320 640 --sizes 16 32 64 --repeats 3

Sizes are latent sides (pixels = 8 × latent for SD's VAE); ``HxW`` gives a non-square latent.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _size(s: str) -> tuple[int, int]:
    if "x" in s:
        h, w = s.split("x")
        return int(h), int(w)
    return int(s), int(s)


def build_unet(widths: tuple[int, ...], heads: int, context_dim: int):
    """The benchmark UNet: SD-like blocks, one layer per level, attention on all but the last level."""
    from diffusers import UNet2DConditionModel

    n = len(widths)
    return UNet2DConditionModel(
        block_out_channels=widths,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        layers_per_block=1,
        cross_attention_dim=context_dim,
        attention_head_dim=heads,
        norm_num_groups=32,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_sizes = [_size(s) for s in ("16", "32", "48", "64", "48x96")]
    p.add_argument("--sizes", nargs="+", type=_size, default=default_sizes, help="latent sizes: S or HxW")
    p.add_argument("--widths", nargs="+", type=int, default=[320, 640, 1280])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--context-dim", type=int, default=768)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per size")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per size before the repeats")
    p.add_argument("--d-state", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=None, help="local GSPN tile size (default: global)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()

    from gspn.integrations.diffusers import GSPNAdapter

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    unet = build_unet(tuple(args.widths), args.heads, args.context_dim).to(device).eval()
    if dtype != torch.float32:
        unet.to(dtype)
    adapter = GSPNAdapter.from_unet(unet, d_state=args.d_state, chunk_size=args.chunk_size)
    n_unet = sum(p.numel() for p in unet.parameters())
    n_gspn = sum(p.numel() for p in adapter.parameters())
    print(
        f"UNet widths={args.widths} heads={args.heads}: {n_unet / 1e6:.1f}M params; "
        f"{len(adapter.processors)} self-attention layers -> GSPN adapter {n_gspn / 1e6:.2f}M params; "
        f"device={device} dtype={args.dtype} threads={torch.get_num_threads()}"
    )
    cuda = device.type == "cuda"
    header = ("latent", "pixels", "tokens@L0", "original ms", "GSPN ms", "speed-up")
    header += ("orig peak GiB", "GSPN peak GiB") if cuda else ()
    print(("{:>9} {:>11} {:>9} {:>12} {:>10} {:>9}" + (" {:>13} {:>13}" if cuda else "")).format(*header))
    ctx = torch.randn(1, 77, args.context_dim, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    for h, w in args.sizes:
        x = torch.randn(1, unet.config.in_channels, h, w, device=device, dtype=dtype)
        times: dict[str, list[float]] = {"orig": [], "gspn": []}
        peak = {"orig": 0.0, "gspn": 0.0}
        with torch.no_grad():
            for rep in range(args.warmup + args.repeats):
                for name in ("orig", "gspn"):
                    if name == "gspn":
                        adapter.mount(unet)
                    else:
                        adapter.unmount()
                    _sync(device)
                    if cuda:
                        torch.cuda.reset_peak_memory_stats(device)
                    start = time.perf_counter()
                    unet(x, t, ctx)
                    _sync(device)
                    if rep >= args.warmup:
                        times[name].append(time.perf_counter() - start)
                    if cuda:
                        peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device) / 2**30)
        orig, gspn = (statistics.median(times[k]) * 1e3 for k in ("orig", "gspn"))
        mem = f" {peak['orig']:>13.2f} {peak['gspn']:>13.2f}" if cuda else ""
        print(
            f"{h:>4}x{w:<4} {8 * h:>5}x{8 * w:<5} {h * w:>9} {orig:>12.1f} {gspn:>10.1f} {orig / gspn:>8.2f}x{mem}",
            flush=True,
        )
    adapter.unmount()


if __name__ == "__main__":
    main()
