"""SRA: where gradients go, the EMA teacher (early exit, identity, labels), teacher times, the loss formula,
config checks, and SRA + REPA through train.py on SiT (flow) and DiT (DDPM)."""
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, randomize
from safetensors.torch import load_file

import train as train_job
from align import ALIGNERS, SRA, AlignBatch
from align.sra import default_pair
from gen.cond import Cond
from gen.config import ConfigError, default_config, load_config
from gen.ema import EMA
from gen.models import build_model
from gen.objectives import DDPMObjective, FlowObjective, Objective
from gen.step import StepDraws, Trainee

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


N, C, INPUT, D, CLASSES = 4, 4, 8, 32, 10  # tiny SiT: 4 blocks, 16 tokens; SRA 2 -> 3
STUDENT, TEACHER = 2, 3


def tiny_sit(seed=0):
    model = build_model("SiT-S/2", depth=4, hidden_size=D, num_heads=2, input_size=INPUT, num_classes=CLASSES)
    return randomize(model, seed)


def pinned(seed=1, drop=None):
    """x0, y and the objective's draws (t, noise, label-drop mask), fixed."""
    g = torch.Generator().manual_seed(seed)
    x0, y = torch.randn(N, C, INPUT, INPUT, generator=g), torch.randint(0, CLASSES, (N,), generator=g)
    draws = {"t": torch.rand(N, generator=g), "noise": torch.randn(N, C, INPUT, INPUT, generator=g),
             "drop": torch.zeros(N, dtype=torch.bool) if drop is None else drop}
    return x0, y, draws


def setup(objective=None, **kw):
    model = tiny_sit()
    ema = EMA(model, 0.99)
    randomize(ema.model, 5)  # a teacher that differs from the student
    objective = objective or FlowObjective(null_class=model.null_class)
    sra = SRA(D, STUDENT, TEACHER, **kw)  # the teacher view comes from the objective, per batch
    return model, ema, objective, sra, Trainee(model, objective, {"sra": sra}, teacher=ema.model)


def align_batch(trainee, objective, sra, seed=1, drop=None, step=0):
    x0, y, draws = pinned(seed, drop)
    out = objective.loss(trainee.model, x0, y, taps=sra.taps, **draws)
    return out, AlignBatch.from_loss(out, x0, step, teacher=trainee._teacher_feats, objective=objective)


def test_teacher_gets_no_gradient_while_head_and_lower_blocks_do():
    model, ema, objective, sra, trainee = setup()
    out, batch = align_batch(trainee, objective, sra)
    sra(out.feats, batch)["loss"].mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sra.head.parameters())
    for k, block in enumerate(model.blocks, start=1):
        grads = [p.grad for p in block.parameters()]
        assert all(g is not None for g in grads) if k <= STUDENT else all(g is None for g in grads)
    assert all(p.grad is None and not p.requires_grad for p in ema.model.parameters())
    # The whole trainee step (denoise + SRA) leaves the teacher untouched as well.
    x0, y, draws = pinned()
    trainee(x0, y, 0, StepDraws(objective=draws, latent={}, uniform=torch.rand(N)))[0].mean().backward()
    assert all(p.grad is None for p in ema.model.parameters())


def test_teacher_is_not_a_submodule_and_ema_update_still_works():
    model, ema, _, sra, trainee = setup()
    assert trainee.teacher is ema.model
    assert not any(k.startswith("_teacher") or "teacher" in k for k in trainee.state_dict())
    assert {id(p) for p in trainee.parameters()} == {id(p) for p in [*model.parameters(), *sra.parameters()]}
    before = [p.clone() for p in ema.model.parameters()]
    ema.update(model)
    for b, p, q in zip(before, ema.model.parameters(), model.parameters()):
        torch.testing.assert_close(p, 0.99 * b + 0.01 * q)


