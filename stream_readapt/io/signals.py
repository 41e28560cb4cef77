"""SIGTERM, SIGHUP and SIGINT as one exception, so a stopped run cleans up like Ctrl-C.

docker stop, timeout and Slurm send SIGTERM, a dropped SSH session SIGHUP; by default both
kill Python without unwinding, leaving a multi-GB partial folder and no message. Here they
raise `Terminated` (a KeyboardInterrupt) in the main thread, so every `with` block unwinds:
writers abort, the partial folder is removed (or kept for `--resume` when it holds finished
shards). Once one has arrived, further ones are ignored so the clean-up itself finishes.
"""

from __future__ import annotations

import contextlib
import signal
import threading

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """The run was stopped by a signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process killed by the signal


def _raise(signum, frame) -> None:
    for sig in HANDLED:
        signal.signal(sig, signal.SIG_IGN)  # let the unwinding finish
    raise Terminated(signum)


@contextlib.contextmanager
def installed():
    """Route the stop signals to `Terminated` while inside; the previous handlers after (so a
    caller such as a test runner gets its own back). Only the main thread may set them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise) for sig in HANDLED}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def describe(exc: BaseException) -> tuple[str, int]:
    """(what stopped the run, exit status) for an interrupt."""
    if isinstance(exc, Terminated):
        return f"stopped by {signal.Signals(exc.signum).name}", exc.exit_code
    return "interrupted", 130
