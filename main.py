"""Train and test models built from YAML configs: ``python main.py --base cfg.yaml -t [--gpus 0,1] [key=value ...]``.

The command line of the CompVis latent-diffusion code on Lightning 2 (see README.md for the flags). The
classes that the original configs name as ``main.<Class>`` are re-exported here.
"""
import sys

from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

from ldm.callbacks import EmergencyCheckpoint, ImageLogger, SetupCallback
from ldm.datamodule import DataModuleFromConfig, WrappedDataset, worker_init_fn

__all__ = ["DataModuleFromConfig", "EmergencyCheckpoint", "ImageLogger", "LearningRateMonitor", "ModelCheckpoint",
           "SetupCallback", "WrappedDataset", "worker_init_fn"]

if __name__ == "__main__":
    from ldm.train import cli

    sys.exit(cli())