def test_early_exit_features_equal_full_forward_and_teacher_is_eval():
    _, ema, _, _, trainee = setup()
    ema.model.train()
    x0, y, draws = pinned()
    full = ema.model(x0, draws["t"], y, taps=(TEACHER,)).feats[TEACHER]
    feats = trainee._teacher_feats(x0, draws["t"], y, TEACHER)
    assert not ema.model.training and not feats.requires_grad
    torch.testing.assert_close(feats, full, rtol=0, atol=0)


def test_teacher_sees_student_post_dropout_labels_and_a_less_noisy_input():
    model, _, objective, sra, trainee = setup()
    seen = {}

    def spy(x_t, t, cond, layer):
        seen.update(x_t=x_t, t=t, y=cond.labels, layer=layer)
        return trainee._teacher_feats(x_t, t, cond, layer)

    drop = torch.tensor([True, False, True, False])
    out, batch = align_batch(trainee, objective, sra, drop=drop)
    batch.teacher = spy
    sra(out.feats, batch)
    assert torch.equal(seen["y"], out.cond.labels) and seen["layer"] == TEACHER
    assert (seen["y"][drop] == model.null_class).all() and (seen["y"][~drop] != model.null_class).all()
    expected = objective.noised(batch.x0, seen["t"], batch.noise)  # same x0 and noise, teacher time
    torch.testing.assert_close(seen["x_t"], expected)


@pytest.mark.parametrize("kind", ["flow", "ddpm"])
def test_teacher_time_is_earlier_by_at_most_t_max_and_reproducible(kind):
    objective = FlowObjective(null_class=CLASSES) if kind == "flow" else DDPMObjective(null_class=CLASSES)
    sra = setup(objective)[3]
    n = 4096
    g = torch.Generator().manual_seed(0)
    t = objective.sample_time(n, generator=g)
    x0 = torch.zeros(n, 1)
    u = torch.rand(n, generator=g)
    batch = AlignBatch(x0=x0, x_t=x0, t=t, noise=x0, cond=Cond(torch.zeros(n, dtype=torch.long)), step=3,
                       objective=objective, uniform=u)
    _, t_t = objective.teacher_view(x0, t, x0, sra.draw_u(batch), sra.t_max)  # the teacher time SRA uses
    span = 1.0 if kind == "flow" else objective.num_timesteps
    gap = (t.double() - t_t.double())[t > 0]  # DDPM: a student at step 0 has its teacher at step 1
    assert (gap >= 0).all() and (gap <= 0.2 * span + 1e-6).all() and gap.max() > 0.15 * span
    assert (t_t >= 0).all() and (t_t <= (1.0 if kind == "flow" else span - 1)).all()
    if kind == "ddpm":
        assert t_t.dtype == torch.long
    assert torch.equal(sra.draw_u(batch), u)  # the trainer's per-sample draws, nothing of its own


def test_ddpm_teacher_step_is_the_reference_randint_offset_clamped_to_1_999():
    """SRA DiT-SRA: t_t = clamp(t - randint(0, int(1000 t_max)), 1, 999). With t_max 0.2 the offset k = floor(200 u)
    takes each of 0..199 equally often on an even grid of u in [0, 1), never 200; the clamp is exact at both ends."""
    objective = DDPMObjective(null_class=CLASSES)
    u = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000  # 5 values of u per offset
    t = torch.full((1000,), 500)
    x0 = torch.zeros(1000, 1)
    _, t_t = objective.teacher_view(x0, t, x0, u, 0.2)
    assert t_t.dtype == torch.long and torch.equal(torch.bincount(500 - t_t), torch.full((200,), 5))
    _, t_t = objective.teacher_view(x0, t, x0, torch.rand(1000, generator=torch.Generator().manual_seed(0)), 0.2)
    assert set((500 - t_t).tolist()) <= set(range(200)) and (500 - t_t).max() >= 190
    # Hand-computed: (t, u) -> t_t, with k = floor(200 u).
    t = torch.tensor([0, 0, 5, 150, 999, 999, 300, 1])
    u = torch.tensor([0.0, 0.999, 0.05, 0.9999, 0.0, 0.5, 0.25, 0.0])
    _, t_t = objective.teacher_view(torch.zeros(8, 1), t, torch.zeros(8, 1), u, 0.2)
    assert t_t.tolist() == [1, 1, 1, 1, 999, 899, 250, 1]
    # int(1000 * 0.1) = 100 offsets (the reference's argparse default); t_max 0: no offset, the clamp alone.
    _, t_t = objective.teacher_view(torch.zeros(3, 1), torch.tensor([700, 700, 0]), torch.zeros(3, 1),
                                    torch.tensor([0.999, 0.5, 0.5]), 0.1)
    assert t_t.tolist() == [601, 650, 1]
    _, t_t = objective.teacher_view(torch.zeros(3, 1), torch.tensor([0, 500, 999]), torch.zeros(3, 1),
                                    torch.tensor([0.9, 0.9, 0.9]), 0.0)
    assert t_t.tolist() == [1, 500, 999]


