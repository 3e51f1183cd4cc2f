"""Draw the mock galaxy population: redshifts, spectra, fluxes, structure, sky and labels.

Everything per galaxy that does not need the image is decided here, vectorised, in one
process, from one seeded generator; the renderer then works on one galaxy at a time.

The population is grounded in the real SDSS galaxies shipped with ``kcorrect``
(:mod:`sdsscl.mock.reference`): each mock galaxy starts from a real galaxy's redshift and
template fit, is moved to a slightly different redshift at a slightly different
luminosity with a perturbed spectrum, and is kept only if it passes the SDSS main-sample cut
on extinction-corrected Petrosian r. Sizes follow Shen et al. (2003) through ``skypy``.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field, fields

import numpy as np
from scipy import special

from ..constants import (GZ2_R90_MIN_ARCSEC, GZ2_R_LIMIT, MAIN_SAMPLE_R_LIMIT, R_BAND,
                         R_DR12, R_SF11, WAVELENGTH_EFF, nmgy_to_mag)
from . import reference

log = logging.getLogger(__name__)

#: Contaminant codes stored in ``truth/contaminant``.
CONTAMINANTS = ("none", "neighbor", "star", "satellite", "bad_column")


@dataclass(frozen=True)
class MockPhysics:
    """How the mock universe and its observation are made (the profile's ``mock`` section sets
    only the size, seed and workers: :class:`sdsscl.config.MockConfig`). Defaults are SDSS-like;
    each cites where it comes from.

    Population
        z_scatter: relative redshift perturbation, z' = z (1 + N(0, z_scatter)).
        mag_scatter: luminosity perturbation in magnitudes, N(0, mag_scatter).
        sed_scatter: lognormal scatter of each template coefficient (dex-like, natural log).
    Morphology
        smooth_colour_slope / smooth_colour_pivot / smooth_lum_slope: logit P(smooth) =
            slope * (u - r - pivot) - lum_slope * (M_r + 21.5); red, luminous galaxies are
            mostly smooth, but red disks and blue spheroids remain (clipped to [p_min, p_max]).
        bar_fraction: fraction of disks given a bar; volunteers see ~30% of face-on disks as barred
            (Masters et al. 2011: 29.4%) because weak or small bars are missed.
    Observing (SDSS DR9 documentation; DATA-FACTS)
        seeing_median_r / seeing_sigma_ln: r-band PSF FWHM (arcsec), lognormal; quartiles
            ~1.30-1.58".
        sky_sigma: per-pixel sky noise (nmgy) ugriz, from SDSS zero points, 54 s exposures and
            sky brightness.
        electrons_per_nmgy: photo-electrons per nanomaggy ugriz (gain / nmgy-per-count of
            typical SDSS frames; an estimate) for source Poisson noise.
    Sky and labels
        spec_footprint_fraction: fraction of the mock inside the spectroscopic footprint.
        spec_completeness: probability that a galaxy in the footprint has a spectrum before the
            faint-end and extinction penalties (fibre collisions cost ~7%).
        contaminant_rates: per-cutout probability of a neighbour, a bright star, a satellite
            streak, a bad column.
        n_faint_sources: mean number of faint background stars/galaxies per cutout.
    """

    z_scatter: float = 0.08
    mag_scatter: float = 0.15
    sed_scatter: float = 0.08
    smooth_colour_slope: float = 3.0
    smooth_colour_pivot: float = 2.75
    smooth_lum_slope: float = 0.4
    smooth_p_min: float = 0.05
    smooth_p_max: float = 0.9
    bar_fraction: float = 0.5
    seeing_median_r: float = 1.40
    seeing_sigma_ln: float = 0.145
    sky_sigma: tuple[float, ...] = (0.041, 0.0165, 0.0275, 0.044, 0.19)
    sky_sigma_scatter_ln: float = 0.15
    electrons_per_nmgy: tuple[float, ...] = (70.0, 480.0, 400.0, 300.0, 65.0)
    spec_footprint_fraction: float = 0.46
    spec_completeness: float = 0.93
    contaminant_rates: tuple[float, ...] = (0.04, 0.025, 0.008, 0.007)
    n_faint_sources: float = 1.5
    gz2_volunteers_min: int = 28
    gz2_volunteers_extra_mean: float = 17.0
    gz2_overdispersion: float = 12.0

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            vals = v if isinstance(v, tuple) else (v,)
            if any((not np.isfinite(x)) or x < 0 for x in vals):
                raise ValueError(f"MockPhysics.{f.name} must be finite and >= 0, got {v!r}")
        if len(self.sky_sigma) != 5 or len(self.electrons_per_nmgy) != 5:
            raise ValueError("MockPhysics.sky_sigma and electrons_per_nmgy need 5 values (ugriz)")
        if len(self.contaminant_rates) != len(CONTAMINANTS) - 1 or sum(self.contaminant_rates) >= 1:
            raise ValueError(f"MockPhysics.contaminant_rates needs {len(CONTAMINANTS) - 1} rates "
                             f"summing below 1, got {self.contaminant_rates}")
        if not 0 < self.spec_footprint_fraction <= 1 or not 0 < self.spec_completeness <= 1:
            raise ValueError("spec_footprint_fraction and spec_completeness must lie in (0, 1]")

    @classmethod
    def from_dict(cls, d: dict) -> "MockPhysics":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MockPhysics keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@contextlib.contextmanager
def _legacy_seed(rng: np.random.Generator):
    """Seed numpy's global RNG from ``rng`` for libraries (skypy) that only use it."""
    state = np.random.get_state()
    np.random.seed(int(rng.integers(2**32 - 1)))
    try:
        yield
    finally:
        np.random.set_state(state)


