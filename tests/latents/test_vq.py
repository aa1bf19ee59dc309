"""The vq latent space (latents.vq): MAGE's VQGAN (latents.vqgan) against the reference's own key names, shapes and
forward, and the parameter-free palette quantizer's identities (hard and soft codes)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gen.config import ConfigError, load_config
from latents import build_latent
from latents.vq import PaletteQuantizer, VQLatents, embed, soft_embed
from latents.vqgan import VQGAN, VQGANArch, from_mage, to_mage

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = VQGANArch(codebook_size=16, code_dim=8, ch=8, ch_mult=(1, 2), res_blocks=2, image_size=16, norm_groups=4)

# ---------------------------------------------------------------------------------------------------
# The reference's state dict, from its module definitions (LTH14/mage taming/modules/diffusionmodules/model.py,
# taming/models/vqgan.py with config/vqgan.yaml):
# - Encoder: conv_in (3x3, no bias); down[i].block[j] ResnetBlock(norm1, conv1, norm2, conv2, nin_shortcut 1x1
#   out->out where the width changes; convs without bias); downsample without conv (avg pool, no parameters);
#   mid.block_1, mid.block_2; norm_out; conv_out (1x1, bias);
# - Decoder: conv_in (3x3, bias); mid.block_1/2; up[i].block[j] (coarsest built first, stored at index i);
#   up[i].upsample.conv (3x3, bias) for i > 0; norm_out; conv_out (3x3, bias);
# - quantize.embedding.weight (K, d). No attention, no quant_conv / post_quant_conv.


def ref_shapes(a: VQGANArch) -> dict[str, tuple]:
    shapes = {}

    def conv(key, c_in, c_out, k, bias):
        shapes[f"{key}.weight"] = (c_out, c_in, k, k)
        if bias:
            shapes[f"{key}.bias"] = (c_out,)

    def norm(key, c):
        shapes[f"{key}.weight"], shapes[f"{key}.bias"] = (c,), (c,)

    def res(key, c_in, c_out):
        norm(f"{key}.norm1", c_in), conv(f"{key}.conv1", c_in, c_out, 3, False)
        norm(f"{key}.norm2", c_out), conv(f"{key}.conv2", c_out, c_out, 3, False)
        if c_in != c_out:
            conv(f"{key}.nin_shortcut", c_out, c_out, 1, False)

    conv("encoder.conv_in", 3, a.ch, 3, False)
    mult = (1, *a.ch_mult)
    for i in range(len(a.ch_mult)):
        c_in = a.ch * mult[i]
        for j in range(a.res_blocks):
            res(f"encoder.down.{i}.block.{j}", c_in, a.ch * a.ch_mult[i])
            c_in = a.ch * a.ch_mult[i]
    top = a.ch * a.ch_mult[-1]
    for side in ("encoder", "decoder"):
        res(f"{side}.mid.block_1", top, top), res(f"{side}.mid.block_2", top, top)
    norm("encoder.norm_out", top), conv("encoder.conv_out", top, a.code_dim, 1, True)
    conv("decoder.conv_in", a.code_dim, top, 3, True)
    c_in = top
    for i in reversed(range(len(a.ch_mult))):
        for j in range(a.res_blocks):
            res(f"decoder.up.{i}.block.{j}", c_in, a.ch * a.ch_mult[i])
            c_in = a.ch * a.ch_mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", c_in, c_in, 3, True)
    norm("decoder.norm_out", c_in), conv("decoder.conv_out", c_in, 3, 3, True)
    shapes["quantize.embedding.weight"] = (a.codebook_size, a.code_dim)
    return shapes


def ref_state(a: VQGANArch, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: 0.2 * torch.randn(s, generator=g) for k, s in ref_shapes(a).items()}


def ref_decode(sd: dict, a: VQGANArch, z: torch.Tensor) -> torch.Tensor:
    """The reference Decoder.forward straight from its state dict (F.* calls on the reference key names)."""
    def conv(x, key, pad):
        return F.conv2d(x, sd[f"{key}.weight"], sd.get(f"{key}.bias"), padding=pad)

    def norm(x, key):
        return F.group_norm(x, a.norm_groups, sd[f"{key}.weight"], sd[f"{key}.bias"], eps=1e-6)

    def res(x, key):
        h = conv(F.silu(norm(x, f"{key}.norm1")), f"{key}.conv1", 1)
        h = conv(F.silu(norm(h, f"{key}.norm2")), f"{key}.conv2", 1)
        if f"{key}.nin_shortcut.weight" in sd:
            x = conv(h, f"{key}.nin_shortcut", 0)  # the reference's shortcut reads h
        return x + h

    h = conv(z, "decoder.conv_in", 1)
    h = res(res(h, "decoder.mid.block_1"), "decoder.mid.block_2")
    for i in reversed(range(len(a.ch_mult))):
        for j in range(a.res_blocks):
            h = res(h, f"decoder.up.{i}.block.{j}")
        if i != 0:
            h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), f"decoder.up.{i}.upsample.conv", 1)
    return conv(F.silu(norm(h, "decoder.norm_out")), "decoder.conv_out", 1)


def ref_encode(sd: dict, a: VQGANArch, x: torch.Tensor) -> torch.Tensor:
    """The reference Encoder.forward and VectorQuantizer2's argmin, from its state dict."""
    def conv(x, key, pad):
        return F.conv2d(x, sd[f"{key}.weight"], sd.get(f"{key}.bias"), padding=pad)

    def norm(x, key):
        return F.group_norm(x, a.norm_groups, sd[f"{key}.weight"], sd[f"{key}.bias"], eps=1e-6)

    def res(x, key):
        h = conv(F.silu(norm(x, f"{key}.norm1")), f"{key}.conv1", 1)
        h = conv(F.silu(norm(h, f"{key}.norm2")), f"{key}.conv2", 1)
        return (conv(h, f"{key}.nin_shortcut", 0) if f"{key}.nin_shortcut.weight" in sd else x) + h

    h = conv(x, "encoder.conv_in", 1)
    for i in range(len(a.ch_mult)):
        for j in range(a.res_blocks):
            h = res(h, f"encoder.down.{i}.block.{j}")
        if i != len(a.ch_mult) - 1:
            h = F.avg_pool2d(h, 2)
    h = res(res(h, "encoder.mid.block_1"), "encoder.mid.block_2")
    z = conv(F.silu(norm(h, "encoder.norm_out")), "encoder.conv_out", 0).permute(0, 2, 3, 1)
    e = sd["quantize.embedding.weight"]
    return ((z[..., None, :] - e) ** 2).sum(-1).argmin(-1)


