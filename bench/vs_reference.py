"""Our REPA training step and SDE sampler against the reference REPA code, same model, batch and math, one process.

    python bench/vs_reference.py --repa-dir /path/to/REPA                       # SiT-B/2, batch 8, CPU fp32
    python bench/vs_reference.py --repa-dir REPA --batch 2 --steps 3 --sample-steps 10
    python bench/vs_reference.py --repa-dir REPA --model SiT-XL/2 --batch 64     # on a GPU: ours bf16, REPA fp16

The reference (a local checkout of sihyun-yu/REPA, imported by path, nothing of it copied here): its SiT with
its projector (models/sit.py), its SILoss (loss.py), and its train.py loop body: posterior sample, the encoder
on the preprocessed raw images, autocast, loss + proj_coeff * proj_loss, backward, clip 1.0, AdamW, its EMA update
and the per-step `.item()` logs. Its Accelerator in one process amounts to torch.autocast around the forward and,
in fp16, a GradScaler (scale, unscale before clipping, step, update); that is done by hand because Accelerate
keeps one mixed-precision setting per process and ours needs its own.
Its DINOv2 comes from torch.hub (network); here both sides run the same timm DINOv2-B/14 network with the same
random-init weights, read by our loader (align.encoders.build_encoder) from a file written to a temp folder, the
reference's behind torch.hub's `forward_features(x)["x_norm_patchtokens"]` interface.

Ours: what train.py runs, i.e. build_backbone / build_objective / build_aligners / Trainee prepared by Accelerate
(train.prepare_step, fused AdamW from train.make_optimizer), StepDraws, model_inputs, grad clip 1.0, the running
means and the non-finite check, gen.ema.EMA. Targets either online (the encoder runs on the batch's images each
step, as the reference does) or cached (the batch's `feats`, as prepare.py stores them).

Both start from the same weights: the reference's SiT (its init, with the zero-initialised adaLN and output layers
drawn N(0, 0.02^2) so outputs are not trivially 0) converted by gen.models.official. Before timing, the losses of
both steps on the same inputs and the same t / noise / dropout draws (the reference's torch.rand calls replayed
from one seed) are compared in fp32, and so are the two networks' outputs for the sampler.

Steps run interleaved (A B A B ...), so drifting machine load hits each alike; medians are printed with images/s
and the speed ratio x = reference seconds / our seconds (x > 1: ours is faster). The functions are importable
(bench/gpu_suite.py): reference_train_step, our_train_step, reference_sampler, our_sampler, interleave.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import importlib.machinery
import importlib.util
import statistics
import sys
import tempfile
import time
import types
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository (train.py), run as bench/vs_reference.py
import train as ours  # noqa: E402 - before the REPA folder joins sys.path: it has a train.py too
from align.encoders import ENCODERS, build_encoder, create_encoder_model
from gen.cond import Cond, Conditioning
from gen.config import load_config
from gen.ema import EMA
from gen.logging import RunningMeans
from gen.models import build_backbone
from gen.models.official import load_official
from gen.objectives import build_objective
from gen.step import StepDraws, Trainee, build_aligners, model_inputs
from latents import build_latent

ENCODER = "dinov2-vit-b"
IMAGE_SIZE = 256
LATENT = (4, 32, 32)  # SD-VAE latents of 256 px images
NUM_CLASSES = 1000
DEPTH = {"S": 4, "B": 4, "L": 8, "XL": 8}  # aligned block (REPA README: B 4, L/XL 8), as align.repa's default
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SEED = 0
MIXED = {"fp32": "'no'", "bf16": "bf16", "fp16": "fp16"}  # train.mixed_precision, quoted: YAML reads no as false


@lru_cache(maxsize=None)
def load_reference(repa_dir: str) -> types.SimpleNamespace:
    """REPA's models.sit, loss, samplers and train modules, imported from `repa_dir` (train.py as `repa_train`;
    `wandb`, which it imports for logging only, is stubbed when absent)."""
    root = str(Path(repa_dir).expanduser().resolve())
    if not (Path(root) / "models" / "sit.py").is_file():
        raise FileNotFoundError(f"{root} is not a REPA checkout (no models/sit.py)")
    if root not in sys.path:
        sys.path.insert(0, root)
    if "wandb" not in sys.modules and importlib.util.find_spec("wandb") is None:
        importlib.import_module("diffusers.models")  # looks for wandb itself: before the stub
        sys.modules["wandb"] = types.ModuleType("wandb")
        sys.modules["wandb"].__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    # REPA's models/ has no __init__.py: a namespace package loses against any models.py on sys.path (bench/ has
    # one), so it is registered by hand while REPA's modules import, then the previous entry is put back.
    previous = sys.modules.get("models")
    package = types.ModuleType("models")
    package.__path__ = [str(Path(root) / "models")]
    sys.modules["models"] = package
    try:
        spec = importlib.util.spec_from_file_location("repa_train", Path(root) / "train.py")
        repa_train = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(repa_train)
        return types.SimpleNamespace(sit=importlib.import_module("models.sit"), loss=importlib.import_module("loss"),
                                     samplers=importlib.import_module("samplers"), train=repa_train)
    finally:
        if previous is not None:
            sys.modules["models"] = previous


@lru_cache(maxsize=None)
def encoder_file() -> str:
    """A random-init DINOv2-B/14 state (16x16 tokens) saved once per process to a temp file."""
    path = Path(tempfile.mkdtemp(prefix="vs_reference_")) / "dinov2_vitb14_random.pth"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        net = create_encoder_model(ENCODERS[ENCODER], (16, 16))
    torch.save(net.state_dict(), path)
    return str(path)


def make_batch(n: int, seed: int = SEED, tokens: int = 256) -> dict:
    """Synthetic data on the host: uint8 images, SD-VAE posterior moments (mean, std), labels, DINOv2 features
    (float16, as prepare.py caches them)."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, *LATENT, generator=g)
    std = 0.05 + 0.1 * torch.rand(n, *LATENT, generator=g)
    return {"image": torch.randint(0, 256, (n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=g),
            "raw": torch.cat([mean, std], dim=1),
            "label": torch.randint(0, NUM_CLASSES, (n,), generator=g),
            "feats": {ENCODER: torch.randn(n, tokens, ENCODERS[ENCODER].dim, generator=g).half()}}


def pinned(batch: dict, device) -> dict:
    """The batch in pinned host memory when training on a GPU, as both train.py's and REPA's DataLoaders give it."""
    if torch.device(device).type != "cuda":
        return batch
    return {k: pinned(v, device) if isinstance(v, dict) else v.pin_memory() for k, v in batch.items()}


def _size(model: str) -> str:
    return model.split("-")[1].split("/")[0]


def reference_model(repa_dir, model: str, device, seed: int = SEED) -> nn.Module:
    """REPA's SiT `model` (e.g. SiT-B/2) with one DINOv2-B projector at its size's depth, its init, then the
    zero-initialised layers drawn N(0, 0.02^2) (outputs not trivially 0)."""
    ref = load_reference(str(repa_dir))
    torch.manual_seed(seed)
    net = ref.sit.SiT_models[model](input_size=LATENT[-1], num_classes=NUM_CLASSES, use_cfg=True,
                                    z_dims=[ENCODERS[ENCODER].dim], encoder_depth=DEPTH[_size(model)],
                                    fused_attn=True, qk_norm=False)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0.0, 0.02)
    return net.to(device)


