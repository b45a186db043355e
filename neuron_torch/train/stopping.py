"""Stopping a run early and cleanly: on SIGINT/SIGTERM, or when training diverges.

Either way training stops at an update boundary, a checkpoint of that state is written, the tracked values
are flushed, and the run ends KILLED (a signal) or FAILED (divergence). The module finds the reason inside a
training step (:class:`Stop`); :class:`StopTraining`, a Lightning callback, writes the checkpoint after the
step's values were handed to tracking and raises :class:`Interrupted` or :class:`Diverged`.
"""

from __future__ import annotations

import math
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning as L

# a loss this many times its start (floored at ln 2, the loss of predicting 1/2 everywhere) is diverging
GROWTH = 1e3
LOSS_FLOOR = math.log(2.0)


class Interrupted(SystemExit):
    """Training was stopped by a signal; the exit code is ``128 + signum`` (130 for SIGINT, 143 for SIGTERM).

    A ``SystemExit``, so the MLflow run ends KILLED; ``checkpoint`` names the checkpoint written, if any.
    """

    def __init__(self, signum: int, checkpoint: Optional[str] = None, step: Optional[int] = None):
        super().__init__(128 + signum)
        self.signum, self.checkpoint, self.step = signum, checkpoint, step

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class Failed(RuntimeError):
    """Training stopped on an error the user can act on (a shard gone or corrupt mid-run, divergence); the run
    ends FAILED with the message, and the checkpoint holds the last completed update."""


class Diverged(Failed):
    """Training diverged (a non-finite value, or the loss growing past :data:`GROWTH` times its start under
    ``model.divergence: stop``); the checkpoint holds the last finite state."""


@dataclass
class Stop:
    """Why a training step stopped early: ``kind`` is ``"interrupted"``, ``"diverged"`` or ``"failed"`` (the
    data could not be read)."""

    kind: str
    message: str = ""
    signum: int = signal.SIGINT


class StopSignals:
    """SIGINT and SIGTERM handlers for the duration of a run (a context manager; the previous handlers come
    back on leaving).

    While training runs (:attr:`armed`) the first signal only sets :attr:`signum`; the module stops after
    the update in progress. A second signal, or one outside training, raises :class:`Interrupted` at once.
    Once the run is ending (:attr:`unwinding`), further signals are only acknowledged: they would cut short
    the writes that end the run KILLED.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: str = "stopping after the update in progress"):
        self.announce = announce
        self.signum: Optional[int] = None
        self.armed = False
        self.unwinding = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        try:
            self._previous = {s: signal.getsignal(s) for s in self.SIGNALS}
            self.install()
        except ValueError:  # not the main thread: signals go to the main thread's handlers
            self._previous = {}
        return self

    def install(self) -> None:
        """(Re)install the handlers: Lightning puts its own SIGTERM handler in place when fit starts."""
        if self._previous:
            for s in self.SIGNALS:
                signal.signal(s, self._handle)

    def __exit__(self, *exc) -> bool:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False

    def _handle(self, signum: int, frame) -> None:
        if self.unwinding:
            print(f"\n{signal.Signals(signum).name}: already stopping; ending the run", file=sys.stderr, flush=True)
            return
        if self.signum is not None or not self.armed:
            self.unwinding = True
            raise Interrupted(signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: {self.announce} (send it again to stop at once)",
              file=sys.stderr, flush=True)


class StopTraining(L.Callback):
    """Arms :class:`StopSignals` while training runs; when the module reports a :class:`Stop`, writes the
    checkpoint of the state it kept and raises :class:`Interrupted` or :class:`Diverged`.

    Append it after the tracking callback, so the step's tracked rows are buffered before it raises.

    Parameters
    ----------
    signals : StopSignals
    folder : Path
        Where the checkpoint goes (the run's checkpoint folder).
    """

    def __init__(self, signals: StopSignals, folder: Path):
        self.signals, self.folder = signals, Path(folder)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signals.install()  # over Lightning's SIGTERM handler, which would end the run without a checkpoint
        self.signals.armed = True
        pl_module.stop_signals = self.signals

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signals.armed = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.signals.armed = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self._stop(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":  # a streamed split that could not be read while validating
            self._stop(trainer, pl_module)

    def _stop(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stop: Optional[Stop] = getattr(pl_module, "stop", None)
        if stop is None:
            return
        self.signals.armed = False
        self.signals.unwinding = True  # the run is ending: a signal now must not cut its last writes short
        step = trainer.global_step
        path = self.folder / f"{stop.kind}-step={step}.ckpt"
        trainer.save_checkpoint(path)  # every rank calls it (a barrier under DDP); rank 0 writes
        if stop.kind == "interrupted":
            raise Interrupted(stop.signum, str(path), step)
        kept = f"the state before it ({step} update{'s' * (step != 1)}) is in {path}"
        raise (Diverged if stop.kind == "diverged" else Failed)(f"{stop.message}; {kept}")
