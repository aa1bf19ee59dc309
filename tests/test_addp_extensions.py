"""ADDP's extensions (none in the paper): class-conditional decoding with classifier-free guidance, REPA on the
pixel encoder's tokens, dropout; on the toy setting of tests/test_addp.py (32 x 32 images, K = 16 palette codes at
f = 8, ADDP-T)."""
from __future__ import annotations

import pytest
import torch

from gen.cond import Cond
from gen.config import ConfigError, load_config
from gen.models import build_backbone
from gen.objectives import build_objective
from gen.sampling.guidance import with_cfg

pytestmark = pytest.mark.usefixtures("one_thread")
GRID, K, L = (4, 4), 16, 16
TOY = ["data.name=digits", "data.image_size=32", "model.name=ADDP-T", "model.addp.patch_size=8", "latent.name=vq",
       "latent.vq.quantizer=palette", "latent.vq.palette=halton", "latent.vq.codebook_size=16",
       "latent.vq.code_dim=8", "latent.vq.factor=8", "objective.name=addp", "objective.addp.predictor=oracle",
       "sampler.sampler=alternating", "sampler.num_steps=4"]
COND = ["model.addp.class_conditional=true", "cond.num_classes=10", "cond.label_dropout=0.1"]


def toy(*extra, seed=0):
    cfg = load_config(None, [*TOY, *extra])
    torch.manual_seed(seed)
    model = build_backbone(cfg, GRID).eval()
    return model, build_objective(cfg, model).load_weights("cpu"), cfg


def inputs(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, K, (n, *GRID), generator=g)
    mask = (torch.arange(L) % 3 == 0).reshape(1, *GRID).expand(n, -1, -1)
    return torch.rand(n, 3, 32, 32, generator=g), ids, mask


# Class-conditional ADDP with classifier-free guidance ------------------------------------------------------------


def test_labels_reach_the_decoder_and_dropped_ones_are_the_null_label():
    model, obj, _ = toy(*COND)
    assert model.null_class == 10 and obj.cond.conditional and obj.cond.dropout == 0.1
    x, ids, mask = inputs(2)
    t = torch.zeros(2)

    def logits(labels):
        return model(x, t, Cond(torch.tensor(labels)), ids=ids, mask=mask).out

    assert not torch.equal(logits([3, 4]), logits([5, 4]))
    assert torch.equal(logits([3, 4])[1], logits([5, 4])[1])  # per sample
    ids0 = torch.randint(0, K, (2, *GRID), generator=torch.Generator().manual_seed(2))
    draws = {**obj.draw(2, GRID, torch.Generator().manual_seed(3))}
    dropped = obj.loss(model, ids0, Cond(torch.tensor([3, 4])), **{**draws, "drop": torch.tensor([True, False])})
    by_hand = obj.loss(model, ids0, Cond(torch.tensor([10, 4])), **{**draws, "drop": torch.tensor([False, False])})
    assert torch.equal(dropped.cond.labels, torch.tensor([10, 4])) and torch.equal(dropped.loss, by_hand.loss)
    plain, plain_obj, _ = toy()  # the unconditional default reads no label (ADDP)
    out = plain(x, t, Cond(torch.tensor([3, 4])), ids=ids, mask=mask).out
    assert torch.equal(out, plain(x, t, None, ids=ids, mask=mask).out) and not plain_obj.cond.conditional


