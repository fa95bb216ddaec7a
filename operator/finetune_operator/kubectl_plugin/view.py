"""What `kubectl ftj watch` and `kubectl ftj list` show: rich renderables built from a FineTuneJob as read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from finetune_operator.api.status import FineTuneJobStatus, Phase
from finetune_operator.kubectl_plugin.chart import Series, loss_chart

PHASE_STYLES = {
    Phase.SUCCEEDED: "bold green",
    Phase.FAILED: "bold red",
    Phase.CANCELED: "bold yellow",
    Phase.SUSPENDED: "yellow",
    Phase.RUNNING: "bold cyan",
}
TRAIN_STYLE = "cyan"
EVAL_STYLE = "magenta"
CHART_HEIGHT = 14
_STRIP_RETRIES = 20


def read_status(raw: Mapping[str, Any] | None) -> FineTuneJobStatus:
    """The status as this client's model reads it; fields a newer operator added are left out, not fatal."""
    data: Any = dict(raw or {})
    for _ in range(_STRIP_RETRIES):
        try:
            return FineTuneJobStatus.model_validate(data)
        except ValidationError as error:
            unknown = [e["loc"] for e in error.errors() if e["type"] == "extra_forbidden"]
            if not unknown or len(unknown) < len(error.errors()):
                raise
            for location in unknown:
                _drop(data, location)
    return FineTuneJobStatus.model_validate(data)


def _drop(data: Any, location: tuple[int | str, ...]) -> None:
    for key in location[:-1]:
        data = data[key]
    data.pop(location[-1], None)


def duration(seconds: float | None) -> str:
    """3725 -> 1h02m, 75 -> 1m15s, 9 -> 9s."""
    if seconds is None:
        return "-"
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_bar(fraction: float, width: int) -> Text:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return Text.assemble(("█" * filled, "green"), ("░" * (width - filled), "dim"))


def watch_view(finetunejob: Mapping[str, Any], width: int = 100, log_lines: int = 8) -> RenderableType:
    """The live view of one FineTuneJob: phase, progress, loss curves, the latest sample, the last log lines."""
    metadata = finetunejob.get("metadata", {})
    status = read_status(finetunejob.get("status"))
    parts: list[RenderableType] = [_phase_line(status), _progress_line(status, width)]
    history = status.loss_history
    if history is not None and (history.train or history.eval):
        total_epochs = status.progress.total_epochs if status.progress else None
        series = [
            Series("train loss", TRAIN_STYLE, [(p.epoch, p.loss) for p in history.train]),
            Series("eval loss", EVAL_STYLE, [(p.epoch, p.loss) for p in history.eval]),
        ]
        # Two panel borders and their padding on each side: 8 columns.
        chart = loss_chart(series, width - 8, CHART_HEIGHT, total_epochs)
        parts.append(Panel(chart, title="loss", title_align="left"))
    if status.validation_samples:
        sample = status.validation_samples[-1]
        text = Text.assemble(("prompt: ", "bold"), sample.prompt, "\n", ("completion: ", "bold"), sample.completion)
        parts.append(Panel(text, title=f"validation sample, epoch {sample.epoch:g}", title_align="left"))
    if status.logs:
        tail = "\n".join(status.logs.splitlines()[-log_lines:])
        parts.append(Panel(Text(tail, overflow="ellipsis", no_wrap=True), title="log", title_align="left"))
    if status.output is not None:
        parts.append(Text.assemble(("weights: ", "bold"), status.output.weights))
    if status.error is not None:
        parts.append(Text.assemble(("error: ", "bold red"), f"{status.error.reason}: {status.error.message}"))
    title = f"{metadata.get('namespace', '')}/{metadata.get('name', '')}"
    return Panel(Group(*parts), title=title, title_align="left", width=width)


def _phase_line(status: FineTuneJobStatus) -> Text:
    line = Text.assemble(("phase ", "bold"), (status.phase.value, PHASE_STYLES.get(status.phase, "bold")))
    if status.reason:
        line.append(f"  {status.reason}", style="dim")
    if status.message:
        line.append(f": {status.message}", style="dim")
    return line


def _progress_line(status: FineTuneJobStatus, width: int) -> Text:
    progress = status.progress
    if progress is None or progress.total_steps is None:
        return Text("progress: waiting for the trainer's first step", style="dim")
    step = progress.step or 0
    fraction = step / max(progress.total_steps, 1)
    line = Text.assemble(progress_bar(fraction, max(width // 4, 10)), f" step {step} of {progress.total_steps}")
    line.append(f" ({progress.percent or 0}%)")
    if progress.epoch is not None:
        epochs = f"/{progress.total_epochs}" if progress.total_epochs else ""
        line.append(f"  epoch {progress.epoch:g}{epochs}")
    if not status.phase.finished:
        line.append(f"  ETA {duration(progress.eta_seconds)}")
    if progress.tokens_per_second is not None:
        line.append(f"  {progress.tokens_per_second:,.0f} tokens/s")
    losses = [
        f"{label} {value:.4f}"
        for label, value in (("train", progress.train_loss), ("eval", progress.eval_loss))
        if value is not None
    ]
    if losses:
        line.append("\nloss " + "  ".join(losses))
    return line


def gpu_hours(status: FineTuneJobStatus) -> str:
    return "-" if status.gpu_seconds is None else f"{status.gpu_seconds / 3600:.2f}"


def age(created: str | None, now: datetime) -> str:
    if not created:
        return "-"
    started = datetime.fromisoformat(created.replace("Z", "+00:00"))
    return duration((now - started).total_seconds())


def list_table(finetunejobs: Sequence[Mapping[str, Any]], all_namespaces: bool, now: datetime | None = None) -> Table:
    """`kubectl get ftj` with GPU-hours: one row a FineTuneJob."""
    now = now or datetime.now(UTC)
    table = Table(box=None, pad_edge=False, header_style="bold")
    if all_namespaces:
        table.add_column("NAMESPACE")
    for column in ("NAME", "PHASE", "PROGRESS", "LOSS", "GPU-HOURS", "AGE"):
        table.add_column(column, justify="right" if column in ("PROGRESS", "LOSS", "GPU-HOURS") else "left")
    for finetunejob in finetunejobs:
        metadata = finetunejob.get("metadata", {})
        status = read_status(finetunejob.get("status"))
        progress = status.progress
        row = [
            metadata.get("name", ""),
            Text(status.phase.value, style=PHASE_STYLES.get(status.phase, "")),
            "-" if progress is None or progress.percent is None else f"{progress.percent}%",
            "-" if progress is None or progress.train_loss is None else f"{progress.train_loss:.4f}",
            gpu_hours(status),
            age(metadata.get("creationTimestamp"), now),
        ]
        table.add_row(*([metadata.get("namespace", "")] if all_namespaces else []), *row)
    return table
