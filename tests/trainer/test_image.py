"""The trainer image's lock file: every package pinned with hashes, in step with the pyproject, and none of the
operator's dependencies (the image installs it with --require-hashes)."""

from __future__ import annotations

import re
import tomllib

from conftest import REPO_ROOT

LOCK = REPO_ROOT / "trainer-image" / "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^ \\]+)")


def locked() -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes)."""
    pins: dict[str, tuple[str, int]] = {}
    name = ""
    for line in LOCK.read_text().splitlines():
        if match := PIN.match(line):
            name = match.group(1).lower().replace("_", "-")
            pins[name] = (match.group(2), 0)
        elif line.strip().startswith("--hash=sha256:"):
            version, hashes = pins[name]
            pins[name] = (version, hashes + 1)
    return pins


def test_every_locked_package_is_pinned_with_a_hash() -> None:
    pins = locked()
    assert len(pins) > 50  # the whole tree, not the direct dependencies only
    assert [name for name, (_, hashes) in pins.items() if hashes == 0] == []
    assert not any(line.startswith("-e ") or " @ " in line for line in LOCK.read_text().splitlines())


def test_the_lock_holds_the_pyprojects_exact_pins_and_the_build_backend() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "trainer-image" / "pyproject.toml").read_text())
    pins = locked()
    for requirement in pyproject["project"]["dependencies"]:
        name, _, version = requirement.partition("==")
        if version and name != "finetune-contract":
            assert pins[name.lower()][0] == version, requirement
    backend = tomllib.loads((REPO_ROOT / "contract" / "pyproject.toml").read_text())["build-system"]["requires"]
    for requirement in backend:
        name, _, version = requirement.partition("==")
        assert pins[name.lower()][0] == version, requirement


def test_the_image_installs_nothing_of_the_operators() -> None:
    assert not {"kopf", "kubernetes", "prometheus-client", "finetune-operator"} & set(locked())


def test_the_dockerfile_installs_from_the_lock_by_hash() -> None:
    dockerfile = (REPO_ROOT / "trainer-image" / "Dockerfile").read_text()
    assert "--require-hashes --no-deps -r trainer-image/requirements.lock" in dockerfile
    assert "--no-build-isolation" in dockerfile
    assert re.search(r"^USER 1000:1000$", dockerfile, re.MULTILINE)
