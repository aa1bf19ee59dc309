"""Building blocks shared by the transformer backbones.

Module and parameter names follow the official DiT/SiT/REPA code (timm's PatchEmbed, Attention and Mlp
naming), so their checkpoints load with `load_state_dict` (DiT models.py, SiT models.py, REPA models/sit.py).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gen.dropout import SampleDropout, dropout


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation of tokens (N, T, D) by per-sample shift/scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """MAE 1-D sin-cos embedding: frequencies 1/10000^(2i/dim), sin half then cos half, float64."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)  # (M, dim/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid: tuple[int, int]) -> Tensor:
    """MAE 2-D sin-cos position embedding for an (h, w) token grid, shape (h*w, dim), row-major tokens.

    MAE quirk kept for checkpoint compatibility: the first half of the channels encodes the column
    coordinate, the second half the row coordinate.
    """
    h, w = grid
    cols, rows = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    emb = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    return torch.from_numpy(emb).float()


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens (N, T, D), a strided conv (timm's PatchEmbed layout)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, H/p * W/p, D), contiguous.

        The transposed conv output would otherwise lay the whole residual stream out token-fastest (elementwise
        ops keep their first operand's layout): every LayerNorm then copies its input to a contiguous one, forward
        and backward, and the residual adds run strided. Same values either way.
        """
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class TimestepEmbedder(nn.Module):
    """Scalar time -> (N, D): 256-d sinusoidal features (cos half first, max period 1e4) -> MLP.

    DiT feeds integer t in [0, 999], SiT/REPA feed t in [0, 1]; the embedder takes t as given, the
    objective owns the units. The features are computed in float32 whatever the autocast dtype.
    """

    def __init__(self, hidden_size: int, frequency_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_size = frequency_size
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def frequencies(self, device=None) -> Tensor:
        """The (frequency_size/2,) angular frequencies exp(-log(max_period) * i / half)."""
        half = self.frequency_size // 2
        return torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=device) / half)

    def features(self, t: Tensor) -> Tensor:
        """The sinusoidal features (N, frequency_size), cos then sin."""
        args = t.float()[:, None] * self.frequencies(t.device)[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.frequency_size % 2:
            emb = F.pad(emb, (0, 1))
        return emb

    def forward(self, t: Tensor) -> Tensor:
        """(N,) -> (N, D)."""
        return self.mlp(self.features(t))


class LabelEmbedder(nn.Module):
    """Class label -> (N, D); row `num_classes` is the null (unconditional) class.

    Label dropout is not done here: the objective drops labels so every caller sees the same labels.
    """

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: Tensor) -> Tensor:
        """(N,) long -> (N, D)."""
        return self.embedding_table(y)


def rotate_pairs(x: Tensor) -> Tensor:
    """Rotate interleaved channel pairs by 90 degrees: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., Dh/2, 2)
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class Rope2D(nn.Module):
    """2-D axial rotary position embedding of per-head queries/keys for an (h, w) token grid, row-major tokens.

    Follows EVA-02's `VisionRotaryEmbeddingFast` as LightningDiT builds it (dim = head_dim / 2,
    pt_seq_len = grid side; ERW uses LightningDiT's attention):
    - channels [0, Dh/2) rotate by the token's row index, channels [Dh/2, Dh) by its column index;
    - in each half, the interleaved pair (2j, 2j+1) turns at omega_j = theta^(-2j / (Dh/2)), j < Dh/4, theta 1e4;
    - positions are the integer patch indices, not rescaled (EVA's ft_seq_len = pt_seq_len case);
    - x -> x cos + rotate_pairs(x) sin, i.e. the pair (a, b) -> (a cos - b sin, b cos + a sin).
    Unlike EVA, the grid may be rectangular and the angles are computed in float64 (tables stored in float32).
    The tables are non-persistent buffers: no state-dict entries, official checkpoints load unchanged.
    """

    def __init__(self, head_dim: int, grid: tuple[int, int], theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head width divisible by 4, got {head_dim}")
        half = head_dim // 2
        h, w = grid
        omega = theta ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)  # (Dh/4,)
        rows = torch.arange(h, dtype=torch.float64)[:, None, None] * omega  # (h, 1, Dh/4)
        cols = torch.arange(w, dtype=torch.float64)[None, :, None] * omega  # (1, w, Dh/4)
        angles = torch.cat([rows.expand(h, w, -1), cols.expand(h, w, -1)], dim=-1)  # (h, w, Dh/2)
        angles = angles.repeat_interleave(2, dim=-1).reshape(h * w, head_dim)  # (T, Dh), pairs share an angle
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """(..., T, Dh) -> same shape and dtype; the rotation itself runs in float32."""
        if x.shape[-2:] != self.cos.shape:
            raise ValueError(f"RoPE built for (T, Dh) = {tuple(self.cos.shape)}, got {tuple(x.shape[-2:])}")
        xf = x.float()
        return (xf * self.cos + rotate_pairs(xf) * self.sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention`, optional per-head QK-norm and 2-D RoPE.

    `rope` is the (h, w) token grid to rotate queries and keys on (after QK-norm, as LightningDiT); None: off.
    `drop` > 0: timm's attn_drop and proj_drop (gen.dropout.SampleDropout). While training, the attention weights
    are then computed explicitly, softmax(q k^T / sqrt(Dh)) with a per-sample mask, then applied to v (timm's
    Attention, as MAE/MAGE/ADDP use it); eval, or no dropout: SDPA.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, rope: tuple[int, int] | None = None,
                 drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        # REPA's qk_norm flag builds timm's Attention with an affine LayerNorm per head (eps 1e-5).
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.rope = Rope2D(self.head_dim, rope) if rope is not None else None  # no parameters, no state
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = SampleDropout(drop) if drop > 0 else None  # on the attention weights (timm's attn_drop)
        self.proj_drop = dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        """(N, T, D) -> (N, T, D)."""
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, N, H, T, Dh)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)  # (N, H, T, Dh)
        if self.attn_drop is not None and self.attn_drop.active:
            x = self.attn_drop(((q * self.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(n, t, d)))  # x: (N, H, T, Dh)


class CrossAttention(nn.Module):
    """Multi-head attention of tokens (N, T, D) over a context (N, S, D): queries from the tokens, keys and values from
    the context (Stable Diffusion's cross-attention, Rombach et al. 2022, section 3.3), optional per-head QK-norm.

    Each token attends on its own: the output of a token depends on it and the context only, not on the other tokens
    or their order."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """(N, T, D) tokens over (N, S, D) context -> (N, T, D)."""
        n, t, d = x.shape
        q = self.q_norm(self.q(x).reshape(n, t, self.num_heads, self.head_dim).transpose(1, 2))  # (N, H, T, Dh)
        kv = self.kv(context).reshape(n, context.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = self.k_norm(kv[0]), kv[1]  # (N, H, S, Dh)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class ContextBlock(nn.Module):
    """x + CrossAttention(LN(x), context): the pre-LN cross-attention sub-block a transformer inserts after each of its
    blocks to read a context (text tokens). `zero_init` clears the output projection, so a fresh block is the
    identity and a fresh model computes what it computes without a context (the adaLN-Zero idea)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = CrossAttention(dim, num_heads, qk_norm=qk_norm)

    def zero_init(self) -> None:
        """Zero the output projection (weights and bias): the block then returns its input."""
        nn.init.zeros_(self.attn.proj.weight)
        nn.init.zeros_(self.attn.proj.bias)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """Tokens (N, T, D) reading context (N, S, D)."""
        return x + self.attn(self.norm(x), context)


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU (timm's Mlp names: fc1, fc2); `approximate="none"`: exact GELU
    (timm's default, as in MAE/MAGE ViTs)."""

    def __init__(self, dim: int, hidden: int, approximate: str = "tanh", drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop1 = dropout(drop)  # timm's Mlp: after the activation and after fc2
        self.drop2 = dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        """(N, T, D) -> (N, T, D)."""
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-LN transformer block, x + attn(LN(x)) then x + mlp(LN(x)) (timm's Block names as in MAE/MAGE: norm1,
    attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2); qkv bias, exact GELU, LayerNorm eps 1e-6; `drop`: timm's
    dropout (drop_rate = attn_drop_rate, as MAE/MAGE/ADDP set them) on the attention weights, after the attention
    projection, after the MLP's activation and after fc2, while training; 0 builds none (no random draws)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6, drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate="none", drop=drop)

    def forward(self, x: Tensor) -> Tensor:
        """(N, T, D) -> (N, T, D)."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AdaLNBlock(nn.Module):
    """adaLN-Zero transformer block (DiT paper, Fig. 3): gated, modulated attention and MLP.

    `rope`: the (h, w) token grid for 2-D RoPE in the attention, None: off.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 rope: tuple[int, int] | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, rope=rope)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """Tokens (N, T, D) conditioned on c (N, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)  # 6 x (N, D)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))  # (N, T, D)
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))  # (N, T, D)
        return x


class FinalLayer(nn.Module):
    """Modulated LayerNorm then a Linear to p*p*C_out values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """(N, T, D) -> (N, T, p*p*C_out)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x: Tensor, grid: tuple[int, int], patch_size: int, channels: int) -> Tensor:
    """Tokens (N, h*w, p*p*C) -> (N, C, h*p, w*p); within a token row the channel varies fastest."""
    h, w = grid
    p = patch_size
    x = x.reshape(x.shape[0], h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, h * p, w * p)
