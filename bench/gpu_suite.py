"""The performance table in one command: training, sampling and evaluation throughput on one GPU.

    python bench/gpu_suite.py --out bench/results                      # one GPU, about 8 minutes on an H100/H200
    python bench/gpu_suite.py --out bench/results --repa-dir ~/REPA    # + the reference REPA step on the same GPU
    python bench/gpu_suite.py --out /tmp/cpu --quick                   # tiny sizes: the CPU figures, or a dry run

Writes gpu_suite.json (every figure, written again after each item, so a run cut short keeps what it measured) and
gpu_suite.md (the table README shows). Items, most important first, each skipped once --budget seconds are spent:
- train: images/s, step time, peak memory and MFU of SiT-XL/2 and SiT-B/2, plain and + REPA with cached targets,
  eager and compiled (regional torch.compile), bf16 autocast; the reference REPA step (its fp16 autocast + scaler
  and bf16) at the same model and batch with --repa-dir. MFU counts 3x the backbone's forward FLOPs (torch's
  counter) per image against the chip's dense bf16 peak.
- sampling: SiT-XL/2, SDE Euler-Maruyama with CFG 1.8 on t in [0, 0.7]; timed with --sample-steps steps and scaled to
  250 (every step costs the same; the guided fraction of the grid is the same), fp32, tf32 and bf16, eager and
  compiled; the reference REPA sampler with --repa-dir.
- evaluation: SD-VAE decode, Inception (ADM features) and DINOv2-L/14 (FD-DINOv2) images/s, DINOv2-B/14 (REPA's
  online targets) images/s, the 2048-d Frechet distance in seconds; then the estimated FID-50K wall time on 8 GPUs
  (per GPU 6,250 samples: sampling + decode + Inception, metrics streamed, reference statistics precomputed).
Random-init weights throughout, saved to a temporary folder and loaded through the real loaders (timing does not
depend on the values).
"""
from __future__ import annotations

import argparse
import json
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run as bench/gpu_suite.py

from bench.models import forward_flops  # noqa: E402
from bench.profile_step import format_profile, profile_step  # noqa: E402
from bench.vs_reference import (  # noqa: E402
    our_sampler, our_train_step, reference_model, reference_sampler, reference_train_step)
from gen.models import build_model  # noqa: E402
from gen.precision import precision as precision_of  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
"""Dense bf16 tensor-core peak FLOP/s by device name fragment (NVIDIA datasheets, SXM parts; no sparsity)."""


EXPLORE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune")
"""torch.compile modes --explore tries on SiT-XL/2 + REPA (max-autotune: autotuned matmuls and CUDA graphs)."""


class Suite:
    """Runs the items within a time budget and keeps the results (JSON after each item)."""

    def __init__(self, out: Path, budget: float, device: torch.device, only: list[str] | None = None,
                 skip: list[str] | None = None):
        self.out, self.budget, self.device, self.start = out, budget, device, time.perf_counter()
        self.only, self.skip = tuple(only) if only else None, tuple(skip) if skip else None
        self.results: dict = {"device": device_name(device), "torch": torch.__version__, "items": {}}
        out.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, fn, *args, **kwargs) -> dict | None:
        """fn(*args, **kwargs) -> dict of figures, recorded under `name`; a failure is recorded, not raised."""
        if (self.only and not name.startswith(self.only)) or (self.skip and name.startswith(self.skip)):
            return None
        spent = time.perf_counter() - self.start
        if spent > self.budget:
            self.results["items"][name] = {"skipped": f"budget of {self.budget:.0f} s spent"}
            return None
        t0 = time.perf_counter()
        try:
            row = fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - one failing item must not lose the others' figures
            row = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        if self.device.type == "cuda":  # compiled code holds the item's model: free it, and show what stays
            torch._dynamo.reset()
            reset_memory(self.device)
            row["left_allocated_gib"] = round(torch.cuda.memory_allocated(self.device) / 2**30, 2)
        self.results["items"][name] = row
        print(f"[{time.perf_counter() - self.start:6.0f} s] {name}: {json.dumps(row)}", flush=True)
        (self.out / "gpu_suite.json").write_text(json.dumps(self.results, indent=1))
        return row


