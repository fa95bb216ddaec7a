"""No test passes by skipping (tests/conftest.py): a skip fails unless its test's marker allows it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

TESTS = Path(__file__).resolve().parents[1]

SUITE = """
import pytest

def test_runs():
    pass

def test_skips_itself():
    pytest.skip("no helm binary")

@pytest.mark.skipif(True, reason="a tool is missing")
def test_skipped_by_its_decorator():
    pass

@pytest.fixture
def missing_tool():
    pytest.skip("no kubectl")

def test_skipped_by_a_fixture(missing_tool):
    pass

@pytest.mark.cuda
def test_on_a_gpu():
    pytest.skip("needs a CUDA device")
"""


def outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """Each test's outcome (passed, failed, skipped) and its message, from pytest's JUnit XML report."""
    found = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        results = [child for child in case if child.tag in ("failure", "error", "skipped")]
        # A skip in the setup (skipif, a fixture) fails as an error, one in the test itself as a failure.
        outcome = {"failure": "failed", "error": "failed"}.get(results[0].tag, results[0].tag) if results else "passed"
        message = results[0].get("message", "") + (results[0].text or "") if results else ""
        found[case.get("name", "")] = (outcome, message)
    return found


def test_a_skip_fails_unless_the_tests_marker_allows_it(tmp_path: Path) -> None:
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    cuda: needs a CUDA device\n")
    (tmp_path / "test_suite.py").write_text(SUITE)
    junit = tmp_path / "report.xml"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={junit}", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stdout
    found = outcomes(junit)
    assert {name: outcome for name, (outcome, _) in found.items()} == {
        "test_runs": "passed",
        "test_skips_itself": "failed",
        "test_skipped_by_its_decorator": "failed",
        "test_skipped_by_a_fixture": "failed",
        "test_on_a_gpu": "skipped",
    }
    assert "no helm binary" in found["test_skips_itself"][1]  # the failure says why the test skipped
    assert "needs a CUDA device" in found["test_on_a_gpu"][1]
