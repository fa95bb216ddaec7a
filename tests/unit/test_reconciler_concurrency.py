"""Reconciles run on threads of their own: `workers` of them at once, whatever asyncio's default pool holds."""

from __future__ import annotations

import asyncio
import threading
from typing import cast

import pytest

from finetune_operator.cache import Cache
from finetune_operator.kube import KubeApi
from finetune_operator.log_follower import LogFollowers
from finetune_operator.reconciler import Reconciler
from finetune_operator.settings import Settings

# More than asyncio's default pool ever has (min(32, CPUs + 4) threads).
WORKERS = 40


def test_as_many_reconciles_run_at_once_as_the_workers_setting_says(monkeypatch: pytest.MonkeyPatch) -> None:
    reconciler = Reconciler(cast(KubeApi, None), Cache(), Settings(workers=WORKERS), cast(LogFollowers, None))
    # Each reconcile waits until all of them are running: they pass only if WORKERS run at the same time.
    all_running = threading.Barrier(WORKERS, timeout=10)
    names: set[str] = set()

    def reconcile_blocking(namespace: str, name: str) -> float | None:
        names.add(threading.current_thread().name)
        all_running.wait()
        return None

    monkeypatch.setattr(reconciler, "reconcile_blocking", reconcile_blocking)

    async def scenario() -> None:
        await asyncio.gather(*(reconciler.reconcile(("ns", f"job-{i}")) for i in range(WORKERS)))

    try:
        asyncio.run(scenario())
    finally:
        reconciler.close()
    assert len(names) == WORKERS
    assert all(name.startswith("reconcile") for name in names)
