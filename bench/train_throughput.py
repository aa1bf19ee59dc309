"""Training throughput of any config: images/s and a per-step time breakdown.

    python bench/train_throughput.py configs/quickstart.yaml
    python bench/train_throughput.py configs/sit_xl2.yaml --synthetic --batch 64 --precision bf16   # on a GPU

Phases: data (next batch + posterior sample), forward (objective loss), backward, optimizer (clip, fused
AdamW step), EMA (one foreach lerp). The device is synchronised between phases, a small overhead the
training loop (which never waits) does not have.
`--synthetic` replaces the dataset by random latents of the configured shape (no cache or VAE needed).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

from gen.config import load_config
from gen.data import DistributedBatchSampler, build_dataset
from gen.ema import EMA
from gen.models import build_backbone
from gen.objectives import build_objective
from latents import build_latent

PHASES = ("data", "forward", "backward", "optimizer", "ema")


def batches(cfg, latent, batch: int, synthetic: bool, device):
    """An endless iterator of model-space x0 and labels."""
    if synthetic:
        while True:
            yield (torch.randn(batch, *latent.shape, device=device),
                   torch.randint(0, cfg.cond.num_classes, (batch,), device=device))
    dataset = build_dataset(cfg)
    sampler = DistributedBatchSampler(len(dataset), batch, 1, 0, seed=cfg.train.seed)
    for item in DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers):
        raw = item["raw"].to(device) if "raw" in item else latent.encode_raw(item["image"].to(device))
        yield latent.to_model(raw), item["label"].to(device)


def main() -> None:
    """Time `--steps` training steps after `--warmup` and print the breakdown."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: train.global_batch_size)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_intermixed_args()
    cfg = load_config(args.config, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    batch = args.batch or cfg.train.global_batch_size
    latent = build_latent(cfg)
    model = build_backbone(cfg, latent.shape).to(device)
    ema = EMA(model, cfg.train.ema_decay)
    objective = build_objective(cfg, model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, fused=device.type == "cuda")
    net = torch.compile(model) if args.compile else model
    data = batches(cfg, latent, batch, args.synthetic, device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    totals = dict.fromkeys(PHASES, 0.0)
    for i in range(args.warmup + args.steps):
        marks = [time.perf_counter()]
        x0, y = next(data)
        sync(); marks.append(time.perf_counter())
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = objective.loss(net, x0, y).loss.mean()
        sync(); marks.append(time.perf_counter())
        loss.backward()
        sync(); marks.append(time.perf_counter())
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(); marks.append(time.perf_counter())
        ema.update(model)
        sync(); marks.append(time.perf_counter())
        if i >= args.warmup:
            for name, a, b in zip(PHASES, marks, marks[1:]):
                totals[name] += b - a
    step = sum(totals.values()) / args.steps
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{cfg.model.name} latent {latent.shape} batch {batch} {precision} on {name} "
          f"({sum(p.numel() for p in model.parameters()):,} params, torch {torch.__version__})")
    print("  ".join(f"{k} {1e3 * v / args.steps:.1f} ms ({100 * v / args.steps / step:.0f}%)"
                    for k, v in totals.items()))
    print(f"step {1e3 * step:.1f} ms  ->  {batch / step:.1f} images/s")


if __name__ == "__main__":
    main()
