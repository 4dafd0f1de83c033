"""Progress of a benchmark run on stderr: a bar with the current case, implementation and an ETA on a
terminal, and a line per finished case otherwise (a log file has no use for a redrawn bar)."""

import shutil
import sys
import time

_MIN_REDRAW_S = 0.1


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class ProgressBar:
    """Progress over items of known relative weight (cases, weighted by the bytes they move).

    The ETA assumes the remaining weight takes as long per unit as the weight done so far.
    """

    def __init__(self, weights: list[float], stream=None, width: int = 20):
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty()
        self.weights = weights
        self.total = sum(weights) or 1.0
        self.width = width
        self.started = time.monotonic()
        self.index = -1
        self.done_weight = 0.0
        self.item_label = ""
        self.item_started = self.started
        self.fraction = 0.0
        self.detail = ""
        self._drawn = False
        self._last_draw = 0.0

    def status(self, text: str) -> None:
        """A transient line before the items start (loading libraries); shown on a terminal only."""
        if self.interactive:
            self._write(text)

    def begin(self, label: str) -> None:
        self.index += 1
        self.item_label = label
        self.item_started = time.monotonic()
        self.fraction = 0.0
        self.detail = ""
        self._draw(force=True)

    def update(self, fraction: float, detail: str) -> None:
        self.fraction = min(max(fraction, 0.0), 1.0)
        self.detail = detail
        self._draw()

    def end(self) -> None:
        self.done_weight += self.weights[self.index]
        self.fraction = 0.0
        if not self.interactive:
            elapsed = time.monotonic() - self.item_started
            print(f"[{self.index + 1}/{len(self.weights)}] {self.item_label}: {elapsed:.1f} s{self._eta()}",
                  file=self.stream, flush=True)

    def message(self, text: str) -> None:
        """A line that stays (a table, a note): the bar is erased first and redrawn below it by the next
        update."""
        self.clear()
        print(text, file=self.stream, flush=True)

    def clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def _done(self) -> float:
        current = self.weights[self.index] * self.fraction if 0 <= self.index < len(self.weights) else 0.0
        return (self.done_weight + current) / self.total

    def _eta(self) -> str:
        done = self._done()
        if done < 0.02 or done >= 1.0:
            return ""
        elapsed = time.monotonic() - self.started
        return f", ETA {_clock(elapsed * (1 - done) / done)}"

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.interactive or (not force and now - self._last_draw < _MIN_REDRAW_S):
            return
        self._last_draw = now
        done = self._done()
        filled = round(self.width * done)
        bar = "#" * filled + "-" * (self.width - filled)
        text = (f"[{bar}] {100 * done:3.0f}% {self.index + 1}/{len(self.weights)} {self.item_label}"
                f"{': ' + self.detail if self.detail else ''}  {_clock(now - self.started)}{self._eta()}")
        self._write(text)

    def _write(self, text: str) -> None:
        columns = shutil.get_terminal_size((100, 20)).columns
        self.stream.write("\r\x1b[K" + text[:columns - 1])
        self.stream.flush()
        self._drawn = True
