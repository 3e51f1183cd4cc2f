"""The real SDSS galaxies the mock survey is drawn from.

The ``kcorrect`` wheel (Blanton & Roweis 2007) ships 10,000 real SDSS main-sample galaxies
(``data/test/gst_tests_small.fits``: RA, DEC, MODELFLUX and PETROFLUX in nanomaggies with
inverse variances, per-band EXTINCTION in magnitudes, spectroscopic Z), the Blanton & Roweis
templates and the SDSS filter responses. This module reads that catalogue and fits each
galaxy's spectral energy distribution with the kcorrect templates, so that the mock can
place the same kind of galaxy at another redshift with physically consistent colours.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import numpy as np

from ..constants import MAIN_SAMPLE_R_LIMIT, R_DR12, nmgy_to_mag

log = logging.getLogger(__name__)

#: Cosmology for distances and sizes: flat LambdaCDM, H0 = 70, Omega_m = 0.3, the one
#: Shen et al. (2003) used for their size-luminosity relations.
H0 = 70.0
OMEGA_M = 0.3


def cosmology():
    """The astropy cosmology used throughout the mock."""
    from astropy.cosmology import FlatLambdaCDM

    return FlatLambdaCDM(H0=H0, Om0=OMEGA_M)


def _catalog_path() -> str:
    import kcorrect

    path = os.path.join(os.path.dirname(kcorrect.__file__), "data", "test", "gst_tests_small.fits")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"the real SDSS catalogue that ships with kcorrect is missing: {path} "
            "(reinstall kcorrect>=5.1.4)")
    return path


def load_reference_catalog(main_sample: bool = True) -> dict[str, np.ndarray]:
    """The real SDSS galaxies shipped with ``kcorrect``, as numpy arrays.

    Keys: ``ra``, ``dec`` (deg), ``z`` (spectroscopic), ``model_flux``, ``model_flux_ivar``,
    ``petro_flux`` (N, 5; nanomaggies, observed, i.e. not corrected for extinction),
    ``extinction`` (N, 5; DR12 per-band extinction in magnitudes, like the paper's ``e_bv``),
    ``ebv`` (the SFD E(B-V) behind it), ``petro_mag`` (observed Petrosian magnitudes),
    ``petro_mag_dered`` (extinction-corrected), ``model_snr`` (N, 5).

    With ``main_sample=True`` (the default) only galaxies with finite, positive fluxes and
    extinction-corrected Petrosian r <= 17.77 are kept, i.e. the SDSS main galaxy sample cut
    the mock applies too.
    """
    from astropy.io import fits

    with fits.open(_catalog_path(), memmap=False) as hdul:
        t = hdul[1].data
        cat = {
            "ra": np.asarray(t["RA"], dtype=np.float64),
            "dec": np.asarray(t["DEC"], dtype=np.float64),
            "z": np.asarray(t["Z"], dtype=np.float64),
            "model_flux": np.asarray(t["MODELFLUX"], dtype=np.float64),
            "model_flux_ivar": np.asarray(t["MODELFLUX_IVAR"], dtype=np.float64),
            "petro_flux": np.asarray(t["PETROFLUX"], dtype=np.float64),
            "extinction": np.asarray(t["EXTINCTION"], dtype=np.float64),
        }
    cat["ebv"] = np.mean(cat["extinction"] / R_DR12, axis=1)
    cat["petro_mag"] = nmgy_to_mag(cat["petro_flux"])
    cat["petro_mag_dered"] = cat["petro_mag"] - cat["extinction"]
    cat["model_snr"] = cat["model_flux"] * np.sqrt(np.clip(cat["model_flux_ivar"], 0, None))
    if main_sample:
        ok = (np.all(cat["model_flux"] > 0, axis=1) & np.all(cat["petro_flux"] > 0, axis=1)
              & np.all(cat["model_flux_ivar"] > 0, axis=1)
              & (cat["petro_mag_dered"][:, 2] <= MAIN_SAMPLE_R_LIMIT)
              & (cat["z"] > 0.005) & (cat["z"] < 0.6))
        cat = {k: v[ok] for k, v in cat.items()}
    return cat


@dataclass(frozen=True)
class SEDFits:
    """Template fits of the reference galaxies.

    coeffs: (N, 5) kcorrect template coefficients of the extinction-corrected model fluxes.
    residual: (N, 5) observed / reconstructed flux per band, kept so that the mock's colours
        follow the real ones where the five templates cannot (mostly u band, ~7%).
    abs_mag_r: (N,) rest-frame absolute magnitude in SDSS r (band shift 0, H0 = 70).
    """

    z: np.ndarray
    coeffs: np.ndarray
    residual: np.ndarray
    abs_mag_r: np.ndarray


@functools.lru_cache(maxsize=1)
def kcorrect_model():
    """A kcorrect model for SDSS ugriz in the SDSS flux system (no AB offsets applied).

    The mock works in the native SDSS nanomaggie system, like the catalogue and images.
    """
    import kcorrect.kcorrect

    return kcorrect.kcorrect.KcorrectSDSS(abcorrect=False, redshift_range=[0.0, 0.8],
                                          nredshift=1600, cosmo=cosmology())


@functools.lru_cache(maxsize=1)
def fit_reference_seds() -> tuple[dict[str, np.ndarray], SEDFits]:
    """Fit kcorrect templates to every reference galaxy (about 10 s, cached per process)."""
    cat = load_reference_catalog()
    kc = kcorrect_model()
    dered = cat["model_flux"] * 10 ** (0.4 * cat["extinction"])  # nmgy, extinction-corrected
    ivar = cat["model_flux_ivar"] / 10 ** (0.8 * cat["extinction"])
    maggies = dered * 1e-9
    coeffs = kc.fit_coeffs(redshift=cat["z"], maggies=maggies, ivar=ivar * 1e18)
    recon = kc.reconstruct(redshift=cat["z"], coeffs=coeffs)
    with np.errstate(divide="ignore", invalid="ignore"):
        residual = np.clip(np.where(recon > 0, maggies / recon, 1.0), 0.5, 2.0)
    absmag = absolute_mag_r(cat["z"], coeffs)
    return cat, SEDFits(z=cat["z"], coeffs=np.asarray(coeffs, np.float64),
                        residual=residual, abs_mag_r=absmag)


def observed_maggies(z: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
    """Observed-frame ugriz maggies (N, 5) of template coefficients at redshift z."""
    return np.asarray(kcorrect_model().reconstruct(redshift=z, coeffs=coeffs), dtype=np.float64)


def absolute_mag_r(z: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
    """Rest-frame SDSS r absolute magnitude (band shift 0) of coefficients at redshift z."""
    kc = kcorrect_model()
    rest = np.asarray(kc.reconstruct_out(redshift=np.zeros_like(z), coeffs=coeffs), np.float64)
    dm = cosmology().distmod(z).value
    with np.errstate(divide="ignore", invalid="ignore"):
        return -2.5 * np.log10(rest[:, 2]) - dm


def distance_modulus(z: np.ndarray) -> np.ndarray:
    return np.asarray(cosmology().distmod(np.asarray(z)).value, dtype=np.float64)
