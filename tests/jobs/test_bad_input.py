"""The bad inputs a researcher really produces, run through the four jobs' entry points: each ends in one line
`error: ...` naming the cause, the key or file and the fix, before any pass over data and without writing anything.

Each row: the job, its command line (built in a fresh folder, after writing the bad input there) and the pieces the
line must hold. The folder (inputs included) and the trained run are compared before and after; the jobs' passes
(sampling, feature passes) are replaced by a failure, so a check that comes only after work fails the test.
"""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_validation import QUICK, TINY, inception, refused, trained  # noqa: F401 - fixtures used by name

import evaluate
import prepare
import sample as sample_job
import train as train_job
from helpers import REPO

pytestmark = pytest.mark.usefixtures("fresh_accelerate")

TEXT = str(REPO / "configs" / "quickstart_3d_text.yaml")


def pngs(folder, sizes=((12, 12), (12, 12)), last=None):
    """Random RGB PNGs of the given (width, height) in `folder`/c0; `last`: bytes of one more file, sorted last."""
    rng = np.random.default_rng(0)
    (folder / "c0").mkdir(parents=True)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / "c0" / f"{i}.png")
    if last is not None:
        (folder / "c0" / "z.png").write_bytes(last)
    return folder


def made(folder):
    """`folder`, created (empty)."""
    folder.mkdir()
    return folder


def npz(path, array):
    np.savez(path, arr_0=array)
    return path


def corrupt_checkpoint(d, run, name):
    shutil.copytree(run, d / "run")
    for f in (d / "run").rglob(name):
        f.write_bytes(f.read_bytes()[:200])  # truncated: the safetensors header is cut
    return d / "run"


BINARY = ["latent.name=binary", "objective.name=bernoulli", "sampler.sampler=ancestral", "sampler.num_steps=2",
          "data.image_size=16"]


def weights(path, truncate=False):
    """A safetensors file of one tensor no network has (`truncate`: cut inside its header)."""
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(path))
    if truncate:
        path.write_bytes(path.read_bytes()[:20])
    return path


def scores(*extra):
    """evaluate.py options of a cheap FID against a 4-image reference, with the test's random Inception weights."""
    return lambda d, inc: [f"eval.inception_weights={inc}", "eval.metrics=[fid]",
                           f"eval.reference={npz(d / 'ref.npz', np.zeros((4, 12, 12, 3), np.uint8))}", *extra]


def train_args(d, *extra):
    return [QUICK, *TINY, f"train.run_dir={d / 'run'}", *extra]


