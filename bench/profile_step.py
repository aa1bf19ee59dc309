"""Where a training step's time goes: torch.profiler over a few of our real steps, kernels grouped by kind.

    python bench/profile_step.py --model SiT-XL/2 --batch 128 --compile     # one GPU: what bounds images/s
    python bench/profile_step.py --model SiT-S/2 --batch 4                  # CPU: the same table for the CPU's ops

The step is bench.vs_reference.our_train_step (train.py's loop body: Trainee under Accelerate, fused AdamW, clip
1.0, foreach EMA; bf16 autocast on a GPU), + REPA on cached targets unless --plain. Prints and returns, per step: the
wall time, the time the device was busy (the sum of kernel times: a GPU far below the wall time waits on the host),
the time by kind (matmul, attention, fused/elementwise, normalisation, optimizer/EMA, copies, communication,
other) and the top kernels. bench/gpu_suite.py records it as its `profile_*` item, so one call on a GPU says what
to optimise next.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run as bench/profile_step.py

from bench.vs_reference import our_train_step  # noqa: E402

KINDS = (  # (kind, pattern on the kernel or op name), first match wins
    ("communication", r"nccl|all_?reduce|all_?gather|broadcast"),
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("matmul", r"gemm|matmul|\bmm\b|addmm|bmm|cutlass|nvjet|xmma|sm\d+_|cublas|linear|mkldnn_|onednn"),
    ("optimizer/EMA", r"adam|multi_tensor|foreach|lerp"),
    ("normalisation", r"layer_norm|layernorm|native_layer_norm|rms_norm|norm_"),
    ("copies", r"memcpy|memset|copy|contiguous|\bcat\b|to_copy|clone|fill"),
    ("fused/elementwise", r"triton|elementwise|vectorized|reduce|gelu|silu|mul|add|div|exp|pow|where|sum|mean"),
)


def kind_of(name: str) -> str:
    """The kind of a kernel or op by its name (KINDS, first match), else "other"."""
    low = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, low)), "other")


def _device_events(prof, device: torch.device) -> list[tuple[str, float]]:
    """(name, self time in seconds, summed over the profiled steps) of the device's kernels (GPU) or of the leaf ops
    (CPU: an op's self time excludes its children, so nothing is counted twice). On the GPU, user annotations
    (record_function ranges such as `Optimizer.step#AdamW.step`) span kernels already counted: left out, as torch's
    own table leaves them out of its device total."""
    rows = []
    for evt in prof.key_averages():
        if device.type == "cuda":
            sec = evt.self_device_time_total * 1e-6
            if evt.device_type != torch.autograd.DeviceType.CUDA or evt.is_user_annotation:
                continue
        else:
            sec = evt.self_cpu_time_total * 1e-6
        if sec > 0:
            rows.append((evt.key, sec))
    return rows


def profile_step(model: str, batch: int, device, compile: bool = False, repa: bool = True, steps: int = 3,
                 warmup: int = 3, top: int = 15, overrides=()) -> dict:
    """Profile `steps` of our training step after `warmup` unprofiled ones; figures per step (ms) and shares.
    `overrides`: extra config overrides (a tiny model)."""
    precision = "bf16" if torch.device(device).type == "cuda" else "fp32"
    device = torch.device(device)
    step = our_train_step(model, batch, device, precision, targets="cached", compile=compile,
                          overrides=(*overrides, *(() if repa else ("align.methods=[]",))))
    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = (time.perf_counter() - t0) / steps
    events = _device_events(prof, device)
    busy = sum(sec for _, sec in events) / steps
    by_kind: dict[str, float] = {}
    for name, sec in events:
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + sec / steps
    ms = lambda sec: round(1e3 * sec, 2)  # noqa: E731
    return {
        "model": model, "batch": batch, "repa": repa, "compiled": compile, "precision": precision,
        "wall_ms": ms(wall), "busy_ms": ms(busy), "busy_share": round(busy / wall, 3) if wall else None,
        "by_kind_ms": {k: ms(v) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top": [{"name": name[:100], "ms": ms(sec / steps), "kind": kind_of(name)}
                for name, sec in sorted(events, key=lambda e: -e[1])[:top]],
    }


def format_profile(row: dict) -> str:
    """The profile as text: wall and busy time, then time by kind, then the top kernels."""
    busy = row["busy_ms"]
    lines = [f"{row['model']} batch {row['batch']} {'+ REPA ' if row['repa'] else ''}{row['precision']}"
             f"{' compiled' if row['compiled'] else ''}: {row['wall_ms']} ms a step, device busy {busy} ms "
             f"({row['busy_share']:.0%})"]
    lines += [f"  {kind:<18} {v:9.2f} ms  {v / busy:6.1%}" for kind, v in row["by_kind_ms"].items()]
    lines += ["  top:"] + [f"  {t['ms']:9.2f} ms  {t['kind']:<18} {t['name']}" for t in row["top"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SiT-XL/2")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="regional torch.compile (train.compile)")
    parser.add_argument("--plain", action="store_true", help="no REPA (align.methods=[])")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    row = profile_step(args.model, args.batch, device, args.compile, not args.plain, args.steps)
    print(format_profile(row))
    if args.json:
        args.json.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
