"""Encode a dataset into a latent cache: raw latents in fixed-size .npy shards, multi-process, resumable.

    python prepare.py CONFIG [key=value ...] [--out DIR] [--shard-size N] [--batch-size N]
    accelerate launch prepare.py configs/...yaml data.name=image_folder data.path=/data/imagenet/train \
        latent.sd_vae.vae_path=/weights/sd-vae-ft-ema --out /data/cache/in256-sdvae

cfg.data names the source (digits, image_folder or hf) and cfg.latent the encoding. Shard k holds items
[k*S, (k+1)*S) and is written by process k % world_size, each file atomically (temporary file, then rename),
so a killed run resumes by skipping complete shards; meta.json, which makes the cache usable, comes last.
Train on the result with data.name=latent_cache data.path=DIR and the same latent.* / data.image_size.

data.cache_features=[dinov2-vit-b] (weights from align.encoder_weights) also stores each frozen encoder's patch
tokens on the configured backbone's token grid (model.*), float16 (N, T, d) per shard, from the same unflipped
images (REPA uses no augmentation, REPA issue #19): REPA then reads them from the cache and training runs no encoder.

cond.text_encoder=FOLDER (a local CLIP text encoder, gen.text) also stores each item's caption as text-encoder
tokens, float16 (N, cond.text_tokens, D) per shard (feats-text-*.npy, meta.json "text"), for text-conditioned
training (cond.text_dim=D), which then reads them from the cache; the datasets give captions (gen.shape_data).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from gen.config import ConfigError, load_config
from gen.data import (LATENT_STATE, META, DataError, build_dataset, dataset_channels, features_file, labels_file,
                      shard_file)
from gen.errors import DEBUG_HELP, one_line_errors
from gen.io import atomic_write, atomic_write_text, check_writable, to_rgb
from gen.models import build_backbone, require_grid
from gen.precision import flush_denormals
from gen.text import TEXT_FEATURE, TextEncoder, open_encoder
from latents import build_latent

IN_PROGRESS = "prepare.json"
"""The intended meta.json, written before any shard so a resumed run can check it makes the same cache."""


def parse_args(argv=None):
    """Command line: config file, dotted overrides, output folder and sizes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config (overrides of gen/config.py's defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.image_size=256")
    parser.add_argument("--out", default=None, help="cache folder (default: caches/<data>-<latent>-<size>)")
    parser.add_argument("--shard-size", type=int, default=10_000, help="items per shard file")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder batch on each process")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return parser.parse_args(argv)


def _write_npy(path: Path, array: np.ndarray) -> None:
    # A killed process leaves at most a temporary file, never a truncated shard under the final name.
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2))


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype of a torch dtype (a latent space's raw_dtype, as its cache shards hold it)."""
    return torch.empty(0, dtype=dtype).numpy().dtype


def _complete(out: Path, k: int, n: int, raw_shape: tuple, feature_shapes: dict | None = None,
              raw_dtype: np.dtype = np.dtype(np.float32)) -> bool:
    """Shard k exists with the expected shapes (its files were renamed into place, hence whole)."""
    feature_shapes = feature_shapes or {}
    try:
        raw = np.load(out / shard_file(k), mmap_mode="r")
        labels = np.load(out / labels_file(k), mmap_mode="r")
        feats = {name: np.load(out / features_file(name, k), mmap_mode="r") for name in feature_shapes}
    except (OSError, ValueError):
        return False
    return raw.shape == (n, *raw_shape) and raw.dtype == raw_dtype and labels.shape == (n,) \
        and labels.dtype == np.int64 \
        and all(f.shape == (n, *feature_shapes[name]) and f.dtype == np.float16 for name, f in feats.items())


def build_encoders(cfg, latent, device) -> dict:
    """The frozen encoders cfg.data.cache_features names, on the configured backbone's token grid, by name."""
    names = list(cfg.data.cache_features)
    if not names:
        return {}
    from align.encoders import ENCODERS, build_encoder  # timm: only imported when features are asked for

    if any(name not in ENCODERS for name in names) or len(set(names)) != len(names):
        raise ConfigError(f"config key 'data.cache_features': distinct keys of {sorted(ENCODERS)}, got {names}")
    with torch.device("meta"):  # only the grid is needed: no memory, no initialisation
        # One target token per backbone token (REPA train.py interpolates the encoder input to the patch grid).
        grid = require_grid(build_backbone(cfg, latent.shape), "data.cache_features")
    return {name: build_encoder(name, cfg.align.encoder_weights.get(name), cfg.data.image_size, grid).to(device)
            for name in names}


def build_meta(cfg, dataset, latent, shard_size: int, encoders: dict | None = None,
               text_encoder: TextEncoder | None = None) -> dict:
    """What meta.json records: shapes, counts, the latent space's settings, the source, any encoder features and
    the text encoder's tokens."""
    hf = cfg.data.name == "hf"  # its split and columns name the source too
    features = {
        # Computed with an fp32 forward (no autocast), stored as fp16: slightly off REPA's per-step autocast
        # features (REPA train.py runs the encoder under accelerator.autocast).
        name: {"shape": [enc.num_tokens, enc.dim], "dtype": "float16", "computed_in": "float32",
               "encoder": enc.spec.arch, "weights": cfg.align.encoder_weights.get(name)}
        for name, enc in (encoders or {}).items()
    }
    return {
        "format": 1,
        "raw_shape": list(latent.raw_shape),
        "raw_dtype": str(numpy_dtype(latent.raw_dtype)),
        "dtype": "float32",
        "count": len(dataset),
        "shard_size": shard_size,
        "num_shards": math.ceil(len(dataset) / shard_size),
        "latent": {"name": latent.name, **latent.settings()},
        "image_size": cfg.data.image_size,
        "channels": dataset_channels(cfg),
        "num_classes": int(dataset.num_classes),
        # Unflipped images (REPA trains without flips, REPA issue #19); build_dataset never flips.
        "source": {"name": cfg.data.name, "path": cfg.data.path, "split": cfg.data.split if hf else "train",
                   "hflip": False, **({"image_column": cfg.data.image_column, "label_column": cfg.data.label_column}
                                      if hf else {})},
        **({"features": features} if features else {}),  # absent without features: older caches stay valid
        **({"text": {"shape": [text_encoder.max_tokens, text_encoder.dim], "dtype": "float16",
                     "encoder": str(text_encoder.folder)}} if text_encoder is not None else {}),
    }


def check_out(out: Path, meta: dict) -> bool:
    """True if `out` already holds this exact cache; raises if it holds a different one."""
    for name in (META, IN_PROGRESS):
        if (out / name).is_file():
            found = json.loads((out / name).read_text())
            if found != meta:
                differs = sorted(k for k in meta.keys() | found.keys() if found.get(k) != meta.get(k))
                raise DataError(f"{out / name} describes a different cache (differs in {differs}); pass another "
                                f"--out folder or delete {out}")
    return (out / META).is_file()


def _float16(feats: np.ndarray, name: str, k: int) -> np.ndarray:
    """`feats` as float16, refusing values the cast would turn into inf (or that are not finite already)."""
    peak = float(np.abs(feats).max()) if feats.size else 0.0
    if not peak <= float(np.finfo(np.float16).max):  # NaN too
        raise DataError(f"encoder {name!r} gives features up to |{peak:.4g}| in shard {k}, beyond float16's range "
                        f"({np.finfo(np.float16).max:.0f}), so they cannot be cached; drop {name} from "
                        f"data.cache_features and let training run it on the images (data.name=image_folder)")
    return feats.astype(np.float16)


def encode_shard(dataset, latent, k: int, shard_size: int, batch_size: int, num_workers: int, device, bar,
                 encoders: dict | None = None, text_encoder: TextEncoder | None = None) -> tuple:
    """Raw latents, labels and the encoders' float16 features (by name; the captions' text tokens as TEXT_FEATURE)
    of shard k."""
    encoders = encoders or {}
    indices = range(k * shard_size, min((k + 1) * shard_size, len(dataset)))
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers)
    raws, labels, done = [], [], 0
    # Filled batch by batch: a shard's float32 features would take twice the memory (DINOv2-B: 0.8 MB per image).
    feats = {name: np.empty((len(indices), enc.num_tokens, enc.dim), np.float16) for name, enc in encoders.items()}
    if text_encoder is not None:
        feats[TEXT_FEATURE] = np.empty((len(indices), text_encoder.max_tokens, text_encoder.dim), np.float16)
    for batch in loader:
        labels.append(batch["label"].numpy().astype(np.int64))
        if text_encoder is not None:
            if "caption" not in batch:
                raise DataError("cond.text_encoder is set but the dataset gives no captions (procedural_shapes does; "
                                "mesh_folder with a captions.tsv); unset cond.text_encoder or add captions")
            tokens = text_encoder(batch["caption"]).cpu().numpy()
            feats[TEXT_FEATURE][done:done + len(tokens)] = _float16(tokens, TEXT_FEATURE, k)
        if "raw" in batch:  # datasets that encode their items (3D shapes, gen.shape_data)
            raws.append(batch["raw"].to(latent.raw_dtype).numpy())
            done += len(batch["raw"])
            bar.update(len(batch["raw"]))
            continue
        images = batch["image"].to(device)
        raws.append(latent.encode_raw(images).to(latent.raw_dtype).cpu().numpy())
        pixels = to_rgb(images)  # grayscale as RGB, as train.py
        for name, encoder in encoders.items():
            feats[name][done:done + len(images)] = _float16(encoder(pixels).float().cpu().numpy(), name, k)
        done += len(images)
        bar.update(len(images))
    return np.concatenate(raws), np.concatenate(labels), feats


