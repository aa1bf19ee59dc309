"""2-D RoPE (LightningDiT / EVA-02 convention): exactness, relative-position property, state-dict compatibility."""
import math

import pytest
import torch
from helpers import randomize

from gen.layers import Attention, Rope2D
from gen.models import build_model

TINY = {"input_size": 8, "depth": 2, "hidden_size": 64, "num_heads": 4, "num_classes": 10}  # grid 4x4, head width 16


def tiny(**kw):
    torch.manual_seed(0)
    return build_model("SiT-S/2", **{**TINY, **kw})


def inputs(n=3, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, size, size, generator=g), torch.rand(n, generator=g), torch.randint(0, 10, (n,), generator=g)


def expected_rotation(x, row, col, theta=10000.0):
    """The convention written out pair by pair: first half by row, second by column, pairs (2j, 2j+1)."""
    dh = x.shape[-1]
    half = dh // 2
    out = x.clone().double()
    for start, pos in ((0, row), (half, col)):
        for j in range(half // 2):
            angle = pos * theta ** (-2 * j / half)
            a, b = x[start + 2 * j].double(), x[start + 2 * j + 1].double()
            out[start + 2 * j] = a * math.cos(angle) - b * math.sin(angle)
            out[start + 2 * j + 1] = b * math.cos(angle) + a * math.sin(angle)
    return out


def test_rotation_matches_the_written_out_convention():
    h, w, dh = 3, 5, 16
    rope = Rope2D(dh, (h, w))
    x = torch.randn(h * w, dh, dtype=torch.float32)
    got = rope(x)
    for r in range(h):
        for c in range(w):
            torch.testing.assert_close(got[r * w + c].double(), expected_rotation(x[r * w + c], r, c),
                                       rtol=1e-5, atol=1e-5)


def test_rope_off_is_bit_identical_to_the_model_without_the_argument():
    ref, off = randomize(tiny()), randomize(tiny(rope=False))
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(ref(x, t, y).out, off(x, t, y).out)
        # RoPE on a 1 x 1 grid rotates by angle 0: exactly the plain attention.
        one = randomize(tiny(input_size=2, rope=True))
        plain = randomize(tiny(input_size=2))
        x1 = x[..., :2, :2]
        assert torch.equal(one(x1, t, y).out, plain(x1, t, y).out)
        # ... and on a real grid it changes the output.
        on = randomize(tiny(rope=True))
        assert not torch.allclose(on(x, t, y).out, ref(x, t, y).out)


def test_same_parameters_drawn_with_rope_on_and_off():
    on, off = tiny(rope=True), tiny()
    for (k1, p1), (k2, p2) in zip(on.state_dict().items(), off.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(p1, p2)


def scores(rope, q, k):
    """Score matrix (T, T) of one query vector and one key vector placed at every grid position."""
    t = rope.cos.shape[0]
    return rope(q.expand(t, -1)) @ rope(k.expand(t, -1)).T


def test_score_depends_only_on_the_relative_offset():
    h, w, dh = 5, 6, 16
    rope = Rope2D(dh, (h, w))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(dh, generator=g), torch.randn(dh, generator=g)
    s = scores(rope, q, k)

    def at(r, c):
        return r * w + c  # row-major token index

    by_offset: dict[tuple[int, int], float] = {}
    for r1 in range(h):
        for c1 in range(w):
            for r2 in range(h):
                for c2 in range(w):
                    offset = (r2 - r1, c2 - c1)
                    value = s[at(r1, c1), at(r2, c2)].item()
                    if offset in by_offset:
                        assert value == pytest.approx(by_offset[offset], abs=1e-5)
                    else:
                        by_offset[offset] = value
    values = torch.tensor(list(by_offset.values()))
    assert (values[:, None] - values[None, :]).abs().add(torch.eye(len(values))).min() > 1e-6  # all offsets differ
    assert by_offset[(1, 0)] != pytest.approx(by_offset[(0, 1)], abs=1e-3)  # rows and columns are distinguished


def test_first_half_follows_rows_second_half_columns():
    h, w, dh = 4, 4, 16
    rope = Rope2D(dh, (h, w))
    q, k = torch.randn(dh), torch.randn(dh)
    row_only = scores(rope, torch.cat([q[:8], torch.zeros(8)]), torch.cat([k[:8], torch.zeros(8)]))
    col_only = scores(rope, torch.cat([torch.zeros(8), q[8:]]), torch.cat([torch.zeros(8), k[8:]]))
    # Tokens 0 and 1 share row 0 (column 0 vs 1); tokens 0 and 4 share column 0 (row 0 vs 1).
    assert row_only[0, 1].item() == pytest.approx(row_only[0, 0].item(), abs=1e-5)
    assert row_only[0, 4].item() != pytest.approx(row_only[0, 0].item(), abs=1e-3)
    assert col_only[0, 4].item() == pytest.approx(col_only[0, 0].item(), abs=1e-5)
    assert col_only[0, 1].item() != pytest.approx(col_only[0, 0].item(), abs=1e-3)


def test_rotation_preserves_per_token_norms():
    rope = Rope2D(16, (4, 7))
    x = torch.randn(2, 3, 28, 16)
    torch.testing.assert_close(rope(x).norm(dim=-1), x.norm(dim=-1))


def test_attention_applies_rope_after_qk_norm():
    torch.manual_seed(0)
    attn = randomize(Attention(32, 2, qk_norm=True, rope=(2, 3)))
    x = torch.randn(2, 6, 32)
    q, k, v = attn.qkv(x).reshape(2, 6, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.rope(attn.q_norm(q)), attn.rope(attn.k_norm(k))
    ref = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
    with torch.no_grad():
        torch.testing.assert_close(attn(x), attn.proj(ref.transpose(1, 2).reshape(2, 6, 32)))


def test_rope_needs_a_head_width_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        Rope2D(6, (2, 2))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_state_dict_unchanged_and_official_layout_loads_strictly(tmp_path, qk_norm):
    on, off = tiny(rope=True, qk_norm=qk_norm), tiny(qk_norm=qk_norm)
    assert {k: v.shape for k, v in on.state_dict().items()} == {k: v.shape for k, v in off.state_dict().items()}
    assert not any("rope" in k for k in on.state_dict())
    torch.save(randomize(off, seed=3).state_dict(), tmp_path / "official.pt")
    state = torch.load(tmp_path / "official.pt", weights_only=True)
    on.load_state_dict(state, strict=True)
    for k, v in state.items():
        assert torch.equal(on.state_dict()[k], v)
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.isfinite(on(x, t, y).out).all()


def test_official_builder_accepts_rope(tmp_path):
    from gen.models.official import build_official

    torch.save(randomize(tiny(qk_norm=True), seed=4).state_dict(), tmp_path / "repa.pt")
    model, _ = build_official(tmp_path / "repa.pt", "repa", rope=True, num_heads=TINY["num_heads"])
    assert model.rope and model.blocks[0].attn.rope is not None


def test_tiny_sit_with_rope_and_qk_norm_trains_one_step():
    model = randomize(tiny(rope=True, qk_norm=True), seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, t, y = inputs(4)
    target = torch.randn_like(x)
    loss = (model(x, t, y).out - target).pow(2).mean()
    assert torch.isfinite(loss)
    loss.backward()
    for i, block in enumerate(model.blocks):
        for name, p in block.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (i, name)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with torch.no_grad():
        assert torch.isfinite(model(x, t, y).out).all()


@pytest.mark.parametrize("qk_norm", [False, True])
def test_bf16_autocast_forward_on_cpu(qk_norm):
    model = randomize(tiny(rope=True, qk_norm=qk_norm), seed=6)
    x, t, y = inputs()
    with torch.no_grad():
        full = model(x, t, y, taps=(1,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x, t, y, taps=(1,))
    assert half.out.dtype == torch.bfloat16 and torch.isfinite(half.out).all()
    torch.testing.assert_close(half.out.float(), full.out, rtol=0.1, atol=0.1)


def test_bf16_attention_keeps_its_dtype():
    torch.manual_seed(0)
    attn = randomize(Attention(32, 2, rope=(2, 3)), seed=7)
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        full = attn(x)
        half = attn.to(torch.bfloat16)(x.bfloat16())  # bf16 q/k rotated in float32, handed back as bf16
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, rtol=0.05, atol=0.05)


def test_config_switch_reaches_the_model():
    from gen.config import default_config
    from gen.models import build_backbone

    cfg = default_config()
    cfg.model.name, cfg.model.dit.depth, cfg.model.dit.hidden_size, cfg.model.dit.num_heads = "SiT-S/2", 1, 32, 2
    assert cfg.model.dit.rope is False
    assert build_backbone(cfg, (4, 8, 8)).blocks[0].attn.rope is None
    cfg.model.dit.rope = True
    assert build_backbone(cfg, (4, 8, 8)).blocks[0].attn.rope is not None