def sig(x: float, digits: int = 3) -> float:
    """x to `digits` significant digits (CPU figures are small, GPU ones large)."""
    return float(f"{x:.{digits}g}")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, iters: int, warmup: int) -> list[float]:
    """Seconds of each of `iters` calls after `warmup` (device synchronised around each)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def peak_flops(device: torch.device) -> float | None:
    name = device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def reset_memory(device: torch.device) -> None:
    gc.collect()  # the previous item's models, optimizer states and EMA
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def graph_breaks() -> int:
    """Graph breaks torch.compile has met so far in this process."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def train_row(model: str, batch: int, targets: str | None, compile: bool | str, device, iters: int, warmup: int,
              train_flops: float) -> dict:
    """Our real training step (bench.vs_reference.our_train_step: train.py's loop body, bf16 autocast on a GPU),
    plain or + REPA on cached DINOv2-B targets: images/s, step time, peak memory, MFU. `compile`: regional
    torch.compile, or a torch.compile mode for it."""
    reset_memory(device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    plain = () if targets else ("align.methods=[]",)
    step = our_train_step(model, batch, device, precision, targets="cached", compile=compile, overrides=plain)
    breaks = graph_breaks()
    sec = statistics.median(timed(step, device, iters, warmup))
    row = {"model": model, "batch": batch, "repa": targets is not None, "compiled": compile, "precision": precision,
           "step_ms": round(1e3 * sec, 1), "images_per_s": sig(batch / sec),
           "peak_mem_gib": peak_memory_gib(device)}
    if compile:
        row["graph_breaks"] = graph_breaks() - breaks
    peak = peak_flops(device)
    if peak:
        row["mfu"] = round(batch * train_flops / sec / peak, 3)
    return row


def reference_row(repa_dir: str, model: str, batch: int, precision: str, device, iters: int, warmup: int) -> dict:
    """The reference REPA train.py step (SiT + projector, SILoss, AdamW, EMA; its encoder runs on the images each
    step, as its train.py does)."""
    reset_memory(device)
    step = reference_train_step(repa_dir, model, batch, device, precision)
    sec = statistics.median(timed(step, device, iters, warmup))
    return {"model": model, "batch": batch, "precision": precision, "step_ms": round(1e3 * sec, 1),
            "images_per_s": sig(batch / sec), "peak_mem_gib": peak_memory_gib(device)}


def encoder_row(model: str, batch: int, device, iters: int) -> dict:
    """The share of the reference step spent in its online DINOv2-B/14 targets, to compare with cached targets."""
    from bench.vs_reference import ENCODER, encoder_file

    from align.encoders import build_encoder

    enc = build_encoder(ENCODER, encoder_file(), 256, (16, 16)).to(device)
    return features_row(enc, batch, 256, device, iters, autocast=device.type == "cuda")


def sampling_row(model: str, batch: int, steps: int, precision: str, compile: bool, device,
                 repa_dir: str | None = None) -> dict:
    """Images/s of SDE Euler-Maruyama with CFG 1.8 on [0, 0.7], timed at `steps` steps and scaled to 250: ours
    (sampler.precision's contexts, sample.compile's regional compile) or, with `repa_dir`, REPA's sampler."""
    reset_memory(device)
    torch.manual_seed(0)
    autocast = "bf16" if precision == "bf16" else "fp32"  # the samplers' own autocast switch; TF32 from the context
    if repa_dir:
        net = reference_model(repa_dir, model, device)
        run = reference_sampler(repa_dir, net, batch, device, autocast, steps)
    else:
        net = build_model(model, input_size=32).to(device)
        if compile:
            net.compile_regions()
        run = our_sampler(net, batch, device, autocast, steps)

    def call():
        with torch.no_grad(), precision_of(precision, device):  # REPA's sampler leaves no_grad to generate.py
            run()

    sec = statistics.median(timed(call, device, 1, 1))
    return {"model": model, "batch": batch, "precision": precision, "compiled": compile, "timed_steps": steps,
            "images_per_s_250": sig(batch / (sec * 250 / steps)), "peak_mem_gib": peak_memory_gib(device)}


def features_row(net, batch: int, size: int, device, iters: int, autocast: bool = False) -> dict:
    """Images/s of a feature network on uint8 (batch, 3, size, size) images."""
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)

    def run():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            net(images)

    sec = statistics.median(timed(run, device, iters, 1))
    return {"batch": batch, "images_per_s": sig(batch / sec)}


