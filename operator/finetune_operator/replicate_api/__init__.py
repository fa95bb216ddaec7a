"""Replicate's trainings API over FineTuneJobs: existing `replicate` client code runs against the cluster.

`training` holds Replicate's objects, `mapping` the pure translation between them and FineTuneJobs, `pages` the
cursor pagination, `auth` the Kubernetes TokenReview and SubjectAccessReview checks, `finetunejobs` the API calls,
and `server` the HTTP routes (aiohttp, on the operator's event loop or on its own).
"""
