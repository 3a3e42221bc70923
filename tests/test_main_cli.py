"""The pure pieces of the main.py command line: flags, --gpus, config merging and overrides, run paths, lr rule."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldm.cli import (device_count, get_parser, merge_configs, parse_cli, parse_gpus, resolve_run, scaled_learning_rate,
                     split_cli_args, str2bool, trainer_arguments)
from ldm.train import callbacks_config, checkpoint_config, logger_config
from ldm.util import ConfigError


@pytest.mark.parametrize("word,value", [("yes", True), ("True", True), ("t", True), ("1", True), ("Y", True),
                                        ("no", False), ("FALSE", False), ("f", False), ("0", False)])
def test_str2bool(word, value):
    assert str2bool(word) is value


def test_str2bool_rejects_other_words():
    with pytest.raises(argparse.ArgumentTypeError, match="maybe"):
        str2bool("maybe")


def test_original_flags_parse():
    opt, unknown = parse_cli(
        ["-b", "a.yaml", "b.yaml", "-t", "--gpus", "0,1", "-n", "run", "-s", "7", "--scale_lr", "False",
         "-l", "out", "-f", "_x", "--no-test", "model.params.x=1"])
    assert opt.base == ["a.yaml", "b.yaml"] and opt.train is True and opt.gpus == "0,1" and opt.name == "run"
    assert opt.seed == 7 and opt.scale_lr is False and opt.logdir == "out" and opt.postfix == "_x"
    assert opt.no_test is True and unknown == ["model.params.x=1"]
    defaults = get_parser().parse_args([])
    assert defaults.scale_lr is True and defaults.train is False and defaults.seed == 23 and defaults.logdir == "logs"


def test_boolean_flag_followed_by_override_means_true():
    opt, unknown = parse_cli(["-b", "c.yaml", "-t", "model.params.x=1", "--scale_lr", "false", "-d"])
    assert opt.train is True and opt.scale_lr is False and opt.debug is True and unknown == ["model.params.x=1"]


@pytest.mark.parametrize("spec,parsed", [(None, None), ("", None), ("0", None), (0, None), ("0,1", [0, 1]),
                                         ("0,", [0]), ("1,3,", [1, 3]), (" 2 ", 2), (2, 2), ("-1", -1),
                                         ([0, 2], [0, 2])])
def test_parse_gpus_follows_lightning_1(spec, parsed):
    assert parse_gpus(spec) == parsed


@pytest.mark.parametrize("spec", ["a", "0;1", "-2", True])
def test_parse_gpus_rejects_nonsense_naming_it(spec):
    with pytest.raises(ValueError, match="--gpus"):
        parse_gpus(spec)


def test_device_count():
    assert device_count([0, 1]) == 2 and device_count(3) == 3 and device_count(None) == 1
    assert device_count(-1, available=4) == 4 and device_count("auto", available=8) == 8 and device_count("0,") == 1


def test_trainer_arguments_cpu_when_no_gpus():
    kw = trainer_arguments({"max_steps": 5, "benchmark": True})
    assert kw == {"max_steps": 5, "benchmark": True, "accelerator": "cpu", "devices": 1}


def test_trainer_arguments_gpus_map_to_devices_and_ddp():
    assert trainer_arguments({}, gpus="0,1") == {"accelerator": "gpu", "devices": [0, 1], "strategy": "ddp"}
    assert trainer_arguments({}, gpus="0,") == {"accelerator": "gpu", "devices": [0]}
    assert trainer_arguments({"gpus": "1,"}) == {"accelerator": "gpu", "devices": [1]}
    assert trainer_arguments({"gpus": "1,"}, gpus="0,2")["devices"] == [0, 2]  # the flag wins over the config


def test_trainer_arguments_translate_lightning_1_spellings():
    kw = trainer_arguments({"accelerator": "ddp", "replace_sampler_ddp": False, "weights_summary": None}, gpus="0,1")
    assert kw == {"accelerator": "gpu", "devices": [0, 1], "strategy": "ddp", "use_distributed_sampler": False}
    assert trainer_arguments({"accelerator": "ddp"}) == {"accelerator": "cpu", "devices": 1}  # no GPUs: no DDP
    assert trainer_arguments({"accelerator": "ddp_spawn"}, gpus="2")["strategy"] == "ddp_spawn"


def test_trainer_arguments_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"lightning.trainer.max_step'.*max_steps"):
        trainer_arguments({"max_step": 3})


def test_split_cli_args_overrides_and_trainer_flags():
    dotlist, trainer = split_cli_args(["model.params.x=1", "--max_steps", "10", "--precision=bf16-mixed",
                                       "data.params.batch_size=2"])
    assert dotlist == ["model.params.x=1", "data.params.batch_size=2"]
    assert trainer == {"max_steps": 10, "precision": "bf16-mixed"}


def test_split_cli_args_unknown_flag_suggests_trainer_argument():
    with pytest.raises(ConfigError, match=r"--max_epoch'.*--max_epochs"):
        split_cli_args(["--max_epoch", "3"])
    with pytest.raises(ConfigError, match="stray"):
        split_cli_args(["stray"])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_configs_merge_left_to_right_then_overrides(tmp_path):
    a = _write(tmp_path / "a.yaml", "model:\n  lr: 1\n  params: {x: 1, keep: k, chans: [1, 2, 4]}\n"
                                    "lightning:\n  trainer: {max_steps: 5}\n")
    b = _write(tmp_path / "b.yaml", "model:\n  params: {x: 2, chans: [8]}\n")
    cfg = merge_configs([a, b], ["model.params.x=3", "lightning.trainer.max_steps=10", "model.params.new.deep=true",
                                 "model.params.chans=[3,3]"])
    assert cfg.model.lr == 1 and cfg.model.params.keep == "k"  # untouched keys survive
    assert cfg.model.params.x == 3 and cfg.lightning.trainer.max_steps == 10 and cfg.model.params.new.deep is True
    assert list(cfg.model.params.chans) == [3, 3]
    assert list(merge_configs([a, b]).model.params.chans) == [8]  # a later file replaces a list whole


def test_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nothere.yaml"):
        merge_configs([tmp_path / "nothere.yaml"])
    bad = _write(tmp_path / "bad.yaml", "model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        merge_configs([bad])
    scalar = _write(tmp_path / "scalar.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="scalar.yaml"):
        merge_configs([scalar])


def _opt(**kw) -> argparse.Namespace:
    opt = get_parser().parse_args([])
    for k, v in kw.items():
        setattr(opt, k, v)
    return opt


def test_new_run_names(tmp_path):
    run = resolve_run(_opt(base=["configs/x/cin-ldm.yaml"], postfix="_v2", logdir=str(tmp_path)), "NOW")
    assert run.logdir == tmp_path / "NOW_cin-ldm_v2" and run.resume_ckpt is None
    assert run.ckptdir == run.logdir / "checkpoints" and run.cfgdir == run.logdir / "configs"
    assert resolve_run(_opt(name="exp", base=["a.yaml"], logdir="logs"), "NOW").logdir == Path("logs/NOW_exp")
    assert resolve_run(_opt(), "NOW").nowname == "NOW"


def _fake_logdir(tmp_path: Path) -> Path:
    logdir = tmp_path / "2020-01-01T00-00-00_cfg"
    (logdir / "checkpoints").mkdir(parents=True)
    (logdir / "configs").mkdir()
    (logdir / "checkpoints" / "last.ckpt").write_bytes(b"")
    (logdir / "checkpoints" / "epoch=000001.ckpt").write_bytes(b"")
    for name in ("t2-project.yaml", "t1-project.yaml", "t1-lightning.yaml"):
        (logdir / "configs" / name).write_text("{}\n")
    return logdir


def test_resume_from_logdir_uses_last_ckpt_and_saved_configs_first(tmp_path):
    logdir = _fake_logdir(tmp_path)
    run = resolve_run(_opt(resume=str(logdir), base=["extra.yaml"]), "NOW")
    assert run.logdir == logdir and run.nowname == logdir.name
    assert run.resume_ckpt == logdir / "checkpoints" / "last.ckpt"
    assert [Path(p).name for p in run.base] == ["t1-lightning.yaml", "t1-project.yaml", "t2-project.yaml",
                                                "extra.yaml"]


def test_resume_from_checkpoint_finds_logdir_two_levels_up(tmp_path):
    logdir = _fake_logdir(tmp_path)
    ckpt = logdir / "checkpoints" / "epoch=000001.ckpt"
    run = resolve_run(_opt(resume=str(ckpt)), "NOW")
    assert run.logdir == logdir and run.resume_ckpt == ckpt and len(run.base) == 3


def test_resume_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot be given together"):
        resolve_run(_opt(resume="x", name="y"), "NOW")
    with pytest.raises(ConfigError, match="nowhere"):
        resolve_run(_opt(resume=str(tmp_path / "nowhere")), "NOW")
    with pytest.raises(ConfigError, match="last.ckpt"):
        resolve_run(_opt(resume=str(tmp_path)), "NOW")


def test_scaled_learning_rate_rule_and_switch():
    lr, msg = scaled_learning_rate(1e-4, batch_size=8, devices=2, accumulate_grad_batches=2)
    assert lr == pytest.approx(2 * 2 * 8 * 1e-4) and "3.20e-03" in msg and "--scale_lr False" in msg
    assert scaled_learning_rate(1e-4, 8, 2, 2, num_nodes=3)[0] == pytest.approx(3 * 3.2e-3)
    lr, msg = scaled_learning_rate(1e-4, batch_size=8, devices=2, accumulate_grad_batches=2, scale=False)
    assert lr == 1e-4 and "scale_lr False" in msg


class _Monitored:
    monitor = "val/loss"


def test_checkpoint_config_monitors_model_metric_and_takes_overrides(tmp_path):
    run = resolve_run(_opt(logdir=str(tmp_path)), "NOW")
    cfg = checkpoint_config(OmegaConf.create({}), run, _Monitored())
    assert cfg.params.monitor == "val/loss" and cfg.params.save_top_k == 3 and cfg.params.save_last is True
    assert cfg.params.dirpath == str(run.ckptdir)
    cfg = checkpoint_config(OmegaConf.create({"modelcheckpoint": {"params": {"save_top_k": 1}}}), run, object())
    assert cfg.params.save_top_k == 1 and "monitor" not in cfg.params


def test_callbacks_config_merges_user_params_over_defaults(tmp_path):
    run = resolve_run(_opt(logdir=str(tmp_path)), "NOW")
    lightning = OmegaConf.create({"callbacks": {"image_logger": {"target": "main.ImageLogger",
                                                                 "params": {"batch_frequency": 5000}}}})
    cfg = callbacks_config(lightning, run, object())
    assert cfg.image_logger.params.batch_frequency == 5000 and cfg.image_logger.params.max_images == 4
    assert cfg.image_logger.target == "main.ImageLogger"
    assert {"learning_rate_logger", "checkpoint_callback", "emergency_checkpoint"} <= set(cfg)


def test_logger_defaults_to_csv_in_the_run_dir(tmp_path):
    run = resolve_run(_opt(logdir=str(tmp_path)), "NOW")
    cfg = logger_config(OmegaConf.create({}), run, debug=False)
    assert cfg.target.endswith("CSVLogger") and cfg.params.save_dir == str(run.logdir)
    wandb = logger_config(OmegaConf.create({"logger": {"target": "pytorch_lightning.loggers.WandbLogger"}}), run, True)
    assert wandb.params.offline is True and wandb.params.id == "NOW"


def test_a_default_callback_can_be_switched_off_with_null(tmp_path):
    run = resolve_run(_opt(logdir=str(tmp_path)), "NOW")
    cfg = callbacks_config(OmegaConf.create({"callbacks": {"image_logger": None}}), run, object())
    assert cfg.image_logger is None and cfg.learning_rate_logger is not None


def test_gpus_zero_means_cpu_and_says_how_to_pick_gpu_zero(caplog):
    with caplog.at_level("WARNING", logger="ldm.cli"):
        assert trainer_arguments({}, gpus="0") == {"accelerator": "cpu", "devices": 1}
    assert "--gpus 0," in caplog.text


def test_main_py_reports_a_config_error_in_one_line_and_exit_status_2(tmp_path):
    """A bad key on the command line of ``python main.py`` is one line naming the key and the choices, not a
    traceback; a truncated checkpoint passed to -r is named the same way."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "main.py"), "--base", str(root / "configs" / "demo" / "ldm.yaml"), "-t",
           "-l", str(tmp_path / "logs"), "lightning.trainer.accelerator=cpu", "lightning.trainer.strategy=dpp"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "lightning.trainer.strategy" in errors[0] and "did you mean ddp?" in errors[0]

    run = tmp_path / "logs" / "2026-01-01T00-00-00_x"
    (run / "checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    (run / "configs" / "2026-01-01T00-00-00-project.yaml").write_text(
        (root / "configs" / "demo" / "ldm.yaml").read_text())
    (run / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    proc = subprocess.run([sys.executable, str(root / "main.py"), "-r", str(run), "-t",
                           "lightning.trainer.accelerator=cpu"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "last.ckpt" in proc.stderr.splitlines()[-1] and proc.stderr.splitlines()[-1].startswith("error: ")
