"""A graceful stop: SIGINT/SIGTERM asks the trainer for a checkpoint at the next step boundary, then an exit."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

from gpt2repro.devices import Dist, any_rank


class StopSignal:
    """The first SIGINT/SIGTERM asks for a checkpoint at the next step boundary; a second one stops at once,
    except inside a checkpoint write, which is finished first."""

    def __init__(self) -> None:
        self.requested = self.saving = self.urgent = False
        self.previous = {}
        for sig in (signal.SIGINT, getattr(signal, "SIGTERM", signal.SIGINT)):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self.previous[sig] = signal.signal(sig, self.handle)

    def handle(self, signum, frame) -> None:
        if self.requested:
            self.urgent = True
            if not self.saving:
                raise KeyboardInterrupt
            return
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: checkpointing at the next step boundary, then exiting", flush=True)

    @contextlib.contextmanager
    def saving_checkpoint(self) -> Iterator[None]:
        """A second signal during a checkpoint write waits for the write to finish."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False
        if self.urgent:
            raise KeyboardInterrupt

    def agreed(self, dist: Dist) -> bool:
        """True on every rank when any rank was asked to stop."""
        return any_rank(self.requested, dist)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
