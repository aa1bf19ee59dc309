"""Train a DiT/SiT backbone under Hugging Face Accelerate.

    python train.py configs/quickstart.yaml                       # CPU, one process
    accelerate launch train.py configs/sit_xl2.yaml data.path=...  # 1..N GPUs, 1..M nodes
    python train.py configs/quickstart.yaml --resume              # continue the exact trajectory
    python train.py --help-config                                 # every config key with its meaning

Randomness (time, noise, condition dropout, posterior samples, flips) is drawn for the whole global batch
from a generator seeded by (seed, step) and each process takes its slice of each micro-step (gen.step), so a
run does not depend on the number of processes or accumulation steps, and a resumed run continues bit for bit.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections import deque
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from torch.utils.data import DataLoader
from tqdm import tqdm

from gen.checkpoint import check_resumable, latest_checkpoint, load_checkpoint, read_train_state, save_checkpoint
from gen.cond import Conditioning
from gen.config import Config, ConfigError, describe, load_config, save_config
from gen.data import DistributedBatchSampler, LatentCacheDataset, build_dataset
from gen.ema import EMA
from gen.errors import DEBUG_HELP, NonFiniteLoss, one_line_errors
from gen.eval import build_suite
from gen.io import JobLock, LockHeld, check_writable
from gen.logging import RunningMeans, append_jsonl, make_grid, save_grid, truncate_jsonl
from gen.models import build_backbone
from gen.precision import flush_denormals, training_precision
from gen.objectives import build_objective
from gen.sampling.generate import generate, generate_indexed, sample_labels
from gen.step import StepDraws, Trainee, build_aligners, model_inputs
from latents import build_latent


DIVERGENCE_WINDOW = 20
"""The divergence guard compares the logged denoising loss (the objective's, >= 0) with the median of the last 20
logged ones, the first of them the run's first micro-batch's (so a loss that explodes within the first log interval
is caught too). Warmup phases without a denoising loss are not guarded."""


def check_divergence(loss: float, history: deque, first_loss, factor: float, step: int, last_ckpt,
                     accelerator) -> None:
    """Raise NonFiniteLoss when the logged denoising loss exceeds `factor` x the median of `history` (seeded with
    `first_loss`, this run's first micro-batch's, averaged over processes); then record `loss` in it."""
    if not history:
        history.append(accelerator.reduce(first_loss.view(1), reduction="mean").item())
    recent = sorted(history)
    median = recent[len(recent) // 2]
    if loss > factor * median:
        raise NonFiniteLoss(
            f"diverging denoising loss at step {step}: {loss:.4g}, over train.divergence_factor={factor:g} x the "
            f"median {median:.4g} of the {len(recent)} before it (the first micro-batch's, then the logged ones); "
            f"last good checkpoint: {last_ckpt or 'none'}. Lower train.lr, enable train.grad_clip or use "
            f"train.mixed_precision=bf16, then resume from that checkpoint.")
    history.append(loss)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """CONFIG.yaml (optional) followed by dotted key=value overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="*", help="[CONFIG.yaml] [key=value ...]")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of train.run_dir")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    ns = parser.parse_args(argv)
    ns.config = ns.args[0] if ns.args and "=" not in ns.args[0] else None
    ns.overrides = ns.args[1:] if ns.config else ns.args
    return ns


def optimizer_settings(cfg: Config) -> dict:
    """AdamW's hyperparameters from train.*: used to build the optimizer and re-applied on --resume, so a resumed
    run trains with the values its config (recorded in every later checkpoint) states."""
    t = cfg.train
    return dict(lr=t.lr, betas=tuple(t.betas), eps=t.adam_eps, weight_decay=t.weight_decay)


