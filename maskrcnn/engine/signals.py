"""Stopping a training run on a signal: SIGTERM or SIGINT asks the loop to stop after the current step (the trainer
then writes a checkpoint and exits with 128 + the signal number: 143, 130); a second one stops the process at once.
Under torchrun every process stops at the same step, and a run that needs longer than torchrun's shutdown timeout
to stop is told which flag to pass."""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from . import distributed

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # checkpoint, then exit 128 + signum (143 / 130)


class StopSignals:
    """The stop request of one run: `signum` is the first stop signal received (None: none yet)."""

    def __init__(self, *, announce: bool):
        self.signum: Optional[int] = None
        self.announce = announce  # say on stderr that the run stops (rank 0 alone)

    def _handler(self, signum, frame) -> None:
        if self.signum is not None:  # the second: the signal's default action (the atomic checkpoint writes
            signal.signal(signum, signal.SIG_DFL)  # leave no half-written file)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        if self.announce:
            os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint "
                        "(send it again to stop at once)\n".encode())  # os.write: safe inside a handler

    @contextmanager
    def installed(self) -> Iterator[None]:
        """The handlers of STOP_SIGNALS while the loop runs, the previous ones restored after it."""
        self.signum = None
        main = threading.current_thread() is threading.main_thread()  # handlers only work there
        previous = {sig: signal.signal(sig, self._handler) for sig in STOP_SIGNALS} if main else {}
        try:
            yield
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)

    def requested(self, world: int, device: torch.device) -> bool:
        """Whether to stop after this step: a signal here, or (under torchrun, `world` > 1) on any process, so
        that all stop at the same step."""
        if world == 1:
            return self.signum is not None
        flag = torch.tensor([self.signum or 0], device=device)
        signum = int(distributed.all_reduce(flag, "max").item())
        if signum and self.signum is None:
            self.signum = signum
        return bool(signum)


def shutdown_time_note(sec_per_iter: float, checkpoint_seconds: float) -> Optional[str]:
    """Under torchrun a stop on SIGTERM finishes the step and writes a checkpoint, and torchrun kills its workers
    --shutdown-timeout seconds after its own SIGTERM (30 by default). The note that says so when this run needs
    more than 80% of that (None when it does not)."""
    need = sec_per_iter + checkpoint_seconds
    limit = float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", 30))
    if need <= 0.8 * limit:
        return None
    return (f"note: a stop on SIGTERM takes about {need:.0f} s here (a step {sec_per_iter:.1f} s + a "
            f"checkpoint {checkpoint_seconds:.1f} s), and torchrun kills its workers "
            f"{limit:g} s after its SIGTERM unless told otherwise: start it with torchrun "
            f"--shutdown-timeout {int(2 * need) + 10} (ignore this if you did)")
