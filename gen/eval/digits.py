"""The quickstart's offline metric: a small CNN trained on the embedded digits scores class-conditional samples.

Two numbers, both without network access or pretrained weights: class consistency (the share of samples that the
classifier assigns to their conditioning label) and the Frechet distance between the classifier's penultimate
features of the samples and of the held-out split. The classifier is trained once per image size (a few seconds on
CPU, fixed seed) and cached; the feature width is kept small (48) so that the ~360 held-out images give a
non-singular covariance (N < d makes the covariance singular, bioinf-jku/TTUR issue #4, and the Frechet distance
biased).
"""
from __future__ import annotations

import math
import os
import pickle
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gen.data import DigitsDataset
from gen.eval.frechet import GaussianStats, frechet_distance
from gen.io import atomic_write

VERSION = "v1"  # bump when the network, the training recipe or the digits splits change: old caches are ignored
FEATURE_DIM = 48
NUM_CLASSES = 10


class DigitsNet(nn.Module):
    """Compact CNN for upsampled 8x8 digits at any image size; `features` gives the penultimate activations."""

    work_size = 16  # the digits hold 8x8 pixels of information; one working size keeps cost and accuracy size-free

    def __init__(self, feature_dim: int = FEATURE_DIM):
        super().__init__()
        # GELU rather than ReLU: no dead penultimate units, so the feature covariance keeps full rank.
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),  # (N, 16, 8, 8)
            nn.Conv2d(16, 32, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),  # (N, 32, 4, 4)
            nn.Conv2d(32, 64, 3, padding=1), nn.GELU(),  # (N, 64, 4, 4)
            nn.Flatten(), nn.Linear(64 * 16, feature_dim), nn.GELU(),  # (N, feature_dim)
        )
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """Grey images (N, 1, H, W) -> (N, 1, work_size, work_size); a linear map, so any value range works."""
        if x.shape[-2:] == (self.work_size, self.work_size):
            return x
        # Antialiased, so high-frequency artefacts of large samples are averaged in rather than aliased.
        return F.interpolate(x, size=(self.work_size, self.work_size), mode="bilinear", antialias=True,
                             align_corners=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, feature_dim) of grey images (N, 1, H, W) scaled to [-1, 1]."""
        return self.body(self.resize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, 10)."""
        return self.head(self.features(x))


def default_cache_dir() -> Path:
    """Where trained digits classifiers are kept: $XDG_CACHE_HOME/repgen/digits, else ~/.cache/repgen/digits."""
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "repgen" / "digits"


def load_split(split: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (N, 1, H, W) uint8 and labels (N,) int64 of one split of gen.data.DigitsDataset."""
    ds = DigitsDataset(split=split, image_size=image_size)
    items = [ds[i] for i in range(len(ds))]
    images = torch.stack([torch.as_tensor(it["image"]) for it in items])
    labels = torch.tensor([int(it["label"]) for it in items], dtype=torch.long)
    return images, labels


def to_input(images) -> torch.Tensor:
    """uint8 (N, C, H, W) with C in {1, 3}, or (N, H, W), numpy or torch -> float32 grey (N, 1, H, W) in [-1, 1]."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise ValueError(f"digits metric takes uint8 images in [0, 255], got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1|3, H, W) or (N, H, W), got shape {tuple(x.shape)}")
    x = x.float().mean(dim=1, keepdim=True)  # RGB samples (e.g. decoded by a pixel latent space) -> grey
    return x / 127.5 - 1.0


