"""First-stage losses: L1/L2 + LPIPS + patch GAN, for the KL and the VQ autoencoder."""
from ldm.modules.losses.contperceptual import DummyLoss, LPIPSWithDiscriminator
from ldm.modules.losses.vqperceptual import VQLPIPSWithDiscriminator

__all__ = ["LPIPSWithDiscriminator", "VQLPIPSWithDiscriminator", "DummyLoss"]
