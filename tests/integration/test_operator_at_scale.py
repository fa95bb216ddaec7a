"""The operator at scale, in the small forms `make test` runs: the benchmark at N = 20 and the short fault run.

Both run the operator as a process under the Helm chart's ServiceAccount, with the simulated trainer playing every
pod (tests/cluster/simtrainer.py). They fail on counts only, never on a time: `make bench-operator` and
`make chaos` are the full forms (docs/performance.md, docs/reliability.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench_operator import NODE_POOL, format_table, run_size
from chaos import ChaosOptions, run_chaos
from simtrainer import TrainerTiming
from testcluster import DevCluster, install_crds, remove_nodes, with_audit_log

pytestmark = pytest.mark.integration

# The benchmark's bounds on the state machine's status writes over one FineTuneJob's life (progress apart). A job
# writes once per phase: Validating, Queued, Starting, Running, Succeeded. One more is allowed for a job that a
# race sends through one more phase (a pod the scheduler cannot place at once); the mean catches a write more
# for every job.
MOST_STATUS_WRITES_PER_LIFECYCLE = 6
MEAN_STATUS_WRITES_PER_LIFECYCLE = 5.5


@pytest.fixture
def audited(devcluster: DevCluster) -> Iterator[DevCluster]:
    install_crds(devcluster)
    audited = with_audit_log(devcluster)
    yield audited
    remove_nodes(devcluster.api, NODE_POOL)


def test_twenty_finetunejobs_cost_few_status_writes_and_none_that_echo(audited: DevCluster, tmp_path: Path) -> None:
    timing = TrainerTiming(validation_seconds=1.0, training_seconds=10.0)
    result = run_size(audited, 20, timing, tmp_path, chained_floor=False)
    print(format_table(result))
    assert (result.bare.failed, result.operator.failed) == (0, 0)
    usage = result.usage
    assert usage.most("status_writes") <= MOST_STATUS_WRITES_PER_LIFECYCLE, format_table(result)
    assert usage.total().status_writes / len(usage.per_job) <= MEAN_STATUS_WRITES_PER_LIFECYCLE, format_table(result)
    assert usage.total().noop_status_writes == 0, format_table(result)
    assert usage.most("creates") >= 3  # the audit log saw the operator's ConfigMap, validation Job, training Job
    assert result.view.reconciles >= 20  # the operator's metrics were read


def test_short_fault_run_loses_no_output_and_adopts_none(devcluster: DevCluster, tmp_path: Path) -> None:
    install_crds(devcluster)
    seed = int(os.environ.get("CHAOS_SEED", "8"))
    report = run_chaos(devcluster, ChaosOptions.short(seed), tmp_path)
    print(report.format())
    assert report.verdict.ok, report.format()
