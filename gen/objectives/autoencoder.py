"""Objective `autoencoder`: stage 1 of Binary Latent Diffusion (Wang et al., CVPR 2023, arXiv 2304.04820, Sec. 3.1),
the binary autoencoder's loss as the reference trains it (ZeWang95/BinaryLatentDiffusion models/binaryae.py
`BinaryGAN.train_iter`/`disc_iter`, utils/vqgan_utils.py, train_ae_dist.py), on the pixel space with the `bae`
backbone family:

    rec  = |x - x^|_1 + perceptual_weight * LPIPS-VGG(x, x^)             (per sample; images in [0, 1] for L1)
    gen  = -mean(D(x^))                                                  (hinge generator loss, D's weights fixed)
    lam  = clamp(||grad_L rec|| / (||grad_L gen|| + 1e-4), 0, disc_weight_max)   (VQGAN; L = last decoder conv)
    disc = (mean relu(1 - D(x)) + mean relu(1 + D(sg(x^)))) / 2          (hinge, on the detached reconstruction)
    loss = rec + [step >= disc_start_step] (lam * gen + disc)

with bits b ~ Bernoulli(p) through the straight-through estimator (the training draws are the step's `uniform`).
One optimizer trains both networks: the generator term runs the discriminator through torch.func.functional_call
with detached parameters (no gradient reaches D) and the discriminator term sees sg(x^) (none reaches the
autoencoder), so each network gets exactly its own loss's gradient, as with the reference's two optimizers.

Deviations from the reference, each deliberate:
- LPIPS gets images in [-1, 1], its documented range; the reference passes its [0, 1] images unscaled.
- One threshold: the GAN terms start together at `disc_start_step` (the reference weights the generator term from
  step >= disc_start_step but updates D from step > disc_start_step). Before it, D's loss enters with weight 0, so
  D gets zero gradients (it stays at its initialisation with train.weight_decay=0) and DDP sees every parameter used.
- One AdamW (betas and lr from train.*) for both networks: the reference uses two Adams with the same settings.
- No code loss (the reference's weight is 0 by default; its double sigmoid, spec "do not copy" 3, is moot).
- DiffAugment (off by default in the reference) is not implemented.
Like the reference under DDP, lam and the discriminator's BatchNorm statistics come from each process's own
micro-batch, so stage 1 (unlike stage 2) depends on how the global batch is split; resume is bitwise.

The sampling start (`prior`) is the first images of the training set and `sample` their deterministic
reconstruction (thresholded bits): what train.py's previews show. sample.py refuses a stage-1 run (GENERATIVE).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from gen.cond import Cond, Conditioning
from gen.config import ComponentConfig, check
from gen.objectives.base import LossOutput, Objective, mean_flat
from gen.sampling.guidance import network_fn
from gen.sampling.noise import Generators


@dataclass
class AutoencoderConfig(ComponentConfig):
    """Stage-1 binary autoencoder loss (BLD): L1 + LPIPS-VGG + hinge PatchGAN with VQGAN's adaptive weight."""

    perceptual_weight: float = 1.0
    """Weight of LPIPS-VGG (reference 1.0); 0 switches it off (CPU runs: no VGG weights needed)."""
    lpips_vgg: Optional[str] = None
    """Local torchvision VGG16 weights, vgg16-397923af.pth (download.pytorch.org/models/)."""
    lpips_lin: Optional[str] = None
    """Local LPIPS v0.1 lin weights, vgg.pth (github.com/richzhang/PerceptualSimilarity lpips/weights/v0.1/)."""
    disc_start_step: Optional[int] = 30001
    """Step the GAN terms start at (reference default 30001, its README commands 400001); null: no GAN at all."""
    disc_weight_max: float = 1.0
    """Upper clamp of the adaptive generator weight (reference disc_weight_max 1)."""

    def validate(self, cfg) -> None:
        """Pixel latents, the bae backbone (with a discriminator when the GAN is on), no aligners, no FID tracking,
        no divergence guard with the signed GAN terms, and LPIPS files when its weight is positive."""
        check(cfg.latent.name == "pixel", "latent.name",
              f"objective autoencoder (stage 1) trains on pixel images, not on {cfg.latent.name!r}")
        check(self.perceptual_weight >= 0, "objective.autoencoder.perceptual_weight", "must be >= 0")
        check(self.disc_weight_max >= 0, "objective.autoencoder.disc_weight_max", "must be >= 0")
        gan = self.disc_start_step is not None
        check(not gan or self.disc_start_step >= 0, "objective.autoencoder.disc_start_step", ">= 0 or null")
        check(not gan or cfg.model.bae.disc_layers > 0, "model.bae.disc_layers",
              "is 0 (no discriminator) but objective.autoencoder.disc_start_step is set; set it to null")
        check(gan or cfg.model.bae.disc_layers == 0, "model.bae.disc_layers",
              "must be 0 when objective.autoencoder.disc_start_step is null (a discriminator nothing trains)")
        check(not gan or cfg.train.divergence_factor == 0, "train.divergence_factor",
              "must be 0 with the GAN on: the generator term makes the logged loss signed")
        check(not cfg.align.methods, "align.methods", "must be empty in stage 1 (the autoencoder has no tokens)")
        check(cfg.log.fid_every_steps == 0, "log.fid_every_steps", "must be 0 in stage 1 (nothing to sample)")


