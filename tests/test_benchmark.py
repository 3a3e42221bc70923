"""The measuring tools of scripts/benchmark.py (the benchmarks themselves never run in CI)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.performance import set_activation_checkpointing
from ldm.util import count_params, instantiate_from_config

pytestmark = pytest.mark.usefixtures("single_thread")

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
MiB = 2 ** 20


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


def test_cpu_peak_memory_is_the_peak_of_live_allocations():
    bench = load("benchmark_measure")
    kept = []

    def step():
        a = torch.empty(MiB, dtype=torch.uint8)
        b = torch.empty(2 * MiB, dtype=torch.uint8)
        del a  # peak so far: 3 MiB
        c = torch.empty(MiB, dtype=torch.uint8)  # live: 3 MiB again, not more
        kept.append(c)
        del b

    assert bench.peak_step_memory(step, 100, torch.device("cpu")) == 100 + 3 * MiB


def test_dense_breakdown_separates_matrix_products_from_elementwise_work():
    bench = load("benchmark_measure")
    cpu = torch.device("cpu")
    a = torch.randn(384, 384)
    x = torch.randn(1 << 20)

    def products():
        for _ in range(20):
            a @ a

    def elementwise():
        for _ in range(20):
            torch.sigmoid(x).mul_(2).add_(1)

    mixed = [products, elementwise]
    parts = {f.__name__: bench.dense_breakdown(f, cpu) for f in mixed}
    assert parts["products"]["dense_share"] > 0.95 and parts["elementwise"]["dense_share"] == 0
    both = bench.dense_breakdown(lambda: [f() for f in mixed], cpu)
    # both kinds of work counted, each on its side; the bound is (dense + other) / dense
    assert 0.05 < both["dense_share"] < 0.95
    assert both["fusion_bound"] == pytest.approx((both["dense_s"] + both["other_s"]) / both["dense_s"], rel=1e-2)
    assert 1 < both["fusion_bound"] < parts["elementwise"]["fusion_bound"]


def test_activation_checkpointing_lowers_the_measured_training_peak():
    bench = load("benchmark_measure")
    torch.manual_seed(0)
    cfg = OmegaConf.load(Path(__file__).parent / "configs" / "ldm-stage2.yaml").model.params.unet_config
    unet = instantiate_from_config(cfg)
    x, ctx = torch.randn(8, 2, 16, 16), torch.randn(8, 1, 16)

    def step():
        unet(x, torch.full((8,), 3), context=ctx).square().mean().backward()
        unet.zero_grad(set_to_none=True)

    peaks = []
    for enabled in (False, True):
        set_activation_checkpointing(unet, enabled)
        step()
        peaks.append(bench.peak_step_memory(step, 0, torch.device("cpu")))
    assert peaks[1] < 0.75 * peaks[0]


def test_diffusers_counterparts_have_our_architecture():
    pytest.importorskip("diffusers")
    peer = load("benchmark_diffusers")
    config = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "demo" / "ldm.yaml").model.params
    with torch.device("meta"):
        ours_unet = instantiate_from_config(config.unet_config)
        unet, _ = peer.build_unet(config.unet_config.params, count_params(ours_unet))
        ours_fs = instantiate_from_config(config.first_stage_config)
        vae, _, _ = peer.build_autoencoder(config.first_stage_config.target, config.first_stage_config.params,
                                           count_params(ours_fs))
    # the same layers: equal sizes tensor by tensor (diffusers' VAE attention has Linear where ours has 1x1 convs)
    assert sorted(p.numel() for p in unet.parameters()) == sorted(p.numel() for p in ours_unet.parameters())
    assert sorted(p.numel() for p in vae.parameters()) == sorted(p.numel() for p in ours_fs.parameters())
    with pytest.raises(peer.Unsupported, match="SpatialTransformer"):
        peer.unet_kwargs({**config.unet_config.params, "use_spatial_transformer": False})
    with pytest.raises(peer.Unsupported, match="parameters"):
        peer.build_unet(config.unet_config.params, count_params(ours_unet) + 1)


def test_rounds_alternate_so_that_each_subject_goes_first_equally_often():
    for helper in ("benchmark_measure", "benchmark_diffusers"):  # what the script imports from its own folder
        load(helper)
    bench = load("benchmark")
    args = bench.parse_args(["--config", "x.yaml", "--vs", "diffusers", "--compare", "compile"])
    subjects = [name for name, _ in bench.subjects_of(args)]
    assert subjects == ["ours", "ours +compile", "diffusers", "diffusers +compile"]
    rounds = [[name for name, _ in bench.round_order(bench.subjects_of(args), r)] for r in range(4)]
    assert rounds[1] == subjects[::-1] and rounds[2] == subjects
    for name in subjects:  # over an even number of rounds every subject has the same mean turn
        assert sum(order.index(name) for order in rounds) == 2 * (len(subjects) - 1)
    pair = bench.subjects_of(bench.parse_args(["--config", "x.yaml", "--vs", "diffusers"]))
    firsts = [bench.round_order(pair, r)[0][0] for r in range(4)]
    assert firsts == ["ours", "diffusers", "ours", "diffusers"]  # ours against diffusers: each first in half
    # --reverse starts with diffusers; the table keeps the columns (and "ours vs diffusers") in the listed order
    assert [bench.round_order(pair, r, reverse=True)[0][0] for r in range(4)] == firsts[1:] + firsts[:1]
    assert bench.subjects_of(bench.parse_args(["--config", "x.yaml", "--vs", "diffusers", "--reverse"])) == pair
