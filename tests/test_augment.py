"""Tests of sdsscl.augment: the physics and statistics of each augmentation, not just shapes.

Every test builds its own small tensors; tolerances are stated where they are used.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from sdsscl.augment import (
    AUGMENTATIONS,
    BEST_AUGMENTATIONS,
    AugmentationParams,
    AugmentationPipeline,
    CenterCrop,
    Deredden,
    GalacticReddening,
    GaussianNoise,
    JitterCrop,
    JitterParams,
    NoiseParams,
    PSFBlur,
    PSFParams,
    RandomRotate,
    ReddeningParams,
    RotationParams,
    TwoViews,
    discrete_gaussian_kernels,
    rotate_crop,
)
import sdsscl.augment as augment_module
from sdsscl.augment import _blur_conv, _cut_kernels
from sdsscl.constants import (
    CROP_SIZE,
    CUTOUT_SIZE,
    MAX_JITTER,
    PIXEL_SCALE,
    R_BAND,
    R_DR12,
    R_SF11,
    WAVELENGTH_EFF,
    ebv_from_extinction,
)

# Per-band MAD of the order of SDSS sky noise (DATA-FACTS), nanomaggies.
MAD = (0.041, 0.0165, 0.0275, 0.044, 0.19)
C = CUTOUT_SIZE // 2                       # 53, the authors' centre
HALF = CROP_SIZE // 2                      # 32


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_batch(b: int = 4, size: int = CUTOUT_SIZE, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Positive, galaxy-like images: a smooth blob plus structure, (b, 5, size, size)."""
    g = gen(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    blob = torch.exp(-((yy - size // 2) ** 2 + (xx - size // 2) ** 2) / (2 * 8.0**2))
    x = blob * torch.rand(b, 5, 1, 1, generator=g, dtype=torch.float64) * 10
    x = x + 0.1 * torch.rand(b, 5, size, size, generator=g, dtype=torch.float64)
    return x.to(dtype)


def centred_gaussian(b: int, sigma: float, size: int = CUTOUT_SIZE, dtype=torch.float64,
                     sigma_x: float | None = None) -> torch.Tensor:
    c = (size - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float64) - c,
                            torch.arange(size, dtype=torch.float64) - c, indexing="ij")
    sx = sigma if sigma_x is None else sigma_x
    g = torch.exp(-yy**2 / (2 * sigma**2) - xx**2 / (2 * sx**2))
    return g.expand(b, 5, size, size).to(dtype).clone()


def integer_crop(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """The authors' crop, one image at a time: centre 107 // 2 + shift, rows c - 32 .. c + 31."""
    out = []
    for img, (dy, dx) in zip(x, shifts.tolist()):
        cy, cx = x.shape[-2] // 2 + dy, x.shape[-1] // 2 + dx
        out.append(img[:, cy - HALF:cy + HALF, cx - HALF:cx + HALF])
    return torch.stack(out)


# ----------------------------------------------------------------------------- reddening
def test_reddening_dims_each_band_by_its_sf11_coefficient():
    x = random_batch(6)
    red = GalacticReddening()
    params = red.sample(6, gen(1))
    out = red.apply(x, params)
    ratio = (out.double() / x.double()).mean(dim=(-1, -2))                     # (B, 5)
    expected = 10 ** (-0.4 * torch.tensor(R_SF11)[None, :] * params.ebv.double()[:, None])
    # float32 rounding of one product: relative 1e-6.
    torch.testing.assert_close(ratio, expected, rtol=1e-6, atol=0)
    # Bluer bands are dimmed more (u most), and nothing is dimmed at E(B-V) = 0.
    assert bool((expected[:, :-1] <= expected[:, 1:]).all())
    same = red.apply(x, ReddeningParams(ebv=torch.zeros(6)))
    assert torch.equal(same, x)


def test_reddening_then_dereddening_is_identity():
    x = random_batch(5, dtype=torch.float64)
    red = GalacticReddening()
    params = red.sample(5, gen(2))
    e_bv = torch.tensor(R_DR12)[None, :] * params.ebv.double()[:, None]       # (B, 5) DR12 column
    back = Deredden()(red.apply(x, params), e_bv)
    torch.testing.assert_close(back, x, rtol=1e-12, atol=0)                 # float64 precision
    back32 = Deredden()(red.apply(x.float(), params), e_bv.float())
    torch.testing.assert_close(back32, x.float(), rtol=3e-6, atol=0)       # float32: a few ulp


def test_deredden_ebv_is_the_authors_formula():
    e_bv = torch.rand(7, 5, generator=gen(3), dtype=torch.float64) * 0.3
    torch.testing.assert_close(Deredden().ebv(e_bv), torch.from_numpy(ebv_from_extinction(e_bv.numpy())))


def test_reddening_ebv_is_uniform_on_0_to_half():
    ebv = GalacticReddening().sample(20000, gen(4)).ebv.double().numpy()
    assert ebv.min() >= 0 and ebv.max() <= 0.5
    assert stats.kstest(ebv, stats.uniform(0, 0.5).cdf).pvalue > 1e-3


# ----------------------------------------------------------------------------- rotation
def test_rotation_conserves_flux_of_a_centred_source():
    # A centred, elongated Gaussian (sigma 4 px by 8 px) keeps its flux under any rotation:
    # bilinear resampling of a smooth source is flux-conserving to well below 1e-3 relative.
    x = centred_gaussian(6, 4.0, sigma_x=8.0, dtype=torch.float32)
    params = RandomRotate().sample(6, gen(5))
    out = RandomRotate().apply(x, params)
    flux_in, flux_out = x.double().sum(dim=(-1, -2)), out.double().sum(dim=(-1, -2))
    torch.testing.assert_close(flux_out, flux_in, rtol=1e-3, atol=0)
    # ... and it really turned: the second moments follow the rotation of the ellipse.
    c = (CUTOUT_SIZE - 1) / 2
    _, xx = torch.meshgrid(torch.arange(CUTOUT_SIZE) - c, torch.arange(CUTOUT_SIZE) - c, indexing="ij")
    img = out[:, 0].double()
    mxx = (img * xx**2).sum((-1, -2)) / img.sum((-1, -2))
    theta = params.angle.double()
    expected = 64 * torch.cos(theta) ** 2 + 16 * torch.sin(theta) ** 2        # sigma_x'^2
    torch.testing.assert_close(mxx, expected, rtol=0.02, atol=0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rotation_by_multiples_of_90_degrees_matches_rot90(k):
    # Convention: positive angles turn the image counter-clockwise as displayed with row 0 on top,
    # i.e. like torch.rot90(x, k, dims=(-2, -1)) for an angle of k * pi / 2.
    x = random_batch(3)
    angle = torch.full((3,), k * math.pi / 2)                                  # float32 angles
    out = RandomRotate().apply(x, RotationParams(angle=angle))
    ref = torch.rot90(x, k, dims=(-2, -1))
    torch.testing.assert_close(out[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2], rtol=0, atol=1e-6)
    # The opposite sense is a different image (the test can fail on a sign error).
    if k != 2:
        assert not torch.allclose(out, torch.rot90(x, -k, dims=(-2, -1)), atol=1e-3)


def test_rotation_matches_skimage_rotate():
    skimage_transform = pytest.importorskip("skimage.transform")
    x = random_batch(1, dtype=torch.float64)
    degrees = 37.0
    ref = skimage_transform.rotate(x[0].permute(1, 2, 0).numpy(), degrees, order=1, mode="constant",
                                   cval=0.0, preserve_range=True, clip=False).transpose(2, 0, 1)
    out = RandomRotate().apply(x, RotationParams(angle=torch.tensor([math.radians(degrees)], dtype=torch.float64)))
    np.testing.assert_allclose(out[0].numpy(), ref, rtol=0, atol=1e-9)


def test_rotation_angles_are_uniform_on_0_to_2pi():
    angle = RandomRotate().sample(20000, gen(6)).angle.double().numpy()
    assert angle.min() >= 0 and angle.max() <= 2 * math.pi
    assert stats.kstest(angle, stats.uniform(0, 2 * math.pi).cdf).pvalue > 1e-3


# ----------------------------------------------------------------------------- jitter and crop
def test_jitter_offsets_cover_exactly_minus7_to_7():
    shifts = JitterCrop().sample(4000, gen(7)).shifts
    assert shifts.dtype == torch.long and shifts.shape == (4000, 2)
    for axis in range(2):
        assert set(shifts[:, axis].tolist()) == set(range(-MAX_JITTER, MAX_JITTER + 1))
    # The two axes are drawn independently (not the same integer twice).
    assert (shifts[:, 0] != shifts[:, 1]).float().mean() > 0.8


def test_jitter_crop_is_the_integer_indexed_crop():
    x = random_batch(8)
    jc = JitterCrop()
    params = jc.sample(8, gen(8))
    out = jc.apply(x, params)
    assert out.shape == (8, 5, CROP_SIZE, CROP_SIZE)
    expected = integer_crop(x, params.shifts)
    assert torch.equal(out, expected)
    # The fused rotate-and-crop resampling at angle 0 reproduces it bit for bit.
    fused = rotate_crop(x, torch.zeros(8), params.shifts, CROP_SIZE)
    assert torch.equal(fused, expected)


def test_center_crop_is_rows_21_to_84():
    x = random_batch(2)
    out = CenterCrop()(x)
    assert out.shape == (2, 5, 64, 64)
    assert torch.equal(out, x[..., C - 32:C + 32, C - 32:C + 32])
    assert torch.equal(out, x[..., 21:85, 21:85])


def test_fused_rotation_and_crop_equals_rotate_then_crop():
    x = random_batch(4)
    rot, jc = RandomRotate(), JitterCrop()
    pr, pj = rot.sample(4, gen(9)), jc.sample(4, gen(10))
    fused = rotate_crop(x, pr.angle, pj.shifts, CROP_SIZE)
    two_steps = jc.apply(rot.apply(x, pr), pj)
    torch.testing.assert_close(fused, two_steps, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- PSF
def point_source_sigma(img: torch.Tensor) -> torch.Tensor:
    """Standard deviation along x and y of images (..., H, W) about their centre pixel."""
    h, w = img.shape[-2:]
    y = torch.arange(h, dtype=torch.float64) - h // 2
    x = torch.arange(w, dtype=torch.float64) - w // 2
    total = img.sum((-1, -2))
    var_y = (img.sum(-1) * y**2).sum(-1) / total
    var_x = (img.sum(-2) * x**2).sum(-1) / total
    return torch.stack([var_y.sqrt(), var_x.sqrt()], dim=-1)


@pytest.mark.parametrize("sigma_r_arcsec", [0.13, 0.6])
def test_psf_width_per_band_follows_lambda_to_the_minus_0_3(sigma_r_arcsec):
    # A point source blurred by the discrete Gaussian has exactly the drawn variance per band, at
    # the paper's typical 0.13" (0.33 px) as well as at a wide 0.6"; the kernels are truncated
    # at a tail mass of 1e-7, which shifts the width by < 1e-5 relative.
    point = torch.zeros(2, 5, 61, 61, dtype=torch.float64)
    point[..., 30, 30] = 1.0
    sigma_r = torch.full((2,), sigma_r_arcsec, dtype=torch.float64)
    out = PSFBlur().apply(point, PSFParams(sigma_r=sigma_r))
    measured = point_source_sigma(out)                                          # (2, 5, 2)
    scale = (WAVELENGTH_EFF / WAVELENGTH_EFF[R_BAND]) ** -0.3
    expected = torch.tensor(sigma_r_arcsec / PIXEL_SCALE * scale)[None, :, None].expand_as(measured)
    torch.testing.assert_close(measured, expected, rtol=1e-5, atol=0)
    ratios = measured[:, :, 0] / measured[:, R_BAND:R_BAND + 1, 0]
    torch.testing.assert_close(ratios, torch.tensor(scale)[None].expand_as(ratios), rtol=1e-5, atol=0)


def test_psf_conserves_flux_and_zero_sigma_is_identity():
    x = centred_gaussian(4, 4.0, dtype=torch.float32)
    psf = PSFBlur()
    params = psf.sample(4, gen(11))
    params = PSFParams(sigma_r=params.sigma_r * 5)                              # clearly visible blur
    out = psf.apply(x, params)
    assert not torch.allclose(out, x, atol=1e-3)
    torch.testing.assert_close(out.double().sum((-1, -2)), x.double().sum((-1, -2)), rtol=1e-5, atol=0)
    assert torch.equal(psf.apply(x, PSFParams(sigma_r=torch.zeros(4))), x)
    assert torch.equal(psf.apply(x, PSFParams(sigma_r=torch.full((4,), 1e-7))), x)


def test_psf_sigma_is_half_normal_0_13_arcsec():
    sigma = PSFBlur().sample(20000, gen(12)).sigma_r.double().numpy()
    assert sigma.min() >= 0
    assert stats.kstest(sigma, stats.halfnorm(scale=0.13).cdf).pvalue > 1e-3


def blur_reference(x: torch.Tensor, psf: PSFBlur, params: PSFParams, cut: bool = False) -> torch.Tensor:
    """The PSF blur as the GPU computes it (two depthwise convolutions, each image with the batch's
    half-width, or with ``cut`` the CPU's per-image taps), run on the CPU: independent of the
    compiled CPU kernel."""
    b, c, h, w = x.shape
    kernels, _ = psf.kernels(params)
    if cut:
        kernels = torch.from_numpy(_cut_kernels(kernels, psf.tail, torch.float64)[0])
    return _blur_conv(x.reshape(b * c, h, w), kernels.to(x.dtype).reshape(b * c, -1)).view(b, c, h, w)


@pytest.mark.parametrize("shape", [(CUTOUT_SIZE, CUTOUT_SIZE), (1, 9), (2, 9), (9, 1), (5, 3), (40, 70)])
def test_gpu_blur_path_equals_cpu_blur_path(shape):
    # Off the CPU the blur is two depthwise convolutions; on the CPU, the compiled kernel (each
    # image with its own half-width, see the next test). Both run here on the CPU with the same
    # taps, so the GPU's formula is checked without a GPU (to float rounding: the sums run in
    # another order); images narrower than the kernel and rectangular ones too.
    psf = PSFBlur(sigma_r_arcsec=1.0)
    p = psf.sample(6, gen(30))
    assert psf.kernels(p)[1] >= 6
    x = random_batch(6)[..., :shape[0], :shape[1]].contiguous()
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-13)):
        xd = x.to(dtype)
        torch.testing.assert_close(psf.apply(xd, p), blur_reference(xd, psf, p, cut=True), rtol=tol, atol=tol)


def test_discrete_gaussian_kernels_are_normalised_bessel_kernels():
    special = pytest.importorskip("scipy.special")
    sigma = torch.tensor([0.0, 0.3, 1.0, 2.5], dtype=torch.float64)
    k = discrete_gaussian_kernels(sigma, 20)
    torch.testing.assert_close(k.sum(-1), torch.ones(4, dtype=torch.float64))
    n = np.arange(-20, 21)
    ref = special.ive(np.abs(n)[None, :], (sigma.numpy() ** 2)[:, None])    # exp(-t) I_n(t)
    np.testing.assert_allclose(k.numpy(), ref / ref.sum(-1, keepdims=True), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- noise
def test_noise_level_per_band_is_uniform_1_to_3_times_mad():
    b = 256
    noise = GaussianNoise(MAD)
    params = noise.sample(b, gen(13))
    out = noise.apply(torch.zeros(b, 5, 64, 64), params)
    std = out.double().std(dim=(-1, -2))                                        # (B, 5)
    ratio = std / torch.tensor(MAD, dtype=torch.float64)                        # a * MAD_c / MAD_c
    # With 4096 pixels the sample std scatters by 1/sqrt(2*4096) = 1.1%; allow 5 sigma.
    tol = 5 / math.sqrt(2 * 64 * 64)
    assert ratio.min() >= 1 - tol and ratio.max() <= 3 * (1 + tol)
    torch.testing.assert_close(ratio, params.level.double()[:, None].expand(b, 5), rtol=tol, atol=0)
    # One scalar per image for all bands: the bands agree with each other.
    assert float((ratio / ratio.mean(1, keepdim=True) - 1).abs().max()) < tol
    # Over images the scalar is U(1, 3): mean 2 +- 4 * (2/sqrt(12))/sqrt(B), std 2/sqrt(12) +- 15%,
    # and a KS test.
    per_image = ratio.mean(1).numpy()
    assert abs(per_image.mean() - 2) < 4 * (2 / math.sqrt(12)) / math.sqrt(b)
    assert abs(per_image.std() / (2 / math.sqrt(12)) - 1) < 0.15
    assert stats.kstest(per_image, stats.uniform(1, 2).cdf).pvalue > 1e-3
    # The noise has zero mean.
    assert abs(float(out.double().mean())) < 1e-3


def test_noise_scalar_draws_are_uniform_1_to_3():
    level = GaussianNoise(MAD).sample(20000, gen(29)).level.double().numpy()
    assert level.min() >= 1 and level.max() <= 3
    assert stats.kstest(level, stats.uniform(1, 2).cdf).pvalue > 1e-3


def test_noise_apply_is_repeatable_and_seed_dependent():
    noise = GaussianNoise(MAD)
    x = random_batch(2, size=64)
    params = noise.sample(2, gen(14))
    assert torch.equal(noise.apply(x, params), noise.apply(x, params))
    other = NoiseParams(level=params.level, seed=params.seed + 1)
    assert not torch.equal(noise.apply(x, params), noise.apply(x, other))


# ----------------------------------------------------------------------------- composition
@pytest.mark.parametrize("names", [AUGMENTATIONS, ("reddening", "psf", "jitter_crop", "noise")])
@pytest.mark.parametrize("b", [4, 40])
def test_pipeline_equals_the_steps_applied_one_by_one(names, b):
    # The fused pipeline (reddening as a scale on the crop, or folded into the blur's kernels on
    # the CPU; rotation + crop in one resampling; noise last) equals the augmentations applied in
    # the documented order; 40 images make several PSF blocks sorted by width.
    x = random_batch(b)
    pipe = AugmentationPipeline(names, mad=MAD)
    p = pipe.sample(b, gen(15))
    out = pipe.apply(x, p)
    steps = GalacticReddening().apply(x, p.reddening)
    steps = PSFBlur().apply(steps, p.psf)
    if "rotate" in names:
        steps = RandomRotate().apply(steps, p.rotate)
    steps = JitterCrop().apply(steps, p.jitter_crop)
    steps = GaussianNoise(MAD).apply(steps, p.noise)
    assert out.shape == (b, 5, CROP_SIZE, CROP_SIZE)
    torch.testing.assert_close(out, steps, rtol=1e-5, atol=1e-5)


def test_pipeline_applies_only_the_named_augmentations():
    x = random_batch(3)
    centre = CenterCrop()(x)
    # Nothing: the plain centre crop.
    assert torch.equal(AugmentationPipeline([])(x, gen(16)), centre)
    # Only reddening: the centre crop, each band scaled by one factor per image.
    pipe = AugmentationPipeline(["reddening"])
    p = pipe.sample(3, gen(17))
    out = pipe.apply(x, p)
    assert p.rotate is None and p.jitter_crop is None and p.noise is None and p.psf is None
    expected = centre * GalacticReddening().factors(p.reddening.ebv, x)[:, :, None, None]
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)
    # Only rotation: fused with the centre crop.
    pipe = AugmentationPipeline(["rotate"])
    p = pipe.sample(3, gen(18))
    torch.testing.assert_close(pipe.apply(x, p), CenterCrop()(RandomRotate().apply(x, p.rotate)),
                               rtol=1e-5, atol=1e-5)
    # Only jitter_crop: the exact integer crop.
    pipe = AugmentationPipeline(["jitter_crop"])
    p = pipe.sample(3, gen(19))
    assert torch.equal(pipe.apply(x, p), integer_crop(x, p.jitter_crop.shifts))
    # Only noise: centre crop plus noise of the drawn level.
    pipe = AugmentationPipeline(["noise"], mad=MAD)
    p = pipe.sample(3, gen(20))
    residual = (pipe.apply(x, p) - centre).double().std(dim=(-1, -2))
    expected = p.noise.level.double()[:, None] * torch.tensor(MAD, dtype=torch.float64)[None]
    torch.testing.assert_close(residual, expected, rtol=0.1, atol=0)


def test_pipeline_runs_in_the_paper_order_whatever_the_list_order():
    pipe = AugmentationPipeline(["noise", "rotate", "psf", "reddening", "jitter_crop"], mad=MAD)
    assert pipe.names == AUGMENTATIONS == ("reddening", "psf", "rotate", "jitter_crop", "noise")
    assert AugmentationPipeline(mad=MAD).names == BEST_AUGMENTATIONS


def test_seeded_generator_reproduces_a_batch_and_seeds_differ():
    x = random_batch(3)
    pipe = AugmentationPipeline(AUGMENTATIONS, mad=MAD)
    a, b, c = pipe(x, gen(21)), pipe(x, gen(21)), pipe(x, gen(22))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)
    # Global-RNG use is reproducible through torch.manual_seed too.
    torch.manual_seed(5)
    d = pipe(x)
    torch.manual_seed(5)
    assert torch.equal(d, pipe(x))


def test_two_views_are_independent_views_of_the_same_batch():
    x = random_batch(4)
    views = TwoViews(AugmentationPipeline(BEST_AUGMENTATIONS, mad=MAD))
    q, k = views(x, gen(23))
    assert q.shape == k.shape == (4, 5, CROP_SIZE, CROP_SIZE)
    assert not torch.allclose(q, k, atol=1e-3)
    q2, k2 = views(x, gen(23))
    assert torch.equal(q, q2) and torch.equal(k, k2)
    pq, pk = views.sample(4, gen(24))
    assert not torch.equal(pq.rotate.angle, pk.rotate.angle)


@pytest.mark.parametrize("names", [BEST_AUGMENTATIONS, AUGMENTATIONS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_two_views_on_the_cpu_are_the_pipeline_applied_to_each_view(names, dtype):
    # On the CPU TwoViews draws both noise fields in one parallel pass before either view's
    # geometry; the views must be exactly pipeline.apply of each view's parameters (40 images:
    # two noise groups and three PSF blocks per view), in the batch's dtype, as separate tensors.
    x = random_batch(40, dtype=dtype)
    views = TwoViews(AugmentationPipeline(names, mad=MAD))
    params = views.sample(40, gen(27))
    q, k = views.apply(x, params)
    assert q.dtype == k.dtype == dtype
    assert torch.equal(q, views.pipeline.apply(x, params[0]))
    assert torch.equal(k, views.pipeline.apply(x, params[1]))
    assert q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
    q2, k2 = views(x, gen(27))
    assert torch.equal(q, q2) and torch.equal(k, k2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_is_kept_and_low_precision_matches_float32(dtype):
    x = random_batch(2)
    pipe = AugmentationPipeline(AUGMENTATIONS, mad=MAD)
    p = pipe.sample(2, gen(25))
    ref = pipe.apply(x, p)
    out = pipe.apply(x.to(dtype), p)
    assert out.dtype == dtype
    # Inputs and outputs are rounded to the dtype's mantissa: 2**-11 (float16), 2**-8 (bfloat16).
    rtol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-5}[dtype]
    torch.testing.assert_close(out.float(), ref, rtol=rtol, atol=rtol * float(ref.abs().max()) / 10)


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors():
    pipe = AugmentationPipeline(AUGMENTATIONS, mad=MAD)
    with pytest.raises(ValueError, match=r"AugmentationPipeline.*\(B, 5, H, W\).*\(5, 107, 107\)"):
        pipe(torch.zeros(5, 107, 107))
    with pytest.raises(ValueError, match=r"RandomRotate.*got shape \(2, 3, 107, 107\)"):
        RandomRotate()(torch.zeros(2, 3, 107, 107))
    with pytest.raises(ValueError, match=r"JitterCrop.*at least 78x78.*77x77"):
        JitterCrop()(torch.zeros(1, 5, 77, 77))
    JitterCrop()(torch.zeros(1, 5, 78, 78))                                     # the smallest that fits
    with pytest.raises(ValueError, match=r"CenterCrop.*63x63"):
        CenterCrop()(torch.zeros(1, 5, 63, 63))
    with pytest.raises(ValueError, match=r"GaussianNoise.*shape \(5,\).*got shape \(4,\)"):
        GaussianNoise([0.1, 0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match=r"GaussianNoise.*>= 0"):
        GaussianNoise([0.1, 0.1, -0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match=r"unknown augmentation name\(s\) \['blur'\].*'reddening', 'psf', "
                                         r"'rotate', 'jitter_crop', 'noise'"):
        AugmentationPipeline(["rotate", "blur"])
    with pytest.raises(ValueError, match=r"'noise' needs .*MAD"):
        AugmentationPipeline(["noise"])
    with pytest.raises(ValueError, match=r"Deredden.*e_bv of shape \(2, 5\).*got \(2,\)"):
        Deredden()(torch.zeros(2, 5, 107, 107), torch.zeros(2))
    with pytest.raises(ValueError, match=r"drawn for 3 images.*has 2"):
        RandomRotate().apply(torch.zeros(2, 5, 107, 107), RandomRotate().sample(3, gen()))
    with pytest.raises(ValueError, match=r"JitterCrop: shifts must lie in \[-7, 7\]"):
        JitterCrop().apply(torch.zeros(1, 5, 107, 107), JitterParams(shifts=torch.tensor([[8, 0]])))
    params = pipe.sample(1, gen())
    params.jitter_crop = JitterParams(shifts=torch.tensor([[0, -9]]))
    with pytest.raises(ValueError, match=r"AugmentationPipeline: shifts must lie in \[-7, 7\], got up to 9"):
        pipe.apply(torch.zeros(1, 5, 107, 107), params)
    with pytest.raises(ValueError, match=r"floating-point"):
        CenterCrop()(torch.zeros(1, 5, 107, 107, dtype=torch.int32))


# ----------------------------------------------------------------------------- plan
def test_sampled_plan_is_used_and_a_replaced_parameter_is_derived_afresh():
    # sample() attaches what apply() derives (sampling maps, factors, kernels); apply uses it only
    # while it belongs to the very parameter objects and image size it was made for.
    x = random_batch(40)
    pipe = AugmentationPipeline(AUGMENTATIONS, mad=MAD)
    p = pipe.sample(40, gen(40))
    assert pipe._plan_for(p, x) is p.plan
    assert pipe._plan_for(p, random_batch(40, size=99)) is not p.plan            # other size
    assert pipe._plan_for(p, x.double()) is not p.plan                           # other precision
    expected = pipe.apply(x, p)
    p.rotate = RotationParams(angle=p.rotate.angle + 0.5)                         # a new object
    assert pipe._plan_for(p, x) is not p.plan
    moved = pipe.apply(x, p)
    steps = GalacticReddening().apply(x, p.reddening)
    steps = PSFBlur().apply(steps, p.psf)
    steps = JitterCrop().apply(RandomRotate().apply(steps, p.rotate), p.jitter_crop)
    torch.testing.assert_close(moved, GaussianNoise(MAD).apply(steps, p.noise), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(moved, expected)


def test_parameters_travel_together_and_keep_their_plan():
    # Moving both views to another device (meta here: no GPU needed) moves every tensor, one copy
    # per dtype, and keeps each plan linked to the moved parameter objects.
    views = TwoViews(AugmentationPipeline(AUGMENTATIONS, mad=MAD))
    q, k = views.sample(6, gen(41), device="meta")
    for p in (q, k):
        assert p.rotate.angle.device.type == "meta" and p.plan.affine.device.type == "meta"
        assert p.plan.kernels.shape[:2] == (6, 5) and p.jitter_crop.shifts.dtype == torch.long
        assert all(a is b for a, b in zip(p.plan.sources, (p.reddening, p.psf, p.rotate, p.jitter_crop, p.noise)))
    q_cpu, _ = views.sample(6, gen(41))
    assert torch.equal(q_cpu.rotate.angle, views.pipeline.sample(6, gen(41)).rotate.angle)


@pytest.mark.parametrize("names", [BEST_AUGMENTATIONS, AUGMENTATIONS, ("reddening", "jitter_crop", "noise")])
def test_both_views_in_one_pass_equal_the_views_one_by_one(names):
    # On a GPU TwoViews.apply runs query and key as one batch of 2B; the result is the same as
    # applying each view's parameters alone (here on the CPU, calling that one-pass path directly).
    x = random_batch(6)
    views = TwoViews(AugmentationPipeline(names, mad=MAD))
    q, k = views.sample(6, gen(43))
    assert q.joint is k.joint is not None and q.noise.seed != k.noise.seed
    pipe = views.pipeline
    joint = pipe._run(x, q.joint.plan, [q.noise.seed, k.noise.seed], q.joint.jitter_crop.shifts, copies=2)
    torch.testing.assert_close(joint[:6], pipe.apply(x, q), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(joint[6:], pipe.apply(x, k), rtol=1e-6, atol=1e-6)
    # the query's uniforms are those of a lone single-view draw
    assert torch.equal(q.jitter_crop.shifts, pipe.sample(6, gen(43)).jitter_crop.shifts)


@pytest.mark.parametrize("names", [BEST_AUGMENTATIONS, AUGMENTATIONS, ("reddening", "psf", "jitter_crop", "noise")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_two_views_call_path_for_gpus_gives_the_views_of_sample_then_apply(names, dtype):
    # On a GPU, TwoViews.__call__ draws both views without per-view parameter objects and moves
    # only the plan (_one_pass, run here on the CPU). It must give the views apply(sample(...))
    # gives with the same generator, and leave the generator in the same state.
    x = random_batch(6, dtype=dtype)
    views = TwoViews(AugmentationPipeline(names, mad=MAD))
    g_fast, g_ref = gen(44), gen(44)
    q, k = views._one_pass(x, g_fast)
    q_ref, k_ref = views.apply(x, views.sample(6, g_ref))
    assert q.dtype == dtype and q.shape == k.shape == (6, 5, CROP_SIZE, CROP_SIZE)
    if names == BEST_AUGMENTATIONS and dtype == torch.float32:
        assert torch.equal(q, q_ref) and torch.equal(k, k_ref)           # the same operations
    else:   # the PSF: the batch's kernel half-width instead of the CPU blocks' (see the test below)
        tol = 1e-3 if dtype == torch.float16 else 1e-6
        torch.testing.assert_close(q, q_ref, rtol=tol, atol=tol)
        torch.testing.assert_close(k, k_ref, rtol=tol, atol=tol)
    assert torch.equal(g_fast.get_state(), g_ref.get_state())
    assert [t.shape for t in views._one_pass(x[:0], gen(1))] == [(0, 5, CROP_SIZE, CROP_SIZE)] * 2


@pytest.mark.parametrize("names", [BEST_AUGMENTATIONS, AUGMENTATIONS, ("rotate",), ("jitter_crop", "noise")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_draws_on_the_device_map_the_same_uniforms_to_the_same_views(names, dtype):
    # With a generator on a GPU, TwoViews draws the parameters there with torch operations
    # (_device_views, run here on the CPU with a CPU generator). The uniforms it draws, mapped by
    # each augmentation's own from_uniform and applied by the pipeline, must give the same views;
    # the noise is the generator's next standard normal field, scaled per image and band.
    x = random_batch(6, dtype=dtype)
    views = TwoViews(AugmentationPipeline(names, mad=MAD))
    pipe, g = views.pipeline, gen(31)
    q, k = views._device_views(x, g)
    assert q.dtype == dtype and q.shape == k.shape == (6, 5, CROP_SIZE, CROP_SIZE)
    ref = gen(31)
    widths = [getattr(pipe, name).n_uniform for name in pipe.names]
    u = torch.rand(12, sum(widths), generator=ref, dtype=torch.float64).numpy()
    params, start = AugmentationParams(), 0
    for name, width in zip(pipe.names, widths):
        setattr(params, name, getattr(pipe, name).from_uniform(u[:, start:start + width], gen(0)))
        start += width
    quiet = AugmentationPipeline([name for name in names if name != "noise"], mad=MAD)
    noise, params.noise = params.noise, None
    expected = quiet.apply(torch.cat([x, x]), params)                          # (12, 5, 64, 64)
    if noise is not None:
        field = torch.randn(12, 5, CROP_SIZE, CROP_SIZE, generator=ref)
        expected = expected + field.to(dtype) * pipe.noise.scale(noise.level, expected)[:, :, None, None]
    torch.testing.assert_close(torch.cat([q, k]), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(g.get_state(), ref.get_state())                  # nothing else was drawn
    # a seed reproduces the call; the next call draws afresh
    q2, k2 = views._device_views(x, gen(31))
    assert torch.equal(q2, q) and torch.equal(k2, k)
    assert not torch.equal(views._device_views(x, g)[0], q)
    assert [t.shape for t in views._device_views(x[:0], gen(1))] == [(0, 5, CROP_SIZE, CROP_SIZE)] * 2


def test_psf_kernels_are_cut_per_image_to_the_tail():
    # On the CPU each image is blurred with its kernels cut to the half-width its widest band
    # needs: what is cut is at most `tail` of the mass, the rest renormalised to 1, and the
    # narrow draws (most of them) get fewer taps than the batch's widest.
    psf = PSFBlur()
    p = psf.sample(200, gen(42))
    kernels, radius = psf.kernels(p)
    taps, radii = _cut_kernels(kernels, psf.tail, torch.float64)
    assert taps.shape == tuple(kernels.shape)
    # (the batch's half-width counts the mass beyond it, which its kernels no longer hold)
    assert radius - 1 <= radii.max() <= radius and np.median(radii) <= radius / 2
    n = np.abs(np.arange(-radius, radius + 1))
    outside = np.broadcast_to(n[None, None, :] > radii[:, None, None], taps.shape)
    assert (taps[outside] == 0).all()
    np.testing.assert_allclose(taps.sum(-1), 1.0, rtol=0, atol=1e-12)
    k = kernels.numpy()
    assert (np.where(n[None, None, :] > radii[:, None, None], k, 0.0).sum(-1).max(-1) <= psf.tail).all()
    narrower = np.maximum(radii - 1, 0)
    left = np.where(n[None, None, :] > narrower[:, None, None], k, 0.0).sum(-1).max(-1)
    assert (left[radii > 0] > psf.tail).all()                     # each half-width is the smallest
    # So the blur differs from the uncut one by about `tail` of the values (up to 10 here), in
    # float64 (where float32 rounding does not hide it).
    x = random_batch(200, dtype=torch.float64)
    torch.testing.assert_close(psf.apply(x, p), blur_reference(x, psf, p), rtol=0, atol=1e-5)


@pytest.mark.parametrize("names", [("reddening", "psf", "rotate", "jitter_crop"), ("psf", "jitter_crop"),
                                   BEST_AUGMENTATIONS])
def test_cpu_views_do_not_depend_on_the_batch_or_the_threads(names):
    # Each image goes through the compiled CPU kernel on its own: its view is the same, bit for
    # bit, alone or in a batch, with one thread or two (noise aside: its field is drawn per
    # group of 32 images, the same with any number of threads).
    x = random_batch(70)
    pipe = AugmentationPipeline(names, mad=MAD)
    p = pipe.sample(70, gen(46))
    out = pipe.apply(x, p)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        assert torch.equal(pipe.apply(x, p), out)
    finally:
        torch.set_num_threads(threads)
    if "noise" in names:
        return
    for rows in (slice(5, 6), slice(33, 70), slice(0, 3)):
        part = AugmentationParams(**{name: type(getattr(p, name))(*(t[rows] if isinstance(t, torch.Tensor) else t
                                                               for t in vars(getattr(p, name)).values()))
                                     for name in pipe.names})
        assert torch.equal(pipe.apply(x[rows], part), out[rows])


@pytest.mark.parametrize("sigma_r_arcsec", [0.13, 1.0])
def test_views_at_the_image_edges_equal_the_steps(sigma_r_arcsec, monkeypatch):
    # The compiled CPU kernel blurs and resamples only the window of each image that its view
    # reads, zero outside the image. A jitter of 21 pixels at 45 degrees sends windows past every
    # edge; a 1" PSF makes the border pixels count. The views equal the steps applied one by one
    # in float64 with torch (blur as two convolutions, rotate_crop's grid_sample), with the
    # output memory poisoned with NaN, which any unwritten pixel would keep.
    b, jitter = 40, 21
    x = torch.rand(b, 5, CUTOUT_SIZE, CUTOUT_SIZE, generator=gen(47)) + 0.5
    pipe = AugmentationPipeline(("reddening", "psf", "rotate", "jitter_crop"), max_jitter=jitter,
                                psf_sigma_r_arcsec=sigma_r_arcsec)
    p = pipe.sample(b, gen(48))
    angle = p.rotate.angle.clone()
    shifts = p.jitter_crop.shifts.clone()
    angle[0], angle[-1] = math.pi / 4, 5 * math.pi / 4
    shifts[0], shifts[-1] = torch.tensor([-jitter, -jitter]), torch.tensor([jitter, jitter])
    p.rotate, p.jitter_crop = RotationParams(angle), JitterParams(shifts)
    new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda t, *a, **k: new_empty(t, *a, **k).fill_(float("nan")))
    out = pipe.apply(x, p)
    monkeypatch.undo()
    steps = GalacticReddening().apply(x.double(), p.reddening)
    steps = blur_reference(steps, pipe.psf, p.psf)
    steps = rotate_crop(steps, p.rotate.angle, p.jitter_crop.shifts)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), steps, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_cpu_and_cuda_give_the_same_views():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x = random_batch(40)
    pipe = AugmentationPipeline(("reddening", "psf", "rotate", "jitter_crop"))
    p_cpu = pipe.sample(40, gen(26), device="cpu")
    p_gpu = pipe.sample(40, gen(26), device="cuda")
    assert torch.equal(p_cpu.rotate.angle, p_gpu.rotate.angle.cpu())            # same draws
    assert torch.equal(p_cpu.jitter_crop.shifts, p_gpu.jitter_crop.shifts.cpu())
    assert pipe._plan_for(p_gpu, x.cuda()) is p_gpu.plan          # the plan travelled with them
    out_cpu = pipe.apply(x, p_cpu)
    out_gpu = pipe.apply(x.cuda(), p_gpu)
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-5, atol=1e-5)
    # Both views in one pass on the GPU equal the views applied one by one there.
    views = TwoViews(AugmentationPipeline(AUGMENTATIONS, mad=MAD))
    pq, pk = views.sample(40, gen(29), device="cuda")
    q, k = views.apply(x.cuda(), (pq, pk))
    torch.testing.assert_close(q, views.pipeline.apply(x.cuda(), pq), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, views.pipeline.apply(x.cuda(), pk), rtol=1e-6, atol=1e-6)
    # The call on a GPU (no per-view parameter objects, only the plan moved) gives those views.
    q2, k2 = views(x.cuda(), gen(29))
    assert torch.equal(q2, q) and torch.equal(k2, k)
    # Quarter turns are exact on the GPU too.
    for k in range(4):
        angle = torch.full((3,), k * math.pi / 2)
        out = rotate_crop(x[:3].cuda(), angle.cuda(), None, crop_size=None)
        assert torch.equal(out.cpu(), torch.rot90(x[:3], k, dims=(-2, -1)))
    # Noise: the same levels, a different field (CUDA generator), the same statistics.
    noise = GaussianNoise(MAD)
    pn = noise.sample(64, gen(27), device="cuda")
    std = noise.apply(torch.zeros(64, 5, 64, 64, device="cuda"), pn).double().std((-1, -2)).cpu()
    expected = pn.level.double().cpu()[:, None] * torch.tensor(MAD, dtype=torch.float64)[None]
    torch.testing.assert_close(std, expected, rtol=0.06, atol=0)
    q, _ = TwoViews(AugmentationPipeline(AUGMENTATIONS, mad=MAD))(x.cuda().half(), gen(28))
    assert q.dtype == torch.float16 and q.device.type == "cuda" and q.shape == (40, 5, 64, 64)


@pytest.mark.gpu
def test_draws_on_a_gpu_replay_a_cuda_graph_with_the_eager_views():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    import warnings

    x = random_batch(40).cuda()
    for names in (BEST_AUGMENTATIONS, ("reddening", "rotate"), ("jitter_crop", "noise")):
        graphed = TwoViews(AugmentationPipeline(names, mad=MAD))
        eager = TwoViews(AugmentationPipeline(names, mad=MAD), cuda_graphs=False)
        g_graph = torch.Generator(device="cuda").manual_seed(5)
        g_eager = torch.Generator(device="cuda").manual_seed(5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")                     # no silent fall-back to eager
            outs = [graphed(x, g_graph) for _ in range(3)]
        refs = [eager(x, g_eager) for _ in range(3)]
        assert len(graphed._graphs) == 1 and next(iter(graphed._graphs.values())) is not False
        assert not eager._graphs
        for (q, k), (q_ref, k_ref) in zip(outs, refs):         # bit for bit, call after call
            assert torch.equal(q, q_ref) and torch.equal(k, k_ref)
        assert not torch.equal(outs[0][0], outs[1][0])         # fresh draws; earlier outputs kept
        assert torch.equal(g_graph.get_state(), g_eager.get_state())
        # Another generator replays the same graph with its own state.
        q, k = graphed(x, torch.Generator(device="cuda").manual_seed(7))
        q_ref, k_ref = eager(x, torch.Generator(device="cuda").manual_seed(7))
        assert torch.equal(q, q_ref) and torch.equal(k, k_ref) and len(graphed._graphs) == 1
    # The PSF needs its kernel half-width on the host: drawn on the GPU, run eagerly.
    views = TwoViews(AugmentationPipeline(AUGMENTATIONS, mad=MAD))
    q, k = views(x.half(), torch.Generator(device="cuda").manual_seed(6))
    assert q.dtype == torch.float16 and q.shape == k.shape == (40, 5, 64, 64) and not views._graphs
    with pytest.raises(ValueError, match="generator is on cuda"):
        views(x.cpu(), torch.Generator(device="cuda"))
