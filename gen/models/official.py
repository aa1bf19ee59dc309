"""Official DiT, SiT and REPA checkpoints -> our model state (and back).

Containers (DiT download.py `find_model`; the train.py checkpoint dicts of DiT, SiT and REPA):
- bare state dicts: DiT's `DiT-XL-2-256x256.pt` and SiT's `SiT-XL-2-256x256.pt` (EMA weights);
- training checkpoints of all three repos: a dict with `model`, `ema`, `opt`, `args` (an argparse
  Namespace, pickled) and, for REPA, `steps`. Loaded with `weights_only=True`, the Namespace allowed.

Conversions:
- REPA "legacy" files name the blocks after the alignment depth `decoder_blocks.{j}`: renamed to
  `blocks.{j + encoder_depth}` (REPA `utils.load_legacy_checkpoints`).
- REPA projectors (`projectors.{k}.{0,2,4}`) are not part of the backbone: kept aside for the aligner.
- SiT runs time the other way (s = 1 - t, s = 0 noise). The flip is folded into the weights: the sinusoidal
  features of 1 - t are a fixed linear map (a reflection per frequency) of those of t, absorbed into
  `t_embedder.mlp.0.weight`. Reversing time negates a velocity and nothing else (willisma/SiT
  transport/transport.py training_losses: velocity target d_alpha x1 + d_sigma x0 = data - noise = -v; noise
  target x0, the noise itself; score target -x0 / sigma_t, the score of the same marginal). So a velocity model's
  sign goes into `final_layer.linear` too: the converted network computes v(x, t, y) = -f_SiT(x, 1 - t, y),
  a noise or score model f(x, t, y) = f_SiT(x, 1 - t, y). The prediction comes from a training checkpoint's
  `args.prediction`; SiT's released files are velocity models.
- An 8-channel (learned-sigma) head loaded into a 4-channel model keeps the first C values of each
  pixel: each output row is (p, p, C_out) with the channel fastest, so rows are sliced per pixel.
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from gen.layers import TimestepEmbedder
from gen.models import SIZES, build_model
from gen.models.dit import Transformer

# How each repo's files differ from our convention. "family" picks the registry entry to rebuild.
SOURCES: dict[str, dict] = {
    "dit": dict(family="DiT", flip_time=False),  # DDPM, integer t: used as is by the ddpm objective
    "sit": dict(family="SiT", flip_time=True),  # SiT repo: s = 1 - t; a velocity model predicts -v
    "repa": dict(family="SiT", flip_time=False),  # REPA: our convention (t = 0 data), 4-channel head
}

_PROJECTOR = re.compile(r"^projectors\.")
_LEGACY_BLOCK = re.compile(r"^decoder_blocks\.(\d+)\.")


@dataclass
class OfficialWeights:
    """A converted official file: backbone states in our convention plus what the file held besides."""

    source: str  # "dit" | "sit" | "repa"
    model: dict[str, Tensor]  # online weights (a bare released file's only weights)
    ema: dict[str, Tensor] | None = None  # EMA weights of a training checkpoint
    aligner: dict[str, Tensor] = field(default_factory=dict)  # REPA projectors of the online model
    args: dict = field(default_factory=dict)  # the training arguments, as a plain dict
    steps: int | None = None

    @property
    def sampling_state(self) -> dict[str, Tensor]:
        """The weights to sample and evaluate with: EMA when present (all three repos evaluate EMA)."""
        return self.ema if self.ema is not None else self.model


def read_checkpoint(path: str | Path) -> dict:
    """torch.load a .pt file safely (weights only), allowing the argparse Namespace the repos pickle."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict or a dict with 'model'/'ema', got {type(obj).__name__}")
    return obj


def _strip_module_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop a DDP `module.` prefix when every key has it."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _rename_legacy_blocks(state: dict[str, Tensor], encoder_depth: int | None) -> dict[str, Tensor]:
    """REPA legacy layout: `decoder_blocks.{j}` -> `blocks.{j + encoder_depth}`."""
    if not any(_LEGACY_BLOCK.match(k) for k in state):
        return state
    if encoder_depth is None:
        raise ValueError(
            "REPA legacy checkpoint (decoder_blocks.*) without 'encoder_depth' in its args: pass encoder_depth="
        )
    return {
        _LEGACY_BLOCK.sub(lambda m: f"blocks.{int(m.group(1)) + encoder_depth}.", k): v for k, v in state.items()
    }


# The output sign under time reversal, per SiT `--prediction` (train_utils.py parse_transport_args).
OUTPUT_SIGN: dict[str, int] = {"velocity": -1, "noise": 1, "score": 1}


def flip_time(state: dict[str, Tensor], prediction: str = "velocity") -> dict[str, Tensor]:
    """Fold t -> 1 - t into the weights, and v -> -v for a velocity model (an involution: applying it twice is the
    identity). Noise and score predictions keep their sign (OUTPUT_SIGN).

    cos(f(1-t)) = cos f cos(ft) + sin f sin(ft) and sin(f(1-t)) = sin f cos(ft) - cos f sin(ft), so the
    features of 1 - t are R @ features(t) with R a reflection in each (cos, sin) pair; W' = W @ R.
    """
    if prediction not in OUTPUT_SIGN:
        raise ValueError(f"unknown SiT prediction {prediction!r}; one of {sorted(OUTPUT_SIGN)}")
    state = dict(state)
    w = state["t_embedder.mlp.0.weight"].double()  # (D, 256): columns cos half then sin half
    half = w.shape[1] // 2
    embedder = TimestepEmbedder(hidden_size=1, frequency_size=2 * half)
    f = embedder.frequencies().double()
    cos_f, sin_f = torch.cos(f), torch.sin(f)
    wc, ws = w[:, :half], w[:, half:]
    flipped = torch.cat([wc * cos_f + ws * sin_f, wc * sin_f - ws * cos_f], dim=1)
    state["t_embedder.mlp.0.weight"] = flipped.to(state["t_embedder.mlp.0.weight"].dtype)
    if OUTPUT_SIGN[prediction] < 0:
        state["final_layer.linear.weight"] = -state["final_layer.linear.weight"]
        state["final_layer.linear.bias"] = -state["final_layer.linear.bias"]
    return state


