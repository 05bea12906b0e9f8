"""What the entry scripts share: user errors become one clear message and a non-zero exit;
``-v``/``--verbose`` lets every third-party warning through (finetune/_quiet.py)."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable

from finetune import _quiet
from finetune.errors import TrainingStopped, UserError

USER_ERROR_EXIT = 2


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Call ``main``; a UserError prints ``error: <message>`` (no traceback) and exits 2.
    Any other exception propagates with its traceback: that is a bug, not bad input. A run
    stopped by a signal prints ``stopped: ...`` and exits 128 + the signal number."""
    try:
        return main(argv) or 0
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        # Ctrl-C outside the training loop (loading, caching, rendering): no traceback. The cache and
        # checkpoints are written under temporary names and renamed, so none is left half-written.
        print("stopped: interrupted (Ctrl-C)", file=sys.stderr)
        return 128 + signal.SIGINT
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT


class _Verbose(argparse.Action):
    """``-v``: sets verbose while the arguments are parsed, before any heavy import."""

    def __init__(self, option_strings, dest, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        _quiet.set_verbose(True)
        setattr(namespace, self.dest, True)


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """``-v``/``--verbose`` on an entry script's parser: show every third-party warning."""
    parser.add_argument("-v", "--verbose", action=_Verbose,
                        help="show every third-party warning (by default the known harmless ones are held back)")
