"""Metrics: Gaussian feature statistics and the Frechet distance, the offline digits metric, FID-family scores."""
from __future__ import annotations


def digits_metric(images, labels, cfg) -> dict:
    """Class consistency and Frechet distance of generated digits (gen.eval.digits), for sample.py."""
    from gen.eval.digits import DigitsEvaluator

    return DigitsEvaluator(cfg.data.image_size).evaluate(images, labels)


# Metrics sample.py computes once all samples are drawn, on the main process: fn(images uint8, labels, cfg) -> dict.
SAMPLE_METRICS = {"digits": digits_metric}

# Shorthands for groups of gen.eval.metrics.METRICS; "adm" is the suite papers report (one Inception pass).
SUITE_ALIASES = {"adm": ("fid", "sfid", "is", "pr")}


def split_sample_metrics(names) -> tuple[list[str], list[str]]:
    """`sample.metrics` -> (FID-family names streamed into one MetricSuite while sampling, SAMPLE_METRICS names)."""
    from gen.config import ConfigError
    from gen.eval.metrics import METRICS

    streamed, after = [], []
    for name in names:
        if name in SAMPLE_METRICS:
            after.append(name)
        elif name in SUITE_ALIASES or name in METRICS:
            streamed += SUITE_ALIASES.get(name, (name,))
        else:
            known = sorted({*SAMPLE_METRICS, *SUITE_ALIASES, *METRICS})
            raise ConfigError(f"config key 'sample.metrics': unknown metric {name!r}; one of {known}")
    return list(dict.fromkeys(streamed)), after