def sersic_b(n):
    """b_n such that r_e encloses half the light (Ciotti & Bertin 1999 expansion)."""
    n = np.asarray(n, dtype=np.float64)
    return 2 * n - 1 / 3 + 4 / (405 * n) + 46 / (25515 * n**2)


def petrosian(components, r_max=120.0, n_grid=700):
    """SDSS-style Petrosian quantities of circular multi-component Sersic profiles.

    components: list of (flux_fraction (N,), r_e arcsec (N,), n (N,)) whose fractions sum to 1.
    Returns (flux_fraction within 2 R_P, R50, R90) with R50/R90 the radii containing 50/90%
    of the Petrosian flux (arcsec). The Petrosian ratio is the local surface brightness at R
    over the mean within R, R_P where it falls to 0.2 (Strauss et al. 2002; the local
    brightness here is the profile value at R rather than an annulus average).
    """
    radii = np.geomspace(0.02, r_max, n_grid)  # arcsec
    n_gal = len(components[0][0])
    cum = np.zeros((n_gal, n_grid))
    local = np.zeros((n_gal, n_grid))
    for frac, re, n in components:
        frac, re, n = (np.asarray(a, np.float64)[:, None] for a in (frac, re, n))
        b = sersic_b(n)
        x = b * (radii[None, :] / re) ** (1 / n)
        cum += frac * special.gammainc(2 * n, x)
        norm = b ** (2 * n) / (2 * np.pi * n * re**2 * special.gamma(2 * n))
        local += frac * norm * np.exp(-x)
    mean_within = cum / (np.pi * radii[None, :] ** 2)
    eta = local / mean_within
    below = eta < 0.2
    idx = np.where(below.any(axis=1), below.argmax(axis=1), n_grid - 1)
    r_p = radii[idx]
    f_petro = np.array([np.interp(2 * rp, radii, c) for rp, c in zip(r_p, cum)])
    r50 = np.array([np.interp(0.5 * f, c, radii) for f, c in zip(f_petro, cum)])
    r90 = np.array([np.interp(0.9 * f, c, radii) for f, c in zip(f_petro, cum)])
    return f_petro, r50, r90


@dataclass
class Population:
    """Per-galaxy parameters (arrays of length N) for the renderer and the file."""

    columns: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, key):
        return self.columns[key]

    def row(self, i: int) -> dict:
        return {k: v[i] for k, v in self.columns.items()}


def _logistic(x):
    return 1.0 / (1.0 + np.exp(-x))


