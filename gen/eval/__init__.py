"""Metrics: Gaussian feature statistics and the Frechet distance, the offline digits metric, FID-family scores."""
from __future__ import annotations


def digits_metric(images, labels, cfg) -> dict:
    """Class consistency and Frechet distance of generated digits (gen.eval.digits), for sample.py."""
    from gen.eval.digits import DigitsEvaluator

    return DigitsEvaluator(cfg.data.image_size).evaluate(images, labels)


# Metrics sample.py computes on the samples it drew (`sample.metrics=[...]`): fn(images uint8, labels, cfg) -> dict.
SAMPLE_METRICS = {"digits": digits_metric}