def learning_rate(cfg: Config, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based): train.lr after a linear train.lr_warmup_steps warm-up."""
    t = cfg.train
    return t.lr if step >= t.lr_warmup_steps else t.lr * (step + 1) / t.lr_warmup_steps


def make_optimizer(params: list[torch.nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    """AdamW over `params`, fused kernels where the device supports them."""
    kwargs = optimizer_settings(cfg)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except RuntimeError:  # a device without fused AdamW kernels
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def prepare_step(accelerator, trainee, phase: str, step: int, cfg: Config,
                 optimizer=None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """(Re)wrap the Trainee with Accelerate for what it trains and computes at `step` of `phase`.

    Without `optimizer` a fresh one is built over the phase's parameters (a run's start, ERW's transition: ERW train.py
    resets it); with one, its state is kept and only the model is re-wrapped, so DDP forgets the parameters
    of aligners switched off for good (their stop_step), which are then no longer computed.
    """
    module = accelerator.unwrap_model(trainee, keep_fp32_wrapper=False)  # also drops the autocast forward wrapper
    accelerator.free_memory()  # forget the previously wrapped model and optimizer
    if optimizer is None:  # backbone and aligner heads; frozen encoders are not parameters
        optimizer = make_optimizer(module.phase_parameters(phase), cfg)
    module.set_phase(phase, module.active_at(step))
    return accelerator.prepare(module, getattr(optimizer, "optimizer", optimizer))  # unwrapped if prepared


def preview(accelerator, ema: EMA, objective, latent, cfg: Config, step: int, cond) -> None:
    """EMA samples for fixed noise and conditions `cond` (Conditioning.preview), as a PNG grid (and in TensorBoard)."""
    if not accelerator.is_main_process:
        return
    n = cfg.log.preview_num
    g = torch.Generator(device=accelerator.device).manual_seed(cfg.train.seed)
    noise = objective.prior(latent.shape, g, n=n, device=accelerator.device)
    images = latent.render(generate(ema.model, objective, latent, cond, noise, cfg.sampler, generator=g))
    path = save_grid(images, Path(cfg.train.run_dir) / "previews" / f"step-{step:08d}.png")
    if cfg.log.tracker == "tensorboard":
        accelerator.get_tracker("tensorboard").log_images({"preview": make_grid(images)}, step=step,
                                                          dataformats="HWC")
    tqdm.write(f"preview: {path}")


def track_fid(suite, ema: EMA, objective, latent, cfg: Config, world: int, rank: int, device) -> float:
    """FID-k of the EMA model: k samples split over the processes (random labels, per-sample seeds), streamed."""
    log = cfg.log
    scfg = dataclasses.replace(cfg.sampler, num_steps=log.fid_num_steps or cfg.sampler.num_steps)
    labels = sample_labels(log.fid_num_samples, cfg.cond.num_classes, "random", cfg.train.seed)
    suite.reset()
    for idx, images in generate_indexed(ema.model, objective, latent, scfg, labels,
                                        range(rank, log.fid_num_samples, world), cfg.train.seed,
                                        cfg.sample.batch_per_process, cfg.sample.rounding, device):
        suite.update(images, torch.as_tensor(idx))
    return suite.compute()["fid"]


def train(cfg: Config, resume: bool = False) -> Path:
    """Run (or continue) training as configured; returns the last checkpoint's folder."""
    t = cfg.train
    run_dir = Path(t.run_dir)
    accelerator = Accelerator(
        mixed_precision=training_precision(t.mixed_precision),
        gradient_accumulation_steps=t.grad_accum_steps,
        log_with=None if cfg.log.tracker == "none" else cfg.log.tracker,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    )
    world = accelerator.num_processes
    per_step = world * t.grad_accum_steps
    if t.global_batch_size % per_step:
        raise ConfigError(f"config key 'train.global_batch_size': {t.global_batch_size} is not divisible by "
                          f"{world} processes x {t.grad_accum_steps} accumulation steps")
    n = t.global_batch_size // per_step  # images per micro-batch on each process
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; drop --resume to start anew")
    if ckpt is not None and read_train_state(ckpt)["step"] >= t.max_steps:
        accelerator.print(f"{run_dir} is finished: its checkpoint {ckpt.name} is at step "
                          f"{read_train_state(ckpt)['step']} >= train.max_steps={t.max_steps}; raise train.max_steps "
                          f"to train further")
        return ckpt
    if not resume and latest_checkpoint(run_dir) is not None:
        raise FileExistsError(f"{run_dir} already holds checkpoints: pass --resume to continue it, or choose a new "
                              f"train.run_dir")
    if ckpt is not None:
        check_resumable(ckpt, cfg)  # keys that may not change on resume, before anything is built
    check_writable(run_dir, "train.run_dir")
    lock = JobLock(accelerator, run_dir, "train.py")  # one writer per run directory, taken before the first write
    try:
        return _train(accelerator, cfg, ckpt, n, lock)
    finally:
        lock.release()


