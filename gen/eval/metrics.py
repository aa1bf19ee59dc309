"""Streaming FID, sFID, IS, precision/recall and FD-DINOv2 over any number of processes (the ADM
protocol of guided-diffusion evaluations/evaluator.py; FD-DINOv2 as in dgm-eval).

    suite = MetricSuite(["fid", "is", "pr"], cfg.eval, device)   # loads the feature networks (local weights)
    for images, index in my_batches:                             # each process: its own samples
        suite.update(images, index)                              # uint8 (N, 3, H, W), global sample indices (N,)
    scores = suite.compute()                                     # collective: the same dict on every process
    suite.reset()                                                # e.g. before the next training-time FID-10K

Nothing is written to disk and no image is kept: per process, float64 feature statistics, the Inception Score's
per-split sums and (for precision/recall only) the pool_3 features. compute() all-reduces / gathers them, resolves
the reference once (stored ADM statistics, or computed from the reference images and cached) and scores on rank 0.
The result does not depend on the number of processes or the batch size: sums are exact up to float64 rounding,
IS splits and gathered rows follow the global sample index.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from gen.eval.accumulate import Accumulator, Features
from gen.eval.collective import Collective
from gen.config import ConfigError
from gen.data import DataError
from gen.eval.reference import Reference, check_reference, resolve_reference
from gen.eval.scores import frechet_distance_pruned, precision_recall


def _inception(cfg):
    from gen.eval.inception import InceptionFeatures

    return InceptionFeatures(cfg.inception_weights, cfg.inception_sha256)


def _dinov2(cfg):
    from gen.eval.dinov2 import DinoV2Features

    return DinoV2Features(cfg.dinov2_weights, cfg.dinov2_arch, cfg.dinov2_sha256)


# Feature networks by name: fn(cfg.eval) -> module with `dims` {feature: width}, `sha256`, describe(), forward(uint8).
NETWORKS: dict[str, Callable] = {"inception": _inception, "dinov2": _dinov2}


def _frechet(name: str, feature: str, samples: Features, reference: Reference, cfg) -> dict:
    stats = samples.stats[feature]
    mu, sigma = reference.stats[feature]
    return {name: frechet_distance_pruned(stats.mean(), stats.cov(), mu, sigma)}


def _inception_score(samples: Features, reference: Reference, cfg) -> dict:
    return samples.splits.score()


def _precision_recall(samples: Features, reference: Reference, cfg) -> dict:
    return precision_recall(reference.features["pool_3"], samples.gathered["pool_3"], cfg.pr_k, cfg.pr_mode)


@dataclass(frozen=True)
class Metric:
    """What a metric reads (its network; features kept as statistics, gathered, or as IS split sums) and its scorer."""

    network: str
    score: Callable[[Features, Reference, object], dict]
    stats: tuple[str, ...] = ()
    gather: tuple[str, ...] = ()
    splits: str | None = None


# The ADM suite (FID, sFID, IS, precision/recall) and FD-DINOv2; keys are the names users type in eval.metrics.
METRICS: dict[str, Metric] = {
    "fid": Metric("inception", partial(_frechet, "fid", "pool_3"), stats=("pool_3",)),
    "sfid": Metric("inception", partial(_frechet, "sfid", "spatial"), stats=("spatial",)),
    "is": Metric("inception", _inception_score, splits="logits"),
    "pr": Metric("inception", _precision_recall, gather=("pool_3",)),
    "fd_dinov2": Metric("dinov2", partial(_frechet, "fd_dinov2", "dinov2"), stats=("dinov2",)),
}


def min_samples(name: str, cfg) -> int:
    """Samples metric `name` needs: a Frechet distance a covariance (2), precision/recall k-NN radii (eval.pr_k + 1)."""
    if name == "pr":
        return cfg.pr_k + 1
    return 2 if METRICS[name].stats else 1


class MetricSuite:
    """Streams uint8 image batches into the requested metrics; compute() is collective and process-count independent."""

    def __init__(self, metrics, cfg, device: torch.device | str = "cpu", networks: dict | None = None,
                 reference: Reference | None = None, collective: bool | None = None):
        unknown = [m for m in metrics if m not in METRICS]
        if unknown or not metrics:
            raise ConfigError(f"config key 'eval.metrics': unknown or empty {list(metrics)}; any of {sorted(METRICS)}")
        self.metrics = {m: METRICS[m] for m in dict.fromkeys(metrics)}
        self.cfg, self.device = cfg, torch.device(device)
        self.comm = Collective(collective)  # None: torch.distributed when initialised; False: this process alone
        given = networks or {}
        self.networks = {}
        for name in sorted({m.network for m in self.metrics.values()}):
            net = given[name] if name in given else NETWORKS[name](cfg)  # a missing weights file fails here
            self.networks[name] = net.to(self.device).eval()
        self.reference = reference
        self.statistics: dict = {}  # after compute(): the samples' (mu, sigma) per feature, on every process
        self.reset()

    def reset(self) -> None:
        """Forget the samples seen so far (networks and the resolved reference stay)."""
        specs = self.metrics.values()
        self._acc = Accumulator(self.networks, stats={f for m in specs for f in m.stats},
                                gather={f for m in specs for f in m.gather},
                                splits=next((m.splits for m in specs if m.splits), None),
                                split_size=self.cfg.is_split_size, device=self.device)
        self._next, self._implicit = 0, False

    def update(self, images, index=None) -> None:
        """Add uint8 images (N, 3, H, W) with their global sample indices (N,); without indices: 0, 1, ... per
        process."""
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if index is None:
            index, self._implicit = torch.arange(self._next, self._next + len(images)), True
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        if len(index) != len(images):
            raise ValueError(f"{len(images)} images but {len(index)} indices")
        self._next += len(images)
        step = self.cfg.batch_per_process
        for start in range(0, len(images), step):
            self._acc.update(images[start:start + step], index[start:start + step])

    def check_count(self, n: int, source) -> None:
        """Before any pass: refuse `n` samples of `source` that are too few for a metric (see `min_samples`)."""
        for name in self.metrics:
            need, needs, fix = self._requirement(name)
            if n < need:
                raise DataError(f"{source} holds {n} image(s), and {needs}; give more samples{fix}")

    def _requirement(self, name: str) -> tuple[int, str, str]:
        """(images metric `name` needs, the clause saying so, the other fix than more images)."""
        need = min_samples(name, self.cfg)
        if name == "pr":
            return need, f"pr needs at least {need} (eval.pr_k + 1)", " or lower eval.pr_k"
        return need, f"{name} needs at least {need}", ""

    def check_reference(self) -> None:
        """Check eval.reference holds what these metrics need (keys, shapes), from its headers: before any pass."""
        if self.reference is None:
            specs = self.metrics.values()
            dims = {f: d for net in self.networks.values() for f, d in net.dims.items()}
            # the reference's own images, where they are read, feed the same statistics and k-NN radii
            need = max((self._requirement(name) for name, m in self.metrics.items() if m.stats or m.gather),
                       default=(1, "", ""))
            check_reference(self.cfg.reference, {f for m in specs for f in m.stats},
                            {f for m in specs for f in m.gather}, dims, self.cfg.image_size, self.cfg.prescan,
                            min_images=need)

    def resolve_reference(self) -> Reference:
        """The reference for these metrics, resolved once (collective when it is computed from images)."""
        if self.reference is None:
            specs = self.metrics.values()
            self.reference = resolve_reference(self.cfg.reference, {f for m in specs for f in m.stats},
                                               {f for m in specs for f in m.gather}, self.networks, self.cfg,
                                               self.device, self.comm)
        return self.reference

    def compute(self) -> dict:
        """All metrics over every process's samples (call on every process); {"fid": ..., "num_samples": N, ...}."""
        if self._implicit and self.comm.world > 1 and "is" in self.metrics:
            raise ValueError("several processes: pass global sample indices to update(images, index), the "
                             "Inception Score's splits follow them")
        reference = self.resolve_reference()
        samples = self._acc.reduce(self.comm)
        self.statistics = {f: (st.mean(), st.cov()) for f, st in samples.stats.items() if st.count > 1}
        ok, outcome, error = True, None, None
        if self.comm.rank == 0:  # one process scores (eigendecompositions, k-NN); the others wait for its result
            try:
                if samples.count == 0:
                    raise ValueError("no samples were passed to MetricSuite.update")
                scores = {}
                for metric in self.metrics.values():
                    scores.update(metric.score(samples, reference, self.cfg))
                outcome = {**scores, "num_samples": samples.count}
            except Exception as err:  # noqa: BLE001 -- any failure: tell the waiting processes, re-raise it here
                ok, outcome, error = False, f"{type(err).__name__}: {err}", err
        ok, outcome = self.comm.broadcast((ok, outcome))
        if error is not None:
            raise error
        if not ok:
            raise RuntimeError(f"scoring failed on process 0: {outcome}")
        return outcome

    def protocol(self) -> dict:
        """How the numbers were obtained: networks and weight hashes, P/R mode, IS splits, reference, processes."""
        record = {"metrics": list(self.metrics), "processes": self.comm.world,
                  "networks": {name: net.describe() for name, net in self.networks.items()}}
        if "pr" in self.metrics:
            record["precision_recall"] = {"k": self.cfg.pr_k, "distances": self.cfg.pr_mode}
        if "is" in self.metrics:
            record["inception_score"] = {"split_size": self.cfg.is_split_size, "softmax": "pool_3 x fc.weight, no bias"}
        if self.reference is not None and self.reference.record:
            record["reference"] = self.reference.record
        return record


def evaluate_images(images, metrics, cfg, device: torch.device | str | None = None) -> dict:
    """Metrics of all images (N, 3, H, W) uint8 held by this process, in global order (sample.py's SAMPLE_METRICS)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    suite = MetricSuite(metrics, cfg, device, collective=False)
    suite.update(images)
    return {**suite.compute(), "protocol": suite.protocol()}
