"""The `eval` section of a run's config: evaluate.py, the metrics sample.py streams into, training-time FID tracking
and the linear probe (gen.eval). Outside the gen.eval package, whose import gen.config must not trigger (it imports
no registry at import time)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class EvalConfig:
    """FID-family evaluation: evaluate.py, the metrics sample.py streams into, training-time tracking (gen.eval)."""

    metrics: List[str] = field(default_factory=lambda: ["fid", "sfid", "is", "pr"])
    """Metrics: fid, sfid, is, pr (the ADM suite) and fd_dinov2; for 3D shapes cd and/or emd (COV, MMD, 1-NNA)."""
    reference: Optional[str] = None
    """Reference: an ADM-layout .npz (VIRTUAL_imagenet256_labeled.npz, or evaluate.py --make-reference) or a folder."""
    inception_weights: Optional[str] = None
    """Local weights-inception-2015-12-05-6726825d.pth (torch-fidelity v0.2.0) or pytorch-fid's pt_inception file."""
    inception_sha256: Optional[str] = None
    """Expected sha256 (or a prefix of >= 8 hex digits) of inception_weights; null skips the check."""
    dinov2_weights: Optional[str] = None
    """FD-DINOv2 encoder: local .pth/.safetensors, or a repo id in the local HF cache; null: timm/<arch>.lvd142m."""
    dinov2_arch: str = "vit_large_patch14_dinov2"
    """timm DINOv2 architecture: vit_large_patch14_dinov2 (Stein et al.), or vit_base/vit_small for cheap tracking."""
    dinov2_sha256: Optional[str] = None
    """Expected sha256 (or a prefix of >= 8 hex digits) of the DINOv2 weights file; null skips the check."""
    pr_mode: str = "fp16"
    """Precision/recall distances: fp16 (ADM parity, fp32 fallback per non-finite block) or fp32."""
    pr_k: int = 3
    """Precision/recall neighbourhood size k (Kynkaanniemi et al., ADM: 3)."""
    pr_reference_size: int = 10_000
    """Images of a reference folder used for precision/recall and written as arr_0 by --make-reference (ADM: 10K)."""
    is_split_size: int = 5000
    """Inception Score split size over global sample indices (ADM: 5000, i.e. 10 splits of 50K)."""
    image_size: Optional[int] = None
    """ADM center-crop size for folders of images of varying size (reference folders); null uses images as they are."""
    prescan: bool = True
    """Before any feature pass, open every file of a folder of images (samples, eval.reference, --make-reference) and
    refuse a corrupt one, or (eval.image_size null) one of another size; false skips the scan."""
    batch_per_process: int = 100
    """Images per feature-network forward on each process."""
    cache_dir: Optional[str] = None
    """Cache of reference features computed from images; null: $XDG_CACHE_HOME/repgen/eval (~/.cache/repgen/eval)."""
    shape_points: int = 2048
    """3D shapes (eval.metrics cd, emd): points per shape, farthest-point sampled from each mesh's surface."""
    emd_points: int = 256
    """3D shapes: EMD is the exact matching on the first emd_points of each cloud's farthest-point order."""
    probe_encoder: str = "ema"
    """evaluate.py --probe (gen.eval.probe): the run's ema weights, or init (the same network at the run's own
    initialisation, train.seed): the baseline."""
    probe_pool: str = "mean"
    """--probe features: mean (average of the encoder's grid tokens), cls, or both (concatenated)."""
    probe_l2: float = 1.0e-3
    """--probe: L2 penalty l2 / 2 ||W||^2 of the logistic regression on standardised features."""
    probe_heldout_fraction: float = 0.2
    """--probe: share of each class's images held out for scoring (fixed seed); the rest fit the classifier."""
    probe_max_images: Optional[int] = None
    """--probe: use at most this many images of the dataset (each class its share, fixed seed); null: all."""
