"""What the entry scripts share: user errors become one clear message and a non-zero exit."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

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
