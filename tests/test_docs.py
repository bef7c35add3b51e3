"""The docs build without warnings, and their examples run.

Every fenced `bash` (and `python`) block of the pages in `mkdocs.yml`'s order runs in
one scratch folder (with `.venv` and `examples/` linked in), so a page can use the table
an earlier page made, exactly as a reader following them would. A block marked
`<!-- heavy -->` runs only in `make test-heavy`; one marked `<!-- not run: why -->`
never runs, and says which test covers it instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

BLOCK = re.compile(r"(?:<!-- (heavy|not run:[^>]*) -->\n)?```(bash|python)\n(.*?)```", re.S)


def pages() -> list[Path]:
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    return [REPO / "docs" / next(iter(item.values())) for item in nav]


def examples(page: Path, *, heavy: bool) -> list[tuple[str, str]]:
    """(language, code) of the page's blocks to run."""
    out = []
    for mark, language, code in BLOCK.findall(page.read_text()):
        if mark.startswith("not run") or (mark == "heavy" and not heavy):
            continue
        out.append((language, code))
    return out


def run_pages(tmp_path: Path, *, heavy: bool) -> int:
    work = tmp_path / "work"
    (work / "repo").mkdir(parents=True)
    for name in (".venv", "examples"):
        (work / "repo" / name).symlink_to(REPO / name)
    if (REPO.parent / "shared").is_dir():
        (work / "shared").symlink_to(REPO.parent / "shared")
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    ran = 0
    for page in pages():
        for language, code in examples(page, heavy=heavy):
            command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" \
                else [sys.executable, "-c", code]
            done = subprocess.run(command, cwd=work / "repo", env=env, capture_output=True,
                                  text=True, timeout=1200)
            assert done.returncode == 0, (f"{page.name}: this example failed:\n{code}\n"
                                          f"stdout: {done.stdout[-2000:]}\n"
                                          f"stderr: {done.stderr[-3000:]}")
            ran += 1
    return ran


def test_docs_build_with_no_warnings(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d",
                           str(tmp_path / "site")], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr
    assert (tmp_path / "site" / "maintenance" / "index.html").is_file()


def test_every_page_is_in_the_nav_and_marks_what_it_does_not_run() -> None:
    listed = {p.name for p in pages()}
    assert listed == {p.name for p in (REPO / "docs").glob("*.md")}
    for page in pages():
        for mark, _, _ in BLOCK.findall(page.read_text()):
            assert mark in ("", "heavy") or re.match(r"not run: \S", mark), (page, mark)


def test_doc_examples_run(tmp_path) -> None:
    assert run_pages(tmp_path, heavy=False) >= 10


@pytest.mark.heavy
def test_doc_examples_run_with_the_heavy_ones(tmp_path) -> None:
    if not (REPO.parent / "shared" / "eval" / "scifact").is_dir():
        pytest.skip("../shared/eval/scifact is absent")
    assert run_pages(tmp_path, heavy=True) >= 14
