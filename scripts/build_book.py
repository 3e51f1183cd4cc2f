#!/usr/bin/env python
"""Run the book's notebooks for a profile and build the HTML book from them.

    build_book.py all  --profile default            mock, notebooks, HTML book, stage times
    build_book.py run  --profile smoke [--only 01-data] [--force] [--set mock.seed=7]
    build_book.py html --profile smoke [--out DIR]  HTML from already executed notebooks
    build_book.py nbval-refs                        refresh tests/nbval/ (smoke profile)

Notebooks are jupytext ``py:percent`` sources in ``notebooks/`` named ``NN-name.py``;
the number is the book order, and a notebook may only depend on earlier ones (its
``sdsscl.depends`` metadata). Each runs with papermill (parameters ``profile``,
``overrides``, ``runs_dir``) into ``_build/notebooks/<run>/NN-name.ipynb`` beside a
stamp: the hash of its source, the resolved configuration, the ``sdsscl`` sources, the
mock it reads and the stamps of its dependencies. A notebook whose stamp still matches
is skipped; a failing notebook stops the run, shows the failing cell and keeps the
executed copy as ``NN-name.failed.ipynb``.

The book is built from a generated source tree ``_build/book/<run>/`` (``_config.yml``,
``_toc.yml``, ``book/`` and the executed notebooks in place of the sources), so Jupyter
Book renders the notebooks as executed and never runs them again
(``execute_notebooks: off``). The HTML goes to ``<out>/_build/html`` (``out`` defaults
to the project root, hence ``_build/html``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
BUILD_DIR = ROOT / "_build"
NBVAL_DIR = ROOT / "tests" / "nbval"
BOOK_FILES = ("_config.yml", "_toc.yml")
BOOK_DIRS = ("book",)
NBVAL_PROFILE = "smoke"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

os.environ.setdefault("SDSSCL_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT))

from sdsscl.config import load_profile, parse_override  # noqa: E402
from sdsscl.provenance import data_files, ensure_mock, mock_fingerprint, run_paths  # noqa: E402


#: Warnings that third-party imports print into notebooks: noise in the book, and in nbval's
#: diffs only on some runs (a clean clone imports more while it makes its mock). tqdm.auto
#: without ipywidgets (progress bars stay plain text here); astropy's deprecated test runner,
#: which packages the mock generator imports still create.
KERNEL_WARNING_FILTERS = ("ignore:IProgress not found", "ignore:The TestRunner")


def quiet_kernels() -> None:
    """Add :data:`KERNEL_WARNING_FILTERS` to ``PYTHONWARNINGS`` for kernels started from here."""
    filters = [f for f in os.environ.get("PYTHONWARNINGS", "").split(",") if f]
    os.environ["PYTHONWARNINGS"] = ",".join(filters + [f for f in KERNEL_WARNING_FILTERS if f not in filters])


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def sha256(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def tree_hash(paths: list[Path], base: Path) -> str:
    """Hash of the names and contents of ``paths`` (files), relative to ``base``."""
    return sha256(*(f"{p.relative_to(base)}:{sha256(p.read_bytes())}" for p in sorted(paths)))


def library_hash() -> str:
    """Hash of the ``sdsscl`` sources: a change to the library re-runs the notebooks."""
    return tree_hash([p for p in (ROOT / "sdsscl").rglob("*.py") if "__pycache__" not in p.parts], ROOT)


# --------------------------------------------------------------------------- notebooks
@dataclass
class Notebook:
    name: str
    path: Path
    depends: list[str] = field(default_factory=list)

    def read(self):
        import jupytext

        return jupytext.read(self.path, fmt="py:percent")


def discover(notebook_dir: Path | None = None) -> list[Notebook]:
    """The notebooks in book order (of ``notebooks/`` by default), dependencies checked."""
    found = []
    for path in sorted((notebook_dir or NOTEBOOK_DIR).glob("[0-9][0-9]-*.py")):
        nb = Notebook(path.stem, path)
        nb.depends = list(nb.read().metadata.get("sdsscl", {}).get("depends", []))
        found.append(nb)
    names = [nb.name for nb in found]
    for i, nb in enumerate(found):
        for dep in nb.depends:
            if dep not in names[:i]:
                raise SystemExit(f"notebook {nb.name} depends on {dep!r}, which is not an earlier notebook "
                                 f"(notebooks: {names})")
    return found


def check_kernel() -> None:
    """papermill and nbval run kernel ``python3``: it must be this environment's python."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        raise SystemExit("no 'python3' kernel: install one with `python -m ipykernel install --sys-prefix`")
    exe = Path(spec.argv[0])
    if not exe.is_absolute():  # the native kernel: "python" from the environment running us
        return
    if os.path.abspath(exe.parent) != os.path.abspath(Path(sys.executable).parent):
        raise SystemExit(f"kernel 'python3' runs {exe}, not {sys.executable}: notebooks would run in another "
                         f"environment. Run `make setup` (it installs the kernel into .venv).")


