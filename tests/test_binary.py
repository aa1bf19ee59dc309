"""The binary latent space (latents.binary) and its autoencoder (latents.bae): bits, straight-through gradients, the
packed cache, and the released checkpoints' key map against a state dict built from the reference's module layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from latent_helpers import TINY_BAE, save_tiny_bae

from gen.config import ConfigError, load_config
from latents import LATENTS, build_latent
from latents.bae import BAEArch, BinaryAutoencoder, from_bld, to_bld
from latents.binary import BinaryLatents, pack_bits, unpack_bits

pytestmark = pytest.mark.usefixtures("one_thread")
BASE = ["latent.name=binary", "objective.name=bernoulli", "sampler.sampler=ancestral", "sampler.num_steps=4",
        "objective.bernoulli.num_timesteps=8", "model.name=SiT-S/1", "data.image_size=16", *TINY_BAE]
ARCH = BAEArch(bit_channels=16, ch_mult=(1, 1, 2), nf=8, res_blocks=2, attn_resolutions=(8,), emb_dim=16,
               image_size=32, norm_groups=4)


def test_pack_round_trip_matches_numpy():
    g = torch.Generator().manual_seed(0)
    for shape in ((16, 8, 8), (3, 5, 7)):  # a multiple of 8 bits and not
        bits = (torch.rand((4, *shape), generator=g) < 0.5).to(torch.uint8)
        packed = pack_bits(bits)
        assert packed.dtype == torch.uint8 and packed.shape == (4, -(-int(np.prod(shape)) // 8))
        assert np.array_equal(packed.numpy(), np.packbits(bits.reshape(4, -1).numpy(), axis=1))
        assert torch.equal(unpack_bits(packed, shape), bits)


def test_straight_through_bits_and_gradients():
    torch.manual_seed(0)
    h = torch.randn(3, 16, 4, 4, requires_grad=True)
    g = torch.randn(3, 16, 4, 4)
    for mode in ("bernoulli", "threshold"):
        p = torch.sigmoid(h)
        z = BinaryAutoencoder.binarize(p, mode)
        assert set(z.detach().unique().tolist()) <= {0.0, 1.0}
        bits = (p > 0.5).float() if mode == "threshold" else z.detach()
        assert torch.equal(z.detach(), bits)  # the forward value is exactly the bits
        (grad,) = torch.autograd.grad((z * g).sum(), h)
        assert torch.allclose(grad, g * p * (1 - p), atol=1e-6)  # d/dh of sigma(h): the straight-through gradient
    net = BinaryAutoencoder(ARCH)
    images = torch.rand(2, 3, 32, 32)
    recon, p, z = net(images)
    assert recon.shape == images.shape and p.shape == z.shape == (2, 16, 8, 8)
    F.l1_loss(recon, images).backward()
    enc = [q.grad for q in net.encoder.parameters()]
    assert all(q is not None for q in enc) and any(float(q.abs().sum()) > 0 for q in enc)
    # Decoder input = bits^T E with E the (C, emb_dim) embedding: a bias-free projection.
    embedding = net.embed.weight[:, :, 0, 0].t()  # (C, emb_dim)
    assert torch.allclose(net.embed(z), torch.einsum("bchw,cd->bdhw", z, embedding), atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# The reference's state dict, from its module definitions (ZeWang95/BinaryLatentDiffusion models/binaryae.py):
# - Encoder.blocks = [conv_in] + per level (ResBlock [+ AttnBlock] per block, Downsample unless last)
#   + ResBlock, AttnBlock, ResBlock, GroupNorm, conv;
# - Generator.blocks = [GroupNorm (norm_first), conv] + ResBlock, AttnBlock, ResBlock + per level, coarsest first,
#   (ResBlock [+ AttnBlock] x res_blocks*gen_mul, Upsample unless finest) + GroupNorm, conv; plus Generator.logsigma;
# - BinaryQuantizer.proj = [Conv2d(emb_dim, C, 1), Sigmoid], embed = Embedding(C, emb_dim);
# - every ResBlock builds conv_out (1x1), used only when its width changes; BinaryGAN adds disc.* and perceptual.*.


def ref_layout(a: BAEArch) -> tuple[list, list]:
    """(kind, in, out) of Encoder.blocks and Generator.blocks in the reference's construction order."""
    enc, mult = [("conv", 3, a.nf)], (1, *a.ch_mult)
    res = a.image_size
    for i, m in enumerate(a.ch_mult):
        c = a.nf * mult[i]
        for _ in range(a.res_blocks):
            enc.append(("res", c, a.nf * m))
            c = a.nf * m
            if res in a.attn_resolutions:
                enc.append(("attn", c, c))
        if i != len(a.ch_mult) - 1:
            enc.append(("down", c, c))
            res //= 2
    top = a.nf * a.ch_mult[-1]
    enc += [("res", top, top), ("attn", top, top), ("res", top, top), ("norm", top, top), ("conv", top, a.emb_dim)]
    gen = [("norm", a.emb_dim, a.emb_dim), ("conv", a.emb_dim, top), ("res", top, top), ("attn", top, top),
           ("res", top, top)]
    c = top
    for i in reversed(range(len(a.ch_mult))):
        for _ in range(a.dec_blocks):
            gen.append(("res", c, a.nf * a.ch_mult[i]))
            c = a.nf * a.ch_mult[i]
            if res in a.attn_resolutions:
                gen.append(("attn", c, c))
        if i != 0:
            gen.append(("up", c, c))
            res *= 2
    return enc, gen + [("norm", c, c), ("conv", c, 3)]


