"""Backbone figures per size: parameters, forward GFLOPs per image, forward+backward images/s.

    python bench/models.py                       # S, B, L, XL at /2, CPU, batch 2
    python bench/models.py --names SiT-XL/2 --device cuda --batch 32 --dtype bf16

GFLOPs come from torch's FLOP counter (2 per multiply-add). The DiT paper's "Gflops" count one per
multiply-add, so its 118.6 for XL/2 corresponds to about half the torch figure; both are printed.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from gen.models import build_model

PAPER_GFLOPS = {"S": 6.1, "B": 23.0, "L": 80.7, "XL": 118.6}  # DiT paper, Table 4 (/2, 256 px)


CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                 lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}
"""The CPU's fused attention kernel, which torch's counter has no formula for (it counts the CUDA kernels): without
it the attention's QK^T and AV, 8.5 of SiT-XL/2's 237 GFLOPs an image, went uncounted."""


def forward_flops(model, input_size: int) -> float:
    """FLOPs of one forward pass for a single image (torch's counter, attention included; runs on CPU)."""
    x = torch.randn(1, model.in_channels, input_size, input_size)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter, torch.no_grad():
        model(x, torch.rand(1), torch.zeros(1, dtype=torch.long))
    return counter.get_total_flops()


def train_step_rate(model, batch: int, input_size: int, iters: int, device: str, dtype: torch.dtype) -> float:
    """Forward+backward images per second (after one warm-up step)."""
    model = model.to(device)
    x = torch.randn(batch, model.in_channels, input_size, input_size, device=device)
    t, y = torch.rand(batch, device=device), torch.randint(0, model.num_classes, (batch,), device=device)

    def step():
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            loss = model(x, t, y).out.float().square().mean()
        loss.backward()

    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - start)


def main() -> None:
    """Print one row per model."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", nargs="+", default=["SiT-S/2", "SiT-B/2", "SiT-L/2", "SiT-XL/2"])
    parser.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256 px through SD-VAE)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if torch.cuda.is_available() else "fp32")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    print(f"device={args.device} dtype={args.dtype} batch={args.batch} input={args.input_size} "
          f"torch={torch.__version__}")
    print(f"{'model':10s} {'params':>14s} {'GFLOPs':>8s} {'GMACs':>7s} {'paper':>6s} {'ratio':>6s} {'img/s':>8s}")
    for name in args.names:
        torch.manual_seed(0)
        model = build_model(name, input_size=args.input_size)
        params = sum(p.numel() for p in model.parameters())
        gflops = forward_flops(model, args.input_size) / 1e9
        size = name.split("-")[1].split("/")[0]
        paper = PAPER_GFLOPS.get(size) if name.endswith("/2") and args.input_size == 32 else None
        ratio = f"{gflops / 2 / paper:6.3f}" if paper else f"{'-':>6s}"
        rate = train_step_rate(model, args.batch, args.input_size, args.iters, args.device, dtype)
        print(f"{name:10s} {params:14,d} {gflops:8.1f} {gflops / 2:7.1f} {paper or '-':>6} {ratio} {rate:8.2f}")


if __name__ == "__main__":
    main()
