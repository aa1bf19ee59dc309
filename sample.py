r"""Draw samples from a trained model across processes: ADM-layout .npz, a PNG grid, optional metrics.

    python sample.py runs/quickstart                                   # the run's latest checkpoint, its config
    accelerate launch --multi_gpu --num_processes 8 sample.py runs/sit-xl2 sample.num_samples=50000 \
        sampler.cfg_scale=1.8 sampler.cfg_interval=[0,0.7] sample.labels=balanced
    ... sample.metrics=[adm] eval.reference=VIRTUAL_imagenet256_labeled.npz eval.inception_weights=...pth \
        sample.write_images=false                                      # FID/sFID/IS/P-R streamed, no file

Sample i comes from its own generator seeded by (sample.seed, i), which draws its label (random
scheme), its initial noise and every SDE/DDPM noise it needs: the output is the same for any number of
processes and any batch size. Writes `arr_0` (uint8 N x H x W x 3) and `arr_1` (labels), plus a JSON
record of the protocol (sampler, guidance, label scheme, rounding) next to it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm import tqdm

from gen.checkpoint import CheckpointError, load_latent_state, resolve_weights
from gen.config import Config, choose, load_config, to_yaml
from gen.errors import DEBUG_HELP, one_line_errors
from gen.eval import SAMPLE_METRICS, build_suite, split_sample_metrics
from gen.io import JobLock, NpyWriter, atomic_write_text, check_writable_file, load_tensors
from gen.logging import save_grid
from gen.models import build_backbone
from gen.objectives import build_objective
from gen.precision import flush_denormals
from gen.sampling.generate import generate_indexed, sample_labels
from gen.text import sample_text
from latents import build_latent


def default_name(cfg: Config) -> str:
    """A file name recording the sampling protocol."""
    s, c = cfg.sampler, cfg.sample
    lo, hi = s.cfg_interval
    return (f"{s.sampler}{s.num_steps}-cfg{s.cfg_scale:g}-int{lo:g}-{hi:g}-{c.labels}-{c.rounding}"
            f"-n{c.num_samples}-seed{c.seed}")


def load_model(cfg: Config, ema_path: Path, latent, device) -> torch.nn.Module:
    """The configured backbone with the checkpoint's EMA weights, or one clear error when they do not fit."""
    model = build_backbone(cfg, latent.shape)
    try:
        model.load_state_dict(load_tensors(ema_path, "the run's EMA weights"), strict=True)
    except RuntimeError as err:
        detail = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise CheckpointError(f"{ema_path} does not fit the configured model ({cfg.model.name}): {detail}. Do not "
                              f"override model.* keys when sampling; the run's config.yaml describes the model"
                              ) from None
    model = model.to(device).eval()
    model.compile_regions_for(cfg.sample.compile, device)
    return model


def main(argv: list[str] | None = None) -> Path:
    """Command-line entry point; returns the .npz path."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", help="run folder (its latest checkpoint) or a checkpoints/step-* folder")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the run's config")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = parser.parse_args(argv)
    flush_denormals()  # CPU arithmetic: denormals to zero (gen.precision)
    with one_line_errors(args.debug):  # an expected failure ends in one line `error: ...` (traceback: --debug)
        return run(args.weights, args.overrides)


def run(weights: str, overrides: list[str]) -> Path:
    """Validate everything (config, weights, reference, output folder), then draw under the output's lock."""
    ema_path, cfg_path = resolve_weights(weights)
    cfg = load_config(cfg_path, overrides)
    if not choose("objective", cfg.objective.name, "objective.name").GENERATIVE:
        raise CheckpointError(f"{weights} is a stage-1 run of objective {cfg.objective.name!r}: it has nothing to "
                              f"sample; name it in a stage-2 config (latent.binary.weights={weights}) and sample that")
    modality = choose("latent", cfg.latent.name, "latent.name").modality
    streamed, after = split_sample_metrics(cfg.sample.metrics, modality)
    s = cfg.sample
    out = Path(s.out) if s.out else ema_path.parent.parent.parent / "samples" / f"{default_name(cfg)}.npz"
    check_writable_file(out, "sample.out")

    accelerator = Accelerator()
    device = accelerator.device
    latent = build_latent(cfg).load_weights(device)  # a missing VAE fails before anything is written
    load_latent_state(ema_path.parent, latent)
    model = load_model(cfg, ema_path, latent, device)
    objective = build_objective(cfg, model).load_weights(device)
    text = sample_text(cfg, device)  # text runs: sample.captions encoded (a missing encoder fails here)
    # Inception weights and eval.reference's keys are checked here, before any sampling pass.
    suite = build_suite(streamed, cfg.eval, device, latent.modality) if streamed else None
    with JobLock(accelerator, out.parent, "sample.py", f".{out.stem}.lock"):  # one writer per output
        return draw(accelerator, cfg, ema_path, model, objective, latent, suite, out, after, text)


