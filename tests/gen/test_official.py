"""Official DiT / SiT / REPA files: synthetic state dicts with the published key names and shapes."""
import argparse

import pytest
import torch

from gen.models import build_model
from gen.models.official import OUTPUT_SIGN, build_official, fit_head, flip_time, load_official, to_official
from gen.objectives.flow import _ERRORS, PATHS
from helpers import randomize

DEPTH, D, P, C, CLASSES, INPUT = 4, 32, 2, 4, 10, 8


def official_shapes(out_channels, qk_norm=False, projector_dims=(), legacy_depth=None, heads=2):
    """The key -> shape list of the official checkpoints (DiT models.py, SiT models.py, REPA models/sit.py; written
    by hand, not from our model)."""
    t = (INPUT // P) ** 2
    shapes = {
        "pos_embed": (1, t, D),
        "x_embedder.proj.weight": (D, C, P, P), "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (CLASSES + 1, D),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
        "final_layer.linear.weight": (P * P * out_channels, D), "final_layer.linear.bias": (P * P * out_channels,),
    }
    for i in range(DEPTH):
        name = f"blocks.{i}" if legacy_depth is None or i < legacy_depth else f"decoder_blocks.{i - legacy_depth}"
        shapes.update({
            f"{name}.attn.qkv.weight": (3 * D, D), f"{name}.attn.qkv.bias": (3 * D,),
            f"{name}.attn.proj.weight": (D, D), f"{name}.attn.proj.bias": (D,),
            f"{name}.mlp.fc1.weight": (4 * D, D), f"{name}.mlp.fc1.bias": (4 * D,),
            f"{name}.mlp.fc2.weight": (D, 4 * D), f"{name}.mlp.fc2.bias": (D,),
            f"{name}.adaLN_modulation.1.weight": (6 * D, D), f"{name}.adaLN_modulation.1.bias": (6 * D,),
        })
        if qk_norm:
            for q in ("q_norm", "k_norm"):
                shapes.update({f"{name}.attn.{q}.weight": (D // heads,), f"{name}.attn.{q}.bias": (D // heads,)})
    for k, z in enumerate(projector_dims):
        shapes.update({f"projectors.{k}.0.weight": (2048, D), f"projectors.{k}.0.bias": (2048,),
                       f"projectors.{k}.2.weight": (2048, 2048), f"projectors.{k}.2.bias": (2048,),
                       f"projectors.{k}.4.weight": (z, 2048), f"projectors.{k}.4.bias": (z,)})
    return shapes


def random_state(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}


def training_ckpt(model_state, ema_state, **extra):
    return {"model": model_state, "ema": ema_state, "opt": {"state": {}, "param_groups": []},
            "args": argparse.Namespace(model="SiT-S/2", encoder_depth=2, lr=1e-4), **extra}


def tiny(name, **kw):
    return build_model(name, depth=DEPTH, hidden_size=D, num_heads=2, input_size=INPUT, num_classes=CLASSES, **kw)


def test_dit_bare_file_loads_strictly(tmp_path):
    state = random_state(official_shapes(out_channels=8), 0)
    torch.save(state, tmp_path / "DiT-tiny.pt")
    weights = load_official(tmp_path / "DiT-tiny.pt", "dit")
    model = tiny("DiT-S/2")
    model.load_state_dict(weights.sampling_state, strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert weights.ema is None and weights.aligner == {}


def test_dit_training_checkpoint_prefers_ema_and_keeps_args(tmp_path):
    online, ema = (random_state(official_shapes(out_channels=8), s) for s in (1, 2))
    torch.save(training_ckpt(online, ema), tmp_path / "0050000.pt")
    weights = load_official(tmp_path / "0050000.pt", "dit")
    assert weights.args == {"model": "SiT-S/2", "encoder_depth": 2, "lr": 1e-4}
    assert torch.equal(weights.sampling_state["pos_embed"], ema["pos_embed"])
    assert torch.equal(weights.model["pos_embed"], online["pos_embed"])


def test_repa_checkpoint_splits_projectors_and_round_trips(tmp_path):
    shapes = official_shapes(out_channels=4, qk_norm=True, projector_dims=(24,))
    online, ema = random_state(shapes, 3), random_state(shapes, 4)
    torch.save(training_ckpt(online, ema, steps=400000), tmp_path / "0400000.pt")
    model, weights = build_official(tmp_path / "0400000.pt", "repa", num_heads=2)
    assert model.out_channels == 4 and weights.steps == 400000
    assert set(weights.aligner) == {k for k in shapes if k.startswith("projectors.")}
    back = to_official(model.state_dict(), "repa")  # the EMA backbone, round-tripped
    assert set(back) | set(weights.aligner) == set(ema)
    assert all(torch.equal(back[k], ema[k]) for k in back)
    assert all(torch.equal(v, online[k]) for k, v in weights.aligner.items())  # training continues online


def test_repa_legacy_blocks_are_renamed(tmp_path):
    legacy = random_state(official_shapes(out_channels=4, legacy_depth=2), 5)
    torch.save(training_ckpt(legacy, legacy), tmp_path / "legacy.pt")
    weights = load_official(tmp_path / "legacy.pt", "repa")  # encoder_depth=2 comes from the pickled args
    for j in range(DEPTH - 2):
        assert torch.equal(weights.model[f"blocks.{j + 2}.attn.qkv.weight"],
                           legacy[f"decoder_blocks.{j}.attn.qkv.weight"])
    tiny("SiT-S/2").load_state_dict(weights.model, strict=True)
    torch.save(legacy, tmp_path / "bare_legacy.pt")
    with pytest.raises(ValueError, match="encoder_depth"):
        load_official(tmp_path / "bare_legacy.pt", "repa")


def test_sit_file_is_converted_to_our_time_direction(tmp_path):
    """Converted weights compute v(x, t, y) = -f_SiT(x, 1 - t, y)[:, :4] with the plain forward."""
    sit_state = random_state(official_shapes(out_channels=8), 6)
    torch.save({"model": sit_state, "ema": sit_state, "args": {}}, tmp_path / "SiT.pt")
    sit_net = tiny("SiT-S/2", learn_sigma=True)
    sit_net.load_state_dict(sit_state)  # the SiT repo's network, its own time convention
    ours, _ = build_official(tmp_path / "SiT.pt", "sit", learn_sigma=False, num_heads=2)
    x, t, y = torch.randn(3, C, INPUT, INPUT), torch.tensor([0.0, 0.37, 1.0]), torch.tensor([1, 2, CLASSES])
    expected = -sit_net(x, 1 - t, y).out[:, :C]
    torch.testing.assert_close(ours(x, t, y).out, expected, rtol=1e-4, atol=1e-5)
    assert ours.out_channels == C
    back = to_official(flip_time(sit_state), "sit")  # the flip is an involution
    for k in sit_state:
        torch.testing.assert_close(back[k], sit_state[k], rtol=0, atol=1e-6)


def test_sit_output_signs_follow_the_transport_targets():
    """SiT transport/transport.py training_losses on its Linear path (time s, s = 1 data, x0 = noise, x1 = data):
    velocity target x1 - x0, noise target x0, score target -x0 / sigma_s with sigma_s = 1 - s. Ours at t = 1 - s
    (the regression errors of gen.objectives.flow, zero at the target): the velocity is negated, noise and score
    are the same tensors, which is what OUTPUT_SIGN folds into the head."""
    g = torch.Generator().manual_seed(0)
    data, noise = torch.randn(2, 3, C, 4, 4, generator=g, dtype=torch.float64)
    s = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64).view(-1, 1, 1, 1)
    sit_targets = {"velocity": data - noise, "noise": noise, "score": -noise / (1 - s)}
    c = PATHS["linear"]().coefficients((1 - s).flatten(), data)
    for kind, sign in OUTPUT_SIGN.items():
        ours = sign * sit_targets[kind]
        torch.testing.assert_close(_ERRORS[kind](ours, data, noise, c), torch.zeros_like(data), rtol=0, atol=1e-12)
    assert OUTPUT_SIGN == {"velocity": -1, "noise": 1, "score": 1}


@pytest.mark.parametrize("prediction,sign", [("velocity", -1), ("noise", 1), ("score", 1)])
def test_sit_training_checkpoint_keeps_the_sign_of_noise_and_score(tmp_path, prediction, sign):
    """A SiT training checkpoint with args.prediction: only a velocity flips its sign under t -> 1 - t."""
    sit_state = random_state(official_shapes(out_channels=8), 9)
    args = argparse.Namespace(model="SiT-S/2", path_type="Linear", prediction=prediction)
    torch.save({"model": sit_state, "ema": sit_state, "opt": {}, "args": args}, tmp_path / "0100000.pt")
    sit_net = tiny("SiT-S/2", learn_sigma=True)
    sit_net.load_state_dict(sit_state)
    ours, weights = build_official(tmp_path / "0100000.pt", "sit", learn_sigma=False, num_heads=2)
    x, t, y = torch.randn(3, C, INPUT, INPUT), torch.tensor([0.1, 0.5, 0.8]), torch.tensor([0, 4, CLASSES])
    torch.testing.assert_close(ours(x, t, y).out, sign * sit_net(x, 1 - t, y).out[:, :C], rtol=1e-4, atol=1e-5)
    back = to_official(weights.ema, "sit", prediction)
    for k in sit_state:
        torch.testing.assert_close(back[k], sit_state[k], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="prediction"):
        flip_time(sit_state, "x0")


def test_fit_head_keeps_the_first_channels_of_each_pixel():
    torch.manual_seed(7)
    wide = randomize(tiny("SiT-S/2", learn_sigma=True))
    narrow = tiny("SiT-S/2")
    narrow.load_state_dict(fit_head(wide.state_dict(), narrow.out_channels), strict=True)
    x, t, y = torch.randn(2, C, INPUT, INPUT), torch.rand(2), torch.tensor([0, 3])
    torch.testing.assert_close(narrow(x, t, y).out, wide(x, t, y).out[:, :C])
    with pytest.raises(ValueError, match="output channels"):
        fit_head(narrow.state_dict(), 8)


def test_wrong_architecture_and_missing_file_are_refused(tmp_path):
    state = random_state(official_shapes(out_channels=8), 8)
    torch.save(state, tmp_path / "dit.pt")
    weights = load_official(tmp_path / "dit.pt", "dit")
    with pytest.raises(RuntimeError, match="size mismatch"):
        build_model("DiT-S/2", depth=DEPTH, hidden_size=2 * D, num_heads=2, input_size=INPUT,
                    num_classes=CLASSES).load_state_dict(weights.model)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_official(tmp_path / "nope.pt", "dit")
    with pytest.raises(KeyError, match="dit"):
        load_official(tmp_path / "dit.pt", "ditt")
