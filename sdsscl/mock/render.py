"""Render one mock galaxy as SDSS would image it: ugriz, 107x107 pixels at 0.396".

Image formation, per galaxy:

1. Light profiles on a 128x128 grid (the 107x107 cutout plus a margin that absorbs FFT
   wrap-around), in arcsec on the sky: a Sersic spheroid or bulge, an exponential disk of
   finite thickness at its inclination, a bar, logarithmic spiral arms. Each *colour group*
   (bulge + bar; disk; arms) has one band-independent shape and its own ugriz fluxes, so bulges
   are redder than disks and arms bluer still. The central pixels of cuspy profiles are
   supersampled.
2. Compact sources (star-forming clumps, stars, faint background objects) are added
   analytically in Fourier space as shifted Gaussians.
3. Each band is convolved with its PSF (a double Gaussian, r-band FWHM drawn per galaxy,
   FWHM proportional to lambda^-0.3) and the pixel response, in Fourier space.
4. Galactic extinction dims each band; source Poisson and sky noise are added.
5. Artefacts: a satellite streak (one band only: SDSS scans ugriz at different times) or a
   bad column.

All randomness comes from the generator passed in, so a galaxy renders identically in any
process.
"""
from __future__ import annotations

import numpy as np

from ..constants import CUTOUT_SIZE, PIXEL_SCALE
from .population import CONTAMINANTS, MockPhysics, sersic_b

GRID = 128
MARGIN = (GRID - CUTOUT_SIZE) // 2  # cutout pixel i is grid pixel i + MARGIN
CENTRE = MARGIN + CUTOUT_SIZE // 2  # grid pixel of the cutout centre (53 in the cutout)

_ky = np.fft.fftfreq(GRID)[:, None]  # cycles per pixel
_kx = np.fft.rfftfreq(GRID)[None, :]
_k2 = _kx**2 + _ky**2
_PIXEL_MTF = (np.sinc(_kx) * np.sinc(_ky))  # box pixel response
_yy, _xx = np.mgrid[0:GRID, 0:GRID].astype(np.float64)

# Colours of the groups relative to the galaxy's total light: magnitudes added per band
# (ugriz) before renormalising. Bulges are ~0.5 mag redder in u-r than their disks; arms and
# clumps are bluer (young stars).
_BULGE_TILT = np.array([0.55, 0.25, 0.0, -0.08, -0.15])
_ARM_TILT = np.array([-0.6, -0.3, 0.0, 0.1, 0.2])


def _psf_otf(fwhm_arcsec: float) -> np.ndarray:
    """Optical transfer function of a double-Gaussian PSF (core 90%, wing 2x wider 10%)."""
    sigma = fwhm_arcsec / PIXEL_SCALE / 2.3548 / 1.04  # the wing widens the FWHM by ~4%
    a = -2 * np.pi**2 * _k2 * sigma**2
    return 0.9 * np.exp(a) + 0.1 * np.exp(4 * a)


def _coords(cx, cy, pa_deg):
    """Grid offsets (pixels) rotated so x runs along the major axis."""
    dx = _xx - cx
    dy = _yy - cy
    t = np.radians(pa_deg)
    c, s = np.cos(t), np.sin(t)
    return dx * c + dy * s, -dx * s + dy * c


def _sersic_image(cx, cy, re_pix, n, q, pa_deg, supersample=True):
    """Normalised Sersic profile on the grid (sums to 1 over the grid)."""
    x, y = _coords(cx, cy, pa_deg)
    r = np.sqrt(x**2 + (y / q) ** 2)
    b = sersic_b(n)
    img = np.exp(-b * (r / re_pix) ** (1.0 / n))
    if supersample and re_pix < 12:
        # the cusp: replace the 7x7 central pixels by averages over 9x9 sub-pixels
        ic, jc = int(round(cy)), int(round(cx))
        sub = (np.arange(9) - 4) / 9.0
        cen = np.arange(-3, 4)
        ys = (ic + cen)[:, None, None, None] + sub[None, None, :, None]  # (7, 1, 9, 1)
        xs = (jc + cen)[None, :, None, None] + sub[None, None, None, :]  # (1, 7, 1, 9)
        t = np.radians(pa_deg)
        xr = (xs - cx) * np.cos(t) + (ys - cy) * np.sin(t)
        yr = -(xs - cx) * np.sin(t) + (ys - cy) * np.cos(t)
        rr = np.sqrt(xr**2 + (yr / q) ** 2)  # (7, 7, 9, 9)
        img[ic - 3:ic + 4, jc - 3:jc + 4] = np.exp(-b * (rr / re_pix) ** (1.0 / n)).mean(axis=(2, 3))
    return img / img.sum()


