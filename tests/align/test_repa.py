"""REPA: the loss against the formula on pinned t/noise, where its gradient goes, cached vs online targets,
official projector state, depth defaults, weight schedules and the config path."""
import argparse

import pytest
import torch
from helpers import randomize
from safetensors.torch import save_file

from align import ALIGNERS, REPA, AlignBatch, WeightSchedule, build_encoder
from align.encoders import ENCODERS, create_encoder_model
from align.repa import DEFAULT_DEPTH
from gen.config import ConfigError, load_config
from gen.models import build_model, model_size
from gen.models.official import load_official
from gen.objectives import FlowObjective, build_objective

N, C, INPUT, D, CLASSES, DEPTH = 3, 4, 8, 32, 10, 2  # tiny SiT: 4 blocks, 4 x 4 = 16 tokens, aligned after block 2
T = (INPUT // 2) ** 2


def tiny_sit(seed=0):
    model = build_model("SiT-S/2", depth=4, hidden_size=D, num_heads=2, input_size=INPUT, num_classes=CLASSES)
    return randomize(model, seed)  # non-zero adaLN / output layers, so every block acts


def pinned(seed=1):
    """x0, y, t, noise: all the randomness of one step, fixed."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, C, INPUT, INPUT, generator=g), torch.randint(0, CLASSES, (N,), generator=g),
            torch.rand(N, generator=g), torch.randn(N, C, INPUT, INPUT, generator=g))


def student_step(model, repa, target_feats=None, pixels=None, seed=1):
    """The trainer's use: one objective forward with REPA's taps, then the aligner on its features."""
    x0, y, t, noise = pinned(seed)
    objective = FlowObjective(label_dropout=0.0, null_class=model.null_class)
    out = objective.loss(model, x0, y, taps=repa.taps, t=t, noise=noise)
    batch = AlignBatch.from_loss(out, x0, step=0, target_feats=target_feats, pixels=pixels)
    return out, repa(out.feats, batch)


def test_loss_equals_formula_on_pinned_t_and_noise():
    torch.manual_seed(0)
    model = tiny_sit()
    repa = randomize(REPA(D, {"a": 24, "b": 16}, DEPTH, projector_dim=64), seed=2)  # two encoders at once
    g = torch.Generator().manual_seed(3)
    targets = {"a": torch.randn(N, T, 24, generator=g), "b": torch.randn(N, T, 16, generator=g)}
    _, logs = student_step(model, repa, target_feats=targets)

    # By hand: x_t on the linear path, tokens after 2 blocks, the MLP, the per-token cosine over channels.
    x0, y, t, noise = pinned()
    x_t = (1 - t).view(-1, 1, 1, 1) * x0 + t.view(-1, 1, 1, 1) * noise
    h = model(x_t, t, y, taps=(DEPTH,)).feats[DEPTH].double()  # (N, T, D)
    silu = torch.nn.functional.silu
    per_encoder = []
    for k, name in enumerate(["a", "b"]):
        (w1, b1), (w2, b2), (w3, b3) = [(lin.weight.double(), lin.bias.double()) for lin in repa.projectors[k][::2]]
        z_hat = silu(silu(h @ w1.T + b1) @ w2.T + b2) @ w3.T + b3  # (N, T, d)
        z = targets[name].double()
        cos = (z_hat * z).sum(-1) / (z_hat.norm(dim=-1) * z.norm(dim=-1))  # (N, T)
        per_encoder.append(-cos.sum(-1) / T)  # -(1/T) sum_i cos
    expected = torch.stack(per_encoder).mean(0)  # mean over encoders, per sample
    assert logs["loss"].shape == (N,)
    torch.testing.assert_close(logs["loss"].double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.all(logs["loss"].abs() <= 1)
    torch.testing.assert_close(logs["cos/a"], -per_encoder[0].mean().float(), rtol=1e-5, atol=1e-6)
    assert not logs["cos/a"].requires_grad


def test_loss_is_minus_one_when_projection_matches_target():
    model, repa = tiny_sit(), REPA(D, {"a": 24}, DEPTH, projector_dim=64)
    x0, y, t, noise = pinned()
    x_t = (1 - t).view(-1, 1, 1, 1) * x0 + t.view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        z = repa.projectors[0](model(x_t, t, y, taps=(DEPTH,)).feats[DEPTH]) * 3.0  # same directions, any scale
    _, logs = student_step(model, repa, target_feats={"a": z})
    torch.testing.assert_close(logs["loss"], torch.full((N,), -1.0))


def test_gradients_reach_projector_and_blocks_up_to_depth_only():
    model = tiny_sit()
    repa = REPA(D, {"a": 24}, DEPTH, projector_dim=64)
    targets = {"a": torch.randn(N, T, 24)}
    _, logs = student_step(model, repa, target_feats=targets)
    logs["loss"].mean().backward()

    def touched(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in repa.parameters())
    for name in ("x_embedder", "t_embedder", "y_embedder"):
        assert touched(getattr(model, name)), name
    assert touched(model.blocks[0]) and touched(model.blocks[1])  # blocks 1..depth (1-based)
    assert not touched(model.blocks[2]) and not touched(model.blocks[3]) and not touched(model.final_layer)


def tiny_encoder_file(tmp_path, name="dinov2-vit-s", width=24):
    """A random-init narrow `name` saved like timm's HF file (37 x 37 positions at 518 px)."""
    torch.manual_seed(0)
    model = create_encoder_model(ENCODERS[name], 37, depth=1, embed_dim=width, num_heads=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "enc.safetensors"))
    return tmp_path / "enc.safetensors"


