"""Ctrl-C and SIGTERM: one kind of stop, whatever a stage is doing when it comes.

Both raise `Interrupted` in the main thread (a KeyboardInterrupt, so `except Exception`
never swallows it) and are remembered: a library that turns the interrupt into an error
of its own (torch.export wraps it in a failure asking for a bug report) cannot make it a
failure, since `received()` still says what happened. The command line exits 130 or 143
(128 + the signal, as shells report them) with one line, and every record says
"interrupted", which the waits take as not final.
"""

from __future__ import annotations

import signal
from types import FrameType

NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

_received: list[int] = []


class Interrupted(KeyboardInterrupt):
    """A stage stopped by Ctrl-C or SIGTERM; `str()` says what was interrupted, if known."""

    def __init__(self, signum: int = signal.SIGINT, what: str = "") -> None:
        super().__init__(what)
        self.signum = signum
        self.what = what

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return NAMES.get(signal.Signals(self.signum), signal.Signals(self.signum).name)

    def saying(self, what: str) -> Interrupted:
        """The same interrupt, saying what it interrupted."""
        return Interrupted(self.signum, what)


def _raise(signum: int, _frame: FrameType | None) -> None:
    _received.append(signum)
    raise Interrupted(signum)


def catch() -> None:
    """From now on, Ctrl-C and SIGTERM raise Interrupted in the main thread; a signal this
    process was started ignoring (a shell's background job, nohup) stays ignored."""
    for signum in NAMES:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _raise)


def release() -> None:
    """Back to the signals' defaults once a stage is over: a second SIGTERM while the
    interpreter shuts down (torchrun stopping a rank) ends the process as the signal
    does, without a traceback from wherever it landed."""
    for signum in NAMES:
        if signal.getsignal(signum) is _raise:
            signal.signal(signum, signal.SIG_DFL)


def received() -> Interrupted | None:
    """The first interrupt this process received, if any."""
    return Interrupted(_received[0]) if _received else None


def as_interrupt(error: BaseException) -> Interrupted | None:
    """`error` as the interrupt that caused it: itself, a plain KeyboardInterrupt, or any
    error raised after an interrupt arrived (a library's wrapping of it); else None."""
    if isinstance(error, Interrupted):
        return error
    if isinstance(error, KeyboardInterrupt):
        return Interrupted(signal.SIGINT, str(error))
    return received()
