"""The benchmark's reading of the operator's own metrics, and its summary of a py-spy profile."""

from __future__ import annotations

import math

from bench_operator import histogram_p99, most_at_once, operator_view, profile_summary
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest


def test_the_operator_view_reads_reconciles_and_the_p99_bucket_of_queue_wait_and_reconcile_time() -> None:
    registry = CollectorRegistry()
    reconciles = Counter("finetune_reconciles", "", ["result"], registry=registry)
    wait = Histogram("finetune_workqueue_wait_seconds", "", registry=registry)
    duration = Histogram("finetune_reconcile_duration_seconds", "", registry=registry)
    reconciles.labels(result="ok").inc(90)
    reconciles.labels(result="error").inc(10)
    for _ in range(99):
        wait.observe(0.02)
        duration.observe(0.004)
    wait.observe(3.0)
    duration.observe(0.2)
    view = operator_view(generate_latest(registry).decode())
    assert view.reconciles == 100
    assert view.queue_wait_p99 == 0.025  # 99 of 100 waits are in the bucket up to 25 ms
    assert view.reconcile_p99 == 0.005
    assert math.isclose(view.reconcile_mean, (99 * 0.004 + 0.2) / 100)


def test_a_histogram_without_observations_has_no_p99() -> None:
    assert math.isnan(histogram_p99([]))
    assert math.isnan(histogram_p99([(0.1, 0.0), (math.inf, 0.0)]))


def test_the_profile_summary_tells_waiting_from_computing_and_counts_packages_once_per_sample() -> None:
    site = "/work/.venv/lib/python3.11/site-packages"
    folded = "\n".join(
        [
            "run (kopf/_core/reactor/running.py:10);loads (json/decoder.py:5);raw_decode (json/decoder.py:7) 30",
            f"_call ({site}/finetune_operator/kube.py:120);request ({site}/urllib3/pool.py:3);read (ssl.py:9) 50",
            f"_call ({site}/finetune_operator/kube.py:121);deserialize ({site}/kubernetes/client.py:4) 20",
            f"_call ({site}/finetune_operator/kube.py:122);SSLSocket.read (ssl.py:1167) 60",
            "run_forever (asyncio/base_events.py:1);EpollSelector.select (selectors.py:468) 40",
        ]
    )
    lines = profile_summary(folded)
    assert lines[0].startswith("where the operator's threads were (py-spy, 200 samples")
    assert lines[0].endswith("waiting for work 20%, for the API server's answers 30%, computing 50%")
    # By the innermost package outside the standard library.
    assert lines[1] == "  computing, by package: urllib3 50%, kopf 30%, kubernetes 20%"
    # Lines of one function count together.
    assert lines[2].split() == ["50.0%", "read", "(ssl.py)"]


def test_an_empty_profile_says_so() -> None:
    assert profile_summary("") == ["py-spy recorded no samples"]


def test_spans_open_at_once_are_counted_at_their_busiest_moment() -> None:
    assert most_at_once([]) == 0
    assert most_at_once([(0, 10), (2, 4), (3, 12), (11, 13)]) == 3
    # One that ends as another starts does not overlap it.
    assert most_at_once([(0, 5), (5, 10)]) == 1
