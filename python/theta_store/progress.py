"""Progress on stderr, only when stderr is a terminal (or forced), never in --json output."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from types import TracebackType

TYPE_CHECKING = False  # not typing's: the filter process imports this module
if TYPE_CHECKING:
    from collections.abc import Iterator


class Progress:
    """A byte counter that redraws one stderr line at most 10 times a second."""

    def __init__(self, label: str, total: int, enabled: bool | None = None) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._last = 0.0
        self._start = time.monotonic()
        self._lock = threading.Lock()  # uploads count their bytes from several threads

    def __call__(self, n: int) -> None:
        with self._lock:
            self.done += n
        now = time.monotonic()
        if self.enabled and now - self._last >= 0.1:
            self._last = now
            rate = self.done / max(now - self._start, 1e-9) / 1e6
            sys.stderr.write(f"\r{self.label}: {100 * self.done / self.total:5.1f}% ({self.done / 1e6:.0f} MB, {rate:.0f} MB/s)")
            sys.stderr.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        if self.enabled and self._last:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def on_terminal() -> bool:
    """Whether to show progress: stderr is a terminal and THETA_STORE_PROGRESS is not 0 (the CLI's
    -q / --no-progress set it, so that git commands run on their behalf are quiet too)."""
    import os

    if os.environ.get("THETA_STORE_PROGRESS") == "0":
        return False
    try:
        return sys.stderr.isatty()
    except (OSError, ValueError):  # closed
        return False


class StatusLine:
    """One stderr line, redrawn at most 10 times a second while its text changes, and cleared
    (paused) whenever someone else may write: the filter's progress.

    set() shows a new text at once if the last redraw is old enough, else a thread shows it at its
    next tick (the core sends a file without telling us how far it is, so a request may not come
    for a while). The filter pauses the line before each answer to git (git may print as soon as
    it has one), says its messages through say(), and runs fetches inside hold().
    """

    def __init__(self, interval: float = 0.1) -> None:
        import threading

        self.interval = interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._text = ""
        self._shown = ""
        self._held = False
        self._last = 0.0
        self._thread = threading.Thread(target=self._run, name="theta-store-progress", daemon=True)
        self._thread.start()

    def set(self, text: str) -> None:
        """Show this text (now, or at the next tick); ends a pause."""
        with self._lock:
            self._text = text
            self._held = False
            self._draw()

    def pause(self) -> None:
        """Clear the line; nothing is drawn until the next set()."""
        with self._lock:
            self._clear()
            self._held = True

    def _draw(self) -> None:
        """Show the text if it changed and the last redraw is old enough (call with the lock held)."""
        now = time.monotonic()
        if not self._held and self._text != self._shown and now - self._last >= self.interval:
            self._write("\r" + self._text + "\033[K")
            self._shown = self._text
            self._last = now

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                self._draw()

    def _write(self, s: str) -> None:
        try:
            sys.stderr.write(s)
            sys.stderr.flush()
        except (OSError, ValueError):  # the terminal went away: progress is not worth failing for
            pass

    def _clear(self) -> None:
        if self._shown:
            self._write("\r\033[K")
            self._shown = ""

    def say(self, message: str) -> None:
        """A line of its own (an error, a warning); the line stays paused after it."""
        with self._lock:
            self._clear()
            self._held = True
            self._write(message + "\n")

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """`with line.hold():` paused while something else (git fetch) writes; the next set() after
        it shows at once: the line was blank all that while."""
        self.pause()
        try:
            yield
        finally:
            with self._lock:
                self._last = 0.0

    def close(self) -> None:
        """Stop redrawing and clear the line."""
        self._stop.set()
        self._thread.join()
        with self._lock:
            self._clear()


def run_teeing_stderr(argv: list[str], env: dict[str, str], cwd: str, tee: bool = True) -> tuple[int, bytes]:
    """Run a command whose stderr goes on to ours as it comes (git's progress, on a terminal) when
    `tee`, and is also returned (its last 64 kB: error messages). Its stdin is closed, its stdout
    dropped: in the filter process both are git's pipes to us."""
    import os
    import subprocess

    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    kept = b""
    try:
        while block := os.read(proc.stderr.fileno(), 65536):
            kept = (kept + block)[-65536:]
            if not tee:
                continue
            try:
                sys.stderr.buffer.write(block)
                sys.stderr.buffer.flush()
            except (OSError, ValueError):
                pass
        proc.stderr.close()
        return proc.wait(), kept
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM): SIGTERM lets git remove its lock files, SIGKILL would not.
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
