"""Linear probe of a run's image encoder (ADDP's pixel encoder): how linearly its frozen features of real images
separate the classes. `python evaluate.py RUN --probe` (evaluate.py's docstring).

Protocol (ours: ADDP's repository has no linear-probe script or number, its README reports fine-tuning):
- images: the run's dataset (data.*, overridable: digits offline, image_folder, hf) as uint8 at data.image_size,
  grey repeated to RGB, scaled to [0, 1]; split by class with a fixed seed (`stratified_split`) into a fitting part
  and a held-out part of eval.probe_heldout_fraction, after keeping at most eval.probe_max_images (the same split
  for every encoder probed on the same data);
- features: `Backbone.encode_images` in eval mode, fp32, pooled by eval.probe_pool: mean (the average of the grid
  tokens), cls, or both (concatenated);
- encoder: the run's EMA weights (eval.probe_encoder=ema), or the same architecture at the run's own
  initialisation (init: torch.manual_seed(train.seed), then the backbone is built, as train.py does): the baseline;
- classifier: multinomial logistic regression on features standardised by the fitting part's mean and std, L2
  penalty eval.probe_l2 / 2 ||W||^2 on the weights (not the bias), zero init, full-batch L-BFGS (strong Wolfe line
  search) in float64 on the features' device (the GPU when there is one), on one CPU thread for small problems
  (many threads on a few thousand rows are many times slower, and one thread's sums do not depend on the
  machine): no randomness, the same numbers on every run of the same device.
Scores: top-1 accuracy on the fitting and the held-out part, printed and written as JSON. One process.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

POOLS = ("mean", "cls", "both")
ENCODERS = ("ema", "init")
SPLIT_SEED = 0
SMALL = 2 ** 22  # feature elements up to which the CPU fit runs on one thread


def stratified_split(labels: np.ndarray, fraction: float, limit: int | None = None,
                     seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(fitting, held-out) indices: per class a seeded permutation, its first round(fraction n_c) (at least one,
    and at least one left to fit) held out; with `limit`, every class first cut to its share of `limit` images."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    fit, held = [], []
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        if limit is not None:
            idx = idx[: max(2, round(limit * len(idx) / len(labels)))]
        if len(idx) < 2:
            raise ValueError(f"class {c} has {len(idx)} image(s): the probe needs at least 2 per class (one to fit, "
                             f"one to score); add images or raise eval.probe_max_images")
        k = min(max(1, round(fraction * len(idx))), len(idx) - 1)
        held.append(idx[:k])
        fit.append(idx[k:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


def pool(features, how: str) -> Tensor:
    """(N, D) (or (N, 2D) for both) from a gen.models.base.ImageFeatures."""
    if how != "mean" and features.cls is None:
        from gen.config import ConfigError

        raise ConfigError(f"eval.probe_pool={how} needs a cls token, which this encoder has not; use mean")
    mean = features.tokens.mean(dim=1)
    if how == "mean":
        return mean
    return features.cls if how == "cls" else torch.cat([features.cls, mean], dim=1)


@torch.no_grad()
def image_features(model, dataset, indices: np.ndarray, how: str, batch: int, device) -> tuple[Tensor, Tensor]:
    """Pooled features (N, D) float64 on `device` and labels (N,) of dataset[indices], in index order."""
    from gen.io import to_rgb

    model.eval()
    feats, labels = [], []
    for start in range(0, len(indices), batch):
        items = [dataset[int(i)] for i in indices[start: start + batch]]
        images = torch.stack([torch.as_tensor(it["image"]) for it in items]).to(device)
        x = to_rgb(images).float() / 255.0
        feats.append(pool(model.encode_images(x), how).double())
        labels.append(torch.tensor([int(it["label"]) for it in items], device=device))
    return torch.cat(feats), torch.cat(labels)


def fit_linear(x: Tensor, y: Tensor, num_classes: int, l2: float, max_iter: int = 500) -> tuple[Tensor, Tensor]:
    """Logistic regression (W (D, C), b (C,)) on standardised x (N, D) float64: zero init, full-batch L-BFGS on x's
    device (on the CPU with one thread up to SMALL elements of x)."""
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    if x.device.type == "cpu" and x.numel() <= SMALL:
        torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    return w.detach(), b.detach()


def linear_probe(fit_x: Tensor, fit_y: Tensor, held_x: Tensor, held_y: Tensor, l2: float) -> dict:
    """Top-1 accuracy of the logistic regression fitted on (fit_x, fit_y), on both parts (module docstring)."""
    fit_x, held_x = fit_x.double(), held_x.double()
    mean, std = fit_x.mean(0), fit_x.std(0).clamp_min(1e-12)
    fx, hx = (fit_x - mean) / std, (held_x - mean) / std
    num_classes = int(max(fit_y.max(), held_y.max())) + 1
    w, b = fit_linear(fx, fit_y.long().to(fx.device), num_classes, l2)

    def acc(x, y):
        return float(((x @ w + b).argmax(1) == y.to(x.device)).double().mean())

    return {"fit_acc": acc(fx, fit_y), "heldout_acc": acc(hx, held_y), "num_fit": len(fit_y),
            "num_heldout": len(held_y), "feature_dim": int(fit_x.shape[1]), "num_classes": num_classes}


def probe_encoder(cfg, ema_path: Path, device) -> tuple[dict, dict]:
    """(scores, protocol) of the probe that cfg.eval.probe_* describe, on the run's EMA weights at `ema_path`."""
    from gen.config import ConfigError
    from gen.data import build_dataset
    from gen.models import build_backbone, family_of
    from latents import build_latent

    e = cfg.eval
    family = family_of(cfg.model.name)
    if not family.ENCODES_IMAGES:
        raise ConfigError(f"model.name={cfg.model.name} ({family.__name__}) has no image encoder to probe; the linear "
                          f"probe reads a pixel encoder (ADDP-*)")
    dataset = build_dataset(cfg, split="train")
    if "image" not in dataset[0]:
        raise ConfigError(f"data.name={cfg.data.name} holds encoded latents, not images; probe on images: "
                          f"data.name=digits, or image_folder / hf with data.path=...")
    labels = np.asarray(dataset.labels)  # every image dataset of gen.data keeps its labels (N,)
    try:
        fit, held = stratified_split(labels, e.probe_heldout_fraction, e.probe_max_images)
    except ValueError as err:
        raise ConfigError(f"probe on data.name={cfg.data.name}: {err}") from None
    torch.manual_seed(cfg.train.seed)  # the run's own initialisation (train.py), kept for eval.probe_encoder=init
    model = build_backbone(cfg, build_latent(cfg).shape)
    if e.probe_encoder == "ema":
        from gen.checkpoint import CheckpointError
        from gen.io import load_tensors

        try:
            model.load_state_dict(load_tensors(ema_path, "the run's EMA weights"), strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"{ema_path} does not fit model.name={cfg.model.name}: "
                                  f"{str(err).splitlines()[-1].strip()}; do not override model.* keys") from None
    model = model.to(device)
    fx, fy = image_features(model, dataset, fit, e.probe_pool, e.batch_per_process, device)
    hx, hy = image_features(model, dataset, held, e.probe_pool, e.batch_per_process, device)
    scores = linear_probe(fx, fy, hx, hy, e.probe_l2)
    protocol = {"weights": str(ema_path) if e.probe_encoder == "ema" else f"init (train.seed={cfg.train.seed})",
                "model": cfg.model.name, "data": cfg.data.name, "data_path": cfg.data.path,
                "image_size": cfg.data.image_size, "pool": e.probe_pool, "l2": e.probe_l2,
                "heldout_fraction": e.probe_heldout_fraction, "max_images": e.probe_max_images,
                "split_seed": SPLIT_SEED, "classifier": "logistic regression, full-batch L-BFGS, float64"}
    return scores, protocol


def run_probe(weights: str, overrides: list[str], out: str | None) -> Path:
    """evaluate.py --probe: probe the run (folder or checkpoint) `weights`, write the JSON, return its path."""
    from gen.checkpoint import resolve_weights
    from gen.config import load_config
    from gen.io import atomic_write_text, check_writable_file

    ema_path, cfg_path = resolve_weights(weights)
    cfg = load_config(cfg_path, overrides)
    e = cfg.eval
    default = ema_path.parent.parent.parent / f"probe-{e.probe_encoder}-{e.probe_pool}-{cfg.data.name}.json"
    path = Path(out) if out else default
    check_writable_file(path, "--out")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scores, protocol = probe_encoder(cfg, ema_path, device)
    atomic_write_text(path, json.dumps({"metrics": scores, "protocol": protocol}, indent=1))
    print(f"linear probe ({e.probe_encoder} encoder, {e.probe_pool} pool, {cfg.data.name}): held-out top-1 "
          f"{scores['heldout_acc']:.4f} on {scores['num_heldout']} images (fit {scores['fit_acc']:.4f} on "
          f"{scores['num_fit']}); wrote {path}")
    return path
