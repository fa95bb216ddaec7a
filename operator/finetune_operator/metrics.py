"""Prometheus metrics of the operator (served on settings.metrics_port at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter("finetune_reconciles_total", "FineTuneJob reconciles, by result.", ["result"])
RECONCILE_SECONDS = Histogram("finetune_reconcile_duration_seconds", "Time one reconcile takes.")
RECONCILE_API_REQUESTS = Histogram(
    "finetune_reconcile_api_requests",
    "API requests one reconcile makes (reads come from the watch cache, so these are writes).",
    buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16),
)
API_REQUESTS = Counter(
    "finetune_api_requests_total",
    "Requests to the API server, by verb, resource and result code.",
    ["verb", "resource", "code"],
)
QUEUE_DEPTH = Gauge("finetune_workqueue_depth", "FineTuneJobs waiting for a reconcile.")
QUEUE_WAIT_SECONDS = Histogram("finetune_workqueue_wait_seconds", "Time a FineTuneJob waits in the queue.")
PHASE_TRANSITIONS = Counter("finetune_phase_transitions_total", "FineTuneJobs entering each phase.", ["phase"])
FINETUNEJOBS = Gauge("finetune_finetunejobs", "FineTuneJobs known to the operator, by phase.", ["phase"])
STATUS_PATCHES = Counter("finetune_status_patches_total", "Status writes, by writer.", ["source"])
WRITE_CONFLICTS = Counter(
    "finetune_status_write_conflicts_total", "Status writes refused because the FineTuneJob changed.", ["source"]
)
TRAINER_EVENTS = Counter("finetune_trainer_events_total", "Protocol events read from trainer logs.")
LOG_STREAMS = Gauge("finetune_log_streams", "Trainer logs being followed now.")
LEADER = Gauge("finetune_leader", "1 while this replica holds the leader Lease.")
WEBHOOK_ATTEMPTS = Counter(
    "finetune_webhook_attempts_total", "Webhook delivery attempts, by event and result.", ["event", "result"]
)
