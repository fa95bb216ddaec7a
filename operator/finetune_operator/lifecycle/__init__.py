"""The FineTuneJob state machine: observed objects in, the status it owns and the next actions out.

`decide` is a pure function of what the reconciler observed (the FineTuneJob, its validation Job, its training
Job and their pods, as the API server returns them) and the time. It never talks to the API: the reconciler
applies what it returns. Every phase a user can see has a condition reason they can search for, and every
transition comes with a Kubernetes Event. One policy per module:

- `observation`: what goes in (Observation) and what comes out (Decision, Action, Notice);
- `phase`: the phase step (Pending -> Validating -> Queued -> Starting -> Running -> Succeeded | Failed | ...);
- `failure_policy`: why a Job failed, as a reason and message;
- `ttl`: ttlSecondsAfterFinished;
- `gpu_seconds`: GPU time held by the trainer pods;
- `resolved`: status.resolved (batch plan and data sizes) and its Warning;
- `conditions`, `notices`: conditions and Events;
- `kstatus`: the Ready, Reconciling and Stalled conditions (Flux, cli-utils, `kubectl wait`) from the phase;
- `observed`: readers of the observed pods and Jobs;
- `state_machine`: `decide`, which composes them.
"""

from finetune_operator.lifecycle.observation import Action, Decision, Notice, Observation
from finetune_operator.lifecycle.state_machine import decide

__all__ = ["Action", "Decision", "Notice", "Observation", "decide"]
