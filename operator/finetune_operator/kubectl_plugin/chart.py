"""Loss curves drawn in the terminal with braille dots (2 x 4 dots a character cell)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from rich.text import Text

# The dot of each (column, row) inside a braille cell: U+2800 plus these bits.
_DOT_BITS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))
_BRAILLE = 0x2800


@dataclass(frozen=True)
class Series:
    label: str
    style: str
    points: Sequence[tuple[float, float]]  # (epoch, loss)


class _Canvas:
    def __init__(self, columns: int, rows: int) -> None:
        self.columns, self.rows = columns, rows
        self.cells = [[0] * columns for _ in range(rows)]

    def dot(self, x: int, y: int) -> None:
        """Set the dot at pixel (x, y); y grows downwards."""
        if 0 <= x < self.columns * 2 and 0 <= y < self.rows * 4:
            self.cells[y // 4][x // 2] |= _DOT_BITS[x % 2][y % 4]

    def line(self, start: tuple[int, int], end: tuple[int, int]) -> None:
        (x0, y0), (x1, y1) = start, end
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(steps + 1):
            self.dot(round(x0 + (x1 - x0) * i / steps), round(y0 + (y1 - y0) * i / steps))


def loss_chart(series: Sequence[Series], width: int, height: int, x_max: float | None = None) -> Text:
    """The series on one chart `width` x `height` characters (axis labels included), x from 0 to `x_max`."""
    values = [y for one in series for _, y in one.points]
    if not values:
        return Text("no loss reported yet", style="dim")
    low, high = min(values), max(values)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    labels = [f"{high:.3g}", f"{(low + high) / 2:.3g}", f"{low:.3g}"]
    margin = max(len(label) for label in labels) + 1
    columns, rows = max(width - margin - 1, 10), max(height - 2, 3)
    right = max([x_max or 0.0, *(x for one in series for x, _ in one.points)]) or 1.0
    canvases = []
    for one in series:
        canvas = _Canvas(columns, rows)
        pixels = [
            (round(x / right * (columns * 2 - 1)), round((high - y) / (high - low) * (rows * 4 - 1)))
            for x, y in one.points
        ]
        if len(pixels) == 1:
            canvas.dot(*pixels[0])
        for start, end in itertools.pairwise(pixels):
            canvas.line(start, end)
        canvases.append((one.style, canvas))

    chart = Text()
    label_rows = {0: labels[0], rows // 2: labels[1], rows - 1: labels[2]}
    for row in range(rows):
        chart.append(label_rows.get(row, "").rjust(margin - 1) + " ┤", style="dim")
        for column in range(columns):
            # The later series is drawn over the earlier one where both have dots.
            style, bits = "", 0
            for series_style, canvas in canvases:
                cell = canvas.cells[row][column]
                if cell:
                    style, bits = series_style, bits | cell
            chart.append(chr(_BRAILLE + bits) if bits else " ", style=style)
        chart.append("\n")
    axis = "└" + "─" * columns
    chart.append(" " * margin + axis + "\n", style="dim")
    end_label = f"epoch {right:g}"
    chart.append(" " * margin + "0" + end_label.rjust(columns), style="dim")
    chart.append("\n" + " " * margin)
    for one in series:
        chart.append(f" ⣿ {one.label} ", style=one.style)
    return chart
