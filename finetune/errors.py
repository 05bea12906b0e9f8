"""Errors a user can fix. Entry scripts print these without a traceback and exit non-zero."""


class UserError(Exception):
    """A problem with the user's input (recipe, data, folders) whose message says what and how to fix it."""


class RecipeError(UserError):
    """One or more recipe fields are invalid. ``problems`` lists every one of them."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{source}: {n} problem{'s' if n != 1 else ''} in the recipe"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


class DataError(UserError):
    """The training data (manifest or clips) cannot be used as the recipe asks."""


class CheckpointError(UserError):
    """A checkpoint to resume from is missing or unreadable."""


class TrainingDiverged(UserError):
    """The loss became NaN or inf; the last good checkpoint is kept untouched."""


class RunLocked(UserError):
    """Another live run holds the lock on this ``output.dir``."""


class AdapterError(UserError):
    """An adapter file is missing, damaged, not safetensors, or holds no LoRA weights."""


class DiskSpaceError(UserError):
    """Too little free disk space for what is about to be written; raised before writing anything."""


class TrainingStopped(UserError):
    """Training was stopped by SIGINT/SIGTERM after saving a resumable checkpoint.

    ``exit_code`` is 128 + the signal number, the shell's convention for a process ended by a signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
