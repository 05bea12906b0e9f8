"""Graceful stop on SIGINT (Ctrl-C) and SIGTERM (schedulers, a closing terminal).

The first signal only sets a flag: the trainer finishes the optimizer step it is in, saves a
resumable checkpoint and the adapter as it stands, and ends with :class:`TrainingStopped`. A
second signal restores the default action and re-sends itself, so the process dies at once;
checkpoints are written under a temporary name and renamed, so the last complete one is intact.

Under accelerate with several processes a signal may reach only some of them (``kill`` of one
PID), so the flag is all-reduced every step: if any process was asked to stop, all stop after
the same step and write the same checkpoint. Hand-written rather than accelerate's: accelerate
has no stop-at-step-boundary handler (``Accelerator.set_trigger`` is the closest, but it is
unset by the check and cannot carry the signal's name).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

import torch

from finetune.errors import TrainingStopped
from finetune.export import RUN_INFO

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """Context manager: ``install()`` arms the handlers; leaving the context restores the old ones.

    ``signum`` is the first signal received (None if none).
    """

    def __init__(self, note: Callable[[str], None] | None = None):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._note = note or (lambda msg: print(msg, file=sys.stderr, flush=True))

    def install(self) -> "GracefulStop":
        """Arm the handlers (main thread only: Python delivers signals there; elsewhere a no-op)."""
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __enter__(self) -> "GracefulStop":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            self._note(f"\n{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint "
                       f"and the adapter (send it again to abort at once; the last complete checkpoint is kept)")
            return
        # Second signal: die as the signal's default action would, now.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def requested(self, accelerator) -> bool:
        """True on every process if any process received a signal. Call it on all processes at
        the same point of every step: with several it is a collective (an all-reduce)."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        flag = torch.tensor(0 if self.signum is None else self.signum, device=accelerator.device)
        return any_rank_flagged(accelerator.reduce(flag, reduction="sum"))

    def stopped(self, accelerator, step: int, total: int, checkpoint: Path, adapters: list[Path]) -> TrainingStopped:
        """The error that ends a run stopped after ``step`` of ``total``: what was saved and the
        command that resumes it. The main process also records ``step`` as the adapter's steps in
        the run description (written for a finished run)."""
        if accelerator.is_main_process:
            record_steps(adapters[0].parent / RUN_INFO, step)
        name = signal.Signals(self.signum).name if self.signum else "a signal on another process"
        code = 128 + (self.signum or signal.SIGTERM)
        return TrainingStopped(
            f"{name} after step {step} of {total}; saved checkpoint {checkpoint} and adapter "
            f"{' and '.join(str(a) for a in adapters)}. "
            f"Resume with:\n  {resume_command()}", exit_code=code)


def record_steps(info_path: Path, step: int) -> None:
    """Set ``steps`` in the run description ``info_path`` (video_lora.json) to ``step``."""
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        info["steps"] = step
        tmp = info_path.with_name(f".{info_path.name}.tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, info_path)


def any_rank_flagged(summed: torch.Tensor) -> bool:
    """``summed``: the all-reduced (sum) stop flags of all processes, each 0 or a signal number."""
    return bool(summed.item() > 0)


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that started this process with ``--resume latest`` in place of any
    ``--resume``; under a multi-process launch, prefixed with ``accelerate launch``."""
    argv = list(sys.argv if argv is None else argv)
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = True
            continue
        if a.startswith("--resume="):
            continue
        out.append(a)
    launcher = ["accelerate", "launch"] if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ["python"]
    return " ".join(shlex.quote(a) for a in [*launcher, *out, "--resume", "latest"])
