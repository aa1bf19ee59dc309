"""Per-sample counter-based dropout (gen.dropout): the hash against a pure-Python splitmix64, masks that depend on the
sample and not on its batch (exact), rates and scale, the explicit attention path against SDPA, eval drawing nothing,
and the training step's keys (StepDraws.micro) giving one forward's result whatever the process/accumulation split."""
import pytest
import torch

from gen.dropout import SampleDropout, _int64, drop_mask, mix64, sample_keys, sample_streams
from gen.layers import Attention, Block
from gen.step import StepDraws


def splitmix64_output(z: int) -> int:
    """splitmix64's output function on Python ints (Steele, Lea and Flood 2014; Vigna's splitmix64.c)."""
    m = (1 << 64) - 1
    z &= m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def masks(seed, first, n, shape, p=0.5, calls=1):
    """The masks (as 0 / 1 / (1 - p) floats) of `calls` dropout calls on ones of (n, *shape) in one stream."""
    layer = SampleDropout(p).train()
    with sample_streams(seed, first, n, "cpu"):
        return [layer(torch.ones(n, *shape)) for _ in range(calls)]


def test_mix64_is_splitmix64_and_the_keys_its_stream():
    values = [0, 1, 2, 12345, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 0x9E3779B97F4A7C15, 0xDEADBEEFCAFEF00D]
    out = mix64(torch.tensor([_int64(v) for v in values]))
    assert out.tolist() == [_int64(splitmix64_output(v)) for v in values]
    gamma = 0x9E3779B97F4A7C15
    keys = sample_keys(77, 5, 3, "cpu").tolist()
    assert keys == [_int64(splitmix64_output(77 + i * gamma)) for i in (5, 6, 7)]
    # Element e of a sample: word e % 2 (low, high) of hash e // 2, as a signed int32, against 2^32 p - 2^31.
    p, shape = 0.3, (3, 5)  # an odd count of elements: the last hash's high word unused
    expected = torch.zeros(3, 15, dtype=torch.bool)
    for i, key in enumerate(keys):
        for e in range(15):
            word = (splitmix64_output(key + e // 2 * gamma) >> 32 * (e % 2)) & 0xFFFFFFFF
            expected[i, e] = word - (word >> 31 << 32) < int(p * 2 ** 32) - 2 ** 31
    assert torch.equal(drop_mask(torch.tensor(keys), shape, p), expected.reshape(3, *shape))


def test_a_samples_mask_depends_on_its_index_not_on_its_batch():
    full = masks(3, 0, 8, (4, 5), calls=3)
    for first, n in ((0, 3), (3, 5), (6, 2)):  # the same samples in other micro-batches: the same masks, exactly
        part = masks(3, first, n, (4, 5), calls=3)
        assert all(torch.equal(a[first:first + n], b) for a, b in zip(full, part))
    keys = sample_keys(3, 0, 8, "cpu")
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(drop_mask(keys[order], (4, 5), 0.5), drop_mask(keys, (4, 5), 0.5)[order])  # batch order
    # Masks differ between samples, calls and steps.
    a, b, c = full
    assert not any(torch.equal(a[i], a[j]) for i in range(8) for j in range(i))
    assert not torch.equal(a, b) and not torch.equal(b, c)
    assert not torch.equal(a, masks(4, 0, 8, (4, 5))[0])


def test_keep_rate_scale_and_pairs():
    p, n, m = 0.3, 4, 250_000
    x = torch.rand(n, m) + 0.5
    layer = SampleDropout(p).train()
    with sample_streams(11, 0, n, "cpu"):
        y = layer(x)
    kept = y != 0
    # 1e6 draws: the rate's std is 4.6e-4; 0.003 is 6.5 of them (p ignored, or 1 - p swapped, is 0.3 away).
    assert abs(kept.float().mean().item() - (1 - p)) < 3e-3
    assert abs((kept[:, 1:] & kept[:, :-1]).float().mean().item() - (1 - p) ** 2) < 3e-3  # neighbours independent
    torch.testing.assert_close(y[kept], x[kept] * (1 / (1 - p)), rtol=0, atol=0)
    assert kept.float().mean(1).sub(1 - p).abs().max() < 5e-3  # every sample at the rate, not only the batch


def test_explicit_attention_is_sdpa_and_eval_draws_nothing():
    torch.manual_seed(0)
    attn = Attention(16, 2, drop=1e-12)  # keeps every weight (drop probability 1e-12): the explicit path alone
    x = torch.randn(3, 7, 16)
    attn.eval()
    sdpa = attn(x)
    attn.train()
    with sample_streams(5, 0, 3, "cpu"):
        explicit = attn(x)
    torch.testing.assert_close(explicit, sdpa, rtol=1e-5, atol=1e-6)
    # Eval, or no dropout: no draw at all (neither the stream's call number nor torch's generator moves).
    block, plain = Block(16, 2, drop=0.5), Block(16, 2).train()
    state = torch.get_rng_state()
    with sample_streams(5, 0, 3, "cpu"):
        block.eval()(x), plain(x)
        after_eval = SampleDropout(0.5).train()(torch.ones(3, 2))
        dropped = block.train()(x)
    assert torch.equal(after_eval, masks(5, 0, 3, (2,))[0])  # the stream's first call: nothing was taken before it
    assert torch.equal(torch.get_rng_state(), state)  # in a stream, training draws nothing from torch's generator
    assert not torch.allclose(dropped, block.eval()(x))


def test_the_steps_keys_give_one_result_whatever_the_split():
    """A block's output and gradients on a global batch of 8: one forward, 2 processes x 4, 4 accumulation steps of
    2 per process on 1 process (StepDraws.micro's layout): the same masks, so the same numbers."""
    torch.manual_seed(0)
    block = Block(16, 2, drop=0.2).train()
    x = torch.randn(8, 5, 16)
    draws = StepDraws({}, {}, torch.zeros(8), dropout_seed=1_000_003 * 7 + 2)

    def run(micro: int, rank: int, world: int, per: int):
        part = draws.micro(micro, rank, world, per)
        start = (micro * world + rank) * per
        xs = x[start:start + per].clone().requires_grad_(True)
        with part.dropout_streams(per, "cpu"):
            out = block(xs)
        (grad,) = torch.autograd.grad(out.square().sum(), xs)
        return out, grad

    one = run(0, 0, 1, 8)
    two = [run(0, r, 2, 4) for r in range(2)]
    accumulated = [run(m, 0, 1, 2) for m in range(4)]
    for split in (two, accumulated):
        for k in range(2):
            torch.testing.assert_close(torch.cat([s[k] for s in split]), one[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="a training forward must keep its batch"):
        with draws.dropout_streams(4, "cpu"):
            block(x)


def test_a_masked_token_training_forward_draws_nothing_from_torchs_generator():
    """MAGE with dropout through Trainee on the step's draws: torch's global generator is neither read (another
    global seed, the same loss) nor advanced, so nothing needs seeding it per micro-batch."""
    from gen.config import load_config
    from gen.models import build_backbone
    from gen.objectives import build_objective
    from gen.step import Trainee
    from latents import build_latent

    cfg = load_config(None, ["data.image_size=16", "cond.num_classes=10", "model.name=MAGE-T", "latent.name=vq",
                             "latent.vq.quantizer=palette", "latent.vq.codebook_size=8", "latent.vq.code_dim=3",
                             "latent.vq.factor=4", "objective.name=masked_tokens", "sampler.sampler=maskgit",
                             "objective.masked_tokens.mask_schedule=truncnorm",
                             "objective.masked_tokens.drop_ratio=0.5", "model.mage.dropout=0.1"])
    latent = build_latent(cfg)
    torch.manual_seed(0)
    model = build_backbone(cfg, latent.shape)
    trainee = Trainee(model, build_objective(cfg, model)).train()
    x0, labels = torch.randint(0, 8, (6, *latent.shape)), torch.arange(6)
    draws = StepDraws.draw(trainee.objective, latent, 6, seed=0, step=3, hflip=False, device="cpu")
    state = torch.get_rng_state()
    loss = trainee(x0, labels, 3, draws)[0]
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)
    assert torch.equal(trainee(x0, labels, 3, draws)[0], loss)
    model.eval()
    assert not torch.equal(trainee(x0, labels, 3, draws)[0], loss)  # dropout was on


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_masks_equal_cpu_masks():
    keys = sample_keys(9, 3, 4, "cpu")
    assert torch.equal(drop_mask(keys.cuda(), (3, 33, 33), 0.1).cpu(), drop_mask(keys, (3, 33, 33), 0.1))


@pytest.mark.slow  # inductor compiles two blocks: ~30 s on a busy 2-core CPU
def test_compiled_blocks_draw_the_eager_masks():
    """Under torch.compile (train.compile) the masks stay the eager ones: without the graph break around the mask
    (gen.dropout.call_mask), inductor's C++ got the int64 products of the hash wrong."""
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(Block(32, 2, drop=0.2), Block(32, 2, drop=0.2)).train()
    compiled = torch.compile(blocks)
    x = torch.randn(4, 9, 32)
    for seed, first in ((5, 0), (6, 4)):
        with sample_streams(seed, first, 4, "cpu"):
            eager = blocks(x)
        with sample_streams(seed, first, 4, "cpu"):
            torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-6)