def main(argv=None) -> None:
    """Run the job; an expected failure ends in one line `error: ...` (the traceback with --debug)."""
    args = parse_args(argv)
    flush_denormals()  # CPU arithmetic: denormals to zero (gen.precision)
    with one_line_errors(args.debug):
        prepare(args)


def prepare(args) -> None:
    """Validate (config, data, weights, output folder), then encode the missing shards."""
    cfg = load_config(args.config, args.overrides)
    if cfg.data.name == "latent_cache":
        raise ConfigError("config key 'data.name': prepare.py reads images (digits, image_folder or hf) or shapes "
                          "(procedural_shapes, mesh_folder), not a cache")
    for option, value in (("--shard-size", args.shard_size), ("--batch-size", args.batch_size)):
        if value <= 0:
            raise ConfigError(f"{option} is {value}; allowed: >= 1")
    out = Path(args.out or f"caches/{cfg.data.name}-{cfg.latent.name}-{cfg.data.image_size}")
    check_writable(out, "--out")

    accelerator = Accelerator()
    dataset = build_dataset(cfg, "train")
    latent = build_latent(cfg)
    # Missing weights or a foreign cache in `out` fail here, before anything is written.
    latent.load_weights(accelerator.device)
    encoders = build_encoders(cfg, latent, accelerator.device)
    # a text run (cond.text_dim > 0) caches its captions' tokens: it needs the encoder, of that width
    text_encoder = open_encoder(cfg, accelerator.device) if cfg.cond.text_encoder or cfg.cond.text_dim else None
    meta = build_meta(cfg, dataset, latent, args.shard_size, encoders, text_encoder)
    feature_shapes = {name: tuple(f["shape"]) for name, f in meta.get("features", {}).items()}
    if "text" in meta:  # stored like features: one float16 file per shard
        feature_shapes[TEXT_FEATURE] = tuple(meta["text"]["shape"])
    if check_out(out, meta):
        accelerator.print(f"{out} is already a complete cache of {meta['count']} items")
        return
    accelerator.wait_for_everyone()  # every process has checked before the main one writes
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / IN_PROGRESS, meta)
    accelerator.wait_for_everyone()

    rank, world = accelerator.process_index, accelerator.num_processes
    shards = range(rank, meta["num_shards"], world)

    def size(k: int) -> int:
        """Items in shard k (the last one is short)."""
        return min(args.shard_size, meta["count"] - k * args.shard_size)

    raw_dtype = numpy_dtype(latent.raw_dtype)
    todo = [k for k in shards if not _complete(out, k, size(k), latent.raw_shape, feature_shapes, raw_dtype)]
    accelerator.print(f"{meta['num_shards']} shards of {args.shard_size} over {world} processes; process 0 "
                      f"skips {len(shards) - len(todo)} complete, encodes {len(todo)}")
    unit = "shape" if latent.modality == "shape" else "img"
    bar = tqdm(total=sum(size(k) for k in todo), desc=f"prepare {out.name}", unit=unit,
               disable=not accelerator.is_main_process)
    for k in todo:
        raw, labels, feats = encode_shard(dataset, latent, k, args.shard_size, args.batch_size,
                                          cfg.data.num_workers, accelerator.device, bar, encoders, text_encoder)
        _write_npy(out / labels_file(k), labels)
        for name, array in feats.items():
            _write_npy(out / features_file(name, k), array)
        _write_npy(out / shard_file(k), raw)  # the shard file last: its presence marks the shard complete
    bar.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        missing = [k for k in range(meta["num_shards"])
                   if not _complete(out, k, size(k), latent.raw_shape, feature_shapes, raw_dtype)]
        if missing:
            raise DataError(f"shards {missing[:5]} of {out} are missing after encoding; re-run prepare.py")
        if latent.fitted:  # statistics over every shard, in shard order: the same however the shards were made
            for k in range(meta["num_shards"]):
                latent.fit(torch.from_numpy(np.load(out / shard_file(k))))
            atomic_write(out / LATENT_STATE, lambda tmp: torch.save(latent.state_dict(), tmp))
        _write_json(out / META, meta)
        (out / IN_PROGRESS).unlink()
        accelerator.print(f"wrote {out}: {meta['count']} items of raw shape {tuple(meta['raw_shape'])}"
                          + "".join(f", {name} features {shape}" for name, shape in feature_shapes.items())
                          + f"; train with data.name=latent_cache data.path={out}")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
