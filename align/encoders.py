"""Frozen target encoders (REPA utils.py `load_encoders`, train.py `preprocess_raw_image`): timm networks, REPA's
preprocessing, patch tokens on the backbone's grid.

Every entry is built with `pretrained=False` and loaded from a local file, so nothing downloads at run
time; the file may be the published original (DINOv2 torch.hub `.pth`, OpenAI CLIP `.pt`, MAE `.pth`,
I-JEPA `.pth.tar`) or timm's Hugging Face copy (converted by timm's `checkpoint_filter_fn`).
The encoder runs at `grid * patch` pixels with its position embedding resampled at load
(timm `resample_abs_pos_embed`, bicubic + antialias as REPA's `load_encoders`), so it returns exactly one
token per backbone token: 224 px and 16x16 tokens for a /14 encoder and SiT/2 at 256 px, 448 px at 512 px.
Encoders are plain objects, not submodules: never in an optimizer, a state dict or a checkpoint.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.models import get_pretrained_cfg
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import Tensor, nn

from gen.io import BadFile, load_state

# Files looked for in a weights folder (a timm / HF snapshot), in this order.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class EncoderSpec:
    """A registered encoder: timm architecture, published weights, REPA's preprocessing and token choice."""

    arch: str  # timm architecture, built with pretrained=False
    pretrained_tag: str  # timm "arch.tag" whose pretrained cfg names the published file (URL, HF hub id)
    dim: int  # token width d
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    normalize_first: bool  # REPA `preprocess_raw_image`: DINOv2 / I-JEPA normalise then resize, CLIP the reverse
    final_norm: bool  # tokens after the last LayerNorm (DINOv2 x_norm_patchtokens, I-JEPA) or before it

    def published(self) -> str:
        """Where the weights are published, for error messages."""
        cfg = get_pretrained_cfg(self.pretrained_tag)
        places = [f"Hugging Face repo {cfg.hf_hub_id}" if cfg.hf_hub_id else "", cfg.url or ""]
        return " or ".join(p for p in places if p)


_DINOV2 = dict(s=("small", 384), b=("base", 768), l=("large", 1024), g=("giant", 1536))

ENCODERS: dict[str, EncoderSpec] = {
    # DINOv2 (torch.hub in REPA): ImageNet mean/std then bicubic resize; final-norm patch tokens, no CLS or
    # registers (x_norm_patchtokens).
    **{
        f"dinov2{reg}-vit-{k}": EncoderSpec(
            f"vit_{size}_patch14{reg4}_dinov2", f"vit_{size}_patch14{reg4}_dinov2.lvd142m", dim, 14,
            IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, normalize_first=True, final_norm=True)
        for k, (size, dim) in _DINOV2.items()
        for reg, reg4 in (("", ""), ("reg", "_reg4"))
    },
    # OpenAI CLIP ViT-L/14: resize then CLIP mean/std. OpenAI's tower uses QuickGELU (timm's plain
    # clip_224 arch uses GELU), and REPA's `UpdatedVisionTransformer` returns the tokens after ln_pre and
    # the blocks, before ln_post.
    "clip-vit-l": EncoderSpec(
        "vit_large_patch14_clip_quickgelu_224", "vit_large_patch14_clip_quickgelu_224.openai", 1024, 14,
        OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize_first=False, final_norm=False),
    # MAE ViT-L/16: ImageNet mean/std, no resize at 256 px (16 x 16 = 256); REPA's `mae_vit.forward_features`
    # drops the CLS token and skips the final norm.
    "mae-vit-l": EncoderSpec(
        "vit_large_patch16_224", "vit_large_patch16_224.mae", 1024, 16,
        IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, normalize_first=True, final_norm=False),
    # I-JEPA ViT-H/14 (ImageNet-1k, the file REPA uses): ImageNet mean/std then resize; no CLS token, the
    # encoder's final norm applied (I-JEPA `VisionTransformer.forward`).
    "jepa-vit-h": EncoderSpec(
        "vit_huge_patch14_gap_224", "vit_huge_patch14_gap_224.in1k_ijepa", 1280, 14,
        IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, normalize_first=True, final_norm=True),
}


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def create_encoder_model(spec: EncoderSpec, grid, **arch_overrides) -> nn.Module:
    """The randomly initialised timm network of `spec` whose token grid is `grid` (no head, no pooling)."""
    gh, gw = _pair(grid)
    p = arch_overrides.get("patch_size", spec.patch_size)
    kwargs = dict(num_classes=0, global_pool="", img_size=(gh * p, gw * p), final_norm=spec.final_norm)
    return timm.create_model(spec.arch, pretrained=False, **{**kwargs, **arch_overrides})


