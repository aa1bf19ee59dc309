"""FD-DINOv2 features (Stein et al., NeurIPS 2023; layer6ai-labs/dgm-eval), from local weights only
(dgm-eval's DINOv2Encoder protocol; no torch.hub download).

Verified against the sources: dgm-eval's DINOv2Encoder loads `torch.hub` `dinov2_vitl14` and preprocesses each PIL
image with torchvision `Resize((224, 224), BICUBIC)` (PIL's bicubic on PIL images), `ToTensor` and ImageNet
mean/std; the hub model's forward returns the CLS token after the final LayerNorm (`x_norm_clstoken`, head =
Identity). The hub model is built for 518 px (37 x 37 patches) and, at 224 px, interpolates its patch position
embeddings at run time: bicubic, no antialias, `scale_factor = (16 + 0.1) / 37` (facebookresearch/dinov2
`interpolate_pos_encoding`, interpolate_offset 0.1). timm's own load-time resampling uses antialias, so this module
resamples the checkpoint's position embeddings the hub's way before a strict load into timm's
`vit_large_patch14_dinov2` built at 224 px. Not verified here: numerical agreement with dgm-eval on real weights.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from gen.eval.extractor import check_sha256
from gen.io import BadFile, load_state
from gen.precision import exact_float32

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_OFFSET = 0.1  # DINOv2 hub models: interpolate_offset (the dino #8 floating-point kludge)

# timm architecture -> the DINOv2 hub name of the same network (LayerScale + MLP blocks, no registers).
DINOV2_ARCHS = {
    "vit_small_patch14_dinov2": "dinov2_vits14",
    "vit_base_patch14_dinov2": "dinov2_vitb14",
    "vit_large_patch14_dinov2": "dinov2_vitl14",
}


def published(arch: str) -> str:
    """Where the weights of a DINOv2 architecture are published (hub .pth and the timm Hugging Face repo)."""
    hub = DINOV2_ARCHS[arch]
    return (f"https://dl.fbaipublicfiles.com/dinov2/{hub}/{hub}_pretrain.pth, or the Hugging Face repo "
            f"timm/{arch}.lvd142m (model.safetensors)")


def resolve_weights(weights: str | Path | None, arch: str, key: str = "eval.dinov2_weights") -> Path:
    """A local .pth/.safetensors file, or a Hugging Face repo id already in the local cache (never downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    hint = (f"FD-DINOv2 needs the {DINOV2_ARCHS[arch]} weights, published at {published(arch)}; copy the file here "
            f"(or the repo into the local Hugging Face cache) and set {key}=PATH_OR_REPO_ID")
    if weights:
        path = Path(str(weights)).expanduser()
        if path.is_file():
            return path
        if path.suffix in (".pth", ".pt", ".safetensors", ".bin") or path.is_absolute() or path.exists():
            raise FileNotFoundError(f"config key '{key}': no file {path}; {hint}")
    repo = str(weights) if weights else f"timm/{arch}.lvd142m"
    found = try_to_load_from_cache(repo, "model.safetensors")
    if isinstance(found, str):
        return Path(found)
    raise FileNotFoundError(f"config key '{key}': {'it is not set and ' if not weights else ''}the repo {repo} is not "
                            f"in the local Hugging Face cache; {hint} (nothing is downloaded at run time)")


def hub_pos_embed(pos_embed: Tensor, grid: int) -> Tensor:
    """(1, 1 + M*M, D) class + patch position embeddings -> (1, 1 + grid*grid, D), as the DINOv2 hub interpolates."""
    n = pos_embed.shape[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"position embeddings of {n} patches do not form a square grid")
    if m == grid:
        return pos_embed
    cls, patch = pos_embed[:, :1], pos_embed[:, 1:].float()
    patch = patch.reshape(1, m, m, -1).permute(0, 3, 1, 2)  # (1, D, M, M)
    scale = (grid + HUB_OFFSET) / m
    patch = F.interpolate(patch, scale_factor=(scale, scale), mode="bicubic", antialias=False)  # (1, D, grid, grid)
    if patch.shape[-2:] != (grid, grid):
        raise ValueError(f"hub interpolation gave a {tuple(patch.shape[-2:])} grid, expected {grid}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    return torch.cat([cls, patch.to(pos_embed.dtype)], dim=1)


def pil_bicubic(arrays: np.ndarray, size: tuple[int, int], workers: int | None = None) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, *size, 3): PIL bicubic per image (dgm-eval's Resize on PIL images), on a thread
    pool (PIL releases the GIL while resampling), so the host keeps up with the network; same values as one thread."""
    def resize(a: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(a).resize(size, Image.BICUBIC))

    workers = workers or min(8, os.cpu_count() or 1)
    if workers == 1 or len(arrays) < 2:
        return np.stack([resize(a) for a in arrays])
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return np.stack(list(pool.map(resize, arrays)))


def _read_state(path: Path) -> dict[str, Tensor]:
    """A flat tensor state dict from .safetensors or a torch file (tensors only, nothing unpickled as code)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = load_state(path, "FD-DINOv2 weights, config key eval.dinov2_weights")
    return state.get("model", state)


class DinoV2Features(nn.Module):
    """CLS token after the final norm of a timm DINOv2 ViT, with dgm-eval's preprocessing (PIL bicubic 224)."""

    key = "eval.dinov2_weights"

    def __init__(self, weights: str | Path | None, arch: str = "vit_large_patch14_dinov2", sha256: str | None = None,
                 image_size: int = 224, **model_kwargs):
        super().__init__()
        import timm

        if arch not in DINOV2_ARCHS:
            raise ValueError(f"config key 'eval.dinov2_arch': {arch!r} is not one of {sorted(DINOV2_ARCHS)}")
        self.arch, self.image_size = arch, int(image_size)
        self.path = resolve_weights(weights, arch, self.key)
        self.sha256 = check_sha256(self.path, sha256, "eval.dinov2_sha256")
        # model_kwargs: only for stand-ins (tests build tiny DINOv2-style ViTs); real weights use the arch as is.
        self.model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=self.image_size, **model_kwargs)
        state = dict(_read_state(self.path))
        state.pop("mask_token", None)  # DINOv2 hub checkpoints carry the iBOT mask token; inference never uses it
        if "register_tokens" in state:
            raise BadFile(f"{self.path} (config key '{self.key}'): DINOv2 with registers is not the FD-DINOv2 "
                          f"network; use {arch} weights")
        if "pos_embed" in state:
            state["pos_embed"] = hub_pos_embed(state["pos_embed"], self.model.patch_embed.grid_size[0])
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            detail = " ".join(str(err).split())[:600]
            raise BadFile(f"{self.path} (config key '{self.key}') does not fit timm's {arch}: {detail}") from None
        self.model.eval().requires_grad_(False)
        self.dims = {"dinov2": self.model.num_features}
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def describe(self) -> dict:
        """What the protocol records about this network."""
        return {"network": f"DINOv2 {self.arch} (timm), CLS after final norm, PIL bicubic {self.image_size}",
                "weights": str(self.path), "sha256": self.sha256}

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 (N, 3, H, W) -> float32 (N, 3, S, S): PIL bicubic resize, /255, ImageNet mean/std (dgm-eval)."""
        size = (self.image_size, self.image_size)
        arrays = images.permute(0, 2, 3, 1).cpu().numpy()
        resized = pil_bicubic(arrays, size)
        x = torch.from_numpy(resized).to(self.mean.device).permute(0, 3, 1, 2).float().div(255)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """uint8 images (N, 3, H, W) -> {"dinov2": (N, D)} float32."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        x = self.preprocess(images)
        with exact_float32(x.device):
            tokens = self.model.forward_features(x)  # (N, 1 + T, D), after the final norm
        return {"dinov2": tokens[:, 0].float()}