def test_mage_key_map_names_and_shapes_of_the_released_model():
    """Every key of the released model's layout maps onto ours with its shape, and back (no tensors allocated for
    the 1024 x 256 reference: shapes only)."""
    ours = {k: tuple(v.shape) for k, v in VQGAN(VQGANArch()).state_dict().items()}
    mapped = {k: tuple(v) for k, v in from_mage({k: torch.Size(s) for k, s in ref_shapes(VQGANArch()).items()}).items()}
    assert mapped == ours
    assert {k: tuple(v) for k, v in to_mage({k: torch.Size(s) for k, s in ours.items()}).items()} == \
        ref_shapes(VQGANArch())


def test_released_checkpoint_loads_and_computes_the_reference_network(tmp_path):
    sd = ref_state(TINY)
    path = tmp_path / "vqgan_jax_strongaug.ckpt"
    torch.save({"state_dict": sd}, path)
    space = VQLatents("vqgan", 16, codebook_size=16, code_dim=8, factor=2, weights=str(path), arch=TINY)
    net = space.tokenizer()
    assert not any(p.requires_grad for p in net.parameters())
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 8, 8, 8, generator=g)
    assert torch.allclose(space.decode_codes(z), ref_decode(sd, TINY, z), atol=1e-4)
    images = (torch.rand(3, 3, 16, 16, generator=g) * 255).to(torch.uint8)
    ids = space.encode_raw(images)
    assert ids.dtype == torch.int64 and ids.shape == (3, 8, 8)
    assert torch.equal(ids, ref_encode(sd, TINY, images.float() / 255))
    decoded = space.decode(ids)
    expected = ref_decode(sd, TINY, sd["quantize.embedding.weight"][ids].permute(0, 3, 1, 2))
    assert decoded.dtype == torch.uint8 and torch.equal(decoded, (127.5 * (2 * expected - 1) + 128).clamp(0, 255)
                                                        .to(torch.uint8))
    with pytest.raises(KeyError, match="loss.discriminator"):
        from_mage({**sd, "loss.discriminator.main.0.weight": torch.zeros(1)})


def test_missing_weights_name_the_key_and_where_they_are_published(tmp_path):
    space = VQLatents("vqgan", 16, weights=str(tmp_path / "nope.ckpt"), arch=TINY, factor=2)
    with pytest.raises(FileNotFoundError, match=r"latent.vq.weights=.*nope.ckpt.*LTH14/mage"):
        space.load_weights()
    with pytest.raises(FileNotFoundError, match="latent.vq.weights is not set"):
        VQLatents("vqgan", 16, arch=TINY, factor=2).load_weights()
    with pytest.raises(ConfigError, match="latent.vq.ch_mult"):
        load_config(None, ["latent.name=vq", "latent.vq.factor=8", "data.image_size=32", "model.name=MAGE-T",
                           "objective.name=masked_tokens", "sampler.sampler=maskgit"])


