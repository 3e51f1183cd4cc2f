"""Generate a mock SDSS survey file: population, images in parallel, GZ2 votes, HDF5.

The file has exactly the layout of the authors' released data (DATA-FACTS): root datasets
``images`` (N, 5, 107, 107) float32 ugriz nanomaggies, ``e_bv`` (N, 5), ``ra``, ``dec``,
``ObjID``, ``specObjID``, ``specz_redshift``, ``specz_redshift_err``, plus groups
``catalog/`` (what an SDSS catalogue would list), ``gz2/`` (simulated Galaxy Zoo 2 votes) and
``truth/`` (the generating parameters). A galaxy without a spectrum has
``specz_redshift = NaN``, ``specz_redshift_err = NaN`` and ``specObjID = -1``.

Catalogue photometry is *measured*: ``catalog/model_flux`` is the galaxy's observed model flux
(``truth/model_flux``) plus Gaussian noise of its catalogued error ``model_flux_ivar**-0.5``
(from the matched-filter S/N of its rendered image), and ``catalog/petro_mag`` carries the same
relative error (to first order in magnitudes), as an SDSS catalogue's fluxes would. Very faint
u-band fluxes can therefore be negative, as in SDSS.

Determinism: the population comes from ``SeedSequence(seed, spawn_key=(0,))``, galaxy i
renders from ``SeedSequence(seed, spawn_key=(1, i))`` and its catalogue noise comes from
``SeedSequence(seed, spawn_key=(2, i))``, so a file is bit-identical whatever the number of
worker processes. The file is written as ``<name>.partial`` chunk by chunk with a
record of finished chunks; an interrupted run resumes from it, and only a finished file is
renamed to its final name.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np

from ..constants import (CUTOUT_SIZE, NO_SPECOBJID, N_BANDS, PIXEL_SCALE, R_BAND,
                         nmgy_to_mag)
from ..gz2 import TREE
from .population import CONTAMINANTS, MockPhysics, Population, draw_population
from .render import render_galaxy
from .volunteers import simulate_votes

log = logging.getLogger(__name__)

FORMAT = "sdsscl-survey-1"
GENERATOR = "sdsscl.mock"
GENERATOR_VERSION = "1.1"   # 1.1: measured (noisy) catalogue photometry
OBJID_BASE = 1_237_700_000_000_000_000
SPECOBJID_BASE = 300_000_000_000_000_000


def _config_json(n: int, seed: int, cfg: MockPhysics) -> str:
    return json.dumps({"n": n, "seed": seed, "generator_version": GENERATOR_VERSION,
                       "mock": asdict(cfg)}, sort_keys=True)


def _render_chunk(args):
    """Worker: render galaxies [start, stop) and simulate their votes."""
    start, rows, seed, cfg = args
    k = len(rows)
    images = np.empty((k, N_BANDS, CUTOUT_SIZE, CUTOUT_SIZE), np.float32)
    snr = np.empty((k, N_BANDS))
    flux_cut = np.empty((k, N_BANDS))
    votes = {q.name: np.zeros((k, len(q.answers)), np.int16) for q in TREE}
    p_mean = np.zeros((k, 5))
    for j, p in enumerate(rows):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, start + j)))
        out = render_galaxy(p, rng, cfg)
        images[j] = out["image"]
        snr[j] = out["model_snr"]
        flux_cut[j] = out["model_flux_cutout"]
        v = simulate_votes(p, out["model_snr"][R_BAND], rng, cfg)
        for q in TREE:
            votes[q.name][j] = v[q.name]
        pm = v["p_mean"]
        p_mean[j] = (*pm["smooth"], pm["edge_on"], pm["bar"])
    return start, {"images": images, "snr": snr, "flux_cutout": flux_cut, "votes": votes,
                   "p_mean": p_mean}


def _write_population(f: h5py.File, pop: Population, n: int) -> None:
    """Everything that does not depend on the rendered images."""
    c = pop.columns
    idx = np.arange(n, dtype=np.int64)
    f.create_dataset("ObjID", data=OBJID_BASE + idx)
    f.create_dataset("ra", data=c["ra"].astype(np.float64))
    f.create_dataset("dec", data=c["dec"].astype(np.float64))
    f.create_dataset("e_bv", data=c["e_bv"].astype(np.float32))
    has = c["has_specz"]
    f.create_dataset("specObjID", data=np.where(has, SPECOBJID_BASE + idx, NO_SPECOBJID))
    f.create_dataset("specz_redshift", data=np.where(has, c["specz"], np.nan).astype(np.float32))
    f.create_dataset("specz_redshift_err",
                     data=np.where(has, c["specz_err"], np.nan).astype(np.float32))
    f["specObjID"].attrs["missing"] = NO_SPECOBJID
    f["specz_redshift"].attrs["missing"] = "NaN: no spectrum"
    f["e_bv"].attrs["description"] = "DR12 per-band extinction R_DR12 * E(B-V)_SFD, mag (ugriz)"

    dim = 10 ** (-0.4 * c["dimming_mag"])
    flux_obs = c["flux"] * dim
    fwhm_r = c["psf_fwhm"][:, R_BAND]
    cat = f.create_group("catalog")
    cat.attrs["description"] = ("What an SDSS catalogue would list: observed (not "
                                "extinction-corrected) fluxes and magnitudes with measurement "
                                "noise of their catalogued errors, r-band radii")
    # measured photometry: filled chunk by chunk once the images give each galaxy's S/N
    cat.create_dataset("model_flux", shape=(n, N_BANDS), dtype=np.float32)
    cat.create_dataset("petro_mag", shape=(n, N_BANDS), dtype=np.float32)
    # observed radii: intrinsic Petrosian radii broadened by the seeing (in quadrature with
    # the radii enclosing 50% / 90% of a Gaussian PSF's light)
    cat.create_dataset("petro_r50", data=np.hypot(c["petro_r50"], 0.5 * fwhm_r).astype(np.float32))
    cat.create_dataset("petro_r90", data=np.hypot(c["petro_r90"], 0.911 * fwhm_r).astype(np.float32))
    cat.create_dataset("in_spec_footprint", data=c["in_spec_footprint"])
    cat.create_dataset("psf_fwhm", data=c["psf_fwhm"].astype(np.float32))

    t = f.create_group("truth")
    t.attrs["description"] = "Generating parameters of the mock (not observable)"
    t.create_dataset("redshift", data=c["z"].astype(np.float64))
    t.create_dataset("ebv", data=c["ebv"].astype(np.float32))
    t["ebv"].attrs["description"] = ("SFD E(B-V); the image is dimmed by R_SF11 * E(B-V) "
                                     "(Schlafly & Finkbeiner 2011)")
    t.create_dataset("flux_dered", data=c["flux"].astype(np.float32))
    t.create_dataset("model_flux", data=flux_obs.astype(np.float32))
    t["model_flux"].attrs["description"] = "observed (dimmed) model flux without measurement noise, nmgy"
    t.create_dataset("petro_mag", data=nmgy_to_mag(flux_obs * c["petro_fraction"][:, None]).astype(np.float32))
    t["petro_mag"].attrs["description"] = "observed Petrosian magnitude without measurement noise"
    for key in ("morphology", "bulge_fraction", "sersic_n", "r_e_bulge", "r_e_disk",
                "q_bulge", "axis_ratio", "inclination_deg", "disk_thickness",
                "position_angle_deg", "has_bar", "bar_strength", "bar_length",
                "arm_strength", "n_arms", "pitch_deg", "clump_rate", "abs_mag_r",
                "half_light_kpc", "petro_fraction", "source_index", "sky_sigma",
                "psf_fwhm", "in_gz2", "has_specz"):
        v = c[key]
        t.create_dataset(key, data=v.astype(np.float32) if v.dtype == np.float64 else v)
    t.create_dataset("petro_r50_intrinsic", data=c["petro_r50"].astype(np.float32))
    t.create_dataset("petro_r90_intrinsic", data=c["petro_r90"].astype(np.float32))
    t.create_dataset("template_coeffs", data=c["coeffs"].astype(np.float64))
    t.create_dataset("is_edge_on", data=(c["morphology"] == 1) & (c["inclination_deg"] >= 75))
    t.create_dataset("contaminant", data=c["contaminant"])
    t["contaminant"].attrs["names"] = json.dumps(CONTAMINANTS)
    t["morphology"].attrs["names"] = json.dumps(["smooth", "disk"])
    t["r_e_bulge"].attrs["unit"] = t["r_e_disk"].attrs["unit"] = "arcsec"

    g = f.create_group("gz2")
    g.create_dataset("n_volunteers", data=c["n_volunteers"].astype(np.int16))
    for q in TREE:
        qg = g.create_group(q.name)
        qg.attrs["answers"] = json.dumps(q.answers)
        qg.attrs["text"] = q.text
        qg.create_dataset("votes", shape=(n, len(q.answers)), dtype=np.int16)
        qg.create_dataset("fraction", shape=(n, len(q.answers)), dtype=np.float32)


def _create_partial(partial: Path, pop: Population, n: int, seed: int, cfg: MockPhysics,
                    chunk: int) -> None:
    with h5py.File(partial, "w", libver="v110") as f:
        f.attrs["format"] = FORMAT
        f.attrs["generator"] = GENERATOR
        f.attrs["generator_version"] = GENERATOR_VERSION
        f.attrs["seed"] = seed
        f.attrs["n_galaxies"] = n
        f.attrs["config"] = _config_json(n, seed, cfg)
        f.attrs["pixel_scale_arcsec"] = PIXEL_SCALE
        f.attrs["bands"] = "ugriz"
        f.create_dataset("images", shape=(n, N_BANDS, CUTOUT_SIZE, CUTOUT_SIZE),
                         dtype=np.float32, chunks=(1, N_BANDS, CUTOUT_SIZE, CUTOUT_SIZE))
        f["images"].attrs["unit"] = "nanomaggies"
        _write_population(f, pop, n)
        cat = f["catalog"]
        cat.create_dataset("model_snr", shape=(n, N_BANDS), dtype=np.float32)
        cat.create_dataset("model_flux_ivar", shape=(n, N_BANDS), dtype=np.float32)
        f["truth"].create_dataset("model_flux_cutout", shape=(n, N_BANDS), dtype=np.float32)
        f["truth"].create_dataset("volunteer_p_mean", shape=(n, 5), dtype=np.float32)
        f["truth/volunteer_p_mean"].attrs["columns"] = json.dumps(
            ["smooth", "features_or_disk", "star_or_artifact", "edge_on_yes", "bar_yes"])
        n_chunks = -(-n // chunk)
        prog = f.create_group("_progress")
        prog.attrs["chunk"] = chunk
        prog.create_dataset("done", data=np.zeros(n_chunks, bool))


def _measurement_noise(seed: int, start: int, k: int) -> np.ndarray:
    """Standard normal catalogue noise (k, 5) of galaxies start..start+k-1, one stream each."""
    z = np.empty((k, N_BANDS))
    for j in range(k):
        z[j] = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2, start + j))).standard_normal(N_BANDS)
    return z


def _write_chunk(f: h5py.File, start: int, res: dict) -> None:
    k = len(res["images"])
    sl = slice(start, start + k)
    f["images"][sl] = res["images"]
    snr = res["snr"].astype(np.float32)
    flux = f["truth/model_flux"][sl]
    f["catalog/model_snr"][sl] = snr
    f["catalog/model_flux_ivar"][sl] = (snr / flux) ** 2
    # measured photometry: the true flux plus noise of the catalogued error flux / S/N; the
    # Petrosian magnitude with the same relative error, to first order (2.5 / ln 10 = 1.0857)
    z = _measurement_noise(int(f.attrs["seed"]), start, k)
    rel = z / snr.astype(np.float64)
    f["catalog/model_flux"][sl] = (flux * (1.0 + rel)).astype(np.float32)
    f["catalog/petro_mag"][sl] = (f["truth/petro_mag"][sl] - 2.5 / np.log(10) * rel).astype(np.float32)
    f["truth/model_flux_cutout"][sl] = res["flux_cutout"].astype(np.float32)
    f["truth/volunteer_p_mean"][sl] = res["p_mean"].astype(np.float32)
    for q in TREE:
        v = res["votes"][q.name]
        f[f"gz2/{q.name}/votes"][sl] = v
        tot = v.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            f[f"gz2/{q.name}/fraction"][sl] = np.where(tot > 0, v / np.maximum(tot, 1), np.nan)


def _matches(path: Path, n: int, seed: int, cfg: MockPhysics) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("config") == _config_json(n, seed, cfg)
    except OSError:
        return False


def generate_mock(path, n: int, seed: int, workers: int = 1, progress: bool = True,
                  config: MockPhysics | None = None, chunk: int = 64,
                  overwrite: bool = False) -> Path:
    """Write a mock survey of ``n`` galaxies to ``path`` (HDF5, the authors' layout).

    An existing complete file with the same n, seed and configuration is kept as it is; one
    with other settings raises unless ``overwrite``. An interrupted run leaves
    ``<path>.partial``, which the next call with the same settings resumes.
    Returns the path of the finished file.
    """
    cfg = config or MockPhysics()
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    if path.exists():
        if _matches(path, n, seed, cfg):
            log.info("%s is already a complete mock with these settings", path)
            return path
        if not overwrite:
            raise FileExistsError(f"{path} exists with other settings (n, seed or config); "
                                  "pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)

    if partial.exists() and not _matches(partial, n, seed, cfg):
        log.warning("removing %s: it was started with other settings", partial)
        partial.unlink()
    # the population is cheap and deterministic: drawn again when resuming
    pop = draw_population(n, np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,))), cfg)
    if partial.exists():
        log.info("resuming %s", partial)
    else:
        _create_partial(partial, pop, n, seed, cfg, chunk)

    with h5py.File(partial, "r+") as f:
        chunk = int(f["_progress"].attrs["chunk"])
        done = f["_progress/done"][:]
        todo = [i for i in range(len(done)) if not done[i]]
        tasks = [(i * chunk, [pop.row(j) for j in range(i * chunk, min(n, (i + 1) * chunk))],
                  seed, cfg) for i in todo]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, initial=int(done.sum()) * chunk if done.any() else 0,
                       unit="gal", desc=f"mock {path.name}")
        if workers == 1:
            results = map(_render_chunk, tasks)
            pool = None
        else:
            pool = mp.get_context("spawn").Pool(workers)
            results = pool.imap(_render_chunk, tasks)
        try:
            for start, res in results:
                _write_chunk(f, start, res)
                f["_progress/done"][start // chunk] = True
                f.flush()
                if bar is not None:
                    bar.update(len(res["images"]))
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
            if bar is not None:
                bar.close()
        del f["_progress"]
        f.attrs["complete"] = True
    os.replace(partial, path)
    return path


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