class FrozenEncoder:
    """A frozen encoder: uint8 images -> (N, T, d) patch tokens on the backbone's grid, no grad, eval mode."""

    def __init__(self, name: str, spec: EncoderSpec, model: nn.Module, image_size, grid):
        self.name, self.spec = name, spec
        self.model = model.eval().requires_grad_(False)
        self.image_size = _pair(image_size)
        self.grid = _pair(grid)
        self.patch_size = model.patch_embed.patch_size[0]
        self.input_size = (self.grid[0] * self.patch_size, self.grid[1] * self.patch_size)
        self.dim = model.num_features
        self.num_tokens = self.grid[0] * self.grid[1]
        device = self.device  # kept with the weights: no per-step host-to-device copy of the constants
        self._mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return self.model.patch_embed.proj.weight.device

    def to(self, device) -> FrozenEncoder:
        """Move the weights (the trainer's `.to` does not reach them: they are not a submodule)."""
        self.model.to(device)
        self._mean, self._std = self._mean.to(device), self._std.to(device)
        return self

    def _normalize(self, x: Tensor) -> Tensor:
        return (x - self._mean.to(x.device)) / self._std.to(x.device)

    def _resize(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) == self.input_size:
            return x
        # REPA: torch bicubic, no antialias (REPA train.py `preprocess_raw_image`).
        return F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False, antialias=False)

    def preprocess(self, pixels: Tensor) -> Tensor:
        """uint8 (N, 3, H, W) -> the encoder's float input, in the reference order of normalise and resize."""
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, *self.image_size):
            raise ValueError(f"encoder {self.name!r} takes uint8 images (N, 3, {self.image_size[0]}, "
                             f"{self.image_size[1]}), got {pixels.dtype} {tuple(pixels.shape)}")
        x = pixels.float() / 255.0
        # Equal up to rounding either way (bicubic weights sum to 1); kept for parity with cached features.
        steps = (self._normalize, self._resize) if self.spec.normalize_first else (self._resize, self._normalize)
        for step in steps:
            x = step(x)
        return x

    @torch.no_grad()  # not inference_mode: the targets are saved for the alignment loss's backward
    def __call__(self, pixels: Tensor) -> Tensor:
        """Patch tokens (N, T, d) of the clean images, CLS and register tokens removed."""
        x = self.preprocess(pixels.to(self.device))
        tokens = self.model.forward_features(x)  # (N, prefix + T, d)
        return tokens[:, self.model.num_prefix_tokens:]  # (N, T, d)


def _cached_files(spec: EncoderSpec, repo_id: str | None = None) -> list[Path]:
    """Files already on disk: `repo_id` (default: the spec's HF repo) in the local HF cache, then torch.hub's folder."""
    from huggingface_hub import try_to_load_from_cache  # reads the cache only, never the network

    cfg = get_pretrained_cfg(spec.pretrained_tag)
    found = []
    repo = repo_id or cfg.hf_hub_id
    if repo:
        found += [Path(p) for f in WEIGHT_FILES if isinstance(p := try_to_load_from_cache(repo, f), str)]
    if repo_id is None and cfg.url:  # where torch.hub / timm put the original file (REPA's DINOv2 route)
        found.append(Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name)
    return [p for p in found if p.is_file()]


def find_weights(name: str, weights: str | Path | None, config_key: str) -> Path:
    """The local file of `name`'s weights: a file, a timm/HF folder, a repo id in the HF cache, or the caches."""
    spec = ENCODERS[name]
    if weights:
        path = Path(weights).expanduser()
        if path.is_file():
            return path
        if path.is_dir():
            hits = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
            if hits:
                return hits[0]
            raise FileNotFoundError(f"{path} holds none of {list(WEIGHT_FILES)}: point {config_key} at the "
                                    f"weight file of encoder {name!r} (published: {spec.published()})")
        hits = _cached_files(spec, repo_id=str(weights)) if str(weights).count("/") == 1 else []
    else:
        hits = _cached_files(spec)
    if hits:
        return hits[0]
    where = f"{weights} does not exist" if weights else "it is not in the local Hugging Face or torch.hub cache"
    raise FileNotFoundError(
        f"encoder {name!r} ({spec.arch}) needs its pretrained weights and nothing downloads at run time: {where}. "
        f"Download them from {spec.published()} and set the config key {config_key} to the local file or folder "
        f"(or fill the local HF cache, e.g. `huggingface-cli download <repo>` with network access)."
    )


