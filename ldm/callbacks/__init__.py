"""Lightning callbacks of the training CLI: log-directory set-up, image grids, emergency checkpoints, a progress bar."""
from ldm.callbacks.emergency import EmergencyCheckpoint
from ldm.callbacks.image_logger import ImageLogger
from ldm.callbacks.progress import StepProgressBar
from ldm.callbacks.setup import SetupCallback

__all__ = ["EmergencyCheckpoint", "ImageLogger", "SetupCallback", "StepProgressBar"]