@pytest.mark.parametrize("palette,code_dim", [("grey", 3), ("halton", 8)])
def test_palette_hard_and_soft_codes(palette, code_dim):
    q = PaletteQuantizer(16, code_dim, 4, palette)
    assert q.codes.shape == (16, code_dim) and not list(q.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 16, (2, 3, 3), generator=g)
    codes = embed(q.codes, ids)
    images = q.decode_codes(codes)  # patch-constant images of the palette colours
    assert torch.allclose(images[:, :, ::4, ::4], q.colours[ids].permute(0, 3, 1, 2), atol=1e-6)
    assert torch.equal(q.encode(images), ids)  # every patch decodes to its colour and encodes back
    # A one-hot soft code is the hard code, and decodes to the same image.
    one_hot = F.one_hot(ids, 16).float()
    assert torch.allclose(soft_embed(q.codes, one_hot), codes, atol=1e-6)
    assert torch.allclose(q.decode_codes(soft_embed(q.codes, one_hot)), images, atol=1e-6)
    # Soft codes decode to the blend of the colours, differentiably.
    probs = torch.softmax(torch.randn(2, 3, 3, 16, generator=g), dim=-1).requires_grad_(True)
    blended = q.decode_codes(soft_embed(q.codes, probs))
    assert torch.allclose(blended[:, :, ::4, ::4], (probs @ q.colours).permute(0, 3, 1, 2), atol=1e-5)
    blended.sum().backward()
    assert torch.allclose(probs.grad, q.colours.sum(1).expand_as(probs) * 16, atol=1e-4)  # 4x4 pixels per code


def test_palette_space_through_the_config():
    cfg = load_config(None, ["latent.name=vq", "latent.vq.quantizer=palette", "latent.vq.codebook_size=8",
                             "latent.vq.code_dim=3", "latent.vq.factor=4", "data.image_size=16",
                             "data.name=digits", "objective.name=masked_tokens", "model.name=MAGE-T",
                             "sampler.sampler=maskgit"])
    space = build_latent(cfg)
    assert (space.kind, space.layout, space.shape, space.raw_dtype) == ("tokens", "id_grid", (4, 4), torch.int64)
    grey = torch.arange(0, 256, 16, dtype=torch.uint8).reshape(1, 1, 4, 4).repeat_interleave(4, 2)
    grey = grey.repeat_interleave(4, 3)  # (1, 1, 16, 16): 4 x 4 constant patches of 16 grey levels
    ids = space.encode_raw(grey)
    assert torch.equal(ids, (torch.arange(0, 256, 16).reshape(1, 4, 4) / 255 * 7).round().long())
    out = space.decode(ids.float())
    assert out.shape == (1, 3, 16, 16) and out.dtype == torch.uint8
    assert torch.equal(space.encode_raw(out), ids)


@pytest.mark.slow
def test_prepare_caches_int64_ids(tmp_path):
    """prepare.py caches the ids as int64 (N, h, w); training reads them back unchanged."""
    from helpers import run_job

    from gen.data import DigitsDataset, LatentCacheDataset, build_dataset

    config = tmp_path / "vq.yaml"
    config.write_text("model: {name: MAGE-T}\ndata: {name: digits, image_size: 16, num_workers: 0}\n"
                      "objective: {name: masked_tokens}\nsampler: {sampler: maskgit, num_steps: 4}\n"
                      "latent: {name: vq, vq: {quantizer: palette, codebook_size: 16, code_dim: 3, factor: 4}}\n")
    out = tmp_path / "cache"
    done = run_job("prepare.py", [str(config), "--out", str(out), "--shard-size", "500"])
    assert done.returncode == 0, done.stdout + done.stderr
    cache = LatentCacheDataset(out, expected_raw_shape=(4, 4))
    assert cache.meta["raw_dtype"] == "int64" and cache.meta["latent"]["name"] == "vq"
    digits = DigitsDataset("train", 16)
    some = list(range(0, len(digits), 97))
    raw = torch.stack([torch.as_tensor(cache[i]["raw"]) for i in some])
    cfg = load_config(config, ["data.name=latent_cache", f"data.path={out}"])
    latent = build_latent(cfg)
    assert raw.dtype == torch.int64 and torch.equal(raw, latent.encode_raw(digits.images[some]))
    assert len(build_dataset(cfg)) == len(digits) and torch.equal(latent.to_model(raw), raw)
