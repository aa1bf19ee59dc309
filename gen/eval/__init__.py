"""Metrics: Gaussian feature statistics and the Frechet distance, the offline digits metric, FID-family scores.

Metric suites are registered per modality (latents.LatentSpace.modality): `STREAMED[modality]` names the module
whose `METRICS` and `MetricSuite` score samples while they are drawn (sample.py, training-time FID), and
`SAMPLE_METRICS[modality]` the metrics computed once all samples are drawn. A new modality registers its suite here.
"""
from __future__ import annotations

import importlib


def digits_metric(images, labels, cfg) -> dict:
    """Class consistency and Frechet distance of generated digits (gen.eval.digits), for sample.py."""
    from gen.eval.digits import DigitsEvaluator

    return DigitsEvaluator(cfg.data.image_size).evaluate(images, labels)


def reconstruction(images, labels, cfg) -> dict:
    """Reconstruction error of the run's latent space on held-out images (gen.eval.reconstruction), for sample.py."""
    from gen.eval.reconstruction import reconstruction_metric

    return reconstruction_metric(images, labels, cfg)


STREAMED: dict[str, str] = {"image": "gen.eval.metrics"}
"""Modality -> module with the streamed metric registry (METRICS) and its MetricSuite."""

def _shape_metrics() -> dict:
    from gen.eval.shapes import SHAPE_METRICS, sample_metric

    return {name: sample_metric(name) for name in SHAPE_METRICS}


SAMPLE_METRICS: dict[str, dict] = {"image": {"digits": digits_metric, "reconstruction": reconstruction},
                                   "shape": _shape_metrics()}
"""Modality -> metrics sample.py computes once all samples are drawn, on the main process:
fn(decoded samples, labels, cfg) -> dict."""

# Shorthands for groups of gen.eval.metrics.METRICS; "adm" is the suite papers report (one Inception pass).
SUITE_ALIASES = {"adm": ("fid", "sfid", "is", "pr")}


def split_sample_metrics(names, modality: str = "image") -> tuple[list[str], list[str]]:
    """`sample.metrics` for samples of `modality` -> (names streamed into one MetricSuite while sampling,
    SAMPLE_METRICS names); a metric not registered for the modality is refused naming it."""
    from gen.config import ConfigError

    streamed_registry = importlib.import_module(STREAMED[modality]).METRICS if modality in STREAMED else {}
    after_registry = SAMPLE_METRICS.get(modality, {})
    aliases = SUITE_ALIASES if modality in STREAMED else {}
    streamed, after = [], []
    for name in names:
        if name in after_registry:
            after.append(name)
        elif name in aliases or name in streamed_registry:
            streamed += aliases.get(name, (name,))
        else:
            known = sorted({*after_registry, *aliases, *streamed_registry})
            raise ConfigError(f"config key 'sample.metrics': unknown metric {name!r} for {modality} samples; "
                              f"one of {known}")
    return list(dict.fromkeys(streamed)), after


SAMPLE_MIN_SAMPLES: dict[str, int] = {"digits": 2}
"""SAMPLE_METRICS that need more than one sample (digits: a Frechet distance of classifier features)."""


def min_samples(name: str, ecfg, modality: str = "image") -> int:
    """Samples a `sample.metrics` entry (streamed or computed after sampling, aliases expanded) needs."""
    if name in SAMPLE_METRICS.get(modality, {}):
        return SAMPLE_MIN_SAMPLES.get(name, 1)
    module = importlib.import_module(STREAMED[modality])
    return max(module.min_samples(m, ecfg) for m in SUITE_ALIASES.get(name, (name,)))


def build_suite(names: list[str], ecfg, device, modality: str = "image"):
    """The streamed metric suite of `modality` computing `names` (its networks load and eval.reference is checked
    now: missing or wrong files fail early)."""
    from gen.config import ConfigError

    if modality not in STREAMED:
        raise ConfigError(f"no streamed metrics are registered for {modality} samples (metrics {names})")
    suite = importlib.import_module(STREAMED[modality]).MetricSuite(names, ecfg, device)
    suite.check_reference()  # a reference without the needed keys fails now, not after the sampling pass
    return suite