def data_fingerprint(profile, paths) -> str:
    """What the notebooks read, as it is on disk: the mock's own record of its settings and
    its modification time, or the names, sizes and times of the real files."""
    if profile.mock is not None:
        return mock_fingerprint(paths) or ""
    try:
        files = sorted(set(sum(data_files(profile, paths).values(), [])))
    except FileNotFoundError as err:  # the notebook will say so when it runs
        return f"missing: {err}"
    return json.dumps([(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files])


@dataclass
class Outcome:
    name: str
    status: str  # "ran" | "up to date"
    seconds: float


class NotebookFailed(SystemExit):
    pass


def run_notebooks(profile_name: str, overrides: dict, only: list[str] | None = None, force: bool = False,
                  runs_dir: Path | None = None, out_dir: Path | None = None,
                  progress: bool = True) -> tuple[list[Outcome], Path]:
    """Execute the profile's notebooks in order, skipping those whose inputs are unchanged.

    Returns the outcomes and the folder of executed notebooks.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    profile = load_profile(profile_name, overrides)
    paths = run_paths(profile, runs_dir)
    out_dir = Path(out_dir or BUILD_DIR / "notebooks" / profile.run_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    notebooks = discover()
    if only:
        unknown = sorted(set(only) - {nb.name for nb in notebooks})
        if unknown:
            raise SystemExit(f"--only names unknown notebooks {unknown}")
    check_kernel()
    quiet_kernels()

    parameters = {"profile": profile_name, "overrides": dict(overrides)}
    if runs_dir is not None:
        parameters["runs_dir"] = str(Path(runs_dir).resolve())
    if profile.mock is not None:  # the first stage: a cheap check when the mock is current
        ensure_mock(profile, paths, progress=progress)
    lib = library_hash()
    data_state = data_fingerprint(profile, paths)
    keys: dict[str, str] = {}
    outcomes = []
    for nb in notebooks:
        target = out_dir / f"{nb.name}.ipynb"
        stamp = out_dir / f"{nb.name}.stamp.json"
        key = sha256(nb.path.read_bytes(), json.dumps(parameters, sort_keys=True), profile.config_hash(), lib,
                     data_state, *(keys.get(dep, "") for dep in nb.depends))
        keys[nb.name] = key
        if only and nb.name not in only:
            continue
        previous = json.loads(stamp.read_text()).get("key") if stamp.is_file() else None
        if not force and target.is_file() and previous == key:
            say(f"{nb.name}: up to date ({target.relative_to(ROOT) if target.is_relative_to(ROOT) else target})")
            outcomes.append(Outcome(nb.name, "up to date", 0.0))
            continue
        say(f"{nb.name}: executing with profile {profile.run_name}")
        partial = out_dir / f"{nb.name}.partial.ipynb"
        failed = out_dir / f"{nb.name}.failed.ipynb"
        failed.unlink(missing_ok=True)
        start = time.perf_counter()
        try:
            papermill.execute_notebook(nb.read(), str(partial), parameters=parameters, kernel_name="python3",
                                       progress_bar=progress, cwd=str(ROOT), log_output=False)
        except PapermillExecutionError as err:
            partial.replace(failed)
            stamp.unlink(missing_ok=True)
            show_failure(nb, err, failed)
            raise NotebookFailed(1)
        seconds = time.perf_counter() - start
        partial.replace(target)
        stamp.write_text(json.dumps({"key": key, "seconds": round(seconds, 1), "profile": profile.run_name},
                                    indent=2) + "\n")
        outcomes.append(Outcome(nb.name, "ran", seconds))
    return outcomes, out_dir


def show_failure(nb: Notebook, err, failed: Path) -> None:
    """Print the failing cell's source and its error, then where the executed copy is."""
    bar = "-" * 78
    print(f"\n{bar}\nnotebook {nb.name} FAILED in cell {err.cell_index} (execution count {err.exec_count})\n"
          f"{bar}\n{err.source}\n{bar}", file=sys.stderr)
    print(ANSI.sub("", "\n".join(err.traceback)) or f"{err.ename}: {err.evalue}", file=sys.stderr)
    print(f"{bar}\nexecuted notebook, error included: {failed}\n", file=sys.stderr)


# --------------------------------------------------------------------------- the book
def stage_book(profile_name: str, overrides: dict, executed: Path, stage: Path) -> str:
    """Write the book source tree for one profile into ``stage``; returns its content hash.

    Files are only rewritten when their content changes, so Sphinx's incremental build
    stays incremental.
    """
    import yaml

    from sdsscl.provenance import Provenance

    profile = load_profile(profile_name, overrides)
    prov = Provenance.of(profile)
    wanted: dict[str, bytes] = {}
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    subs = config.setdefault("parse", {}).setdefault("myst_substitutions", {})
    subs.update({"profile": profile.run_name, "profile_description": profile.description,
                 "commit": prov.commit, "config_hash": prov.config_hash, "provenance": prov.line()})
    wanted["_config.yml"] = yaml.safe_dump(config, sort_keys=False).encode()
    wanted["_toc.yml"] = (ROOT / "_toc.yml").read_bytes()
    for folder in BOOK_DIRS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                wanted[str(path.relative_to(ROOT))] = path.read_bytes()
    for nb in discover():
        ipynb = executed / f"{nb.name}.ipynb"
        if not ipynb.is_file():
            raise SystemExit(f"{nb.name} has not been executed for profile {profile.run_name} ({ipynb} missing): "
                             f"run `build_book.py run --profile {profile_name}` first")
        wanted[f"notebooks/{nb.name}.ipynb"] = ipynb.read_bytes()
    stage.mkdir(parents=True, exist_ok=True)
    for rel, content in wanted.items():
        dest = stage / rel
        if not dest.is_file() or dest.read_bytes() != content:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(content)
    for path in sorted(stage.rglob("*"), reverse=True):  # drop what is no longer part of the book
        rel = str(path.relative_to(stage))
        if path.is_file() and rel not in wanted and not rel.startswith("_build"):
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return sha256(*(f"{rel}:{sha256(content)}" for rel, content in sorted(wanted.items())))


def build_html(stage: Path, out: Path, content_hash: str, force: bool = False) -> tuple[str, Path]:
    """``jupyter-book build`` of ``stage`` into ``out/_build/html``; skipped when unchanged."""
    html = out / "_build" / "html"
    stamp = out / "_build" / ".book-stamp.json"
    if not force and (html / "index.html").is_file() and stamp.is_file() \
            and json.loads(stamp.read_text()).get("key") == content_hash:
        say(f"book: up to date ({html})")
        return "up to date", html
    say(f"book: building HTML into {html}")
    jb = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(jb), "build", str(stage), "--path-output", str(out), "--builder", "html", "-W", "--keep-going"]
    if force:
        cmd.append("--all")
    stamp.unlink(missing_ok=True)
    result = subprocess.run(cmd, cwd=stage)
    if result.returncode != 0:
        raise SystemExit(f"jupyter-book build failed (exit {result.returncode}): {' '.join(cmd)}")
    stamp.write_text(json.dumps({"key": content_hash}) + "\n")
    return "built", html


