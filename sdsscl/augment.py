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
pass as the noise, on the small crop (with the PSF on the CPU, folded into the blur's kernels
instead); the result is the same to float rounding.

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

Speed: the pipeline works a few images at a time on the CPU (cache-sized blocks, PSF blocks
sorted by width so that most need short kernels; each blurs only the pixels its resampling
reads: with rotation, the images of a block are aligned on their own read windows, sorted by
size, and each window is gathered from the flat batch in one parallel copy; reused scratch
frames, no whole-batch temporaries) and on the whole
batch in a handful of kernels on a GPU. All of a view's randomness is one draw of uniform numbers
(``Augmentation.from_uniform``); what ``apply`` derives from the parameters (the sampling maps,
band factors and PSF kernels: the *plan*) is computed with numpy on the CPU when they are drawn,
and everything reaches the GPU in one pinned copy, with no host synchronisation.
:class:`TwoViews` draws both MoCo views as one batch and, on a GPU, applies them in one pass;
its call there makes no per-view parameter objects and moves only the plan. Given a generator on
the GPU instead, it draws there with the same distributions, and replays small batches as CUDA
graphs: no host work per call but the launch, for small batches. On a CPU shared with other busy
processes, torch's multi-threaded kernels stall at every parallel region; there
``torch.set_num_threads(1)`` (as in DataLoader workers) is faster.

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
from itertools import groupby
from operator import itemgetter
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

# Images processed together on the CPU (keeps the working set in cache and avoids fresh
# page-faulting allocations of whole-batch temporaries); other devices take the whole batch.
_CPU_BLUR_CHUNK = 16
_CPU_GEOMETRY_CHUNK = 32
# Images per independently seeded CPU noise stream (drawn in parallel threads).
_NOISE_GROUP = 32
# torch's CPU grain (at::internal::GRAIN_SIZE): elementwise work below it runs in one thread.
_GRAIN = 32768
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


