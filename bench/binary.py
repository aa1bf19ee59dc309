"""Binary latents: Bernoulli sampler images/s at 16/32/64 steps and binary autoencoder encode/decode images/s.

    python bench/binary.py                         # CPU: small sizes (a 2-block SiT-S/1 on 8x8x16 bits, a 64 px AE)
    python bench/binary.py --device cuda --full    # the LSUN-Churches recipe's sizes: SiT-B/1 x 24 blocks on
                                                   # 16x16x64 bits, batch 256; the released C64 AE at 256 px

Sampler: the `bernoulli` objective's ancestral sampler (configs/bld_churches256.yaml's T = 64, linear schedule), no
guidance, random-init weights (speed does not depend on them), one warm-up pass. Autoencoder: `probs` + Bernoulli
bits (encode) and `decode` of a BinaryAutoencoder (random init) in float32 under no_grad. Prints one JSON row per
figure (rates in images/s) and writes them to --out when given.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from gen.models import build_model
from gen.objectives.bernoulli import BernoulliObjective
from gen.precision import precision
from latents.bae import BAEArch, BinaryAutoencoder

SMALL = dict(model="SiT-S/1", depth=2, bits=(16, 8, 8), batch=32, ae=dict(bit_channels=16, nf=32, image_size=64,
                                                                         ch_mult=(1, 1, 2, 2, 4)), ae_batch=8)
FULL = dict(model="SiT-B/1", depth=24, bits=(64, 16, 16), batch=256, ae=dict(), ae_batch=64)  # BAEArch(): C64


def timed(fn, device: str, repeats: int) -> float:
    """Seconds per call of fn (after one warm-up call), synchronising a GPU."""
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


@torch.no_grad()
def sampler_rows(size: dict, steps: list[int], device: str, dtype: str, repeats: int) -> list[dict]:
    """Images/s of the ancestral sampler at each step count."""
    c, h, w = size["bits"]
    model = build_model(size["model"], depth=size["depth"], input_size=h, in_channels=c, num_classes=1000)
    model = model.to(device).eval()
    objective = BernoulliObjective(num_timesteps=64, null_class=model.null_class)
    fn = objective.model_fn(model)
    y = torch.zeros(size["batch"], dtype=torch.long, device=device)
    rows = []
    for s in steps:
        x_T = objective.prior((c, h, w), torch.Generator(device).manual_seed(0), n=size["batch"], device=device)

        def run():
            with precision(dtype, device):
                objective.sample(fn, x_T, y, num_steps=s, cfg_scale=1.0)

        sec = timed(run, device, repeats)
        rows.append({"what": "bernoulli_sampler", "model": f"{size['model']} x {size['depth']} blocks",
                     "bits": list(size["bits"]), "steps": s, "batch": size["batch"], "precision": dtype,
                     "images_per_s": size["batch"] / sec})
    return rows


@torch.no_grad()
def autoencoder_rows(size: dict, device: str, repeats: int) -> list[dict]:
    """Images/s of the binary autoencoder's encode (probabilities + Bernoulli bits) and decode, float32."""
    arch = BAEArch(**size["ae"])
    net = BinaryAutoencoder(arch).to(device).eval()
    n = size["ae_batch"]
    images = torch.rand(n, 3, arch.image_size, arch.image_size, device=device)
    bits = (torch.rand(n, *arch.latent_shape, device=device) < 0.5).float()
    common = {"bits": list(arch.latent_shape), "image_size": arch.image_size, "batch": n, "precision": "fp32"}
    enc = timed(lambda: net.binarize(net.probs(images)), device, repeats)
    dec = timed(lambda: net.decode(bits), device, repeats)
    return [{"what": "bae_encode", **common, "images_per_s": n / enc},
            {"what": "bae_decode", **common, "images_per_s": n / dec}]


def main(argv: list[str] | None = None) -> list[dict]:
    """Command-line entry point; returns the rows."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="the recipe's sizes (a GPU's work) instead of small ones")
    parser.add_argument("--steps", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"], help="sampler network")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    size = FULL if args.full else SMALL
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    rows = sampler_rows(size, args.steps, args.device, args.precision, args.repeats)
    rows += autoencoder_rows(size, args.device, args.repeats)
    rows = [{**r, "device": device_name} for r in rows]
    for row in rows:
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