def ref_state(a: BAEArch, seed: int = 0) -> dict:
    """A reference BinaryGAN state dict with random values, from ref_layout."""
    g = torch.Generator().manual_seed(seed)
    shapes = {}

    def conv(key, c_in, c_out, k):
        shapes[f"{key}.weight"], shapes[f"{key}.bias"] = (c_out, c_in, k, k), (c_out,)

    def norm(key, c):
        shapes[f"{key}.weight"], shapes[f"{key}.bias"] = (c,), (c,)

    enc, gen = ref_layout(a)
    for prefix, layout in (("ae.encoder.blocks", enc), ("ae.generator.blocks", gen)):
        for i, (kind, c_in, c_out) in enumerate(layout):
            key = f"{prefix}.{i}"
            if kind == "conv":
                conv(key, c_in, c_out, 3)
            elif kind == "norm":
                norm(key, c_in)
            elif kind in ("down", "up"):
                conv(f"{key}.conv", c_in, c_out, 3)
            elif kind == "attn":
                norm(f"{key}.norm", c_in)
                for name in ("q", "k", "v", "proj_out"):
                    conv(f"{key}.{name}", c_in, c_in, 1)
            else:
                norm(f"{key}.norm1", c_in), conv(f"{key}.conv1", c_in, c_out, 3)
                norm(f"{key}.norm2", c_out), conv(f"{key}.conv2", c_out, c_out, 3)
                conv(f"{key}.conv_out", c_in, c_out, 1)
    last = gen[-1][1]
    conv("ae.generator.logsigma.0", last, last, 3), conv("ae.generator.logsigma.2", last, 3, 1)
    conv("ae.quantize.proj.0", a.emb_dim, a.bit_channels, 1)
    shapes["ae.quantize.embed.weight"] = (a.bit_channels, a.emb_dim)
    conv("disc.main.0", 3, 8, 4), norm("disc.main.3", 16)
    shapes["perceptual.lin0.model.1.weight"] = (1, 64, 1, 1)
    return {k: 0.2 * torch.randn(s, generator=g) for k, s in shapes.items()}


