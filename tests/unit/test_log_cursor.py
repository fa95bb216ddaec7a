"""Resuming a followed log where it stopped: nothing read twice, nothing lost."""

from __future__ import annotations

from finetune_operator.log_cursor import LogCursor, split_timestamp

LOG = [
    "2026-11-28T12:00:00.100000000Z a",
    "2026-11-28T12:00:00.100000000Z b",
    "2026-11-28T12:00:00.9Z c",
    "2026-11-28T12:00:01.000000001Z d",
    "2026-11-28T12:00:01.000000001Z e",
    "2026-11-28T12:00:02Z f",
]


def read(cursor: LogCursor, lines: list[str]) -> list[str]:
    kept = []
    for line in lines:
        stamp, text = split_timestamp(line)
        if cursor.admit(stamp):
            kept.append(text)
    return kept


def served_since(since: str | None) -> list[str]:
    """What the API server returns for sinceTime (whole seconds, inclusive)."""
    return [line for line in LOG if since is None or line[:19] >= since[:19]]


def test_a_reconnect_resumes_after_the_last_line_read_even_within_one_timestamp() -> None:
    cursor = LogCursor()
    assert read(cursor, LOG[:4]) == ["a", "b", "c", "d"]
    assert cursor.since_time() == "2026-11-28T12:00:01Z"
    cursor.rewind()
    assert read(cursor, served_since(cursor.since_time())) == ["e", "f"]


def test_every_reconnect_point_reads_each_line_exactly_once() -> None:
    for stop in range(len(LOG) + 1):
        cursor = LogCursor()
        first = read(cursor, LOG[:stop])
        cursor.rewind()
        second = read(cursor, served_since(cursor.since_time()))
        assert first + second == [split_timestamp(line)[1] for line in LOG], stop


def test_a_fresh_cursor_reads_from_the_start() -> None:
    assert LogCursor().since_time() is None


def test_a_cursor_restored_from_a_heartbeat_skips_what_is_older() -> None:
    cursor = LogCursor.starting_at("2026-11-28T12:00:01Z")
    assert cursor.since_time() == "2026-11-28T12:00:01Z"
    assert read(cursor, LOG) == ["d", "e", "f"]


def test_timestamps_with_offsets_compare_as_instants() -> None:
    cursor = LogCursor.starting_at("2026-11-28T13:00:01+01:00")
    assert read(cursor, ["2026-11-28T12:00:00.5Z old", "2026-11-28T12:00:01.5Z new"]) == ["new"]
