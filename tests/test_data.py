"""Tests for sdsscl.data: every file is built here, in tmp_path, with h5py."""
from __future__ import annotations

import json
import os
import pickle

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from sdsscl import data
from sdsscl.constants import AUTHOR_KEYS, NO_SPECOBJID, R_DR12, R_SF11
from sdsscl.data import (DataFormatError, SurveyDataset, atomic_path, band_mad, deredden,
                         gz2_min_votes, has_specz, load_splits, make_splits, resolve_paths,
                         save_splits, scan_pixels, validate_file, validate_files)
from sdsscl.gz2 import TREE

N = 12
SIZE = 107
OBJID0 = 1237648720693755904  # a real-looking SDSS ObjID (> 2**53: must stay int64)


def survey_arrays(n=N, seed=0, objid_start=OBJID0, gz2=False, catalog=False):
    """The authors' eight keys (plus optional mock groups) for n galaxies."""
    rng = np.random.default_rng(seed)
    arrays = {
        "images": rng.normal(0.0, 0.05, (n, 5, SIZE, SIZE)).astype(np.float32),
        "e_bv": np.outer(0.02 + 0.01 * np.arange(n), R_DR12),
        "ra": rng.uniform(0, 360, n),
        "dec": rng.uniform(-10, 60, n),
        "ObjID": objid_start + np.arange(n, dtype=np.int64),
        "specObjID": 299489677444933632 + np.arange(n, dtype=np.int64),
        "specz_redshift": rng.uniform(0.01, 0.3, n),
        "specz_redshift_err": np.full(n, 1e-4),
    }
    if catalog:
        arrays["catalog/petro_mag"] = rng.uniform(14, 17.7, (n, 5)).astype(np.float32)
        arrays["catalog/petro_r50"] = rng.uniform(1, 5, n).astype(np.float32)
    if gz2:
        arrays["gz2/n_volunteers"] = np.full(n, 40, np.int16)
        for q in TREE:
            votes = rng.integers(0, 6, (n, len(q.answers))).astype(np.int16)
            arrays[f"gz2/{q.name}/votes"] = votes
            with np.errstate(invalid="ignore"):
                arrays[f"gz2/{q.name}/fraction"] = (votes / votes.sum(1, keepdims=True)).astype(np.float32)
    return arrays


def write(path, arrays=None, attrs=None, **kwargs):
    arrays = survey_arrays(**kwargs) if arrays is None else arrays
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
    return arrays


@pytest.fixture
def author_file(tmp_path):
    path = tmp_path / "sdss_w_specz_valid.h5"
    return path, write(path)


# --------------------------------------------------------------------------- loading


def test_author_file_loads(author_file):
    path, arrays = author_file
    info = validate_file(path)
    assert info.n == N and set(info.keys) == set(AUTHOR_KEYS) and not info.is_mock
    ds = SurveyDataset(path, columns=("specz_redshift", "e_bv"))
    assert len(ds) == N and ds.n_total == N
    item = ds[3]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (5, SIZE, SIZE)
    np.testing.assert_array_equal(item["image"].numpy(), arrays["images"][3])
    assert item["index"] == 3 and item["ObjID"] == OBJID0 + 3
    assert item["specz_redshift"].dtype == torch.float64  # the file's dtype is kept
    assert float(item["specz_redshift"]) == arrays["specz_redshift"][3]
    np.testing.assert_array_equal(item["e_bv"].numpy(), arrays["e_bv"][3])
    np.testing.assert_array_equal(ds.objids, arrays["ObjID"])
    np.testing.assert_array_equal(ds.column("specz_redshift"), arrays["specz_redshift"])
    assert ds[-1]["index"] == N - 1
    with pytest.raises(IndexError):
        ds[N]
    quick = SurveyDataset(path, validate=False)
    np.testing.assert_array_equal(quick[3]["image"].numpy(), arrays["images"][3])