def to_ours(state: dict) -> tuple[dict, dict]:
    """A REPA SiT state -> (our backbone state, our REPA projector state), through gen.models.official."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "repa.pt"
        torch.save({k: v.detach().cpu() for k, v in state.items()}, path)
        weights = load_official(path, "repa")
    return weights.model, weights.aligner


class HubDINOv2(nn.Module):
    """torch.hub DINOv2's interface (`forward_features(x)["x_norm_patchtokens"]`, `embed_dim`) over a timm net."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.embed_dim = net, net.num_features

    def forward_features(self, x):
        return {"x_norm_patchtokens": self.net.forward_features(x)[:, self.net.num_prefix_tokens:]}


def _autocast(device, precision: str):
    dtype = DTYPES[precision]
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)


class ReferenceStep:
    """One REPA train.py step per call (see the module docstring); `.model`, `.ema`, `.loss(seed)` for checks."""

    def __init__(self, repa_dir, model: str, batch: int, device, precision: str, encoder=None):
        self.ref = ref = load_reference(str(repa_dir))
        self.device, self.precision = torch.device(device), precision
        self.model = reference_model(repa_dir, model, self.device)
        self.ema = copy.deepcopy(self.model)
        ref.train.requires_grad(self.ema, False)
        ref.train.update_ema(self.ema, self.model, decay=0)
        self.model.train()
        self.ema.eval()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0,
                                           eps=1e-8)
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        net = build_encoder(ENCODER, encoder or encoder_file(), IMAGE_SIZE, (16, 16)).model
        self.encoder = HubDINOv2(net).to(self.device).eval()
        scale = torch.tensor([0.18215] * 4).view(1, 4, 1, 1).to(self.device)
        bias = torch.zeros(1, 4, 1, 1, device=self.device)
        self.latents = (scale, bias)
        self.loss_fn = ref.loss.SILoss(prediction="v", path_type="linear", weighting="uniform",
                                       encoders=[self.encoder], accelerator=None, latents_scale=scale,
                                       latents_bias=bias)
        self.batch = pinned(make_batch(batch), self.device)

    def _losses(self):
        """The loop body up to the loss (REPA train.py: posterior sample, encoder, SILoss under autocast)."""
        b = self.batch
        raw_image, x, y = b["image"].to(self.device), b["raw"].to(self.device), b["label"].to(self.device)
        with torch.no_grad():
            x = self.ref.train.sample_posterior(x, latents_scale=self.latents[0], latents_bias=self.latents[1])
            with _autocast(self.device, self.precision):
                z = self.encoder.forward_features(self.ref.train.preprocess_raw_image(raw_image, "dinov2"))
                zs = [z["x_norm_patchtokens"]]
        with _autocast(self.device, self.precision):  # Accelerate's prepared forward
            loss, proj_loss = self.loss_fn(self.model, x, dict(y=y), zs=zs)
        return loss.float().mean(), proj_loss.float().mean()

    def __call__(self) -> None:
        loss_mean, proj_loss_mean = self._losses()
        loss = loss_mean + proj_loss_mean * 0.5
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ref.train.update_ema(self.ema, self.model)
        self.logs = {"loss": loss_mean.item(), "proj_loss": proj_loss_mean.item(), "grad_norm": grad_norm.item()}

    @torch.no_grad()
    def loss(self, seed: int) -> tuple[float, dict]:
        """The fp32 loss from `seed`, and the draws it made (replayed in the reference's order of torch.rand calls):
        posterior noise, t (CPU), flow noise, the label-dropout uniforms inside SiT.forward; plus the targets."""
        precision, self.precision = self.precision, "fp32"
        try:
            torch.manual_seed(seed)
            loss_mean, proj_loss_mean = self._losses()
        finally:
            self.precision = precision
        n, dev = self.batch["label"].shape[0], self.device
        torch.manual_seed(seed)
        draws = {"posterior": torch.randn(n, *LATENT, device=dev), "t": torch.rand((n, 1, 1, 1)).flatten().to(dev),
                 "noise": torch.randn(n, *LATENT, device=dev), "drop": torch.rand(n, device=dev) < 0.1}
        pixels = self.batch["image"].to(dev)
        draws["targets"] = self.encoder.forward_features(self.ref.train.preprocess_raw_image(pixels, "dinov2"))[
            "x_norm_patchtokens"]
        return (loss_mean + 0.5 * proj_loss_mean).item(), draws