# (id, job, argv(folder, trained run, inception weights), pieces of the line)
CASES = [
    # train.py: keys, values and combinations, all refused by validation before anything is built
    ("unknown key", train_job, lambda d, r, i: train_args(d, "model.dit.depthh=2"),
     ["'model.dit.depthh'", "did you mean 'model.dit.depth'"]),
    ("wrong type", train_job, lambda d, r, i: train_args(d, "train.lr=abc"), ["'train.lr'", "abc"]),
    ("heads do not divide the width", train_job, lambda d, r, i: train_args(d, "model.dit.hidden_size=30",
                                                                             "model.dit.num_heads=4"),
     ["'model.dit.hidden_size'", "30 is not divisible by 4 heads"]),
    ("width the position embedding cannot split", train_job, lambda d, r, i: train_args(
        d, "model.dit.hidden_size=18", "model.dit.num_heads=2"), ["'model.dit.hidden_size'", "not a multiple of 4"]),
    ("RoPE head width", train_job, lambda d, r, i: train_args(d, "model.dit.rope=true", "model.dit.hidden_size=24",
                                                              "model.dit.num_heads=4"),
     ["'model.dit.num_heads'", "head width divisible by 4", "gives 6"]),
    ("patch does not tile the latents", train_job, lambda d, r, i: train_args(d, "data.image_size=10"),
     ["'data.image_size'", "10 gives pixel latents of 10x10", "patch size 4 of SiT-S/4", "multiple of 4"]),
    ("aligner below the last block", train_job, lambda d, r, i: train_args(
        d, "align.methods=[sra]", "align.sra.student_layer=3", "align.sra.teacher_layer=3"),
     ["'align.sra.student_layer'", "must lie in 1..1"]),
    ("guidance interval reversed", train_job, lambda d, r, i: train_args(d, "sampler.cfg_interval=[0.8,0.2]"),
     ["'sampler.cfg_interval'", "low <= high"]),
    ("guidance without label dropout", train_job, lambda d, r, i: train_args(d, "cond.label_dropout=0",
                                                                             "sampler.cfg_scale=2"),
     ["'sampler.cfg_scale'", "is 2, but cond.label_dropout=0", "set sampler.cfg_scale=1"]),
    ("sampler of another objective", train_job, lambda d, r, i: train_args(d, "sampler.sampler=ddim"),
     ["'sampler.sampler'", "not a flow sampler", "heun"]),
    ("eta for a flow sampler", train_job, lambda d, r, i: train_args(d, "sampler.eta=0.5"),
     ["'sampler.eta'", "set it to 0"]),
    ("DDPM betas beyond 1", train_job, lambda d, r, i: train_args(d, "objective.name=ddpm", "sampler.sampler=ddim",
                                                                  "objective.ddpm.num_timesteps=10"),
     ["'objective.ddpm.num_timesteps'", "betas to 2 > 1", "at least 20"]),
    ("EMA decay 1", train_job, lambda d, r, i: train_args(d, "train.ema_decay=1.0"),
     ["'train.ema_decay'", "allowed: [0, 1)"]),
    ("text tokens for a DiT", train_job, lambda d, r, i: train_args(d, "cond.text_dim=16"),
     ["'cond.text_dim'", "set cond.text_dim=0"]),
    ("captions without text", train_job, lambda d, r, i: train_args(d, f"sample.captions={REPO / 'README.md'}"),
     ["'sample.captions'", "cond.text_dim=0", "drop sample.captions"]),
    ("one sample for the digits metric", train_job, lambda d, r, i: train_args(d, "sample.num_samples=1"),
     ["'sample.num_samples'", "is 1; allowed: >= 2 (sample.metrics has digits)"]),
    ("resume from a truncated checkpoint", train_job, lambda d, r, i: [
        QUICK, *TINY, f"train.run_dir={corrupt_checkpoint(d, r, 'model.safetensors')}", "train.max_steps=2",
        "--resume"],
     ["checkpoints/step-00000001 is corrupt or truncated", "resume from an earlier one"]),
    ("binary latents from a truncated file", train_job, lambda d, r, i: train_args(
        d, *BINARY, f"latent.binary.weights={weights(d / 'bae.safetensors', truncate=True)}"),
     ["bae.safetensors (binary autoencoder weights, latent.binary.weights) is not a readable safetensors file"]),
    ("binary latents from another network", train_job, lambda d, r, i: train_args(
        d, *BINARY, f"latent.binary.weights={weights(d / 'bae.safetensors')}"),
     ["bae.safetensors (binary autoencoder weights, latent.binary.weights) does not fit the configured network"]),
    # sample.py
    ("sample a truncated EMA file", sample_job, lambda d, r, i: [
        corrupt_checkpoint(d, r, "ema.safetensors"), f"sample.out={d / 's.npz'}"],
     ["ema.safetensors (the run's EMA weights) is not a readable safetensors file", "corrupt or truncated"]),
    ("sample into a folder", sample_job, lambda d, r, i: [r, f"sample.out={made(d / 's.npz')}"],
     ["'sample.out'", "s.npz is a folder, not a file"]),
    ("sample with eta", sample_job, lambda d, r, i: [r, "sampler.eta=0.5", f"sample.out={d / 's.npz'}"],
     ["'sampler.eta'"]),
    ("sample with guidance, trained without label dropout", sample_job, lambda d, r, i: [
        r, "cond.label_dropout=0", "sampler.cfg_scale=1.5", f"sample.out={d / 's.npz'}"],
     ["'sampler.cfg_scale'", "never trained"]),
    ("sample a folder without checkpoint", sample_job, lambda d, r, i: [d],
     ["holds no checkpoint with ema.safetensors and config.yaml", "pass a run folder"]),
    # evaluate.py: the samples and the reference are checked before the Inception pass
    ("a corrupt image last in the folder", evaluate, lambda d, r, i: [pngs(d / "f", last=b"\x89PNG\r\n\x1a\n0"),
                                                                       *scores()(d, i)],
     ["cannot read image", "c0/z.png", "eval.prescan=false"]),
    ("images of mixed sizes", evaluate, lambda d, r, i: [pngs(d / "f", sizes=((12, 12), (16, 12))),
                                                         *scores()(d, i)],
     ["c0/1.png is 16x12, other images are 12x12", "eval.image_size"]),
    ("a reference folder with a corrupt image", evaluate, lambda d, r, i: [
        npz(d / "s.npz", np.zeros((2, 12, 12, 3), np.uint8)),
        *scores(f"eval.reference={pngs(d / 'r', last=b'x')}")(d, i)],
     ["cannot read image", "r/c0/z.png"]),
    ("an empty folder", evaluate, lambda d, r, i: [made(d / "f"), *scores()(d, i)],
     ["no image files", "/f"]),
    ("an empty .npz", evaluate, lambda d, r, i: [npz(d / "s.npz", np.zeros((0, 12, 12, 3), np.uint8)),
                                                *scores()(d, i)], ["s.npz holds 0 image(s), and fid needs at least 2"]),
    ("float images", evaluate, lambda d, r, i: [npz(d / "s.npz", np.zeros((2, 12, 12, 3), np.float32)),
                                               *scores()(d, i)], ["'arr_0' is float32", "expected uint8 (N, H, W, 3)"]),
    ("one image for FID", evaluate, lambda d, r, i: [npz(d / "s.npz", np.zeros((1, 12, 12, 3), np.uint8)),
                                                     *scores()(d, i)], ["holds 1 image(s), and fid needs at least 2"]),
    ("a reference too small for k neighbours", evaluate, lambda d, r, i: [
        pngs(d / "f", sizes=((12, 12),) * 5), f"eval.inception_weights={i}", "eval.metrics=[pr]",
        f"eval.reference={npz(d / 'small.npz', np.zeros((3, 12, 12, 3), np.uint8))}"],
     ["small.npz holds 3 reference image(s), and pr needs at least 4 (eval.pr_k + 1)", "lower eval.pr_k"]),
    ("a reference folder too small for FID", evaluate, lambda d, r, i: [
        pngs(d / "f"), *scores(f"eval.reference={pngs(d / 'r', sizes=((12, 12),))}")(d, i)],
     ["r holds 1 reference image(s), and fid needs at least 2", "larger reference"]),
    ("k neighbours of too few images", evaluate, lambda d, r, i: [
        npz(d / "s.npz", np.zeros((3, 12, 12, 3), np.uint8)), *scores("eval.metrics=[pr]")(d, i)],
     ["pr needs at least 4 (eval.pr_k + 1)", "lower eval.pr_k"]),
    ("scores into a folder", evaluate, lambda d, r, i: [
        npz(d / "s.npz", np.zeros((2, 12, 12, 3), np.uint8)), "--out", made(d / "s.json"), *scores()(d, i)],
     ["--out", "s.json is a folder, not a file"]),
    # prepare.py
    ("a text cache without a text encoder", prepare, lambda d, r, i: [
        TEXT, "data.name=procedural_shapes", "cond.text_encoder=null", "--out", d / "c"],
     ["'cond.text_encoder' is not set", "huggingface.co/openai/clip-vit-large-patch14"]),
    ("an empty image folder", prepare, lambda d, r, i: [
        QUICK, "data.name=image_folder", f"data.path={made(d / 'f')}", "--out", d / "c"],
     ["has no class sub-folders", "data.path=ROOT"]),
]


def listing(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))


@pytest.mark.parametrize("job,argv,pieces", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_before_any_work(tmp_path, trained, inception, monkeypatch,  # noqa: F811
                                               job, argv, pieces):
    def work(*args, **kwargs):
        pytest.fail("the job started its work before refusing the input")

    monkeypatch.setattr(evaluate, "feed", work)
    monkeypatch.setattr(sample_job, "generate_indexed", work)
    args = argv(tmp_path, trained, inception)
    before, run_before = listing(tmp_path), listing(trained)
    line = refused(job, args)
    assert all(piece in line for piece in pieces), line
    assert listing(tmp_path) == before and listing(trained) == run_before
