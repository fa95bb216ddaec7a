"""Webhooks for every FineTuneJob with `spec.webhook`: Replicate's training object, signed per Standard Webhooks.

`signing` signs a message, `addresses` decides which addresses a webhook may reach, `deliveries` is the pure
plan (which events become messages, when each is due, backoff), and `dispatcher` sends them from the operator's
event loop, keeping its state in `status.webhook` (its only writer) so that deliveries go on after a restart.
"""