def reference_train_step(repa_dir, model: str, batch: int, device, precision: str, encoder=None) -> ReferenceStep:
    """A zero-argument callable running one reference REPA training step (precision fp32 | fp16 | bf16; encoder:
    the DINOv2-B/14 weight file, None: the random-init temp file)."""
    return ReferenceStep(repa_dir, model, batch, device, precision, encoder)


def our_config(model: str, batch: int, precision: str, encoder=None, overrides=(), online: bool = True):
    """The run config of our step: `model` + REPA on DINOv2-B at 256 px, SD-VAE latents, clip 1.0, lr 1e-4
    (`online`: with the encoder's weight file)."""
    weights = [f"align.encoder_weights={{{ENCODER}: {encoder or encoder_file()}}}"] if online else []
    return load_config(None, weights + [
        f"model.name={model}", "latent.name=sd-vae", "data.name=latent_cache", f"data.image_size={IMAGE_SIZE}",
        "data.hflip=false", f"cond.num_classes={NUM_CLASSES}", "cond.label_dropout=0.1", "align.methods=[repa]",
        f"align.repa.encoders=[{ENCODER}]",
        "train.grad_clip=1.0", "train.lr=1e-4", "train.ema_decay=0.9999", f"train.global_batch_size={batch}",
        f"train.mixed_precision={MIXED[precision]}", *overrides])


