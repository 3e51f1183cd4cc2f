"""Physical and survey constants shared by every part of sdsscl.

Every number here carries its source. Bands are always in the order ``ugriz``
(channel 0 is u), as in the authors' released HDF5 files (DATA-FACTS).
"""
from __future__ import annotations

import numpy as np

#: SDSS passbands, in channel order.
BANDS: tuple[str, ...] = ("u", "g", "r", "i", "z")
N_BANDS = 5
R_BAND = 2  # channel index of r

#: SDSS effective wavelengths in Angstrom (SDSS DR docs; DATA-FACTS).
WAVELENGTH_EFF = np.array([3551.0, 4686.0, 6166.0, 7480.0, 8932.0])

#: Extinction coefficients A_b / E(B-V) of Schlafly & Finkbeiner (2011, Table 6, R_V = 3.1),
#: the ones the paper uses for its reddening augmentation and for de-reddening.
R_SF11 = np.array([4.239, 3.303, 2.285, 1.698, 1.263])

#: Coefficients SDSS DR12 used to tabulate its per-band ``extinction`` column from the
#: SFD98 E(B-V) map. The authors' ``e_bv`` column holds ``R_DR12 * E(B-V)`` (magnitudes).
R_DR12 = np.array([5.155, 3.793, 2.751, 2.086, 1.479])

#: SDSS pixel scale in arcsec per pixel.
PIXEL_SCALE = 0.396

#: Cutout size of the authors' files (Appendix A) and the crop the network sees (Section 2).
CUTOUT_SIZE = 107
CROP_SIZE = 64
#: Maximum jitter of the crop centre, pixels (Section 2: U(-7, 7) per axis, inclusive).
MAX_JITTER = 7

#: Zero point of the nanomaggy flux unit: m = 22.5 - 2.5 log10(f / nmgy).
NMGY_ZEROPOINT = 22.5

#: SDSS main galaxy sample limit on extinction-corrected Petrosian r (Strauss et al. 2002).
MAIN_SAMPLE_R_LIMIT = 17.77

#: Galaxy Zoo 2 magnitude and size limits (Willett et al. 2013): r < 17, petroR90_r > 3 arcsec.
GZ2_R_LIMIT = 17.0
GZ2_R90_MIN_ARCSEC = 3.0

#: Photo-z binning of Pasquet et al. (2019), used by the paper (Appendix E.2).
PHOTOZ_ZMAX = 0.4
PHOTOZ_NBINS = 180

#: The HDF5 keys of the authors' released files (DATA-FACTS), each with its per-galaxy shape.
AUTHOR_KEYS: dict[str, tuple[int, ...]] = {
    "ObjID": (),
    "dec": (),
    "e_bv": (N_BANDS,),
    "images": (N_BANDS, CUTOUT_SIZE, CUTOUT_SIZE),
    "ra": (),
    "specObjID": (),
    "specz_redshift": (),
    "specz_redshift_err": (),
}

#: Sentinel for "no spectroscopic label": redshift and its error are NaN and specObjID is this.
NO_SPECOBJID = -1


def nmgy_to_mag(flux) -> np.ndarray:
    """AB magnitude of a flux in nanomaggies (NaN for non-positive flux)."""
    flux = np.asarray(flux, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flux > 0, NMGY_ZEROPOINT - 2.5 * np.log10(flux), np.nan)


def mag_to_nmgy(mag) -> np.ndarray:
    """Flux in nanomaggies of an AB magnitude."""
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=np.float64) - NMGY_ZEROPOINT))


def ebv_from_extinction(e_bv) -> np.ndarray:
    """The authors' E(B-V) from a per-band DR12 extinction row: mean(e_bv / R_DR12)."""
    return np.mean(np.asarray(e_bv, dtype=np.float64) / R_DR12, axis=-1)
