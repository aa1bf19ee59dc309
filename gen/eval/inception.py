"""The ADM evaluator's Inception features through torch-fidelity's TF-compatible InceptionV3
(guided-diffusion evaluations/evaluator.py; torch-fidelity feature_extractor_inceptionv3.py).

One forward gives the three feature sets of the ADM suite:
- `pool_3` (2048): TF `pool_3:0`, for FID and precision/recall;
- `spatial` (2023): TF `mixed_6/conv:0`, first 7 channels of the 17x17 map flattened in NHWC order, for sFID;
- `logits` (1008): pool_3 times the `softmax/logits` weights without the bias, for the Inception Score.

Verified against the sources: ADM's evaluator (openai/guided-diffusion evaluations/evaluator.py) feeds uint8 NHWC
cast to float32 into the graph's `ExpandDims:0`, takes `pool_3:0` and `mixed_6/conv:0`, keeps `spatial[..., :7]` of
the NHWC tensor and flattens it per image, and computes IS from `matmul(pool_3, W)` where W is the input of
`softmax/logits/MatMul` (no bias). torch-fidelity's weight conversion maps the TF scope `mixed_6/conv`
(`conv2d_params`, `batchnorm`) to `Mixed_6d.branch1x1`, so the tap is the output of that whole BasicConv2d
(conv + BN + ReLU), and TF `softmax/weights` to `fc.weight` (its `logits_unbiased` feature is the bias-free
product). Its resize is TF1's legacy bilinear (source = dst * in/out, no half-pixel offset, clamped), then
(x - 128) / 128, as in the graph. Not verified here (needs TensorFlow and the .pb): that the op named
`mixed_6/conv` is the ReLU after the batchnorm (the graph names each layer's output op by its scope, e.g.
`conv:0`, `pool:0`), and agreement with a TF-computed sFID on a real batch.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import Tensor, nn

from gen.eval.extractor import check_sha256, local_weights
from gen.io import BadFile
from gen.precision import exact_float32

WEIGHT_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
PUBLISHED = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
             "weights-inception-2015-12-05-6726825d.pth (torch-fidelity release v0.2.0) or "
             "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
             "pt_inception-2015-12-05-6726825d.pth (pytorch-fid release fid_weights)")
SPATIAL_CHANNELS = 7  # ADM: spatial[..., :7] of mixed_6/conv (17 x 17 x 192) -> 7 * 17 * 17 = 2023


class InceptionFeatures(nn.Module):
    """ADM's pool_3 / spatial / logits features of uint8 images, from a local Inception weights file."""

    key = "eval.inception_weights"

    def __init__(self, weights: str | Path | None, sha256: str | None = None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.dims = {"pool_3": 2048, "spatial": SPATIAL_CHANNELS * 17 * 17, "logits": 1008}

        path = local_weights(weights, self.key, f"the TF Inception 2015-12-05 weights ({WEIGHT_FILES[0]} or "
                                                f"{WEIGHT_FILES[1]})", PUBLISHED)
        self.path = path
        self.sha256 = check_sha256(path, sha256, "eval.inception_sha256")
        try:
            # A tensors-only load first: torch-fidelity unpickles with weights_only=False, which would run code.
            torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
            raise BadFile(f"{path} (config key '{self.key}') is not a plain tensor state dict: {err}") from None
        try:
            # torch-fidelity's own constructor loads the file strictly: a renamed key or a wrong shape fails here.
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=str(path))
        except RuntimeError as err:
            detail = " ".join(str(err).split())[:600]
            raise BadFile(f"{path} (config key '{self.key}') does not fit the TF-compatible InceptionV3: "
                             f"{detail}") from None
        self._spatial: list[Tensor] = []
        self.net.Mixed_6d.branch1x1.register_forward_hook(lambda module, args, out: self._spatial.append(out))

    def describe(self) -> dict:
        """What the protocol records about this network."""
        return {"network": "InceptionV3 2015-12-05 (torch-fidelity TF-compatible port, TF1 bilinear resize to 299)",
                "weights": str(self.path), "sha256": self.sha256}

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """uint8 images (N, 3, H, W) -> {"pool_3": (N, 2048), "spatial": (N, 2023), "logits": (N, 1008)} float32."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        self._spatial.clear()
        with exact_float32(images.device):
            pool, logits = self.net(images)  # TF1 resize to 299, (x - 128) / 128, inside torch-fidelity's forward
        spatial = self._spatial.pop()  # (N, 192, 17, 17), output of Mixed_6d.branch1x1 = TF mixed_6/conv
        # ADM slices the NHWC tensor and flattens (h, w, c): channels last before the reshape.
        spatial = spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(images), -1)  # (N, 2023)
        return {"pool_3": pool.float(), "spatial": spatial.float(), "logits": logits.float()}


def random_inception_state(seed: int = 0, live_channels: int | None = None) -> dict[str, Tensor]:
    """Random-init weights with the published file's keys and shapes: a stand-in for tests and benchmarks.

    He-normal convolutions and identity batchnorms keep activations O(1) through the 94 layers. With
    `live_channels=k`, only the first k channels of each Mixed_7c branch (so 6k of the 2048 pool_3 features) and
    the first channel of the sFID tap stay alive; the others are exactly zero, which keeps CPU tests' Frechet
    distances (and LAPACK's balanced eigvals in torchmetrics) cheap while the images still run the full network.
    """
    from torchvision.models.inception import Inception3  # same parameter names as torch-fidelity's port

    state = Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, value in state.items():
        if name.endswith("num_batches_tracked"):
            continue  # the published files (converted from TF) do not carry it either
        if name.endswith("conv.weight"):
            fan_in = value[0].numel()
            value = torch.randn(value.shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif name.endswith("bn.weight"):
            value = 1.0 + 0.1 * torch.randn(value.shape, generator=g)
        elif name.endswith(("bn.bias", "bn.running_mean")):
            value = 0.1 * torch.randn(value.shape, generator=g)
        elif name.endswith("bn.running_var"):
            value = torch.ones(value.shape)
        elif name == "fc.weight":
            value = torch.randn(value.shape, generator=g) / value.shape[1] ** 0.5
        elif name == "fc.bias":
            value = 0.1 * torch.randn(value.shape, generator=g)
        out[name] = value.float().contiguous()
    if live_channels is not None:
        dead = -1e4  # far below any O(1) pre-activation: ReLU gives exact zeros
        for branch in ("branch1x1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_3a", "branch3x3dbl_3b",
                       "branch_pool"):
            out[f"Mixed_7c.{branch}.bn.bias"][live_channels:] = dead
        out["Mixed_6d.branch1x1.bn.bias"][1:SPATIAL_CHANNELS] = dead
    return out


def save_random_inception(path: str | Path, seed: int = 0, live_channels: int | None = None) -> Path:
    """Write random_inception_state(...) to `path` as a plain state dict, loadable by InceptionFeatures."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_inception_state(seed, live_channels), path)
    return path
