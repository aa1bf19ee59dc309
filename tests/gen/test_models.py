"""Backbone registry, parameter counts, zero init, taps and the block against its formula."""
import math

import pytest
import torch
import torch.nn.functional as F

from gen.layers import sincos_2d, unpatchify
from gen.models import SIZES, Transformer, build_model
from helpers import randomize

TINY = dict(depth=2, hidden_size=32, num_heads=2, input_size=16, num_classes=10)


def analytic_params(depth, hidden_size, patch_size, in_channels=4, out_channels=8, num_classes=1000, input_size=32,
                    **_):
    """Parameter count of the adaLN-Zero transformer written out from DiT models.py and the DiT paper's Table 1 sizes (independent of the code)."""
    d, p = hidden_size, patch_size
    tokens = (input_size // p) ** 2
    embed = in_channels * p * p * d + d + tokens * d  # patch conv + frozen pos_embed
    cond = (256 * d + d) + (d * d + d) + (num_classes + 1) * d  # timestep MLP + label table with null row
    block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + (6 * d * d + 6 * d)
    final = (2 * d * d + 2 * d) + (p * p * out_channels * d + p * p * out_channels)
    return embed + cond + depth * block + final


def test_dit_xl2_has_the_published_parameter_count():
    with torch.device("meta"):
        model = build_model("DiT-XL/2")
    assert sum(p.numel() for p in model.parameters()) == 675_129_632


@pytest.mark.parametrize("name", sorted(Transformer.MODELS))
def test_full_size_counts_match_the_formula(name):
    size, p = name.split("-")[1].split("/")
    with torch.device("meta"):
        model = build_model(name)
    expected = analytic_params(**SIZES[size], patch_size=int(p), out_channels=model.out_channels)
    assert sum(q.numel() for q in model.parameters()) == expected


@pytest.mark.parametrize("size,millions", [("S", 33.0), ("B", 130.5), ("L", 458.1), ("XL", 675.1)])
def test_sizes_match_the_dit_table(size, millions):
    with torch.device("meta"):
        model = build_model(f"DiT-{size}/2")
    assert round(sum(q.numel() for q in model.parameters()) / 1e6, 1) == millions


@pytest.mark.parametrize("name", sorted(Transformer.MODELS))
def test_every_entry_builds_tiny_and_trains(name):
    torch.manual_seed(0)
    model = randomize(build_model(name, **TINY))
    x = torch.randn(2, 4, 16, 16)
    out = model(x, torch.rand(2), torch.tensor([3, model.null_class]), taps=(1, 2))
    assert out.out.shape == (2, model.out_channels, 16, 16)
    assert set(out.feats) == {1, 2}
    out.out.square().mean().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert not model.pos_embed.requires_grad


@pytest.mark.parametrize("name", ["SiT-B/2", "DiT-S/4"])
def test_zero_init_outputs_exactly_zero(name):
    torch.manual_seed(0)
    model = build_model(name, **TINY)
    out = model(torch.randn(3, 4, 16, 16), torch.rand(3) * 999, torch.tensor([0, 5, 10])).out
    assert torch.equal(out, torch.zeros_like(out))


def test_family_defaults():
    assert build_model("DiT-S/2", **TINY).out_channels == 8
    assert build_model("SiT-S/2", **TINY).out_channels == 4
    assert build_model("SiT-S/2", **TINY, learn_sigma=True).out_channels == 8
    assert build_model("SiT-S/2", **TINY).y_embedder.embedding_table.weight.shape[0] == 11


def test_feats_equal_blocks_run_by_hand_and_stop_at():
    torch.manual_seed(1)
    model = randomize(build_model("SiT-S/2", **{**TINY, "depth": 4}))
    x, t, y = torch.randn(2, 4, 16, 16), torch.rand(2), torch.tensor([1, 10])
    full = model(x, t, y, taps=(1, 3))
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    for k, block in enumerate(model.blocks, start=1):
        h = block(h, c)
        if k in (1, 3):
            assert torch.equal(full.feats[k], h)
    early = model(x, t, y, taps=(3,), stop_at=3)
    assert early.out is None and torch.equal(early.feats[3], full.feats[3])
    assert set(model(x, t, y).feats) == set()


def test_block_matches_the_adaln_zero_formula():
    torch.manual_seed(2)
    model = randomize(build_model("SiT-S/2", **TINY))
    block, d, heads = model.blocks[0], 32, 2
    x, c = torch.randn(2, 64, d), torch.randn(2, d)
    mod = F.linear(F.silu(c), block.adaLN_modulation[1].weight, block.adaLN_modulation[1].bias)
    s1, sc1, g1, s2, sc2, g2 = [mod[:, i * d:(i + 1) * d, None].transpose(1, 2) for i in range(6)]
    ln = lambda z: F.layer_norm(z, (d,), eps=1e-6)  # noqa: E731
    a = ln(x) * (1 + sc1) + s1
    q, k, v = F.linear(a, block.attn.qkv.weight, block.attn.qkv.bias).split(d, dim=-1)
    split = lambda z: z.reshape(2, 64, heads, d // heads).transpose(1, 2)  # noqa: E731
    att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ split(v)
    att = F.linear(att.transpose(1, 2).reshape(2, 64, d), block.attn.proj.weight, block.attn.proj.bias)
    x1 = x + g1 * att
    m = ln(x1) * (1 + sc2) + s2
    mlp = F.linear(F.gelu(F.linear(m, block.mlp.fc1.weight, block.mlp.fc1.bias), approximate="tanh"),
                   block.mlp.fc2.weight, block.mlp.fc2.bias)
    torch.testing.assert_close(block(x, c), x1 + g2 * mlp, rtol=1e-5, atol=1e-5)


def test_unpatchify_puts_the_channel_fastest():
    h, w, p, ch = 2, 3, 2, 4
    tokens = torch.arange(h * w * p * p * ch, dtype=torch.float32).reshape(1, h * w, p * p * ch)
    img = unpatchify(tokens, (h, w), p, ch)
    for i in range(h):
        for j in range(w):
            for a in range(p):
                for b in range(p):
                    for cc in range(ch):
                        assert img[0, cc, i * p + a, j * p + b] == tokens[0, i * w + j, (a * p + b) * ch + cc]


def test_pos_embed_first_half_encodes_the_column():
    d, grid = 8, (3, 5)
    emb = sincos_2d(d, grid)
    omega = 1.0 / 10000 ** (torch.arange(d // 4, dtype=torch.float64) / (d / 4))
    for token in range(15):
        row, col = divmod(token, 5)
        expect = torch.cat([torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega),
                            torch.cos(row * omega)]).float()
        torch.testing.assert_close(emb[token], expect)


def test_timestep_features_are_cos_then_sin():
    model = build_model("SiT-S/2", **TINY)
    t = torch.tensor([0.3, 700.0])
    f = model.t_embedder.features(t)
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    torch.testing.assert_close(f[:, :128], torch.cos(t[:, None] * freqs))
    torch.testing.assert_close(f[:, 128:], torch.sin(t[:, None] * freqs))


def test_bad_names_options_and_inputs_are_clear():
    with pytest.raises(KeyError, match="SiT-XL/2"):
        build_model("SiT-XL2")
    with pytest.raises(TypeError, match="hidden_sise"):
        build_model("SiT-S/2", hidden_sise=3)
    model = build_model("SiT-S/2", **TINY)
    with pytest.raises(ValueError, match="spatial size"):
        model(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([0]))
    with pytest.raises(ValueError, match="1..2"):
        model(torch.randn(1, 4, 16, 16), torch.rand(1), torch.tensor([0]), taps=(3,))
