"""Patch-wise encode/decode (ldm.modules.tiling): the original's fold/unfold weighting, exactness, seamlessness."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.tiling import (SplitInputParams, TileWeighting, blend_tiles, border_distance, decode_tiled,
                                encode_tiled, tile_windows)


@pytest.fixture(scope="module")
def decoder() -> Decoder:
    torch.manual_seed(0)
    return Decoder(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=[], resolution=32,
                   z_channels=2).eval()


def smooth_latent(size: int, seed: int = 0, channels: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(1, channels, size // 4, size // 4, generator=g), size=(size, size),
                         mode="bicubic", align_corners=False)


def original_fold_blend(fn, x, ks, stride, uf, weighting: TileWeighting):
    """The original LatentDiffusion's get_fold_unfold/get_weighting path (square tiles, divisible sizes), written
    with torch's Fold/Unfold: a reference computed another way."""
    _, _, h, w = x.shape
    ly, lx = (h - ks) // stride + 1, (w - ks) // stride + 1

    def delta_border(hh, ww):
        yy = torch.arange(hh).view(hh, 1, 1).repeat(1, ww, 1)
        xx = torch.arange(ww).view(1, ww, 1).repeat(hh, 1, 1)
        arr = torch.cat([yy, xx], dim=-1) / torch.tensor([hh - 1, ww - 1]).view(1, 1, 2)
        return torch.min(torch.cat([torch.min(arr, -1, keepdim=True)[0], torch.min(1 - arr, -1, keepdim=True)[0]],
                                   -1), -1)[0]

    k_out = ks * uf
    weighting_t = delta_border(k_out, k_out).clip(weighting.clip_min_weight, weighting.clip_max_weight)
    weighting_t = weighting_t.view(1, k_out * k_out, 1).repeat(1, 1, ly * lx)
    if weighting.tie_breaker:
        tie = delta_border(ly, lx).clip(weighting.clip_min_tie_weight, weighting.clip_max_tie_weight)
        weighting_t = weighting_t * tie.view(1, 1, ly * lx)
    unfold = torch.nn.Unfold(kernel_size=ks, stride=stride)
    fold = torch.nn.Fold(output_size=(h * uf, w * uf), kernel_size=k_out, stride=stride * uf)
    normalization = fold(weighting_t).view(1, 1, h * uf, w * uf)
    tiles = unfold(x).view(x.shape[0], -1, ks, ks, ly * lx)
    out = torch.stack([fn(tiles[..., i]) for i in range(ly * lx)], dim=-1)
    out = out * weighting_t.view(1, 1, k_out, k_out, ly * lx)
    return fold(out.view(out.shape[0], -1, ly * lx)) / normalization


@pytest.mark.parametrize("h, w, ks, stride", [(16, 16, 8, 4), (16, 24, 8, 8), (20, 12, 8, 6), (5, 7, 8, 4)])
def test_windows_cover_every_pixel_on_the_original_grid(h, w, ks, stride):
    windows = tile_windows(h, w, ks, stride)
    cover = torch.zeros(h, w)
    for win in windows:
        cover[win.slices()] += 1
        assert win.rows * win.cols == len(windows)
    assert (cover >= 1).all()
    k = min(ks, h)
    if (h - k) % stride == 0:  # the original's unfold positions where they cover the input
        assert sorted({win.top for win in windows}) == list(range(0, h - k + 1, stride))


def test_border_distance_is_the_original_delta_border():
    d = border_distance(6, 9)
    assert d.shape == (6, 9) and d[0].eq(0).all() and d[:, -1].eq(0).all()
    y, x = torch.meshgrid(torch.arange(6) / 5, torch.arange(9) / 8, indexing="ij")
    expected = torch.minimum(torch.minimum(y, x), torch.minimum(1 - y, 1 - x))
    torch.testing.assert_close(d, expected.double())
    assert border_distance(1, 3)[0, 1] == 0.5  # a single row counts as its own centre (the original: 0/0)


