"""The paper's augmentations (Hayat et al. 2021, Section 2; ablation in Appendix D).

Every augmentation acts on a batch ``(B, 5, H, W)`` of ugriz images in nanomaggies and
draws independent parameters per image. Each one has

* ``sample(batch_size, generator=None, device="cpu") -> params``: draws the random
  parameters (a small dataclass of tensors) from a CPU ``torch.Generator`` (or torch's
  global CPU generator) and moves them to ``device``, so a seed gives the same draws on
  the CPU and on a GPU;
* ``apply(batch, params)``: the deterministic transform given those parameters;
* ``__call__(batch, generator=None)``: ``apply(batch, sample(...))``.

Order of the composition (:class:`AugmentationPipeline`): the order Section 2 lists the
augmentations in, which is also the physical order in which the effects arise::

    reddening -> psf -> rotate + jitter_crop (one resampling) -> noise

Dust dims the light on its way to us and the atmosphere/optics blur it, so both act on the
sky image (the full ``107 x 107`` cutout); rotation and jitter-crop only choose how that image
is framed; instrumental noise is added last, to the ``64 x 64`` crop the network sees, so it
stays independent from pixel to pixel with exactly the drawn standard deviation (noise added
before the rotation or the blur would be interpolated and smoothed). Rotation and crop are
fused into one bilinear resampling (one ``grid_sample`` call); without ``jitter_crop`` the
plain centre crop is used (fused with the rotation when there is one), so the output is
always ``64 x 64``. Reddening is a per-(image, band) factor, which commutes exactly with the
linear per-band operations that follow it, so the pipeline applies it as a scale in the same
pass as the noise, on the small crop; the result is the same to float rounding.

Conventions:

* pixel ``(row, col) = (y, x)``; the rotation centre is the image centre
  ``((H - 1) / 2, (W - 1) / 2)`` (pixel 53 for the 107-pixel cutouts);
* a positive angle rotates the image content **counter-clockwise as displayed with row 0 at
  the top** (``imshow``'s default), the convention of ``skimage.transform.rotate`` and of
  ``torch.rot90(x, k, dims=(-2, -1))``: an angle of ``k * pi / 2`` equals ``torch.rot90(x, k,
  dims=(-2, -1))``;
* crops follow the authors' loader: crop centre ``c = H // 2 + shift`` (53 for 107 pixels), rows
  ``c - 32 .. c + 31``; ``shifts[:, 0]`` moves the rows (y), ``shifts[:, 1]`` the columns (x).

Precision: parameters are drawn in float64 on the CPU and stored as float32. float32 and float64
batches are computed in their own precision. float16 and bfloat16 batches are accepted: the
resampling grid, the blur, the reddening and the noise are computed in float32 and the result is
cast back, so the only loss is the final rounding to the 11-bit (float16) or 8-bit (bfloat16)
significand. That is harmless for training; bfloat16 steps of 0.4% make it unsuitable for
photometry, and float16 overflows above 65504 nmgy in a pixel (magnitude 10.5) and goes subnormal
below 6e-5 nmgy, far below the sky noise.

The Gaussian noise field is drawn on the batch's device from a seed that is part of the
parameters, so ``apply`` is exactly repeatable; CPU and CUDA draw different fields from the
same seed (different generators), with the same per-band standard deviations. On the CPU the
field is drawn in groups of 32 images with their own seeded generators, in parallel threads
(:class:`TwoViews` draws both views' fields in one such pass).

Speed: on the CPU, the pipeline is one compiled kernel (numba, :mod:`sdsscl._cpu_views`) that
takes each image through the blur, the resampling, the reddening and the noise while its pixels
stay in cache, blurring only the window its resampling reads, with the PSF kernels cut to each
image's own width (the half-normal draws are mostly narrow); slices of the batch run in parallel
threads, each drawing its noise first. A process compiles the kernel on first use (a few seconds,
then cached on disk). On a GPU it is the whole batch in a handful of torch kernels. All of a
view's randomness is one draw of uniform numbers (``Augmentation.from_uniform``); what ``apply``
derives from the parameters (the sampling maps, band factors and PSF kernels: the *plan*) is
computed with numpy on the CPU when they are drawn, and everything reaches the GPU in one pinned
copy, with no host synchronisation. :class:`TwoViews` draws both MoCo views as one batch and
applies them in one pass; its call on a GPU makes no per-view parameter objects and moves only
the plan. Given a generator on the GPU instead, it draws there with the same distributions, and
replays small batches as CUDA graphs: no host work per call but the launch, for small batches.

No GPU is touched at import; devices come from the inputs.
"""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
from scipy import special
import torch.nn.functional as F
from torch import Tensor

from .constants import (
    CROP_SIZE,
    CUTOUT_SIZE,
    MAX_JITTER,
    N_BANDS,
    PIXEL_SCALE,
    R_BAND,
    R_DR12,
    R_SF11,
    WAVELENGTH_EFF,
)

__all__ = [
    "AUGMENTATIONS",
    "BEST_AUGMENTATIONS",
    "Augmentation",
    "AugmentationPipeline",
    "AugmentationParams",
    "CenterCrop",
    "Deredden",
    "GalacticReddening",
    "GaussianNoise",
    "JitterCrop",
    "JitterParams",
    "NoiseParams",
    "PSFBlur",
    "PSFParams",
    "RandomRotate",
    "ReddeningParams",
    "RotationParams",
    "TwoViews",
    "discrete_gaussian_kernels",
    "discrete_gaussian_radius",
    "rotate_crop",
]

#: The augmentation names of the ablation (Appendix D), in the order the pipeline applies them.
AUGMENTATIONS: tuple[str, ...] = ("reddening", "psf", "rotate", "jitter_crop", "noise")
#: The paper's best set (Section 2 and Appendix D): all augmentations but the PSF.
BEST_AUGMENTATIONS: tuple[str, ...] = ("reddening", "rotate", "jitter_crop", "noise")

# Images rotated together by rotate_crop on the CPU (keeps the working set in cache and avoids
# fresh page-faulting allocations of whole-batch temporaries); other devices take the whole batch.
_CPU_GEOMETRY_CHUNK = 32
# Images per independently seeded CPU noise stream; also the views per task of the compiled CPU
# kernel (a group's noise, then its views, in parallel threads).
_NOISE_GROUP = 32
_POOL: tuple[int, int, ThreadPoolExecutor] | None = None
_SCRATCH = threading.local()
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# TwoViews with a CUDA generator: batches up to this size replay a CUDA graph. Larger ones keep
# the GPU busy for longer than launching their kernels takes, and the graph's extra output copy
# then costs more than it saves (H100: graphs 0.72 ms against 0.92-1.30 eager at 512 images,
# 1.29 against 1.24-1.25 at 1,024). At most _GRAPH_CACHE graphs are kept per TwoViews.
_GRAPH_MAX_IMAGES = 512
_GRAPH_CACHE = 8


# ----------------------------------------------------------------------------- helpers
def _check_batch(owner: str, batch: Tensor) -> None:
    """Raise a ValueError unless ``batch`` is a floating ``(B, 5, H, W)`` tensor."""
    if not isinstance(batch, Tensor):
        raise TypeError(f"{owner}: expected a torch.Tensor batch of shape (B, {N_BANDS}, H, W), "
                        f"got {type(batch).__name__}")
    if batch.ndim != 4 or batch.shape[1] != N_BANDS:
        raise ValueError(f"{owner}: expected a batch of shape (B, {N_BANDS}, H, W) (ugriz), "
                         f"got shape {tuple(batch.shape)}")
    if not batch.is_floating_point():
        raise ValueError(f"{owner}: expected a floating-point batch (nanomaggies), got {batch.dtype}")


def _check_params_batch(owner: str, batch: Tensor, n: int) -> None:
    if batch.shape[0] != n:
        raise ValueError(f"{owner}: parameters were drawn for {n} images, the batch has "
                         f"{batch.shape[0]} (shape {tuple(batch.shape)})")


def _check_generator(owner: str, generator: torch.Generator | None) -> None:
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"{owner}: parameters are drawn on the CPU so that every device sees the "
                         f"same draws; pass a CPU torch.Generator, got one on {generator.device} "
                         f"(only TwoViews' call draws on a GPU)")


def _device_key(device: torch.device) -> tuple[str, int]:
    """(type, index), the current CUDA device's index for an unindexed "cuda"."""
    if device.index is None and device.type == "cuda":
        return device.type, torch.cuda.current_device()
    return device.type, device.index or 0


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 are computed in float32; float32/float64 in themselves."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _numpy(t: Tensor) -> np.ndarray:
    """A tensor's values as a numpy array (read back from another device if need be)."""
    if t.device.type != "cpu" or t.requires_grad:
        t = t.detach().cpu()
    return t.numpy()


def _float32(values: np.ndarray) -> Tensor:
    """A float32 CPU tensor of float64 numpy values (parameters are drawn in float64)."""
    return torch.from_numpy(np.asarray(values, dtype=np.float32))


@lru_cache(maxsize=64)
def _constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """A cached constant vector on a device (copied once per device and dtype)."""
    return torch.tensor(values, dtype=dtype, device=device)


def _band_constant(values, like: Tensor) -> Tensor:
    """``values`` (5,) as a tensor on ``like``'s device in its computation dtype."""
    return _constant(tuple(float(v) for v in values), like.device, _compute_dtype(like.dtype))


def _crop_origin(size: int, crop_size: int) -> int:
    """First row (or column) of the centre crop: ``size // 2 - crop_size // 2`` (21 for 107 -> 64)."""
    return size // 2 - crop_size // 2