def ref_forward(sd: dict, a: BAEArch, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference network's forward (probabilities, thresholded reconstruction) straight from its state dict."""
    groups = a.norm_groups

    def conv(x, key, **kw):
        return F.conv2d(x, sd[f"{key}.weight"], sd[f"{key}.bias"], **kw)

    def norm(x, key):
        return F.group_norm(x, groups, sd[f"{key}.weight"], sd[f"{key}.bias"], eps=1e-6)

    def run(x, prefix, layout):
        for i, (kind, c_in, c_out) in enumerate(layout):
            key = f"{prefix}.{i}"
            if kind == "conv":
                x = conv(x, key, padding=1)
            elif kind == "norm":
                x = norm(x, key)
            elif kind == "down":
                x = conv(F.pad(x, (0, 1, 0, 1)), f"{key}.conv", stride=2)
            elif kind == "up":
                x = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"), f"{key}.conv", padding=1)
            elif kind == "attn":
                b, c, h, w = x.shape
                y = norm(x, f"{key}.norm")
                q, k, v = (conv(y, f"{key}.{n}").reshape(b, c, h * w) for n in "qkv")
                attn = torch.softmax(q.permute(0, 2, 1) @ k * c**-0.5, dim=2)  # (b, hw_q, hw_k)
                x = x + conv((v @ attn.permute(0, 2, 1)).reshape(b, c, h, w), f"{key}.proj_out")
            else:
                y = conv(F.silu(norm(x, f"{key}.norm1")), f"{key}.conv1", padding=1)
                y = conv(F.silu(norm(y, f"{key}.norm2")), f"{key}.conv2", padding=1)
                x = y + (conv(x, f"{key}.conv_out") if c_in != c_out else x)
        return x

    enc, gen = ref_layout(a)
    p = torch.sigmoid(conv(run(images, "ae.encoder.blocks", enc), "ae.quantize.proj.0"))
    z_q = torch.einsum("bnhw,nd->bdhw", (p > 0.5).float(), sd["ae.quantize.embed.weight"])
    return p, run(z_q, "ae.generator.blocks", gen)


@pytest.mark.parametrize("arch", [ARCH, BAEArch(bit_channels=8, ch_mult=(1, 2, 2, 4), nf=8, res_blocks=1,
                                                decoder_res_blocks=3, attn_resolutions=(4,), emb_dim=8,
                                                image_size=32, norm_groups=4)], ids=["f4", "f8-gen_mul3"])
def test_released_key_map_round_trip_and_forward(arch, tmp_path):
    ref = ref_state(arch)
    ours = from_bld(ref, arch)
    net = BinaryAutoencoder(arch)
    net.load_state_dict(ours, strict=True)  # every parameter, with its shape
    back = to_bld(ours, arch)
    kept = {k for k in ref if not k.startswith(("ae.generator.logsigma", "disc.", "perceptual."))}
    unused = {k for k in kept if ".conv_out." in k and ref[k.replace(".bias", ".weight")].shape[0]
              == ref[k.replace(".bias", ".weight")].shape[1]}
    assert set(back) == kept - unused and all(torch.equal(back[k], ref[k]) for k in back)
    images = torch.rand(2, 3, 32, 32)
    p_ref, recon_ref = ref_forward(ref, arch, images)
    with torch.no_grad():
        p = net.probs(images)
        recon = net.decode(net.binarize(p, "threshold"))
    assert torch.allclose(p, p_ref, atol=1e-5) and torch.allclose(recon, recon_ref, atol=1e-4)
    with pytest.raises(KeyError, match="encoder.blocks.99"):
        from_bld({**ref, "ae.encoder.blocks.99.weight": torch.zeros(1)}, arch)
    with pytest.raises(ValueError, match="norm_first"):  # a decoder starting with its conv
        from_bld({**ref, "ae.generator.blocks.0.weight": torch.zeros(8, arch.emb_dim, 3, 3)}, arch)


def test_latent_space_bits_cache_and_decode(tmp_path):
    weights = save_tiny_bae(tmp_path / "bae.pt")
    cfg = load_config(None, [*BASE, f"latent.binary.weights={weights}"])
    latent = build_latent(cfg)
    assert isinstance(latent, BinaryLatents) and LATENTS["binary"] is BinaryLatents and latent.kind == "binary"
    assert latent.shape == (8, 4, 4) and latent.raw_shape == (16,) and latent.raw_dtype == torch.uint8
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 1, 16, 16), generator=g, dtype=torch.uint8)
    raw = latent.encode_raw(images)
    assert raw.dtype == torch.uint8 and raw.shape == (5, 16)
    # The same image gets the same bits in any batch (seeded by its bytes), other seeds other bits.
    assert torch.equal(latent.encode_raw(images[3:4]), raw[3:4]) and torch.equal(latent.encode_raw(images), raw)
    other = build_latent(load_config(None, [*BASE, f"latent.binary.weights={weights}", "latent.binary.seed=1"]))
    assert not torch.equal(other.encode_raw(images), raw)
    bits = latent.to_model(raw)
    assert bits.dtype == torch.float32 and bits.shape == (5, 8, 4, 4) and set(bits.unique().tolist()) <= {0.0, 1.0}
    decoded = latent.decode(bits)
    assert decoded.dtype == torch.uint8 and decoded.shape == (5, 3, 16, 16)
    flat = build_latent(load_config(None, [*BASE, f"latent.binary.weights={weights}", "latent.binary.pack=false",
                                           "latent.binary.bits=threshold"]))
    raw_flat = flat.encode_raw(images)
    assert raw_flat.dtype == torch.uint8 and raw_flat.shape == (5, 8, 4, 4)
    with torch.no_grad():
        p = flat.load_weights()._net.probs(images.expand(-1, 3, -1, -1).float() / 255)
    assert torch.equal(flat.to_model(raw_flat), (p > 0.5).float())