def adaptive_weight(rec_loss: Tensor, gen_loss: Tensor, last_layer: Tensor, max_weight: float) -> Tensor:
    """VQGAN's generator weight ||grad rec|| / (||grad gen|| + 1e-4) at `last_layer`, clamped to [0, max], detached
    (taming-transformers vqperceptual.py calculate_adaptive_weight; BLD utils/vqgan_utils.py)."""
    rec_grad, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    gen_grad, = torch.autograd.grad(gen_loss, last_layer, retain_graph=True)
    return (rec_grad.norm() / (gen_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class AutoencoderObjective(Objective):
    """Stage 1: the binary autoencoder's reconstruction + perceptual + adversarial loss (see the module docstring)."""

    KEY = "autoencoder"
    BACKBONES = ("bae",)
    Config = AutoencoderConfig
    LATENT_KINDS = ("continuous",)
    SAMPLERS = {"reconstruct": "deterministic reconstruction (thresholded bits) of the first training images"}
    DRAWS = {"uniform": "sample"}
    USES_STEP = True
    GENERATIVE = False

    def __init__(self, bit_shape: tuple[int, ...], perceptual_weight: float = 1.0, lpips_files=(None, None),
                 disc_start_step: int | None = 30001, disc_weight_max: float = 1.0, preview_source=None):
        super().__init__(Conditioning(None, 0.0))  # the autoencoder ignores labels
        self.bit_shape = tuple(bit_shape)
        self.perceptual_weight, self.lpips_files = float(perceptual_weight), tuple(lpips_files)
        self.disc_start_step, self.disc_weight_max = disc_start_step, float(disc_weight_max)
        self.preview_source = preview_source  # () -> the training set and the latent space, for `prior`
        self.lpips = None
        self._preview: Tensor | None = None  # the images previews reconstruct, built on first use

    @classmethod
    def from_config(cls, cfg, model) -> AutoencoderObjective:
        """From cfg.objective.autoencoder for a `bae` backbone (its bit shape sizes the Bernoulli draws)."""
        o = cfg.objective.autoencoder

        def preview_source():
            from gen.data import build_dataset
            from latents import build_latent

            return build_dataset(cfg, split="train"), build_latent(cfg)

        return cls(model.ae.arch.latent_shape, o.perceptual_weight, (o.lpips_vgg, o.lpips_lin), o.disc_start_step,
                   o.disc_weight_max, preview_source)

    def load_weights(self, device: torch.device | str = "cpu") -> AutoencoderObjective:
        """LPIPS-VGG from the local files (when its weight is positive); a missing file fails here, in one line."""
        if self.perceptual_weight > 0 and self.lpips is None:
            from gen.lpips import LPIPS

            self.lpips = LPIPS.from_files(*self.lpips_files)
        if self.lpips is not None:
            self.lpips.to(device)
        return self

    # -- draws -----------------------------------------------------------------------------------------

    def sample_time(self, n: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        """No time: zeros (LossOutput and aligners' fields)."""
        return torch.zeros(n, device=device)

    def draw(self, n: int, sample_shape, generator: torch.Generator | None = None, device=None) -> dict[str, Tensor]:
        """One U(0, 1) per bit: the Bernoulli bit draws 1[u < p] of the step."""
        device = device if device is not None else (generator.device if generator is not None else None)
        uniform = torch.rand((n, *self.bit_shape), generator=generator, device=device)
        return {"uniform": uniform, **self.cond.draw(n, generator, device)}

    def gan_on(self, step: int | None) -> bool:
        """Whether the adversarial terms count at `step` (None: a call outside training, no GAN)."""
        return self.disc_start_step is not None and step is not None and step >= self.disc_start_step

    # -- loss ------------------------------------------------------------------------------------------

    def compute_loss(self, model, x0: Tensor, cond: Cond, *, taps: tuple[int, ...], uniform: Tensor,
                     step: int | None = None) -> LossOutput:
        """Per-sample rec + [GAN on] (lam * gen + disc); logs l1, lpips, gan_gen, gan_disc, gan_weight, bits_on."""
        target = model.rgb01(x0).float()
        rec, p = model.reconstruct(x0, "bernoulli", uniform)
        rec = rec.float()
        l1 = mean_flat((target - rec).abs())
        loss = l1
        logs = {"l1": l1.detach(), "bits_on": mean_flat(p.detach().float())}
        if self.perceptual_weight > 0:
            if self.lpips is None:
                raise RuntimeError("LPIPS is not loaded: call AutoencoderObjective.load_weights first")
            perceptual = self.lpips(target * 2.0 - 1.0, rec * 2.0 - 1.0)
            loss = loss + self.perceptual_weight * perceptual
            logs["lpips"] = perceptual.detach()
        if model.disc is not None:
            loss, gan_logs = self.gan_terms(model, target, rec, loss, self.gan_on(step))
            logs.update(gan_logs)
        zeros = torch.zeros(x0.shape[0], device=x0.device)
        return LossOutput(loss=loss, x_t=x0, t=zeros, noise=torch.zeros_like(x0), cond=cond, logs=logs)

    def gan_terms(self, model, target: Tensor, rec: Tensor, rec_loss: Tensor, on: bool) -> tuple[Tensor, dict]:
        """rec_loss + lam * gen + disc when `on`, else rec_loss + 0 * disc (D's parameters get zero gradients)."""
        disc = model.disc
        real, fake = disc(target).float(), disc(rec.detach()).float()
        d_loss = 0.5 * (mean_flat(F.relu(1.0 - real)) + mean_flat(F.relu(1.0 + fake)))
        if not on:
            return rec_loss + 0.0 * d_loss, {"gan_disc": d_loss.detach()}
        frozen = {name: p.detach() for name, p in disc.named_parameters()}
        g_loss = -mean_flat(functional_call(disc, frozen, (rec,)).float())
        lam = adaptive_weight(rec_loss.mean(), g_loss.mean(), model.last_layer, self.disc_weight_max)
        logs = {"gan_disc": d_loss.detach(), "gan_gen": g_loss.detach(), "gan_weight": lam.expand(len(rec_loss))}
        return rec_loss + lam * g_loss + d_loss, logs

    # -- previews ----------------------------------------------------------------------------------------

    def prior(self, sample_shape, generator: Generators = None, n: int | None = None, device=None) -> Tensor:
        """The images previews reconstruct: the first n training images (model space), whatever the generator."""
        if isinstance(generator, (list, tuple)):
            raise ValueError("objective autoencoder (stage 1) has no prior to sample from; sample.py refuses it")
        if self._preview is None or len(self._preview) != n:  # the dataset is opened once per run
            dataset, latent = self.preview_source()
            items = [dataset[i % len(dataset)] for i in range(n)]
            if "raw" in items[0]:
                self._preview = latent.to_model(torch.stack([torch.as_tensor(it["raw"]) for it in items]))
            else:
                self._preview = latent.encode_raw(torch.stack([torch.as_tensor(it["image"]) for it in items]))
        return self._preview.to(device)

    def sample_options(self, scfg) -> dict:
        """No options: reconstruction is deterministic."""
        return {}

    def model_fn(self, model, dtype: torch.dtype | None = None) -> Callable:
        """`fn(x, t, cond) -> reconstruction` in [-1, 1] (the backbone's forward)."""
        return network_fn(model, dtype)

    def sample(self, model_fn: Callable, x_T: Tensor, cond, *, generator: Generators = None, **options) -> Tensor:
        """Reconstructions of the images `x_T` (thresholded bits), RGB in [-1, 1]."""
        return model_fn(x_T, torch.zeros(x_T.shape[0], device=x_T.device), cond)
