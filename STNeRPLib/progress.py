"""Progress for people (a bar on stderr) or for the Slicer module (JSON lines on stdout)."""
from __future__ import annotations

import sys
import time

from .contract import EVENT_DONE, EVENT_ERROR, EVENT_PROGRESS, json_line


class Reporter:
    """Reports training and output progress, completion and errors.

    With json_events every report is one JSON object per stdout line:
    {"event": "progress", "stage", "iteration", "total", "loss", "eta"}, {"event": "done", ...},
    {"event": "error", "message"}; otherwise a progress bar and messages go to stderr.
    """

    def __init__(self, json_events: bool = False, interval: float = 0.25) -> None:
        self.json_events = json_events
        self.interval = interval
        self._stage: str | None = None
        self._stage_start = 0.0
        self._last = 0.0
        self._bar_open = False           # a terminal's bar line awaits its end

    def progress(self, stage: str, iteration: int, total: int, loss: float | None = None) -> None:
        """Report iteration `iteration` of `total` of a stage (and its loss): a progress event or the bar, with the
        stage's eta in s; at most one every `interval` seconds, the last always."""
        now = time.monotonic()
        if stage != self._stage:
            self._stage, self._stage_start, self._last = stage, now, 0.0
        if iteration < total and now - self._last < self.interval:
            return
        self._last = now
        elapsed = now - self._stage_start
        eta = elapsed / iteration * (total - iteration) if iteration else None
        if self.json_events:
            self._emit(event=EVENT_PROGRESS, stage=stage, iteration=iteration, total=total,
                       loss=loss, eta=None if eta is None else round(eta, 1))
        else:
            self._bar(stage, iteration, total, loss, eta)

    def message(self, text: str) -> None:
        """A line for the log (stderr), never mixed into the JSON events; below a bar left mid-line."""
        if self._bar_open:
            print(file=sys.stderr)
            self._bar_open = False
        print(text, file=sys.stderr, flush=True)

    def done(self, status: str, output: str) -> None:
        """Report the end of a command: a done event (status, output), or the line 'status: output' on stderr."""
        if self.json_events:
            self._emit(event=EVENT_DONE, status=status, output=output)
        else:
            self.message(f"{status}: {output}")

    def error(self, message: str) -> None:
        """Report an error (one line): an error event with json_events, and always 'error: message' on stderr."""
        if self.json_events:
            self._emit(event=EVENT_ERROR, message=message)
        print(f"error: {message}", file=sys.stderr, flush=True)

    def _emit(self, **event: object) -> None:
        print(json_line(event), flush=True)

    def _bar(self, stage: str, iteration: int, total: int, loss: float | None, eta: float | None) -> None:
        filled = int(30 * iteration / max(total, 1))
        text = f"{stage:8s} [{'#' * filled}{'.' * (30 - filled)}] {iteration}/{total}"
        if loss is not None:
            text += f" loss {loss:.3g}"
        if eta is not None:
            text += f" eta {eta:.0f}s"
        end = "\n" if iteration >= total or not sys.stderr.isatty() else ""
        print(("\r" if sys.stderr.isatty() else "") + text, end=end, file=sys.stderr, flush=True)
        self._bar_open = not end