def _candidates(n: int, rng: np.random.Generator, cfg: MockPhysics) -> dict[str, np.ndarray]:
    """Draw n candidate galaxies before the main-sample cut."""
    cat, fits_ = reference.fit_reference_seds()
    src = rng.integers(0, len(fits_.z), size=n)
    z0 = fits_.z[src]
    z = np.clip(z0 * (1 + cfg.z_scatter * rng.standard_normal(n)), 0.005, 0.75)
    # keep the luminosity (coefficients scale with 10^(-0.4 DM)), perturb it and the spectrum
    dmag = cfg.mag_scatter * rng.standard_normal(n)
    scale = 10 ** (0.4 * (reference.distance_modulus(z0) - reference.distance_modulus(z) - dmag))
    coeffs = fits_.coeffs[src] * np.exp(cfg.sed_scatter * rng.standard_normal((n, 5)))
    coeffs *= scale[:, None]
    flux = reference.observed_maggies(z, coeffs) * 1e9 * fits_.residual[src]  # nmgy, dereddened
    abs_mag = reference.absolute_mag_r(z, coeffs)
    return {"source_index": src, "z": z, "coeffs": coeffs, "flux": flux, "abs_mag_r": abs_mag}


def _morphology(c: dict, rng: np.random.Generator, cfg: MockPhysics) -> None:
    """Structure of each galaxy: smooth spheroids and bulge + disk systems (in place)."""
    n = len(c["z"])
    flux = c["flux"]
    u_r = nmgy_to_mag(flux[:, 0]) - nmgy_to_mag(flux[:, 2])
    logit = (cfg.smooth_colour_slope * (u_r - cfg.smooth_colour_pivot)
             - cfg.smooth_lum_slope * (c["abs_mag_r"] + 21.5))
    p_smooth = np.clip(_logistic(logit), cfg.smooth_p_min, cfg.smooth_p_max)
    smooth = rng.random(n) < p_smooth
    c["morphology"] = np.where(smooth, 0, 1).astype(np.int8)  # 0 smooth, 1 disk
    redness = np.clip((u_r - 1.2) / 1.8, 0, 1)

    # sizes: Shen et al. (2003) r-band relations, early types for smooth, late for disks
    import skypy.galaxies.morphology as sm

    m = c["abs_mag_r"]
    with _legacy_seed(rng):
        re_early = sm.early_type_lognormal_size(m, a=0.60, b=-4.63, M0=-20.52, sigma1=0.48,
                                                sigma2=0.25).to_value("kpc")
        re_late = sm.late_type_lognormal_size(m, alpha=0.21, beta=0.53, gamma=-1.31, M0=-20.52,
                                              sigma1=0.48, sigma2=0.25).to_value("kpc")
    re_kpc = np.clip(np.where(smooth, re_early, re_late), 0.3, 40.0)
    cosmo = reference.cosmology()
    kpc_per_arcsec = cosmo.angular_diameter_distance(c["z"]).to_value("kpc") * np.pi / 648000
    re_arcsec = re_kpc / kpc_per_arcsec
    c["half_light_kpc"] = re_kpc

    # smooth: one Sersic component, n ~ 4, axis ratio 0.5-1
    n_smooth = np.clip(rng.normal(4.0, 0.7, n), 2.5, 6.0)
    q_smooth = rng.uniform(0.5, 1.0, n)
    # disks: bulge fraction grows with redness; thin exponential disk at random inclination
    bt = np.clip(rng.beta(2.0, 6.0, n) + 0.35 * redness * rng.random(n), 0.0, 0.8)
    n_bulge = np.clip(rng.normal(2.5, 0.8, n), 1.0, 4.5)
    cos_i = rng.random(n)
    thickness = rng.uniform(0.10, 0.20, n)  # intrinsic disk axis ratio q0
    q_disk = np.sqrt(cos_i**2 + thickness**2 * (1 - cos_i**2))
    c["bulge_fraction"] = np.where(smooth, 1.0, bt)
    c["sersic_n"] = np.where(smooth, n_smooth, n_bulge)
    c["r_e_bulge"] = np.where(smooth, re_arcsec, re_arcsec * rng.uniform(0.12, 0.3, n))
    c["r_e_disk"] = np.where(smooth, 0.0, re_arcsec)
    c["q_bulge"] = np.where(smooth, q_smooth, rng.uniform(0.65, 1.0, n))
    c["inclination_deg"] = np.where(smooth, 0.0, np.degrees(np.arccos(cos_i)))
    c["disk_thickness"] = np.where(smooth, 0.0, thickness)
    c["axis_ratio"] = np.where(smooth, q_smooth, q_disk)
    c["position_angle_deg"] = rng.uniform(0, 180, n)
    has_bar = (~smooth) & (rng.random(n) < cfg.bar_fraction)
    c["has_bar"] = has_bar
    c["bar_strength"] = np.where(has_bar, rng.uniform(0.4, 1.0, n), 0.0)
    c["bar_length"] = np.where(has_bar, rng.uniform(0.6, 1.4, n), 0.0)  # in units of r_e_disk
    # spiral arms: stronger in bluer, star-forming disks; "flocculent" disks have weak arms
    arm = np.clip(rng.beta(2.0, 2.0, n) * (1.15 - 0.6 * redness), 0, 1)
    c["arm_strength"] = np.where(smooth, 0.0, arm)
    c["n_arms"] = np.where(smooth, 0, rng.choice([2, 2, 2, 3, 4], size=n)).astype(np.int8)
    c["pitch_deg"] = np.where(smooth, 0.0, rng.uniform(10, 35, n))
    c["clump_rate"] = np.where(smooth, 0.0, 5.0 * (1 - redness) * arm)

    # Petrosian quantities (circularised profiles, before the PSF)
    bulge = (c["bulge_fraction"], c["r_e_bulge"] * np.sqrt(c["q_bulge"]), c["sersic_n"])
    disk = (1 - c["bulge_fraction"], np.maximum(c["r_e_disk"], 1e-3) * np.sqrt(q_disk),
            np.ones(n))
    f_petro, r50, r90 = petrosian([bulge, disk])
    c["petro_fraction"] = f_petro
    c["petro_r50"] = r50
    c["petro_r90"] = r90