@pytest.mark.parametrize("weighting", [TileWeighting(), TileWeighting(0.05, 0.3, True, 0.1, 0.4)])
def test_blending_equals_the_original_fold_unfold_computation(weighting):
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(2, 3, 3, padding=1)

    def fn(tile):  # a per-tile "decoder": upsample x2, convolve with zero padding, normalise per tile
        y = conv(F.interpolate(tile, scale_factor=2, mode="nearest"))
        return (y - y.mean(dim=(2, 3), keepdim=True)) / y.std(dim=(2, 3), keepdim=True)

    z = torch.randn(2, 2, 16, 24)
    with torch.no_grad():
        ours = decode_tiled(fn, z, 8, 4, 2, weighting)
        reference = original_fold_blend(fn, z, 8, 4, 2, weighting)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_without_overlap_the_result_is_each_tile_decoded_alone(decoder):
    z = smooth_latent(16)
    with torch.no_grad():
        tiled = decode_tiled(decoder, z, 8, 8, 2)
        for top in (0, 8):
            for left in (0, 8):
                alone = decoder(z[:, :, top:top + 8, left:left + 8])
                assert torch.equal(tiled[:, :, 2 * top:2 * top + 16, 2 * left:2 * left + 16], alone)


def test_with_overlap_pixels_of_one_tile_are_exactly_its_output(decoder):
    z = smooth_latent(16)
    with torch.no_grad():
        tiled = decode_tiled(decoder, z, 8, 4, 2)  # tiles at 0, 4, 8: [0, 4) and [12, 16) are covered once
        corner = decoder(z[:, :, 8:16, 0:8])
    assert torch.equal(tiled[:, :, 24:32, 0:8], corner[:, :, 8:16, 0:8])


def test_a_tile_covering_the_whole_latent_is_the_plain_decode(decoder):
    z = smooth_latent(16)
    with torch.no_grad():
        assert torch.equal(decode_tiled(decoder, z, 16, 8, 2), decoder(z))
        assert torch.equal(decode_tiled(decoder, z, 64, 32, 2), decoder(z))  # a larger kernel shrinks to the input


def seam_ratio(image: torch.Tensor, edges: list[int]) -> float:
    """Mean squared finite difference across the given pixel boundaries (between column/row c-1 and c, in both
    directions) over the mean elsewhere."""
    dx = (image[..., :, 1:] - image[..., :, :-1]).pow(2).mean(dim=(0, 1, 2))
    dy = (image[..., 1:, :] - image[..., :-1, :]).pow(2).mean(dim=(0, 1, 3))
    energy = dx + dy
    seams = torch.zeros_like(energy, dtype=torch.bool)
    seams[[e - 1 for e in edges]] = True
    return float(energy[seams].mean() / energy[~seams].mean())


def test_overlap_weighting_is_seamless_where_naive_tiling_shows_seams():
    """Per-tile statistics (a decoder's GroupNorm sees only its tile) make every tile's output differ a little;
    a naive tiling shows that as a step at each tile border, the weighted blend does not."""
    def decode(tile):  # smooth x2 upsampling, normalised with the tile's own statistics
        y = F.interpolate(tile, scale_factor=2, mode="bilinear", align_corners=False)
        return (y - y.mean(dim=(2, 3), keepdim=True)) / y.std(dim=(2, 3), keepdim=True)

    z = smooth_latent(32, seed=2)
    naive = decode_tiled(decode, z, 8, 8, 2, TileWeighting(1.0, 1.0))  # equal weights, no overlap: plain tiling
    blended = decode_tiled(decode, z, 8, 4, 2)
    naive_ratio = seam_ratio(naive, [16, 32, 48])
    blended_ratio = seam_ratio(blended, list(range(8, 64, 8)))  # every border of every overlapping tile
    assert naive_ratio > 10.0, naive_ratio
    assert blended_ratio < 3.0, blended_ratio


def test_uncovered_remainders_get_a_flush_tile_instead_of_nan(decoder):
    z = smooth_latent(20)[:, :, :, :12]
    with torch.no_grad():
        tiled = decode_tiled(decoder, z, 8, 8, 2)  # (20 - 8) % 8 != 0: tiles at 0, 8 and 12 rows
        last = decoder(z[:, :, 12:20, 4:12])
    assert torch.isfinite(tiled).all() and tiled.shape == (1, 3, 40, 24)
    assert torch.equal(tiled[:, :, 32:40, 16:24], last[:, :, 8:16, 8:16])  # covered by the flush tile only


