r"""Score samples against a reference across processes: FID, sFID, IS, precision/recall (the ADM suite), FD-DINOv2;
for 3D shapes (eval.metrics=[cd,emd]) COV / MMD / 1-NNA of a folder of meshes or an .npz of point clouds against
eval.reference (gen.eval.shapes).

    # paper-comparable FID-50K etc. (ADM protocol) of sample.py's .npz on 8 GPUs
    accelerate launch --multi_gpu --num_processes 8 evaluate.py runs/sit-xl2/samples/NAME.npz \
        eval.reference=VIRTUAL_imagenet256_labeled.npz \
        eval.inception_weights=weights-inception-2015-12-05-6726825d.pth
    # reference statistics of your own data, in the same ADM layout (mu, sigma, mu_s, sigma_s, arr_0)
    accelerate launch --multi_gpu --num_processes 8 evaluate.py --make-reference /data/imagenet/train \
        --out imagenet256_ref.npz eval.image_size=256 eval.inception_weights=...

Samples: an .npz with arr_0 (uint8 N x H x W x 3, as sample.py and ADM write) or a folder of images. Reference
(eval.reference): an .npz whose stored statistics are used as they are (its arr_0 images give precision/recall
and any statistics it lacks), or a folder of images. Prints the scores and writes them with the protocol (sample
count, the sampling record sample.py wrote next to the .npz: labels, rounding, sampler; networks and weight sha256;
P/R mode; reference) to a JSON file; --save-stats also writes the samples' statistics in the reference layout.
Keys: python evaluate.py --help-config.

Linear probe of a run's image encoder (ADDP's pixel encoder; gen.eval.probe), its EMA weights and the same network
at the run's initialisation, on the run's data or any image dataset (data.* overrides):
    python evaluate.py runs/quickstart_addp --probe
    python evaluate.py runs/quickstart_addp --probe eval.probe_encoder=init
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from accelerate import Accelerator

from gen.config import describe, load_config
from gen.errors import DEBUG_HELP, one_line_errors
from gen.eval.accumulate import feed
from gen.eval.metrics import METRICS, MetricSuite
from gen.eval.probe import run_probe
from gen.eval.reference import make_reference, open_images, write_stats
from gen.eval.shapes import SHAPE_METRICS, evaluate_shapes
from gen.eval.shapes import protocol as shape_protocol
from gen.io import atomic_write_text, check_writable_file
from gen.precision import flush_denormals


def default_out(images: Path, make: bool) -> Path:
    """X.npz -> X.metrics.json (or the folder's sibling NAME.metrics.json); references: NAME_ref.npz."""
    if make:
        return images.parent / f"{images.stem}_ref.npz"
    return images.with_suffix(".metrics.json") if images.is_file() else images.parent / f"{images.name}.metrics.json"


def sampling_record(images: Path) -> dict | None:
    """sample.py's protocol record (<name>.json next to <name>.npz: labels, rounding, sampler, seed, checkpoint)."""
    path = images.with_suffix(".json")
    if images.is_file() and path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
    return None


def write_json(path: Path, obj: dict) -> None:
    """Write JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=1))


def main(argv: list[str] | None = None) -> Path:
    """Command-line entry point; returns the JSON (or, with --make-reference, the .npz) path."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="?", help="samples (.npz with arr_0, or a folder); with --make-reference the "
                                                  "dataset (.npz or folder); with --probe the run")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. eval.reference=REF.npz")
    parser.add_argument("--config", help="YAML file of overrides (only its eval section matters)")
    parser.add_argument("--out", help="output path (default: next to the images)")
    parser.add_argument("--save-stats", help="also write the samples' statistics (ADM layout, no images) here")
    parser.add_argument("--make-reference", action="store_true",
                        help="write ADM-layout reference statistics (+ arr_0 for precision/recall) of the images")
    parser.add_argument("--probe", action="store_true",
                        help="linear probe of the image encoder of the run (folder or checkpoint) given as images")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its meaning")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = parser.parse_intermixed_args(argv)  # options may sit between the images and the overrides
    if args.help_config:
        print(describe())
        sys.exit(0)
    if args.images is None:
        parser.error("the images (.npz or folder) are required")
    flush_denormals()  # CPU arithmetic: denormals to zero (gen.precision)
    with one_line_errors(args.debug):  # an expected failure ends in one line `error: ...` (traceback: --debug)
        if args.probe:
            return run_probe(args.images, args.overrides, args.out)
        return run(args)


def run(args) -> Path:
    """Validate (config, networks, reference, samples, output folder), then score or make the reference."""
    cfg = load_config(args.config, args.overrides)
    e = cfg.eval
    images = Path(args.images).expanduser()
    out = Path(args.out) if args.out else default_out(images, args.make_reference)
    check_writable_file(out, "--out")
    if args.save_stats:
        check_writable_file(args.save_stats, "--save-stats")

    accelerator = Accelerator()
    if all(m in SHAPE_METRICS for m in e.metrics):  # 3D shapes: a folder of meshes or an .npz of point clouds
        scores = evaluate_shapes(images, e, accelerator.device)
        if accelerator.is_main_process:
            record = {"samples": str(images), "sampling": sampling_record(images),
                      "processes": accelerator.num_processes, **shape_protocol(e)}
            write_json(out, {"metrics": scores, "protocol": record})
            print(json.dumps(scores, indent=1))
            print(f"wrote {out}")
        accelerator.wait_for_everyone()
        return out
    suite = MetricSuite(e.metrics, e, accelerator.device)  # loads the networks: a missing file fails here
    if args.make_reference:
        stats = sorted({f for m in e.metrics for f in METRICS[m].stats})
        make_reference(images, out, stats, suite.networks, e, accelerator.device, suite.comm,
                       with_images="pr" in e.metrics)
        accelerator.wait_for_everyone()
        images_note = f" and arr_0 ({e.pr_reference_size} images at most)" if "pr" in e.metrics else ""
        accelerator.print(f"wrote {out}: statistics of {stats}{images_note}")
        return out
    source = open_images(images, check_files=e.prescan)  # a corrupt or odd-sized file fails now, not mid-pass
    suite.check_count(len(source), images)
    suite.check_reference()  # eval.reference's keys and shapes, before the Inception pass over the samples
    feed(suite.update, source, np.arange(len(source)), e.batch_per_process, suite.comm, "samples")
    scores = suite.compute()
    if accelerator.is_main_process:
        protocol = {"samples": str(images), "num_samples": len(source), "sampling": sampling_record(images),
                    **suite.protocol()}
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, {"metrics": scores, "protocol": protocol})
        if args.save_stats:
            write_stats(args.save_stats, suite.statistics, num_images=np.int64(len(source)))
        print(json.dumps(scores, indent=1))
        print(f"wrote {out}")
    accelerator.wait_for_everyone()
    return out


if __name__ == "__main__":
    main()
