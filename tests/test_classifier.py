"""The noisy-latent classifier: its guidance gradient, its checkpoints, and training through main.py."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ldm.data.emoji import EmojiDataset
from ldm.inference import load_model
from ldm.models.diffusion.classifier import (NoisyLatentImageClassifier, check_classifier_classes,
                                             check_classifier_latents, load_classifier_for, load_classifier_network,
                                             read_classifier_info)
from ldm.models.diffusion.guidance import ClassifierGuidance, log_prob_gradient
from ldm.models.diffusion.sampling import SamplingOptions, sample
from ldm.modules.diffusionmodules.openaimodel import EncoderUNetModel
from ldm.util import instantiate_from_config

CONFIGS = Path(__file__).parent / "configs"
LDM_CONFIG = CONFIGS / "classifier-ldm.yaml"


@pytest.fixture(scope="module")
def ldm_ckpt(tmp_path_factory) -> Path:
    """A checkpoint of the tiny class-conditional LDM of classifier-ldm.yaml (random weights)."""
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.load(LDM_CONFIG).model)
    path = tmp_path_factory.mktemp("ldm") / "ldm.ckpt"
    save_checkpoint({"state_dict": model.state_dict()}, path)
    return path


# -- the guidance gradient ------------------------------------------------------------------------------------
def test_gradient_of_a_linear_classifier_is_the_analytic_one():
    """logits = W x: d log p(y | x) / dx = W_y - sum_k p_k W_k."""
    torch.manual_seed(0)
    W = torch.randn(5, 2 * 3 * 3, dtype=torch.float64)

    def classifier(x, t):
        return x.flatten(1) @ W.T

    x, y = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.tensor([0, 3, 4, 3])
    grad = log_prob_gradient(classifier, x, torch.zeros(4), y)
    p = torch.softmax(x.flatten(1) @ W.T, dim=1)
    expected = (W[y] - p @ W).reshape_as(x)
    torch.testing.assert_close(grad, expected)


@pytest.fixture(scope="module")
def encoder_classifier() -> EncoderUNetModel:
    torch.manual_seed(0)
    net = EncoderUNetModel(image_size=8, in_channels=2, model_channels=32, out_channels=4, num_res_blocks=1,
                           attention_resolutions=[2], channel_mult=(1, 2), num_head_channels=16, pool="attention")
    for p in net.parameters():  # the head starts at zero; give it weights so that the gradient is not trivial
        torch.nn.init.normal_(p, std=0.1) if p.ndim > 1 and p.abs().sum() == 0 else None
    return net.double().eval()


def test_gradient_matches_finite_differences_and_is_per_example(encoder_classifier):
    torch.manual_seed(1)
    x, t, y = torch.randn(3, 2, 8, 8, dtype=torch.float64), torch.tensor([0, 10, 40]), torch.tensor([1, 2, 0])
    grad = log_prob_gradient(encoder_classifier, x, t, y)
    assert grad.abs().sum() > 0

    def log_p(xx):
        return torch.log_softmax(encoder_classifier(xx, t), dim=1).gather(1, y[:, None]).squeeze(1)

    eps = 1e-3  # GroupNorm32 normalises in float32, so finite differences need a step well above float32 noise
    for _ in range(3):
        v = torch.randn_like(x)
        fd = (log_p(x + eps * v) - log_p(x - eps * v)) / (2 * eps)  # per example directional derivative
        torch.testing.assert_close((grad * v).flatten(1).sum(1), fd, rtol=1e-3, atol=1e-5)
    for i in range(3):  # each example alone gives its own row: no mixing across the batch
        alone = log_prob_gradient(encoder_classifier, x[i:i + 1], t[i:i + 1], y[i:i + 1])
        torch.testing.assert_close(alone[0], grad[i])


def test_gradient_works_inside_inference_mode(encoder_classifier):
    x, t, y = torch.randn(2, 2, 8, 8, dtype=torch.float64), torch.tensor([3, 5]), torch.tensor([1, 1])
    expected = log_prob_gradient(encoder_classifier, x, t, y)
    with torch.inference_mode():
        x_inf = x.clone()
        got = log_prob_gradient(encoder_classifier, x_inf, t, y)
    with torch.no_grad():
        got_no_grad = log_prob_gradient(encoder_classifier, x, t, y)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_no_grad, expected)


# -- construction and checkpoints -----------------------------------------------------------------------------
def test_the_frozen_ldm_loads_from_config_and_checkpoint_and_keeps_only_what_is_used(ldm_ckpt):
    clf = NoisyLatentImageClassifier(diffusion_config=str(LDM_CONFIG), diffusion_ckpt_path=str(ldm_ckpt),
                                     num_classes=4)
    saved = load_checkpoint(ldm_ckpt)["state_dict"]
    for key, value in clf.diffusion_model.state_dict().items():
        torch.testing.assert_close(value, saved[key], msg=key)
    assert clf.diffusion_model.model is None and clf.diffusion_model.cond_stage_model is None
    assert not any(p.requires_grad for p in clf.diffusion_model.parameters())
    # the encoder takes the UNet's arguments but not its cross-attention ones; latent channels in, classes out
    assert clf.classifier_info.network["params"]["in_channels"] == 3
    assert clf.classifier_info.network["params"]["out_channels"] == 4
    assert "context_dim" not in clf.classifier_info.network["params"]
    assert clf.label_key == "class_label"


def test_the_ldm_is_found_from_a_run_folder_and_its_config_checkpoint(ldm_ckpt, tmp_path):
    """As the original: diffusion_path is a run folder whose latest configs/*-project.yaml is read; without
    diffusion_ckpt_path, the config's own ckpt_path is the checkpoint."""
    config = OmegaConf.load(LDM_CONFIG)
    (tmp_path / "configs").mkdir()
    broken = OmegaConf.create({"model": {"target": "no.such.Model"}})
    OmegaConf.save(broken, tmp_path / "configs" / "2024-01-01T00-00-00-project.yaml")
    config.model.params.ckpt_path = str(ldm_ckpt)
    OmegaConf.save(config, tmp_path / "configs" / "2024-01-02T00-00-00-project.yaml")
    clf = NoisyLatentImageClassifier(diffusion_path=str(tmp_path), num_classes=4)
    assert clf.classifier_info.diffusion["ckpt_path"] == str(ldm_ckpt)
    assert clf.classifier_info.diffusion["config"].endswith("2024-01-02T00-00-00-project.yaml")
    saved = load_checkpoint(ldm_ckpt)["state_dict"]
    key = next(k for k in saved if k.startswith("first_stage_model.encoder."))
    torch.testing.assert_close(clf.diffusion_model.state_dict()[key], saved[key])
    with pytest.raises(FileNotFoundError, match="no configs/\\*-project.yaml under"):
        NoisyLatentImageClassifier(diffusion_path=str(tmp_path / "nowhere"), num_classes=4)


def test_a_checkpoint_of_another_model_is_refused_by_name(ldm_ckpt, tmp_path):
    wrong = tmp_path / "unet_only.ckpt"
    sd = load_checkpoint(ldm_ckpt)["state_dict"]
    save_checkpoint({"state_dict": {k: v for k, v in sd.items() if k.startswith("model.")}}, wrong)
    with pytest.raises(CheckpointError, match=f"{wrong}: not a checkpoint of the diffusion model of .*classifier-ldm"):
        NoisyLatentImageClassifier(diffusion_config=str(LDM_CONFIG), diffusion_ckpt_path=str(wrong), num_classes=4)


def test_labels_out_of_range_and_missing_keys_are_named(ldm_ckpt):
    clf = NoisyLatentImageClassifier(diffusion_config=str(LDM_CONFIG), diffusion_ckpt_path=str(ldm_ckpt),
                                     num_classes=2)
    with pytest.raises(ValueError, match="labels 'class_label' range over \\[0, 3\\]"):
        clf.get_conditioning({"class_label": torch.tensor([0, 3])})
    with pytest.raises(KeyError, match="no label key 'class_label'"):
        clf.get_conditioning({"caption": ["a"]})
    with pytest.raises(ValueError, match="label_key 'segmentation': the original's per-pixel classifier"):
        NoisyLatentImageClassifier(diffusion_config=str(LDM_CONFIG), num_classes=2, label_key="segmentation")
    with pytest.raises(ValueError, match="class_names has 1 names for num_classes=2"):
        NoisyLatentImageClassifier(diffusion_config=str(LDM_CONFIG), num_classes=2, class_names=["a"])


def test_class_checks_name_the_file_and_the_entry(tmp_path):
    info = read_classifier_info({"classifier": {"num_classes": 3, "class_names": ["cat", "dog", "fox"]}}, "c.ckpt")
    check_classifier_classes(info, "c.ckpt", 3, ["cat", "dog", "fox"])
    with pytest.raises(ValueError, match="c.ckpt: the classifier has 3 classes \\('classifier.num_classes'\\) but "
                                         "the model has 1000"):
        check_classifier_classes(info, "c.ckpt", 1000)
    with pytest.raises(ValueError, match="c.ckpt: class 1 is 'dog' in the classifier \\('classifier.class_names"
                                         "\\[1\\]'\\) but 'wolf' in the model"):
        check_classifier_classes(info, "c.ckpt", 3, ["cat", "wolf", "fox"])
    with pytest.raises(ValueError, match="plain.ckpt: not a NoisyLatentImageClassifier checkpoint"):
        read_classifier_info({"state_dict": {}}, "plain.ckpt")
    latent = read_classifier_info({"classifier": {"num_classes": 3, "diffusion": {
        "channels": 3, "num_timesteps": 1000, "scale_factor": 0.18215}}}, "c.ckpt")
    check_classifier_latents(latent, "c.ckpt", 3, 1000, 0.18215)
    with pytest.raises(ValueError, match="c.ckpt: the classifier was trained with scale_factor=0.18215 "
                                         "\\('classifier.diffusion.scale_factor'\\) but the model has 1.0"):
        check_classifier_latents(latent, "c.ckpt", 3, 1000, 1.0)


# -- training through main.py ---------------------------------------------------------------------------------
def read_metric(logdir: Path, name: str) -> list[float]:
    (path,) = logdir.glob("csv/*/metrics.csv")
    with open(path) as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_classifier_trains_through_main_and_its_checkpoint_guides(tmp_path, repo_root, ldm_ckpt):
    env = {**os.environ, "PYTHONPATH": str(repo_root), "OMP_NUM_THREADS": "1"}
    logs = tmp_path / "logs"
    proc = subprocess.run(
        [sys.executable, "main.py", "--base", str(CONFIGS / "classifier-tiny.yaml"), "-t", "-l", str(logs), "-s", "0",
         f"model.params.diffusion_config={LDM_CONFIG}", f"model.params.diffusion_ckpt_path={ldm_ckpt}"],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (logdir,) = [d for d in logs.iterdir() if d.is_dir()]

    losses = read_metric(logdir, "train/loss_step")
    assert len(losses) == 60
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.75 * first, (first, last)  # from ~log(4) = 1.39

    ckpt_path = logdir / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(ckpt_path)
    assert not any(k.startswith("diffusion_model.") for k in ckpt["state_dict"])  # the frozen LDM is not copied
    net, info = load_classifier_network(ckpt_path)
    assert info.num_classes == 4 and info.class_names[1] == "face with tears of joy"
    assert info.diffusion["ckpt_path"] == str(ldm_ckpt) and info.diffusion["channels"] == 3
    with pytest.raises(ValueError, match=f"{ckpt_path}: the classifier has 4 classes"):
        check_classifier_classes(info, ckpt_path, 5)

    # the saved network classifies slightly noised latents of held-out emoji better than chance
    ldm = NoisyLatentImageClassifier(diffusion_config=str(LDM_CONFIG), diffusion_ckpt_path=str(ldm_ckpt),
                                     num_classes=4).diffusion_model
    data = EmojiDataset(size=16, split="test", max_classes=4, repeats=8)
    batch = torch.utils.data.default_collate([data[i] for i in range(len(data))])
    with torch.no_grad():
        x = torch.as_tensor(batch["image"]).permute(0, 3, 1, 2)
        z = ldm.get_first_stage_encoding(ldm.encode_first_stage(x))
        t = torch.full((len(z),), 5)
        accuracy = (net(ldm.q_sample(z, t), t).argmax(1) == batch["class_label"]).float().mean()
    assert accuracy > 0.5, accuracy  # chance is 0.25
    # and guidance toward a class raises its probability: one gradient step on log p(y | z_t)
    y = (batch["class_label"] + 1) % 4
    zt = ldm.q_sample(z, t)
    before = torch.softmax(net(zt, t), 1).gather(1, y[:, None]).mean()
    after_z = zt + 0.5 * log_prob_gradient(net, zt, t, y)
    after = torch.softmax(net(after_z, t), 1).gather(1, y[:, None]).mean()
    assert after > before
    check_guided_sampling(ckpt_path, ldm_ckpt, net, tmp_path)


def check_guided_sampling(ckpt_path: Path, ldm_ckpt: Path, net: torch.nn.Module, tmp_path: Path) -> None:
    """The trained classifier guides the LDM's sampler towards the sampled classes, from the library and from
    scripts/sample_diffusion.py, and a model with other classes refuses it, naming the file and the entry."""
    model = load_model(LDM_CONFIG, ldm_ckpt, "cpu")
    guiding, _ = load_classifier_for(ckpt_path, model)
    y = torch.arange(16) % 4
    c = model.get_learned_conditioning({"class_label": y})
    x_T = torch.randn(model.latent_shape(16), generator=torch.Generator().manual_seed(0))
    zero = torch.zeros(16, dtype=torch.long)
    probability = {}
    for scale in (0.0, 5.0):
        z = sample(model, x_T.shape, c, guider=ClassifierGuidance(guiding, y, scale), x_T=x_T,
                   options=SamplingOptions(steps=10)).samples
        with torch.no_grad():
            probability[scale] = torch.softmax(net(z, zero), 1).gather(1, y[:, None]).mean().item()
    assert probability[5.0] > probability[0.0] + 0.05, probability

    out = tmp_path / "guided"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "scripts/sample_diffusion.py", "--config", str(LDM_CONFIG), "--ckpt",
                           str(ldm_ckpt), "--classifier", str(ckpt_path), "--classifier_scale", "5", "--classes",
                           "1", "--n_samples", "2", "--steps", "3", "--npz", "--outdir", str(out)],
                          cwd=env["PYTHONPATH"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(np.load(out / "samples.npz")["arr_1"]) == [1, 1]

    other = OmegaConf.load(LDM_CONFIG)
    other.model.params.cond_stage_config.params.n_classes = 7
    with pytest.raises(ValueError, match=f"{ckpt_path}: the classifier has 4 classes \\('classifier.num_classes'\\) "
                                         f"but the model has 6"):
        load_classifier_for(ckpt_path, instantiate_from_config(other.model))


def test_the_imagenet_classifier_config_is_valid_and_builds_its_network(repo_root):
    from ldm.models.diffusion.classifier import classifier_network_config
    from ldm.util import check_arguments, get_obj_from_str

    cfg = OmegaConf.load(repo_root / "configs" / "classifier" / "cin-f4-noisy-latent-classifier.yaml")
    params = OmegaConf.to_container(cfg.model.params)
    check_arguments(get_obj_from_str(cfg.model.target), params, cfg.model.target)
    ldm = OmegaConf.load(repo_root / params["diffusion_config"]).model
    network = classifier_network_config(ldm.params.unet_config, ldm.params.channels, params["num_classes"],
                                        params["pool"], params["classifier_config"])
    with torch.device("meta"):
        net = instantiate_from_config(network)
    assert isinstance(net, EncoderUNetModel) and net.in_channels == 3 and net.out_channels == 1000
    assert network["params"]["channel_mult"] == [1, 2, 3, 5]  # the LDM's, with the guided-diffusion width/depth
    assert 30e6 < sum(p.numel() for p in net.parameters()) < 300e6
    for split in ("train", "validation"):
        ds = cfg.data.params[split]
        check_arguments(get_obj_from_str(ds.target), dict(ds.params), ds.target)