def test_tie_breaker_with_a_single_row_of_tiles_is_finite():
    z = torch.randn(1, 2, 8, 24)
    out = blend_tiles(lambda t, _: t, z, 8, 4, 1, TileWeighting(tie_breaker=True))
    torch.testing.assert_close(out, z)  # an identity "decoder" is reproduced by any weighting


def test_the_tile_function_sees_where_its_tile_lies():
    out = blend_tiles(lambda t, win: torch.full_like(t, 10 * win.row + win.col), torch.zeros(1, 1, 8, 8), 4, 4)
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 0, 7] == 1 and out[0, 0, 7, 0] == 10 and out[0, 0, 7, 7] == 11
    windows = tile_windows(8, 8, 4, 4)
    assert windows[3].normalized(8, 8) == (0.5, 0.5, 1.0, 1.0)


def test_encode_by_tiles():
    torch.manual_seed(0)
    encoder = Encoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=[], in_channels=3,
                      resolution=32, z_channels=2, double_z=False).eval()
    x = smooth_latent(32, seed=4, channels=3)
    with torch.no_grad():
        assert torch.equal(encode_tiled(encoder, x, 32, 16, 2), encoder(x))
        tiled = encode_tiled(encoder, x, 16, 16, 2)
        assert tiled.shape == (1, 2, 16, 16)
        assert torch.equal(tiled[:, :, 8:, :8], encoder(x[:, :, 16:, :16]))
    with pytest.raises(ValueError, match="divisible by 2"):
        encode_tiled(encoder, x, 15, 15, 2)


def test_split_input_params_from_the_original_notebook_and_bad_keys():
    notebook = {"ks": (128, 128), "stride": (64, 64), "vqf": 4, "patch_distributed_vq": True, "tie_braker": False,
                "clip_max_weight": 0.5, "clip_min_weight": 0.01, "clip_max_tie_weight": 0.5,
                "clip_min_tie_weight": 0.01}
    params = SplitInputParams.from_config(notebook)
    assert params.ks == (128, 128) and params.stride == (64, 64) and params.vqf == 4
    assert params.weighting == TileWeighting(0.01, 0.5, False, 0.01, 0.5)
    with pytest.raises(ValueError, match="split_input_params: unknown key\\(s\\) \\['kernel'\\]"):
        SplitInputParams.from_config({**notebook, "kernel": 3})
    with pytest.raises(ValueError, match="split_input_params.vqf is required"):
        SplitInputParams.from_config({"ks": 8, "stride": 4})
    with pytest.raises(ValueError, match="split_input_params.stride \\[16, 16\\] is larger than ks"):
        SplitInputParams.from_config({"ks": 8, "stride": 16, "vqf": 4})
    with pytest.raises(ValueError, match="clip_min_weight/clip_max_weight must satisfy"):
        SplitInputParams.from_config({**notebook, "clip_min_weight": 0.0})


def superres_model(split_input_params=None):
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config
    cfg = OmegaConf.load("tests/configs/sampling-superres.yaml").model
    if split_input_params is not None:
        cfg.params.split_input_params = split_input_params
    torch.manual_seed(0)
    return instantiate_from_config(cfg).eval()


def count_calls(module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)
    setattr(module, name, counted)
    return calls


