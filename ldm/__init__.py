"""Latent diffusion models: a research framework compatible with the CompVis latent-diffusion code."""

__version__ = "0.1.0"
