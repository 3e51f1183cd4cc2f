"""Representations: extraction to HDF5 (resumable, float16, 2-rank merge), loading and checks."""
from __future__ import annotations

import logging
import os

import h5py
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from sdsscl import representations as rep
from sdsscl.checkpoint import save_atomic
from sdsscl.config import EncoderConfig, load_profile
from sdsscl.data import DataFormatError, SurveyDataset
from sdsscl.models import build_encoder
from sdsscl.representations import (
    Representations,
    encode,
    extract_representations,
    load_representations,
    merge_parts,
    part_path,
    run_extraction,
)

TINY = EncoderConfig(arch="resnet18", stem_stride=2, width=8, projection_dim=16)
OBJID0 = 1237648720693755904  # > 2**53: must stay int64
SIZE = 107
log = logging.getLogger(__name__)


def galaxy_images(n: int, seed: int) -> np.ndarray:
    """Sky noise plus one elliptical Gaussian galaxy of random size, position, flux, shape and
    colour per cutout: images whose representations differ (pure noise gives near-ties)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float64)
    images = rng.normal(0.0, 0.03, (n, 5, SIZE, SIZE))
    for i in range(n):
        cy, cx = SIZE // 2 + rng.uniform(-6, 6, 2)
        sigma, q, angle = rng.uniform(1.5, 10), rng.uniform(0.2, 1), rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        blob = np.exp(-0.5 * (u ** 2 + (v / q) ** 2) / sigma ** 2)
        images[i] += rng.uniform(0.5, 20) * rng.uniform(0.1, 1.5, 5)[:, None, None] * blob
    return images.astype(np.float32)


def write_survey(path, n: int = 40, seed: int = 0, objid0: int = OBJID0):
    """A file in the authors' format with n distinct galaxies."""
    with h5py.File(path, "w") as f:
        f["images"] = galaxy_images(n, seed)
        f["e_bv"] = np.full((n, 5), 0.05)
        f["ra"], f["dec"] = np.zeros(n), np.zeros(n)
        f["ObjID"] = objid0 + np.arange(n, dtype=np.int64)
        f["specObjID"] = np.full(n, -1, np.int64)
        f["specz_redshift"] = f["specz_redshift_err"] = np.full(n, np.nan)
    return path


def tiny_encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_encoder(TINY)


class Counting(nn.Module):
    """Wraps an encoder, counts forward calls and raises at call ``fail_at`` (a kill)."""

    def __init__(self, inner: nn.Module, fail_at: int | None = None):
        super().__init__()
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("killed mid-extraction")
        return self.inner(x)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: tiny networks gain nothing from more, and on a shared machine
    OpenMP threads that wait for each other make them 10-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def survey(tmp_path):
    return write_survey(tmp_path / "survey.h5")


def _read(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}, {k: rep._read_attrs(f)[k] for k in f.attrs}


# --------------------------------------------------------------------------- extraction
def test_extraction_writes_every_galaxy_and_reuses_a_finished_file(survey, tmp_path):
    enc = Counting(tiny_encoder())
    out = extract_representations(enc, survey, tmp_path / "r.h5", batch_size=8, chunk=16, dtype="float32",
                                  progress=False, attrs={"checkpoint_sha256": "abc", "tags": ["a", "b"]})
    assert enc.calls == 1 + 5  # one probe for D, then 40 galaxies in batches of 8
    ds = SurveyDataset(survey)
    reps = load_representations(out, ds)
    expected = encode(enc.inner, torch.stack([ds[i]["image"] for i in range(len(ds))]), batch_size=8)
    np.testing.assert_array_equal(reps.vectors, expected.numpy())
    np.testing.assert_array_equal(reps.objids, ds.objids)
    assert reps.dim == 64 and len(reps) == 40
    data, attrs = _read(out)
    assert data["done"].tolist() == [True, True, True]
    assert attrs["n"] == 40 and attrs["dimension"] == 64 and attrs["dtype"] == "float32"
    assert attrs["crop_size"] == 64 and attrs["chunk"] == 16 and attrs["tags"] == ["a", "b"]
    assert attrs["source_files"] == [str(survey.resolve())] and "rank" not in attrs
    assert not part_path(out).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r.h5", "survey.h5"]
    # the same request again: only the probe runs; other attributes recompute
    mtime = out.stat().st_mtime_ns
    extract_representations(enc, survey, out, batch_size=8, chunk=16, dtype="float32", progress=False,
                            attrs={"checkpoint_sha256": "abc", "tags": ["a", "b"]})
    assert enc.calls == 7 and out.stat().st_mtime_ns == mtime
    extract_representations(enc, survey, out, batch_size=8, chunk=16, dtype="float32", progress=False,
                            attrs={"checkpoint_sha256": "def"})
    assert enc.calls == 7 + 6 and load_representations(out).attrs["checkpoint_sha256"] == "def"


