"""Frozen target encoders: registry shapes at full size (meta device), the real loader on tiny random stand-ins
saved to disk, refusal of wrong checkpoints and missing files, and REPA's preprocessing per encoder."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models import get_pretrained_cfg

from align.encoders import ENCODERS, FrozenEncoder, build_encoder, create_encoder_model

TINY = dict(depth=1, embed_dim=32, num_heads=2)  # the registered architecture, shrunk to one narrow block
GRID, IMAGE = 16, 256  # SiT/2 on 256 px images: 16 x 16 tokens

# Written from REPA's encoders (utils.py `load_encoders`, train.py `preprocess_raw_image`), not from the registry:
# token width at full size, encoder input side at 256 px, and whether it normalises before resizing.
SPEC_TABLE = {
    **{f"dinov2{r}-vit-{k}": (d, 224, True) for r in ("", "reg")
       for k, d in dict(s=384, b=768, l=1024, g=1536).items()},
    "clip-vit-l": (1024, 224, False),
    "mae-vit-l": (1024, 256, True),
    "jepa-vit-h": (1280, 224, True),
}


def published_grid(name):
    """Token grid of the published weights (DINOv2 518 px: 37 x 37), so loading must resample."""
    spec = ENCODERS[name]
    return get_pretrained_cfg(spec.pretrained_tag).input_size[-1] // spec.patch_size


def save_stand_in(name, path, seed=0, **overrides):
    """A random-init tiny `name` at its published resolution, saved as timm's HF file (model.safetensors).

    Like the published file it has the final norm and, for CLIP, the projection head (both unused by REPA).
    """
    torch.manual_seed(seed)
    head = get_pretrained_cfg(ENCODERS[name].pretrained_tag).num_classes
    model = create_encoder_model(ENCODERS[name], published_grid(name),
                                 **{**TINY, "final_norm": True, "num_classes": head, **overrides})
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return state


def images(n=2, size=IMAGE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_registry_matches_spec_table():
    assert set(ENCODERS) == set(SPEC_TABLE)
    for name, (dim, _, normalize_first) in SPEC_TABLE.items():
        assert (ENCODERS[name].dim, ENCODERS[name].normalize_first) == (dim, normalize_first), name


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_full_size_token_count_and_width_on_meta(name):
    """The registered architecture at full size: one token per backbone token, the encoder's width."""
    spec = ENCODERS[name]
    with torch.device("meta"):
        model = create_encoder_model(spec, GRID)
        enc = FrozenEncoder(name, spec, model, IMAGE, GRID)
        out = enc(torch.zeros(2, 3, IMAGE, IMAGE, dtype=torch.uint8))
    assert (enc.dim, enc.num_tokens) == (SPEC_TABLE[name][0], GRID * GRID)
    assert tuple(out.shape) == (2, GRID * GRID, SPEC_TABLE[name][0])
    assert enc.input_size == (SPEC_TABLE[name][1],) * 2


def test_512px_dinov2_runs_at_448_with_32x32_tokens():
    spec = ENCODERS["dinov2-vit-b"]
    with torch.device("meta"):
        enc = FrozenEncoder("dinov2-vit-b", spec, create_encoder_model(spec, 32), 512, 32)
        out = enc(torch.zeros(1, 3, 512, 512, dtype=torch.uint8))
    assert enc.input_size == (448, 448) and tuple(out.shape) == (1, 1024, 768)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_random_stand_in_loads_through_real_loader(name, tmp_path):
    path = tmp_path / "model.safetensors"
    saved = save_stand_in(name, path)
    enc = build_encoder(name, path, IMAGE, GRID, **TINY)
    model = enc.model
    # Frozen: eval mode, no trainable parameter, no graph even under enable_grad.
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with torch.enable_grad():
        out = enc(images())
    assert tuple(out.shape) == (2, GRID * GRID, TINY["embed_dim"]) and not out.requires_grad
    # Weights are the file's; the position embedding is resampled to the backbone grid (bicubic, antialias).
    own = model.state_dict()
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    expected_pos = resample_abs_pos_embed(saved["pos_embed"], [GRID, GRID], num_prefix_tokens=prefix)
    assert torch.equal(own["pos_embed"], expected_pos)
    assert all(torch.equal(v, saved[k]) for k, v in own.items() if k != "pos_embed")
    # Tokens: no CLS / registers; after the final norm only where the reference applies it.
    x = enc.preprocess(images())
    assert torch.equal(out, model.forward_features(x)[:, model.num_prefix_tokens:])
    if ENCODERS[name].final_norm:
        assert torch.allclose(out.mean(-1), torch.zeros(()), atol=1e-5)  # LayerNorm at init: zero-mean tokens
    else:
        assert isinstance(model.norm, torch.nn.Identity) and "norm.weight" in saved and "norm.weight" not in own


