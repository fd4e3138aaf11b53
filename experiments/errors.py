"""The errors a run or a command line reports to its user, and the exit statuses of the
CLIs. The bottom of the experiments' import graph: it imports nothing of the project.

Exit statuses (both ``deq-train`` and ``deq-compare``): 0 done; 1 the run failed (a
non-finite step, a damaged checkpoint, dataset or workdir file, a workdir held by another
run); 2 a bad command line, config field, data folder or run folder; 130 interrupted.
"""

from __future__ import annotations

EXIT_DONE, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class ConfigError(ValueError):
    """A bad command line or config: missing config file, unknown field, bad value."""


class RunFileError(RuntimeError):
    """A file of a run's workdir (config.json, summary.json) that cannot be read."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored, or whose content is not what was saved."""


class DatasetError(RuntimeError):
    """A prepared TFDS dataset folder that cannot be read."""


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient (``train.on_nonfinite='stop'``)."""


class WorkdirInUseError(RuntimeError):
    """Another run holds the workdir."""


# Errors with a complete message of their own, shown as one line.
REPORTED = (ConfigError, FileNotFoundError, NotADirectoryError, CheckpointError, NonFiniteError,
            WorkdirInUseError, DatasetError, RunFileError)
# Errors of what the user asked for (a bad flag, config field, data folder or run folder):
# EXIT_USAGE. Any other error of a run: EXIT_FAILED.
USAGE_ERRORS = (ConfigError, FileNotFoundError, NotADirectoryError)


def exit_status(error: BaseException) -> int:
    return EXIT_USAGE if isinstance(error, USAGE_ERRORS) else EXIT_FAILED