# ----------------------------------------------------------------------------- base class
class Augmentation:
    """Base of the random augmentations: ``__call__`` = ``sample`` then ``apply``.

    Randomness enters in one place: ``sample`` draws ``n_uniform`` uniform numbers per image in
    one call of the CPU generator (float64, in [0, 1)) and ``from_uniform`` turns them into the
    parameters (numpy on the CPU). The pipeline draws all of a view's uniforms in one call.
    """

    #: Uniform random numbers per image that ``from_uniform`` turns into parameters.
    n_uniform: int = 1

    def sample(self, batch_size: int, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu"):
        _check_generator(type(self).__name__, generator)
        u = torch.rand(batch_size, self.n_uniform, generator=generator, dtype=torch.float64).numpy()
        return _move_to([self.from_uniform(u, generator)], device)[0]

    def from_uniform(self, u: np.ndarray, generator: torch.Generator | None = None):
        """The parameters (on the CPU) from ``u`` (B, n_uniform) uniform on [0, 1)."""
        raise NotImplementedError

    def apply(self, batch: Tensor, params) -> Tensor:
        raise NotImplementedError

    def __call__(self, batch: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(type(self).__name__, batch)
        return self.apply(batch, self.sample(batch.shape[0], generator, device=batch.device))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


# ----------------------------------------------------------------------------- reddening
@dataclass
class ReddeningParams:
    """ebv: E(B-V) per image, magnitudes, shape (B,)."""

    ebv: Tensor


class GalacticReddening(Augmentation):
    """Artificial Galactic reddening (Section 2, "Galactic extinction").

    Draws ``E(B-V) ~ U(0, max_ebv)`` per image and dims band b by ``10**(-0.4 R_b E(B-V))``.

    max_ebv: upper end of the uniform E(B-V) distribution, magnitudes (Section 2: 0.5).
    coefficients: ``R_b = A_b / E(B-V)`` per band, ugriz (Section 2: Schlafly & Finkbeiner
        2011, ``constants.R_SF11``).
    """

    def __init__(self, *, max_ebv: float = 0.5, coefficients: Sequence[float] = tuple(R_SF11.tolist())):
        if not max_ebv >= 0:
            raise ValueError(f"GalacticReddening: max_ebv must be >= 0, got {max_ebv}")
        if len(coefficients) != N_BANDS:
            raise ValueError(f"GalacticReddening: expected {N_BANDS} coefficients (ugriz), "
                             f"got {len(coefficients)}")
        self.max_ebv = float(max_ebv)
        self.coefficients = tuple(float(c) for c in coefficients)

    def from_uniform(self, u: np.ndarray, generator: torch.Generator | None = None) -> ReddeningParams:
        return ReddeningParams(ebv=_float32(u[:, 0] * self.max_ebv))                    # (B,)

    def factors(self, ebv: Tensor, like: Tensor) -> Tensor:
        """Flux factors ``10**(-0.4 R_b E)``, shape (B, 5), in ``like``'s computation dtype."""
        coeff = _band_constant(self.coefficients, like)                   # (5,)
        return _flux_factors(ebv.to(coeff.dtype), coeff)                  # (B, 5)

    def apply(self, batch: Tensor, params: ReddeningParams) -> Tensor:
        _check_batch("GalacticReddening", batch)
        _check_params_batch("GalacticReddening", batch, params.ebv.shape[0])
        f = self.factors(params.ebv, batch)                              # (B, 5)
        return (batch.to(f.dtype) * f[:, :, None, None]).to(batch.dtype)  # (B, 5, H, W)


def _flux_factors(ebv, coefficients):
    """``10**(-0.4 R_b E(B-V))`` per image and band, (B, 5), from E(B-V) (B,) and R_b (5,): both
    numpy arrays (the plan, on the host) or both tensors (``GalacticReddening.factors``)."""
    return 10.0 ** (-0.4 * coefficients * ebv[:, None])


class Deredden:
    """Undo the tabulated Galactic extinction of each galaxy, as the authors' loader does.

    ``E(B-V) = mean_b(e_bv_b / R_DR12_b)``, then ``image_b *= 10**(R_SF11_b E(B-V) / 2.5)``.

    coefficients: extinction coefficients used to correct, ugriz (``constants.R_SF11``).
    tabulated_coefficients: the coefficients SDSS DR12 used to tabulate the ``e_bv`` column
        (``constants.R_DR12``), used to recover E(B-V).
    """

    def __init__(self, *, coefficients: Sequence[float] = tuple(R_SF11.tolist()),
                 tabulated_coefficients: Sequence[float] = tuple(R_DR12.tolist())):
        for name, c in (("coefficients", coefficients), ("tabulated_coefficients", tabulated_coefficients)):
            if len(c) != N_BANDS:
                raise ValueError(f"Deredden: expected {N_BANDS} {name} (ugriz), got {len(c)}")
        self.coefficients = tuple(float(c) for c in coefficients)
        self.tabulated_coefficients = tuple(float(c) for c in tabulated_coefficients)

    def ebv(self, e_bv: Tensor) -> Tensor:
        """E(B-V) per galaxy, shape (B,), from the per-band extinction ``e_bv`` (B, 5): the torch
        form of ``constants.ebv_from_extinction``, on ``e_bv``'s device."""
        r_tab = _constant(self.tabulated_coefficients, e_bv.device, _compute_dtype(e_bv.dtype))
        return (e_bv.to(r_tab.dtype) / r_tab).mean(dim=-1)               # (B,)

    def __call__(self, batch: Tensor, e_bv: Tensor) -> Tensor:
        _check_batch("Deredden", batch)
        e_bv = torch.as_tensor(e_bv)
        if e_bv.shape != (batch.shape[0], N_BANDS):
            raise ValueError(f"Deredden: expected e_bv of shape ({batch.shape[0]}, {N_BANDS}) "
                             f"(per-band extinction, magnitudes), got {tuple(e_bv.shape)}")
        e_bv = e_bv.to(batch.device)
        coeff = _band_constant(self.coefficients, batch)                  # (5,)
        ebv = self.ebv(e_bv).to(coeff.dtype)                              # (B,)
        f = torch.pow(10.0, coeff * ebv[:, None] / 2.5)                   # (B, 5)
        return (batch.to(f.dtype) * f[:, :, None, None]).to(batch.dtype)  # (B, 5, H, W)

    def __repr__(self) -> str:
        return f"Deredden(coefficients={self.coefficients}, tabulated_coefficients={self.tabulated_coefficients})"


# ----------------------------------------------------------------------------- PSF
@dataclass
class PSFParams:
    """sigma_r: r-band Gaussian standard deviation per image, arcsec, shape (B,).
    radius: kernel half-width in pixels for the batch, set by ``sample`` from the CPU draws
        (None: computed from sigma_r in ``apply``, which reads them back from the GPU).
    """

    sigma_r: Tensor
    radius: int | None = None


def discrete_gaussian_kernels(sigma: Tensor, radius: int) -> Tensor:
    """Normalised 1-D discrete Gaussian kernels ``(N, 2 * radius + 1)`` for ``sigma`` (N,) in pixels.

    The discrete Gaussian ``T(n, t) = exp(-t) I_n(t)``, ``t = sigma**2`` (Lindeberg 1990), is the
    Gaussian of the pixel lattice: its variance is exactly ``sigma**2`` at every width (a sampled
    Gaussian of sigma = 0.33 px, the paper's typical r-band width, has a variance 5x too small),
    two of them convolve into one, and ``sigma = 0`` is the identity. It is computed from its
    Fourier series, ``T(n, t) = (1/M) sum_m exp(t (cos th_m - 1)) cos(n th_m)``, which the M-point
    trapezoid rule gives exactly up to aliased terms ``T(n +- M)``, negligible for
    ``M = 4 radius + 8``. The kernel is truncated at ``radius`` and renormalised to sum 1.
    Computed in float64 (float32 on Apple MPS).
    """
    dtype = torch.float32 if sigma.device.type == "mps" else torch.float64
    sigma = sigma.to(dtype)
    m = 4 * radius + 8
    theta = torch.arange(m, device=sigma.device, dtype=dtype) * (2 * math.pi / m)        # (M,)
    n = torch.arange(-radius, radius + 1, device=sigma.device, dtype=dtype)                # (K,)
    spectrum = torch.exp(sigma.reshape(-1, 1) ** 2 * (torch.cos(theta) - 1.0))           # (N, M)
    kernels = spectrum @ torch.cos(theta[:, None] * n[None, :]) / m                        # (N, K)
    kernels = kernels.clamp_min(0.0)
    return kernels / kernels.sum(dim=-1, keepdim=True)                                     # (N, K)


def discrete_gaussian_radius(sigma: Tensor, tail: float) -> Tensor:
    """Smallest half-width R per ``sigma`` (N,) [px] leaving at most ``tail`` of the kernel's mass
    outside ``|n| <= R``; a long tensor (N,) on the CPU. The discrete Gaussian has heavier tails
    than ``truncate * sigma`` rules assume at small sigma (it is a Skellam distribution)."""
    sigma = sigma.detach().to("cpu", torch.float64).reshape(-1)
    if sigma.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    big = int(math.ceil(10 * float(sigma.max()) + 10))
    k = discrete_gaussian_kernels(sigma, big)                                  # (N, 2 big + 1)
    inside = k[:, big:big + 1] + torch.cat(                                    # mass in |n| <= R
        [torch.zeros_like(k[:, :1]), 2 * torch.cumsum(k[:, big + 1:], dim=-1)], dim=-1)
    return ((1.0 - inside) > tail).sum(dim=-1)                                 # (N,)


def _blur_conv(x: Tensor, k: Tensor) -> Tensor:
    """The same blur as two depthwise (grouped) convolutions: two launches on a GPU."""
    g, h, w = x.shape
    r = (k.shape[1] - 1) // 2
    planes = x.reshape(1, g, h, w)
    planes = F.conv2d(planes, k.reshape(g, 1, -1, 1), padding=(r, 0), groups=g)  # along y
    planes = F.conv2d(planes, k.reshape(g, 1, 1, -1), padding=(0, r), groups=g)  # along x
    return planes.reshape(g, h, w)


class PSFBlur(Augmentation):
    """Point-spread-function augmentation (Section 2, "Point Spread Function").

    Wavelength-dependent Gaussian smoothing: the r-band standard deviation is drawn per image
    from ``|N(0, sigma_r_arcsec)|`` and band b uses ``sigma_r * (lambda_b / lambda_r)**exponent``,
    with the SDSS effective wavelengths (``constants.WAVELENGTH_EFF``). Each (image, band) is
    convolved with a normalised separable discrete Gaussian (:func:`discrete_gaussian_kernels`),
    so flux is conserved (except light blurred past the border, which is treated as empty,
    background-subtracted sky, i.e. zero padding) and a blurred point source has exactly the
    drawn variance. A sigma too small to move ``tail`` of the flux is exactly the identity.
    On the CPU (the compiled kernel of :mod:`sdsscl._cpu_views`) each image's kernels are cut
    further, to the half-width its own widest band needs (see :func:`_cut_kernels`).

    sigma_r_arcsec: scale of the half-normal r-band sigma, arcsec (Section 2: 0.13").
    wavelength_exponent: sigma ~ lambda**exponent (Section 2, after Xin et al. 2018: -0.3).
    pixel_scale: arcsec per pixel (SDSS: 0.396").
    tail: kernels are truncated where at most this fraction of the widest kernel's mass lies
        outside (1e-7, about float32 resolution), then renormalised.
    """

    def __init__(self, *, sigma_r_arcsec: float = 0.13, wavelength_exponent: float = -0.3,
                 pixel_scale: float = PIXEL_SCALE, tail: float = 1e-7):
        if not sigma_r_arcsec >= 0:
            raise ValueError(f"PSFBlur: sigma_r_arcsec must be >= 0, got {sigma_r_arcsec}")
        if not pixel_scale > 0:
            raise ValueError(f"PSFBlur: pixel_scale must be > 0, got {pixel_scale}")
        if not 0 < tail < 1:
            raise ValueError(f"PSFBlur: tail must be in (0, 1), got {tail}")
        self.sigma_r_arcsec = float(sigma_r_arcsec)
        self.wavelength_exponent = float(wavelength_exponent)
        self.pixel_scale = float(pixel_scale)
        self.tail = float(tail)

    @property
    def band_scale(self) -> tuple[float, ...]:
        """``(lambda_b / lambda_r)**exponent`` per band, ugriz (u widest for exponent -0.3)."""
        lam = WAVELENGTH_EFF
        return tuple(float(v) for v in (lam / lam[R_BAND]) ** self.wavelength_exponent)

    def sigma_pixels(self, sigma_r: Tensor) -> Tensor:
        """Per-band standard deviations in pixels, shape (B, 5), from sigma_r (B,) in arcsec."""
        dtype = torch.float32 if sigma_r.device.type == "mps" else torch.float64
        scale = _constant(self.band_scale, sigma_r.device, dtype)                  # (5,)
        return sigma_r.to(dtype)[:, None] * scale[None, :] / self.pixel_scale      # (B, 5)

    def radius(self, sigma_r: Tensor) -> int:
        """Kernel half-width [px] for a batch of r-band sigmas (arcsec); reads them on the CPU."""
        if sigma_r.numel() == 0:
            return 0
        widest = self.sigma_pixels(sigma_r.detach().cpu().reshape(-1)).max().reshape(1)
        return int(discrete_gaussian_radius(widest, self.tail)[0])

    def from_uniform(self, u: np.ndarray, generator: torch.Generator | None = None) -> PSFParams:
        # |N(0, s)| by inversion: s * sqrt(2) * erfinv(u), u in [0, 1)
        sigma_r = _float32(self.sigma_r_arcsec * math.sqrt(2.0) * special.erfinv(u[:, 0]))  # (B,) arcsec
        return PSFParams(sigma_r=sigma_r, radius=self.radius(sigma_r))

    def kernels(self, params: PSFParams) -> tuple[Tensor, int]:
        """Per-(image, band) kernels (B, 5, 2R+1), float64 (float32 on MPS), on the parameters'
        device, and the batch half-width R."""
        radius = params.radius if params.radius is not None else self.radius(params.sigma_r)
        n = params.sigma_r.shape[0]
        sigma = self.sigma_pixels(params.sigma_r)                                   # (B, 5) px
        return discrete_gaussian_kernels(sigma.reshape(-1), radius).reshape(n, N_BANDS, 2 * radius + 1), radius

    def apply(self, batch: Tensor, params: PSFParams) -> Tensor:
        _check_batch("PSFBlur", batch)
        _check_params_batch("PSFBlur", batch, params.sigma_r.shape[0])
        x = batch.to(_compute_dtype(batch.dtype))
        kernels, radius = self.kernels(params)
        if radius == 0:                                       # no kernel moves `tail` of the flux
            return batch.clone()
        b, c, h, w = x.shape
        if x.device.type == "cpu":              # the compiled kernel: an uncropped crop at (0, 0)
            job = _cpu_tables(b, 1, np.zeros((b, 2, 3)), False, kernels, self.tail, None, None, x.dtype)
            out = torch.empty_like(x)
            _cpu_pass(x, [(job, out, None)])
        else:
            k = kernels.to(x.device, x.dtype).reshape(b * c, -1)
            out = _blur_conv(x.reshape(b * c, h, w), k).view(b, c, h, w)
        return out.to(batch.dtype)


# ----------------------------------------------------------------------------- geometry
@dataclass
class RotationParams:
    """angle: rotation angle per image, radians, counter-clockwise as displayed, shape (B,)."""

    angle: Tensor


@dataclass
class JitterParams:
    """shifts: integer offsets of the crop centre per image, (row, col) = (dy, dx), shape (B, 2)."""

    shifts: Tensor


def _integer_crop(batch: Tensor, top: Tensor, left: Tensor, crop_size: int) -> Tensor:
    """Crop ``crop_size**2`` at per-image integer corners ``top``, ``left`` (B,): one gather."""
    b, c, h, w = batch.shape
    ar = torch.arange(crop_size, device=batch.device)
    rows = top.to(batch.device, torch.long)[:, None] + ar[None, :]               # (B, S)
    cols = left.to(batch.device, torch.long)[:, None] + ar[None, :]              # (B, S)
    index = (rows[:, :, None] * w + cols[:, None, :]).reshape(b, 1, crop_size**2)  # (B, 1, S*S)
    flat = batch.reshape(b, c, h * w).gather(2, index.expand(b, c, -1))            # (B, 5, S*S)
    return flat.reshape(b, c, crop_size, crop_size)                               # (B, 5, S, S)


def _dyadic_frame(size: int) -> int:
    """Smallest ``2**k + 1 >= size``: with ``align_corners=True``, grid_sample maps a normalised
    coordinate n to pixel ``(n + 1) * 2**(k-1)``, exact in floating point, so whole-pixel
    positions are sampled exactly (for 107 pixels, ``(n + 1) * 53`` rounds: up to 1e-5 px off)."""
    return (1 << max(1, (size - 1 - 1).bit_length())) + 1


def _frame_geometry(h: int, w: int) -> tuple[int, float, int, int]:
    """The zero frame around ``h x w`` images that the sampling maps (see :func:`_affine`) address:
    its side (see :func:`_dyadic_frame`), ``half = (side - 1) / 2`` (framed pixel ``p`` has the
    normalised coordinate ``p / half - 1``), and the image's offsets ``pad_y``, ``pad_x`` in it."""
    side = _dyadic_frame(max(h, w))
    return side, (side - 1) / 2, (side - h) // 2, (side - w) // 2


def _resample(frames: Tensor, grid: Tensor) -> Tensor:
    """Bilinear samples of the first n ``frames`` (>= n, C, P, P) at their ``grid`` (n, Ho, Wo, 2)
    (see :func:`_sampling_grid`), zero outside: one ``grid_sample`` call, (n, C, Ho, Wo)."""
    return F.grid_sample(frames[:grid.shape[0]], grid, mode="bilinear", padding_mode="zeros",
                         align_corners=True)


def _blocks(n: int, device: torch.device, size: int) -> list[slice]:
    """Image blocks: cache-sized on the CPU, the whole batch on other devices."""
    if device.type != "cpu":
        return [slice(0, n)]
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


class _Frame:
    """A reusable zero frame ``(n, 5, P, P)``, ``P = 2**k + 1``, around ``H x W`` images, and the
    fused rotate-and-crop resampling of whatever is placed inside it."""

    def __init__(self, n: int, h: int, w: int, device: torch.device, dtype: torch.dtype,
                 buffer: Tensor | None = None):
        self.h, self.w = h, w
        self.side, _, self.pad_y, self.pad_x = _frame_geometry(h, w)
        if buffer is not None:                  # a zero frame owned by the caller (a CUDA graph)
            self.buffer = buffer
            return
        # Scratch kept per thread for the next call of the same geometry: only the inside is ever
        # written, so the margins stay zero, and no fresh memory is page-faulted per call.
        key = (h, w, str(device), dtype)
        cached = getattr(_SCRATCH, "frame", None)
        if cached is None or cached[0] != key or cached[1].shape[0] < n:
            cached = (key, torch.zeros(n, N_BANDS, self.side, self.side, device=device, dtype=dtype))
            _SCRATCH.frame = cached
        self.buffer = cached[1]

    def inside(self, n: int) -> Tensor:
        """The (n, 5, H, W) window where the first n images go (margins stay zero)."""
        return self.buffer[:n, :, self.pad_y:self.pad_y + self.h, self.pad_x:self.pad_x + self.w]

    def resample(self, grid: Tensor) -> Tensor:
        """Rotate and crop the n framed images (placed in the first n slots) at their sampling
        ``grid`` (n, Ho', Wo, 2) (see :func:`_sampling_grid`): one ``grid_sample`` call,
        (n, 5, Ho', Wo)."""
        return _resample(self.buffer, grid)


def _sampling_grid(affine: Tensor, out_h: int, out_w: int, dtype: torch.dtype, copies: int = 1) -> Tensor:
    """The ``grid_sample`` grid of the sampling maps ``affine`` (copies * n, 2, 3) (see
    :func:`_affine`; copy k of image i in row k * n + i) in ``dtype``: computed in float64 (two
    broadcast multiply-adds, exact for whole-pixel positions) and rounded once, (n, copies * Ho,
    Wo, 2) with image i's copies stacked along the rows."""
    n = affine.shape[0] // copies
    j, i = _pixel_axes(out_h, out_w, affine.device, affine.dtype)          # (1, 1, 1, Wo), (1, 1, Ho, 1)
    a = affine[:, :, :, None, None]                                                 # (n, 2, 3, 1, 1)
    grid = torch.empty((n, copies, out_h, out_w, 2), device=affine.device, dtype=dtype)
    coords = torch.addcmul(torch.addcmul(a[:, :, 2], a[:, :, 0], j), a[:, :, 1], i)      # (cn, 2, Ho, Wo)
    grid.permute(1, 0, 4, 2, 3).copy_(coords.view(copies, n, 2, out_h, out_w))          # rounded once
    return grid.view(n, copies * out_h, out_w, 2)


@lru_cache(maxsize=16)
def _pixel_axes(out_h: int, out_w: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Column indices j (1, 1, 1, Wo) and row indices i (1, 1, Ho, 1) of the output pixels,
    cached per device."""
    j = torch.arange(out_w, dtype=dtype).reshape(1, 1, 1, out_w).to(device)
    i = torch.arange(out_h, dtype=dtype).reshape(1, 1, out_h, 1).to(device)
    return j, i


def _affine(angle, dy, dx, h: int, w: int, out_h: int, out_w: int, top0: int, left0: int):
    """The map from output pixel ``(j, i, 1)`` to the normalised ``grid_sample`` coordinates
    ``(x, y)`` in the dyadic frame around an ``h x w`` image, per image: (B, 2, 3) float64, from
    the angles (radians) and integer shifts (B,): numpy arrays (the host's plan), or float64
    tensors (parameters drawn on a device: the same arithmetic, with no host synchronisation).

    Output pixel (i, j) is the point (Y, X) = (top + i, left + j) of the rotated image, which shows
    the input at (y, x), with u = X - cx, v = Y - cy (counter-clockwise as displayed)::

        x = cx + cos u - sin v,   y = cy + sin u + cos v

    then x -> framed pixel x + pad_x -> normalised n = x' / half - 1 (``align_corners=True``). With
    the frame's ``half = 2**(k-1)``, whole-pixel positions are dyadic numbers, exact in float64 and
    in the float32 grid.
    """
    xp = torch if isinstance(angle, Tensor) else np
    if xp is np:
        angle, dy, dx = (np.asarray(v, dtype=np.float64) for v in (angle, dy, dx))
    _, half, pad_y, pad_x = _frame_geometry(h, w)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    cos, sin = xp.cos(angle), xp.sin(angle)                                        # (B,)
    # Multiples of pi/2 (to float32 rounding of the angle, |error| < 1e-6 rad, under 1e-4 px at
    # the corners) are made exact, so that they reproduce torch.rot90 bit for bit.
    on_y, on_x = abs(sin) < 1e-6, abs(cos) < 1e-6
    if xp is torch or on_y.any() or on_x.any():           # rare in random draws: skip the work
        cos, sin = (xp.where(on_x, 0.0, xp.where(on_y, xp.sign(cos), cos)),
                    xp.where(on_y, 0.0, xp.where(on_x, xp.sign(sin), sin)))
    u0 = left0 + dx - cx                                                           # u at j = 0
    v0 = top0 + dy - cy                                                            # v at i = 0
    x0 = (cx + pad_x + cos * u0 - sin * v0) / half - 1.0
    y0 = (cy + pad_y + sin * u0 + cos * v0) / half - 1.0
    affine = xp.stack([cos / half, -sin / half, x0, sin / half, cos / half, y0], -1)
    return affine.reshape(-1, 2, 3)


def _crop_geometry(h: int, w: int, crop_size: int | None) -> tuple[int, int, int, int]:
    """(out_h, out_w, top0, left0): the output size and the un-jittered crop corner."""
    if crop_size is None:
        return h, w, 0, 0
    return crop_size, crop_size, _crop_origin(h, crop_size), _crop_origin(w, crop_size)


def _split_shifts(shifts: Tensor | None, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    if shifts is None:
        zero = torch.zeros(n, dtype=torch.long, device=device)
        return zero, zero
    return shifts[:, 0].to(device), shifts[:, 1].to(device)


def rotate_crop(batch: Tensor, angle: Tensor | None, shifts: Tensor | None,
                crop_size: int | None = CROP_SIZE) -> Tensor:
    """Rotate about the image centre, then crop around ``H // 2 + shift``: one bilinear resampling.

    batch: (B, 5, H, W). angle: (B,) radians (counter-clockwise as displayed) or None (no
    rotation: an exact integer crop by indexing). shifts: (B, 2) integer (dy, dx) or None (centre
    crop). crop_size: side of the output, or None for the full ``H x W`` frame (rotation only).
    Returns (B, 5, S, S) (or (B, 5, H, W)). Samples outside the image are zero (bilinear weights
    on the missing neighbours are zero). The image is placed in a zero frame of side
    ``2**k + 1`` so that grid coordinates are exact (``_dyadic_frame``): a zero angle reproduces
    the integer crop bit for bit, and a multiple of 90 degrees reproduces ``torch.rot90``.
    The sampling maps are made with numpy on the host, so angles on a GPU are read back once
    (the pipeline avoids that: it makes them where the parameters are drawn).
    """
    b, c, h, w = batch.shape
    out_h, out_w, top0, left0 = _crop_geometry(h, w, crop_size)
    dy, dx = _split_shifts(shifts, b, batch.device)
    if angle is None:
        if crop_size is None:
            return batch.clone()
        return _integer_crop(batch, top0 + dy, left0 + dx, out_h)               # (B, 5, S, S)
    x = batch.to(_compute_dtype(batch.dtype))
    if b == 0:
        return batch.new_empty(0, c, out_h, out_w)
    affine = torch.from_numpy(_affine(_numpy(angle), _numpy(dy), _numpy(dx), h, w, out_h, out_w,
                                      top0, left0)).to(x.device)                  # (B, 2, 3)
    blocks = _blocks(b, x.device, _CPU_GEOMETRY_CHUNK)
    grid = _sampling_grid(affine, out_h, out_w, x.dtype)                         # (B, S, S, 2)
    frame = _Frame(blocks[0].stop - blocks[0].start, h, w, x.device, x.dtype)
    out = x.new_empty(b, c, out_h, out_w)                                        # (B, 5, Ho, Wo)
    for blk in blocks:
        frame.inside(blk.stop - blk.start).copy_(x[blk])
        out[blk] = frame.resample(grid[blk])
    return out.to(batch.dtype)


class RandomRotate(Augmentation):
    """Random rotation (Section 2, "Rotation"): angle ~ U(0, 2 pi) per image.

    Bilinear interpolation about the image centre ``((H-1)/2, (W-1)/2)``, zeros outside the image,
    no flips; the output keeps the input size. In :class:`AugmentationPipeline` the rotation is
    fused with the crop.

    max_angle: upper end of the uniform angle distribution, radians (Section 2: 2 pi).
    """

    def __init__(self, *, max_angle: float = 2 * math.pi):
        self.max_angle = float(max_angle)

    def from_uniform(self, u: np.ndarray, generator: torch.Generator | None = None) -> RotationParams:
        return RotationParams(angle=_float32(u[:, 0] * self.max_angle))                  # (B,)

    def apply(self, batch: Tensor, params: RotationParams) -> Tensor:
        _check_batch("RandomRotate", batch)
        _check_params_batch("RandomRotate", batch, params.angle.shape[0])
        return rotate_crop(batch, params.angle, None, crop_size=None)              # (B, 5, H, W)


def _check_crop_fits(owner: str, batch: Tensor, crop_size: int, max_jitter: int) -> None:
    need = crop_size + 2 * max_jitter
    h, w = batch.shape[-2:]
    if h < need or w < need:
        raise ValueError(f"{owner}: a {crop_size}x{crop_size} crop with jitter up to {max_jitter} px "
                         f"needs images of at least {need}x{need} pixels, got {h}x{w} "
                         f"(batch shape {tuple(batch.shape)})")


def _check_shifts(owner: str, shifts: Tensor, max_jitter: int) -> None:
    """Shifts beyond the jitter range would read outside the image (checked when on the CPU)."""
    if shifts.device.type == "cpu" and shifts.numel() and int(shifts.abs().max()) > max_jitter:
        raise ValueError(f"{owner}: shifts must lie in [-{max_jitter}, {max_jitter}], "
                         f"got up to {int(shifts.abs().max())}")


class JitterCrop(Augmentation):
    """Random jitter and crop (Section 2, "Random jitter & crop").

    Two integers ~ U{-max_jitter, ..., max_jitter} (inclusive) move the crop centre
    ``H // 2`` along each axis, then a ``crop_size x crop_size`` crop is taken (authors' loader:
    centre ``107 // 2 + randint(-7, 7)``, rows ``c - 32 .. c + 31``). Exact integer indexing.

    crop_size: side of the crop the network sees (Section 2 and Appendix A: 64).
    max_jitter: largest shift of the centre per axis, pixels (Section 2: 7).
    """

    def __init__(self, *, crop_size: int = CROP_SIZE, max_jitter: int = MAX_JITTER):
        if crop_size < 1 or max_jitter < 0:
            raise ValueError(f"JitterCrop: need crop_size >= 1 and max_jitter >= 0, "
                             f"got {crop_size} and {max_jitter}")
        self.crop_size = int(crop_size)
        self.max_jitter = int(max_jitter)

    n_uniform = 2

    def from_uniform(self, u: np.ndarray, generator: torch.Generator | None = None) -> JitterParams:
        values = 2 * self.max_jitter + 1                     # u in [0, 1): floor(u * 15) in 0..14
        shifts = np.floor(u[:, :2] * values).astype(np.int64) - self.max_jitter
        return JitterParams(shifts=torch.from_numpy(shifts))                            # (B, 2)

    def apply(self, batch: Tensor, params: JitterParams) -> Tensor:
        _check_batch("JitterCrop", batch)
        _check_params_batch("JitterCrop", batch, params.shifts.shape[0])
        _check_crop_fits("JitterCrop", batch, self.crop_size, self.max_jitter)
        _check_shifts("JitterCrop", params.shifts, self.max_jitter)
        return rotate_crop(batch, None, params.shifts, self.crop_size)            # (B, 5, S, S)


class CenterCrop:
    """The evaluation crop: rows and columns ``H // 2 - 32 .. H // 2 + 31`` (21..84 for 107).

    crop_size: side of the crop (Section 2 and Appendix A: 64).
    """

    def __init__(self, *, crop_size: int = CROP_SIZE):
        if crop_size < 1:
            raise ValueError(f"CenterCrop: crop_size must be >= 1, got {crop_size}")
        self.crop_size = int(crop_size)

    def __call__(self, batch: Tensor) -> Tensor:
        _check_batch("CenterCrop", batch)
        _check_crop_fits("CenterCrop", batch, self.crop_size, 0)
        h, w = batch.shape[-2:]
        top, left = _crop_origin(h, self.crop_size), _crop_origin(w, self.crop_size)
        return batch[..., top:top + self.crop_size, left:left + self.crop_size].contiguous()

    def __repr__(self) -> str:
        return f"CenterCrop(crop_size={self.crop_size})"


# ----------------------------------------------------------------------------- noise
@dataclass
class NoiseParams:
    """level: the U(1, 3) scalar per image, shape (B,). seed: the seed from which ``apply`` draws
    the noise field on the batch's device, so that ``apply`` is exactly repeatable."""

    level: Tensor
    seed: int


def _cpu_map(fn, tasks: Sequence) -> None:
    """``fn`` on each task, in the threads of :func:`_cpu_pool` (in turn with one torch thread
    or one task)."""
    pool = _cpu_pool() if len(tasks) > 1 else None
    if pool is None:
        for task in tasks:
            fn(task)
    else:
        list(pool.map(fn, tasks))


def _cpu_pool() -> ThreadPoolExecutor | None:
    """Threads for the CPU's noise and compiled kernel (one per torch thread), made per process
    (a pool does not survive a fork into DataLoader workers); None with a single torch thread."""
    global _POOL
    n = torch.get_num_threads()
    if n < 2:
        return None
    if _POOL is None or _POOL[0] != os.getpid() or _POOL[1] != n:
        _POOL = (os.getpid(), n, ThreadPoolExecutor(max_workers=n, thread_name_prefix="sdsscl-cpu"))
    return _POOL[2]


def _noise_field(shape: tuple[int, ...], seed: int, device: torch.device, out: Tensor | None = None) -> Tensor:
    """A standard normal field ``shape = (B, ...)`` determined by ``seed`` and the device, drawn
    in float32 (into ``out`` if given: a contiguous tensor of that shape, any float dtype).

    On the CPU, each group of ``_NOISE_GROUP`` images has its own generator (seeded from ``seed``
    and the group's first index), so groups are drawn in parallel threads and the field does not
    depend on the number of threads. On other devices, one device generator draws the field.
    """
    if out is not None and out.dtype != torch.float32:
        out.copy_(_noise_field(shape, seed, device))
        return out
    if device.type != "cpu":
        gens = getattr(_SCRATCH, "generators", None)
        if gens is None:
            gens = _SCRATCH.generators = {}
        gen = gens.get(device)                         # one per device and thread, re-seeded:
        if gen is None:                                # the same stream as a fresh generator
            gen = gens[device] = torch.Generator(device=device)
        gen.manual_seed(seed)
        if out is None:
            return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        return torch.randn(shape, generator=gen, out=out)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    _cpu_map(lambda start: _noise_group(seed, out, start), range(0, shape[0], _NOISE_GROUP))
    return out


def _noise_group(seed: int, out: Tensor, start: int) -> None:
    """Images ``start : start + _NOISE_GROUP`` of the CPU field ``out`` of ``seed``, from their own
    generator (seeded from ``seed`` and ``start``), drawn in float32 whatever ``out``'s dtype."""
    gen = torch.Generator()
    gen.manual_seed((seed + start * 0x9E3779B97F4A7C15) % 2**63)
    part = out[start:start + _NOISE_GROUP]
    if part.dtype == torch.float32:
        part.normal_(generator=gen)
    else:
        part.copy_(torch.empty(part.shape).normal_(generator=gen))


class GaussianNoise(Augmentation):
    """Gaussian noise (Section 2, "Gaussian noise").

    A scalar ``a ~ U(min_level, max_level)`` per image times the training set's per-band median
    absolute deviation gives the per-band standard deviation ``gamma_c = a * MAD_c``; pixel noise
    ``N(0, gamma_c)`` is added, independent per pixel and band.

    mad: per-band MAD of the training images (length 5, >= 0, nanomaggies), computed by the
        data layer (Section 2: "pre-computed over all training examples").
    min_level, max_level: the uniform range of the scalar (Section 2: U(1, 3)).
    """

    def __init__(self, mad: Sequence[float] | Tensor, *, min_level: float = 1.0, max_level: float = 3.0):
        mad_t = torch.as_tensor(mad, dtype=torch.float64).detach().cpu()
        if mad_t.shape != (N_BANDS,):
            raise ValueError(f"GaussianNoise: expected a per-band MAD of shape ({N_BANDS},) (ugriz), "
                             f"got shape {tuple(mad_t.shape)}")
        if not bool(torch.isfinite(mad_t).all()) or bool((mad_t < 0).any()):
            raise ValueError(f"GaussianNoise: the MAD must be finite and >= 0, got {mad_t.tolist()}")
        if not 0 <= min_level <= max_level:
            raise ValueError(f"GaussianNoise: need 0 <= min_level <= max_level, got {min_level}, {max_level}")
        self.mad = tuple(mad_t.tolist())
        self.min_level = float(min_level)
        self.max_level = float(max_level)

    def from_uniform(self, u: np.ndarray, generator: torch.Generator | None = None) -> NoiseParams:
        """The levels from ``u``; the field's seed is the generator's next draw (after ``u``)."""
        level = self.min_level + (self.max_level - self.min_level) * u[:, 0]                # (B,)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return NoiseParams(level=_float32(level), seed=seed)

    def scale(self, level: Tensor, like: Tensor) -> Tensor:
        """Noise standard deviation gamma per image and band, shape (B, 5)."""
        mad = _band_constant(self.mad, like)                                                # (5,)
        return level.to(mad.dtype)[:, None] * mad[None, :]                                  # (B, 5)

    def add(self, batch: Tensor, params: NoiseParams, band_factor: Tensor | None = None) -> Tensor:
        """``batch * band_factor + noise`` in one pass; ``band_factor`` (B, 5) or None."""
        x = batch.to(_compute_dtype(batch.dtype))
        # The field is drawn in float32 whatever the batch's dtype, so a seed gives the same
        # noise in every precision.
        noise = _noise_field(tuple(x.shape), params.seed, x.device).to(x.dtype)  # (B, 5, H, W)
        noise.mul_(self.scale(params.level, x)[:, :, None, None])
        if band_factor is None:
            noise.add_(x)
        else:
            noise.addcmul_(x, band_factor.to(x.dtype)[:, :, None, None])
        return noise.to(batch.dtype)

    def apply(self, batch: Tensor, params: NoiseParams) -> Tensor:
        _check_batch("GaussianNoise", batch)
        _check_params_batch("GaussianNoise", batch, params.level.shape[0])
        return self.add(batch, params)


# ----------------------------------------------------------------------------- composition
@dataclass
class AugmentationParams:
    """The parameters of one pipeline view; None for the augmentations not in use.

    ``AugmentationPipeline.sample`` also attaches what ``apply`` derives from them (the sampling
    maps, the band factors, the PSF kernels), computed on the CPU where they were drawn and moved
    to the device together with them. Treat drawn parameters as read-only: to change one, assign
    a new parameter object (``params.rotate = RotationParams(angle=...)``); ``apply`` then derives
    afresh what depends on it.
    """

    reddening: ReddeningParams | None = None
    psf: PSFParams | None = None
    rotate: RotationParams | None = None
    jitter_crop: JitterParams | None = None
    noise: NoiseParams | None = None
    plan: _ViewPlan | None = field(default=None, repr=False, compare=False)
    #: Both MoCo views drawn as one (``TwoViews.sample``): this view's half of ``joint``.
    joint: AugmentationParams | None = field(default=None, repr=False, compare=False)


@dataclass
class _ViewPlan:
    """What ``AugmentationPipeline.apply`` needs beyond the images, for ``size = (H, W)`` inputs
    computed in ``dtype``: affine (B, 2, 3) float64 sampling maps (None without rotation), factor
    (B, 5, 1, 1) reddening flux factors, gamma (B, 5, 1, 1) noise standard deviations, kernels
    (B, 5, 2R+1) float64 PSF kernels and their half-width R. ``sources`` are the parameter
    objects it was derived from."""

    sources: tuple
    size: tuple[int, int]
    dtype: torch.dtype
    affine: Tensor | None = None
    factor: Tensor | None = None
    gamma: Tensor | None = None
    kernels: Tensor | None = None
    radius: int = 0

    def on(self, device: torch.device) -> _ViewPlan:
        """This plan with its tensors on ``device`` (itself if they are there already), moved in
        one copy."""
        names = [k for k in ("affine", "factor", "gamma", "kernels") if getattr(self, k) is not None]
        tensors = [getattr(self, k) for k in names]
        if all(t.device == device for t in tensors):
            return self
        return _clone(self, **dict(zip(names, _pack_to(tensors, device))))


def _sources(params: AugmentationParams) -> tuple:
    return (params.reddening, params.psf, params.rotate, params.jitter_crop, params.noise)


def _plan_matches(params: AugmentationParams) -> bool:
    """Whether the attached plan was derived from these very parameter objects."""
    return params.plan is not None and all(a is b for a, b in zip(params.plan.sources, _sources(params)))


def _move_params(views: list[AugmentationParams], device: torch.device | str) -> list[AugmentationParams]:
    """:func:`_move_to` for view parameters, keeping each valid plan linked to the moved objects."""
    valid = [_plan_matches(p) for p in views]
    moved = _move_to(views, device)
    for new, old, ok in zip(moved, views, valid):
        if ok and new is not old:
            new.plan.sources = _sources(new)
    return moved


def _clone(obj, **changes):
    """A shallow copy of a (dataclass) object with some attributes changed, without running
    ``__init__`` (far cheaper than ``copy.copy`` or ``dataclasses.replace``; runs per batch)."""
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    new.__dict__.update(changes)
    return new


def _half(joint: AugmentationParams, rows: slice) -> AugmentationParams:
    """The parameters (and plan) of images ``rows`` of a joint draw: views of its tensors."""
    half = AugmentationParams(joint=joint)
    for name in AUGMENTATIONS:
        p = getattr(joint, name)
        if p is not None:
            setattr(half, name, _clone(p, **{k: v[rows] for k, v in vars(p).items() if isinstance(v, Tensor)}))
    if _plan_matches(joint):
        plan = joint.plan
        half.plan = _clone(plan, sources=_sources(half),
                           **{k: v[rows] for k, v in vars(plan).items() if isinstance(v, Tensor)})
    return half


def _move_to(objects: list, device: torch.device | str) -> list:
    """Copies of the dataclass objects (nested ones included) with every tensor on ``device``.

    All tensors travel in one host-to-device copy (pinned and non-blocking on CUDA) instead of
    one per parameter, and become views of it on the device. Kept lean: it runs for every
    batch, and on a GPU its host time is what limits small batches.
    """
    device = torch.device(device)
    slots: list[tuple[object, str, Tensor]] = []            # (owner, attribute, tensor)

    def collect(obj) -> None:
        for name, value in vars(obj).items():
            if isinstance(value, Tensor):
                slots.append((obj, name, value))
            elif hasattr(value, "__dataclass_fields__"):
                collect(value)

    for obj in objects:
        collect(obj)
    if all(t.device == device for _, _, t in slots):
        return objects
    moved = _pack_to([t for _, _, t in slots], device)
    copies: dict[int, object] = {}

    def rebuild(obj):
        new = copies.get(id(obj))
        if new is None:
            new = copies[id(obj)] = _clone(obj)
            for name, value in vars(obj).items():
                if hasattr(value, "__dataclass_fields__") and not isinstance(value, type):
                    setattr(new, name, rebuild(value))
        return new

    out = [rebuild(obj) for obj in objects]
    for (owner, name, _), t in zip(slots, moved):
        setattr(copies[id(owner)], name, t)
    return out


def _pack_to(tensors: list[Tensor], device: torch.device) -> list[Tensor]:
    """The tensors on ``device`` in one host-to-device copy: one staging buffer of bytes (pinned
    for CUDA), tensors grouped by dtype at 8-byte-aligned offsets, filled through numpy (cheap on
    the host), one copy, then views on the device."""
    leaves = [t.float() if device.type == "mps" and t.dtype == torch.float64 else t  # no float64 on MPS
              for t in tensors]
    groups: dict[torch.dtype, list[int]] = {}
    for k, t in enumerate(leaves):
        groups.setdefault(t.dtype, []).append(k)
    layout, total = [], 0                # per dtype: (dtype, byte offset, item size, count, items)
    for dtype, ks in groups.items():
        size, items, count = leaves[ks[0]].element_size(), [], 0
        for k in ks:                                        # (leaf, first element, end)
            items.append((k, count, count + leaves[k].numel()))
            count += leaves[k].numel()
        layout.append((dtype, total, size, count, items))
        total += -(-count * size // 8) * 8
    staging = torch.empty(total, dtype=torch.uint8, pin_memory=device.type == "cuda")
    raw = staging.numpy()
    for _, offset, size, count, items in layout:
        typed = raw[offset:offset + count * size].view(_numpy(leaves[items[0][0]]).dtype)
        for k, start, stop in items:
            typed[start:stop] = _numpy(leaves[k]).reshape(-1)
    on_device = staging.to(device, non_blocking=device.type == "cuda")
    moved: list[Tensor] = [None] * len(leaves)  # type: ignore[list-item]
    for dtype, offset, size, count, items in layout:
        typed = on_device[offset:offset + count * size].view(dtype)
        for k, start, stop in items:
            part = typed[start:stop]
            moved[k] = part if leaves[k].ndim == 1 else part.view(leaves[k].shape)
    return moved


# ----------------------------------------------------------------------------- CPU kernel
class _CpuPlan(NamedTuple):
    """What the compiled CPU kernel (:func:`sdsscl._cpu_views.views`) takes per view: numpy
    tables of B views."""

    src: np.ndarray         # (B,) int64: the image of each view
    pos: np.ndarray         # (B, 2, 3) float64: output pixel (j, i, 1) -> image (x, y); without
                            # rotation only the crop's integer corner (x, y) = pos[:, :, 2] is used
    rotated: bool
    taps: np.ndarray        # (B, 5, 2R + 1) PSF kernels cut to each view's half-width (R = 0: none)
    radii: np.ndarray       # (B,) int64: those half-widths
    factor: np.ndarray      # (B, 5): reddening flux factors (ones without)
    gamma: np.ndarray       # (B, 5): noise standard deviations (zeros without)
    noise: bool             # the output holds a noise field to scale by gamma

    def rows(self, rows: slice) -> _CpuPlan:
        """The tables of views ``rows``."""
        return self._replace(src=self.src[rows], pos=self.pos[rows], taps=self.taps[rows],
                             radii=self.radii[rows], factor=self.factor[rows], gamma=self.gamma[rows])


def _cut_kernels(kernels: Tensor, tail: float, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Kernels (B, 5, 2R + 1) cut per image to the half-width that leaves at most ``tail`` of its
    widest band's kernel outside and renormalised (in float64): the taps in ``dtype`` and the
    half-widths (B,). An image of the batch's widest PSF keeps R; the narrow ones, which the
    half-normal draws mostly are, are blurred with fewer taps."""
    k = _numpy(kernels).astype(np.float64)                                   # (B, 5, 2R + 1)
    r = (k.shape[-1] - 1) // 2
    inside = np.concatenate([k[..., r:r + 1], k[..., r:r + 1] + 2 * np.cumsum(k[..., r + 1:], axis=-1)], axis=-1)
    radii = ((1.0 - inside) > tail).sum(axis=-1).max(axis=-1)                # (B,)
    k = np.where(np.abs(np.arange(-r, r + 1)) <= radii[:, None, None], k, 0.0)
    k /= k.sum(axis=-1, keepdims=True)
    return k.astype(_numpy_dtype(dtype)), radii.astype(np.int64)


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def _cpu_tables(n: int, copies: int, pos: np.ndarray, rotated: bool, kernels: Tensor | None, tail: float,
                factor: Tensor | None, gamma: Tensor | None, dtype: torch.dtype) -> _CpuPlan:
    """A :class:`_CpuPlan` for ``copies`` stacked copies of n images, from the sampling maps or
    crop corners ``pos`` and the plan's PSF kernels (None: no blur), reddening factors and noise
    levels (None: without), for a kernel computing in ``dtype``."""
    b, np_dtype = copies * n, _numpy_dtype(dtype)
    if kernels is not None:
        taps, radii = _cut_kernels(kernels, tail, dtype)
    else:
        taps, radii = np.ones((b, N_BANDS, 1), dtype=np_dtype), np.zeros(b, dtype=np.int64)
    factor = np.ones((b, N_BANDS), np_dtype) if factor is None else _numpy(factor).reshape(b, N_BANDS).astype(np_dtype)
    scale = np.zeros((b, N_BANDS), np_dtype) if gamma is None else _numpy(gamma).reshape(b, N_BANDS).astype(np_dtype)
    return _CpuPlan(np.arange(b) % n, pos, rotated, taps, radii, factor, scale, gamma is not None)


def _cpu_pass(x: Tensor, jobs: Sequence[tuple[_CpuPlan, Tensor, int | None]]) -> None:
    """Run the compiled CPU kernel for each job ``(plan, out, seed)``: the views of the images
    ``x`` (N, 5, H, W) (float32 or float64) into ``out`` (B, 5, Ho, Wo) (contiguous, x's dtype).
    With a seed, ``out`` first gets that seed's noise field (:func:`_noise_field`'s, group by
    group). The work is split by noise group (_NOISE_GROUP views: the group's noise, then its
    views, while both are in cache), all the jobs' groups in one pass over the threads of
    :func:`_cpu_pool`. The kernel is compiled (numba) the first time a process uses it and
    cached on disk."""
    from . import _cpu_views

    xn = _numpy(x.contiguous())

    def run(task: tuple[_CpuPlan, Tensor, int | None, int]) -> None:
        plan, out, seed, start = task
        if seed is not None:
            _noise_group(seed, out, start)
        _cpu_views.views(xn, plan.src, plan.pos, plan.rotated, plan.taps, plan.radii, plan.factor,
                         plan.gamma, plan.noise, out.numpy(), start, min(start + _NOISE_GROUP, out.shape[0]))

    _cpu_map(run, [(plan, out, seed, start) for plan, out, seed in jobs
                   for start in range(0, out.shape[0], _NOISE_GROUP)])


class AugmentationPipeline:
    """One view: the named augmentations, in the paper's order, always ending in a 64x64 crop.

    Order: reddening -> psf -> rotate + jitter_crop (fused) -> noise (see the module docstring
    for why). Without "jitter_crop" the centre crop is used, fused with the rotation if any.

    names: any subset of ``AUGMENTATIONS`` = ("reddening", "psf", "rotate", "jitter_crop",
        "noise"), in any order (default: the paper's best set, all but "psf", Appendix D).
    mad: per-band MAD of the training set (length 5, nmgy); required when "noise" is used.
    max_ebv: E(B-V) ~ U(0, max_ebv) (Section 2: 0.5).
    psf_sigma_r_arcsec: r-band PSF sigma ~ |N(0, psf_sigma_r_arcsec)| (Section 2: 0.13").
    psf_wavelength_power: PSF sigma ~ lambda**power (Section 2, Xin et al. 2018: -0.3).
    crop_size: side of the output (Section 2: 64).
    max_jitter: crop-centre shift ~ U{-max_jitter..max_jitter} per axis (Section 2: 7).
    noise_scale_min, noise_scale_max: the noise scalar ~ U(min, max) that multiplies the MAD
        (Section 2: 1, 3).
    (The keyword names are those of ``sdsscl.config.AugmentConfig``.)
    """

    def __init__(self, names: Sequence[str] = BEST_AUGMENTATIONS, *,
                 mad: Sequence[float] | Tensor | None = None,
                 max_ebv: float = 0.5,
                 psf_sigma_r_arcsec: float = 0.13,
                 psf_wavelength_power: float = -0.3,
                 crop_size: int = CROP_SIZE,
                 max_jitter: int = MAX_JITTER,
                 noise_scale_min: float = 1.0,
                 noise_scale_max: float = 3.0):
        if isinstance(names, str):
            names = (names,)
        unknown = [n for n in names if n not in AUGMENTATIONS]
        if unknown:
            raise ValueError(f"AugmentationPipeline: unknown augmentation name(s) {unknown}; "
                             f"valid names are {list(AUGMENTATIONS)}")
        if len(set(names)) != len(names):
            raise ValueError(f"AugmentationPipeline: repeated augmentation names in {list(names)}")
        if "noise" in names and mad is None:
            raise ValueError("AugmentationPipeline: 'noise' needs the training set's per-band MAD "
                             "(mad=..., length 5)")
        self.names: tuple[str, ...] = tuple(n for n in AUGMENTATIONS if n in names)  # paper order
        self.crop_size = int(crop_size)
        self.reddening = GalacticReddening(max_ebv=max_ebv) if "reddening" in names else None
        self.psf = (PSFBlur(sigma_r_arcsec=psf_sigma_r_arcsec, wavelength_exponent=psf_wavelength_power)
                    if "psf" in names else None)
        self.rotate = RandomRotate() if "rotate" in names else None
        self.jitter_crop = (JitterCrop(crop_size=crop_size, max_jitter=max_jitter)
                            if "jitter_crop" in names else None)
        self.noise = (GaussianNoise(mad, min_level=noise_scale_min, max_level=noise_scale_max)
                      if "noise" in names else None)

    def sample(self, batch_size: int, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu", image_size: int | tuple[int, int] = CUTOUT_SIZE
               ) -> AugmentationParams:
        """Draw every active augmentation's parameters, in pipeline order, from ``generator``.

        What ``apply`` derives from them for ``image_size`` inputs (default: the 107-pixel
        cutouts) is computed here on the CPU and travels to ``device`` with them in one copy per
        dtype, so that ``apply`` on a GPU is a handful of kernels. Other image sizes work too;
        ``apply`` then derives it on the device.
        """
        return _move_params([self._draw(batch_size, generator, image_size)], device)[0]

    def _draw(self, batch_size: int, generator: torch.Generator | None,
              image_size: int | tuple[int, int]) -> AugmentationParams:
        """Parameters and their plan, on the CPU."""
        _check_generator("AugmentationPipeline", generator)
        augs = [getattr(self, name) for name in self.names]
        widths = [aug.n_uniform for aug in augs]
        u = torch.rand(batch_size, sum(widths), generator=generator, dtype=torch.float64).numpy()
        params, start = AugmentationParams(), 0
        for name, aug, k in zip(self.names, augs, widths):     # columns in pipeline order
            setattr(params, name, aug.from_uniform(u[:, start:start + k], generator))
            start += k
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        params.plan = self._derive(params, int(h), int(w), torch.float32)
        return params

    def _derive(self, params: AugmentationParams, h: int, w: int, dtype: torch.dtype) -> _ViewPlan:
        """The view's plan for (h, w) images computed in ``dtype``, on the CPU (numpy: a few
        dozen operations on B numbers each, which as torch operations would cost more host time
        than the whole resampling on a GPU). Parameters made by hand on a GPU are read back
        first, a synchronisation that ``sample``'s own parameters never need."""
        plan = _ViewPlan(sources=_sources(params), size=(h, w), dtype=dtype)
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        if self.rotate is not None:
            out_h, out_w, top0, left0 = _crop_geometry(h, w, self.crop_size)
            angle = _numpy(params.rotate.angle)
            shifts = _numpy(params.jitter_crop.shifts) if self.jitter_crop else np.zeros((len(angle), 2))
            plan.affine = torch.from_numpy(_affine(angle, shifts[:, 0], shifts[:, 1], h, w,
                                                   out_h, out_w, top0, left0))                # (B, 2, 3)
        if self.reddening is not None:
            factor = _flux_factors(_numpy(params.reddening.ebv).astype(np.float64),
                                   np.asarray(self.reddening.coefficients))
            plan.factor = torch.from_numpy(factor.astype(np_dtype)[:, :, None, None])      # (B, 5, 1, 1)
        if self.noise is not None:
            gamma = np.outer(_numpy(params.noise.level), self.noise.mad)
            plan.gamma = torch.from_numpy(gamma.astype(np_dtype)[:, :, None, None])        # (B, 5, 1, 1)
        if self.psf is not None:
            plan.kernels, plan.radius = self.psf.kernels(params.psf)                        # (B, 5, K)
        return plan

    def _device_plan(self, n: int, h: int, w: int, dtype: torch.dtype,
                     generator: torch.Generator) -> tuple[_ViewPlan, Tensor | None]:
        """Parameters for ``n`` images drawn on the generator's device, and their plan, with torch
        operations only: the distributions of ``sample`` (the same uniform columns, mapped the
        same way and rounded to float32 the same way), for ``TwoViews`` called with a generator
        on a GPU. Returns the plan and the jitter shifts (n, 2) (None without jitter). Without
        the PSF nothing is read back to the host, so a CUDA graph can capture it; the PSF's
        kernel half-width needs one read-back."""
        widths = [getattr(self, name).n_uniform for name in self.names]
        u = torch.rand(n, sum(widths), generator=generator, device=generator.device, dtype=torch.float64)
        device = u.device       # indexed ("cuda:0"), so the cached constants are those a graph keeps
        cols = dict(zip(self.names, torch.split(u, widths, dim=1)))                 # (n, k) each
        plan = _ViewPlan(sources=(), size=(h, w), dtype=dtype)
        shifts = None
        if self.jitter_crop is not None:
            m = self.jitter_crop.max_jitter
            shifts = torch.floor(cols["jitter_crop"] * (2 * m + 1)).long() - m              # (n, 2)
        if self.rotate is not None:
            out_h, out_w, top0, left0 = _crop_geometry(h, w, self.crop_size)
            angle = (cols["rotate"][:, 0] * self.rotate.max_angle).float().double()          # (n,)
            d = shifts.double() if shifts is not None else torch.zeros(n, 2, device=device, dtype=torch.float64)
            plan.affine = _affine(angle, d[:, 0], d[:, 1], h, w, out_h, out_w, top0, left0)  # (n, 2, 3)
        if self.reddening is not None:
            ebv = (cols["reddening"][:, 0] * self.reddening.max_ebv).float().double()        # (n,)
            coeff = _constant(self.reddening.coefficients, device, torch.float64)
            plan.factor = _flux_factors(ebv, coeff).to(dtype)[:, :, None, None]              # (n, 5, 1, 1)
        if self.noise is not None:
            lo, hi = self.noise.min_level, self.noise.max_level
            level = (lo + (hi - lo) * cols["noise"][:, 0]).float().double()                  # (n,)
            mad = _constant(self.noise.mad, device, torch.float64)
            plan.gamma = (level[:, None] * mad[None, :]).to(dtype)[:, :, None, None]         # (n, 5, 1, 1)
        if self.psf is not None:
            scale = self.psf.sigma_r_arcsec * math.sqrt(2.0)
            sigma_r = (scale * torch.special.erfinv(cols["psf"][:, 0])).float()              # (n,) arcsec
            plan.kernels, plan.radius = self.psf.kernels(PSFParams(sigma_r=sigma_r))
        return plan, shifts

    def _plan_for(self, params: AugmentationParams, batch: Tensor) -> _ViewPlan:
        """The attached plan if it was made from these parameter objects for this image size and
        precision; otherwise one derived now."""
        h, w = batch.shape[-2:]
        plan = params.plan
        if _plan_matches(params) and plan.size == (h, w) and plan.dtype == _compute_dtype(batch.dtype):
            return plan
        dtype = _compute_dtype(batch.dtype)
        return self._derive(params, h, w, dtype)

    def apply(self, batch: Tensor, params: AugmentationParams) -> Tensor:
        """(B, 5, H, W) -> (B, 5, crop_size, crop_size).

        Blur, one resampling for rotation and crop, then ``out = noise * gamma + crop *
        reddening`` in place in the noise field (see ``_run``). The result equals the steps
        applied one by one in the documented order, to float rounding.
        """
        self._check_apply(batch, params)
        if batch.shape[0] == 0:
            return batch.new_empty(0, batch.shape[1], self.crop_size, self.crop_size)
        return self._run(*self._job_for(batch, params)).to(batch.dtype)

    def _check_apply(self, batch: Tensor, params: AugmentationParams) -> None:
        _check_batch("AugmentationPipeline", batch)
        _check_crop_fits("AugmentationPipeline", batch, self.crop_size,
                         self.jitter_crop.max_jitter if self.jitter_crop else 0)
        for name in self.names:
            p = getattr(params, name)
            if p is None:
                raise ValueError(f"AugmentationPipeline: no parameters for {name!r}; draw them with sample()")
            first = next(iter(vars(p).values()))
            _check_params_batch("AugmentationPipeline", batch, first.shape[0])

    def _job_for(self, batch: Tensor, params: AugmentationParams) -> tuple:
        """The arguments of ``_run`` for a checked batch and its parameters: the batch in its
        compute precision, the plan on its device, the noise seeds and the shifts."""
        x = batch.to(_compute_dtype(batch.dtype))
        if self.jitter_crop is not None:
            _check_shifts("AugmentationPipeline", params.jitter_crop.shifts, self.jitter_crop.max_jitter)
        plan = self._plan_for(params, x).on(x.device)
        seeds = [params.noise.seed] if self.noise is not None else []
        shifts = params.jitter_crop.shifts if self.jitter_crop is not None else None
        return x, plan, seeds, shifts

    def _cpu_plan(self, plan: _ViewPlan, shifts: Tensor | None, n: int, copies: int,
                  size: tuple[int, int], dtype: torch.dtype) -> _CpuPlan:
        """The compiled CPU kernel's tables for ``copies`` stacked copies of n images of ``size``
        in ``dtype`` (the plan and shifts are for all of them)."""
        h, w = size
        b = copies * n
        _, _, top0, left0 = _crop_geometry(h, w, self.crop_size)
        pos = np.zeros((b, 2, 3))
        if plan.affine is not None:           # normalised frame coordinates -> image pixels
            _, half, pad_y, pad_x = _frame_geometry(h, w)
            pos[:] = _numpy(plan.affine) * half                           # exact: half = 2**k
            pos[:, 0, 2] += half - pad_x
            pos[:, 1, 2] += half - pad_y
        else:
            dy, dx = (_numpy(t).astype(np.int64) for t in _split_shifts(shifts, b, torch.device("cpu")))
            pos[:, 0, 2], pos[:, 1, 2] = left0 + dx, top0 + dy
        return _cpu_tables(n, copies, pos, plan.affine is not None, plan.kernels if plan.radius > 0 else None,
                           self.psf.tail if self.psf else 0.0, plan.factor, plan.gamma, dtype)

    def _run(self, x: Tensor, plan: _ViewPlan, seeds: Sequence[int], shifts: Tensor | None,
             copies: int = 1, noise_generator: torch.Generator | None = None,
             frame_buffer: Tensor | None = None, out: Tensor | None = None) -> Tensor:
        """The views of ``copies`` stacked copies of ``x`` (n, 5, H, W) with a plan (and shifts)
        for ``copies * n`` images and one noise seed per copy: (copies * n, 5, S, S) in x's
        dtype. ``noise_generator``: a generator on x's device that draws the whole noise field
        instead of the seeds (parameters drawn on the device); ``frame_buffer``: a zero frame
        to use instead of the per-thread one (a CUDA graph owns its own); ``out``: the
        destination, already holding the noise field (``seeds`` empty).

        On the CPU, the compiled kernel (:func:`_cpu_pass`). Elsewhere, whole-batch kernels:
        blur (two depthwise convolutions), place in a zero frame, one resampling for rotation
        and crop (or the integer crop), then ``out = noise * gamma + crop * reddening`` in
        place in the noise field.
        """
        n1, c, h, w = x.shape
        b, device, s = copies * n1, x.device, self.crop_size
        out_h, out_w, top0, left0 = _crop_geometry(h, w, s)
        if out is None:
            out = x.new_empty(b, c, s, s)                                           # (B, 5, S, S)
        if noise_generator is not None and plan.gamma is not None:   # all copies, from the device
            if out.dtype == torch.float32:
                torch.randn(out.shape, generator=noise_generator, out=out)
            else:                                         # drawn in float32 in every precision
                out.copy_(torch.randn(out.shape, generator=noise_generator, device=device, dtype=torch.float32))
        if device.type == "cpu":
            job = self._cpu_plan(plan, shifts, n1, copies, (h, w), x.dtype)
            _cpu_pass(x, [(job.rows(slice(k * n1, (k + 1) * n1)), out[k * n1:(k + 1) * n1],
                           seeds[k] if seeds else None) for k in range(copies)])
            return out
        for k, seed in enumerate(seeds):                  # the same field GaussianNoise.apply draws
            _noise_field((n1, c, s, s), seed, device, out=out[k * n1:(k + 1) * n1])
        radius = plan.radius
        if copies > 1 and radius == 0 and plan.affine is not None:
            # Rotation without blur: every copy resamples the same framed image, so the batch
            # goes into the frame once and each image's copies are one taller grid.
            frame = _Frame(n1, h, w, device, x.dtype, buffer=frame_buffer)
            inside = frame.inside(n1)
            if x.data_ptr() != inside.data_ptr() or x.stride() != inside.stride():
                inside.copy_(x)                           # (a CUDA graph's input is the frame itself)
            crop = frame.resample(_sampling_grid(plan.affine, out_h, out_w, x.dtype, copies))  # (n1, 5, copies * S, S)
            crop = crop.view(n1, c, copies, s, s).permute(2, 0, 1, 3, 4)   # (copies, n1, 5, S, S)
            _finish(out.view(copies, n1, c, s, s), crop, *(
                None if t is None else t.view(copies, n1, c, 1, 1) for t in (plan.factor, plan.gamma)))
            return out
        if copies > 1:
            x = x.repeat(copies, 1, 1, 1)                                          # (B, 5, H, W)
        if radius > 0:
            k = plan.kernels.to(x.dtype).reshape(b * c, -1)
            x = _blur_conv(x.reshape(b * c, h, w), k).view(b, c, h, w)
        if plan.affine is not None:
            frame = _Frame(b, h, w, device, x.dtype, buffer=frame_buffer)
            frame.inside(b).copy_(x)
            crop = frame.resample(_sampling_grid(plan.affine, out_h, out_w, x.dtype))   # (B, 5, S, S)
        else:
            dy, dx = _split_shifts(shifts, b, device)
            crop = _integer_crop(x, top0 + dy, left0 + dx, s)                            # (B, 5, S, S)
        _finish(out, crop, plan.factor, plan.gamma)
        return out

    def __call__(self, batch: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch("AugmentationPipeline", batch)
        return self.apply(batch, self.sample(batch.shape[0], generator, device=batch.device,
                                             image_size=tuple(batch.shape[-2:])))

    def __repr__(self) -> str:
        return f"AugmentationPipeline(names={list(self.names)}, crop_size={self.crop_size})"


def _finish(out: Tensor, crop: Tensor, factor: Tensor | None, gamma: Tensor | None) -> None:
    """Reddening (a per-band factor: it commutes with the linear steps before it), then noise:
    ``out = noise * gamma + crop * factor`` in place in the noise field ``out`` (``factor`` and
    ``gamma`` broadcast over the pixels; ``out`` holds no noise field and may be ``crop`` itself
    without noise)."""
    if gamma is not None:
        if factor is not None:
            out.mul_(gamma)
            out.addcmul_(crop, factor)
        else:
            torch.addcmul(crop, out, gamma, out=out)                    # crop + noise * gamma
    elif factor is not None:
        torch.mul(crop, factor, out=out)
    elif crop is not out:
        out.copy_(crop)


class TwoViews:
    """The query and key views of MoCo: the same pipeline applied twice with independent draws.

    pipeline: the single-view pipeline (e.g. ``AugmentationPipeline(BEST_AUGMENTATIONS, mad=...)``).
    cuda_graphs: when called with a generator on a CUDA device, replay each batch shape's call as
        a CUDA graph (see ``__call__``); False runs the same operations one by one.

    Two ways to draw, with the same distributions:

    * with a CPU generator (or None: torch's global one), the parameters are drawn on the CPU,
      so a seed gives the same views on every device, and ``apply(batch, sample(...))``
      reproduces a call;
    * with a generator on the batch's GPU (``torch.Generator(device="cuda")``), they are drawn
      there, with no host work per call beyond launching kernels (one CUDA graph for batches
      of up to 512 images): the fast path for small batches, where drawing on the host limits
      a GPU. A seed then gives the same views on that kind of GPU only, and only the
      generator's state reproduces a call. The training loop draws on the CPU (resumable,
      device-independent); its batches keep a GPU busy far longer than either way of drawing.
    """

    def __init__(self, pipeline: AugmentationPipeline, *, cuda_graphs: bool = True):
        self.pipeline = pipeline
        self.cuda_graphs = bool(cuda_graphs)
        self._graphs: dict = {}

    def sample(self, batch_size: int, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu", image_size: int | tuple[int, int] = CUTOUT_SIZE
               ) -> tuple[AugmentationParams, AugmentationParams]:
        """Parameters of the query view, then of the key view.

        Both are drawn as one 2B-image draw (the query's rows first, so the query's uniforms
        are those a lone ``pipeline.sample`` would give), each view with its own noise seed,
        and moved to ``device`` in one copy. Each is a valid single-view parameter set; on a GPU
        ``apply`` runs both in one pass.
        """
        pipe = self.pipeline
        joint = pipe._draw(2 * batch_size, generator, image_size)
        key_seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if pipe.noise else None
        joint = _move_params([joint], device)[0]
        query = _half(joint, slice(0, batch_size))
        key = _half(joint, slice(batch_size, 2 * batch_size))
        if key_seed is not None:
            key.noise.seed = key_seed
        return query, key

    def apply(self, batch: Tensor, params: tuple[AugmentationParams, AugmentationParams]
              ) -> tuple[Tensor, Tensor]:
        """``(pipeline.apply(batch, query), pipeline.apply(batch, key))``: the same views, made
        as one pass over both (on a GPU, one batch of both; on the CPU, one pass of the compiled
        kernel over the threads)."""
        query, key = params
        joint, pipe = query.joint, self.pipeline
        if (joint is not None and joint is key.joint and batch.device.type != "cpu"
                and pipe.rotate is not None and batch.shape[0] * 2 == joint.rotate.angle.shape[0]
                and all(_plan_matches(p) for p in (query, key, joint))
                and joint.plan.size == tuple(batch.shape[-2:])
                and joint.plan.dtype == _compute_dtype(batch.dtype)):
            # Both views in one pass over the batch: half the kernel launches and host work.
            _check_batch("TwoViews", batch)
            self._check_fits(batch)
            seeds = [query.noise.seed, key.noise.seed] if pipe.noise is not None else []
            return self._both(batch, self._job(batch, joint, joint.plan, seeds))
        if batch.device.type == "cpu" and batch.shape[0] > 0:
            return self._cpu_views(batch, params)
        return pipe.apply(batch, query), pipe.apply(batch, key)

    def _cpu_views(self, batch: Tensor, params: tuple[AugmentationParams, AugmentationParams]
                   ) -> tuple[Tensor, Tensor]:
        """``pipeline.apply`` of each view on the CPU (the same views), both views' noise groups
        and views in one pass over the threads (see :func:`_cpu_pass`)."""
        pipe, n = self.pipeline, batch.shape[0]
        for p in params:
            pipe._check_apply(batch, p)
        x = batch.to(_compute_dtype(batch.dtype)).contiguous()   # converted once for both views
        # Two tensors rather than halves of one: at 256 images each (21 MB) stays under glibc's
        # largest mmap threshold (32 MB), so its memory is reused from call to call instead of
        # being mapped and page-faulted afresh (about 10 ms a call here).
        views = tuple(x.new_empty(n, x.shape[1], pipe.crop_size, pipe.crop_size) for _ in params)
        jobs = []
        for p, view in zip(params, views):
            _, plan, seeds, shifts = pipe._job_for(x, p)
            jobs.append((pipe._cpu_plan(plan, shifts, n, 1, tuple(x.shape[-2:]), x.dtype), view,
                         seeds[0] if seeds else None))
        _cpu_pass(x, jobs)
        return tuple(view.to(batch.dtype) for view in views)

    def __call__(self, batch: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(B, 5, H, W) -> (query, key), each (B, 5, 64, 64).

        With a CPU generator (or None): ``apply(batch, sample(...))``. On a GPU (the training
        loop's call) the same views come with less host work per call: no per-view parameter
        objects are made and only the plan travels to the device.

        With a generator on the batch's GPU: the parameters and the noise are drawn there, with
        the distributions of ``sample``. Without the PSF and for batches of up to 512 images, the
        call is a CUDA graph captured for the batch's shape on first use and replayed after
        that (bit for bit the views of running it operation by operation, which larger batches
        and the PSF do; the PSF reads its kernel half-width back once per call).
        """
        _check_batch("TwoViews", batch)
        if generator is not None and generator.device.type != "cpu":
            if generator.device.type != "cuda":
                raise ValueError(f"TwoViews: parameters are drawn on the CPU or on a CUDA GPU; got a "
                                 f"generator on {generator.device} (pass a CPU generator)")
            if _device_key(generator.device) != _device_key(batch.device):
                raise ValueError(f"TwoViews: the generator is on {generator.device} and the batch on "
                                 f"{batch.device}; draw on the batch's device or pass a CPU generator")
            return self._device_views(batch, generator)
        if batch.device.type != "cpu":
            return self._one_pass(batch, generator)
        return self.apply(batch, self.sample(batch.shape[0], generator, device=batch.device,
                                             image_size=tuple(batch.shape[-2:])))

    def _one_pass(self, batch: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Both views as one batch of 2B from one joint draw: the draws, seeds and ``_run`` of
        ``apply(batch, sample(...))`` on a GPU, so the views are the same. Works on any device
        (the tests run it on the CPU)."""
        return self._both(batch, self._host_work(batch, generator))

    def _host_work(self, batch: Tensor, generator: torch.Generator | None) -> tuple:
        """The host's part of ``_one_pass``: draw both views, derive the plan and start its copy
        to the batch's device. Returns the arguments of ``AugmentationPipeline._run``."""
        pipe = self.pipeline
        n, h, w = batch.shape[0], batch.shape[-2], batch.shape[-1]
        self._check_fits(batch)
        joint = pipe._draw(2 * n, generator, (h, w))
        key_seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if pipe.noise else None
        dtype = _compute_dtype(batch.dtype)
        plan = joint.plan if dtype == joint.plan.dtype else pipe._derive(joint, h, w, dtype)
        seeds = [joint.noise.seed, key_seed] if pipe.noise is not None else []
        return self._job(batch, joint, plan, seeds)

    def _check_fits(self, batch: Tensor) -> None:
        pipe = self.pipeline
        _check_crop_fits("TwoViews", batch, pipe.crop_size, pipe.jitter_crop.max_jitter if pipe.jitter_crop else 0)

    def _job(self, batch: Tensor, joint: AugmentationParams, plan: _ViewPlan, seeds: list[int]) -> tuple:
        """The arguments of ``AugmentationPipeline._run`` for both views of ``batch`` drawn as
        ``joint``, with ``plan`` (for the batch's size and precision) moved to its device."""
        x = batch.to(_compute_dtype(batch.dtype))
        shifts = joint.jitter_crop.shifts if self.pipeline.jitter_crop is not None else None
        return x, plan.on(x.device), seeds, shifts

    def _both(self, batch: Tensor, job: tuple | None) -> tuple[Tensor, Tensor]:
        """Run ``job`` (see ``_job``) as one batch of both views and split it: (query, key)."""
        n = batch.shape[0]
        if n == 0:
            empty = batch.new_empty(0, batch.shape[1], self.pipeline.crop_size, self.pipeline.crop_size)
            return empty, empty.clone()
        out = self.pipeline._run(*job, copies=2).to(batch.dtype)
        return out[:n], out[n:]

    def _device_views(self, batch: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(query, key) with the parameters and the noise drawn by ``generator`` on the batch's
        device; on CUDA without the PSF, as the replay of a CUDA graph captured for the batch's
        shape (the same views as the operations run one by one, bit for bit)."""
        self._check_fits(batch)
        n = batch.shape[0]
        if n == 0:
            return self._both(batch, None)
        x = batch.to(_compute_dtype(batch.dtype))
        if (self.cuda_graphs and x.device.type == "cuda" and self.pipeline.psf is None
                and n <= _GRAPH_MAX_IMAGES):
            out = self._replay(x, generator)
        else:
            out = self._device_pass(x, generator)
        out = out.to(batch.dtype)
        return out[:n], out[n:]

    def _device_pass(self, x: Tensor, generator: torch.Generator, frame_buffer: Tensor | None = None) -> Tensor:
        """Both views of ``x`` (n, 5, H, W), computation dtype, drawn on the device: (2n, 5, S, S)."""
        n, _, h, w = x.shape
        plan, shifts = self.pipeline._device_plan(2 * n, h, w, x.dtype, generator)
        return self.pipeline._run(x, plan, [], shifts, copies=2, noise_generator=generator,
                                  frame_buffer=frame_buffer)

    def _replay(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """``_device_pass`` through a CUDA graph per (shape, dtype, device), captured on first
        use; a torch that cannot capture runs eagerly, with a warning. The graph draws from a
        generator of its own, which takes the caller's generator state before the replay and
        hands the advanced state back after it, so any generator can use any graph and advances
        exactly as if the call had run eagerly."""
        key = (tuple(x.shape), x.dtype, x.device)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= _GRAPH_CACHE:          # e.g. many last-batch sizes: start over
                self._graphs.clear()
            entry = self._graphs[key] = self._capture(x)
        if entry is False:
            return self._device_pass(x, generator)
        static_x, static_out, graph, own = entry[:4]
        own.set_state(generator.get_state())
        static_x.copy_(x)
        graph.replay()
        generator.set_state(own.get_state())
        return static_out.clone()        # the next replay overwrites the graph's own output

    def _capture(self, x: Tensor):
        """Capture ``_device_pass`` for x's shape as a CUDA graph. Returns (static input, static
        output, graph, its generator, what else the graph reads that must stay alive), or False
        if capturing fails."""
        import warnings

        if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            warnings.warn("TwoViews: this torch cannot capture a CUDA graph with its own generator; "
                          "running the calls eagerly", RuntimeWarning, stacklevel=4)
            return False
        n, c, h, w = x.shape
        own = torch.Generator(device=x.device)
        frame = None
        if self.pipeline.rotate is not None:        # the input is the inside of a zero frame it owns
            side = _frame_geometry(h, w)[0]
            frame = torch.zeros(n, c, side, side, device=x.device, dtype=x.dtype)
            static_x = _Frame(n, h, w, x.device, x.dtype, buffer=frame).inside(n)
            static_x.copy_(x)
        else:
            static_x = x.clone()
        try:
            side_stream = torch.cuda.Stream(x.device)
            side_stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side_stream):              # warm-up: lazy initialisations happen here
                self._device_pass(static_x, own, frame)
            torch.cuda.current_stream(x.device).wait_stream(side_stream)
            out_h = out_w = self.pipeline.crop_size
            keep = (frame, _pixel_axes(out_h, out_w, x.device, torch.float64),
                    *(_constant(v, x.device, torch.float64) for v in self._constants()))
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(own)
            with torch.cuda.graph(graph):
                static_out = self._device_pass(static_x, own, frame)
        except Exception as exc:                              # noqa: BLE001 - fall back, loudly
            warnings.warn(f"TwoViews: capturing a CUDA graph failed ({type(exc).__name__}: {exc}); "
                          f"running the calls eagerly", RuntimeWarning, stacklevel=4)
            return False
        return static_x, static_out, graph, own, keep

    def _constants(self) -> list[tuple[float, ...]]:
        """The cached device constants ``_device_plan`` reads (kept alive with a graph)."""
        pipe = self.pipeline
        return [v for v in ((pipe.reddening.coefficients if pipe.reddening else None),
                            (pipe.noise.mad if pipe.noise else None)) if v is not None]

    def __repr__(self) -> str:
        return f"TwoViews({self.pipeline!r})"
