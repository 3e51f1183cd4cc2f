"""The book machinery: notebooks, the runner, the HTML book as a reader sees it.

The expensive part (a smoke book built in a temporary folder and opened in headless
Chromium) is one module-scoped fixture that several tests share.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from sdsscl.config import PROFILE_NAMES, load_profile

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "_build" / "test-artifacts"


def load_script(name: str):
    """Import scripts/<name>.py as a module (scripts/ is not a package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


build_book = load_script("build_book")
check_book = load_script("check_book")
import jupytext  # noqa: E402  (after the scripts, which put the project first on sys.path)


def notebook_sources() -> list[Path]:
    return sorted((ROOT / "notebooks").glob("*.py"))


# --------------------------------------------------------------------------- notebooks
def test_notebooks_are_numbered_in_book_order_and_listed_in_the_toc():
    toc = (ROOT / "_toc.yml").read_text()
    names = [p.stem for p in notebook_sources()]
    assert names == sorted(names) and names[:2] == ["00-introduction", "01-data"]
    for name in names:
        assert re.fullmatch(r"\d\d-[a-z0-9-]+", name), name
        assert f"notebooks/{name}" in toc
    build_book.discover()  # dependencies point only at earlier notebooks


@pytest.mark.parametrize("path", notebook_sources(), ids=lambda p: p.stem)
def test_every_notebook_starts_with_a_parameters_cell(path):
    nb = jupytext.read(path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell must be tagged 'parameters'"
    assigned = [t.id for node in ast.parse(code[0].source).body for t in node.targets]
    assert assigned == ["profile", "overrides", "runs_dir"]
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1
    assert nb.metadata["kernelspec"]["name"] == "python3"


#: Keyword arguments that carry a setting: outside the parameters cell they must take it from the profile.
SETTING_KEYWORDS = {"seed", "n", "n_galaxies", "workers", "max_galaxies", "fractions", "dpi", "min_votes"}


#: Integers that a notebook may write although a profile happens to hold them too.
NOT_SETTINGS = {100, 120, 180}  # percentages; angles in degrees (sky map)


@pytest.mark.parametrize("path", notebook_sources(), ids=lambda p: p.stem)
def test_no_setting_is_written_as_a_literal_outside_the_parameters_cell(path):
    profile_ints = {v for name in PROFILE_NAMES for v in load_profile(name).flat().values()
                    if isinstance(v, int) and not isinstance(v, bool) and v >= 100} - NOT_SETTINGS
    for cell in jupytext.read(path).cells:
        if cell.cell_type != "code" or "parameters" in cell.metadata.get("tags", []):
            continue
        python = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith("%"))
        for node in ast.walk(ast.parse(python)):  # IPython magics (%matplotlib inline) aside
            if isinstance(node, ast.keyword) and node.arg in SETTING_KEYWORDS:
                assert not isinstance(node.value, ast.Constant), \
                    f"{path.name}: {node.arg}={ast.unparse(node.value)} belongs in the profile"
            if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
                assert node.value not in profile_ints, f"{path.name}: literal {node.value} repeats a profile value"


def test_every_figure_caption_names_the_paper_figure_and_the_notebook():
    for path in notebook_sources():
        for cell in jupytext.read(path).cells:
            figure = cell.metadata.get("mystnb", {}).get("figure")
            if figure:
                caption = figure["caption"]
                assert re.search(r"paper (Figure \d|has no|shows no)|Figures? \d", caption), caption
                assert f"notebook {path.stem}" in caption, caption


def test_the_kernel_papermill_and_nbval_use_is_this_environment():
    build_book.check_kernel()


# --------------------------------------------------------------------------- the book sources
def test_book_config_renders_and_never_executes():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "off"
    assert config["only_build_toc_files"] is True
    for bib in config["bibtex_bibfiles"]:
        assert (ROOT / bib).is_file()


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [toc["root"]] + [ch["file"] for part in toc["parts"] for ch in part["chapters"]]


def test_every_toc_entry_has_a_source():
    for entry in toc_files():
        assert (ROOT / f"{entry}.md").is_file() or (ROOT / f"{entry}.py").is_file(), entry


def test_chapters_not_reproduced_say_so_and_name_their_paper_figures():
    for entry in toc_files():
        path = ROOT / f"{entry}.md"
        text = path.read_text() if path.is_file() else ""
        if "Not yet reproduced" in text:
            assert re.search(r"\*\*Figures? \d+|Figure \d+", text), f"{entry} names no paper figure"
            assert "What the paper reports (paper)" in text, f"{entry}: the paper's result, labelled as such"


def test_every_citation_is_in_the_bibliography():
    bib = (ROOT / "book" / "references.bib").read_text()
    keys = set(re.findall(r"^@\w+\{([^,]+),", bib, re.M))
    used = set()
    for path in [*(ROOT / "book").glob("*.md"), *notebook_sources()]:
        for group in re.findall(r"\{cite:[tp]\}`([^`]+)`", path.read_text()):
            used.update(k.strip() for k in group.split(","))
    assert used and not used - keys, f"cited but not in references.bib: {sorted(used - keys)}"


# --------------------------------------------------------------------------- the runner
TINY_A = '''# ---
# jupyter:
#   kernelspec: {display_name: Python 3, language: python, name: python3}
#   sdsscl: {depends: []}
# ---
# %% tags=["parameters"]
profile = "x"
overrides = {}
runs_dir = None
# %%
from sdsscl.config import load_profile
print("seed", load_profile(profile, overrides).seed)
'''
TINY_B = TINY_A.replace("depends: []", "depends: [00-a]").replace('print("seed"', 'print("split seed"')
FAILING = TINY_A + '# %%\nraise ValueError("the failing cell")\n'


@pytest.fixture
def tiny_notebooks(tmp_path, monkeypatch):
    """Two tiny notebooks and a mock-free profile in a temporary folder."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    (folder / "00-a.py").write_text(TINY_A)
    (folder / "01-b.py").write_text(TINY_B)
    monkeypatch.setattr(build_book, "NOTEBOOK_DIR", folder)
    monkeypatch.setattr(build_book, "library_hash", lambda: "frozen")  # colleagues edit sdsscl/ meanwhile
    profile = tmp_path / "tiny.yaml"
    profile.write_text((ROOT / "profiles" / "paper.yaml").read_text())  # real files: no mock to make
    return folder, str(profile), tmp_path



def run(profile, tmp_path, **kw):
    outcomes, _ = build_book.run_notebooks(profile, kw.pop("overrides", {}), runs_dir=tmp_path / "runs",
                                           out_dir=tmp_path / "executed", progress=False, **kw)
    return {o.name: o.status for o in outcomes}


def test_runner_skips_what_has_not_changed_and_reruns_what_depends_on_a_change(tiny_notebooks):
    folder, profile, tmp = tiny_notebooks
    assert run(profile, tmp) == {"00-a": "ran", "01-b": "ran"}
    assert run(profile, tmp) == {"00-a": "up to date", "01-b": "up to date"}
    executed = nbformat.read(tmp / "executed" / "00-a.ipynb", as_version=4)
    assert "seed 2021" in "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    (folder / "01-b.py").write_text(TINY_B + "# %%\n1 + 1\n")
    assert run(profile, tmp) == {"00-a": "up to date", "01-b": "ran"}
    (folder / "00-a.py").write_text(TINY_A + "# %%\n2 + 2\n")
    assert run(profile, tmp) == {"00-a": "ran", "01-b": "ran"}  # 01-b depends on 00-a
    assert run(profile, tmp, overrides={"seed": 7}) == {"00-a": "ran", "01-b": "ran"}
    assert run(profile, tmp, only=["01-b"], force=True) == {"01-b": "ran"}


def test_runner_reruns_after_a_library_change(tiny_notebooks, monkeypatch):
    folder, profile, tmp = tiny_notebooks
    monkeypatch.setattr(build_book, "library_hash", lambda: "before")
    run(profile, tmp)
    assert run(profile, tmp) == {"00-a": "up to date", "01-b": "up to date"}
    monkeypatch.setattr(build_book, "library_hash", lambda: "after")
    assert run(profile, tmp) == {"00-a": "ran", "01-b": "ran"}


def test_runner_stops_at_a_failing_cell_and_shows_it(tiny_notebooks, capsys):
    folder, profile, tmp = tiny_notebooks
    (folder / "01-b.py").write_text(FAILING)
    with pytest.raises(build_book.NotebookFailed):
        run(profile, tmp)
    err = capsys.readouterr().err
    assert "notebook 01-b FAILED in cell" in err
    assert 'raise ValueError("the failing cell")' in err and "ValueError" in err
    assert (tmp / "executed" / "01-b.failed.ipynb").is_file()
    assert not (tmp / "executed" / "01-b.ipynb").exists()


# --------------------------------------------------------------------------- the smoke book
@pytest.fixture(scope="module")
def smoke_book(tmp_path_factory):
    """The smoke book built from scratch in a temporary folder: mock, notebooks, HTML.

    The library hash is frozen for the module, so that a colleague saving a file in
    sdsscl/ meanwhile does not count as a change (test_runner_reruns_after_a_library_change
    covers that)."""
    frozen = build_book.library_hash()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build_book, "library_hash", lambda: frozen)
        yield _build_smoke_book(tmp_path_factory.mktemp("smoke-book"))


def _build_smoke_book(tmp):
    outcomes, executed = build_book.run_notebooks("smoke", {}, runs_dir=tmp / "runs", out_dir=tmp / "executed",
                                                  progress=False)
    assert {o.status for o in outcomes} == {"ran"}
    content = build_book.stage_book("smoke", {}, executed, tmp / "stage")
    status, html = build_book.build_html(tmp / "stage", tmp / "out", content)
    assert status == "built"
    return tmp, html, content


def test_smoke_book_opens_in_chromium_with_every_page_image_and_link(smoke_book):
    tmp, html, _ = smoke_book
    shot = ARTIFACTS / "front-page-smoke.png"
    report = check_book.check_book(html, screenshot=shot)
    assert report.ok, "\n".join(report.problems)
    pages = {p.path: p for p in report.pages}
    expected = {f"{entry}.html" for entry in toc_files()}
    assert expected <= set(pages), f"pages missing from the built book: {sorted(expected - set(pages))}"
    assert pages["notebooks/01-data.html"].images >= 4  # sky map, gallery, distributions, selection
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_smoke_book_data_chapter_shows_figures_with_paper_captions_and_provenance(smoke_book):
    tmp, html, _ = smoke_book
    page = (html / "notebooks" / "01-data.html").read_text()
    assert "Reproduces paper Figure 6" in page
    assert "MOCK survey · profile smoke" in page  # the provenance line under the tables
    assert "<table" in page  # the Markdown tables render as tables
    for name in ("sky_distribution", "gallery", "mock_vs_sdss", "labelled_selection"):
        assert (tmp / "runs" / "smoke" / "figures" / f"{name}.png").is_file()
    record = json.loads((tmp / "runs" / "smoke" / "metrics" / "data.json").read_text())
    assert record["provenance"]["profile"] == "smoke" and record["metrics"]["n_galaxies"] == 400


def test_rebuilding_an_unchanged_book_does_no_work(smoke_book):
    tmp, _, content = smoke_book
    again = build_book.stage_book("smoke", {}, tmp / "executed", tmp / "stage")
    assert again == content
    assert build_book.build_html(tmp / "stage", tmp / "out", again)[0] == "up to date"
    outcomes, _ = build_book.run_notebooks("smoke", {}, runs_dir=tmp / "runs", out_dir=tmp / "executed",
                                           progress=False)
    assert {o.status for o in outcomes} == {"up to date"}


def test_papermill_by_hand_as_the_readme_says_and_another_seed_changes_the_numbers(smoke_book, tmp_path):
    tmp, _, _ = smoke_book
    bin_dir = Path(sys.executable).parent
    ipynb = tmp_path / "01-data.ipynb"
    subprocess.run([bin_dir / "jupytext", "--to", "ipynb", "-o", ipynb, ROOT / "notebooks" / "01-data.py"],
                   check=True, capture_output=True)
    out = tmp_path / "01-data-seed7.ipynb"
    subprocess.run([bin_dir / "papermill", ipynb, out, "-p", "profile", "smoke", "-p", "runs_dir", tmp / "runs",
                    "-y", '{"overrides": {"mock.seed": 7}}'], check=True, capture_output=True, cwd=ROOT)
    seed7 = load_profile("smoke", {"mock.seed": 7})
    other = json.loads((tmp / "runs" / seed7.run_name / "metrics" / "data.json").read_text())
    base = json.loads((tmp / "runs" / "smoke" / "metrics" / "data.json").read_text())
    assert other["provenance"]["mock_seed"] == 7
    assert other["metrics"]["summary"]["mock"] != base["metrics"]["summary"]["mock"]


# --------------------------------------------------------------------------- nbval
def test_nbval_references_are_small_and_fail_when_a_printed_number_changes(tmp_path):
    refs = sorted((ROOT / "tests" / "nbval").glob("*.ipynb"))
    assert [p.stem for p in refs] == [p.stem for p in notebook_sources()], "run `make nbval-refs`"
    for ref in refs:
        assert ref.stat().st_size < 100_000, f"{ref.name}: keep reference notebooks small"
        source = [c.source for c in jupytext.read(ROOT / "notebooks" / f"{ref.stem}.py").cells if c.cell_type == "code"]
        executed = [c.source for c in nbformat.read(ref, as_version=4).cells
                    if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])]
        assert executed == source, f"{ref.name} is older than notebooks/{ref.stem}.py: run `make nbval-refs`"
    nb = nbformat.read(ROOT / "tests" / "nbval" / "00-introduction.ipynb", as_version=4)
    changed = False
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            text = output.get("data", {}).get("text/markdown", "")
            if "| mock.n_galaxies | 400 |" in text:
                output["data"]["text/markdown"] = text.replace("| mock.n_galaxies | 400 |", "| mock.n_galaxies | 401 |")
                changed = True
    assert changed, "the reference no longer prints mock.n_galaxies"
    nbformat.write(nb, tmp_path / "00-introduction.ipynb")
    env = {**os.environ, "SDSSCL_ROOT": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval",
                             "--nbval-sanitize-with", str(ROOT / "tests" / "nbval" / "sanitize.cfg"),
                             "--rootdir", str(tmp_path), str(tmp_path / "00-introduction.ipynb")],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 1, result.stdout[-2000:]
    assert "401" in result.stdout and "1 failed" in result.stdout