def fit_head(state: dict[str, Tensor], out_channels: int) -> dict[str, Tensor]:
    """Keep the first `out_channels` channels of a wider output head (e.g. 8 -> 4), per pixel."""
    w, b = state["final_layer.linear.weight"], state["final_layer.linear.bias"]
    p = state["x_embedder.proj.weight"].shape[-1]
    have = w.shape[0] // (p * p)
    if have == out_channels:
        return state
    if have < out_channels:
        raise ValueError(f"checkpoint head has {have} output channels, the model needs {out_channels}")
    state = dict(state)
    state["final_layer.linear.weight"] = w.view(p * p, have, -1)[:, :out_channels].reshape(-1, w.shape[1])
    state["final_layer.linear.bias"] = b.view(p * p, have)[:, :out_channels].reshape(-1)
    return state


def _convert(state: dict[str, Tensor], source: str, encoder_depth: int | None,
             prediction: str = "velocity") -> tuple[dict, dict]:
    """One state dict of `source` -> (backbone state in our convention, projector state)."""
    state = _rename_legacy_blocks(_strip_module_prefix(state), encoder_depth)
    aligner = {k: v for k, v in state.items() if _PROJECTOR.match(k)}
    backbone = {k: v for k, v in state.items() if not _PROJECTOR.match(k)}
    if SOURCES[source]["flip_time"]:
        backbone = flip_time(backbone, prediction)
    return backbone, aligner


def load_official(path: str | Path, source: str, *, encoder_depth: int | None = None) -> OfficialWeights:
    """Read an official DiT / SiT / REPA file (bare or training checkpoint) and convert it to our convention."""
    if source not in SOURCES:
        raise KeyError(f"unknown checkpoint source {source!r}; one of {sorted(SOURCES)}")
    raw = read_checkpoint(path)
    args = raw.get("args", {})
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    depth = encoder_depth if encoder_depth is not None else args.get("encoder_depth")
    # SiT training checkpoints name their prediction; SiT's released bare files are velocity models.
    prediction = args.get("prediction", "velocity") if source == "sit" else "velocity"
    if "model" in raw or "ema" in raw:
        model, aligner = _convert(raw.get("model") or raw["ema"], source, depth, prediction)
        ema = _convert(raw["ema"], source, depth, prediction)[0] if "ema" in raw else None
        steps = raw.get("steps", raw.get("train_steps"))
    else:
        model, aligner = _convert(raw, source, depth, prediction)
        ema, steps = None, None
    return OfficialWeights(source, model, ema, aligner, args, int(steps) if steps is not None else None)


def to_official(state: dict[str, Tensor], source: str, prediction: str = "velocity") -> dict[str, Tensor]:
    """Our backbone state of a `prediction` model -> the `source` repo's convention (the inverse of the conversion
    above)."""
    return flip_time(state, prediction) if SOURCES[source]["flip_time"] else dict(state)


def infer_model(state: dict[str, Tensor], source: str, **overrides) -> tuple[str, dict]:
    """Registry name and overrides that rebuild the network a converted state came from.

    Heads leave no trace in the weights: a non-registered size needs `num_heads` in `overrides`
    (or QK-norm weights, whose width is the head width).
    """
    w = state["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, in_channels, p = w.shape[0], w.shape[1], w.shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    out_channels = state["final_layer.linear.weight"].shape[0] // (p * p)
    inferred = dict(
        input_size=math.isqrt(state["pos_embed"].shape[1]) * p,
        in_channels=in_channels,
        num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1,
        learn_sigma=out_channels == 2 * in_channels,
        qk_norm="blocks.0.attn.q_norm.weight" in state,
    )
    size = next((s for s, v in SIZES.items() if v["depth"] == depth and v["hidden_size"] == hidden), None)
    if size is None:
        size = "S"
        inferred.update(depth=depth, hidden_size=hidden)
        if inferred["qk_norm"]:
            inferred["num_heads"] = hidden // state["blocks.0.attn.q_norm.weight"].shape[0]
        elif "num_heads" not in overrides:
            raise ValueError(f"depth {depth} / width {hidden} is not a registered size: pass num_heads=")
    return f"{SOURCES[source]['family']}-{size}/{p}", {**inferred, **overrides}


def build_official(path: str | Path, source: str, *, use_ema: bool = True, encoder_depth: int | None = None,
                   **overrides) -> tuple[Transformer, OfficialWeights]:
    """Build the matching registered model (overrides win, e.g. learn_sigma=False) and load the file strictly."""
    weights = load_official(path, source, encoder_depth=encoder_depth)
    state = weights.sampling_state if use_ema else weights.model
    name, kwargs = infer_model(state, source, **overrides)
    model = build_model(name, **kwargs)
    model.load_state_dict(fit_head(state, model.out_channels), strict=True)
    return model, weights
