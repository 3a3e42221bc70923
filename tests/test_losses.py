"""Stage-one losses: KL term, VQ commitment/codebook terms, adaptive GAN weight, disc_start, LPIPS loading."""
from __future__ import annotations

import math

import pytest
import torch

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution, normal_kl
from ldm.modules.losses import LPIPSWithDiscriminator, VQLPIPSWithDiscriminator
from ldm.modules.losses.adversarial import hinge_d_loss, vanilla_d_loss
from ldm.modules.losses.discriminator import ActNorm, NLayerDiscriminator
from ldm.modules.losses.lpips import LPIPS, VGG16_FILENAME, vgg16_weights_path
from ldm.modules.vqvae.quantize import VectorQuantizer2
from ldm.util import get_obj_from_str


@pytest.fixture(autouse=True)
def _one_thread():
    """The CPU is shared: one intra-op thread is much faster than two contending ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def kl_loss() -> LPIPSWithDiscriminator:
    return LPIPSWithDiscriminator(disc_start=5, kl_weight=1e-2, disc_weight=0.5, disc_num_layers=2,
                                  perceptual_weights="random").eval()


# --- DiagonalGaussianDistribution ------------------------------------------------------------------------------------
def test_kl_to_standard_normal_matches_hand_computation():
    torch.manual_seed(0)
    params = torch.randn(2, 6, 3, 3)
    d = DiagonalGaussianDistribution(params)
    mean, logvar = params[:, :3], params[:, 3:]
    expected = torch.zeros(2)
    for n in range(2):
        for m, lv in zip(mean[n].flatten().tolist(), logvar[n].flatten().tolist()):
            expected[n] += 0.5 * (m * m + math.exp(lv) - 1.0 - lv)
    torch.testing.assert_close(d.kl(), expected, rtol=1e-5, atol=1e-5)
    # against another Gaussian: equals the elementwise normal_kl summed
    other = DiagonalGaussianDistribution(torch.randn(2, 6, 3, 3))
    torch.testing.assert_close(d.kl(other), normal_kl(d.mean, d.logvar, other.mean, other.logvar).sum([1, 2, 3]))
    # KL of N(0, I) to itself is zero
    assert DiagonalGaussianDistribution(torch.zeros(1, 4, 2, 2)).kl().abs().max() == 0


def test_gaussian_sample_moments_nll_and_clamp():
    params = torch.cat([torch.full((1, 1, 200, 200), 1.5), torch.full((1, 1, 200, 200), math.log(0.25))], 1)
    d = DiagonalGaussianDistribution(params)
    s = d.sample(generator=torch.Generator().manual_seed(0))
    assert abs(s.mean().item() - 1.5) < 0.01 and abs(s.std().item() - 0.5) < 0.01
    assert torch.equal(d.mode(), params[:, :1])
    x = torch.full((1, 1, 200, 200), 2.0)
    per_elem = 0.5 * (math.log(2 * math.pi) + math.log(0.25) + 0.25 / 0.25)
    torch.testing.assert_close(d.nll(x), torch.tensor([per_elem * 200 * 200]), rtol=1e-5, atol=1e-2)
    clamped = DiagonalGaussianDistribution(torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 99.0)], 1))
    assert clamped.logvar.item() == 20.0
    det = DiagonalGaussianDistribution(params, deterministic=True)
    assert torch.equal(det.sample(), det.mean) and det.kl().abs().sum() == 0
    with pytest.raises(ValueError, match="even number of channels"):
        DiagonalGaussianDistribution(torch.zeros(1, 3, 2, 2))


# --- vector quantiser ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("legacy", [True, False])
def test_vq_loss_terms_and_straight_through(legacy):
    torch.manual_seed(0)
    vq = VectorQuantizer2(n_e=5, e_dim=2, beta=0.25, legacy=legacy)
    z = torch.randn(2, 2, 3, 3, requires_grad=True)
    z_q, loss, (_, _, idx) = vq(z)
    codebook = vq.embedding.weight.detach()
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 2)
    expected_idx = torch.tensor([min(range(5), key=lambda j: float(((v - codebook[j]) ** 2).sum())) for v in flat])
    assert torch.equal(idx, expected_idx)
    nearest = codebook[expected_idx].reshape(2, 3, 3, 2).permute(0, 3, 1, 2)
    torch.testing.assert_close(z_q, nearest)
    mse = ((nearest - z.detach()) ** 2).mean()
    torch.testing.assert_close(loss, mse * 1.25)  # both terms have the same value; beta weights one of them
    # gradients: the commitment term pulls z, the codebook term pulls the codes; which one carries beta
    # depends on `legacy` (the original's default puts beta on the codebook term)
    vq.zero_grad()
    loss.backward()
    commit_weight, codebook_weight = (1.0, 0.25) if legacy else (0.25, 1.0)
    torch.testing.assert_close(z.grad, commit_weight * 2 * (z.detach() - nearest) / z.numel())
    # straight-through: the gradient of z_q w.r.t. z is the identity
    z2 = z.detach().clone().requires_grad_(True)
    vq(z2)[0].sum().backward()
    assert torch.equal(z2.grad, torch.ones_like(z2))
    used = torch.bincount(expected_idx, minlength=5)
    grad_codes = vq.embedding.weight.grad
    for j in range(5):
        if used[j] == 0:
            assert grad_codes[j].abs().sum() == 0
    manual = torch.zeros_like(codebook)
    manual.index_add_(0, expected_idx, codebook_weight * 2 * (codebook[expected_idx] - flat) / z.numel())
    torch.testing.assert_close(grad_codes, manual)


def test_vq_nearest_code_is_exact_under_bf16_autocast():
    torch.manual_seed(0)
    vq = VectorQuantizer2(n_e=512, e_dim=4, beta=0.25)
    vq.embedding.weight.data.normal_()
    z = torch.randn(2, 4, 16, 16) * 3
    ref = vq(z)[2][2]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 distances pick a wrong code for ~3% of these
        assert torch.equal(vq(z)[2][2], ref)


def test_vq_remap_sane_index_shape_and_codebook_entry(tmp_path):
    import numpy as np

    torch.manual_seed(0)
    used = np.array([3, 1, 4])
    np.save(tmp_path / "used.npy", used)
    vq = VectorQuantizer2(n_e=6, e_dim=2, beta=0.25, remap=str(tmp_path / "used.npy"), unknown_index="extra",
                          sane_index_shape=True)
    assert vq.re_embed == 4 and "used" in dict(vq.named_buffers())
    with torch.no_grad():  # inputs exactly on codes 4, 1, 0 (0 is not among the used ones -> the extra index 3)
        z = vq.embedding.weight[[4, 1, 0, 4]].t().reshape(1, 2, 2, 2)
    _, _, (_, _, idx) = vq(z)
    assert idx.shape == (1, 2, 2)
    assert idx.flatten().tolist() == [2, 1, 3, 2]
    back = vq.get_codebook_entry(idx.flatten(), (1, 2, 2, 2))
    assert back.shape == (1, 2, 2, 2)
    # known indices map back to their codes; the extra index maps to used[0] = code 3
    torch.testing.assert_close(back.flatten(2)[0, :, 0], vq.embedding.weight[4])
    torch.testing.assert_close(back.flatten(2)[0, :, 2], vq.embedding.weight[3])
    # without a shape the indices keep their shape and gain the code dimension (as the original)
    torch.testing.assert_close(vq.get_codebook_entry(idx, None), back.permute(0, 2, 3, 1))
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        VectorQuantizer2(6, 2, 0.25, remap=str(tmp_path / "missing.npy"))


# --- GAN pieces ------------------------------------------------------------------------------------------------------
def test_d_losses_and_discriminator_shapes():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.5 * (0.25 + 0.75)))
    sp = torch.nn.functional.softplus
    torch.testing.assert_close(vanilla_d_loss(real, fake), 0.5 * (sp(-real).mean() + sp(fake).mean()))
    d = NLayerDiscriminator(input_nc=3, n_layers=3)
    assert d(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    names = dict(d.named_parameters())
    assert "main.2.bias" not in names and "main.3.weight" in names  # BatchNorm variant: convs before norms unbiased
    assert "main.2.bias" in dict(NLayerDiscriminator(use_actnorm=True).named_parameters())


def test_actnorm_initialises_from_first_batch():
    an = ActNorm(3)
    x = torch.randn(8, 3, 5, 5) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1) + 4.0
    y = an(x)
    assert an.initialized.item() == 1
    torch.testing.assert_close(y.mean([0, 2, 3]), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std([0, 2, 3]), torch.ones(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(an.reverse(y), x, atol=1e-4, rtol=1e-5)


def _posterior(x: torch.Tensor) -> DiagonalGaussianDistribution:
    return DiagonalGaussianDistribution(torch.cat([x[:, :2] * 0.5, torch.full_like(x[:, :2], -1.0)], 1))


def test_kl_loss_value_matches_hand_computation(kl_loss):
    torch.manual_seed(0)
    x, xrec = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    post = _posterior(x)
    with torch.no_grad():
        loss, log = kl_loss(x, xrec, post, 0, global_step=0, split="val")
        p = kl_loss.perceptual_loss(x, xrec)
    rec = (x - xrec).abs() + p  # logvar = 0: nll = rec
    kl = post.kl().sum() / 2
    torch.testing.assert_close(loss, rec.sum() / 2 + 1e-2 * kl)  # no GAN term before disc_start
    torch.testing.assert_close(log["val/kl_loss"], kl)
    torch.testing.assert_close(log["val/rec_loss"], rec.mean())
    assert set(log) == {f"val/{k}" for k in ("total_loss", "logvar", "kl_loss", "nll_loss", "rec_loss", "d_weight",
                                             "disc_factor", "g_loss")}


def test_adaptive_weight_matches_autograd_by_hand(kl_loss):
    torch.manual_seed(0)
    last = torch.randn(3, 8, 3, 3, requires_grad=True)
    feats = torch.randn(2, 8, 16, 16)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    xrec = torch.nn.functional.conv2d(feats, last, padding=1)
    nll = (x - xrec).abs().sum() / 2
    g = -kl_loss.discriminator(xrec).mean()
    w = kl_loss.calculate_adaptive_weight(nll, g, last)
    gn = torch.autograd.grad(nll, last, retain_graph=True)[0]
    gg = torch.autograd.grad(g, last, retain_graph=True)[0]
    expected = 0.5 * gn.norm() / (gg.norm() + 1e-4)
    torch.testing.assert_close(w, expected)
    assert not w.requires_grad
    # without a graph (validation) the weight is zero
    assert kl_loss.calculate_adaptive_weight(nll.detach(), g.detach(), last).item() == 0.0


def test_disc_factor_switches_on_at_disc_start(kl_loss):
    torch.manual_seed(0)
    last = torch.randn(3, 8, 3, 3, requires_grad=True)
    feats = torch.randn(2, 8, 16, 16)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    kl_loss.train()
    try:
        out = {}
        for step in (4, 5):
            xrec = torch.nn.functional.conv2d(feats, last, padding=1)
            post = _posterior(x)
            g_total, log = kl_loss(x, xrec, post, 0, global_step=step, last_layer=last)
            d_total, dlog = kl_loss(x, xrec, post, 1, global_step=step)
            out[step] = (g_total, log, d_total, dlog)
    finally:
        kl_loss.eval()
    g4, log4, d4, _ = out[4]
    g5, log5, d5, dlog5 = out[5]
    assert log4["train/disc_factor"] == 0 and log5["train/disc_factor"] == 1
    assert d4.item() == 0.0
    torch.testing.assert_close(d5, dlog5["train/disc_loss"])
    assert d5.item() > 0
    # the generator loss gains exactly d_weight * g_loss at disc_start
    torch.testing.assert_close(g5 - g4, log5["train/d_weight"] * log5["train/g_loss"], rtol=1e-4, atol=1e-4)
    assert log5["train/d_weight"] > 0


def test_vq_loss_terms_and_log(tmp_path):
    loss_fn = VQLPIPSWithDiscriminator(disc_start=0, codebook_weight=2.0, disc_num_layers=2, perceptual_weight=0.0,
                                       pixel_loss="l2", n_classes=4, perceptual_weights="random").eval()
    torch.manual_seed(0)
    x, xrec = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    qloss = torch.tensor(0.3)
    with torch.no_grad():
        loss, log = loss_fn(qloss, x, xrec, 0, global_step=10, split="val",
                            predicted_indices=torch.tensor([0, 0, 1, 3]))
    torch.testing.assert_close(loss, ((x - xrec) ** 2).mean() + 2.0 * 0.3)  # d_weight = 0 without a graph
    torch.testing.assert_close(log["val/quant_loss"], torch.tensor(0.3))
    # perplexity of usage (1/2, 1/4, 0, 1/4) = exp(entropy)
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    torch.testing.assert_close(log["val/perplexity"], torch.tensor(math.exp(entropy)))
    assert log["val/cluster_usage"].item() == 3
    assert {"val/p_loss", "val/d_weight", "val/disc_factor", "val/g_loss", "val/nll_loss", "val/rec_loss",
            "val/total_loss"} <= set(log)


def test_legacy_taming_targets_resolve():
    assert get_obj_from_str("taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator") is VQLPIPSWithDiscriminator
    assert get_obj_from_str("ldm.modules.losses.contperceptual.DummyLoss")().state_dict() == {}


# --- LPIPS -----------------------------------------------------------------------------------------------------------
def test_lpips_missing_backbone_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        LPIPS()
    msg = str(e.value)
    assert str(tmp_path / "hub" / "checkpoints" / VGG16_FILENAME) in msg and "perceptual_weights: random" in msg


def test_no_perceptual_term_needs_no_vgg_and_stores_none(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no VGG16 file here: building LPIPS would fail
    loss = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0)
    assert loss.perceptual_loss is None
    assert not any(k.startswith("perceptual_loss.") for k in loss.state_dict())
    x, y = torch.zeros(2, 3, 16, 16), torch.ones(2, 3, 16, 16)
    rec, p = loss.reconstruction_terms(x, y)
    assert torch.equal(rec, torch.ones_like(x)) and p.item() == 0.0


def test_lpips_loads_torchvision_vgg_and_package_heads(tmp_path, monkeypatch):
    from torchvision.models.vgg import cfgs, make_layers

    from ldm.checkpoint import load_state_dict
    from ldm.modules.losses.lpips import lpips_heads_path

    torch.manual_seed(0)
    features = make_layers(cfgs["D"])  # torchvision's VGG16 `features`, random weights
    sd = {f"features.{k}": v for k, v in features.state_dict().items()}
    sd["classifier.0.weight"] = torch.zeros(1)  # a full torchvision file also has the classifier: ignored
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    vgg16_weights_path().parent.mkdir(parents=True)
    torch.save(sd, vgg16_weights_path())
    lp = LPIPS()
    ours = lp.state_dict()
    torch.testing.assert_close(ours["net.slice1.0.weight"], sd["features.0.weight"])
    torch.testing.assert_close(ours["net.slice3.14.bias"], sd["features.14.bias"])
    torch.testing.assert_close(ours["net.slice5.28.weight"], sd["features.28.weight"])
    heads = load_state_dict(lpips_heads_path())
    torch.testing.assert_close(ours["lin2.model.1.weight"], heads["lin2.model.1.weight"])
    assert all(not p.requires_grad for p in lp.parameters())
    # the features up to relu5_3 match torchvision's network on the same input
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(lp.net(x)[-1], features[:30](x))
    # a distance: zero for identical images, positive otherwise; stays in eval mode inside a training parent
    parent = torch.nn.ModuleDict({"p": lp}).train()
    assert not lp.training
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert lp(a, a).abs().max().item() < 1e-6
        d = lp(a, b)
    assert d.shape == (2, 1, 1, 1) and (d > 0).all()
    torch.testing.assert_close(d, lp(a, b).detach())  # deterministic (no dropout)
    del parent


def test_kl_loss_pixel_weights_and_conditional_discriminator_checks(kl_loss):
    torch.manual_seed(0)
    x, xrec = torch.rand(1, 3, 16, 16) * 2 - 1, torch.rand(1, 3, 16, 16) * 2 - 1
    post = _posterior(x)
    with torch.no_grad():
        plain, log = kl_loss(x, xrec, post, 0, global_step=0)
        weighted, wlog = kl_loss(x, xrec, post, 0, global_step=0, weights=3.0)
    # only the weighted NLL enters the total; the logged nll_loss is unweighted
    torch.testing.assert_close(weighted - plain, 2 * log["train/nll_loss"])
    torch.testing.assert_close(wlog["train/nll_loss"], log["train/nll_loss"])
    with pytest.raises(ValueError, match="disc_conditional=False"):
        kl_loss(x, xrec, post, 1, global_step=0, cond=torch.zeros(1, 1, 16, 16))
    cond_loss = LPIPSWithDiscriminator(disc_start=0, disc_conditional=True, disc_in_channels=4, disc_num_layers=1,
                                       perceptual_weight=0.0, perceptual_weights="random")
    with pytest.raises(ValueError, match="pass `cond`"):
        cond_loss(x, xrec, post, 1, global_step=0)
    d_loss, _ = cond_loss(x, xrec, post, 1, global_step=0, cond=torch.zeros(1, 1, 16, 16))
    assert d_loss.item() > 0
