"""TrainerCallbacks that turn the Trainer's state into protocol events: start, progress, eval, sample."""

from __future__ import annotations

import math
import time
from typing import Any

from transformers import TrainerCallback

from finetune_contract.protocol import EvalEvent, ProgressEvent, SampleEvent, StartEvent
from finetune_trainer.events import emit, rank

SAMPLE_MAX_NEW_TOKENS = 128


class ProgressCallback(TrainerCallback):
    """start, progress and eval events from the Trainer's own state and logs."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._started = time.monotonic()
        self._first_step = 0
        self._last_time = self._started
        self._last_tokens: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._started = self._last_time = time.monotonic()
        self._first_step = state.global_step
        emit(StartEvent(world_size=self.world_size, total_steps=state.max_steps, epochs=int(args.num_train_epochs)))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        now = time.monotonic()
        if "eval_loss" in logs:
            loss = float(logs["eval_loss"])
            emit(EvalEvent(epoch=round(state.epoch or 0, 4), eval_loss=loss, perplexity=_perplexity(loss)))
            return
        if "loss" not in logs:
            return
        tokens = logs.get("num_tokens")
        tokens_per_second = None
        if tokens is not None and self._last_tokens is not None and now > self._last_time:
            tokens_per_second = (float(tokens) - self._last_tokens) / (now - self._last_time)
        if tokens is not None:
            self._last_tokens = float(tokens)
        self._last_time = now
        done = state.global_step - self._first_step
        eta = (now - self._started) / done * (state.max_steps - state.global_step) if done > 0 else None
        emit(
            ProgressEvent(
                step=state.global_step,
                total_steps=state.max_steps,
                epoch=round(state.epoch or 0, 4),
                loss=float(logs["loss"]),
                learning_rate=float(logs["learning_rate"]) if "learning_rate" in logs else None,
                tokens_per_second=round(tokens_per_second, 1) if tokens_per_second is not None else None,
                eta_seconds=round(eta, 1) if eta is not None else None,
            )
        )


def _perplexity(loss: float) -> float | None:
    return math.exp(loss) if loss < 50 else None


class SampleCallback(TrainerCallback):
    """At each validation (or each epoch's end when there is no validation set), rank 0 completes
    `validation_prompt` with the model as trained so far, greedily."""

    def __init__(self, prompt: str, with_validation: bool, max_new_tokens: int = SAMPLE_MAX_NEW_TOKENS) -> None:
        self.prompt = prompt
        self.with_validation = with_validation
        self.max_new_tokens = max_new_tokens

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.with_validation:
            self._sample(state, kwargs)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.with_validation:
            self._sample(state, kwargs)

    def _sample(self, state: Any, kwargs: dict[str, Any]) -> None:
        if rank() != 0:
            return
        model, tokenizer = kwargs["model"], kwargs["processing_class"]
        emit(
            SampleEvent(
                epoch=round(state.epoch or 0, 4),
                prompt=self.prompt,
                completion=generate(model, tokenizer, self.prompt, self.max_new_tokens),
            )
        )


def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    import torch

    was_training = model.training
    model.eval()
    try:
        encoded = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
        with torch.no_grad():
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        text: str = tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        return text
    finally:
        if was_training:
            model.train()
