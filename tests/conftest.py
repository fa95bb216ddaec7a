"""Every test runs, or fails: none may pass by skipping.

A test may skip only under a marker of `SKIPPABLE`, whose reason cannot apply where the suite is meant to run in
full (`cuda`: a CUDA device, which CI machines do not have). Any other skip, from `pytest.skip`, `skipif` or a
fixture, is reported as a failure that says why the test skipped. What a test needs (helm, the control plane, the
trainer's packages) is built or installed before it runs (`make test`), so a missing tool is a failure too.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest

# The markers whose tests may skip, and the reason each gives.
SKIPPABLE = {"cuda": "needs a CUDA device"}


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needs_cuda = [item for item in items if item.get_closest_marker("cuda") is not None]
    if needs_cuda and not _has_cuda():
        for item in needs_cuda:
            item.add_marker(pytest.mark.skip(reason=SKIPPABLE["cuda"]))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, object, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    if any(item.get_closest_marker(marker) is not None for marker in SKIPPABLE):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (
        f"{item.nodeid} skipped ({reason}), and no test may pass by skipping: only tests marked "
        f"{', '.join(f'@pytest.mark.{marker} ({why})' for marker, why in SKIPPABLE.items())} may skip"
    )
