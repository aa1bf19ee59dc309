"""Numeric precision contexts (gen.precision), sampler.precision, and regional torch.compile of the backbone."""
import pytest
import torch

from gen.config import ConfigError, load_config
from gen.models import build_model
from gen.precision import precision


def knobs():
    return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision


@pytest.fixture
def restore_knobs():
    before = knobs()
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


@pytest.mark.parametrize("kind, expected, autocast", [("fp32", "ieee", False), ("tf32", "tf32", False),
                                                      ("bf16", "tf32", True)])
def test_precision_sets_and_restores_the_switches(kind, expected, autocast, restore_knobs):
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"
    if kind == "fp32":
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"
    before = knobs()
    with precision(kind, "cpu"):
        assert knobs() == (expected, expected)
        assert torch.is_autocast_enabled("cpu") == autocast
        out = torch.ones(2, 2) @ torch.ones(2, 2)
        assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert knobs() == before and not torch.is_autocast_enabled("cpu")


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="fp16"):
        with precision("fp16", "cpu"):
            pass
    with pytest.raises(ConfigError, match="sampler.precision"):
        load_config("configs/quickstart.yaml", ["sampler.precision=fp16"])


def test_bf16_sampling_is_close_to_fp32():
    """sampler.precision reaches the network: bf16 differs from fp32 by bf16 rounding, not more."""
    from dataclasses import replace

    from gen.objectives import build_objective
    from gen.sampling.generate import generate
    from latents import build_latent

    cfg = load_config("configs/quickstart.yaml", ["model.dit.depth=2", "sampler.num_steps=4"])
    latent = build_latent(cfg)
    torch.manual_seed(0)
    from gen.models import build_backbone

    model = build_backbone(cfg, latent.shape)
    for p in model.parameters():  # adaLN-Zero starts at zero output: make the blocks matter
        p.data.add_(0.05 * torch.randn_like(p))
    objective = build_objective(cfg, model)
    noise = torch.randn(4, *latent.shape, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(4)
    fp32 = objective.sample(objective.model_fn(model), noise, labels, **objective.sample_options(cfg.sampler))
    runs = {}
    for kind in ("fp32", "bf16"):
        images = generate(model, objective, latent, labels, noise, replace(cfg.sampler, precision=kind))
        runs[kind] = images.float()
    assert torch.equal(runs["fp32"], latent.decode(fp32.float()).float())
    diff = (runs["bf16"] - runs["fp32"]).abs()
    assert 0 < diff.max() <= 16, diff.max()


@pytest.mark.slow
def test_compile_regions_matches_eager_and_keeps_parameter_names():
    """Regional compilation (one graph per block kind) computes what the eager model does, taps and early exits
    included, and leaves state_dict keys (checkpoints, EMA) unchanged."""
    torch.manual_seed(0)
    model = build_model("SiT-S/2", input_size=8, depth=3)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    keys = list(model.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    eager = model(x, t, y, taps=(2,))
    model.compile_regions()
    compiled = model(x, t, y, taps=(2,))
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(compiled.out, eager.out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled.feats[2], eager.feats[2], rtol=1e-4, atol=1e-5)
    early = model(x, t, y, taps=(1,), stop_at=1)
    assert early.out is None and early.feats[1].shape == (2, 16, 384)


def test_auto_mixed_precision_is_bf16_only_on_a_gpu(monkeypatch):
    from gen.precision import training_precision

    assert training_precision("fp16") == "fp16" and training_precision("no") == "no"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_precision("auto") == "no"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert training_precision("auto") == "bf16"
    with pytest.raises(ValueError, match="auto"):
        training_precision("fp8")


def test_compile_setting_null_compiles_on_a_gpu_only():
    """train.compile / sample.compile: null compiles on CUDA devices only; True/False as said (nothing runs here)."""
    model = build_model("SiT-S/2", input_size=8, depth=2)
    compiled = lambda: [m._compiled_call_impl is not None for m in (*model.blocks, model.final_layer)]  # noqa: E731
    assert not model.compile_regions_for(None, "cpu") and not any(compiled())
    assert not model.compile_regions_for(False, "cuda") and not any(compiled())
    assert model.compile_regions_for(None, "cuda") and all(compiled())
    assert model._compiled_call_impl is None  # the blocks, not the whole forward


def test_flush_denormals_zeroes_denormal_results_in_a_fresh_process():
    """A product below float32's smallest normal (1.2e-38) survives as a denormal until flush_denormals(), which every
    job calls first (in a fresh interpreter: the suite's own process already flushes, conftest.py)."""
    import subprocess
    import sys

    code = ("import torch; from gen.precision import flush_denormals; x = torch.tensor([1e-20]);"
            "print((x * x).item()); flush_denormals(); print((x * x).item())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert 0 < float(out[0]) < torch.finfo(torch.float32).tiny  # 1e-40: a denormal
    assert float(out[1]) == 0.0
