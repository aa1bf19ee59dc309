"""bench/vs_reference.py's our_train_step on a tiny model (no REPA checkout needed): it builds and trains; and
bench/profile_step.py's account of where that step's time goes."""
import importlib.util
from pathlib import Path

import pytest
import torch

TINY = ["model.dit.depth=2", "model.dit.hidden_size=32", "model.dit.num_heads=2", "align.repa.depth=1",
        "align.repa.projector_dim=16"]


def load_bench(name: str = "vs_reference"):
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
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


def test_profile_kinds_name_the_kernels_of_each_kind():
    kind_of = load_bench("profile_step").kind_of
    cases = {"aten::addmm": "matmul", "aten::mm": "matmul", "sm90_xmma_gemm_bf16bf16_bf16f32": "matmul",
             "nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT": "matmul", "cutlass3x_sm90_tensorop_gemm": "matmul",
             "flash_fwd_kernel": "attention", "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
             "aten::_fused_adamw_": "optimizer/EMA", "multi_tensor_apply_kernel": "optimizer/EMA",
             "aten::native_layer_norm": "normalisation", "Memcpy HtoD (Pageable -> Device)": "copies",
             "triton_poi_fused_add_mul_0": "fused/elementwise", "aten::gelu_backward": "fused/elementwise",
             "ncclDevKernel_AllReduce_Sum_f32": "communication", "some_new_kernel": "other"}
    assert {name: kind_of(name) for name in cases} == cases


def test_profile_step_accounts_for_the_step_time(fresh_accelerate, one_thread):
    row = load_bench("profile_step").profile_step("SiT-S/8", 2, "cpu", steps=1, warmup=1, overrides=TINY)
    assert sum(row["by_kind_ms"].values()) == pytest.approx(row["busy_ms"], rel=0.01)
    assert 0.3 < row["busy_share"] <= 1.05  # the CPU runs the ops' self times within the wall time
    assert row["by_kind_ms"]["matmul"] > 0 and row["by_kind_ms"]["optimizer/EMA"] > 0
    assert [t["ms"] for t in row["top"]] == sorted((t["ms"] for t in row["top"]), reverse=True)


def test_forward_flops_count_the_attention_of_every_block():
    """bench/models.py's count: without the CPU attention kernel's formula torch counts none of QK^T and AV; with it,
    each block adds 2 matmuls of T x T x D multiply-adds (2 FLOPs each) per image."""
    from torch.utils.flop_counter import FlopCounterMode

    from gen.models import build_model

    models = load_bench("models")
    net = build_model("SiT-S/8", input_size=32, depth=2, hidden_size=32, num_heads=2)
    x, t, y = torch.randn(1, net.in_channels, 32, 32), torch.rand(1), torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as plain, torch.no_grad():
        net(x, t, y)
    tokens = (32 // 8) ** 2
    assert models.forward_flops(net, 32) - plain.get_total_flops() == 2 * (2 * 2 * tokens * tokens * 32)
