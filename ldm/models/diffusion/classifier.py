"""A classifier of noisy latents p(y | z_t, t) for classifier guidance in latent space (Dhariwal & Nichol 2021,
"Diffusion Models Beat GANs on Image Synthesis", Sec. 4; the LDM paper's guided ImageNet samples).

:class:`NoisyLatentImageClassifier` (the original's name and arguments) trains the encoder half of the UNet
(``EncoderUNetModel``) on ``z_t = q_sample(scale_factor * E(x), t)`` at uniformly random steps ``t`` of a
frozen latent diffusion model, loaded from its config and checkpoint. Only the LDM's first stage and noise
schedule are used and kept; its UNet, EMA and conditioner are dropped after loading. Checkpoints hold the
classifier network (``model.*``) and, under ``checkpoint["classifier"]``, its classes, its network config and the
LDM it was trained on (see :func:`read_classifier_info`), so that guidance can load the network alone
(:func:`load_classifier_network`) and refuse a classifier whose classes differ from the model's
(:func:`check_classifier_classes`, :func:`check_classifier_latents`). The guidance itself is
:class:`~ldm.models.diffusion.guidance.ClassifierGuidance` (:func:`load_classifier_guidance` builds it from a
checkpoint for a model).
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ldm.checkpoint import CheckpointError, load_checkpoint, load_state_dict, load_weights
from ldm.data.layout_json import read_class_names
from ldm.models.diffusion.first_stage import freeze
from ldm.models.diffusion.image_logging import text_images
from ldm.modules.diffusionmodules.openaimodel import EncoderUNetModel
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

CLASS_LABEL = "class_label"
CHECKPOINT_KEY = "classifier"
NETWORK_TARGET = "ldm.modules.diffusionmodules.openaimodel.EncoderUNetModel"
# what the classifier needs of the diffusion model: the first stage and the noise schedule
_USED_PREFIXES = ("first_stage_model.", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")


@dataclasses.dataclass(frozen=True)
class ClassifierInfo:
    """What a classifier checkpoint records about itself (``checkpoint["classifier"]``)."""

    num_classes: int
    class_names: tuple[str, ...] | None
    label_key: str
    network: Mapping[str, Any]
    diffusion: Mapping[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes,
                "class_names": None if self.class_names is None else list(self.class_names),
                "label_key": self.label_key, "network": dict(self.network), "diffusion": dict(self.diffusion)}


def read_classifier_info(checkpoint: Mapping[str, Any], path: str | Path) -> ClassifierInfo:
    """The :class:`ClassifierInfo` of a loaded checkpoint; a ValueError naming `path` if it has none."""
    info = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(info, Mapping) or "num_classes" not in info:
        raise ValueError(f"{path}: not a NoisyLatentImageClassifier checkpoint (no '{CHECKPOINT_KEY}' entry with "
                         f"its classes); train the classifier with this version of the code")
    names = info.get("class_names")
    return ClassifierInfo(int(info["num_classes"]), None if names is None else tuple(str(n) for n in names),
                          str(info.get("label_key", CLASS_LABEL)), dict(info.get("network") or {}),
                          dict(info.get("diffusion") or {}))


def check_classifier_classes(info: ClassifierInfo, path: str | Path, num_classes: int,
                             class_names: Sequence[str] | None = None) -> None:
    """Refuses a classifier whose classes differ from the model's: a ValueError naming the file and the entry.

    :param num_classes: the model's number of real classes (without a classifier-free-guidance null class).
    :param class_names: the model's class names, compared one by one when both sides have them.
    """
    if info.num_classes != num_classes:
        raise ValueError(f"{path}: the classifier has {info.num_classes} classes ('{CHECKPOINT_KEY}.num_classes') "
                         f"but the model has {num_classes}")
    if class_names is not None and info.class_names is not None:
        for i, (ours, theirs) in enumerate(zip(info.class_names, class_names)):
            if ours != theirs:
                raise ValueError(f"{path}: class {i} is {ours!r} in the classifier ('{CHECKPOINT_KEY}.class_names"
                                 f"[{i}]') but {theirs!r} in the model")


def check_classifier_latents(info: ClassifierInfo, path: str | Path, channels: int, num_timesteps: int,
                             scale_factor: float) -> None:
    """Refuses a classifier trained on another latent space or schedule than the model's: a ValueError naming the
    file and the entry (``classifier.diffusion.channels``, ``.num_timesteps``, ``.scale_factor``)."""
    ours = {"channels": channels, "num_timesteps": num_timesteps, "scale_factor": float(scale_factor)}
    for key, value in ours.items():
        theirs = info.diffusion.get(key)
        if theirs is not None and (abs(float(theirs) - value) > 1e-6 * max(1.0, abs(value))):
            raise ValueError(f"{path}: the classifier was trained with {key}={theirs} ('{CHECKPOINT_KEY}.diffusion."
                             f"{key}') but the model has {value}")


def load_classifier_network(path: str | Path, map_location: Any = "cpu") -> tuple[nn.Module, ClassifierInfo]:
    """The classifier network of a checkpoint (frozen, eval mode) and its :class:`ClassifierInfo`, without the LDM.

    :return: ``(net, info)``; ``net(x [N x C x h x w], t [N]) -> logits [N x num_classes]``.
    """
    checkpoint = load_checkpoint(path, map_location)
    info = read_classifier_info(checkpoint, path)
    net = instantiate_from_config(info.network)
    weights = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    load_weights(net, weights, strict=True, source=path)
    return freeze(net), info


def load_classifier_for(path: str | Path, model: Any, map_location: Any = "cpu") -> tuple[nn.Module, ClassifierInfo]:
    """The classifier network of checkpoint `path` for guiding the latent diffusion `model`, checked against it.

    Its latents must be the model's (channels, number of steps, scale factor) and, when the model is
    class-conditional, its classes the model's real classes (``n_classes``, or ``n_classes - 1`` when the last
    class is the null class of classifier-free guidance); an unconditional model may be guided by any classifier
    of its latents.

    :return: ``(net, info)`` as :func:`load_classifier_network`.
    :raises ValueError: naming `path` and the checkpoint entry that does not fit.
    """
    net, info = load_classifier_network(path, map_location)
    check_classifier_latents(info, path, int(model.channels), int(model.num_timesteps),
                             float(getattr(model, "scale_factor", 1.0)))
    conditions = getattr(model, "conditions", None)
    n_classes = getattr(getattr(model, "cond_stage_model", None), "n_classes", None)
    if conditions is not None and conditions.class_conditional and n_classes is not None:
        n_classes = int(n_classes)
        with_null = conditions.null_label == n_classes - 1 and info.num_classes != n_classes
        check_classifier_classes(info, path, n_classes - 1 if with_null else n_classes)
    return net, info


def _config_from(diffusion_config: str | Path | Mapping[str, Any] | None,
                 diffusion_path: str | Path | None) -> tuple[dict[str, Any], str]:
    """The LDM's model config (``target``/``params``) and where it came from."""
    if diffusion_config is not None and not isinstance(diffusion_config, (str, Path)):
        config = OmegaConf.to_container(OmegaConf.create(diffusion_config), resolve=True)
        return dict(config.get("model", config)), "diffusion_config"
    if diffusion_config is not None:
        source = Path(diffusion_config).expanduser()
        if not source.is_file():
            raise FileNotFoundError(f"diffusion_config: file {source} does not exist")
    else:
        if diffusion_path is None:
            raise ValueError("NoisyLatentImageClassifier needs the diffusion model: diffusion_path (a run folder "
                             "with configs/*-project.yaml) or diffusion_config (a config file or mapping)")
        configs = sorted((Path(diffusion_path).expanduser() / "configs").glob("*-project.yaml"))
        if not configs:
            raise FileNotFoundError(f"diffusion_path: no configs/*-project.yaml under {diffusion_path}")
        source = configs[-1]  # run configs are named by their start time: the last is the latest
    config = OmegaConf.to_container(OmegaConf.load(source), resolve=True)
    config = config.get("model", config)
    if "target" not in config:
        raise ValueError(f"{source}: no model config (a 'model' section with 'target' and 'params')")
    return dict(config), str(source)