class OurStep:
    """One step of train.py's loop per call (see the module docstring); `.model`, `.loss(draws)` for checks."""

    def __init__(self, model: str, batch: int, device, precision: str, targets: str, compile: bool | str = False,
                 encoder=None, state: tuple[dict, dict] | None = None, overrides=()):
        from accelerate import Accelerator

        if targets not in ("online", "cached"):
            raise ValueError(f"targets must be 'online' or 'cached', got {targets!r}")
        self.cfg = cfg = our_config(model, batch, precision, encoder, overrides, online=targets == "online")
        self.targets = targets
        self.accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision,
                                       cpu=torch.device(device).type == "cpu")
        self.device = device = self.accelerator.device
        self.latent = build_latent(cfg)
        torch.manual_seed(cfg.train.seed)
        self.model = build_backbone(cfg, self.latent.shape).to(device)
        self.objective = build_objective(cfg, self.model).load_weights(device)
        tokens = self.model.token_grid[0] * self.model.token_grid[1]
        cached = {ENCODER: (tokens, ENCODERS[ENCODER].dim)} if targets == "cached" else {}
        aligners = build_aligners(cfg, self.model, self.objective, cached_targets=cached)
        if state is not None:
            self.model.load_state_dict(state[0], strict=True)
            aligners["repa"].load_official_projectors(state[1])
        self.ema = EMA(self.model, cfg.train.ema_decay)
        self.conditioning = Conditioning.from_config(cfg)
        self.trainee = Trainee(self.model, self.objective, aligners, teacher=self.ema.model).to(device)
        self.module = self.trainee
        if compile:  # True: train.compile's regional compile; a string: the same with that torch.compile mode
            self.model.compile_regions(**({"mode": compile} if isinstance(compile, str) else {}))
        self.trainee, self.optimizer = ours.prepare_step(self.accelerator, self.trainee, "full", 0, cfg)
        data = make_batch(batch, tokens=tokens)
        self.batch = {k: data[k] for k in ("raw", "label")}
        if targets == "online":
            self.batch["image"] = data["image"]  # model_inputs reads cached latents; the encoder reads the images
        else:
            self.batch["feats"] = data["feats"]
        self.batch = pinned(self.batch, device)
        self.meters = RunningMeans()
        self.first_bad = torch.full((), -1.0, device=device)
        self.step = 0

    def __call__(self) -> None:
        t, n = self.cfg.train, self.cfg.train.global_batch_size
        draws = StepDraws.draw(self.objective, self.latent, n, t.seed, self.step, False, self.device).micro(0, 0, 1, n)
        batch = self.batch
        with self.accelerator.accumulate(self.trainee):
            x0, cond, pixels = model_inputs(batch, self.latent, self.conditioning, draws, self.device)
            if "image" in batch:
                pixels = batch["image"].to(self.device, non_blocking=True)
            per_sample, terms = self.trainee(x0, cond, self.step, draws, pixels=pixels,
                                             target_feats=batch.get("feats"))
            loss = per_sample.mean()
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients and t.grad_clip > 0:
                self.accelerator.clip_grad_norm_(self.trainee.parameters(), t.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.meters.add("loss", per_sample)
        for name, values in terms.items():
            self.meters.add(name, values)
        bad = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, float(self.step), self.first_bad)
        self.ema.update(self.model)
        self.step += 1

    @torch.no_grad()
    def loss(self, draws: dict) -> float:
        """The fp32 loss (no autocast) on this step's batch with the reference's replayed `draws`."""
        n = self.batch["label"].shape[0]
        step_draws = StepDraws(objective={k: draws[k] for k in ("t", "noise", "drop")},
                               latent={"noise": draws["posterior"]}, uniform=torch.rand(n, device=self.device))
        x0, cond, _ = model_inputs(self.batch, self.latent, self.conditioning, step_draws, self.device)
        pixels = self.batch["image"].to(self.device) if "image" in self.batch else None
        feats = None if pixels is not None else {ENCODER: draws["targets"]}
        per_sample, _ = Trainee.forward(self.module, x0, cond, self.step, step_draws, pixels=pixels,
                                        target_feats=feats)  # the class's forward: no Accelerate autocast wrapper
        return per_sample.mean().item()