def test_guided_logits_are_u_plus_s_times_c_minus_u_on_the_packed_state():
    model, obj, _ = toy(*COND)
    x, ids, mask = inputs(3)
    cond = Cond(torch.tensor([1, 2, 3]))
    fn = obj.model_fn(model)
    state = obj.pack(x, ids, mask)
    back = obj.unpack(state)
    assert torch.equal(back[0], x) and torch.equal(back[2], mask)
    assert torch.equal(back[1][~mask], ids[~mask])
    c = model(x, torch.zeros(3), cond, ids=ids, mask=mask).out[..., :K]
    u = model(x, torch.zeros(3), Cond(torch.full((3,), 10)), ids=ids, mask=mask).out[..., :K]
    t = torch.tensor([0.2, 0.6, 0.9])
    guided = with_cfg(fn, 3.0, obj.cond, (0.5, 1.0))(state, t, cond)  # sample 0 lies outside the interval
    torch.testing.assert_close(guided[1:], u[1:] + 3.0 * (c[1:] - u[1:]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guided[0], c[0], rtol=1e-6, atol=1e-6)


def test_cfg_scale_one_is_the_unguided_sampler_and_guidance_changes_samples():
    model, obj, cfg = toy(*COND)
    cond = Cond(torch.tensor([1, 7]))

    def sample(**options):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        opts = {**obj.sample_options(cfg.sampler), **options}
        return obj.sample(obj.model_fn(model), obj.prior(GRID, gens), cond, generator=gens, **opts)

    one = sample(cfg_scale=1.0)
    assert torch.equal(one, sample(cfg_scale=4.0, cfg_interval=(2.0, 3.0)))  # never inside: the conditional model
    assert not torch.equal(one, sample(cfg_scale=4.0))


def test_guidance_is_refused_for_an_unconditional_addp():
    with pytest.raises(ConfigError, match="sampler.cfg_scale.*class_conditional"):
        load_config(None, [*TOY, "sampler.cfg_scale=2.0"])
    with pytest.raises(ConfigError, match="model.addp.class_slots"):
        load_config(None, [*TOY, *COND, "model.addp.class_slots=10"])
    model, obj, _ = toy()
    gens = [torch.Generator().manual_seed(0)]
    with pytest.raises(ValueError, match="class-conditional"):
        obj.sample(obj.model_fn(model), obj.prior(GRID, gens), None, generator=gens, num_steps=2, cfg_scale=2.0)


# REPA on the pixel encoder's tokens ---------------------------------------------------------------------------


def test_repa_on_the_encoder_tokens_trains_a_step(tmp_path):
    """addp x addp x vq with align.methods=[repa] at the encoder's last block: the config loads, one Trainee step
    reaches the projector, the encoder and the decoder (a narrow random DINOv2-S stand-in on the 4 x 4 grid)."""
    from safetensors.torch import save_file

    from align import REPA, build_encoder
    from align.encoders import ENCODERS, create_encoder_model
    from gen.step import StepDraws, Trainee

    model, obj, cfg = toy("align.methods=[repa]", "align.repa.depth=2", "align.repa.encoders=[dinov2-vit-s]")
    model.train()
    assert cfg.align.repa.depth == 2 and model.token_width(2) == 64
    torch.manual_seed(0)
    stand_in = create_encoder_model(ENCODERS["dinov2-vit-s"], 4, depth=1, embed_dim=24, num_heads=2)
    save_file({k: v.contiguous() for k, v in stand_in.state_dict().items()}, str(tmp_path / "enc.safetensors"))
    enc = build_encoder("dinov2-vit-s", tmp_path / "enc.safetensors", 32, GRID, depth=1, embed_dim=24, num_heads=2)
    repa = REPA(model.token_width(2), {"dinov2-vit-s": enc.dim}, 2, projector_dim=16, encoders={"dinov2-vit-s": enc})
    trainee = Trainee(model, obj, {"repa": repa})
    n = 4
    ids = torch.randint(0, K, (n, *GRID), generator=torch.Generator().manual_seed(1))
    draws = StepDraws.draw(obj, obj.latent, n, seed=0, step=0, hflip=False, device="cpu")
    pixels = obj.latent.decode(ids)
    loss, terms = trainee(ids, Cond(torch.zeros(n, dtype=torch.long)), 0, draws, pixels=pixels)
    loss.mean().backward()
    assert terms["repa"].shape == (n,) and torch.isfinite(loss).all()
    assert list(repa.parameters()) and all(p.grad is not None and p.grad.abs().sum() > 0 for p in repa.parameters())
    assert model.blocks[1].mlp.fc2.weight.grad.abs().sum() > 0 and model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.decoder_blocks[0].mlp.fc2.weight.grad.abs().sum() > 0


# Dropout ------------------------------------------------------------------------------------------------------


def test_dropout_draws_only_while_training_and_zero_builds_none():
    from gen.dropout import SampleDropout

    plain, _, _ = toy()
    assert not any(isinstance(m, SampleDropout) for m in plain.modules())  # the default: no random draws at all
    model, _, _ = toy("model.addp.dropout=0.1")
    # embeddings + 4 per block (attention weights, attention output, the MLP's two)
    assert sum(isinstance(m, SampleDropout) for m in model.modules()) == 1 + 4 * 3
    assert model.state_dict().keys() == plain.state_dict().keys()
    model.load_state_dict(plain.state_dict())
    x, ids, mask = inputs(2)
    t = torch.zeros(2)
    assert torch.equal(model(x, t, None, ids=ids, mask=mask).out, plain(x, t, None, ids=ids, mask=mask).out)  # eval
    model.train()
    a, b = (model(x, t, None, ids=ids, mask=mask).out for _ in range(2))
    assert not torch.equal(a, b)
    with pytest.raises(ConfigError, match="model.addp.dropout"):
        load_config(None, [*TOY, "model.addp.dropout=1.0"])


def test_embedding_init_scale():
    """model.addp.embed_init_std scales every N(0, 0.02) table of the reference's init, and only those."""
    plain, wide = toy()[0], toy("model.addp.embed_init_std=1.0")[0]
    tables = ("cls_token", "pos_embed", "mask_token", "decoder_pos_embed_learned", "decoder_pos_mask_embed",
              "decoder_pos_token_embed", "token_emb.weight")
    for key in tables:
        assert plain.state_dict()[key].std() < 0.03 and 0.7 < wide.state_dict()[key].std() < 1.3, key
    assert torch.equal(plain.state_dict()["norm.weight"], wide.state_dict()["norm.weight"])
    with pytest.raises(ConfigError, match="model.addp.embed_init_std"):
        load_config(None, [*TOY, "model.addp.embed_init_std=0"])


@pytest.mark.usefixtures("fresh_accelerate")
def test_resume_with_dropout_equals_the_uninterrupted_run(tmp_path):
    """Dropout masks are functions of (seed, step, sample, call, element) (gen.dropout): 2 + 2 steps equal 4."""
    import train as train_job
    from safetensors.torch import load_file

    job = ["data.image_size=16", "data.num_workers=0", "model.addp.patch_size=4", "latent.vq.codebook_size=8",
           "latent.vq.code_dim=3", "latent.vq.factor=4", "model.addp.dropout=0.1", "train.global_batch_size=8",
           "train.lr=1e-3", "train.ckpt_every_steps=2", "log.tracker=none", "log.preview_every_steps=0"]

    def run(name, steps, resume=False):
        cfg = load_config(None, [*TOY, *job, f"train.max_steps={steps}", f"train.run_dir={tmp_path / name}"])
        ckpt = train_job.train(cfg, resume=resume)
        return {k: load_file(str(ckpt / f)) for k, f in (("model", "model.safetensors"), ("ema", "ema.safetensors"))}

    straight = run("a", 4)
    run("b", 2)
    resumed = run("b", 4, resume=True)
    for part in ("model", "ema"):
        assert all(torch.equal(straight[part][k], resumed[part][k]) for k in straight[part])