@pytest.mark.parametrize("loss", ["cosine", "smooth_l1", "token_axis_cosine"])
def test_loss_equals_formula_on_pinned_inputs(loss):
    torch.manual_seed(0)
    sra = SRA(D, 1, 2, loss=loss)
    h_s, h_t = torch.randn(N, 16, D), torch.randn(N, 16, D)
    batch = AlignBatch(x0=torch.zeros(N, C, INPUT, INPUT), x_t=None, t=torch.rand(N),
                       noise=torch.zeros(N, C, INPUT, INPUT), cond=Cond(torch.zeros(N, dtype=torch.long)), step=0,
                       teacher=lambda x_t, t, cond, layer: h_t, objective=FlowObjective(null_class=CLASSES))
    got = sra({1: h_s}, batch)
    pred = sra.head(h_s)
    if loss == "cosine":
        cos = (pred * h_t).sum(-1) / (pred.norm(dim=-1) * h_t.norm(dim=-1))
        expected = 1 - cos.mean(dim=1)
    elif loss == "token_axis_cosine":  # SRA SiT-SRA/loss.py `cos`: torch's dim=1 on (N, T, D) is the token axis
        cos = (pred * h_t).sum(1) / (pred.norm(dim=1) * h_t.norm(dim=1))  # (N, D): one cosine per channel
        expected = 1 - cos.mean(dim=1)
        torch.testing.assert_close(expected.mean(), (1 - F.cosine_similarity(pred, h_t)).mean())  # the reference's
    else:
        diff = (pred - h_t).abs()
        expected = torch.where(diff < 0.05, 0.5 * diff**2 / 0.05, diff - 0.025).mean(dim=(1, 2))
    torch.testing.assert_close(got["loss"], expected, rtol=1e-5, atol=1e-6)
    assert got["loss"].shape == (N,)
    torch.testing.assert_close(got["cos"], F.cosine_similarity(pred, h_t, dim=-1).mean())


def pair_of(model_name):
    """SRA's default (student, teacher) layers for a registered backbone at its published depth."""
    cfg = default_config()
    cfg.model.name = model_name
    return default_pair(cfg)


class NoTeacherView(FlowObjective):
    """An objective without a teacher view (the contract's default), e.g. one SRA has no teacher time for."""

    teacher_view = Objective.teacher_view


def test_head_init_and_layer_defaults():
    sra = SRA(D, 1, 2)
    assert [tuple(m.weight.shape) for m in sra.head[::2]] == [(2 * D, D), (D, 2 * D)]
    assert all((m.bias == 0).all() for m in sra.head[::2])
    assert pair_of("SiT-XL/2") == (8, 20) and pair_of("SiT-B/2") == (3, 8)
    assert pair_of("SiT-L/2") == (6, 16) and pair_of("DiT-XL/2") == (8, 16)
    assert pair_of("SiT-S/4") == (3, 8) and ALIGNERS["sra"] is SRA
    cfg = load_config(None, ["model.name=SiT-S/2", "model.dit.depth=4", "model.dit.hidden_size=32",
                             "model.dit.num_heads=2", "cond.num_classes=10", "align.methods=[sra]",
                             f"align.sra.student_layer={STUDENT}", f"align.sra.teacher_layer={TEACHER}"])
    model = tiny_sit()
    with pytest.raises(ValueError, match="teacher view"):
        SRA.from_config(cfg, model, NoTeacherView(null_class=CLASSES))


