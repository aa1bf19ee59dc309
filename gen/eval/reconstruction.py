"""Reconstruction error of a run's latent space (its autoencoder), reported by sample.py next to the sample metrics.

The images of an evaluation split go through `encode_raw` -> `to_model` -> `decode` (for binary latents: the cached
bits, decoded by the frozen stage-1 autoencoder) and are compared with the originals in uint8 RGB: mean absolute
error and RMSE in [0, 1] units and PSNR (dB, from the mean squared error over all pixels). Digits runs use the
held-out split and also report the digits classifier's accuracy on the reconstructions (gen.eval.digits).
"""
from __future__ import annotations

import math

import torch

from gen.io import to_rgb


@torch.no_grad()
def reconstruction_metric(images, labels, cfg, max_images: int = 1000, batch_size: int = 250) -> dict:
    """Reconstruction error of cfg's latent space on up to `max_images` evaluation images (samples unused)."""
    from gen.data import build_dataset
    from latents import build_latent

    digits = cfg.data.name == "digits"
    dataset = build_dataset(cfg, split="heldout" if digits else "train")
    latent = build_latent(cfg).load_weights("cpu")
    count = min(len(dataset), max_images)
    originals, recons, ys = [], [], []
    for start in range(0, count, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, count))]
        x = torch.stack([torch.as_tensor(it["image"]) for it in items])
        recons.append(latent.decode(latent.to_model(latent.encode_raw(x))))
        originals.append(to_rgb(x))
        ys += [int(it["label"]) for it in items]
    x, y = torch.cat(originals).float() / 255.0, torch.cat(recons).float() / 255.0
    mse = (x - y).pow(2).mean().item()
    out = {"l1": (x - y).abs().mean().item(), "rmse": math.sqrt(mse),
           "psnr": 10.0 * math.log10(1.0 / max(mse, 1e-12)), "num_images": count}
    if digits:
        from gen.eval.digits import DigitsEvaluator

        preds = DigitsEvaluator(cfg.data.image_size).predict(torch.cat(recons))
        out["class_accuracy"] = (preds == torch.tensor(ys)).double().mean().item()
    return out
