"""Training checkpoints (checkpoint.pt in the run folder), so that an interrupted, failed or killed
run resumes where it stopped and ends bit-identical to an uninterrupted run with the same seed.

A checkpoint holds the networks, the optimiser and learning-rate schedule, the sampling generator
and torch's global random state after a whole iteration. It is written atomically (a reader sees
the old or the new file) every `every` iterations and when SIGINT/SIGTERM arrives: the signal is
held until the iteration under way has finished, so the saved state is always consistent.
"""
from __future__ import annotations

import io
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, cast

import torch
from torch import nn

from .errors import InputError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import FrameType

    from typing_extensions import Buffer

    from .optimizer import Adam
    from .schedule import DecaySchedule

STAGES = ("refnet", "defnet")
"""Training stages in order: Ref-Net (paper eq. 3), then Def-Net (eq. 6)."""


class Checkpoint:
    """checkpoint.pt of one run: the saved state (if any) and the modules it covers."""

    def __init__(self, path: Path, every: int) -> None:
        self.path = Path(path)
        self.every = every
        self.saved = _load(self.path) if self.path.exists() else None
        self.modules: dict[str, nn.Module] = {}
        self._stop = False

    def restore(self, stage: str, modules: dict[str, nn.Module], optimizer: Adam,
                schedule: DecaySchedule, generator: torch.Generator, total: int) -> int:
        """Track `modules` (name -> module); load the saved state into them, the optimiser, schedule and
        generator. A checkpoint that holds no state for one of them (another version wrote it) is refused:
        the run would go on unlike an uninterrupted one.

        Returns the last iteration done of `stage`: 0 with nothing saved for it, `total` when the
        checkpoint is of a later stage (the modules' saved states are then loaded alone)."""
        self.modules.update(modules)
        if self.saved is None:
            return 0
        saved_stage = STAGES.index(self.saved["stage"])
        if saved_stage < STAGES.index(stage):
            return 0
        missing = [name for name in modules if name not in self.saved["modules"]]
        if missing:
            raise InputError(f"checkpoint {self.path} holds no {missing[0]} state: another version of STNeRP wrote "
                             "it; train again in a new folder, or delete it to train this run from the start "
                             "with --resume")
        for name, module in modules.items():
            module.load_state_dict(self.saved["modules"][name])
        if saved_stage > STAGES.index(stage):
            return total
        optimizer.load_state_dict(self.saved["optimizer"])
        schedule.load_state_dict(self.saved["schedule"])
        generator.set_state(self.saved["generator"])
        torch.set_rng_state(self.saved["torch_rng"])
        return int(self.saved["iteration"])

    def after(self, stage: str, iteration: int, optimizer: Adam, schedule: DecaySchedule,
              generator: torch.Generator) -> None:
        """Call after each whole iteration: save every `every` iterations; on a held signal, save
        and raise KeyboardInterrupt."""
        if self._stop or iteration % self.every == 0:
            save_atomically({"stage": stage, "iteration": iteration,
                        "modules": {name: net.state_dict() for name, net in self.modules.items()},
                        "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                        "generator": generator.get_state(), "torch_rng": torch.get_rng_state()}, self.path)
        if self._stop:
            raise KeyboardInterrupt

    @contextmanager
    def holding_signals(self) -> Iterator[None]:
        """While training, SIGINT/SIGTERM only mark a stop that `after` acts on (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def hold(signum: int, frame: FrameType | None) -> None:
            self._stop = True
        previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if self._stop:                      # a signal came after the last iteration
            raise KeyboardInterrupt

    def remove(self) -> None:
        """Delete the checkpoint once the model it led to is saved."""
        self.path.unlink(missing_ok=True)


def _load(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        raise InputError(f"checkpoint {path} is damaged ({type(error).__name__}): delete it to train the "
                         "run from the start with --resume") from None


def save_atomically(state: dict, path: Path) -> None:
    """torch.save through a temporary file synced to disk, then renamed over `path`. A failed write
    (full disk) raises its OSError, naming `path`."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    try:
        with open(temporary, "wb") as handle:
            writer = _KeepsWriteError(handle)
            try:
                torch.save(state, cast("IO[bytes]", writer))
            except RuntimeError:         # torch reports a failed write as a RuntimeError
                if writer.error is None:
                    raise
                raise writer.error from None
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(path)) from None
    os.replace(temporary, path)


class _KeepsWriteError(io.RawIOBase):
    """A binary file that keeps the OSError of its first failed write."""

    def __init__(self, handle: io.BufferedWriter) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Buffer) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = self.error or error
            raise
