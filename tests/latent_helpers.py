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