# OpenAI CLIP's visual-tower names for timm's (the inverse of timm's `_convert_openai_clip`).
_OPENAI_NAMES = (("patch_embed.proj", "conv1"), ("norm_pre", "ln_pre"), ("blocks.", "transformer.resblocks."),
                 ("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv.", "attn.in_proj_"), ("attn.proj", "attn.out_proj"),
                 ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))


def _openai_clip_layout(state):
    """An OpenAI CLIP state dict (clip.load's model): `visual.*` tower plus text-tower keys REPA never uses."""
    out = {"token_embedding.weight": torch.zeros(8, 4), "logit_scale": torch.zeros(())}
    for k, v in state.items():
        if k == "head.bias":  # OpenAI's projection has no bias
            continue
        special = {"head.weight": ("proj", lambda w: w.T), "pos_embed": ("positional_embedding", lambda w: w[0]),
                   "cls_token": ("class_embedding", lambda w: w[0, 0])}
        if k in special:
            k, v = special[k][0], special[k][1](v)
        for ours, theirs in _OPENAI_NAMES:
            k = k.replace(ours, theirs)
        out["visual." + ("ln_post." + k[5:] if k.startswith("norm.") else k)] = v
    return out


def _to_original_layout(name, state):
    """The layout of the file the authors publish (what REPA loads), from a timm-layout state."""
    if name.startswith("dinov2-"):  # torch.hub DINOv2: a mask token besides the timm keys
        return {**state, "mask_token": torch.zeros(1, state["cls_token"].shape[-1])}
    if name == "mae-vit-l":  # MAE pretrain file: {"model": encoder state}
        return {"model": state}
    if name == "clip-vit-l":
        return _openai_clip_layout(state)
    return {"encoder": {f"module.{k}": v for k, v in state.items()}, "epoch": 300}  # I-JEPA .pth.tar


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_archive_is_read_as_state_dict(tmp_path):
    """OpenAI's CLIP files are TorchScript archives (clip.load's default): read their weights without pickle."""
    from align.encoders import read_state

    module = torch.jit.script(torch.nn.Linear(3, 2))
    torch.jit.save(module, str(tmp_path / "ViT-L-14.pt"))
    state = read_state(tmp_path / "ViT-L-14.pt")
    assert torch.equal(state["weight"], module.weight) and set(state) == {"weight", "bias"}


@pytest.mark.parametrize("name", ["dinov2-vit-b", "clip-vit-l", "mae-vit-l", "jepa-vit-h"])
def test_original_published_layout_loads_like_timm_layout(name, tmp_path):
    state = save_stand_in(name, tmp_path / "model.safetensors")
    torch.save(_to_original_layout(name, state), tmp_path / "original.pth")
    a = build_encoder(name, tmp_path / "model.safetensors", IMAGE, GRID, **TINY)
    b = build_encoder(name, tmp_path / "original.pth", IMAGE, GRID, **TINY)
    assert torch.equal(a(images()), b(images()))


# A checkpoint of another registered architecture, with the same tiny width, for each entry.
WRONG = {
    **{f"dinov2-vit-{k}": f"dinov2reg-vit-{k}" for k in "sblg"},  # unexpected register tokens
    **{f"dinov2reg-vit-{k}": f"dinov2-vit-{k}" for k in "sblg"},  # missing register tokens
    "clip-vit-l": "dinov2-vit-l",  # no ln_pre, has layer scale
    "mae-vit-l": "dinov2-vit-l",  # patch 14 instead of 16
    "jepa-vit-h": "mae-vit-l",  # patch 16 instead of 14, CLS token
}


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_wrong_architecture_is_refused_clearly(name, tmp_path):
    path = tmp_path / "other.safetensors"
    save_stand_in(WRONG[name], path)
    with pytest.raises(ValueError, match=rf"is not a checkpoint of encoder '{name}'.*align\.encoder_weights\.{name}"):
        build_encoder(name, path, IMAGE, GRID, **TINY)