def _sky(n: int, rng: np.random.Generator, cfg: MockPhysics) -> dict[str, np.ndarray]:
    """Positions and Galactic extinction; which galaxies lie in the spectroscopic footprint."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    cat, _ = reference.fit_reference_seds()
    in_fp = rng.random(n) < cfg.spec_footprint_fraction
    ra = np.empty(n)
    dec = np.empty(n)
    ebv = np.empty(n)
    # inside: near a real spectroscopic galaxy (the real footprint, clustered like it),
    # with that galaxy's SFD E(B-V) perturbed
    k = int(in_fp.sum())
    j = rng.integers(0, len(cat["ra"]), size=k)
    ra[in_fp] = (cat["ra"][j] + rng.normal(0, 0.7, k) / np.cos(np.radians(cat["dec"][j]))) % 360
    dec[in_fp] = np.clip(cat["dec"][j] + rng.normal(0, 0.7, k), -89.9, 89.9)
    ebv[in_fp] = cat["ebv"][j] * np.exp(rng.normal(0, 0.15, k))
    # outside: imaging-only areas (the southern Galactic cap away from the spectroscopic
    # stripes and low-latitude imaging), with a csc|b| dust model calibrated on the catalogue
    b_cat = SkyCoord(ra=cat["ra"] * u.deg, dec=cat["dec"] * u.deg).galactic.b.deg
    e0 = np.median(cat["ebv"] * np.abs(np.sin(np.radians(b_cat))))
    out = np.flatnonzero(~in_fp)
    got = 0
    while got < len(out):
        m = 4 * (len(out) - got) + 64
        r_ = rng.uniform(0, 360, m)
        d_ = np.degrees(np.arcsin(rng.uniform(-1, 1, m)))
        gb = SkyCoord(ra=r_ * u.deg, dec=d_ * u.deg).galactic.b.deg
        sgc = (((r_ > 310) | (r_ < 50)) & (d_ > -12) & (d_ < 36) & (np.abs(d_) > 1.5)
               & (np.abs(gb) > 20))
        lowlat = (((r_ > 95) & (r_ < 135)) | ((r_ > 235) & (r_ < 275))) & (d_ > -5) & (d_ < 65) \
            & (np.abs(gb) > 12) & (np.abs(gb) < 35)
        ok = np.flatnonzero(sgc | lowlat)[: len(out) - got]
        sel = out[got:got + len(ok)]
        ra[sel], dec[sel] = r_[ok], d_[ok]
        ebv[sel] = e0 / np.abs(np.sin(np.radians(gb[ok]))) * np.exp(rng.normal(0, 0.4, len(ok)))
        got += len(ok)
    ebv = np.clip(ebv, 0.002, 1.0)
    return {"ra": ra, "dec": dec, "ebv": ebv, "in_spec_footprint": in_fp}


def draw_population(n: int, rng: np.random.Generator, cfg: MockPhysics) -> Population:
    """Draw n mock galaxies that pass the main-sample cut, with all their parameters."""
    kept: list[dict] = []
    have = 0
    while have < n:
        m = int(1.3 * (n - have)) + 32
        c = _candidates(m, rng, cfg)
        _morphology(c, rng, cfg)
        petro_r = nmgy_to_mag(c["flux"][:, R_BAND] * c["petro_fraction"])
        ok = (petro_r <= MAIN_SAMPLE_R_LIMIT) & np.isfinite(petro_r) & np.all(c["flux"] > 0, 1)
        sel = np.flatnonzero(ok)[: n - have]
        kept.append({k: v[sel] for k, v in c.items()})
        have += len(sel)
    c = {k: np.concatenate([d[k] for d in kept]) for k in kept[0]}
    c.update(_sky(n, rng, cfg))

    # extinction: the sky dims by R_SF11 E(B-V) (Schlafly & Finkbeiner 2011); the catalogue
    # tabulates R_DR12 E(B-V) per band (DR12 convention), exactly like the paper's e_bv column
    c["e_bv"] = c["ebv"][:, None] * R_DR12[None, :]
    c["dimming_mag"] = c["ebv"][:, None] * R_SF11[None, :]

    # seeing and sky per galaxy
    fwhm_r = cfg.seeing_median_r * np.exp(cfg.seeing_sigma_ln * rng.standard_normal(n))
    c["psf_fwhm"] = fwhm_r[:, None] * (WAVELENGTH_EFF / WAVELENGTH_EFF[R_BAND])[None, :] ** -0.3
    c["sky_sigma"] = np.asarray(cfg.sky_sigma)[None, :] * np.exp(
        cfg.sky_sigma_scatter_ln * rng.standard_normal((n, 1)))
    # sub-pixel centre offsets of the cutout
    c["offset"] = rng.uniform(-0.5, 0.5, (n, 2))
    # contaminants
    rates = np.asarray(cfg.contaminant_rates)
    u_ = rng.random(n)
    edges = np.cumsum(rates)
    c["contaminant"] = np.where(u_ < edges[-1], np.searchsorted(edges, u_, side="right") + 1,
                                0).astype(np.int8)

    # spectroscopic labels: in the footprint, biased to bright, low-extinction galaxies
    petro_r = nmgy_to_mag(c["flux"][:, R_BAND] * c["petro_fraction"])  # extinction-corrected
    p_spec = (cfg.spec_completeness * (1 - 0.35 * _logistic((petro_r - 17.55) / 0.08))
              * np.exp(-c["ebv"] / 0.35))
    c["has_specz"] = c["in_spec_footprint"] & (rng.random(n) < p_spec)
    z_err = 10 ** rng.uniform(-5, -4, n) * (1 + c["z"])
    c["specz_err"] = z_err
    c["specz"] = c["z"] + z_err * rng.standard_normal(n)
    # Galaxy Zoo 2: r < 17 and petroR90_r > 3" among the spectroscopic main sample
    c["in_gz2"] = c["has_specz"] & (petro_r < GZ2_R_LIMIT) & (c["petro_r90"] > GZ2_R90_MIN_ARCSEC)
    c["n_volunteers"] = np.where(
        c["in_gz2"],
        cfg.gz2_volunteers_min + rng.negative_binomial(
            4, 4 / (4 + cfg.gz2_volunteers_extra_mean), n), 0).astype(np.int16)
    c["petro_mag_dered_r"] = petro_r
    return Population(c)
