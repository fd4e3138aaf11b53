"""Command-line plumbing shared by ``deq-train`` and ``deq-compare``.

* One override syntax for both commands, ``--config.<field>=<value>`` (or ``--config.<field>
  <value>``), parsed by ``ml_collections.config_flags`` (types follow the config's defaults).
* Config and data errors are short: ``<prog>: error: <one paragraph>``, exit status 2 for a
  bad command line or config, 1 for a failed run; no traceback (set ``DEQ_TRACEBACK=1`` to
  get one). An unknown field names the closest existing one.
* ``--help`` lists the flags, the override syntax and every config field with its default.
* Console: our own progress lines (one per epoch, "resumed from step N", warnings) on stdout;
  third-party chatter a user cannot act on (orbax INFO, TFDS's "no dataset_info.json", TFDS
  progress bars) is silenced.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import sys
import warnings
from pathlib import Path

from experiments.errors import (
    REPORTED,
    ConfigError,
    exit_status,
)

OVERRIDE_HELP = (
    "Override any config field with --config.<field>=<value> (repeatable), e.g.\n"
    "  --config.train.num_epochs=3 --config.solver.name=broyden --config.model.norm=false"
)


DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.py"


# ------------------------------------------------------------------------------------------
# The experiments extra

# What ``deq-train`` and ``deq-compare`` import as they start (``pip install 'deq[experiments]'``
# installs them; a plain ``pip install deq`` installs the commands without them).
EXTRA_MODULES = ("absl", "ml_collections", "optax", "orbax", "tensorflow_datasets")


def require_experiments_extra(prog: str) -> None:
    """Exit 1 with a one-line message if a module of the experiments extra is missing."""
    import importlib.util

    for name in EXTRA_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ValueError, AttributeError):  # sys.modules[name] is None: import blocked
            found = False
        if not found:
            print(f"{prog} needs the experiments extra: pip install 'deq[experiments]'",
                  file=sys.stderr, flush=True)
            sys.exit(1)


# ------------------------------------------------------------------------------------------
# Dotted field names: ``"solver.max_steps"``


def get_field(config, name: str):
    """The value of the dotted field ``name`` (``"solver.max_steps"``) of ``config``."""
    node = config
    for part in name.split("."):
        node = node[part]
    return node


def set_fields(config, fields: dict) -> None:
    """Set each dotted field of ``fields`` (``{"solver.max_steps": 5}``) in ``config``."""
    for name, value in fields.items():
        parent, _, leaf = name.rpartition(".")
        node = get_field(config, parent) if parent else config
        node[leaf] = value


# ------------------------------------------------------------------------------------------
# Config files and overrides


def _config_file(path: str) -> str:
    file = path if os.path.exists(path) else path.split(":", 1)[0]  # 'file.py:param' form
    if not os.path.isfile(file):
        raise ConfigError(f"config file {path} does not exist.")
    return file


@contextlib.contextmanager
def config_imports(path: str):
    """While loading the config file ``path``, its folder's parent is first on ``sys.path``,
    so that ``from configs import default`` in ``configs/x.py`` finds the sibling file (as it
    does when run from the repository root), whatever the current directory and whether or
    not a ``configs`` package is installed."""
    try:
        root = str(Path(_config_file(path)).resolve().parents[1])
    except ConfigError:
        yield  # reported by the loader
        return
    sys.path.insert(0, root)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(root)


def _base_config(path: str):
    """The config of ``path`` without overrides (via ml_collections, as ``--config`` reads it)."""
    from absl import flags
    from ml_collections import config_flags

    _config_file(path)
    fv = flags.FlagValues()
    argv = ["prog", f"--config={path}"]
    config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv)
    try:
        with config_imports(path):
            fv(argv)
    except Exception as e:  # a syntax or runtime error inside the config file
        cause = e.__cause__ or e
        raise ConfigError(f"cannot load config file {path}: {type(cause).__name__}: "
                          f"{str(cause).strip().splitlines()[0] if str(cause) else ''}") from None
    return fv.config


def config_fields(config, prefix: str = "") -> dict:
    """``{"a.b": value}`` for every leaf field of ``config``."""
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update(config_fields(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def override_fields(argv) -> list[str]:
    """The field names that ``--config.<field>...`` arguments of ``argv`` set."""
    names = []
    for arg in argv:
        m = re.match(r"^--?(no)?config\.([^=]+)", arg)
        if m:
            names.append(m.group(2))
    return names


def check_override_fields(config, names, path: str) -> None:
    """A ConfigError for the first name that is not a field of ``config``, with a suggestion."""
    fields = config_fields(config)
    for name in names:
        if name in fields:
            continue
        close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.5)
        leaf = name.rsplit(".", 1)[-1]
        close = close or [f for f in fields if f.rsplit(".", 1)[-1] == leaf][:1]
        hint = f" Did you mean --config.{close[0]}?" if close else ""
        raise ConfigError(f"--config.{name}: the config {path} has no field {name!r}.{hint} "
                          "Run with --help to list the fields.")


def load_config(path: str, overrides=()):
    """Load a config file and apply overrides given as ``"a.b=value"`` strings (a leading
    ``config.`` or ``--config.`` is accepted), exactly as ``--config.a.b=value`` on the
    command line does."""
    from absl import flags
    from ml_collections import config_flags

    args = [f"--config.{re.sub(r'^(--)?config[.]', '', o)}" for o in overrides]
    check_override_fields(_base_config(path), override_fields(args), path)
    fv = flags.FlagValues()
    argv = ["prog", f"--config={path}", *args]
    config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv)
    try:
        with config_imports(path):
            fv(argv)
    except flags.Error as e:
        raise ConfigError(str(e)) from None
    return fv.config


# ------------------------------------------------------------------------------------------
# Help


def _default_comments() -> dict[str, str]:
    """The end-of-line comments of ``configs/default.py``, by field."""
    comments = {}
    for line in DEFAULT_CONFIG.read_text().splitlines():
        m = re.match(r"\s*config\.([\w.]+)\s*=.*?#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2)
    return comments


def fields_help(path: str | None) -> str:
    """Every field of the config at ``path`` (default: configs/default.py) with its value."""
    try:
        config = _base_config(path or str(DEFAULT_CONFIG))
    except ConfigError as e:
        return f"(cannot list the config fields: {e})"
    comments = _default_comments()
    rows = [(f"{k} = {v!r}", comments.get(k, "")) for k, v in config_fields(config).items()]
    width = max(len(r[0]) for r in rows)
    src = path or "configs/default.py"
    return f"config fields (defaults from {src}):\n" + "\n".join(
        f"  {a:<{width}}  {'# ' + c if c else ''}".rstrip() for a, c in rows)


def wants_help(argv) -> bool:
    return any(a in ("-h", "--help", "-help", "--helpshort", "-?") for a in argv)


def config_path_in(argv) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


# ------------------------------------------------------------------------------------------
# Errors and console


def fail(prog: str, message: str, code: int = 2, *, hard: bool = False):
    """Print ``<prog>: error: <message>`` and exit. ``hard`` skips the interpreter's shutdown
    (after a failed run; our files are closed by then), where orbax/TensorStore threads can
    still be busy."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    if hard:
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