def load_frozen_diffusion(config: Mapping[str, Any], ckpt_path: str | Path | None, source: str) -> nn.Module:
    """Builds the LDM of `config` (without its own ``ckpt_path``), loads `ckpt_path` (the first stage and schedule
    must be in it), freezes it and drops the parts a noisy-latent classifier does not use (UNet, EMA,
    conditioner)."""
    config = copy.deepcopy(dict(config))
    params = dict(config.get("params") or {})
    params.pop("ckpt_path", None)
    config["params"] = params
    model = instantiate_from_config(config)
    if ckpt_path is not None:
        missing, _ = load_weights(model, load_state_dict(ckpt_path), strict=False, source=ckpt_path)
        needed = [k for k in missing if k.startswith(_USED_PREFIXES) or k == "scale_factor"]
        if needed:
            raise CheckpointError(f"{ckpt_path}: not a checkpoint of the diffusion model of {source}: it lacks "
                                  f"{len(needed)} keys the classifier needs, e.g. {needed[:3]}")
    else:
        logger.warning("NoisyLatentImageClassifier: no diffusion_ckpt_path; the LDM of %s has the first stage its "
                       "config loads and the scale_factor its config gives", source)
    for name in ("model", "model_ema", "cond_stage_model"):
        if isinstance(getattr(model, name, None), nn.Module):
            setattr(model, name, None)
    return freeze(model)