def our_train_step(model: str, batch: int, device, precision: str, targets: str = "online",
                   compile: bool | str = False, encoder=None, state: tuple[dict, dict] | None = None,
                   overrides=()) -> OurStep:
    """A zero-argument callable running one of our training steps (precision fp32 | bf16; targets online | cached;
    compile: regional torch.compile, or a torch.compile mode for it; state: (backbone, projector) weights to start
    from; overrides: extra config overrides, e.g. a tiny model)."""
    return OurStep(model, batch, device, precision, targets, compile, encoder, state, overrides)


def _labels(batch: int, device) -> torch.Tensor:
    return torch.randint(0, NUM_CLASSES, (batch,), generator=torch.Generator().manual_seed(SEED)).to(device)


def reference_sampler(repa_dir, net: nn.Module, batch: int, device, precision: str = "fp32", steps: int = 250,
                      cfg_scale: float = 1.8, interval=(0.0, 0.7)):
    """A zero-argument callable: REPA samplers.euler_maruyama_sampler on `net` (a REPA SiT) for `batch` samples."""
    sampler = load_reference(str(repa_dir)).samplers.euler_maruyama_sampler
    noise = torch.randn(batch, *LATENT, generator=torch.Generator().manual_seed(SEED)).to(device)
    y = _labels(batch, device)

    def run():
        net.eval()
        with _autocast(device, precision):
            return sampler(net, noise, y, num_steps=steps, cfg_scale=cfg_scale, guidance_low=interval[0],
                           guidance_high=interval[1], path_type="linear")
    return run


def our_sampler(net: nn.Module, batch: int, device, precision: str = "fp32", steps: int = 250,
                cfg_scale: float = 1.8, interval=(0.0, 0.7), objective=None):
    """A zero-argument callable: our flow objective's euler_maruyama sampler (REPA's SDE grid, guidance interval)
    on our backbone `net` for `batch` samples."""
    objective = objective or build_objective(our_config("SiT-B/2", batch, "fp32", online=False), net)
    noise = torch.randn(batch, *LATENT, generator=torch.Generator().manual_seed(SEED)).to(device)
    cond = Cond(_labels(batch, device))
    g = torch.Generator(device=device).manual_seed(SEED)

    def run():
        net.eval()
        with _autocast(device, precision):
            return objective.sample(objective.model_fn(net), noise, cond, sampler="euler_maruyama", num_steps=steps,
                                    cfg_scale=cfg_scale, cfg_interval=tuple(interval), generator=g)
    return run


