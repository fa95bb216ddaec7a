"""Prometheus metrics of the operator (served on settings.metrics_port at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter("finetune_reconciles_total", "FineTuneJob reconciles, by result.", ["result"])
RECONCILE_SECONDS = Histogram("finetune_reconcile_duration_seconds", "Time one reconcile takes.")
PHASE_TRANSITIONS = Counter("finetune_phase_transitions_total", "FineTuneJobs entering each phase.", ["phase"])
STATUS_PATCHES = Counter("finetune_status_patches_total", "Status patches, by writer.", ["source"])
TRAINER_EVENTS = Counter("finetune_trainer_events_total", "Protocol events read from trainer logs.")
LOG_STREAMS = Gauge("finetune_log_streams", "Trainer logs being followed now.")
WEBHOOK_ATTEMPTS = Counter(
    "finetune_webhook_attempts_total", "Webhook delivery attempts, by event and result.", ["event", "result"]
)