def draw(accelerator, cfg: Config, ema_path: Path, model, objective, latent, suite, out: Path,
         after: list[str], text=None) -> Path:
    """Draw this process's samples into a part file, then (main process) write the outputs of `out`; the part
    files' folder `.tmp-<name>` is removed however the job ends."""
    tmp_dir = out.parent / f".tmp-{out.stem}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        _draw(accelerator, cfg, ema_path, model, objective, latent, suite, out, tmp_dir, after, text)
    finally:
        if accelerator.is_main_process:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return out


def _draw(accelerator, cfg: Config, ema_path: Path, model, objective, latent, suite, out: Path, tmp_dir: Path,
          after: list[str], text=None) -> None:
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    s = cfg.sample
    labels = sample_labels(s.num_samples, cfg.cond.num_classes, s.labels, s.seed)
    mine = np.arange(rank, s.num_samples, world)  # this process's global indices
    part = None
    bar = tqdm(total=len(mine), disable=not accelerator.is_main_process, desc="sample")
    batches = generate_indexed(model, objective, latent, cfg.sampler, labels, mine, s.seed, s.batch_per_process,
                               s.rounding, device, text)
    for idx, samples in batches:
        if suite is not None:
            suite.update(samples, torch.as_tensor(idx))
        bar.update(len(idx))
        if not s.write_images:
            continue
        rows = latent.to_storage(samples)  # images: NHWC uint8, as the ADM evaluator reads them
        if part is None:  # plain writes: a full disk raises OSError naming the file (a memory map: SIGBUS)
            part = NpyWriter(tmp_dir / f"part-{rank}.npy", (len(mine), *rows.shape[1:]), rows.dtype)
        part.write(rows)
    bar.close()
    if part is not None:
        part.close()
    scores = {"metrics": suite.compute(), "metrics_protocol": suite.protocol()} if suite is not None else {}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_outputs(cfg, latent, out, tmp_dir, world, labels, ema_path, scores, after)


def write_outputs(cfg: Config, latent, out: Path, tmp_dir: Path, world: int, labels: np.ndarray, ema_path: Path,
                  scores: dict, after: list[str]) -> None:
    """Interleave the processes' parts into global index order, write .npz (atomically), grid, metrics, record."""
    record = {"checkpoint": str(ema_path.parent), "num_samples": cfg.sample.num_samples,
              "labels": cfg.sample.labels, "rounding": cfg.sample.rounding, "seed": cfg.sample.seed,
              "sampler": dataclasses.asdict(cfg.sampler),  # every sampling key (Heun's guidance rule, precision)
              **scores}
    if cfg.sample.write_images:
        record.update(write_samples(cfg, latent, out, tmp_dir, world, labels, after))
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=1))
    measured = {k: record[k] for k in ("metrics", *after) if k in record}
    if measured:
        atomic_write_text(out.parent / "metrics.json", json.dumps({**measured, "protocol": record}, indent=1))
        print(json.dumps(measured, indent=1))
    atomic_write_text(out.parent / f"{out.stem}.config.yaml", to_yaml(cfg))


def write_samples(cfg: Config, latent, out: Path, tmp_dir: Path, world: int, labels: np.ndarray,
                  after: list[str]) -> dict:
    """The processes' rows in global index order, saved by the latent space (images: ADM .npz), the grid, and
    the SAMPLE_METRICS computed on all samples."""
    n = cfg.sample.num_samples
    parts = [np.load(tmp_dir / f"part-{r}.npy", mmap_mode="r") for r in range(world) if r < n]
    writer = NpyWriter(tmp_dir / "all.npy", (n, *parts[0].shape[1:]), parts[0].dtype)
    block = world * max(1, 4096 // world)  # global indices per write, a multiple of the world size
    for start in range(0, n, block):
        rows = np.empty((min(block, n - start), *parts[0].shape[1:]), parts[0].dtype)
        for r, part in enumerate(parts):  # process r drew indices r, r + world, ...
            mine = rows[r::world]
            mine[:] = part[start // world:start // world + len(mine)]
        writer.write(rows)
    full = np.load(writer.close(), mmap_mode="c")  # copy-on-write: writable in memory, the file untouched
    latent.save_samples(out, full, labels)
    grid = save_grid(latent.render(latent.from_storage(full[:cfg.sample.grid_num])), out.with_suffix(".png"))
    record = {"npz": str(out), "grid": str(grid)}
    decoded = latent.from_storage(full) if after else None  # once for all metrics (meshes: marching cubes each)
    for name in after:
        record[name] = SAMPLE_METRICS[latent.modality][name](decoded, torch.from_numpy(labels), cfg)
    print(f"wrote {out} ({len(full)} samples), grid {grid}")
    return record


if __name__ == "__main__":
    main()