def test_weights_errors_name_the_file_the_key_and_the_release(tmp_path):
    cfg = load_config(None, BASE)
    with pytest.raises(FileNotFoundError, match="latent.binary.weights is not set.*binary-ae/README.md"):
        build_latent(cfg).load_weights()
    missing = tmp_path / "binaryae_ema_8100000.th"
    cfg = load_config(None, [*BASE, f"latent.binary.weights={missing}"])
    with pytest.raises(FileNotFoundError) as err:
        build_latent(cfg).load_weights()
    message = str(err.value)
    assert "\n" not in message and str(missing) in message and "latent.binary.weights" in message
    assert "ZeWang95/BinaryLatentDiffusion" in message


def test_released_file_loads_through_the_key_map(tmp_path):
    cfg = load_config(None, [*BASE, "data.image_size=32", "latent.binary.attn_resolutions=[8]"])
    arch = cfg.latent.binary.arch(32)
    ref = ref_state(arch, seed=3)
    torch.save(ref, tmp_path / "binaryae_ema_1.th")
    latent = build_latent(load_config(None, [*BASE, "data.image_size=32", "latent.binary.attn_resolutions=[8]",
                                             f"latent.binary.weights={tmp_path / 'binaryae_ema_1.th'}"]))
    images = torch.rand(1, 3, 32, 32)
    p_ref, _ = ref_forward(ref, arch, images)
    with torch.no_grad():
        assert torch.allclose(latent.load_weights()._net.probs(images), p_ref, atol=1e-5)
    wrong = build_latent(load_config(None, [*BASE, "data.image_size=32", "latent.binary.bit_channels=16",
                                            f"latent.binary.weights={tmp_path / 'binaryae_ema_1.th'}"]))
    with pytest.raises((ValueError, KeyError)):
        wrong.load_weights()


def test_config_validation():
    with pytest.raises(ConfigError, match="latent.binary.factor"):
        load_config(None, [*BASE, "latent.binary.factor=2"])
    with pytest.raises(ConfigError, match="data.image_size"):
        load_config(None, [*BASE, "data.image_size=18"])
    with pytest.raises(ConfigError, match="latent.binary.ch_mult"):
        load_config(None, [*BASE, "latent.binary.ch_mult=[1,2]"])
    with pytest.raises(ConfigError, match="latent.binary.norm_groups"):
        load_config(None, [*BASE, "latent.binary.norm_groups=3"])
    with pytest.raises(ConfigError, match="objective 'bernoulli'.*'pixel'"):
        load_config(None, [*BASE, "latent.name=pixel"])
    cfg = load_config(None, [*BASE, "latent.binary.factor=16", "data.image_size=256", "latent.binary.nf=128",
                             "latent.binary.emb_dim=256", "latent.binary.norm_groups=32"])
    assert cfg.latent.binary.arch(256).ch_mult == (1, 1, 2, 2, 4) and cfg.latent.binary.arch(256).factor == 16


def test_tiny_autoencoder_overfits_eight_images():
    torch.manual_seed(0)
    images = torch.rand(8, 3, 16, 16).round()  # two-level images: structure the bits must carry
    images = F.interpolate(images[:, :, ::4, ::4], scale_factor=4.0, mode="nearest")
    net = BinaryAutoencoder(BAEArch(bit_channels=16, ch_mult=(1, 1, 2), nf=8, res_blocks=1, attn_resolutions=(),
                                    emb_dim=16, image_size=16, norm_groups=4))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(120):  # the spec's oracle allows 300
        recon, _, _ = net(images)
        loss = F.l1_loss(recon, images)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-10:]) <= 0.5 * np.mean(losses[:3]), (losses[:3], losses[-10:])


