"""nbval runs the committed smoke-profile notebooks here (``make test`` passes ``--nbval``).

Each reference notebook was executed by ``make nbval-refs`` and is re-executed cell by cell;
a printed number that changes fails the test. The kernels start from this process, so:

* their artifacts go to a fresh temporary folder (``$SDSSCL_RUNS``), so every run starts
  as a clean clone does, making the smoke mock itself, whatever ``runs/`` holds;
* the warnings the runner filters for its kernels are filtered here too.
"""
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

if "build_book" not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        "build_book", Path(__file__).resolve().parents[2] / "scripts" / "build_book.py")
    sys.modules["build_book"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["build_book"])
sys.modules["build_book"].quiet_kernels()

_RUNS = tempfile.mkdtemp(prefix="sdsscl-nbval-runs-")
os.environ["SDSSCL_RUNS"] = _RUNS


def pytest_unconfigure(config):
    shutil.rmtree(_RUNS, ignore_errors=True)
