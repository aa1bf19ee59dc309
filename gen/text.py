"""A frozen CLIP text encoder from local weights: captions -> token embeddings (N, T, D) for cross-attention.

As Stable Diffusion conditions on CLIP ViT-L/14's text transformer (Rombach et al., CVPR 2022, section 3.3 and
appendix), a caption is tokenised with CLIP's BPE, padded (or truncated) to `max_tokens` and the final layer's
hidden states of every position, padding included, are the condition: there is no padding mask, and CLIP's causal
attention makes the positions after the end token summaries of the caption. The encoder runs in prepare.py (captions
of the training set, cached with the latents) and in sample.py (the captions to sample), never in training.

Weights come from a local folder in the `transformers` layout (config.json, model.safetensors or pytorch_model.bin,
vocab.json, merges.txt), e.g. a download of https://huggingface.co/openai/clip-vit-large-patch14 (D = 768, the
default published choice); the config key is cond.text_encoder. Nothing is downloaded at run time.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

KEY = "cond.text_encoder"
"""The config key of the encoder folder."""

PUBLISHED = "https://huggingface.co/openai/clip-vit-large-patch14"
"""Where the default encoder is published."""

NEEDED = ("config.json", "vocab.json", "merges.txt")
"""Files the folder must hold, besides one of WEIGHTS."""

TEXT_FEATURE = "text"
"""The name of a latent cache's text-token shards (gen.data.features_file(TEXT_FEATURE, k), float16 (n, T, D))."""

WEIGHTS = ("model.safetensors", "pytorch_model.bin")
"""The weight file names transformers reads, either one."""


def encoder_folder(path: str | Path | None) -> Path:
    """The encoder folder at `path`, or one FileNotFoundError naming the missing folder or file, where the encoder
    is published and the config key."""
    hint = (f"it needs a CLIP text encoder in the transformers layout ({', '.join(NEEDED)}, {' or '.join(WEIGHTS)}), "
            f"published at {PUBLISHED}; download that folder once elsewhere, copy it here and set {KEY}=FOLDER")
    if path is None or str(path) == "":
        raise FileNotFoundError(f"config key '{KEY}' is not set: {hint} (nothing is downloaded at run time)")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"config key '{KEY}': no folder {folder}; {hint}")
    missing = [name for name in NEEDED if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in WEIGHTS):
        missing.append(" or ".join(WEIGHTS))
    if missing:
        raise FileNotFoundError(f"config key '{KEY}': {folder} lacks {', '.join(missing)}; {hint}")
    return folder


class TextEncoder:
    """CLIPTokenizer + CLIPTextModel (frozen, eval, float32) read from a local folder (encoder_folder)."""

    def __init__(self, path: str | Path | None, max_tokens: int = 77, device=None):
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
            from transformers.utils import logging
        except ImportError as err:
            from gen.config import ConfigError

            raise ConfigError(f"config key '{KEY}': the text encoder needs the transformers package ({err}); "
                              f"pip install -e . installs it (pyproject.toml)") from None

        logging.disable_progress_bar()  # one load of a local folder: no per-weight bars in the job's output
        folder = encoder_folder(path)
        self.folder, self.max_tokens = folder, int(max_tokens)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = CLIPTextModel.from_pretrained(str(folder), local_files_only=True)
        self.model.float().eval().requires_grad_(False).to(device)
        positions = self.model.config.max_position_embeddings
        if self.max_tokens > positions:
            from gen.config import ConfigError

            raise ConfigError(f"config key 'cond.text_tokens': {self.max_tokens} tokens, but the text encoder in "
                              f"{folder} has {positions} positions; set cond.text_tokens <= {positions}")

    @property
    def dim(self) -> int:
        """Width D of the token embeddings."""
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> Tensor:
        """Captions -> (N, max_tokens, D) float32 final hidden states, on the model's device."""
        tokens = self.tokenizer(list(captions), padding="max_length", max_length=self.max_tokens, truncation=True,
                                return_tensors="pt")
        device = next(self.model.parameters()).device
        return self.model(input_ids=tokens["input_ids"].to(device)).last_hidden_state.float()


def sample_text(cfg, device) -> Tensor | None:
    """The text tokens (C, T, D) of sample.captions (one caption per line) for a text run (cond.text_dim > 0), encoded
    by cond.text_encoder; None for a run without text. Sample i reads caption i mod C."""
    if not cfg.cond.text_dim:
        return None
    from gen.config import ConfigError

    if not cfg.sample.captions:
        raise ConfigError("config key 'sample.captions': this model is text-conditioned (cond.text_dim > 0); give a "
                          "file of captions, one per line (sample i takes caption i mod their number)")
    if not Path(cfg.sample.captions).is_file():
        raise ConfigError(f"config key 'sample.captions': no file {cfg.sample.captions}; give a UTF-8 file of "
                          f"captions, one per line")
    captions = [line.strip() for line in Path(cfg.sample.captions).read_text(encoding="utf-8").splitlines()]
    captions = [c for c in captions if c]
    if not captions:
        raise ConfigError(f"config key 'sample.captions': {cfg.sample.captions} holds no caption")
    return open_encoder(cfg, device)(captions)


def open_encoder(cfg, device) -> TextEncoder:
    """The encoder of cond.text_encoder (one error when it is not set or incomplete), giving tokens of the width
    cond.text_dim when that is set (the width the model reads): prepare.py and sample.py."""
    from gen.config import ConfigError

    encoder = TextEncoder(cfg.cond.text_encoder, cfg.cond.text_tokens, device)
    if cfg.cond.text_dim and encoder.dim != cfg.cond.text_dim:
        raise ConfigError(f"config key 'cond.text_encoder': {encoder.folder} gives tokens of width {encoder.dim}, but "
                          f"the model reads cond.text_dim={cfg.cond.text_dim}; use the encoder the cache was made with "
                          f"(or, for a new cache and run, set cond.text_dim={encoder.dim})")
    return encoder