def test_deredden_author_recipe(tmp_path):
    arrays = survey_arrays()
    arrays["e_bv"] = np.tile(R_DR12 * 0.1, (N, 1))  # E(B-V) = 0.1 for every galaxy
    path = tmp_path / "red.h5"
    write(path, arrays)
    item = SurveyDataset(path, deredden=True)[5]
    # 10**(0.4 * R_SF11 * 0.1), written out: u is brightened by 47.8%, z by 12.3%.
    factor = np.array([1.477611, 1.355564, 1.234241, 1.169284, 1.123363])
    np.testing.assert_allclose(factor, 10 ** (0.4 * R_SF11 * 0.1), rtol=1e-6)
    np.testing.assert_allclose(item["image"].numpy(), arrays["images"][5] * factor[:, None, None],
                               rtol=1e-5, atol=1e-7)
    assert item["image"].dtype == torch.float32


def test_deredden_types_and_batches():
    rng = np.random.default_rng(1)
    images = rng.normal(1, 0.1, (3, 5, 8, 8)).astype(np.float32)
    e_bv = np.outer([0.0, 0.1, 0.3], R_DR12)
    out = deredden(images, e_bv)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    expected = images * (10 ** (0.4 * R_SF11[None, :] * np.array([0.0, 0.1, 0.3])[:, None]))[..., None, None]
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_array_equal(out[0], images[0])  # E(B-V) = 0 changes nothing
    np.testing.assert_allclose(deredden(images[1], e_bv[1]), out[1], rtol=1e-6)  # single image
    tout = deredden(torch.from_numpy(images), torch.from_numpy(e_bv))
    assert isinstance(tout, torch.Tensor) and tout.dtype == torch.float32
    np.testing.assert_allclose(tout.numpy(), out, rtol=1e-6)
    np.testing.assert_allclose(deredden(images, e_bv[1]), images * (out[1] / images[1]), rtol=1e-5)
    with pytest.raises(ValueError):
        deredden(images, e_bv[:2])


def test_multi_file_glob_sorted_global_indices(tmp_path):
    sizes = {"train_2.h5": 4, "train_0.h5": 5, "train_1.h5": 3}
    arrays = {}
    for k, (name, n) in enumerate(sizes.items()):  # written out of order on purpose
        arrays[name] = write(tmp_path / name, n=n, seed=k, objid_start=OBJID0 + 1000 * k)
    ds = SurveyDataset(str(tmp_path / "train_*.h5"))
    assert [p.name for p in ds.files] == ["train_0.h5", "train_1.h5", "train_2.h5"]
    assert len(ds) == 12
    order = ["train_0.h5", "train_1.h5", "train_2.h5"]
    np.testing.assert_array_equal(ds.objids, np.concatenate([arrays[o]["ObjID"] for o in order]))
    item = ds[6]  # train_0 has 5, so global 6 is row 1 of train_1
    assert item["index"] == 6 and item["ObjID"] == arrays["train_1.h5"]["ObjID"][1]
    np.testing.assert_array_equal(item["image"].numpy(), arrays["train_1.h5"]["images"][1])
    assert ds.locate(6) == (tmp_path / "train_1.h5", 1)
    # a list in any order, with a repeat, gives the same sorted files
    listed = resolve_paths([tmp_path / "train_2.h5", str(tmp_path / "train_0.h5"),
                            tmp_path / "train_1.h5", tmp_path / "train_2.h5"])
    assert listed == list(ds.files)
    with pytest.raises(DataFormatError, match="nomatch_"):
        resolve_paths(str(tmp_path / "nomatch_*.h5"))


def test_indices_subset_and_select(tmp_path):
    path = tmp_path / "a.h5"
    arrays = write(path)
    ds = SurveyDataset(path, columns=("ra",), indices=[7, 2, 9])
    assert len(ds) == 3 and [ds[i]["index"] for i in range(3)] == [7, 2, 9]
    np.testing.assert_array_equal(ds.column("ra"), arrays["ra"][[7, 2, 9]])
    sub = ds.subset([2, 0])  # positions in ds
    np.testing.assert_array_equal(sub.global_indices, [9, 7])
    np.testing.assert_array_equal(ds.subset(np.array([True, False, True])).global_indices, [7, 9])
    sel = SurveyDataset(path).select_objids(arrays["ObjID"][[4, 1]])
    np.testing.assert_array_equal(sel.global_indices, [4, 1])
    with pytest.raises(KeyError, match="not in this dataset"):
        ds.select_objids([OBJID0 + 4])
    with pytest.raises(IndexError):
        SurveyDataset(path, indices=[N])