# --------------------------------------------------------------------------- commands
def parse_overrides(items: list[str] | None) -> dict:
    return dict(parse_override(item) for item in items or [])


def print_table(rows: list[tuple[str, str, float]]) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"\n{'stage'.ljust(width)}  {'status':<12} {'seconds':>8}")
    print(f"{'-' * width}  {'-' * 12} {'-' * 8}")
    for name, status, seconds in rows:
        print(f"{name.ljust(width)}  {status:<12} {seconds:8.1f}")
    print(f"{'total'.ljust(width)}  {'':<12} {sum(r[2] for r in rows):8.1f}\n")


def cmd_all(args) -> None:
    t_script = time.time()
    overrides = parse_overrides(args.set)
    rows = []
    if args.started:
        rows.append(("setup (.venv, packages, kernel, chromium)", "checked", max(0.0, t_script - args.started)))
    profile = load_profile(args.profile, overrides)
    paths = run_paths(profile)
    if profile.mock is not None:
        start = time.perf_counter()
        say(f"mock: {profile.mock.n_galaxies} galaxies, seed {profile.mock.seed}, in {paths.mock}")
        generated = ensure_mock(profile, paths, progress=True)
        rows.append(("mock survey", "generated" if generated else "up to date", time.perf_counter() - start))
    outcomes, executed = run_notebooks(args.profile, overrides, force=args.force)
    rows += [(f"notebook {o.name}", o.status, o.seconds) for o in outcomes]
    start = time.perf_counter()
    content = stage_book(args.profile, overrides, executed, BUILD_DIR / "book" / profile.run_name)
    status, html = build_html(BUILD_DIR / "book" / profile.run_name, ROOT, content, force=args.force)
    rows.append(("HTML book", status, time.perf_counter() - start))
    print_table(rows)
    say(f"book of profile {profile.run_name}: {html / 'index.html'}")


