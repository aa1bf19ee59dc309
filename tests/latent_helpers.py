"""A tiny random-init SD-VAE stand-in, saved with save_pretrained so tests load it through the real code."""
import torch


def save_tiny_vae(path, seed=0):
    """Write a 4-block AutoencoderKL (downsampling 8, 4 latent channels, width 8) to `path`; returns the path."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, sample_size=32,
    )
    vae.save_pretrained(path)
    return path


TINY_BAE = ["latent.binary.factor=4", "latent.binary.bit_channels=8", "latent.binary.nf=8",
            "latent.binary.emb_dim=8", "latent.binary.norm_groups=4", "latent.binary.res_blocks=1",
            "latent.binary.attn_resolutions=[4]"]
"""latent.binary keys of the network `save_tiny_bae` writes (f = 4, 8 bit channels, width 8)."""


def save_tiny_bae(path, image_size=16, seed=0):
    """Write a random-init binary autoencoder matching TINY_BAE at `path` (a torch state dict); returns the path."""
    from gen.config import load_config
    from latents.bae import BinaryAutoencoder

    cfg = load_config(None, ["latent.name=binary", "objective.name=bernoulli", "sampler.sampler=ancestral",
                             "sampler.num_steps=2", "model.name=SiT-S/1", f"data.image_size={image_size}", *TINY_BAE])
    torch.manual_seed(seed)
    torch.save(BinaryAutoencoder(cfg.latent.binary.arch(image_size)).state_dict(), path)
    return path
