"""What the README promises a new user (issue 17 items 1-3, 6): `make test` is what CI runs, commands are
callable as written, the README stays user-first with the long material in docs/, and its exit-code table
is the CLI's."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from captioner.options import EXIT_CODES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def code_lines(markdown: str) -> list[str]:
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", markdown, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_exactly_make_test():
    """Item 1: .ci/run is `make test`, and `make test` itself installs Chromium (and exiftool) where apt-get can."""
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "make test" and not any("apt-get" in line for line in ci)
    if shutil.which("make") is None:
        pytest.skip("no make")
    dry = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "apt-get install -y -qq chromium libimage-exiftool-perl" in dry.stdout
    assert "sudo apt-get install chromium libimage-exiftool-perl" in dry.stdout
    assert "`" not in dry.stdout.split("chromium or exiftool is missing", 1)[1].splitlines()[0]  # no command substitution
    browser = (ROOT / "tests" / "test_browser.py").read_text()
    assert "sudo apt-get install chromium" in browser  # the skip message says how


def test_readme_commands_run_from_the_venv():
    """Item 2: no bare `captioner` (not on PATH after `make`); .venv/bin/captioner or activate."""
    bare = [line for line in code_lines(README) if line.startswith(("captioner ", "python app.py"))]
    assert not bare, bare
    assert ". .venv/bin/activate" in README and ".venv/bin/captioner caption photo.jpg" in README


def test_readme_is_user_first_and_the_method_moved_to_docs():
    """Item 3: a short README (set-up, the three uses, one results table, links); every number and command
    of the moved sections is in docs/."""
    assert len(README.encode()) < 10_000
    headings = re.findall(r"(?m)^## (.+)$", README)
    assert headings[:3] == ["Quick start", "Usage", "The web app"] and "Results" in headings
    for page in ("docs/results.md", "docs/speed.md", "docs/training.md", "docs/design.md"):
        assert f"]({page})" in README and (ROOT / page).is_file(), page
    docs = "".join((ROOT / "docs" / p).read_text(encoding="utf-8") for p in ("results.md", "speed.md", "training.md"))
    for kept in ("0.705", "3.452", "0.099", "132 / 128 img/s", "250 / 210 img/s", "--scst-bleu 5", "runs/ucm-scst",
                 "make ucm", "bench/bench.py --images 200", "0.143 with `--text-ratio 1 --ema 0.99`"):
        assert kept in docs, kept
    for link in re.findall(r"\]\((\.\./[^)#]+)\)", docs):  # links out of docs/ still resolve
        assert (ROOT / "docs" / link).resolve().exists(), link


def test_readme_exit_code_table_is_the_clis():
    """Item 6: the README's table and --help's epilog come from the same list."""
    rows = re.findall(r"(?m)^\| (\d+) \| (.+) \|$", README.split("### Exit codes", 1)[1].split("###", 1)[0])
    assert [(int(code), text) for code, text in rows] == list(EXIT_CODES)