def _disk_images(p, cx, cy, rng):
    """Disk, arm and bar images (normalised) in the disk plane, projected at inclination."""
    re_pix = p["r_e_disk"] / PIXEL_SCALE
    h = re_pix / 1.678  # exponential scale length
    q = p["axis_ratio"]
    x, y = _coords(cx, cy, p["position_angle_deg"])
    cos_i = max(np.cos(np.radians(p["inclination_deg"])), 1e-3)
    # finite thickness: the projected disk is an exponential in the plane radius with
    # the observed axis ratio q (>= intrinsic thickness)
    r_obs = np.sqrt(x**2 + (y / q) ** 2)
    disk = np.exp(-r_obs / h)
    # in-plane (deprojected) coordinates for the structures inside the disk
    yp = y / max(cos_i, p["disk_thickness"])
    rp = np.sqrt(x**2 + yp**2) + 1e-6
    theta = np.arctan2(yp, x)
    arms = None
    if p["arm_strength"] > 0:
        m = int(p["n_arms"])
        pitch = np.radians(p["pitch_deg"])
        phase = rng.uniform(0, 2 * np.pi)
        sharp = rng.uniform(2.0, 4.0)
        wind = np.log(rp / h) / np.tan(pitch)
        pattern = (0.5 * (1 + np.cos(m * (theta - wind) + phase))) ** sharp
        envelope = (1 - np.exp(-((rp / (0.6 * h)) ** 2))) * np.exp(-rp / h)
        arms = pattern * envelope
        s = arms.sum()
        arms = arms / s if s > 0 else None
    bar = None
    if p["has_bar"]:
        length = p["bar_length"] * re_pix
        phi = np.radians(rng.uniform(0, 180))
        xb = x * np.cos(phi) + yp * np.sin(phi)
        yb = -x * np.sin(phi) + yp * np.cos(phi)
        qb = rng.uniform(0.2, 0.35)
        bar = np.exp(-0.5 * ((xb / (0.5 * length)) ** 2 + (yb / (0.5 * length * qb)) ** 2) ** 1.2)
        bar = bar / bar.sum()
    return disk / disk.sum(), arms, bar


def _point_sources_ft(sources):
    """Sum of unit-flux Gaussians in Fourier space: sources = [(flux (5,), x, y, sigma_pix)]."""
    ft = np.zeros((5,) + _k2.shape, dtype=np.complex128)
    for flux, x, y, sigma in sources:
        shift = np.exp(-2j * np.pi * (_kx * x + _ky * y))
        ft += flux[:, None, None] * (shift * np.exp(-2 * np.pi**2 * _k2 * sigma**2))[None]
    return ft


def _star_colours(rng, r_flux):
    """ugriz fluxes of a star of r-band flux r_flux along a simple stellar locus."""
    gr = rng.uniform(0.2, 1.4)
    ug = min(0.8 + 1.3 * gr, 2.9)
    ri = 0.1 + 0.45 * gr ** 1.5
    iz = 0.05 + 0.5 * ri
    mags = np.array([ug + gr, gr, 0.0, -ri, -ri - iz])  # relative to r
    return r_flux * 10 ** (-0.4 * mags)