def _train(accelerator, cfg: Config, ckpt: Path | None, n: int, lock: JobLock) -> Path:
    """The training loop of `train`: `ckpt` to resume from, `n` items per micro-batch, the run directory's lock
    to take once everything is validated and built, before anything is written."""
    t = cfg.train
    run_dir = Path(t.run_dir)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = t.allow_tf32

    latent = build_latent(cfg)
    dataset = build_dataset(cfg, split="train")
    if isinstance(dataset, LatentCacheDataset) and dataset.latent_state:
        latent.load_state_dict(dataset.latent_state)  # statistics prepare.py fitted (a checkpoint's win on resume)
    if cfg.log.preview_every_steps or not isinstance(dataset, LatentCacheDataset):
        latent.load_weights(device)  # a missing VAE fails here, before anything is written
    torch.manual_seed(t.seed)  # identical initialisation on every process
    model = build_backbone(cfg, latent.shape).to(device)
    ema = EMA(model, t.ema_decay)
    conditioning = Conditioning.from_config(cfg)
    objective = build_objective(cfg, model).load_weights(device)
    cached = getattr(dataset, "feature_shapes", {})  # encoder features stored by prepare.py: no encoder runs for them
    aligners = build_aligners(cfg, model, objective, cached_targets=cached)  # (shapes checked against the backbone)
    trainee = module = Trainee(model, objective, aligners, teacher=ema.model).to(device)  # the EMA: SRA's teacher
    missing = module.missing_targets(cached)
    if missing and isinstance(dataset, LatentCacheDataset):
        raise ConfigError(f"config key 'align.methods': {cfg.align.methods} need targets of {missing}, which the "
                          f"latent cache {cfg.data.path} does not hold (it has {list(cached)}); re-run prepare.py with "
                          f"data.cache_features={missing}, or train from data.name=image_folder")
    if module.summary():
        accelerator.print(module.summary())
    model.compile_regions_for(t.compile, device)  # in place: parameter names (checkpoints, EMA) stay as they are
    # A checkpoint holds the optimizer of the phase that wrote it; a transition due at its step happens after loading.
    saved = read_train_state(ckpt) if ckpt is not None else {"step": 0}
    step = saved["step"]
    phase = saved.get("phase", module.phase_at(max(step - 1, 0)))
    if phase == "full" and module.phase_at(step) == "warmup":
        raise ConfigError(f"config key 'align.{module.warm}.warmup_steps': checkpoint {ckpt} is past the warmup, "
                          f"which this config would resume at step {step}; keep the run's value")
    trainee, optimizer = prepare_step(accelerator, trainee, phase, step, cfg)
    fid_suite = build_suite(["fid"], cfg.eval, device, latent.modality) if cfg.log.fid_every_steps else None

    lock.acquire()
    if latest_checkpoint(run_dir) != ckpt:  # another job wrote a checkpoint after this one looked
        raise LockHeld(f"{run_dir} changed while this job started: its latest checkpoint is now "
                       f"{latest_checkpoint(run_dir)}, not {ckpt}; start the job again")
    state = {"step": 0}
    if ckpt is not None:
        state = load_checkpoint(accelerator, ckpt, ema, cfg, latent)
        for group in optimizer.param_groups:  # the config's values, not those the checkpoint was written with
            group.update(optimizer_settings(cfg))
        if accelerator.is_main_process:  # steps logged after the checkpoint are logged again from it
            truncate_jsonl(run_dir / "logs" / "scalars.jsonl", state["step"])
        accelerator.print(f"resumed from {ckpt} at step {state['step']}")
    elif accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    if cfg.log.tracker != "none":
        accelerator.init_trackers("train")
    step = state["step"]

    sampler = DistributedBatchSampler(len(dataset), t.global_batch_size, world, rank, t.grad_accum_steps, t.seed)
    sampler.load_state_dict(sampler.position(step))
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=cfg.data.num_workers > 0)
    batches = iter(loader)
    meters = RunningMeans()
    first_bad = torch.full((), -1.0, device=device)  # first non-finite (step * accum + micro), kept on device
    history: deque[float] = deque(maxlen=DIVERGENCE_WINDOW)  # logged losses, for the divergence guard
    first_loss = None  # this run's first micro-batch denoising loss, on the device until the first log
    last_ckpt = ckpt
    bar = tqdm(total=t.max_steps, initial=step, disable=not accelerator.is_main_process, desc="train")
    accelerator.print(f"{sum(p.numel() for p in model.parameters()):,} parameters, {len(dataset):,} items, "
                      f"{world} process(es) x {n} per micro-batch x {t.grad_accum_steps} accumulation")
    while step < t.max_steps:
        if module.phase != module.phase_at(step):  # end of a warmup phase: fresh optimizer, EMA from the warm weights
            module.end_warmup(torch.Generator().manual_seed(t.seed))  # same on every process
            trainee, optimizer = prepare_step(accelerator, trainee, module.phase_at(step), step, cfg)
            ema.reset(model)  # as ERW's reference (LINs-lab/ERW train.py) restarts it
            accelerator.print(f"step {step}: warmup done, training the whole model")
        elif module.active != module.active_at(step):  # an aligner reached its stop_step: stop computing it
            stopped = sorted(set(module.active) - set(module.active_at(step)))
            trainee, optimizer = prepare_step(accelerator, trainee, module.phase, step, cfg, optimizer)
            accelerator.print(f"step {step}: {stopped} switched off")
        step_random = StepDraws.draw(objective, latent, t.global_batch_size, t.seed, step, cfg.data.hflip, device)
        if step <= t.lr_warmup_steps:  # a function of the step alone: resume-exact
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step)
        for micro in range(t.grad_accum_steps):
            batch = next(batches)
            draws = step_random.micro(micro, rank, world, n)
            with accelerator.accumulate(trainee):
                x0, cond, pixels = model_inputs(batch, latent, conditioning, draws, device)
                per_sample, terms = trainee(x0, cond, step, draws, pixels=pixels, target_feats=batch.get("feats"))
                loss = per_sample.mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.grad_clip > 0:
                    accelerator.clip_grad_norm_(trainee.parameters(), t.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if first_loss is None and "denoise" in terms:
                first_loss = terms["denoise"].mean().float()
            meters.add("loss", per_sample)
            for name, values in terms.items():
                meters.add(name, values)
            bad = ~torch.isfinite(loss) & (first_bad < 0)
            first_bad = torch.where(bad, float(step * t.grad_accum_steps + micro), first_bad)
        ema.update(model)
        step += 1
        bar.update(1)
        must_save = step % t.ckpt_every_steps == 0 or step == t.max_steps
        if step % cfg.log.every_steps == 0 or must_save:
            meters.add("_first_bad", first_bad.view(1) + 1)  # rides on the same all-reduce as the losses
            logs = meters.pop(lambda x: accelerator.reduce(x, reduction="sum"))
            if logs.pop("_first_bad") > 0:
                bad_at = int(accelerator.reduce(first_bad.clone(), reduction="max").item())
                raise NonFiniteLoss(  # steps counted from 1, as the logs count them
                    f"non-finite loss at step {bad_at // t.grad_accum_steps + 1}, micro-batch "
                    f"{bad_at % t.grad_accum_steps} (data position {sampler.position(bad_at // t.grad_accum_steps)}); "
                    f"last good checkpoint: {last_ckpt or 'none'}. Lower train.lr, enable train.grad_clip or use "
                    f"train.mixed_precision=bf16, then resume from that checkpoint.")
            if t.divergence_factor and "denoise" in logs:
                check_divergence(logs["denoise"], history, first_loss, t.divergence_factor, step, last_ckpt,
                                 accelerator)
            logs.update(module.step_logs(step))
            if cfg.log.tracker != "none":
                accelerator.log(logs, step=step)
            if accelerator.is_main_process:
                append_jsonl(run_dir / "logs" / "scalars.jsonl", {"step": step, **logs})
            bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()})
        if must_save:
            last_ckpt = save_checkpoint(accelerator, run_dir, step, ema,
                                        {"data_position": sampler.position(step), "phase": module.phase}, cfg,
                                        latent, keep=t.keep_checkpoints)
        warming = module.phase == "warmup"  # no output layer trained yet: nothing to sample
        if fid_suite is not None and not warming and (step % cfg.log.fid_every_steps == 0 or step == t.max_steps):
            fid = track_fid(fid_suite, ema, objective, latent, cfg, world, rank, device)
            record = {"step": step, f"fid{cfg.log.fid_num_samples}": fid}
            if cfg.log.tracker != "none":
                accelerator.log(record, step=step)
            if accelerator.is_main_process:
                append_jsonl(run_dir / "logs" / "scalars.jsonl", record)
                tqdm.write(f"step {step}: FID-{cfg.log.fid_num_samples} {fid:.3f}")
        if cfg.log.preview_every_steps and not warming and (step % cfg.log.preview_every_steps == 0
                                                            or step == t.max_steps):
            preview(accelerator, ema, objective, latent, cfg, step,
                    conditioning.preview(cfg.log.preview_num, dataset, device))
            accelerator.wait_for_everyone()
    bar.close()
    accelerator.end_training()
    return last_ckpt


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    args = parse_args(argv)
    if args.help_config:
        print(describe())
        return
    flush_denormals()  # CPU arithmetic: denormals to zero (gen.precision)
    with one_line_errors(args.debug):  # an expected failure ends in one line `error: ...` (traceback: --debug)
        train(load_config(args.config, args.overrides), resume=args.resume)


if __name__ == "__main__":
    main()
