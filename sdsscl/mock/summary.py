"""Headline statistics of a mock survey beside the real SDSS catalogue.

Both sides go through the same functions, so each number is computed the same way for the
mock and for the 10,000 real galaxies shipped with ``kcorrect``.
"""
from __future__ import annotations

import json

import h5py
import numpy as np
from scipy import stats

from ..constants import R_DR12, R_SF11, nmgy_to_mag
from ..gz2 import QUESTIONS
from .reference import load_reference_catalog

#: Galaxy Zoo 2 reference numbers (Willett et al. 2013; Masters et al. 2011; DATA-FACTS).
GZ2_REFERENCE = {"smooth_fraction": 0.45, "featured_fraction": 0.55, "bar_fraction_face_on": 0.294}


def bimodality_coefficient(x: np.ndarray) -> float:
    """Sarle's bimodality coefficient (skew^2 + 1) / kurtosis; > 5/9 suggests two modes."""
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float((stats.skew(x) ** 2 + 1) / (stats.kurtosis(x, fisher=False)))


def red_fraction(g_r: np.ndarray, z: np.ndarray) -> float:
    """Fraction on the red side of a redshift-dependent g - r cut (observed frame, dereddened).

    The cut 0.65 + 2.2 z follows the red sequence's observed-frame reddening with redshift
    over 0 < z < 0.25 (a fixed-definition divider, applied identically to mock and real).
    """
    ok = np.isfinite(g_r) & np.isfinite(z)
    return float(np.mean(g_r[ok] > 0.65 + 2.2 * z[ok]))


def _photometry_stats(z, petro_r_dered, flux_dered, snr) -> dict:
    mags = nmgy_to_mag(flux_dered)
    g_r = mags[:, 1] - mags[:, 2]
    return {
        "n": int(len(z)),
        "z_median": float(np.median(z)),
        "z_p05_p95": [float(v) for v in np.percentile(z, [5, 95])],
        "r_petro_percentiles_5_25_50_75_95": [float(v) for v in
                                             np.percentile(petro_r_dered, [5, 25, 50, 75, 95])],
        "g_r_median": float(np.nanmedian(g_r)),
        "g_r_bimodality_coefficient": bimodality_coefficient(g_r),
        "red_fraction": red_fraction(g_r, z),
        "snr_median_ugriz": [float(v) for v in np.nanmedian(snr, axis=0)],
    }


def reference_stats() -> dict:
    """The same statistics for the real SDSS main-sample galaxies in kcorrect."""
    cat = load_reference_catalog()
    dered = cat["model_flux"] * 10 ** (0.4 * cat["extinction"])
    return _photometry_stats(cat["z"], cat["petro_mag_dered"][:, 2], dered, cat["model_snr"])


def mock_columns(path) -> dict[str, np.ndarray]:
    """The catalogue-level columns of a mock file the comparisons need (no images read)."""
    with h5py.File(path, "r") as f:
        out = {
            "z": f["truth/redshift"][:],
            "specz": f["specz_redshift"][:],
            "e_bv": f["e_bv"][:],
            "model_flux": f["catalog/model_flux"][:].astype(np.float64),
            "petro_mag": f["catalog/petro_mag"][:].astype(np.float64),
            "model_snr": f["catalog/model_snr"][:].astype(np.float64),
            "morphology": f["truth/morphology"][:],
            "is_edge_on": f["truth/is_edge_on"][:],
            "has_bar": f["truth/has_bar"][:],
            "contaminant": f["truth/contaminant"][:],
            "in_spec_footprint": f["catalog/in_spec_footprint"][:],
            "ra": f["ra"][:],
            "dec": f["dec"][:],
        }
        for q in QUESTIONS:
            out[f"votes_{q}"] = f[f"gz2/{q}/votes"][:]
        out["n_volunteers"] = f["gz2/n_volunteers"][:]
        out["contaminant_names"] = np.array(json.loads(f["truth/contaminant"].attrs["names"]))
    return out