def render_galaxy(p: dict, rng: np.random.Generator, cfg: MockPhysics) -> dict:
    """Render one galaxy from its population row ``p``.

    Returns ``image`` (5, 107, 107) float32 nanomaggies with noise, ``model`` the noiseless
    extincted image (float32), ``model_snr`` (5,) the optimal (matched-filter) S/N of the
    galaxy itself, ``model_flux_cutout`` (5,) the galaxy's noiseless flux inside the cutout.
    """
    flux = p["flux"]  # (5,) dereddened total fluxes, nmgy
    cx = CENTRE + p["offset"][0]
    cy = CENTRE + p["offset"][1]
    bt = p["bulge_fraction"]

    # --- colour groups: shapes and per-band fluxes (flux conserved in every band) ----------
    bulge_img = _sersic_image(cx, cy, max(p["r_e_bulge"] / PIXEL_SCALE, 0.3), p["sersic_n"],
                              p["q_bulge"], p["position_angle_deg"])
    groups = []  # (image, fluxes (5,))
    compact = []  # (fluxes (5,), x, y, sigma) relative to the grid origin
    if p["morphology"] == 0:
        groups.append((bulge_img, flux))
    else:
        disk_img, arm_img, bar_img = _disk_images(p, cx, cy, rng)
        bulge_band = np.clip(bt * 10 ** (-0.4 * _BULGE_TILT), 0.0, 0.97)  # bulge share per band
        bulge_flux = flux * bulge_band
        disk_flux = flux - bulge_flux
        if bar_img is not None:
            share = 0.25 * p["bar_strength"]
            bar_flux = disk_flux * share * 10 ** (-0.4 * _BULGE_TILT * 0.5)
            bar_flux = np.minimum(bar_flux, 0.5 * disk_flux)
            disk_flux = disk_flux - bar_flux
            groups.append((bar_img, bar_flux))
        if arm_img is not None:
            share = np.clip(0.45 * p["arm_strength"] * 10 ** (-0.4 * _ARM_TILT), 0, 0.8)
            arm_flux = disk_flux * share
            disk_flux = disk_flux - arm_flux
            # star-forming clumps take part of the arm light, bluer still
            n_clumps = rng.poisson(p["clump_rate"])
            if n_clumps:
                cl_share = np.clip(0.03 * n_clumps * 10 ** (-0.4 * _ARM_TILT), 0, 0.6)
                cl_flux = arm_flux * cl_share
                arm_flux = arm_flux - cl_flux
                # draw positions from the arm image itself
                idx = rng.choice(arm_img.size, size=n_clumps, p=arm_img.ravel())
                w = rng.dirichlet(np.ones(n_clumps))
                for k, flat in enumerate(idx):
                    yk, xk = divmod(int(flat), GRID)
                    compact.append((cl_flux * w[k], xk + rng.uniform(-0.5, 0.5),
                                    yk + rng.uniform(-0.5, 0.5), rng.uniform(0.3, 0.9)))
            groups.append((arm_img, arm_flux))
        groups.append((disk_img, disk_flux))
        groups.append((bulge_img, bulge_flux))

    # --- the galaxy in Fourier space ------------------------------------------------------
    gal_ft = np.zeros((5,) + _k2.shape, dtype=np.complex128)
    for img, fl in groups:
        ft = np.fft.rfft2(img)
        gal_ft += fl[:, None, None] * ft[None]
    if compact:
        gal_ft += _point_sources_ft(compact)

    # --- other objects in the cutout ------------------------------------------------------
    other = []
    kind = CONTAMINANTS[int(p["contaminant"])]
    if kind == "neighbor":
        r_off = rng.uniform(12, 45)
        ang = rng.uniform(0, 2 * np.pi)
        nb_flux = flux * rng.uniform(0.05, 1.0) * 10 ** (-0.4 * rng.normal(0, 0.25, 5))
        nb_img = _sersic_image(cx + r_off * np.cos(ang), cy + r_off * np.sin(ang),
                               rng.uniform(1.5, 8.0), rng.uniform(1.0, 4.0), rng.uniform(0.4, 1.0),
                               rng.uniform(0, 180))
        other_ft = nb_flux[:, None, None] * np.fft.rfft2(nb_img)[None]
    else:
        other_ft = None
    if kind == "star":
        r_off = rng.uniform(8, 50)
        ang = rng.uniform(0, 2 * np.pi)
        r_mag = rng.uniform(13.0, 18.5)
        other.append((_star_colours(rng, 10 ** (-0.4 * (r_mag - 22.5))),
                      cx + r_off * np.cos(ang), cy + r_off * np.sin(ang), 0.0))
    n_faint = rng.poisson(cfg.n_faint_sources)
    for _ in range(n_faint):
        r_mag = rng.uniform(19.5, 23.0)
        fx, fy = rng.uniform(0, GRID, 2)
        if rng.random() < 0.5:
            fl = _star_colours(rng, 10 ** (-0.4 * (r_mag - 22.5)))
            other.append((fl, fx, fy, 0.0))
        else:  # small faint galaxy: red-ish, marginally resolved
            fl = 10 ** (-0.4 * (r_mag - 22.5)) * 10 ** (-0.4 * np.array([1.8, 0.8, 0, -0.4, -0.6]))
            other.append((fl, fx, fy, rng.uniform(0.8, 2.0)))
    if other:
        o = _point_sources_ft(other)
        other_ft = o if other_ft is None else other_ft + o

    # --- PSF, pixel, extinction -----------------------------------------------------------
    dim = 10 ** (-0.4 * p["dimming_mag"])  # (5,)
    sl = slice(MARGIN, MARGIN + CUTOUT_SIZE)
    model = np.empty((5, CUTOUT_SIZE, CUTOUT_SIZE))
    galaxy_only = np.empty_like(model)
    for b in range(5):
        otf = _psf_otf(p["psf_fwhm"][b]) * _PIXEL_MTF
        g = np.fft.irfft2(gal_ft[b] * otf, s=(GRID, GRID))[sl, sl] * dim[b]
        galaxy_only[b] = g
        if other_ft is not None:
            model[b] = g + np.fft.irfft2(other_ft[b] * otf, s=(GRID, GRID))[sl, sl] * dim[b]
        else:
            model[b] = g

    # --- noise ------------------------------------------------------------------------------
    sky = np.asarray(p["sky_sigma"])[:, None, None]
    gain = np.asarray(cfg.electrons_per_nmgy)[:, None, None]
    var = sky**2 + np.clip(model, 0, None) / gain
    image = model + np.sqrt(var) * rng.standard_normal(model.shape)
    var_gal = sky**2 + np.clip(galaxy_only, 0, None) / gain
    snr = np.sqrt(np.sum(galaxy_only**2 / var_gal, axis=(1, 2)))

    # --- artefacts --------------------------------------------------------------------------
    if kind == "satellite":
        b = rng.integers(0, 5)
        ang = rng.uniform(0, np.pi)
        d0 = rng.uniform(-40, 40)
        yy, xx = np.mgrid[0:CUTOUT_SIZE, 0:CUTOUT_SIZE]
        dist = (xx - CUTOUT_SIZE / 2) * np.sin(ang) - (yy - CUTOUT_SIZE / 2) * np.cos(ang) - d0
        width = p["psf_fwhm"][b] / PIXEL_SCALE / 2.3548
        image[b] += rng.uniform(0.3, 3.0) * np.exp(-0.5 * (dist / width) ** 2)
    elif kind == "bad_column":
        b = rng.integers(0, 5)
        col = rng.integers(5, CUTOUT_SIZE - 5)
        ncol = rng.integers(1, 3)
        if rng.random() < 0.5:
            image[b, :, col:col + ncol] = 0.0
        else:
            image[b, :, col:col + ncol] += rng.uniform(5, 30) * p["sky_sigma"][b]

    return {
        "image": image.astype(np.float32),
        "model": model.astype(np.float32),
        "model_snr": snr,
        "model_flux_cutout": galaxy_only.sum(axis=(1, 2)),
    }