@contextmanager
def _one_thread():
    """Run torch CPU ops on one thread, restoring the caller's setting afterwards."""
    # The network is tiny: with two OpenMP threads on a busy machine each op waits on a descheduled peer (measured
    # 100x slower steps), and one thread also makes the trained weights independent of the core count.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random small affine jitter (shift up to 1 source pixel, +-10 degrees, +-10% scale) on [0, 1] images."""
    n = x.shape[0]
    u = torch.rand(n, 4, generator=generator) * 2 - 1
    angle, scale = u[:, 0] * math.radians(10), 1 + 0.1 * u[:, 1]
    # affine_grid works in [-1, 1] coordinates: one of the 8 source pixels spans 2/8 = 0.25.
    shift = 0.25 * u[:, 2:]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Jitter before normalising so that the zero padding is the black background.
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def train_classifier(image_size: int, *, seed: int = 0, epochs: int = 20, batch_size: int = 64) -> DigitsNet:
    """Train DigitsNet on the training split at image_size, deterministically (fixed seed, CPU)."""
    images, labels = load_split("train", image_size)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's global RNG
        torch.manual_seed(seed)
        net = DigitsNet()
    x01 = net.resize(images.float().mean(dim=1, keepdim=True) / 255.0)  # once, not in every step
    steps_per_epoch = math.ceil(len(labels) / batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
    net.train()
    with _one_thread():
        for _ in range(epochs):
            order = torch.randperm(len(labels), generator=generator)
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                x = _augment(x01[idx], generator) * 2 - 1
                loss = F.cross_entropy(net(x), labels[idx], label_smoothing=0.05)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return net.eval()


class DigitsEvaluator:
    """Class consistency and feature Frechet distance of digit samples at one image size (offline, CPU-cheap)."""

    def __init__(self, image_size: int, cache_dir: str | os.PathLike | None = None, device: str = "cpu",
                 batch_size: int = 512):
        self.image_size = image_size
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.cache_path = Path(cache_dir or default_cache_dir()) / f"digits_cnn_{image_size}px_{VERSION}.pt"
        self.trained_now = False  # True when this instance had to train (no usable cache), so callers can report it
        self.net = self._load_or_train().to(self.device).eval()
        self._reference: tuple[GaussianStats, float] | None = None

    def _load_or_train(self) -> DigitsNet:
        net = DigitsNet()
        if self.cache_path.is_file():
            try:
                net.load_state_dict(torch.load(self.cache_path, map_location="cpu", weights_only=True))
                return net
            # A stale, truncated or foreign cache file is rebuilt, not fatal: it only ever holds our own weights.
            except (RuntimeError, OSError, KeyError, pickle.UnpicklingError) as err:
                warnings.warn(f"retraining the digits classifier: cannot load {self.cache_path} ({err})",
                              stacklevel=3)
        net = train_classifier(self.image_size)
        self.trained_now = True
        atomic_write(self.cache_path, lambda tmp: torch.save(net.state_dict(), tmp))  # readers never see half a file
        return net

    @torch.no_grad()
    def _run(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate features (N, F) float64 and predicted labels (N,) int64, in batches."""
        x = to_input(images)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"this evaluator scores {self.image_size}x{self.image_size} images, got "
                             f"{tuple(x.shape[-2:])}; build DigitsEvaluator(image_size={x.shape[-1]})")
        feats, preds = [], []
        with _one_thread():
            for chunk in x.split(self.batch_size):
                f = self.net.features(chunk.to(self.device))
                feats.append(f.double().cpu())
                preds.append(self.net.head(f).argmax(dim=1).cpu())
        width = self.net.head.in_features
        if not feats:
            return torch.empty(0, width, dtype=torch.float64), torch.empty(0, dtype=torch.long)
        return torch.cat(feats), torch.cat(preds)

    def features(self, images) -> torch.Tensor:
        """Penultimate classifier features (N, F) float64 of uint8 images."""
        return self._run(images)[0]

    def predict(self, images) -> torch.Tensor:
        """Predicted digit labels (N,) int64 of uint8 images."""
        return self._run(images)[1]

    def reference(self) -> tuple[GaussianStats, float]:
        """Feature statistics of the held-out split and the classifier's accuracy on it (computed once)."""
        if self._reference is None:
            images, labels = load_split("heldout", self.image_size)
            feats, preds = self._run(images)
            self._reference = GaussianStats().update(feats), (preds == labels).double().mean().item()
        return self._reference

    def evaluate(self, images, labels) -> dict[str, float]:
        """Class consistency with the conditioning labels and Frechet distance to the held-out features."""
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        feats, preds = self._run(images)
        if len(preds) != len(labels):
            raise ValueError(f"{len(preds)} images but {len(labels)} labels")
        if len(preds) < 2:
            raise ValueError("the Frechet distance needs at least 2 images")
        ref, accuracy = self.reference()
        sample = GaussianStats().update(feats)
        return {
            "class_consistency": (preds == labels).double().mean().item(),
            "frechet_distance": frechet_distance(sample.mean(), sample.cov(), ref.mean(), ref.cov()),
            "heldout_accuracy": accuracy,
            "num_samples": len(preds),
        }