def classifier_network_config(unet_config: Mapping[str, Any], in_channels: int, num_classes: int, pool: str,
                              overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``EncoderUNetModel`` config of a classifier: the LDM's UNet arguments that the encoder takes (the
    cross-attention ones are dropped), with the latent channels in, `num_classes` out, `pool`, and `overrides`."""
    accepted = set(inspect.signature(EncoderUNetModel).parameters)
    # plain containers: checkpoints record this config, and they hold no OmegaConf objects
    params = OmegaConf.to_container(OmegaConf.create(dict(unet_config.get("params") or {})), resolve=True)
    overrides = OmegaConf.to_container(OmegaConf.create(dict(overrides or {})), resolve=True)
    dropped = sorted(k for k in params if k not in accepted)
    if dropped:
        logger.info("classifier network: leaving out UNet arguments the encoder does not take: %s", dropped)
    params = {k: v for k, v in params.items() if k in accepted}
    params.update(in_channels=in_channels, out_channels=num_classes, pool=pool)
    params.update(overrides)
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"classifier_config: EncoderUNetModel takes no {unknown}; valid: {sorted(accepted)}")
    return {"target": NETWORK_TARGET, "params": params}


class NoisyLatentImageClassifier(pl.LightningModule):
    """Trains p(y | z_t, t) on the noisy latents of a frozen LDM (see the module docstring).

    Batches are dicts with the LDM's ``first_stage_key`` images ([N x H x W x 3] in [-1, 1]) and ``label_key``
    labels ([N] ints).

    :param diffusion_path: the LDM's run folder (its latest ``configs/*-project.yaml`` is read), as the original.
    :param num_classes: number of classes.
    :param ckpt_path: initialise the classifier network from this checkpoint's ``model.*`` weights.
    :param pool: the encoder's head: ``attention`` (as the original; needs ``num_head_channels``), ``adaptive``,
        ``spatial`` or ``spatial_v2``.
    :param label_key: batch key of the labels; default the LDM's ``cond_stage_key`` when that is ``class_label``.
    :param diffusion_ckpt_path: the LDM's checkpoint (first stage and schedule are required in it); default the
        ``ckpt_path`` of the LDM's config.
    :param scheduler_config: a learning-rate schedule (``target`` with a ``schedule(step)`` method), per step.
    :param weight_decay: AdamW weight decay.
    :param log_steps: validation reports the accuracy at this many evenly spaced diffusion steps.
    :param monitor: the metric checkpoints are ranked by.
    :param diffusion_config: instead of `diffusion_path`: a config file or mapping (the ``model`` section or the
        whole file).
    :param class_names: the class names (a list, or a text file with one per line), recorded in checkpoints.
    :param classifier_config: ``EncoderUNetModel`` arguments that override those taken from the LDM's UNet
        (e.g. a smaller ``model_channels``).
    """

    def __init__(self, diffusion_path: str | None = None, num_classes: int = 1000, ckpt_path: str | None = None,
                 pool: str = "attention", label_key: str | None = None, diffusion_ckpt_path: str | None = None,
                 scheduler_config: Mapping[str, Any] | None = None, weight_decay: float = 1.0e-2,
                 log_steps: int = 10, monitor: str = "val/loss",
                 diffusion_config: str | Mapping[str, Any] | None = None,
                 class_names: str | Sequence[str] | None = None,
                 classifier_config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if num_classes < 2 or log_steps < 1:
            raise ValueError(f"num_classes must be >= 2 and log_steps >= 1, got {num_classes} and {log_steps}")
        config, source = _config_from(diffusion_config, diffusion_path)
        diffusion_ckpt_path = diffusion_ckpt_path or config.get("params", {}).get("ckpt_path")
        self.diffusion_model = load_frozen_diffusion(config, diffusion_ckpt_path, source)
        self.label_key = label_key or getattr(self.diffusion_model, "cond_stage_key", None)
        if self.label_key != CLASS_LABEL and label_key is None:
            raise ValueError(f"label_key is not set and the diffusion model of {source} is conditioned on "
                             f"'{self.label_key}', not class labels; set label_key (e.g. class_label)")
        if self.label_key == "segmentation":
            raise ValueError("label_key 'segmentation': the original's per-pixel classifier (a full UNet on label "
                             "maps) is not supported; this classifier predicts one class label per image")
        names = read_class_names(class_names)
        names = None if names is None else tuple(names)
        if names is not None and len(names) != num_classes:
            raise ValueError(f"class_names has {len(names)} names for num_classes={num_classes}")
        self.num_classes = num_classes
        self.monitor = monitor
        self.log_steps = log_steps
        self.weight_decay = weight_decay
        self.scheduler_config = scheduler_config
        unet_config = config["params"]["unet_config"]
        network = classifier_network_config(unet_config, int(self.diffusion_model.channels), num_classes, pool,
                                            classifier_config)
        self.model = instantiate_from_config(network)
        self.classifier_info = ClassifierInfo(num_classes, names, self.label_key, network, {
            "config": source, "ckpt_path": None if diffusion_ckpt_path is None else str(diffusion_ckpt_path),
            "target": config["target"], "channels": int(self.diffusion_model.channels),
            "image_size": int(self.diffusion_model.image_size),
            "num_timesteps": int(self.diffusion_model.num_timesteps),
            "scale_factor": float(self.diffusion_model.scale_factor)})
        if ckpt_path is not None:
            weights = {k[len("model."):]: v for k, v in load_state_dict(ckpt_path).items() if k.startswith("model.")}
            load_weights(self.model, weights, strict=True, source=ckpt_path)

    # -- data -------------------------------------------------------------------------------------------------
    def forward(self, x_noisy: torch.Tensor, t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Logits [N x num_classes] of noisy latents [N x C x h x w] at steps `t` [N]."""
        return self.model(x_noisy, t)

    @torch.no_grad()
    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        """``batch[k]`` ([N x H x W x C]) as a float [N x C x H x W] Tensor on this module's device."""
        x = torch.as_tensor(batch[k])
        if x.ndim == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).contiguous().float().to(self.device)

    def get_conditioning(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The [N] long labels of a batch, checked against ``num_classes``."""
        if self.label_key not in batch:
            raise KeyError(f"batch has no label key '{self.label_key}' (keys: {', '.join(map(str, batch))})")
        labels = torch.as_tensor(batch[self.label_key]).long().reshape(-1).to(self.device)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels '{self.label_key}' range over [{int(labels.min())}, {int(labels.max())}], "
                             f"outside [0, num_classes={self.num_classes})")
        return labels

    @torch.no_grad()
    def latents(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The LDM's scaled latents ``scale_factor * E(x)`` [N x C x h x w] of the batch's images."""
        ldm = self.diffusion_model
        x = self.get_input(batch, ldm.first_stage_key)
        return ldm.get_first_stage_encoding(ldm.encode_first_stage(x)).detach()

    def shared_step(self, batch: Mapping[str, Any],
                    t: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss, logits, noisy latents and labels at random steps (or all at step `t`)."""
        z = self.latents(batch)
        targets = self.get_conditioning(batch)
        n = z.shape[0]
        steps = self.diffusion_model.num_timesteps
        if t is None:
            ts = torch.randint(0, steps, (n,), device=self.device)
        else:
            ts = torch.full((n,), int(t), device=self.device, dtype=torch.long)
        z_t = self.diffusion_model.q_sample(x_start=z, t=ts, noise=torch.randn_like(z))
        logits = self(z_t, ts)
        return F.cross_entropy(logits, targets), logits, z_t, targets

    # -- Lightning ----------------------------------------------------------------------------------------------
    def _accuracies(self, logits: torch.Tensor, targets: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
        out = {}
        for k in (1, 5):
            if k <= self.num_classes:
                top = logits.topk(k, dim=1).indices
                out[f"{prefix}/acc@{k}"] = (top == targets[:, None]).any(dim=1).float().mean()
        return out

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss, logits, _, targets = self.shared_step(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log_dict(self._accuracies(logits.detach(), targets, "train"), on_step=True, on_epoch=True)
        self.log("global_step", float(self.global_step), prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def eval_steps(self) -> list[int]:
        """The diffusion steps validation reports accuracies at: ``log_steps`` evenly spaced ones."""
        steps = self.diffusion_model.num_timesteps
        return sorted({round(i * (steps - 1) / max(1, self.log_steps - 1)) for i in range(self.log_steps)})

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        loss, logits, _, targets = self.shared_step(batch)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True)
        self.log_dict(self._accuracies(logits, targets, "val"), on_epoch=True)
        for t in self.eval_steps():
            _, logits_t, _, _ = self.shared_step(batch, t)
            self.log(f"val/acc@1_t{t}", (logits_t.argmax(dim=1) == targets).float().mean(), on_epoch=True)

    def configure_optimizers(self) -> Any:
        lr = getattr(self, "learning_rate", None)
        if lr is None:
            raise AttributeError("NoisyLatentImageClassifier.learning_rate is not set: main.py sets it from "
                                 "model.base_learning_rate")
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=self.weight_decay)
        if self.scheduler_config is None:
            return optimizer
        schedule = instantiate_from_config(self.scheduler_config)
        return [optimizer], [{"scheduler": LambdaLR(optimizer, lr_lambda=schedule.schedule), "interval": "step",
                              "frequency": 1}]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Records the classes, network and LDM; leaves the frozen LDM out (it is rebuilt from its own files)."""
        checkpoint[CHECKPOINT_KEY] = self.classifier_info.as_dict()
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("diffusion_model.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Puts the frozen LDM's own weights back so that a resumed run loads strictly."""
        state = checkpoint.setdefault("state_dict", {})
        for key, value in self.diffusion_model.state_dict().items():
            state.setdefault(f"diffusion_model.{key}", value)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Inputs, and the decoded noisy latents at three diffusion steps (the classifier's inputs)."""
        batch = {k: v[:N] for k, v in batch.items()}
        x = self.get_input(batch, self.diffusion_model.first_stage_key)
        log = {"inputs": x}
        steps = self.diffusion_model.num_timesteps
        names = self.classifier_info.class_names
        for t in (0, steps // 2, steps - 1):
            _, logits, z_t, targets = self.shared_step(batch, t)
            log[f"inputs@t{t}"] = self.diffusion_model.decode_first_stage(z_t)
            preds = logits.argmax(dim=1).tolist()
            label = [f"{_name(names, y)} -> {_name(names, p)}" for y, p in zip(targets.tolist(), preds)]
            log[f"true_pred@t{t}"] = text_images(label, (x.shape[2], x.shape[3])).to(x)
        return log


def _name(names: Sequence[str] | None, i: int) -> str:
    return names[i] if names is not None else str(i)