def test_interrupted_and_resumed_equals_uninterrupted(survey, tmp_path):
    kw = {"batch_size": 4, "chunk": 8, "progress": False}  # 5 chunks of 2 batches
    full = extract_representations(tiny_encoder(), survey, tmp_path / "full.h5", **kw)
    out = tmp_path / "part.h5"
    killed = Counting(tiny_encoder(), fail_at=1 + 5)  # probe, chunks 0 and 1, then chunk 2's first batch
    with pytest.raises(RuntimeError, match="killed"):
        extract_representations(killed, survey, out, **kw)
    assert not out.exists()
    with h5py.File(part_path(out), "r") as f:
        assert f["done"][()].tolist() == [True, True, False, False, False]
    resumed = Counting(tiny_encoder())
    extract_representations(resumed, survey, out, **kw)
    assert resumed.calls == 1 + 6  # the probe and chunks 2..4 only
    a, a_attrs = _read(full)
    b, b_attrs = _read(out)
    assert a.keys() == b.keys() and a["representations"].dtype == np.float16
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert a_attrs == b_attrs
    assert not part_path(out).exists()


def test_partial_file_of_another_request_starts_over(survey, tmp_path):
    out = tmp_path / "r.h5"
    with pytest.raises(RuntimeError):
        extract_representations(Counting(tiny_encoder(), fail_at=3), survey, out, batch_size=4, chunk=8,
                                progress=False)
    again = Counting(tiny_encoder())
    extract_representations(again, survey, out, batch_size=4, chunk=8, dtype="float32", progress=False)
    assert again.calls == 1 + 10  # dtype changed: all chunks again
    np.testing.assert_array_equal(load_representations(out).vectors,
                                  encode(tiny_encoder(), torch.from_numpy(galaxy_images(40, 0)), batch_size=4))
    # a truncated partial file (killed while it was being created) is also started over
    part_path(out).write_bytes(b"not hdf5")
    extract_representations(tiny_encoder(), survey, out, batch_size=4, chunk=8, progress=False, overwrite=True)
    assert load_representations(out).attrs["dtype"] == "float16"