def vae_row(tmp: Path, batch: int, device, iters: int) -> dict:
    """SD-VAE decode (sd-vae-ft-ema's architecture, random init, float32 as sample.py runs it): images/s."""
    from diffusers.models import AutoencoderKL

    from latents.sd_vae import SDVAE

    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                  layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256).save_pretrained(tmp / "vae")
    vae = SDVAE(str(tmp / "vae"), 256, batch_size=batch).load_weights(device)
    z = torch.randn(batch, 4, 32, 32, device=device)
    sec = statistics.median(timed(lambda: vae.decode(z), device, iters, 1))
    return {"batch": batch, "images_per_s": sig(batch / sec)}


def frechet_row(dim: int = 2048) -> dict:
    """Seconds of gen.eval.frechet_distance on two random dim x dim covariances (float64, host)."""
    from gen.eval.frechet import frechet_distance

    g = np.random.default_rng(0)
    a, b = g.standard_normal((2 * dim, dim)), g.standard_normal((2 * dim, dim))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        frechet_distance(a.mean(0), s1, b.mean(0), s2)
        times.append(time.perf_counter() - t0)
    return {"dim": dim, "seconds": round(min(times), 3)}


def eval_rows(suite: Suite, tmp: Path, device, quick: bool) -> None:
    """Feature networks and the Frechet distance."""
    import timm
    from safetensors.torch import save_file

    from align.encoders import build_encoder
    from gen.eval.dinov2 import DinoV2Features
    from gen.eval.inception import InceptionFeatures, save_random_inception

    batch = 2 if quick else 250
    iters = 1 if quick else 5
    suite.run("vae_decode", vae_row, tmp, 2 if quick else 64, device, iters)
    inception = save_random_inception(tmp / "inception.pth")
    suite.run("inception", lambda: features_row(InceptionFeatures(inception).to(device), batch, 256, device, iters))
    tiny = {"depth": 2, "embed_dim": 64, "num_heads": 2} if quick else {}
    for arch in ("vit_large_patch14_dinov2", "vit_base_patch14_dinov2"):
        state = timm.create_model(arch, pretrained=False, num_classes=0, **tiny).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / f"{arch}.safetensors")
    suite.run("dinov2_l_fd", lambda: features_row(
        DinoV2Features(tmp / "vit_large_patch14_dinov2.safetensors", **tiny).to(device), batch, 256, device, iters))
    suite.run("dinov2_b_repa_targets", lambda: features_row(
        build_encoder("dinov2-vit-b", tmp / "vit_base_patch14_dinov2.safetensors", 256, 16, **tiny).to(device),
        batch, 256, device, iters, autocast=device.type == "cuda"))
    suite.run("frechet_2048", frechet_row, 256 if quick else 2048)


def fid50k_estimate(items: dict, gpus: int = 8, n: int = 50_000) -> dict | None:
    """Wall time of sample.py's FID-50K on `gpus` GPUs from the measured per-GPU rates (streamed metrics)."""
    sampling = max((v.get("images_per_s_250", 0) for k, v in items.items() if k.startswith("sample_")), default=0)
    vae, inc = items.get("vae_decode", {}).get("images_per_s"), items.get("inception", {}).get("images_per_s")
    fd = items.get("frechet_2048", {}).get("seconds", 0)
    if not (sampling and vae and inc):
        return None
    per_gpu = n / gpus
    seconds = per_gpu / sampling + per_gpu / vae + per_gpu / inc + fd
    return {"gpus": gpus, "samples": n, "sampling_images_per_s": sampling, "minutes": round(seconds / 60, 1)}


