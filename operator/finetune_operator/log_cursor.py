"""Where a followed log stopped, so that a reconnect resumes there instead of reading the whole log again.

The operator asks for the log with `timestamps=true`: every line starts with its RFC 3339 timestamp. A reconnect
asks for `sinceTime` (whole seconds, as the API takes it) and skips the lines it has already seen: those before
the last timestamp, and as many lines at exactly the last timestamp as were read before.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime


def split_timestamp(line: str) -> tuple[str, str]:
    """(timestamp, text) of a line the API server returned with timestamps=true."""
    stamp, _, text = line.partition(" ")
    return stamp, text


def _instant(stamp: str) -> tuple[datetime, int]:
    """A timestamp as (whole second, nanoseconds): RFC 3339 with up to nine fractional digits."""
    text = stamp.rstrip("Z")
    offset = "+00:00"
    for sign in ("+", "-"):
        head, found, tail = text[10:].rpartition(sign)
        if found and ":" in tail:
            text, offset = text[:10] + head, sign + tail
            break
    whole, _, fraction = text.partition(".")
    second = datetime.fromisoformat(whole + offset).astimezone(UTC)
    nanos = int((fraction + "000000000")[:9]) if fraction else 0
    return second, nanos


@dataclass
class LogCursor:
    last: tuple[datetime, int] | None = None
    read_at_last: int = 0
    _to_skip_at_last: int = 0

    @classmethod
    def starting_at(cls, stamp: str | None) -> LogCursor:
        """A cursor that skips what is older than `stamp` (e.g. the last heartbeat a previous operator wrote)."""
        return cls() if not stamp else cls(last=_instant(stamp))

    def since_time(self) -> str | None:
        """The `sinceTime` to ask for: the last second read (inclusive), or None to read from the start."""
        if self.last is None:
            return None
        return self.last[0].strftime("%Y-%m-%dT%H:%M:%SZ")

    def rewind(self) -> None:
        """A new stream from `since_time()` begins: the lines read at the last timestamp come again."""
        self._to_skip_at_last = self.read_at_last

    def admit(self, stamp: str) -> bool:
        """Whether the line stamped `stamp` is new; if so, it counts as read."""
        try:
            instant = _instant(stamp)
        except ValueError:
            return True  # not a timestamp: pass it through rather than lose it
        if self.last is not None and instant < self.last:
            return False
        if self.last is not None and instant == self.last:
            if self._to_skip_at_last > 0:
                self._to_skip_at_last -= 1
                return False
            self.read_at_last += 1
            return True
        self.last, self.read_at_last, self._to_skip_at_last = instant, 1, 0
        return True