def interleave(fns: dict, iters: int, warmup: int = 1, sync=None) -> dict[str, list[float]]:
    """Per-iteration seconds of each zero-argument function, called in rounds (A B A B ...) after `warmup` untimed
    rounds; `sync`: a callable (or True: CUDA synchronise when available) run before and after each call."""
    if sync is True:
        sync = torch.cuda.synchronize if torch.cuda.is_available() else None
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + iters):
        for name, fn in fns.items():
            if sync:
                sync()
            start = time.perf_counter()
            fn()
            if sync:
                sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def _report(title: str, times: dict[str, list[float]], images: int, base: str, unit: str = "step") -> None:
    print(title)
    ref = statistics.median(times[base])
    for name, ts in times.items():
        med = statistics.median(ts)
        ratio = "" if name == base else f"   x{ref / med:.2f} vs {base}"
        print(f"  {name:34s} {med:8.3f} s/{unit:4s}  {images / med:8.2f} images/s{ratio}")


def main(argv=None) -> None:
    """Check that both sides compute the same loss, then time them interleaved and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repa-dir", required=True, help="a local checkout of sihyun-yu/REPA")
    parser.add_argument("--model", default="SiT-B/2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps of each")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: fp32 on CPU; on a GPU ours bf16, the reference fp16 (its default) and bf16")
    parser.add_argument("--sample-steps", type=int, default=250, help="SDE steps (0: skip the sampling comparison)")
    parser.add_argument("--sample-batch", type=int, default=4)
    parser.add_argument("--sample-iters", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile our backbone (train.compile)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ours_prec = "bf16" if args.precision == "auto" and gpu else ("fp32" if args.precision == "auto" else args.precision)
    ref_precs = ["fp16", "bf16"] if args.precision == "auto" and gpu else [ours_prec]
    where = torch.cuda.get_device_name(device) if gpu else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{args.model} + REPA ({ENCODER}, 256 px), batch {args.batch}, on {where}, torch {torch.__version__}")

    refs = {f"reference {p}": reference_train_step(args.repa_dir, args.model, args.batch, device, p) for p in ref_precs}
    first = next(iter(refs.values()))
    state = to_ours(first.model.state_dict())
    runs = {f"ours {t} {ours_prec}": our_train_step(args.model, args.batch, device, ours_prec, t, args.compile,
                                                     state=state) for t in ("online", "cached")}
    ref_loss, draws = first.loss(SEED)
    for name, step in runs.items():
        our_loss = step.loss(draws)
        print(f"  fp32 loss on the same inputs and draws: reference {ref_loss:.6f}, {name.split(' ')[1]} "
              f"{our_loss:.6f}, relative difference {abs(our_loss - ref_loss) / abs(ref_loss):.1e}")
    times = interleave({**refs, **runs}, args.steps, args.warmup, sync=gpu)
    _report(f"train step (median of {args.steps}, {args.warmup} warmup round)", times, args.batch,
            next(iter(refs)))

    if args.sample_steps:
        n = args.sample_batch
        ref_net = first.ema
        our_net = build_backbone(our_config(args.model, n, "fp32", online=False), LATENT).to(device)
        our_net.load_state_dict(to_ours(ref_net.state_dict())[0], strict=True)
        our_net.eval()
        with torch.no_grad():
            x = torch.randn(n, *LATENT, device=device)
            t = torch.rand(n, device=device)
            y = _labels(n, device)
            a, b = ref_net(x, t, y)[0], our_net(x, t, Cond(y)).out
        print(f"  network outputs on the same inputs (fp32): max relative difference "
              f"{((a - b).abs().max() / a.abs().max()).item():.1e}")
        samplers = {f"reference {p}": reference_sampler(args.repa_dir, ref_net, n, device, p, args.sample_steps)
                    for p in ref_precs}
        samplers[f"ours {ours_prec}"] = our_sampler(our_net, n, device, ours_prec, args.sample_steps,
                                                    objective=runs[f"ours cached {ours_prec}"].objective)
        times = interleave(samplers, args.sample_iters, 1, sync=gpu)
        _report(f"SDE sampling, {args.sample_steps} steps, cfg 1.8 on t in [0, 0.7], batch {n} (median of "
                f"{args.sample_iters})", times, n, next(iter(samplers)), "run")


if __name__ == "__main__":
    main()
