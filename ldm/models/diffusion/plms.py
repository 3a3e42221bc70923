"""`PLMSSampler`: the original's PLMS class; the same interface as `DDIMSampler` over the one sampling path,
with the PLMS update."""
from __future__ import annotations

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.sampling import SamplerKind


class PLMSSampler(DDIMSampler):
    """Pseudo linear multistep sampling (Liu et al. 2022) with the original's warm-up; eta must be 0."""

    name = "PLMS"
    kind = SamplerKind.PLMS

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        if ddim_eta != 0:
            raise ValueError(f"PLMS is deterministic: eta must be 0, got {ddim_eta}")
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)

    plms_sampling = DDIMSampler.ddim_sampling