def test_a_config_with_split_input_params_decodes_and_encodes_by_tiles():
    """split_input_params in a LatentDiffusion config tiles decode_first_stage (here 2 x 2 tiles without overlap:
    each quarter is exactly that quarter decoded alone); assigning it later, as the original notebooks do, is
    honoured at the next call, and so is removing it."""
    model = superres_model({"ks": [8, 8], "stride": [8, 8], "vqf": 4})
    calls = count_calls(model.first_stage_model, "decode")
    z = smooth_latent(16, seed=3, channels=4)
    with torch.no_grad():
        tiled = model.decode_first_stage(z)
        assert [tuple(s) for s in calls] == [(1, 4, 8, 8)] * 4
        quarter = model.first_stage_model.decode(z[:, :, 8:, :8] / model.scale_factor)
        assert torch.equal(tiled[:, :, 32:, :32], quarter)
        model.split_input_params = None
        calls.clear()
        plain = model.decode_first_stage(z)
        assert len(calls) == 1 and tiled.shape == plain.shape == (1, 3, 64, 64)
        assert not torch.equal(tiled, plain)  # the decoder's GroupNorm sees each tile alone
        model.split_input_params = {"ks": 32, "stride": 32, "vqf": 4}  # tiles of 32 image pixels to encode
        x = smooth_latent(64, seed=4, channels=3).clamp(-1, 1)
        encoded = model.encode_first_stage(x)
        corner = model.first_stage_model.encode(x[:, :, 32:, 32:])
        assert torch.equal(encoded.mode()[:, :, 8:, 8:], corner.mode())
        assert torch.equal(encoded.logvar[:, :, 8:, 8:], corner.logvar)
        model.split_input_params["patch_distributed_vq"] = False  # edited in place: the first stage runs whole
        calls.clear()
        assert torch.equal(model.decode_first_stage(z), plain) and len(calls) == 1


def test_a_malformed_split_input_params_fails_at_construction_naming_the_key():
    with pytest.raises(ValueError, match="split_input_params.vqf is required"):
        superres_model({"ks": 8, "stride": 8})


def test_configure_tiling_modes():
    from ldm.inference import TILE_LATENT_SIZE, configure_tiling
    model = superres_model()
    small, large = (TILE_LATENT_SIZE, TILE_LATENT_SIZE), (TILE_LATENT_SIZE + 8, 64)
    assert not configure_tiling(model, "auto", small, 4) and model.split_input_params is None
    assert configure_tiling(model, "auto", large, 4)
    assert model.split_input_tiles() == SplitInputParams((TILE_LATENT_SIZE,) * 2, (TILE_LATENT_SIZE // 2,) * 2, 4)
    assert not configure_tiling(model, "off", large, 4) and model.split_input_params is None
    assert configure_tiling(model, "on", small, 4) and model.split_input_params is not None
    own = superres_model({"ks": 16, "stride": 8, "vqf": 4})  # a config's own tiling is kept
    assert configure_tiling(own, "auto", small, 4) and own.split_input_tiles().ks == (16, 16)


def test_superres_script_tiles_above_the_threshold_and_not_with_tile_off(tmp_path, monkeypatch):
    """scripts/superres.py --tile auto decodes by tiles once the latent is larger than the threshold (lowered
    here to 4 latent pixels): the first stage decodes each tile, and the result differs from --tile off."""
    import ldm.inference
    import ldm.models.diffusion.first_stage as first_stage
    from tests.test_scripts_sampling import load_script, make_model, write_image
    config, ckpt = make_model("superres", tmp_path)
    lr = tmp_path / "lr.png"
    write_image(lr, size=(12, 8))
    monkeypatch.setattr(ldm.inference, "TILE_LATENT_SIZE", 4)
    tiled_calls = []
    decode_tiled_ = first_stage.decode_tiled
    monkeypatch.setattr(first_stage, "decode_tiled", lambda *a, **k: tiled_calls.append(a[1].shape) or
                        decode_tiled_(*a, **k))
    script = load_script("superres")
    outputs = {}
    for mode in ("auto", "off"):
        out = tmp_path / mode
        script.main(["--config", str(config), "--ckpt", str(ckpt), "--input", str(lr), "--outdir", str(out),
                     "--steps", "2", "--tile", mode])
        outputs[mode] = np.asarray(Image.open(out / "samples" / "00000.png"))
    assert [tuple(s[-2:]) for s in tiled_calls] == [(8, 12)]  # the one decode of the run, by tiles
    assert outputs["auto"].shape == outputs["off"].shape == (32, 48, 3)
    assert not np.array_equal(outputs["auto"], outputs["off"])