def test_config_validation():
    base = REPO / "configs" / "quickstart_sra.yaml"
    cfg = load_config(base)
    assert (cfg.align.sra.student_layer, cfg.align.sra.teacher_layer) == (2, 4) and cfg.align.sra.t_max == 0.2
    with pytest.raises(ConfigError, match="align.sra.teacher_layer"):
        load_config(base, ["align.sra.teacher_layer=7"])
    with pytest.raises(ConfigError, match="align.sra.teacher_layer"):  # depth 6: the S default 3 -> 8 does not fit
        load_config(base, ["align.sra.student_layer=null", "align.sra.teacher_layer=null"])
    with pytest.raises(ConfigError, match="align.sra.student_layer"):
        load_config(base, ["align.sra.student_layer=0"])
    with pytest.raises(ConfigError, match="align.sra.coeff"):
        load_config(base, ["align.sra.coeff=-1"])
    with pytest.raises(ConfigError, match="align.sra.loss"):
        load_config(base, ["align.sra.loss=l2"])
    assert load_config(base, ["align.sra.loss=token_axis_cosine"]).align.sra.loss == "token_axis_cosine"
    with pytest.raises(ConfigError, match="align.sra.t_max"):
        load_config(base, ["align.sra.t_max=1.5"])


@pytest.mark.parametrize("model,objective", [("SiT-S/2", "flow"), ("DiT-S/2", "ddpm")])
def test_sra_and_repa_train_together(tmp_path, assets, monkeypatch, model, objective):
    vae, images, encoder = assets
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        f"model.name={model}", "model.dit.depth=2", "model.dit.hidden_size=32", "model.dit.num_heads=2",
        "cond.num_classes=2",
        "data.name=image_folder", f"data.path={images}", "data.image_size=32", "latent.name=sd-vae",
        f"latent.sd_vae.vae_path={vae}", "train.global_batch_size=8", "train.max_steps=2", "log.tracker=none",
        "log.preview_every_steps=0", "log.every_steps=1", "data.num_workers=0", f"train.run_dir={tmp_path / 'run'}",
        "align.methods=[repa,sra]", "align.repa.encoders=[dinov2-vit-s]",
        f"align.encoder_weights={{dinov2-vit-s: {encoder}}}", "align.repa.depth=1", "align.sra.student_layer=1",
        "align.sra.teacher_layer=2", f"objective.name={objective}",
        "sampler.sampler=" + ("heun" if objective == "flow" else "ddim")])
    made = {}

    class SpyEMA(EMA):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made["ema"] = self

    class SpyTrainee(Trainee):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made["trainee"] = self

    monkeypatch.setattr(train_job, "EMA", SpyEMA)
    monkeypatch.setattr(train_job, "Trainee", SpyTrainee)
    ckpt = train_job.train(cfg)
    assert made["trainee"].teacher is made["ema"].model  # the trainer's EMA model, no second copy
    logs = [json.loads(x) for x in (tmp_path / "run" / "logs" / "scalars.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and all({"loss", "denoise", "repa", "sra", "sra/cos"} <= set(rec) for rec in logs)
    for rec in logs:  # total = denoise + 0.5 * repa + 0.5 * sra
        assert 0.0 <= rec["sra"] <= 2.0
        assert rec["loss"] == pytest.approx(rec["denoise"] + 0.5 * rec["repa"] + 0.5 * rec["sra"], rel=1e-5, abs=1e-6)
    state = load_file(str(ckpt / "model.safetensors"))
    assert any(k.startswith("aligners.sra.head.") for k in state) and not any("teacher" in k for k in state)
    assert all(not k.startswith("aligners") for k in load_file(str(ckpt / "ema.safetensors")))