def cmd_run(args) -> None:
    run_notebooks(args.profile, parse_overrides(args.set), only=args.only, force=args.force,
                  runs_dir=args.runs_dir, out_dir=args.executed)


def cmd_html(args) -> None:
    overrides = parse_overrides(args.set)
    profile = load_profile(args.profile, overrides)
    executed = Path(args.executed or BUILD_DIR / "notebooks" / profile.run_name)
    out = Path(args.out or ROOT)
    stage = Path(args.stage or BUILD_DIR / "book" / profile.run_name)
    content = stage_book(args.profile, overrides, executed, stage)
    build_html(stage, out, content, force=args.force)


def cmd_nbval_refs(args) -> None:
    """Execute the notebooks with the smoke profile and keep them as nbval references
    (text outputs only: nbval compares text, never images)."""
    import nbformat

    outcomes, executed = run_notebooks(NBVAL_PROFILE, {}, force=True)
    NBVAL_DIR.mkdir(parents=True, exist_ok=True)
    for outcome in outcomes:
        nb = nbformat.read(executed / f"{outcome.name}.ipynb", as_version=4)
        nb.metadata.pop("papermill", None)
        for cell in nb.cells:
            cell.metadata.pop("papermill", None)
            cell.metadata.pop("execution", None)
            ignored = "nbval-ignore-output" in cell.metadata.get("tags", [])
            for output in cell.get("outputs", []):  # nbval never compares images: keep the files small
                for mime in [m for m in output.get("data", {})
                             if m.startswith("image/") or (ignored and m == "text/html")]:
                    del output["data"][mime]  # (an ignored cell's HTML is the interactive map: MBs)
        nbformat.write(nb, NBVAL_DIR / f"{outcome.name}.ipynb")
        say(f"reference {NBVAL_DIR.relative_to(ROOT) / (outcome.name + '.ipynb')}")


def cmd_mock_args(args) -> None:
    """Print the scripts/make_mock.py arguments of a profile's mock (for `make mock`)."""
    profile = load_profile(args.profile, parse_overrides(args.set))
    if profile.mock is None:
        raise SystemExit(f"profile {profile.name!r} reads real files; it has no mock")
    mock = profile.mock
    print(f"--n {mock.n_galaxies} --seed {mock.seed} --workers {mock.workers} --out {run_paths(profile).mock}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--profile", default="default", help="profile name (profiles/NAME.yaml)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a setting, e.g. --set mock.seed=7 (repeatable)")
        p.add_argument("--force", action="store_true", help="run even what is up to date")
        return p

    p = common(sub.add_parser("all", help="mock, notebooks and HTML book, then a table of stage times"))
    p.add_argument("--started", type=float, help="epoch seconds when `make` started (for the setup row)")
    p.set_defaults(func=cmd_all)
    p = common(sub.add_parser("run", help="execute notebooks"))
    p.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="run only these (e.g. 01-data)")
    p.add_argument("--runs-dir", type=Path, help="artifact root instead of runs/")
    p.add_argument("--executed", type=Path, help="folder for executed notebooks")
    p.set_defaults(func=cmd_run)
    p = common(sub.add_parser("html", help="build the HTML book from executed notebooks"))
    p.add_argument("--executed", type=Path, help="folder of executed notebooks")
    p.add_argument("--stage", type=Path, help="folder for the generated book source")
    p.add_argument("--out", type=Path, help="HTML goes to OUT/_build/html (default: the project root)")
    p.set_defaults(func=cmd_html)
    p = common(sub.add_parser("mock-args", help="print scripts/make_mock.py arguments for a profile"))
    p.set_defaults(func=cmd_mock_args)
    p = sub.add_parser("nbval-refs", help="refresh tests/nbval/ from a smoke-profile run")
    p.set_defaults(func=cmd_nbval_refs)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