def read_state(path: Path) -> dict:
    """Load a checkpoint safely: safetensors, a pickled state (weights only), or a TorchScript archive (OpenAI CLIP)."""
    what = "encoder weights, config key align.encoder_weights"
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
            return torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception as err:  # safetensors and TorchScript report a foreign file in their own error types
        raise BadFile(f"{path} ({what}) is not a readable checkpoint: {str(err).splitlines()[0]}") from None
    return load_state(path, what)


def _tensors(state: dict, prefix: str = "") -> dict[str, Tensor]:
    """Every tensor of a (possibly nested) checkpoint, by dotted key."""
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(_tensors(value, f"{prefix}{key}."))
        elif isinstance(value, Tensor):
            out[prefix + key] = value
    return out


def _structure_problem(raw: dict, model: nn.Module) -> str | None:
    """What timm's converter would hide or choke on: another patch size (it resamples kernels), registers or not."""
    tensors = _tensors(raw)
    kernels = ("patch_embed.proj.weight", "visual.conv1.weight")  # timm / DINOv2 / MAE / I-JEPA, OpenAI CLIP
    patches = sorted({v.shape[-1] for k, v in tensors.items() if k.endswith(kernels)})
    p = model.patch_embed.patch_size[0]
    if set(patches) - {p}:
        return f"patch size {patches}, expected {p}"
    has_registers = any(k.endswith(("reg_token", "register_tokens")) for k in tensors)
    wants_registers = getattr(model, "reg_token", None) is not None
    if has_registers != wants_registers:
        found, expected = ("present", "none") if has_registers else ("absent", "some")
        return f"register tokens {found}, expected {expected}"
    return None


def load_encoder_state(model: nn.Module, spec: EncoderSpec, path: Path, name: str, config_key: str) -> None:
    """Convert (timm filter: original layouts, pos-embed resampling) and load strictly, or say what is wrong."""
    raw = read_state(path)
    hint = f"point {config_key} at the weights of {name!r} (published: {spec.published()})"
    problem = _structure_problem(raw, model)
    if problem:
        raise BadFile(f"{path} is not a checkpoint of encoder {name!r} ({spec.arch}): {problem}; {hint}")
    try:
        state = checkpoint_filter_fn(raw, model)
    except Exception as err:  # a foreign layout fails inside timm's converter in many ways
        raise BadFile(f"{path} is not a checkpoint of encoder {name!r} ({spec.arch}): {err}; {hint}") from err
    # Unused by design: the projection/classifier head, and the last norm where the reference skips it.
    unused = ("head.",) + (() if spec.final_norm else ("norm.",))
    state = {k: v for k, v in state.items() if not k.startswith(unused)}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise BadFile(
            f"{path} is not a checkpoint of encoder {name!r} ({spec.arch}, width {model.num_features}): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}, shape mismatch {shapes[:3]}; {hint}")
    model.load_state_dict(state, strict=True)


def build_encoder(name: str, weights: str | Path | None, image_size, grid, *, config_key: str | None = None,
                  **arch_overrides) -> FrozenEncoder:
    """The frozen encoder `name` (ENCODERS key) for images of `image_size` px and a backbone token `grid`.

    `weights`: a local file, a timm/HF folder, an HF repo id already in the local cache, or None to look in
    the local HF / torch.hub caches. `arch_overrides` change the timm architecture (tests build tiny ones).
    """
    if name not in ENCODERS:
        raise KeyError(f"unknown encoder {name!r}; one of {sorted(ENCODERS)}")
    spec = ENCODERS[name]
    config_key = config_key or f"align.encoder_weights.{name}"
    path = find_weights(name, weights, config_key)
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten: leave the run's RNG stream alone,
        model = create_encoder_model(spec, grid, **arch_overrides)  # so cached and online targets train alike
    load_encoder_state(model, spec, path, name, config_key)
    return FrozenEncoder(name, spec, model, image_size, grid)