def _cosine(v):
    v = v.astype(np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v @ v.T


def test_float16_changes_cosine_similarities_by_less_than_1e4(survey, tmp_path):
    """The claim of the module docstring and profiles/default.yaml, measured: float16's unit
    roundoff u = 2**-11 moves a cosine similarity of non-negative vectors by at most ~2u ~ 1e-3;
    in practice by less than 1e-4."""
    kw = {"batch_size": 8, "progress": False}
    v32 = load_representations(extract_representations(tiny_encoder(), survey, tmp_path / "32.h5",
                                                       dtype="float32", **kw)).vectors
    v16 = load_representations(extract_representations(tiny_encoder(), survey, tmp_path / "16.h5",
                                                       dtype="float16", **kw)).vectors
    assert (v32 >= 0).all()  # ReLU then average pool
    np.testing.assert_array_equal(v16, v32.astype(np.float16).astype(np.float32))
    bound = 2.0 ** -10  # 2u
    net = np.abs(_cosine(v16) - _cosine(v32))
    # and at the paper's dimension: 500 non-negative 2048-d vectors
    rng = np.random.default_rng(0)
    wide = np.abs(rng.normal(size=(500, 2048))) * rng.uniform(0.01, 3, (500, 1))
    paper = np.abs(_cosine(wide.astype(np.float16).astype(np.float32)) - _cosine(wide.astype(np.float32)))
    log.info("float16 vs float32 cosine change: network D=64 max %.2e mean %.2e; D=2048 max %.2e mean %.2e",
             net.max(), net.mean(), paper.max(), paper.mean())
    assert net.max() < bound and paper.max() < bound
    # measured: max ~3e-5, mean ~5e-6 for both (rounding errors of D components mostly cancel)
    assert net.max() < 1e-4 and paper.max() < 1e-4
    assert net.mean() < 2e-5 and paper.mean() < 2e-5
    # the nearest neighbour of each galaxy is unchanged unless the float32 gap is below the bound
    c16, c32 = _cosine(v16), _cosine(v32)
    np.fill_diagonal(c16, -2)
    np.fill_diagonal(c32, -2)
    nn16, nn32 = c16.argmax(1), c32.argmax(1)
    rows = np.arange(len(c32))
    assert np.all((nn16 == nn32) | (c32[rows, nn32] - c32[rows, nn16] < bound))


def test_float16_overflow_is_refused(survey, tmp_path):
    class Huge(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x.flatten(1)[:, :4] * 0 + 1e6 * self.w

    with pytest.raises(ValueError, match="float32"):
        extract_representations(Huge(), survey, tmp_path / "r.h5", batch_size=8, progress=False)


# --------------------------------------------------------------------------- loading and checks
def test_wrong_count_or_objids_against_the_dataset_name_the_file(survey, tmp_path):
    out = extract_representations(tiny_encoder(), survey, tmp_path / "r.h5", batch_size=8, progress=False)
    fewer = SurveyDataset(write_survey(tmp_path / "fewer.h5", n=30))
    with pytest.raises(DataFormatError, match=r"r\.h5.*holds 40 representations but the dataset has 30"):
        load_representations(out, fewer)
    other = SurveyDataset(write_survey(tmp_path / "other.h5", n=40, objid0=OBJID0 + 5))
    with pytest.raises(DataFormatError, match=rf"r\.h5.*row 0.*ObjID {OBJID0} in the file but {OBJID0 + 5}") as err:
        load_representations(out, other)
    assert err.value.row == 0 and "40 row(s) differ" in str(err.value)
    reps = load_representations(out, SurveyDataset(survey))
    assert reps.index_of([OBJID0 + 3, OBJID0]).tolist() == [3, 0]
    assert reps.index_of(OBJID0 + 7) == 7
    with pytest.raises(KeyError, match=rf"r\.h5: \[{OBJID0 + 99}\]"):
        reps.index_of([OBJID0 + 1, OBJID0 + 99])
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        load_representations(tmp_path / "missing.h5")
    with pytest.raises(ValueError, match="dtype"):
        extract_representations(tiny_encoder(), survey, tmp_path / "x.h5", dtype="bfloat16")


def test_unfinished_file_is_refused(survey, tmp_path):
    out = tmp_path / "r.h5"
    with pytest.raises(RuntimeError):
        extract_representations(Counting(tiny_encoder(), fail_at=4), survey, out, batch_size=4, chunk=8,
                                progress=False)  # the probe, chunk 0, then killed
    with pytest.raises(DataFormatError, match=r"r\.h5\.partial.*unfinished: 4 of 5 chunks"):
        load_representations(part_path(out))


def test_representations_class_checks_shapes():
    reps = Representations(np.ones((3, 2)), [5, 7, 9])
    assert reps.vectors.dtype == np.float32 and reps.index_of([9, 5]).tolist() == [2, 0]
    with pytest.raises(ValueError, match="objids"):
        Representations(np.ones((3, 2)), [1, 2])


# --------------------------------------------------------------------------- ranks
def test_ranks_merge_in_process_and_missing_chunks_are_named(survey, tmp_path, monkeypatch):
    """Two ranks played in turn in one process (no process group): rank 1 killed, then the
    merge names the chunks it lacks; rank 1 finished, the merge equals a one-rank run."""
    kw = {"batch_size": 4, "chunk": 8, "progress": False}  # chunks 0, 2, 4 on rank 0; 1, 3 on rank 1
    single = extract_representations(tiny_encoder(), survey, tmp_path / "single.h5", **kw)
    out = tmp_path / "ranks.h5"
    monkeypatch.setattr(rep, "_barrier", lambda world: None)
    monkeypatch.setattr(rep, "_rank_world", lambda device: (1, 2))
    with pytest.raises(RuntimeError):
        extract_representations(Counting(tiny_encoder(), fail_at=4), survey, out, **kw)  # chunk 1 only
    monkeypatch.setattr(rep, "_rank_world", lambda device: (0, 2))
    with pytest.raises(DataFormatError, match=r"ranks\.h5.*1 chunk\(s\) were finished by no part.*\[3\]"):
        extract_representations(tiny_encoder(), survey, out, **kw)
    assert not out.exists()
    monkeypatch.setattr(rep, "_rank_world", lambda device: (1, 2))
    extract_representations(tiny_encoder(), survey, out, **kw)  # rank 1 finishes chunk 3, returns
    assert not out.exists() and part_path(out, 1, 2).exists()
    monkeypatch.setattr(rep, "_rank_world", lambda device: (0, 2))
    rank0 = Counting(tiny_encoder())
    extract_representations(rank0, survey, out, **kw)
    assert rank0.calls == 1  # its part was complete: only the merge
    assert _same(out, single)
    assert not part_path(out, 0, 2).exists() and not part_path(out, 1, 2).exists()


def _same(a, b) -> bool:
    (da, aa), (db, ab) = _read(a), _read(b)
    return aa == ab and da.keys() == db.keys() and all(np.array_equal(da[k], db[k]) for k in da)


def test_merge_refuses_parts_of_different_results(survey, tmp_path, monkeypatch):
    monkeypatch.setattr(rep, "_barrier", lambda world: None)
    monkeypatch.setattr(rep, "_rank_world", lambda device: (1, 2))
    out = tmp_path / "r.h5"
    extract_representations(tiny_encoder(), survey, out, batch_size=8, progress=False, attrs={"v": 1})
    monkeypatch.setattr(rep, "_rank_world", lambda device: (0, 2))
    other = tmp_path / "o.h5"
    with pytest.raises(FileNotFoundError, match=r"o\.h5\.rank1\.partial"):  # rank 1 never ran
        extract_representations(tiny_encoder(), survey, other, batch_size=8, progress=False, attrs={"v": 2})
    with pytest.raises(DataFormatError, match="another result"):
        merge_parts([part_path(other, 0, 2), part_path(out, 1, 2)], tmp_path / "merged.h5")



def _rank_worker(rank, world, port, survey, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    extract_representations(tiny_encoder(), survey, out, batch_size=4, chunk=8, progress=False, device="cpu")
    import torch.distributed as dist

    dist.destroy_process_group()


def test_two_process_gloo_extraction_equals_one_process(survey, tmp_path, free_port):
    # one thread here (the autouse fixture) and in the workers: the same kernels, bit for bit
    single = extract_representations(tiny_encoder(), survey, tmp_path / "single.h5", batch_size=4,
                                     chunk=8, progress=False)
    out = tmp_path / "ddp.h5"
    mp.spawn(_rank_worker, args=(2, free_port, str(survey), str(out)), nprocs=2, join=True)
    assert _same(out, single)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.h5", "single.h5", "survey.h5"]


# --------------------------------------------------------------------------- a profile's run
def test_run_extraction_for_a_profile_skips_when_up_to_date(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_survey(data / "train0.h5", n=12, seed=1, objid0=OBJID0)
    write_survey(data / "train1.h5", n=12, seed=2, objid0=OBJID0 + 100)
    write_survey(data / "labelled.h5", n=8, seed=3, objid0=OBJID0 + 200)
    profile = load_profile("smoke", {"mock": None, "data.source": "files", "data.root": str(data),
                                     "data.unlabelled": "train*.h5", "data.labelled": "labelled.h5",
                                     "representations.batch_size": 8})
    from sdsscl.provenance import run_paths

    paths = run_paths(profile, tmp_path / "runs")
    ckpt = paths.checkpoints / "moco" / "checkpoint.pth.tar"
    torch.manual_seed(0)
    save_atomic(build_encoder(profile.pretrain.encoder).state_dict(), ckpt)
    out = run_extraction(profile, tmp_path / "runs", progress=False)
    assert out == paths.representations / "moco.h5"
    reps = load_representations(out, rep.profile_dataset(profile, paths))
    # files in sorted order: labelled.h5, train0.h5, train1.h5
    assert len(reps) == 32 and reps.objids[0] == OBJID0 + 200 and reps.objids[8] == OBJID0
    assert reps.objids[-1] == OBJID0 + 111
    assert reps.attrs["checkpoint_sha256"] == rep.file_sha256(ckpt) and '"width": 8' in reps.attrs["encoder"]
    mtime = out.stat().st_mtime_ns
    run_extraction(profile, tmp_path / "runs", progress=False)
    assert out.stat().st_mtime_ns == mtime  # same checkpoint and data: nothing done
    torch.manual_seed(1)
    save_atomic(build_encoder(profile.pretrain.encoder).state_dict(), ckpt)
    run_extraction(profile, tmp_path / "runs", progress=False)
    assert load_representations(out).attrs["checkpoint_sha256"] == rep.file_sha256(ckpt)
    assert not np.array_equal(load_representations(out).vectors, reps.vectors)

    from sdsscl.search import find_similar

    result, fig = find_similar(profile, [OBJID0 + 3, OBJID0 + 201], by="objid", k=3, runs_dir=tmp_path / "runs")
    assert result.indices.shape == (2, 3) and result.queries.tolist() == [11, 1]
    assert 11 not in result.indices[0] and len(fig.axes) == 2 * 4


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_extraction_on_cuda_matches_the_cpu(survey, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cpu = extract_representations(tiny_encoder(), survey, tmp_path / "cpu.h5", batch_size=8, chunk=16,
                                  dtype="float32", progress=False)
    gpu = extract_representations(tiny_encoder().cuda(), survey, tmp_path / "gpu.h5", batch_size=8, chunk=16,
                                  dtype="float32", progress=False)
    a, b = load_representations(cpu).vectors, load_representations(gpu).vectors
    # float32 on both (cuDNN may use TF32 for convolutions: about 1e-3 relative)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.9999, cos.min()