def _blur_taps(x: Tensor, k: Tensor, out: Tensor | None = None, k_first: Tensor | None = None,
               window: tuple[int, int, int, int] | None = None) -> Tensor:
    """Separable blur of planes ``x`` (G, H, W) with per-plane symmetric kernels ``k`` (G, 2r+1),
    zero outside the image: 2r + 1 multiply-adds per axis on shifted views, no padding copies
    (the CPU path). ``out``: optional (G, H, W) destination (may be a strided view). ``k_first``:
    the kernels of the first (y) axis if they differ from ``k`` (e.g. scaled by a factor).

    ``window = (y0, y1, x0, x1)``: only ``out[:, y0:y1, x0:x1]`` is computed (the rest of ``out``
    is left as it was), with the same operations in the same order per pixel, so its values are
    bit for bit those of the whole blur. The first pass then covers rows y0:y1 only (whole rows,
    which keeps its operations one flat loop per plane).
    """
    g, h, w = x.shape
    r = (k.shape[1] - 1) // 2
    y0, y1, x0, x1 = (0, h, 0, w) if window is None else window
    if out is None:
        out = x.new_empty(g, h, w)
    k_first = k if k_first is None else k_first
    if r == 0:
        torch.mul(x[:, y0:y1, x0:x1], (k_first[:, r] * k[:, r])[:, None, None], out=out[:, y0:y1, x0:x1])
        return out
    # The first pass is computed divided by its centre tap (which the second pass's kernels take
    # instead), so that it starts with the centre and one neighbour in one operation.
    centre = k_first[:, r:r + 1]                                 # (G, 1)
    ky = (k_first / centre)[:, :, None, None].unbind(1)          # 2r+1 of (G, 1, 1); ky[r] = 1
    kx = (k * centre)[:, :, None, None].unbind(1)
    along_y = _scratch("blur", (g, h, w), x)                     # (G, H, W), rows y0:y1 used
    if y0 == 0:                                                  # row 0 has no neighbour above
        along_y[:, 0].copy_(x[:, 0])
    lo = max(y0, 1)
    if lo < y1:
        torch.addcmul(x[:, lo:y1], x[:, lo - 1:y1 - 1], ky[r - 1], out=along_y[:, lo:y1])
    for d in range(1, min(r, h - 1) + 1):                        # rows i - d and i + d
        lo, hi = max(y0, d), min(y1, h - d)
        if lo < y1 and d > 1:
            along_y[:, lo:y1].addcmul_(x[:, lo - d:y1 - d], ky[r - d])
        if y0 < hi:
            along_y[:, y0:hi].addcmul_(x[:, y0 + d:hi + d], ky[r + d])
    src, dst = along_y[:, y0:y1], out[:, y0:y1]                  # the window's rows
    torch.mul(src[..., x0:x1], kx[r], out=dst[..., x0:x1])
    for d in range(1, min(r, w - 1) + 1):                        # columns j - d and j + d
        lo, hi = max(x0, d), min(x1, w - d)
        if lo < x1:
            dst[..., lo:x1].addcmul_(src[..., lo - d:x1 - d], kx[r - d])
        if x0 < hi:
            dst[..., x0:hi].addcmul_(src[..., x0 + d:hi + d], kx[r + d])
    return out


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

    def blocks(self, params: PSFParams, device: torch.device, radius: int) -> list[tuple[Tensor | slice, int]]:
        """The images to blur together, each block with the half-width it needs: ``[(index, r)]``.

        On other devices than the CPU, the whole batch at the batch half-width. On the CPU, blocks
        of a few images (cache-sized) **sorted by PSF width**, so that most blocks need a short
        kernel (the half-normal draws are mostly narrow; a block of random images would need the
        half-width of its widest); ``index`` is then a long tensor of image indices.
        """
        n = params.sigma_r.shape[0]
        if device.type != "cpu" or radius == 0 or n <= _CPU_BLUR_CHUNK:
            return [(slice(0, n), radius)]
        sigma_r = params.sigma_r.detach().cpu()
        order = torch.argsort(sigma_r, stable=True)                                 # narrow first
        index = [order[i:i + _CPU_BLUR_CHUNK] for i in range(0, n, _CPU_BLUR_CHUNK)]
        last = torch.tensor([min(i + _CPU_BLUR_CHUNK, n) - 1 for i in range(0, n, _CPU_BLUR_CHUNK)])
        widest = self.sigma_pixels(sigma_r[order[last]]).max(dim=1).values  # each block's widest (last)
        block_radius = discrete_gaussian_radius(widest, self.tail).clamp_max(radius).tolist()
        return list(zip(index, block_radius))

    @staticmethod
    def _cut(kernels: Tensor, radius: int, r: int, scale: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Kernels (n, 5, 2 radius + 1) cut to half-width r and renormalised, for the first axis
        (with the per-(image, band) factors ``scale`` (n, 5, ...) folded in) and for the second,
        each (n * 5, 2r + 1) in ``dtype``."""
        n, c = kernels.shape[:2]
        k = kernels[:, :, radius - r:radius + r + 1]
        k = k / k.sum(dim=-1, keepdim=True)                                         # (n, 5, 2r+1)
        cut = k.to(dtype).reshape(n * c, 2 * r + 1)
        if scale is None:
            return cut, cut
        return (k * scale.reshape(n, c, 1).to(k.dtype)).to(dtype).reshape(n * c, 2 * r + 1), cut

    @staticmethod
    def _blur_block(x: Tensor, kernels: Tensor, radius: int, r: int, out: Tensor | None = None,
                    scale: Tensor | None = None, window: tuple[int, int, int, int] | None = None,
                    taps: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Blur images ``x`` (n, 5, H, W) with their kernels (n, 5, 2 radius + 1) cut to half-width
        r; ``out``: optional (n, 5, H, W) destination, e.g. the inside of a zero frame. ``scale``:
        optional per-(image, band) factors (n, 5, ...) applied in the same pass (on the CPU,
        folded into the first axis' kernel; the pipeline's reddening). On the CPU, ``window``:
        the pixels ``(y0, y1, x0, x1)`` that are needed (the others are left as they were in
        ``out``, see :func:`_blur_taps`), and ``taps``: ``_cut(kernels, radius, r, scale,
        x.dtype)`` if already made; elsewhere everything is computed."""
        n, c, h, w = x.shape
        if out is None:
            out = x.new_empty(n, c, h, w)
        flat = out.view(n * c, h, w)               # (n, 5) merge in fresh tensors and frame insides
        if x.device.type == "cpu":
            k_first, k = taps if taps is not None else PSFBlur._cut(kernels, radius, r, scale, x.dtype)
            _blur_taps(x.reshape(n * c, h, w), k, out=flat, k_first=k_first, window=window)
        else:
            _, k = PSFBlur._cut(kernels, radius, r, None, x.dtype)
            flat.copy_(_blur_conv(x.reshape(n * c, h, w), k))
            if scale is not None:
                out.mul_(scale.reshape(n, c, 1, 1))
        return out

    def apply(self, batch: Tensor, params: PSFParams) -> Tensor:
        _check_batch("PSFBlur", batch)
        _check_params_batch("PSFBlur", batch, params.sigma_r.shape[0])
        x = batch.to(_compute_dtype(batch.dtype))
        kernels, radius = self.kernels(params)
        if radius == 0:                                       # no kernel moves `tail` of the flux
            return batch.clone()
        kernels = kernels.to(x.device)
        out = torch.empty_like(x)                                                   # (B, 5, H, W)
        for blk, r in self.blocks(params, x.device, radius):
            if isinstance(blk, slice):
                self._blur_block(x[blk], kernels[blk], radius, r, out=out[blk])
            else:
                out.index_copy_(0, blk, self._blur_block(_take(x, blk, "block"), _take(kernels, blk), radius, r))
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


def _scratch(name: str, shape: tuple[int, ...], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A scratch tensor of ``shape`` (the device of ``like``, its dtype unless ``dtype`` is
    given), kept per thread and reused by the next call that asks for ``name``: on the CPU, a
    fresh multi-megabyte tensor per block costs more in page faults than the arithmetic done in
    it."""
    store = getattr(_SCRATCH, "tensors", None)
    if store is None:
        store = _SCRATCH.tensors = {}
    n = math.prod(shape)
    dtype = like.dtype if dtype is None else dtype
    buf = store.get(name)
    if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != like.device:
        buf = store[name] = torch.empty(n, dtype=dtype, device=like.device)
    return buf[:n].view(shape)


def _take(t: Tensor, blk: slice | Tensor, scratch: str | None = None) -> Tensor:
    """Rows ``blk`` of ``t``: a view for a slice, a contiguous gather (``index_select``, a row-wise
    copy, much faster than advanced indexing on the CPU) for an index tensor, into the reused
    scratch tensor ``scratch`` if named (valid until the next gather into it).

    Images ``(B, C, H, W)`` of ``_GRAIN`` elements or more are gathered as their ``B * C``
    planes: ``index_select`` copies smaller rows in one parallel loop, but runs one parallel
    region per row for larger ones (a whole 5 x 107 x 107 image), and on a shared 2-core machine
    those per-image regions made some processes' gathers ten times slower (measured: 1.2 ms
    against 0.15 ms per 16-image block).
    """
    if isinstance(blk, slice):
        return t[blk]
    n = blk.numel()
    out = None if scratch is None else _scratch(scratch, (n, *t.shape[1:]), t)
    if t.dim() < 3 or not t.is_contiguous() or t[0].numel() < _GRAIN:
        return t.index_select(0, blk) if out is None else torch.index_select(t, 0, blk, out=out)
    c = t.shape[1]
    planes = (blk.reshape(-1, 1) * c + torch.arange(c, device=blk.device)).reshape(-1)   # (n * C,)
    flat = t.reshape(t.shape[0] * c, -1)
    if out is None:
        return flat.index_select(0, planes).view(n, *t.shape[1:])
    torch.index_select(flat, 0, planes, out=out.view(n * c, -1))
    return out


def _block_len(blk: slice | Tensor, n: int) -> int:
    """Number of images in a block given as a slice of an n-image batch or as an index tensor."""
    return len(range(*blk.indices(n))) if isinstance(blk, slice) else int(blk.numel())


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
    Wo, 2) with image i's copies stacked along the rows. On the CPU it is made for all the images
    at once and taken block by block, which costs less than a grid per block, in a per-thread
    scratch tensor (valid until the next grid is made)."""
    n = affine.shape[0] // copies
    j, i = _pixel_axes(out_h, out_w, affine.device, affine.dtype)          # (1, 1, 1, Wo), (1, 1, Ho, 1)
    a = affine[:, :, :, None, None]                                                 # (n, 2, 3, 1, 1)
    shape = (n, copies, out_h, out_w, 2)
    if affine.device.type == "cpu":                   # reused: no fresh pages to fault per call
        grid = _scratch("grid", shape, affine, dtype)
    else:
        grid = torch.empty(shape, device=affine.device, dtype=dtype)
    if affine.device.type == "cpu" and copies == 1:      # per axis, straight into the grid
        for axis in range(2):
            torch.add(a[:, axis, 0] * j[0], a[:, axis, 1] * i[0] + a[:, axis, 2], out=grid[:, 0, ..., axis])
    else:                                             # three kernels for both axes
        coords = torch.addcmul(torch.addcmul(a[:, :, 2], a[:, :, 0], j), a[:, :, 1], i)  # (cn, 2, Ho, Wo)
        grid.permute(1, 0, 4, 2, 3).copy_(coords.view(copies, n, 2, out_h, out_w))      # rounded once
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


def _image_windows(affine: Tensor, h: int, w: int, out_h: int, out_w: int) -> np.ndarray:
    """The pixels of its ``h x w`` image that each resampling reads, not clipped to the image:
    (B, 4) int64 rows ``(y0, y1, x0, x1)`` (ends excluded) for the sampling maps ``affine``
    (B, 2, 3) (see :func:`_affine`): the bounding box of the output's corners, the bilinear
    neighbours included, widened by one pixel for the float32 rounding of the grid."""
    a = _numpy(affine).astype(np.float64)                                            # (B, 2, 3)
    _, half, pad_y, pad_x = _frame_geometry(h, w)
    bounds = []
    for axis, pad in ((1, pad_y), (0, pad_x)):                                     # y, then x
        span_j, span_i = a[:, axis, 0] * (out_w - 1), a[:, axis, 1] * (out_h - 1)
        lo = a[:, axis, 2] + np.minimum(span_j, 0) + np.minimum(span_i, 0)         # normalised
        hi = a[:, axis, 2] + np.maximum(span_j, 0) + np.maximum(span_i, 0)
        bounds += [np.floor((lo + 1) * half - pad) - 1, np.floor((hi + 1) * half - pad) + 3]
    return np.stack(bounds, axis=1).astype(np.int64)


def _read_windows(affine: Tensor | None, dy: Tensor | None, dx: Tensor | None, sizes: Sequence[int],
                  h: int, w: int, out_h: int, out_w: int, top0: int, left0: int) -> list[tuple[int, int, int, int]]:
    """The window ``(y0, y1, x0, x1)`` of the ``h x w`` images that each block's resampling reads:
    blocks of ``sizes`` consecutive rows of the sampling maps ``affine`` (B, 2, 3) (see
    :func:`_affine`), or without rotation, of the integer shifts ``dy``, ``dx`` (B,) of the crop.
    With rotation, the union over the block of :func:`_image_windows`, clipped to the image.
    """
    if sum(sizes) == 0:
        return [None] * len(sizes)
    starts = np.cumsum([0, *sizes[:-1]])
    if affine is not None:
        win = _image_windows(affine, h, w, out_h, out_w)
        bounds = [(win[:, 0], win[:, 1], h), (win[:, 2], win[:, 3], w)]
    else:
        dy, dx = _numpy(dy).astype(np.int64), _numpy(dx).astype(np.int64)
        bounds = [(top0 + dy, top0 + dy + out_h, h), (left0 + dx, left0 + dx + out_w, w)]
    limits = []
    for lo, hi, size in bounds:
        lo = np.minimum.reduceat(np.clip(lo, 0, size), starts)
        hi = np.maximum.reduceat(np.clip(hi, 0, size), starts)
        limits.append((lo.astype(int).tolist(), np.maximum(hi, lo).astype(int).tolist()))
    (y0, y1), (x0, x1) = limits
    return list(zip(y0, y1, x0, x1))


def _by_size(blocks: list[tuple[Tensor, int]], windows: np.ndarray) -> list[tuple[Tensor, int]]:
    """PSF blocks regrouped so that each holds images with read windows of about one size (see
    :func:`_aligned_blocks`, which blurs each block at the size of its largest): consecutive
    blocks of the same half-width hold interchangeable images (each image's blur is the same in
    any of them), so each such run is re-sorted by the height plus width of each image's window
    ``windows`` (B, 4) (see :func:`_image_windows`) and cut into blocks of the same sizes."""
    extent = torch.from_numpy(windows[:, 1] - windows[:, 0] + windows[:, 3] - windows[:, 2])
    out = []
    for r, run in groupby(blocks, key=itemgetter(1)):
        run = [blk for blk, _ in run]
        index = torch.cat(run)
        index = index[torch.argsort(extent[index], stable=True)]
        out.extend((part, r) for part in torch.split(index, [blk.numel() for blk in run]))
    return out


class _Aligned(NamedTuple):
    """How ``AugmentationPipeline._run`` blurs one block of images aligned on their read windows
    (see :func:`_aligned_blocks`): where its sources start in the batch, what to zero before and
    after the blur, and where the blurred windows go in the frame. Images are counted by their
    place in the block; source rows and columns k are image rows and columns ``corner + k``."""

    offsets: Tensor              # (n * 5,) offsets in the flat batch of each source plane's first pixel
    rows: int                    # source rows per plane: the block's largest window height + 2r
    cols: int                    # source columns per row: the block's largest window width + 2r
    window: tuple[int, int, int, int]   # the rows and columns blurred, in source coordinates
    at: int                      # the frame row and column of source row and column 0
    side: int                    # the frame's side (the sampling maps are made for it)
    zero_rows: Tensor | None     # source rows outside their image, as rows of the (n * 5 * rows, cols) source
    zero_cols: list              # (image, first, end): source columns outside the image
    clear: list                  # (image, axis, first, end): blurred rows (axis 0) or columns
                                 # (axis 1) of the window that lie outside the image
    fix: list                    # (plane, image, band, k0, k1, c0, c1, y0, x0): sources that would
                                 # start before the batch or end after it, copied instead


def _aligned_blocks(affine: Tensor, windows: np.ndarray, radii: Sequence[int], sizes: Sequence[int],
                    shape: tuple[int, int, int, int], index: Tensor, radius: int) -> tuple[Tensor, list[_Aligned]]:
    """The CPU blur of rotated views, block by block, with every image of a block placed so that
    the windows its resampling reads (``windows`` (B, 4), see :func:`_image_windows`) start at
    the same frame pixel. A block then blurs a window of the size of its largest image's (the
    blocks hold windows of about one size, see :func:`_by_size`) instead of the union of the
    images' windows where they lie, which is larger: the windows move with each image's jitter
    and rotation.

    affine: the sampling maps (B, 2, 3) of the images in block order; windows, in block order;
    radii and sizes: each block's half-width and number of images; shape: the batch's (B', C, H,
    W) (B' >= B images, rows ``index`` (B,) of it in block order); radius: the batch's widest
    half-width. Returns the sampling maps for the frame of those placements (see
    :func:`_aligned_frame_side`) and, per block, an :class:`_Aligned`.

    Each source plane is a (rows, cols) window of the flat batch, so a row that runs past its
    image's edge holds pixels of the next row or plane; those and the rows outside the image
    are zeroed (the blur's zero padding), and blurred pixels outside the image, which the zero
    frame would give, are zeroed after the blur. Blurred pixels outside an image's window stay
    unread.
    """
    nb, c, h, w = shape
    y0, y1, x0, x1 = windows.T
    side = _aligned_frame_side(h, w, windows, radius)
    # Image pixel (y, x) of image i lies at frame pixel (radius - y0_i + y, radius - x0_i + x).
    _, old_half, pad_y, pad_x = _frame_geometry(h, w)
    half = (side - 1) / 2
    a = _numpy(affine).astype(np.float64).copy()
    for axis, (pad, start) in enumerate(((pad_x, x0), (pad_y, y0))):
        a[:, axis, 2] = ((a[:, axis, 2] + 1) * old_half - pad + radius - start) / half - 1
        a[:, axis, :2] *= old_half / half
    # Per image, in the source coordinates of its block (row k is image row sy + k): its corner,
    # the rows and columns its blur needs, and which of them lie outside the image.
    nblk = len(sizes)
    starts = np.cumsum([0, *sizes[:-1]]).astype(np.int64)
    blk = np.repeat(np.arange(nblk), sizes)                                       # each image's block
    slot = np.arange(len(blk)) - starts[blk]                                       # its place there
    r_blk = np.asarray(radii, dtype=np.int64)
    hy, hx = np.maximum.reduceat(y1 - y0, starts), np.maximum.reduceat(x1 - x0, starts)
    ry, cx = hy + 2 * r_blk, hx + 2 * r_blk                                        # per block
    r_img, ry_img = r_blk[blk], ry[blk]
    sy, sx = y0 - r_img, x0 - r_img
    need_h, need_w = y1 - y0 + 2 * r_img, x1 - x0 + 2 * r_img
    bands = np.arange(c)
    idx = _numpy(index).astype(np.int64)
    off = ((idx[:, None] * c + bands) * h + sy[:, None]) * w + sx[:, None]         # (B, C) first pixels
    last = (nb * c * h * w - (ry - 1) * w - cx)[blk]   # the last offset a whole source fits after
    fix = [[] for _ in range(nblk)]
    for i, band in zip(*np.nonzero((off < 0) | (off > last[:, None]))):  # the batch's first/last planes
        top, left, rows, cols = int(sy[i]), int(sx[i]), int(ry_img[i]), int(cx[blk[i]])
        k0, k1, c0, c1 = max(0, -top), min(rows, h - top), max(0, -left), min(cols, w - left)
        if k0 < k1 and c0 < c1:
            fix[blk[i]].append((int(slot[i]) * c + int(band), int(idx[i]), int(band), k0, k1, c0, c1,
                                top + k0, left + c0))
    off = np.clip(off, 0, last[:, None])
    # rows outside the image, as flat rows (slot, band, k) of the block's source
    k = np.arange(int(ry.max()))[None, :]
    i, k = np.nonzero(((sy[:, None] + k < 0) | (sy[:, None] + k >= h)) & (k < need_h[:, None]))
    flat = ((slot[i, None] * c + bands) * ry_img[i, None] + k[:, None]).reshape(-1)
    cut = np.searchsorted(i, starts).tolist() + [len(i)]
    zero_rows = [torch.from_numpy(flat[cut[j] * c:cut[j + 1] * c]) if cut[j] < cut[j + 1] else None
                 for j in range(nblk)]
    zero_cols = [[] for _ in range(nblk)]
    for i in np.flatnonzero(sx < 0):
        zero_cols[blk[i]].append((int(slot[i]), 0, int(min(-sx[i], need_w[i]))))
    for i in np.flatnonzero(w - sx < need_w):
        zero_cols[blk[i]].append((int(slot[i]), int(max(w - sx[i], 0)), int(need_w[i])))
    clear = [[] for _ in range(nblk)]                 # the window's blurred pixels outside the image
    for i in np.flatnonzero((y0 < 0) | (y1 > h) | (x0 < 0) | (x1 > w)):
        r = int(r_img[i])
        for axis, lo, size, extent in ((0, sy[i], h, y1[i] - y0[i]), (1, sx[i], w, x1[i] - x0[i])):
            for a0, a1 in ((r, -lo), (size - lo, r + extent)):
                a0, a1 = int(max(a0, r)), int(min(a1, r + extent))
                if a0 < a1:
                    clear[blk[i]].append((int(slot[i]), axis, a0, a1))
    blocks = []
    for j, r in enumerate(radii):
        rows = slice(starts[j], starts[j] + sizes[j])
        blocks.append(_Aligned(torch.from_numpy(off[rows].reshape(-1)), int(ry[j]), int(cx[j]),
                               (r, r + int(hy[j]), r, r + int(hx[j])), radius - r, side,
                               zero_rows[j], zero_cols[j], clear[j], fix[j]))
    return torch.from_numpy(a), blocks


def _blur_aligned(x: Tensor, block: _Aligned, frame: Tensor, n: int, kernels: Tensor, radius: int, r: int,
                  scale: Tensor | None, taps: tuple[Tensor, Tensor], grid: Tensor) -> Tensor:
    """One block of :func:`_aligned_blocks`: gather its sources (one window of the flat batch per
    plane) from the contiguous batch ``x``, zero what lies outside the images, blur into
    ``frame`` (the per-thread scratch (>= n, 5, side, side)), zero the blurred pixels outside the
    images, and resample at ``grid`` (n, S, S, 2): (n, 5, S, S)."""
    c, w = x.shape[1], x.shape[-1]
    rows, cols = block.rows, block.cols
    flat = x.view(-1)
    # every (rows, cols) window of the flat batch, by the offset of its first pixel
    windows = flat.as_strided((flat.numel() - (rows - 1) * w - cols + 1, rows, cols), (1, w, 1))
    src = _scratch("block", (n * c, rows, cols), x)
    torch.index_select(windows, 0, block.offsets, out=src)
    for p, i, band, k0, k1, c0, c1, y0, x0 in block.fix:
        src[p].zero_()
        src[p, k0:k1, c0:c1].copy_(x[i, band, y0:y0 + k1 - k0, x0:x0 + c1 - c0])
    if block.zero_rows is not None:
        src.view(n * c * rows, cols).index_fill_(0, block.zero_rows, 0.0)
    src = src.view(n, c, rows, cols)
    for i, c0, c1 in block.zero_cols:
        src[i, :, :, c0:c1].zero_()
    at = block.at
    out = frame[:n, :, at:at + block.rows, at:at + block.cols]
    PSFBlur._blur_block(src, kernels, radius, r, out=out, scale=scale, window=block.window, taps=taps)
    for i, axis, a0, a1 in block.clear:
        (out[i, :, a0:a1] if axis == 0 else out[i, :, :, a0:a1]).zero_()
    return _resample(frame, grid)


def _aligned_frame_side(h: int, w: int, windows: np.ndarray, radius: int) -> int:
    """The side of the frame of :func:`_aligned_blocks`: the dyadic side of the images' frame,
    larger if a window and its margins do not fit (very wide PSFs)."""
    extent = int(max((windows[:, 1] - windows[:, 0]).max(), (windows[:, 3] - windows[:, 2]).max()))
    return _dyadic_frame(max(h, w, extent + 2 * radius))


def _cut_runs(kernels: Tensor, scale: Tensor | None, radius: int, radii: Sequence[int], sizes: Sequence[int],
              dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
    """``PSFBlur._cut`` per block, for blocks of ``sizes`` consecutive rows of ``kernels`` (and of
    ``scale``) with half-widths ``radii``: made once per run of blocks with the same half-width
    (they are sorted by width), then split into the blocks' planes."""
    taps, start, c = [], 0, kernels.shape[1]
    for r, run in groupby(zip(radii, sizes), key=itemgetter(0)):
        run_sizes = [n * c for _, n in run]
        rows = slice(start, start + sum(run_sizes) // c)
        start = rows.stop
        cut = PSFBlur._cut(kernels[rows], radius, r, None if scale is None else scale[rows], dtype)
        taps.extend(zip(*(torch.split(t, run_sizes) for t in cut)))
    return taps


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


def _cpu_pool() -> ThreadPoolExecutor | None:
    """Threads for drawing CPU noise in parallel (one per torch thread), made per process (a
    pool does not survive a fork into DataLoader workers); None with a single torch thread."""
    global _POOL
    n = torch.get_num_threads()
    if n < 2:
        return None
    if _POOL is None or _POOL[0] != os.getpid() or _POOL[1] != n:
        _POOL = (os.getpid(), n, ThreadPoolExecutor(max_workers=n, thread_name_prefix="sdsscl-noise"))
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
    _cpu_noise_fields([(seed, out)])
    return out


def _cpu_noise_fields(fields: Sequence[tuple[int, Tensor]]) -> None:
    """Draw each CPU field ``(seed, out)`` (``out`` contiguous float32) as :func:`_noise_field`
    does, the groups of all the fields in one parallel pass.

    One pass for both MoCo views matters on a 2-core machine: after each parallel torch
    operation, the OpenMP worker keeps spinning on a core for a few milliseconds, and threads
    drawing noise then share the cores with it; one pass per call instead of one per view pays
    that once.
    """
    def fill(task: tuple[int, Tensor, int]) -> None:
        seed, out, start = task
        gen = torch.Generator()
        gen.manual_seed((seed + start * 0x9E3779B97F4A7C15) % 2**63)
        out[start:start + _NOISE_GROUP].normal_(generator=gen)

    tasks = [(seed, out, start) for seed, out in fields for start in range(0, out.shape[0], _NOISE_GROUP)]
    pool = _cpu_pool() if len(tasks) > 1 else None
    if pool is None:
        for task in tasks:
            fill(task)
    else:
        list(pool.map(fill, tasks))


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

        Works block by block (a few images at a time on the CPU, the whole batch elsewhere):
        blur into a zero frame, one resampling for rotation and crop, then
        ``out = noise * gamma + crop * reddening`` in place in the noise field. The result equals
        the steps applied one by one in the documented order, to float rounding.
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
        compute precision, the plan on its device, the noise seeds, PSF parameters and shifts."""
        x = batch.to(_compute_dtype(batch.dtype))
        if self.jitter_crop is not None:
            _check_shifts("AugmentationPipeline", params.jitter_crop.shifts, self.jitter_crop.max_jitter)
        plan = self._plan_for(params, x).on(x.device)
        seeds = [params.noise.seed] if self.noise is not None else []
        shifts = params.jitter_crop.shifts if self.jitter_crop is not None else None
        return x, plan, seeds, params.psf, shifts

    def _prepare(self, plan: _ViewPlan, psf: PSFParams | None, shifts: Tensor | None, b: int,
                 size: tuple[int, int], device: torch.device, dtype: torch.dtype, copies: int = 1) -> _Work:
        """The host's part of ``_run`` for ``b`` images of ``size`` (``copies`` stacked copies of a
        batch) in ``dtype`` on ``device``: the blocks and what each needs (small operations on
        per-image tables, and numpy)."""
        h, w = size
        out_h, out_w, top0, left0 = _crop_geometry(h, w, self.crop_size)
        radius = plan.radius
        image_windows = None                              # with blocks aligned on their windows
        if copies > 1:                                    # one block: the copies of the batch
            blocks = [(slice(0, b), radius)]
        elif radius > 0:
            blocks = self.psf.blocks(psf, device, radius)
            if plan.affine is not None and not isinstance(blocks[0][0], slice):
                image_windows = _image_windows(plan.affine, h, w, out_h, out_w)
                blocks = _by_size(blocks, image_windows)
        else:                                             # no PSF, or none that moves any flux
            blocks = [(blk, 0) for blk in _blocks(b, device, _CPU_GEOMETRY_CHUNK)]
        dy, dx = (None, None) if plan.affine is not None else _split_shifts(shifts, b, device)
        # With the PSF on the CPU, the reddening factor rides along with the blur's first axis
        # (folded into its kernels), which saves a pass over the crops: the same linear map,
        # rounded in another order. (Without the PSF the views stay those of the GPU path, op
        # for op.)
        fold = device.type == "cpu" and plan.factor is not None and radius > 0
        # The plan's per-image tables, taken by block rows: for blocks of sorted images, gathered
        # once in block order, so that block k takes the next rows of each.
        tables = (plan.kernels, plan.affine, plan.factor if fold else None, dy, dx)
        if blocks and not isinstance(blocks[0][0], slice):
            order = torch.cat([blk for blk, _ in blocks])
            tables = tuple(None if t is None else t.index_select(0, order) for t in tables)
        sizes = [_block_len(blk, b) for blk, _ in blocks]
        # On the CPU, each block blurs only the window its resampling reads (the rest of the
        # frame keeps older values that no sample reaches): with rotation and sorted blocks, the
        # images aligned on their own windows (see _aligned_blocks); else the union of the
        # block's windows where they lie. The taps of each run of blocks with the same
        # half-width are cut in one go.
        windows = taps = [None] * len(blocks)
        aligned = None
        if device.type == "cpu" and radius > 0:
            radii = [r for _, r in blocks]
            if image_windows is not None:
                affine, aligned = _aligned_blocks(tables[1], image_windows[order.numpy()], radii, sizes,
                                                  (b, N_BANDS, h, w), order, radius)
                tables = (tables[0], affine, *tables[2:])
            else:
                windows = _read_windows(tables[1], *tables[3:], sizes, h, w, out_h, out_w, top0, left0)
            taps = _cut_runs(tables[0], tables[2], radius, radii, sizes, dtype)
        return _Work(blocks, sizes, tables, windows, taps, None if fold else plan.factor, aligned)

    def _run(self, x: Tensor, plan: _ViewPlan, seeds: Sequence[int], psf: PSFParams | None,
             shifts: Tensor | None, copies: int = 1, noise_generator: torch.Generator | None = None,
             frame_buffer: Tensor | None = None, out: Tensor | None = None, work: _Work | None = None) -> Tensor:
        """The views of ``copies`` stacked copies of ``x`` (n, 5, H, W) with a plan (and PSF
        parameters and shifts) for ``copies * n`` images and one noise seed per copy:
        (copies * n, 5, S, S) in x's dtype. ``copies > 1`` (both MoCo views in one pass) is for
        devices other than the CPU. ``noise_generator``: a generator on x's device that draws
        the whole noise field instead of the seeds (parameters drawn on the device);
        ``frame_buffer``: a zero frame to use instead of the per-thread one (a CUDA graph owns
        its own); ``out``: the destination, already holding the noise field (``seeds`` empty);
        ``work``: what ``_prepare`` gives for this call, if made already.

        Works block by block (a few images at a time on the CPU, the whole batch elsewhere):
        blur into a zero frame, one resampling for rotation and crop, then
        ``out = noise * gamma + crop * reddening`` in place in the noise field.
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
        if work is None:
            work = self._prepare(plan, psf, shifts, b, (h, w), device, x.dtype, copies)
        blocks, tables = work.blocks, work.tables
        if copies > 1 and (radius > 0 or plan.affine is None):
            x = x.repeat(copies, 1, 1, 1)                                          # (B, 5, H, W)
        frame, grid, crops = None, None, None
        if work.aligned is not None:                      # a frame for images aligned on windows
            side = work.aligned[0].side
            frame = _scratch("aligned", (max(work.sizes), c, side, side), x)
            grid = _sampling_grid(tables[1], out_h, out_w, x.dtype)                # (B, S, S, 2)
            x = x.contiguous()
        elif plan.affine is not None:
            frame = _Frame(min(b, max(work.sizes)), h, w, device, x.dtype, buffer=frame_buffer)
            grid = _sampling_grid(tables[1], out_h, out_w, x.dtype)                # (B, S, S, 2)
        start = 0
        for k, ((blk, r), n, window, block_taps) in enumerate(zip(blocks, work.sizes, work.windows, work.taps)):
            rows = blk if isinstance(blk, slice) else slice(start, start + n)
            start += n
            kernels, _, scale, dy_rows, dx_rows = (None if t is None else t[rows] for t in tables)
            if work.aligned is not None:
                crop = _blur_aligned(x, work.aligned[k], frame, n, kernels, radius, r, scale, block_taps,
                                     grid[rows])
            elif frame is not None:                       # sky image into the frame, blurred or not
                if radius > 0:
                    self.psf._blur_block(_take(x, blk, "block"), kernels, radius, r, out=frame.inside(n),
                                         scale=scale, window=window, taps=block_taps)
                else:
                    frame.inside(n).copy_(_take(x, blk))
                crop = frame.resample(grid[rows])                                          # (n, 5, S, S)
            else:
                src = _take(x, blk, "block")
                if radius > 0:
                    src = self.psf._blur_block(src, kernels, radius, r, scale=scale, window=window,
                                               taps=block_taps)
                crop = _integer_crop(src, top0 + dy_rows, left0 + dx_rows, s)                # (n, 5, S, S)
            if isinstance(blk, slice):
                _finish(out[blk], crop, *(None if t is None else t[blk] for t in (work.factor, plan.gamma)))
            else:                                         # a sorted block: its crops back in place
                if crops is None:
                    crops = _scratch("crops", tuple(out.shape), out) if plan.gamma is not None else out
                crops.index_copy_(0, blk, crop)
        if crops is not None:                             # then finished in one pass
            _finish(out, crops, work.factor, plan.gamma)
        return out

    def __call__(self, batch: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch("AugmentationPipeline", batch)
        return self.apply(batch, self.sample(batch.shape[0], generator, device=batch.device,
                                             image_size=tuple(batch.shape[-2:])))

    def __repr__(self) -> str:
        return f"AugmentationPipeline(names={list(self.names)}, crop_size={self.crop_size})"


class _Work(NamedTuple):
    """What ``AugmentationPipeline._prepare`` makes for ``_run``: the blocks ``[(rows, r)]`` and
    their sizes; the plan's tables (kernels, affine, folded factor, dy, dx) in block order;
    per block the read window and the cut taps (CPU with the PSF; else None); the reddening
    factor left for the finish (None where the blur took it); with rotation on the CPU, per
    block an :class:`_Aligned` instead of the window (and the affine table is for its frame)."""

    blocks: list
    sizes: list[int]
    tables: tuple
    windows: list
    taps: list
    factor: Tensor | None
    aligned: list | None = None


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
        as one pass over both on a GPU and, on the CPU, with both noise fields drawn first."""
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
        if (batch.device.type == "cpu" and pipe.noise is not None and batch.shape[0] > 0
                and _compute_dtype(batch.dtype) == torch.float32):
            return self._cpu_views(batch, params)
        return pipe.apply(batch, query), pipe.apply(batch, key)

    def _cpu_views(self, batch: Tensor, params: tuple[AugmentationParams, AugmentationParams]
                   ) -> tuple[Tensor, Tensor]:
        """``pipeline.apply`` of each view on the CPU (the same views), with both noise fields
        drawn first in one parallel pass (see ``_cpu_noise_fields``)."""
        pipe, n = self.pipeline, batch.shape[0]
        for p in params:
            pipe._check_apply(batch, p)
        x = batch.to(_compute_dtype(batch.dtype))                 # converted once for both views
        jobs = [pipe._job_for(x, p) for p in params]
        # Two tensors rather than halves of one: at 256 images each (21 MB) stays under glibc's
        # largest mmap threshold (32 MB), so its memory is reused from call to call instead of
        # being mapped and page-faulted afresh (about 10 ms a call here).
        views = tuple(x.new_empty(n, x.shape[1], pipe.crop_size, pipe.crop_size) for _ in jobs)
        # Both views' host work (small, single-threaded operations) before the noise: the noise
        # threads run slower right after parallel torch operations, while torch's OpenMP worker
        # still spins (measured here: 23.6 ms for both fields right after one, 21.8 ms after 2 ms
        # of single-threaded work, 19.1 ms after 8 ms), so that work is best placed before them.
        works = [pipe._prepare(plan, psf, shifts, n, tuple(x.shape[-2:]), x.device, x.dtype)
                 for _, plan, _, psf, shifts in jobs]
        _cpu_noise_fields([(seeds[0], view) for (_, _, seeds, _, _), view in zip(jobs, views)])
        for (_, plan, _, psf, shifts), view, work in zip(jobs, views, works):
            pipe._run(x, plan, [], psf, shifts, out=view, work=work)               # (B, 5, S, S)
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
        return x, plan.on(x.device), seeds, joint.psf, shifts

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
        return self.pipeline._run(x, plan, [], None, shifts, copies=2, noise_generator=generator,
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