# --------------------------------------------------------------------------- bad inputs


def _drop(key):
    return lambda a: a.pop(key)


def _set(key, value):
    def edit(a):
        a[key] = value(a) if callable(value) else value
    return edit


BAD_FILES = {
    "missing key": (_drop("e_bv"), "e_bv"),
    "wrong per-galaxy shape": (_set("e_bv", np.zeros((N, 4))), "e_bv"),
    "wrong image size": (_set("images", np.zeros((N, 5, 64, 64), np.float32)), "images"),
    "string dtype": (_set("ra", np.array([b"12.5"] * N)), "ra"),
    "float ObjID": (_set("ObjID", lambda a: a["ObjID"].astype(np.float64)), "ObjID"),
    "disagreeing lengths": (_set("dec", np.zeros(N - 1)), "dec"),
    "catalog length": (_set("catalog/petro_r50", np.zeros(N + 2)), "catalog/petro_r50"),
    "gz2 answers": (_set("gz2/smooth/votes", np.zeros((N, 2), np.int16)), "gz2/smooth/votes"),
    "duplicate ObjID": (_set("ObjID", lambda a: np.r_[a["ObjID"][:-1], a["ObjID"][0]]), "ObjID"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_names_file_and_key(tmp_path, case):
    edit, key = BAD_FILES[case]
    arrays = survey_arrays()
    edit(arrays)
    path = tmp_path / f"bad_{case.replace(' ', '_')}.h5"
    write(path, arrays)
    with pytest.raises(DataFormatError) as err:
        SurveyDataset(path)
    msg = str(err.value)
    assert path.name in msg and repr(key) in msg, msg
    if case == "disagreeing lengths":
        assert f"{N - 1} rows" in msg and f"'images' has {N} rows" in msg
    if case == "duplicate ObjID":
        assert f"ObjID {OBJID0}" in msg and f"rows [0, {N - 1}]" in msg


def test_empty_file(tmp_path):
    path = tmp_path / "empty.h5"
    write(path, n=0)
    with pytest.raises(DataFormatError, match=r"empty\.h5: key 'images'.*no galaxies"):
        validate_file(path)


def test_missing_truncated_and_not_hdf5(tmp_path):
    with pytest.raises(DataFormatError, match=r"absent\.h5.*not found"):
        validate_file(tmp_path / "absent.h5")
    text = tmp_path / "notes.h5"
    text.write_text("ObjID,ra,dec\n1,2,3\n")
    with pytest.raises(DataFormatError, match=r"notes\.h5.*not an HDF5 file"):
        SurveyDataset(text)
    good = tmp_path / "whole.h5"
    write(good)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataFormatError, match=r"cut\.h5.*truncated"):
        validate_file(cut)


def test_shapes_disagree_between_files(tmp_path):
    a, b = tmp_path / "part_a.h5", tmp_path / "part_b.h5"
    write(a, catalog=True)
    arrays = survey_arrays(objid_start=OBJID0 + 100, catalog=True)
    arrays["catalog/petro_mag"] = arrays["catalog/petro_mag"][:, :4]
    write(b, arrays)
    with pytest.raises(DataFormatError) as err:
        validate_files([a, b])
    msg = str(err.value)
    assert "part_a.h5" in msg and "part_b.h5" in msg and "'catalog/petro_mag'" in msg
    assert "(5,)" in msg and "(4,)" in msg


def test_duplicate_objids_across_files(tmp_path):
    write(tmp_path / "p0.h5", n=5)
    write(tmp_path / "p1.h5", n=5, objid_start=OBJID0 + 3)  # 3 and 4 repeat
    with pytest.raises(DataFormatError) as err:
        SurveyDataset(tmp_path / "p*.h5")
    msg = str(err.value)
    assert "p0.h5" in msg and "p1.h5" in msg and "'ObjID'" in msg and f"ObjID {OBJID0 + 3}" in msg


def test_unknown_column(author_file):
    path, _ = author_file
    with pytest.raises(DataFormatError) as err:
        SurveyDataset(path, columns=("truth/redshift",))
    assert path.name in str(err.value) and "'truth/redshift'" in str(err.value)
    with pytest.raises(ValueError, match="always part of an item"):
        SurveyDataset(path, columns=("ObjID",))


# --------------------------------------------------------------------------- pixels


@pytest.fixture
def nan_file(tmp_path):
    arrays = survey_arrays()
    arrays["images"][4, 2, 10:13, 20] = np.nan  # 3 pixels
    arrays["images"][9, 0, 0, 0] = np.inf  # 1 pixel
    path = tmp_path / "holes.h5"
    write(path, arrays)
    return path, arrays


def test_nan_pixels_raise(nan_file):
    path, _ = nan_file
    ds = SurveyDataset(path)  # construction reads metadata only
    ds[3]
    with pytest.raises(DataFormatError) as err:
        ds[4]
    msg = str(err.value)
    assert path.name in msg and "'images'" in msg and "row 4" in msg
    assert f"ObjID {OBJID0 + 4}" in msg and "3 non-finite pixel" in msg
    assert err.value.row == 4 and err.value.objid == OBJID0 + 4
    try:  # the same error from a DataLoader worker
        list(DataLoader(ds, batch_size=N, num_workers=1))
        message = None
    except DataFormatError as worker_err:
        message = str(worker_err)
        # torch's re-raise leaves a frame <-> traceback cycle holding the loader; if a later
        # garbage collection finalises it, worker shutdown stalls 5 s. Break the cycle.
        worker_err.__traceback__ = None
    assert message is not None and f"ObjID {OBJID0 + 4}" in message


def test_nan_policy_mask(nan_file):
    path, arrays = nan_file
    ds = SurveyDataset(path, nan_policy="mask", deredden=True)
    item = ds[4]
    valid = item["valid"]
    assert valid.dtype == torch.bool and valid.shape == (5, SIZE, SIZE)
    assert int((~valid).sum()) == 3 and not valid[2, 10:13, 20].any()
    assert (item["image"][~valid] == 0).all() and torch.isfinite(item["image"]).all()
    assert ds[3]["valid"].all()
    with pytest.raises(ValueError, match="nan_policy"):
        SurveyDataset(path, nan_policy="drop")


def test_scan_pixels_chunked(nan_file, tmp_path):
    path, _ = nan_file
    clean = tmp_path / "zclean.h5"
    write(clean, objid_start=OBJID0 + 100)
    scan = scan_pixels([path, clean], chunk=5)
    assert scan.n_bad_pixels == 4 and scan.n_bad_galaxies == 2 and not scan.clean
    first = scan.files[0]
    np.testing.assert_array_equal(first.rows, [4, 9])
    np.testing.assert_array_equal(first.bad_per_row, [3, 1])
    np.testing.assert_array_equal(first.objids, [OBJID0 + 4, OBJID0 + 9])
    assert scan.files[1].n_bad_pixels == 0
    ds = SurveyDataset([path, clean])
    kept = ds.subset(~np.isin(ds.global_indices, scan.global_indices))
    assert len(kept) == 2 * N - 2
    assert scan_pixels(clean).clean


# --------------------------------------------------------------------------- torch plumbing


def _batches(loader):
    return [{k: v.clone() for k, v in b.items()} for b in loader]


def test_dataloader_workers_match_single_process(tmp_path):
    write(tmp_path / "w0.h5", n=7, gz2=True)
    write(tmp_path / "w1.h5", n=6, seed=1, objid_start=OBJID0 + 50, gz2=True)
    ds = SurveyDataset(tmp_path / "w*.h5", columns=("specz_redshift", "gz2/smooth/votes"),
                       deredden=True)
    ds[0]  # open handles in the parent: workers must open their own
    single = _batches(DataLoader(ds, batch_size=4, num_workers=0))
    multi = _batches(DataLoader(ds, batch_size=4, num_workers=2))
    assert len(single) == len(multi) == 4
    for a, b in zip(single, multi):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert torch.equal(torch.cat([b["index"] for b in single]), torch.arange(13))
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._handles == {}
    torch.testing.assert_close(clone[5]["image"], ds[5]["image"])


def test_distributed_sampler_covers_each_index_once(author_file):
    path, _ = author_file
    ds = SurveyDataset(path)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        sampler.set_epoch(1)
        for batch in DataLoader(ds, batch_size=3, sampler=sampler):
            seen.extend(batch["index"].tolist())
    assert sorted(seen) == list(range(N))


# --------------------------------------------------------------------------- band MAD


def _numpy_mad(images):
    out = []
    for c in range(5):
        x = images[:, c].ravel()
        x = x[np.isfinite(x)]
        out.append(np.median(np.abs(x - np.median(x))))
    return np.array(out)


def test_band_mad_exact_cached_and_refreshed(tmp_path, monkeypatch):
    path = tmp_path / "train_0.h5"
    arrays = survey_arrays()
    arrays["images"] *= np.array([3.0, 1.0, 1.5, 2.0, 8.0], np.float32)[:, None, None]
    arrays["images"][2, 1, 5, 5] = np.nan  # excluded, not propagated
    write(path, arrays)
    cache = tmp_path / "train_0.stats.json"
    mad = band_mad(path)  # default cache beside the file
    np.testing.assert_allclose(mad, _numpy_mad(arrays["images"]), rtol=1e-6)
    assert cache.exists() and not list(tmp_path.glob("*.tmp-*"))
    entry = next(iter(json.loads(cache.read_text())["band_mad"].values()))
    assert entry["n_galaxies"] == N and entry["key"]["files"][0]["name"] == path.name
    assert entry["n_pixels"][1] == N * SIZE * SIZE - 1

    def boom(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    real = data._compute_band_mad
    monkeypatch.setattr(data, "_compute_band_mad", boom)
    np.testing.assert_array_equal(band_mad(path), mad)  # from the cache
    # a subsample with its own seed is a different entry: computed, and equal to numpy
    monkeypatch.setattr(data, "_compute_band_mad", real)
    sub = band_mad(path, max_galaxies=5, seed=7)
    rows = np.sort(np.random.default_rng(7).choice(np.arange(N), size=5, replace=False))
    np.testing.assert_allclose(sub, _numpy_mad(arrays["images"][rows]), rtol=1e-6)
    assert len(json.loads(cache.read_text())["band_mad"]) == 2
    # the file changes: the cache is stale and the value is recomputed
    arrays["images"] *= 2
    write(path, arrays)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    new = band_mad(path)
    np.testing.assert_allclose(new, 2 * mad, rtol=1e-6)
    assert len(json.loads(cache.read_text())["band_mad"]) == 1  # stale entries dropped


def test_band_mad_dataset_deredden_and_unwritable(tmp_path, monkeypatch):
    path = tmp_path / "d.h5"
    arrays = write(path)
    ds = SurveyDataset(path, deredden=True, indices=np.arange(2, 10))
    mad = band_mad(ds, cache=tmp_path / "elsewhere.json")
    expected = _numpy_mad(deredden(arrays["images"], arrays["e_bv"]).astype(np.float32)[2:10])
    np.testing.assert_allclose(mad, expected, rtol=1e-5)
    np.testing.assert_allclose(band_mad(path, cache=False), _numpy_mad(arrays["images"]), rtol=1e-6)
    assert not (tmp_path / "d.stats.json").exists()
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(PermissionError, match="cache="):
        band_mad(path)


# --------------------------------------------------------------------------- splits


def test_make_splits_deterministic_and_order_free():
    ids = OBJID0 + np.arange(100) * 7
    a = make_splits(ids, seed=4)
    b = make_splits(np.random.default_rng(0).permutation(ids), seed=4)
    assert list(a) == ["train", "val", "test"]
    assert [len(a[k]) for k in a] == [70, 10, 20]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_array_equal(np.sort(np.concatenate(list(a.values()))), ids)
    assert not np.array_equal(make_splits(ids, seed=5)["test"], a["test"])
    with pytest.raises(ValueError, match="sum to 1"):
        make_splits(ids, {"train": 0.8, "test": 0.3})
    with pytest.raises(ValueError, match="repeat"):
        make_splits(np.r_[ids, ids[:1]])


@pytest.mark.parametrize("suffix", [".json", ".h5"])
def test_splits_saved_loaded_verified(tmp_path, author_file, suffix):
    path, arrays = author_file
    ds = SurveyDataset(path)
    fractions = {"train": 0.5, "val": 0.25, "test": 0.25}
    splits = make_splits(ds, fractions, seed=1)
    out = tmp_path / f"splits{suffix}"
    save_splits(splits, out, seed=1, fractions=fractions)
    loaded = load_splits(out, objids=ds)
    assert list(loaded) == list(splits)
    for k in splits:
        np.testing.assert_array_equal(loaded[k], splits[k])
        assert loaded[k].dtype == np.int64
    assert int(loaded["train"][0]) in set(arrays["ObjID"].tolist())  # no float round-off
    assert len(ds.select_objids(loaded["val"])) == 3
    with pytest.raises(DataFormatError) as err:
        load_splits(out, objids=arrays["ObjID"][:6])
    assert out.name in str(err.value) and "not in the dataset" in str(err.value)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_atomic_path_removes_temp_on_error(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old" and not list(tmp_path.glob("*.tmp-*"))
    with atomic_path(target) as tmp:
        assert tmp.name == f"result.json.tmp-{os.getpid()}"
        tmp.write_text("new")
    assert target.read_text() == "new"


# --------------------------------------------------------------------------- selectors


def test_selectors(tmp_path, author_file):
    arrays = survey_arrays(gz2=True, catalog=True)
    arrays["specz_redshift"][[1, 5]] = np.nan
    arrays["specz_redshift_err"][[1, 5]] = np.nan
    arrays["specObjID"][[1, 5]] = NO_SPECOBJID
    smooth = np.zeros((N, 3), np.int16)
    smooth[:, 0] = np.arange(N)      # smooth votes 0..11
    smooth[:, 2] = 2                 # star/artifact votes
    arrays["gz2/smooth/votes"] = smooth
    path = tmp_path / "mock.h5"
    write(path, arrays, attrs={"format": data.MOCK_FORMAT, "seed": 1})
    ds = SurveyDataset(path)
    assert validate_file(path).is_mock and "gz2" in validate_file(path).groups
    mask = has_specz(ds)
    assert mask.tolist() == [i not in (1, 5) for i in range(N)]
    np.testing.assert_array_equal(has_specz(arrays["specz_redshift"]), mask)
    assert len(ds.subset(mask)) == N - 2
    np.testing.assert_array_equal(gz2_min_votes(ds, "smooth"), np.arange(N) + 2 >= 5)
    np.testing.assert_array_equal(gz2_min_votes(ds, "smooth", count="binary"), np.arange(N) >= 5)
    np.testing.assert_array_equal(gz2_min_votes(smooth, "smooth", min_votes=10), np.arange(N) >= 8)
    sub = ds.subset(np.arange(6, N))  # selectors follow the selection
    assert gz2_min_votes(sub, "smooth").all()
    with pytest.raises(KeyError, match="known questions"):
        gz2_min_votes(ds, "spiral")
    with pytest.raises(DataFormatError) as err:
        gz2_min_votes(SurveyDataset(author_file[0]), "bar")
    assert author_file[0].name in str(err.value) and "gz2" in str(err.value)