def test_prepare_caches_packed_uint8_bits(tmp_path):
    """prepare.py writes the packed bits as uint8 shards, equal to direct encoding; training reads them back."""
    from helpers import run_job

    from gen.data import DigitsDataset, LatentCacheDataset, build_dataset

    weights = save_tiny_bae(tmp_path / "bae.pt")
    config = tmp_path / "binary.yaml"
    config.write_text("model: {name: SiT-S/1}\ndata: {name: digits, image_size: 16, num_workers: 0}\n"
                      "objective: {name: bernoulli, bernoulli: {num_timesteps: 8}}\n"
                      "sampler: {sampler: ancestral, num_steps: 4}\n"
                      f"latent: {{name: binary, binary: {{weights: {weights}}}}}\n")
    out = tmp_path / "cache"
    done = run_job("prepare.py", [str(config), *TINY_BAE, "--out", str(out), "--shard-size", "500"])
    assert done.returncode == 0, done.stdout + done.stderr
    cache = LatentCacheDataset(out, expected_raw_shape=(16,))
    assert cache.meta["raw_dtype"] == "uint8" and cache.meta["latent"]["name"] == "binary"
    digits = DigitsDataset("train", 16)
    some = list(range(0, len(digits), 97))
    raw = torch.stack([torch.as_tensor(cache[i]["raw"]) for i in some])
    cfg = load_config(config, [*TINY_BAE, "data.name=latent_cache", f"data.path={out}"])
    latent = build_latent(cfg)
    assert raw.dtype == torch.uint8 and torch.equal(raw, latent.encode_raw(digits.images[some]))
    assert len(build_dataset(cfg)) == len(digits)
    assert torch.equal(latent.to_model(raw), unpack_bits(raw, (8, 4, 4)).float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bits_on_cuda_equal_bits_on_cpu(tmp_path):
    cfg = load_config(None, [*BASE, f"latent.binary.weights={save_tiny_bae(tmp_path / 'bae.pt')}"])
    cpu, gpu = build_latent(cfg), build_latent(cfg)
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    raw = gpu.encode_raw(images.cuda())
    assert raw.device.type == "cuda" and torch.equal(raw.cpu(), cpu.encode_raw(images))
    decoded = gpu.decode(gpu.to_model(raw))
    assert decoded.device.type == "cuda" and decoded.dtype == torch.uint8


def test_repa_aligns_the_16x16_bit_grid_with_dinov2_b_at_256px(tmp_path):
    """configs/bld_imagenet256_repa.yaml's geometry: SiT-*/1 on 16x16 bits (f = 16 at 256 px) has 256 tokens, the patch
    grid of DINOv2-B/14 on the image resized to 224; the REPA loss of a Bernoulli-diffusion step reaches the blocks."""
    from safetensors.torch import save_file

    from align import REPA, build_encoder
    from align.encoders import ENCODERS, create_encoder_model
    from gen.cond import Cond
    from gen.models import build_model
    from gen.objectives import BernoulliObjective
    from gen.step import StepDraws, Trainee

    from helpers import REPO

    cfg = load_config(REPO / "configs" / "bld_imagenet256_repa.yaml", ["data.name=image_folder", "data.path=/x"])
    assert cfg.latent.binary.arch(cfg.data.image_size).latent_shape[1:] == (16, 16)
    torch.manual_seed(0)  # a narrow random DINOv2-B stand-in at its published 37 x 37 grid, resampled to 16 x 16
    stand_in = create_encoder_model(ENCODERS["dinov2-vit-b"], 37, depth=1, embed_dim=24, num_heads=2)
    save_file({k: v.contiguous() for k, v in stand_in.state_dict().items()}, str(tmp_path / "enc.safetensors"))
    enc = build_encoder("dinov2-vit-b", tmp_path / "enc.safetensors", 256, (16, 16), depth=1, embed_dim=24,
                        num_heads=2)
    model = build_model("SiT-S/1", input_size=16, in_channels=8, depth=2, hidden_size=32, num_heads=2,
                        num_classes=10)
    assert model.token_grid == (16, 16) and enc.num_tokens == 256
    objective = BernoulliObjective(num_timesteps=8, null_class=model.null_class)
    repa = REPA(32, {"dinov2-vit-b": enc.dim}, 1, projector_dim=16, encoders={"dinov2-vit-b": enc})
    trainee = Trainee(model, objective, {"repa": repa})
    x0 = (torch.rand(2, 8, 16, 16) < 0.5).float()
    pixels = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    draws = StepDraws(objective={}, latent={}, uniform=torch.rand(2))
    loss, terms = trainee(x0, Cond(torch.tensor([0, 1])), 0, draws, pixels=pixels)
    loss.mean().backward()
    assert terms["repa"].shape == (2,) and torch.isfinite(loss).all()
    assert model.x_embedder.proj.weight.grad.abs().sum() > 0  # the bit embedding (gates start at 0: adaLN-Zero)