@contextlib.contextmanager
def short_errors(prog: str):
    """Turn the errors a user can act on into one short paragraph: exit status 2 for a bad
    config, 1 for a failed run. ``DEQ_TRACEBACK=1`` re-raises them instead."""
    try:
        yield
    except (*REPORTED, ValueError) as e:  # ValueError: others a user may still act on
        if os.environ.get("DEQ_TRACEBACK"):
            raise
        hint = ("" if isinstance(e, REPORTED)
                else " (set DEQ_TRACEBACK=1 to see where it was raised)")
        fail(prog, f"{e}{hint}", code=exit_status(e), hard=True)


class _ConsoleFormatter(logging.Formatter):
    def format(self, record):
        msg = record.getMessage()
        return f"warning: {msg}" if record.levelno >= logging.WARNING else msg


def setup_console() -> None:
    """Show our own INFO lines (epochs, resumes) and warnings; quiet third-party logs."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_ConsoleFormatter())
    ours = logging.getLogger("experiments")
    ours.handlers = [handler]
    ours.setLevel(logging.INFO)
    ours.propagate = False
    quiet_third_party_logs()
    warnings.formatwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as ``warning (Category): message``: the solver's warnings are raised from
    JAX's callback machinery, whose file and source line mean nothing to a user."""
    return f"warning ({category.__name__}): {message}\n"


def quiet_third_party_logs() -> None:
    """Orbax and TFDS log through absl (checkpoint steps at INFO, a "no dataset_info.json"
    warning before every first build): keep only their errors."""
    for name in ("absl", "orbax", "tensorflow_datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # JAX's backend probe ("Unable to initialize backend 'tpu'") and its distributed
    # service's connection lines are INFO; its warnings (e.g. a GPU without a CUDA jaxlib)
    # stay.
    for name in ("jax._src.xla_bridge", "jax._src.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with contextlib.suppress(Exception):
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()