def markdown(results: dict) -> str:
    """The README table."""
    items = results["items"]
    lines = [f"Device: {results['device']}, torch {results['torch']}.", "",
             "| item | figure | memory | MFU |", "| --- | --- | --- | --- |"]
    for name, row in items.items():
        if "error" in row or "skipped" in row:
            lines.append(f"| {name} | {row.get('error') or row.get('skipped')} | | |")
            continue
        figure = next((f"{row[k]} {label}" for k, label in (("images_per_s", "images/s"),
                                                            ("images_per_s_250", "images/s (250 steps)"),
                                                            ("seconds", "s"), ("minutes", "min")) if k in row), "")
        if "step_ms" in row:
            figure += f" ({row['step_ms']} ms/step, batch {row['batch']})"
        if "busy_ms" in row:
            figure = format_profile(row).splitlines()[0] + "; " + ", ".join(
                f"{kind} {ms} ms" for kind, ms in list(row["by_kind_ms"].items())[:4])
        mem = f"{row['peak_mem_gib']} GiB" if row.get("peak_mem_gib") is not None else ""
        lines.append(f"| {name} | {figure} | {mem} | {row.get('mfu', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--repa-dir", default=None, help="a local checkout of sihyun-yu/REPA")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which no new item starts")
    parser.add_argument("--quick", action="store_true", help="tiny models and batches (CPU figures, dry runs)")
    parser.add_argument("--xl-batch", type=int, default=64, help="SiT-XL/2 training batch")
    parser.add_argument("--sample-steps", type=int, default=20, help="timed SDE steps (figures scaled to 250)")
    parser.add_argument("--only", nargs="*", default=None, help="only items whose name starts with one of these")
    parser.add_argument("--skip", nargs="*", default=None, help="leave out items whose name starts with one of these")
    parser.add_argument("--explore", action="store_true",
                        help="also SiT-XL/2 + REPA at batch 128 and 192 under each torch.compile mode (EXPLORE_MODES)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    suite = Suite(args.out, args.budget, device, args.only, args.skip)
    run = suite.run

    models = [("SiT-S/2", 2, 1)] if args.quick else [("SiT-XL/2", args.xl_batch, 10), ("SiT-B/2", 128, 10)]
    warmup = 1 if args.quick else 3
    for model, batch, iters in models:
        flops = 3 * forward_flops(build_model(model, input_size=32), 32)
        for targets in (None, "cached"):
            for compile in (False,) if args.quick else (False, True):  # compiling takes minutes on a CPU
                name = f"train_{model}{'_repa' if targets else ''}_{'compiled' if compile else 'eager'}"
                run(name, train_row, model, batch, targets, compile, device, iters, warmup, flops)
        run(f"profile_{model}_repa{'' if args.quick else '_compiled'}", profile_step, model, batch, device,
            compile=not args.quick, steps=1 if args.quick else 3, warmup=1 if args.quick else 3)
        if args.repa_dir:
            for precision in (("fp16", "bf16") if device.type == "cuda" else ("fp32",)):
                run(f"reference_{model}_repa_{precision}", reference_row, args.repa_dir, model, batch, precision,
                    device, iters, warmup)
            run(f"reference_{model}_encoder_share", encoder_row, model, batch, device, iters)
        if args.quick:
            break
    sample_model = "SiT-S/2" if args.quick else "SiT-XL/2"
    sample_batch, steps = (2, 2) if args.quick else (128, args.sample_steps)
    variants = [("fp32", False)] if device.type != "cuda" else [("tf32", False), ("bf16", False), ("bf16", True),
                                                                ("fp32", False)]
    for kind, compile in variants:
        run(f"sample_{sample_model}_{kind}{'_compiled' if compile else ''}", sampling_row, sample_model, sample_batch,
            steps, kind, compile, device)
    if args.repa_dir:
        run(f"reference_sample_{sample_model}_tf32", sampling_row, sample_model, sample_batch, steps,
            "tf32" if device.type == "cuda" else "fp32", False, device, args.repa_dir)
    with tempfile.TemporaryDirectory() as tmp:
        eval_rows(suite, Path(tmp), device, args.quick)
    if args.explore and not args.quick:  # last: the default items keep their budget
        flops = 3 * forward_flops(build_model("SiT-XL/2", input_size=32), 32)
        for big, mode in [(b, m) for m in EXPLORE_MODES for b in (128, 192)]:  # autotuning takes minutes
            run(f"train_SiT-XL/2_repa_compiled_batch{big}_{mode}", train_row, "SiT-XL/2", big, "cached", mode, device,
                10, 3, flops)
    estimate = fid50k_estimate(suite.results["items"])
    if estimate:
        suite.results["items"]["fid50k_8gpu_estimate"] = estimate
    (args.out / "gpu_suite.json").write_text(json.dumps(suite.results, indent=1))
    table = markdown(suite.results)
    (args.out / "gpu_suite.md").write_text(table)
    print(table)
    print(f"total {time.perf_counter() - suite.start:.0f} s")


if __name__ == "__main__":
    main()
