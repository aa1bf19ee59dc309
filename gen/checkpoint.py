"""Training checkpoints: Accelerate state plus EMA, step, data position and config, written atomically.

Layout of `RUN_DIR/checkpoints/step-00050000/`: Accelerate's `save_state` files (model.safetensors,
optimizer, GradScaler, every process's RNG states), `ema.safetensors` (also what sample.py reads),
`train_state.json` (step, data position), `latent_state.pt` (the latent space's normalisation statistics) and
`config.yaml`. A checkpoint is written into a hidden
temporary folder and renamed when complete, so a crash never leaves a half checkpoint that looks valid (a failed
write removes the temporary folder; one left by a killed process is removed by the next save).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import save_file

from gen.config import Config, load_config, save_config
from gen.errors import as_write_error
from gen.io import flatten, load_state, load_tensors

PREFIX = "step-"
TMP_PREFIX = ".tmp-"

# Keys that must agree between a checkpoint and the config that resumes it (others, e.g. max_steps, may change):
# what the saved parameters, the optimizer state or the data order depend on, the aligners trained included.
RESUME_KEYS = ("model", "cond", "objective", "latent", "align.methods", "data.name", "data.image_size",
               "train.global_batch_size", "train.grad_accum_steps", "train.seed")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used with this run, with the reason and the fix."""


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def read_train_state(path: str | Path) -> dict:
    """A complete checkpoint's train_state.json (step, data position, phase), readable before loading it."""
    state = Path(path) / "train_state.json"
    if not state.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no train_state.json)")
    return json.loads(state.read_text())


LATENT_STATE = "latent_state.pt"
"""The latent space's state_dict (normalisation statistics) inside a checkpoint."""


def save_checkpoint(accelerator, run_dir: str | Path, step: int, ema, train_state: dict, cfg: Config, latent,
                    keep: int = 0) -> Path:
    """Write the checkpoint of `step` atomically (all processes call this); returns its folder."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{TMP_PREFIX}{PREFIX}{step:08d}"
    if accelerator.is_main_process:
        for stale in root.glob(f"{TMP_PREFIX}*"):  # left by a crash during an earlier save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))  # model, optimizer, scaler, RNG of every process
        if accelerator.is_main_process:
            save_file({k: v.detach().contiguous().cpu() for k, v in ema.state_dict().items()},
                      str(tmp / "ema.safetensors"))
            (tmp / "train_state.json").write_text(json.dumps({**train_state, "step": step}, indent=1))
            torch.save(latent.state_dict(), tmp / LATENT_STATE)
            save_config(cfg, tmp / "config.yaml")
    except Exception as err:  # a failed write (disk full, ...) leaves no half checkpoint behind
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        translated = as_write_error(err, tmp)
        if translated is not err:
            raise translated from err
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # re-saving the same step (e.g. the final step after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep > 0:
            for old in checkpoint_dirs(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def config_differences(saved: Config, current: Config, keys=RESUME_KEYS) -> list[str]:
    """The dotted keys under `keys` whose values differ, formatted 'key: saved -> current'."""
    a = flatten(OmegaConf.to_container(OmegaConf.structured(saved)))
    b = flatten(OmegaConf.to_container(OmegaConf.structured(current)))
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a
            if any(k == key or k.startswith(key + ".") for key in keys) and a[k] != b.get(k)]


def load_latent_state(path: str | Path, latent) -> None:
    """Restore the latent space's state from a checkpoint folder (its normalisation statistics)."""
    latent.load_state_dict(load_state(Path(path) / LATENT_STATE, "the latent space's state in a checkpoint"))


def check_resumable(path: str | Path, cfg: Config) -> None:
    """Refuse to resume checkpoint `path` with `cfg` when a key that may not change on resume (RESUME_KEYS) differs,
    naming each such key with the checkpoint's and the new value."""
    path = Path(path)
    diffs = config_differences(load_config(path / "config.yaml"), cfg)
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was written by another config ({'; '.join(diffs)}); these keys may not change on "
            f"resume: resume with the run's own values ({path / 'config.yaml'}) or choose a new train.run_dir")


def load_checkpoint(accelerator, path: str | Path, ema, cfg: Config, latent) -> dict:
    """Restore a checkpoint written by `save_checkpoint` after checking it belongs to this config."""
    path = Path(path)
    train_state = read_train_state(path)
    check_resumable(path, cfg)
    try:
        accelerator.load_state(str(path))
    except SafetensorError as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({' '.join(str(err).split())}); resume from "
                              f"an earlier one: move this folder out of {path.parent}") from None
    except (RuntimeError, KeyError, ValueError) as err:  # parameters or optimizer state of another shape
        detail = " ".join(str(err).split())[:300]
        raise CheckpointError(f"checkpoint {path} does not fit the configured model and aligners ({detail}); resume "
                              f"with the run's own config ({path / 'config.yaml'}) or choose a new train.run_dir"
                              ) from err
    load_latent_state(path, latent)
    ema.load_state_dict(load_tensors(path / "ema.safetensors", "the EMA weights of a checkpoint",
                                     device=str(next(ema.model.parameters()).device)))
    return train_state


def resolve_weights(path: str | Path) -> tuple[Path, Path]:
    """(ema.safetensors, config.yaml) of a run folder (its latest checkpoint) or of a checkpoint folder."""
    path = Path(path)
    ckpt = path if (path / "ema.safetensors").is_file() else latest_checkpoint(path)
    if ckpt is None or not (ckpt / "ema.safetensors").is_file() or not (ckpt / "config.yaml").is_file():
        raise CheckpointError(f"{path} holds no checkpoint with ema.safetensors and config.yaml; pass a run folder "
                              f"written by train.py or one of its checkpoints/step-* folders")
    return ckpt / "ema.safetensors", ckpt / "config.yaml"