def test_wrong_width_and_swiglu_are_refused(tmp_path):
    save_stand_in("dinov2-vit-l", tmp_path / "l.safetensors")
    with pytest.raises(ValueError, match="shape mismatch"):
        build_encoder("dinov2-vit-g", tmp_path / "l.safetensors", IMAGE, GRID, **TINY)  # MLP vs SwiGLU
    save_stand_in("dinov2-vit-b", tmp_path / "b.safetensors", embed_dim=48)
    with pytest.raises(ValueError, match="shape mismatch"):
        build_encoder("dinov2-vit-b", tmp_path / "b.safetensors", IMAGE, GRID, **TINY)


def test_missing_weights_name_file_source_and_key(tmp_path, monkeypatch):
    import huggingface_hub.constants

    with pytest.raises(FileNotFoundError) as err:
        build_encoder("dinov2-vit-b", tmp_path / "nope.pth", IMAGE, GRID)
    msg = str(err.value)
    assert "nope.pth" in msg and "dinov2_vitb14_pretrain.pth" in msg and "timm/vit_base_patch14_dinov2.lvd142m" in msg
    assert "align.encoder_weights.dinov2-vit-b" in msg
    # Nothing given and empty caches: says so, never downloads.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face or torch.hub cache"):
        build_encoder("jepa-vit-h", None, IMAGE, GRID, config_key="align.encoder_weights.jepa-vit-h")


def test_weights_found_in_local_hf_and_torch_hub_caches(tmp_path, monkeypatch):
    import huggingface_hub.constants

    snapshot = tmp_path / "hf" / "models--timm--vit_small_patch14_dinov2.lvd142m"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("abc123")
    (snapshot / "snapshots" / "abc123").mkdir(parents=True)
    save_stand_in("dinov2-vit-s", snapshot / "snapshots" / "abc123" / "model.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    assert build_encoder("dinov2-vit-s", None, IMAGE, GRID, **TINY).num_tokens == GRID * GRID
    assert build_encoder("dinov2-vit-s", snapshot / "snapshots" / "abc123", IMAGE, GRID, **TINY).dim == 32  # folder
    # The torch.hub checkpoint folder, where REPA's torch.hub.load put DINOv2 (original layout).
    state = save_stand_in("dinov2-vit-b", tmp_path / "b.safetensors")
    (tmp_path / "torch" / "checkpoints").mkdir(parents=True)
    torch.save(_to_original_layout("dinov2-vit-b", state), tmp_path / "torch" / "checkpoints" / "dinov2_vitb14_pretrain.pth")
    assert build_encoder("dinov2-vit-b", None, IMAGE, GRID, **TINY).dim == 32


def _normalize(x, spec):
    return (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_preprocessing_order_and_resize_size(name):
    spec = ENCODERS[name]
    _, side, normalize_first = SPEC_TABLE[name]
    enc = FrozenEncoder(name, spec, create_encoder_model(spec, GRID, **TINY), IMAGE, GRID)
    pixels = images()
    x = pixels.float() / 255

    def resize(v):  # REPA: F.interpolate(x, 224, mode='bicubic'), i.e. no antialias, align_corners False
        return v if v.shape[-1] == side else F.interpolate(v, side, mode="bicubic")

    ours = enc.preprocess(pixels)
    reference = resize(_normalize(x, spec)) if normalize_first else _normalize(resize(x), spec)
    other = _normalize(resize(x), spec) if normalize_first else resize(_normalize(x, spec))
    assert tuple(ours.shape) == (2, 3, side, side)
    assert torch.equal(ours, reference)  # bit-level: the reference order
    assert torch.allclose(other, reference, atol=1e-4)  # the other order is the same function up to rounding
    if side != IMAGE:
        assert not torch.equal(other, reference)
    with pytest.raises(ValueError, match="uint8"):
        enc.preprocess(x)