def test_cached_targets_give_the_same_loss_as_online_encoder(tmp_path):
    # The encoder sees 64 px images on the backbone's 4 x 4 grid (resized to 56 px for /14).
    enc = build_encoder("dinov2-vit-s", tiny_encoder_file(tmp_path), 64, INPUT // 2, depth=1, embed_dim=24,
                        num_heads=2)
    model = tiny_sit()
    repa = REPA(D, {"dinov2-vit-s": enc.dim}, DEPTH, projector_dim=64, encoders={"dinov2-vit-s": enc})
    pixels = torch.randint(0, 256, (N, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    _, online = student_step(model, repa, pixels=pixels)
    cache = {"dinov2-vit-s": enc(pixels).to(torch.bfloat16).float()}  # as prepare.py could store them (bf16)
    _, cached = student_step(model, repa, target_feats={"dinov2-vit-s": enc(pixels)})
    _, cached_bf16 = student_step(model, repa, target_feats=cache)
    assert torch.equal(online["loss"], cached["loss"])
    torch.testing.assert_close(cached_bf16["loss"], online["loss"], atol=2e-3, rtol=0)
    # Neither cached nor computable: a clear error.
    bare = REPA(D, {"dinov2-vit-s": enc.dim}, DEPTH, projector_dim=64)
    with pytest.raises(ValueError, match="not in batch.target_feats"):
        student_step(model, bare, pixels=pixels)


def test_official_projector_state_loads(tmp_path):
    """A REPA training checkpoint (synthetic, official key names) -> load_official -> our projectors."""
    model = tiny_sit()
    repa = REPA(D, {"dinov2-vit-b": 768}, DEPTH)  # the paper's projector: D -> 2048 -> 2048 -> 768
    g = torch.Generator().manual_seed(0)
    shapes = {"0.weight": (2048, D), "0.bias": (2048,), "2.weight": (2048, 2048), "2.bias": (2048,),
              "4.weight": (768, 2048), "4.bias": (768,)}
    projectors = {f"projectors.0.{k}": torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    state = {**model.state_dict(), **projectors}
    torch.save({"model": state, "ema": model.state_dict(), "opt": {}, "steps": 10,
                "args": argparse.Namespace(encoder_depth=DEPTH)}, tmp_path / "0000010.pt")
    weights = load_official(tmp_path / "0000010.pt", "repa")
    repa.load_official_projectors(weights.aligner)
    assert all(torch.equal(repa.state_dict()[k], v) for k, v in projectors.items())
    assert set(repa.state_dict()) == set(projectors)  # nothing else: encoders are not in the state
    two = REPA(D, {"dinov2-vit-b": 768, "clip-vit-l": 1024}, DEPTH)
    with pytest.raises(ValueError, match=r"1 projector\(s\).*\['dinov2-vit-b', 'clip-vit-l'\]"):
        two.load_official_projectors(weights.aligner)


def test_projector_init_and_depth_defaults():
    repa = REPA(D, {"a": 24}, DEPTH, projector_dim=64)
    linears = list(repa.projectors[0][::2])
    assert [tuple(lin.weight.shape) for lin in linears] == [(64, D), (64, 64), (24, 64)]
    assert all(torch.equal(lin.bias, torch.zeros_like(lin.bias)) for lin in linears)
    bound = (6 / (64 + 64)) ** 0.5  # xavier-uniform bound of the middle layer
    assert linears[1].weight.abs().max() <= bound and linears[1].weight.abs().max() > 0.9 * bound
    # REPA paper Table 7 and README: B 4, L 8, XL 8; S chosen 4; DiT-XL/2 8 assumed.
    models = ("SiT-S/2", "SiT-B/2", "SiT-L/2", "SiT-XL/2", "DiT-XL/2")
    assert [DEFAULT_DEPTH[model_size(m)] for m in models] == [4, 4, 8, 8, 8]
    assert ALIGNERS["repa"] is REPA and repa.taps == (DEPTH,)


def test_weight_schedules():
    assert [WeightSchedule(0.5)(s) for s in (0, 10**6)] == [0.5, 0.5]
    stop = WeightSchedule(0.5, stop_step=100)
    assert [stop(s) for s in (0, 99, 100, 101)] == [0.5, 0.5, 0.0, 0.0]
    erw = WeightSchedule(6.0, kind="halving", start_step=100_000, half_life_steps=50_000)
    for k in (100_000, 150_000, 200_000, 123_456):
        assert erw(k) == pytest.approx(6.0 * 2 ** (-(k - 100_000) / 50_000))
    assert erw(0) == erw(99_999) == 6.0  # coeff until start_step, then halving
    with pytest.raises(ValueError, match="unknown weight schedule"):
        WeightSchedule(1.0, kind="cosine")
    repa = REPA(D, {"a": 8}, DEPTH, projector_dim=16, schedule=stop)
    assert (repa.weight(0), repa.weight(100)) == (0.5, 0.0)


def test_from_config_builds_encoders_unless_cached(tmp_path):
    # The full-size ViT-S/14 through the config path (random init, saved at its published 37 x 37 grid).
    torch.manual_seed(0)
    full = create_encoder_model(ENCODERS["dinov2-vit-s"], 37)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "vits.safetensors"))
    cfg = load_config(None, ["model.name=SiT-S/2", "model.dit.depth=4", "model.dit.hidden_size=32",
                             "model.dit.num_heads=2", "data.image_size=64", "align.methods=[repa]",
                             "align.repa.encoders=[dinov2-vit-s]",
                             "align.repa.depth=2", "align.repa.stop_step=1000",
                             f"align.encoder_weights.dinov2-vit-s={tmp_path / 'vits.safetensors'}"])
    model = tiny_sit()
    objective = build_objective(cfg, model)
    repa = ALIGNERS["repa"].from_config(cfg, model, objective)
    assert repa.needs_pixels and repa.encoders["dinov2-vit-s"].num_tokens == T and repa.weight(1000) == 0.0
    assert repa.projectors[0][-1].out_features == 384
    assert all(k.startswith("projectors.") for k in repa.state_dict())  # the encoder is never checkpointed
    pixels = torch.randint(0, 256, (N, 3, 64, 64), dtype=torch.uint8)
    assert student_step(model, repa, pixels=pixels)[1]["loss"].shape == (N,)
    cached = ALIGNERS["repa"].from_config(cfg, model, objective, cached_targets={"dinov2-vit-s"})
    assert not cached.needs_pixels and cached.projectors[0][-1].out_features == 384
    fitting = ALIGNERS["repa"].from_config(cfg, model, objective, cached_targets={"dinov2-vit-s": (T, 384)})
    assert not fitting.needs_pixels
    for shape in ((T + 1, 384), (T, 768)):  # a cache made for another grid, or by another encoder width
        with pytest.raises(ConfigError, match="data.path.*do not fit"):
            ALIGNERS["repa"].from_config(cfg, model, objective, cached_targets={"dinov2-vit-s": shape})


def test_config_validation():
    with pytest.raises(ConfigError, match="align.repa.depth"):
        load_config(None, ["model.name=SiT-B/2", "align.methods=[repa]", "align.repa.depth=13"])
    with pytest.raises(ConfigError, match="align.repa.encoders"):
        load_config(None, ["align.methods=[repa]", "align.repa.encoders=[dinov3-vit-b]"])
    with pytest.raises(ConfigError, match="align.methods"):
        load_config(None, ["align.methods=[repa,repa]"])
    cfg = load_config(None, ["align.methods=[repa]"])
    repa = cfg.align.repa
    assert (repa.encoders, repa.coeff, repa.projector_dim) == (["dinov2-vit-b"], 0.5, 2048)
