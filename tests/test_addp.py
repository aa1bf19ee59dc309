"""ADDP (gen.objectives.addp, addp_masks, gen.models.addp) against exact CPU oracles on a toy setting: 32 x 32 images,
the palette quantizer with K = 16 at f = 8 (L = 16 tokens), an ADDP-T of width 64 (patch 8, encoder depth 2,
decoder depth 1), and the oracle predictor or a tiny random MAGE predictor."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gen.config import load_config
from gen.models import build_backbone
from gen.models.mage import MaskedTokenTransformer
from gen.objectives import build_objective
from gen.objectives.addp_masks import generation_counts, grid_levels, nested_masks, ratio_grid

pytestmark = pytest.mark.usefixtures("one_thread")
GRID, K, L = (4, 4), 16, 16
TOY = ["data.name=digits", "data.image_size=32", "model.name=ADDP-T", "model.addp.patch_size=8", "latent.name=vq",
       "latent.vq.quantizer=palette", "latent.vq.palette=halton", "latent.vq.codebook_size=16",
       "latent.vq.code_dim=8", "latent.vq.factor=8", "objective.name=addp", "objective.addp.predictor=oracle",
       "sampler.sampler=alternating", "sampler.num_steps=6"]


def toy(*extra, seed=0):
    cfg = load_config(None, [*TOY, *extra])
    torch.manual_seed(seed)
    model = build_backbone(cfg, GRID)
    return model, build_objective(cfg, model).load_weights("cpu")


def ids_batch(n, seed=1):
    return torch.randint(0, K, (n, *GRID), generator=torch.Generator().manual_seed(seed))


# 1. Mask sampler ------------------------------------------------------------------------------------


def test_ratio_grid_and_nested_masks():
    ratios, probs = ratio_grid()
    assert len(ratios) == 66 and bool((ratios >= 0.5).all() & (ratios < 1.0).all())
    assert bool((ratios[1:] > ratios[:-1]).all()) and abs(float(ratios[0]) - math.cos(math.pi / 2 * 66 / 100)) < 1e-6
    assert abs(float(probs.sum()) - 1.0) < 1e-12
    mean = float((probs * ratios.double()).sum())
    assert abs(mean - 0.745) < 0.01
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        i, i_next = grid_levels(probs, torch.rand(1, generator=g), torch.rand(1, generator=g))
        assert i < i_next <= min(i + 5, 65) or i == i_next == 65
        scores = torch.rand(3, 256, generator=g)
        mask_t, mask_t1 = nested_masks(ratios, i, i_next, scores)
        assert mask_t.sum(1).tolist() == [math.ceil(256 * float(ratios[i]))] * 3
        assert mask_t1.sum(1).tolist() == [math.ceil(256 * float(ratios[i_next]))] * 3
        assert not bool((mask_t & ~mask_t1).any())


# 2. Soft embedding ----------------------------------------------------------------------------------


def test_one_hot_soft_codes_are_the_hard_codes():
    _, obj = toy()
    ids = ids_batch(3)
    mask = torch.rand(3, L, generator=torch.Generator().manual_seed(2)) < 0.5
    soft = obj.code_map(ids, mask, F.one_hot(ids, K).float())
    hard = obj.code_map(ids, torch.zeros_like(mask), F.one_hot(ids, K).float())
    torch.testing.assert_close(soft, hard)
    torch.testing.assert_close(obj.latent.decode_codes(soft), obj.latent.decode_codes(hard))
    assert torch.equal(obj.latent.decode(hard), obj.latent.decode(ids))


# 3. No leak -----------------------------------------------------------------------------------------


def test_no_leak_through_masked_ids_or_fully_masked_pixels():
    model, _ = toy()
    model.eval()
    g = torch.Generator().manual_seed(3)
    ids, other = ids_batch(2, seed=4), ids_batch(2, seed=5)
    x1, x2 = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    t = torch.zeros(2)
    everything = torch.ones(2, *GRID, dtype=torch.bool)
    torch.testing.assert_close(model(x1, t, None, ids=ids, mask=everything).out,
                               model(x2, t, None, ids=other, mask=everything).out, rtol=0, atol=0)
    mask = (torch.arange(L) % 3 == 0).reshape(1, *GRID).expand(2, -1, -1)  # same count per row
    changed = torch.where(mask, other, ids)  # only the ids under the mask differ
    torch.testing.assert_close(model(x1, t, None, ids=ids, mask=mask).out,
                               model(x1, t, None, ids=changed, mask=mask).out, rtol=0, atol=0)
    visible = torch.where(mask, ids, other)
    assert not torch.equal(model(x1, t, None, ids=ids, mask=mask).out, model(x1, t, None, ids=visible, mask=mask).out)


# 4. Loss masking, smoothing over V, frozen parts ------------------------------------------------------


def test_loss_is_the_smoothed_soft_target_ce_over_v_on_masked_positions(tmp_path):
    model, obj = toy("objective.addp.oracle_epsilon=0.0")
    ids = ids_batch(3)
    draws = {**obj.draw(3, GRID, torch.Generator().manual_seed(6)), "drop": torch.zeros(3, dtype=torch.bool)}
    out = obj.loss(model, ids, None, **draws)
    i, i_next = grid_levels(obj.probs, draws["level"], draws["offset"])
    mask_t, mask_t1 = nested_masks(obj.ratios, i, i_next, draws["scores"].reshape(3, L))
    soft = obj.code_map(ids, mask_t, F.one_hot(ids, K).float())  # the exact oracle's soft codes are the hard ones
    torch.testing.assert_close(out.x_t, obj.latent.decode_codes(soft))
    logits = model(out.x_t, out.t, None, ids=ids, mask=mask_t.reshape(ids.shape)).out.reshape(3, L, -1)
    v = logits.shape[-1]
    assert v == K + 1000 + 1
    target = F.pad(F.one_hot(ids.reshape(3, L), K).float(), (0, v - K))
    ce = F.cross_entropy(logits.transpose(1, 2), target.transpose(1, 2), label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(out.loss, (ce * mask_t).sum(1) / mask_t.sum(1))
    by_hand = -((0.9 * target + 0.1 / v) * F.log_softmax(logits, -1)).sum(-1)  # the denominator is V, not K
    torch.testing.assert_close(out.loss, (by_hand * mask_t).sum(1) / mask_t.sum(1))
    wrong = -((0.9 * target[..., :K] + 0.1 / K) * F.log_softmax(logits, -1)[..., :K]).sum(-1)
    assert not torch.allclose(out.loss, (wrong * mask_t).sum(1) / mask_t.sum(1))


def test_frozen_predictor_gets_no_gradient_and_the_id_table_none_through_the_head(tmp_path):
    torch.manual_seed(0)
    predictor = MaskedTokenTransformer.MODELS["MAGE-T"](grid=GRID, codebook_size=K)
    torch.save(predictor.state_dict(), tmp_path / "mage.pth")
    model, obj = toy("objective.addp.predictor=mage", "objective.addp.predictor_model=MAGE-T",
                     f"objective.addp.predictor_weights={tmp_path / 'mage.pth'}")
    assert not any(p.requires_grad for p in obj.predictor.parameters())
    ids = ids_batch(2)
    # level 1 picks the grid's last ratio: every position masked, nothing appended.
    draws = {"level": torch.ones(1), "offset": torch.zeros(1), "scores": torch.rand(2, *GRID),
             "drop": torch.zeros(2, dtype=torch.bool)}
    out = obj.loss(model, ids, None, **draws)
    assert bool((out.x_t != obj.latent.decode_codes(obj.code_map(ids, torch.zeros(2, L, dtype=torch.bool),
                                                                 F.one_hot(ids, K).float()))).any())
    out.loss.sum().backward()
    assert all(p.grad is None for p in obj.predictor.parameters())
    assert model.token_emb.weight.grad is None or float(model.token_emb.weight.grad.abs().sum()) == 0.0
    assert model.blocks[0].attn.qkv.weight.grad is not None


# 5. Generation schedule -------------------------------------------------------------------------------


@pytest.mark.parametrize("full_reveal", [False, True])
def test_generation_counts_frozen_reveals_and_the_end(full_reveal):
    model, obj = toy(f"objective.addp.final_full_reveal={str(full_reveal).lower()}")
    model.eval()
    steps = []
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    z = obj.sample(obj.model_fn(model), obj.prior(GRID, gens), None, generator=gens,
                   **obj.sample_options(load_config(None, TOY).sampler), callback=steps.append)
    counts = [int(s["mask"][0].sum()) for s in steps]
    expected = [min(max(math.ceil(L * math.cos(math.pi / 2 * (s + 1) / 6)), 1), L) for s in range(6)]
    assert counts == generation_counts(L, 6, "cosine", full_reveal) == expected[:5] + [0 if full_reveal else 1]
    assert all(int(s["mask"][1].sum()) == c for s, c in zip(steps, counts))
    assert counts == sorted(counts, reverse=True)
    for before, after in zip(steps, steps[1:]):
        revealed = ~before["mask"]
        assert torch.equal(after["ids"][revealed], before["ids"][revealed])
    last = steps[-1]
    hard = obj.code_map(last["ids"], torch.zeros(2, L, dtype=torch.bool), F.one_hot(last["ids"], K).float())
    keep = ~last["mask"].reshape(2, 1, *GRID).expand_as(z)
    assert torch.equal(z[keep], hard[keep]) and torch.equal(z, hard) == full_reveal
    images = obj.latent.decode(z)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8


# 6. Overfit with the oracle predictor -----------------------------------------------------------------


def test_overfits_one_batch_towards_the_smoothed_entropy_floor():
    model, obj = toy("objective.addp.oracle_epsilon=0.0")
    ids = ids_batch(4)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(7)
    v, eps = model.vocab_size, 0.1
    top, rest = 1 - eps + eps / v, eps / v
    floor = -(top * math.log(top) + (v - 1) * rest * math.log(rest))
    losses = []
    for _ in range(300):  # fresh masks every step
        draws = {**obj.draw(4, GRID, g), "drop": torch.zeros(4, dtype=torch.bool)}
        loss = obj.loss(model, ids, None, **draws).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert min(losses) >= floor - 1e-4
    assert sum(losses[-10:]) / 10 - floor < 0.2 * (losses[0] - floor)
    model.eval()
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    z = obj.sample(obj.model_fn(model), obj.prior(GRID, gens), None, generator=gens, num_steps=6)
    images = obj.latent.decode_codes(z)
    assert images.shape == (2, 3, 32, 32) and float(images.min()) >= 0 and float(images.max()) <= 1


# Through the jobs ----------------------------------------------------------------------------------------

JOB = ["data.name=digits", "data.image_size=16", "data.num_workers=0", "model.name=ADDP-T", "model.addp.patch_size=4",
       "latent.name=vq", "latent.vq.quantizer=palette", "latent.vq.codebook_size=8", "latent.vq.code_dim=3",
       "latent.vq.factor=4", "objective.name=addp", "sampler.sampler=alternating", "sampler.num_steps=4",
       "train.global_batch_size=16", "train.lr=1e-3", "train.max_steps=3", "log.tracker=none", "log.every_steps=1",
       "log.preview_every_steps=0", "train.ema_decay=0.9"]


def save_predictor(path):
    torch.manual_seed(0)
    torch.save(MaskedTokenTransformer.MODELS["MAGE-T"](grid=(4, 4), codebook_size=8).state_dict(), path)
    return ["objective.addp.predictor=mage", "objective.addp.predictor_model=MAGE-T",
            f"objective.addp.predictor_weights={path}"]


@pytest.mark.usefixtures("fresh_accelerate")
def test_frozen_parts_stay_out_of_the_optimizer_ema_and_checkpoints(tmp_path):
    import train as train_job
    from safetensors.torch import load_file

    ckpt = train_job.train(load_config(None, [*JOB, *save_predictor(tmp_path / "mage.pth"), "train.max_steps=1",
                                              f"train.run_dir={tmp_path / 'r'}"]))
    model, ema = load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "ema.safetensors"))
    fresh = build_backbone(load_config(None, JOB), (4, 4)).state_dict()
    names = {k.removeprefix("model.") for k in model} | {k.removeprefix("model.") for k in ema}
    assert names == set(fresh)  # the backbone's tensors only: no predictor, no tokenizer
    assert len(torch.load(ckpt / "optimizer.bin", weights_only=True)["state"]) == len(fresh)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """The per-batch grid levels, per-sample scores and dropout masks split over 2 processes like over 1 (MAGE
    predictor). Slow (~45 s): StepDraws' handling of per-batch draws is in the default suite (test_contracts)."""
    from helpers import assert_two_processes_match_one

    assert_two_processes_match_one(tmp_path, [*JOB, *save_predictor(tmp_path / "mage.pth"), "model.addp.dropout=0.1"],
                                   lr=1e-3, steps=3)
