"""LPIPS-VGG (Zhang et al., CVPR 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"):
the perceptual term of the binary autoencoder's loss (BLD stage 1, as the reference's `lpips.LPIPS(net="vgg")`).

d(x, y) = sum_l mean_hw || w_l * (n(f_l(x)) - n(f_l(y))) ||^2, with f_l the VGG16 activations after relu1_2, relu2_2,
relu3_3, relu4_3 and relu5_3 of the inputs shifted and scaled by the `lpips` package's ScalingLayer, n() the unit norm
over channels (eps 1e-10) and w_l the learned non-negative 1x1 "lin" weights (v0.1). Inputs are images in [-1, 1].

Weights load only from local files (no downloads): torchvision's VGG16 ImageNet weights and the LPIPS v0.1 lin layers.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from gen.io import BadFile, load_state

VGG_FILE = "vgg16-397923af.pth"
LIN_FILE = "vgg.pth"
PUBLISHED = (f"LPIPS-VGG needs torchvision's VGG16 weights ({VGG_FILE}, download.pytorch.org/models/{VGG_FILE}) and "
             f"the LPIPS v0.1 lin weights ({LIN_FILE}, github.com/richzhang/PerceptualSimilarity "
             f"lpips/weights/v0.1/{LIN_FILE}); pass them with objective.autoencoder.lpips_vgg=/path/{VGG_FILE} and "
             f"objective.autoencoder.lpips_lin=/path/{LIN_FILE}, or switch the term off with "
             f"objective.autoencoder.perceptual_weight=0")
VGG_CUTS = (4, 9, 16, 23, 30)
"""Slice ends (exclusive) in torchvision's vgg16().features: after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3."""
WIDTHS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)  # lpips ScalingLayer
SCALE = (0.458, 0.448, 0.450)


def vgg16_features() -> nn.Sequential:
    """torchvision's vgg16().features up to relu5_3 (same module indices, hence the same state-dict keys)."""
    layers: list[nn.Module] = []
    c_in = 3
    for width, convs in zip(WIDTHS, (2, 2, 3, 3, 3)):
        if layers:
            layers.append(nn.MaxPool2d(2, 2))
        for _ in range(convs):
            layers += [nn.Conv2d(c_in, width, 3, padding=1), nn.ReLU()]
            c_in = width
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """LPIPS-VGG distance per sample; frozen, float32."""

    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(w, 1, 1, bias=False) for w in WIDTHS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    @classmethod
    def from_files(cls, vgg: str | None, lin: str | None) -> LPIPS:
        """Load torchvision's VGG16 state dict (`features.*` kept) and the lpips v0.1 lin state dict
        (`lin{k}.model.1.weight`); a missing file or key raises one line naming the file and the config key."""
        for path, key in ((vgg, "lpips_vgg"), (lin, "lpips_lin")):
            if path is None or not os.path.isfile(path):
                raise FileNotFoundError(f"objective.autoencoder.{key}={path!r}: no such file; {PUBLISHED}")
        net = cls()
        vgg_state = load_state(vgg, "VGG16 weights, objective.autoencoder.lpips_vgg")
        lin_state = load_state(lin, "LPIPS lin weights, objective.autoencoder.lpips_lin")
        features = {k[len("features."):]: v for k, v in vgg_state.items() if k.startswith("features.")}
        lins = {f"{k}.weight": lin_state.get(f"lin{k}.model.1.weight") for k in range(len(WIDTHS))}
        for state, module, path, key in ((features, net.features, vgg, "lpips_vgg"),
                                         (lins, net.lins, lin, "lpips_lin")):
            try:
                module.load_state_dict({k: v for k, v in state.items() if v is not None}, strict=True)
            except RuntimeError as err:
                raise BadFile(f"{path} (objective.autoencoder.{key}) does not hold the expected weights: "
                              f"{str(err).splitlines()[1:2]}; {PUBLISHED}") from None
        return net

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """(N,) LPIPS distances between images x and y in [-1, 1] (N, 3, H, W)."""
        h = torch.cat([x, y]).float()
        h = (h - self.shift) / self.scale
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        start = 0
        for cut, lin in zip(VGG_CUTS, self.lins):
            h = self.features[start:cut](h)
            start = cut
            a, b = (f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for f in h.chunk(2))
            total = total + lin((a - b).pow(2)).mean(dim=(1, 2, 3))
        return total