def gz2_fractions(c: dict) -> dict:
    """Majority-vote morphology fractions of the GZ2-classified mock galaxies (DATA-FACTS
    defines the GZ2 references the same way: majority answers)."""
    sm, eo, bar = QUESTIONS["smooth"], QUESTIONS["edge_on"], QUESTIONS["bar"]
    in_gz2 = c["n_volunteers"] > 0
    p_smooth = sm.binary_fraction(c["votes_smooth"])
    p_edge = eo.binary_fraction(c["votes_edge_on"])
    p_bar = bar.binary_fraction(c["votes_bar"])
    n_edge = eo.binary_count(c["votes_edge_on"])
    n_bar = bar.binary_count(c["votes_bar"])
    featured = in_gz2 & (p_smooth < 0.5)
    face_on = featured & (n_edge >= 5) & (p_edge < 0.5)
    return {
        "n_gz2": int(in_gz2.sum()),
        "smooth_fraction": float(np.mean(p_smooth[in_gz2] >= 0.5)),
        "featured_fraction": float(np.mean(p_smooth[in_gz2] < 0.5)),
        "edge_on_fraction_of_featured": float(np.mean(p_edge[featured & (n_edge >= 5)] >= 0.5)),
        "bar_fraction_face_on": float(np.mean(p_bar[face_on & (n_bar >= 5)] >= 0.5)),
        "median_volunteers": float(np.median(c["n_volunteers"][in_gz2])),
        "truth_disk_fraction": float(np.mean(c["morphology"][in_gz2] == 1)),
        "truth_bar_fraction_of_disks": float(np.mean(c["has_bar"][in_gz2 & (c["morphology"] == 1)])),
        "hq_fraction_smooth_question": float(np.mean((p_smooth[in_gz2] < 0.2) | (p_smooth[in_gz2] > 0.8))),
    }


def summarize_mock(path) -> dict:
    """Headline statistics of the mock at ``path`` beside the real SDSS catalogue.

    Returns ``{"mock": {...}, "sdss": {...}, "ks": {...}, "gz2": {...}, "labels": {...}}``.
    KS entries are two-sample Kolmogorov-Smirnov statistics D (not p-values: with tens of
    thousands of galaxies any tiny difference is "significant"; D says how large it is).
    """
    c = mock_columns(path)
    ebv = np.mean(c["e_bv"] / R_DR12, axis=1)
    dim = 10 ** (0.4 * R_SF11[None, :] * ebv[:, None])  # undo the dimming (paper's recipe)
    flux_dered = c["model_flux"] * dim
    petro_r_dered = c["petro_mag"][:, 2] - 2.5 * np.log10(dim[:, 2])
    mock = _photometry_stats(c["z"], petro_r_dered, flux_dered, c["model_snr"])
    sdss = reference_stats()
    cat = load_reference_catalog()
    ref_dered = cat["model_flux"] * 10 ** (0.4 * cat["extinction"])

    def colour(fl, a, b):
        m = nmgy_to_mag(fl)
        return m[:, a] - m[:, b]

    def ks_d(x, y):
        # a measured flux at or below zero (a few faint u bands) has no colour: left out on both
        # sides, as the real sample's own cut leaves such galaxies out
        return float(stats.ks_2samp(x[np.isfinite(x)], y[np.isfinite(y)]).statistic)

    ks = {
        "z": ks_d(c["z"], cat["z"]),
        "r_petro": ks_d(petro_r_dered, cat["petro_mag_dered"][:, 2]),
        "u_g": ks_d(colour(flux_dered, 0, 1), colour(ref_dered, 0, 1)),
        "g_r": ks_d(colour(flux_dered, 1, 2), colour(ref_dered, 1, 2)),
        "r_i": ks_d(colour(flux_dered, 2, 3), colour(ref_dered, 2, 3)),
        "i_z": ks_d(colour(flux_dered, 3, 4), colour(ref_dered, 3, 4)),
    }
    has = np.isfinite(c["specz"])
    labels = {
        "n": int(len(has)),
        "labelled_fraction": float(has.mean()),
        "ebv_median_labelled": float(np.median(ebv[has])),
        "ebv_median_unlabelled": float(np.median(ebv[~has])) if (~has).any() else float("nan"),
        "r_median_labelled": float(np.median(petro_r_dered[has])),
        "r_median_unlabelled": float(np.median(petro_r_dered[~has])) if (~has).any() else float("nan"),
        "contaminant_fractions": {str(name): float(np.mean(c["contaminant"] == k))
                                  for k, name in enumerate(c["contaminant_names"])},
        "paper_labelled_fraction": 517190 / (517190 + 845254),
    }
    return {"mock": mock, "sdss": sdss, "ks": ks, "gz2": gz2_fractions(c),
            "gz2_reference": GZ2_REFERENCE, "labels": labels}
