"""FD-DINOv2 features: a tiny random-init DINOv2-style timm ViT saved to a file loads through the real loader and
reproduces the hub model's path (runtime position-embedding interpolation, CLS after the final norm) with
dgm-eval's preprocessing (PIL bicubic 224, ImageNet mean/std)."""
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from safetensors.torch import save_file

from gen.config import EvalConfig
from gen.eval.dinov2 import DinoV2Features, hub_pos_embed
from gen.eval.metrics import MetricSuite
from gen.eval.reference import Reference

ARCH = "vit_small_patch14_dinov2"
TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, **TINY).eval()  # built at 518 px, as released
    with torch.no_grad():
        for p in model.parameters():  # LayerScale starts at 1e-5: make every block matter
            p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def files(vit, tmp_path_factory):
    root = tmp_path_factory.mktemp("dinov2")
    state = vit.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, root / "timm.safetensors")  # timm / HF layout
    torch.save({**state, "mask_token": torch.zeros(1, 32)}, root / "hub.pth")  # the hub checkpoint's extra key
    return root


def images(n=3, size=64, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8))


def hub_forward(model, x):
    """The DINOv2 hub forward on a 518-px model: position embeddings interpolated at run time
    (bicubic, scale (w0 + 0.1) / M, no antialias), blocks, final norm, CLS token."""
    tokens = model.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (N, T, D): the hub's patch embedding, any size
    pos = model.pos_embed
    m, w0 = int(math.sqrt(pos.shape[1] - 1)), x.shape[-1] // 14
    patch = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=((w0 + 0.1) / m, (w0 + 0.1) / m), mode="bicubic", antialias=False)
    pos = torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, w0 * w0, -1)], dim=1)
    tokens = torch.cat([model.cls_token.expand(len(x), -1, -1), tokens], dim=1) + pos
    for block in model.blocks:
        tokens = block(tokens)
    return model.norm(tokens)[:, 0]


def test_tiny_dinov2_loads_and_matches_the_hub_path(vit, files):
    x = images()
    dgm_eval = T.Compose([T.Resize((224, 224), T.InterpolationMode.BICUBIC), T.ToTensor(),
                          T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    expected_input = torch.stack([dgm_eval(Image.fromarray(a)) for a in x.permute(0, 2, 3, 1).numpy()])
    with torch.no_grad():
        expected = hub_forward(vit, expected_input)
    for name in ("timm.safetensors", "hub.pth"):
        net = DinoV2Features(files / name, arch=ARCH, **TINY)
        assert torch.equal(net.preprocess(x), expected_input)
        got = net(x)["dinov2"]
        assert got.shape == (3, 32) and net.dims == {"dinov2": 32}
        assert torch.allclose(got, expected, atol=1e-5)
    # timm's own load-time resampling (antialiased) is not the hub's interpolation.
    from timm.layers import resample_abs_pos_embed

    timm_way = resample_abs_pos_embed(vit.pos_embed, (16, 16), num_prefix_tokens=1)
    assert (timm_way - hub_pos_embed(vit.pos_embed, 16)).abs().max() > 1e-4


def test_fd_dinov2_through_the_suite_and_clear_errors(files, tmp_path):
    net = DinoV2Features(files / "hub.pth", arch=ARCH, **TINY)
    x = images(12, seed=1)
    feats = net(x)["dinov2"].double()
    ref = Reference(stats={"dinov2": (feats.mean(0).numpy(), np.cov(feats.numpy(), rowvar=False))})
    suite = MetricSuite(["fd_dinov2"], EvalConfig(batch_per_process=5), networks={"dinov2": net}, reference=ref)
    suite.update(x)
    assert suite.compute()["fd_dinov2"] == pytest.approx(0.0, abs=1e-6)
    assert suite.protocol()["networks"]["dinov2"]["sha256"] == net.sha256
    with pytest.raises(FileNotFoundError, match=r"eval.dinov2_weights.*dinov2_vitl14_pretrain.pth"):
        DinoV2Features(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        DinoV2Features("someone/not-cached-dinov2")
    with pytest.raises(ValueError, match="does not fit timm's vit_small_patch14_dinov2"):
        DinoV2Features(files / "hub.pth", arch=ARCH, depth=3, embed_dim=32, num_heads=2)
