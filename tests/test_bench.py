"""bench/vs_reference.py's our_train_step on a tiny model (no REPA checkout needed): it builds and trains."""
import importlib.util
from pathlib import Path

import torch

TINY = ["model.dit.depth=2", "model.dit.hidden_size=32", "model.dit.num_heads=2", "align.repa.depth=1",
        "align.repa.projector_dim=16"]


def load_bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "vs_reference.py"
    spec = importlib.util.spec_from_file_location("vs_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_our_train_step_runs_train_py_step_on_a_tiny_model(fresh_accelerate, one_thread):
    bench = load_bench()
    step = bench.our_train_step("SiT-S/8", 2, "cpu", "fp32", "cached", overrides=TINY)
    before = [p.detach().clone() for p in step.model.parameters()]
    times = bench.interleave({"ours": step}, iters=1, warmup=1)
    assert len(times["ours"]) == 1 and step.step == 2
    assert any(not torch.equal(a, p) for a, p in zip(before, step.model.parameters()))
    assert step.first_bad.item() < 0 and all(v == v for v in step.meters.pop().values())  # finite, no NaN
