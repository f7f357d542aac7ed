"""The README and docs/ stay true to the repository: links resolve, the README stays a front page that starts with
the two set-up commands (CI runs the second one's test command), and every result file they quote exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))

# The two set-up commands, exactly: the README must start with them.
TEST_COMMAND = "python3 -m pytest -q"
SETUP = "\n".join([
    "# fastalign",
    "",
    "```bash",
    "# 1. install, then run the main job on the embedded default",
    'pip install torch==2.13.0 ninja pybind11 && pip install --no-build-isolation -e ".[train]" && fastalign dpo',
    "# 2. install, then run the tests",
    'pip install torch==2.13.0 ninja pybind11 && pip install --no-build-isolation -e ".[dev,train,lora]" && '
    + TEST_COMMAND,
    "```",
    "",
])

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
_RESULT = re.compile(r"bench/results/[\w.\-]+\.json")


def _without_code(text: str) -> str:
    """The text outside fenced code blocks and inline code (a link inside code is not a link)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _relative_links(page: Path) -> list[str]:
    links = []
    for m in _LINK.finditer(_without_code(page.read_text())):
        target = m.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s):, mailto:, or an anchor on the same page
        links.append(target.split("#", 1)[0])
    return links


def test_there_are_docs_pages():
    names = {p.name for p in PAGES}
    for name in ("trainer.md", "logprobs.md", "gae.md", "dpo.md", "ppo.md", "benchmarks.md", "gpu.md", "design.md"):
        assert name in names, f"docs/{name} is missing"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page):
    broken = []
    for target in _relative_links(page):
        path = (page.parent / target).resolve()
        rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
        if not path.exists():
            broken.append(f"{target} (-> {rel})")
    assert not broken, f"{page.relative_to(ROOT)}: links to missing files: {broken}"


def test_readme_is_a_front_page():
    size = README.stat().st_size
    assert size < 12 * 1024, f"README.md must stay under 12 KB (the manual belongs in docs/); it is {size} bytes"


def test_readme_starts_with_the_two_setup_commands():
    text = README.read_text()
    assert text.startswith(SETUP), "README.md must start with the two set-up commands, unchanged:\n" + SETUP


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert TEST_COMMAND in ci, f".ci/run must run the README's test command {TEST_COMMAND!r}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_quoted_result_files_exist(page):
    missing = sorted({p for p in _RESULT.findall(page.read_text()) if not (ROOT / p).is_file()})
    assert not missing, f"{page.relative_to(ROOT)} names result files that are not committed: {missing}"
