"""Latent spaces the generative models run in."""
