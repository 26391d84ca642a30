"""The console: the run's own lines, its progress bar and a short table at the end.

What libraries log or print reaches the console only at absl's `--verbosity=1` or more:

* `quiet_libraries()`: each command line calls it first thing in its main (`configure(v)` for
  those parsing their own `--verbosity`). Records below WARNING
  logged from outside this project (JAX's TPU probe, TFDS's builder and reader lines) are dropped
  from absl's handler, and Orbax's below ERROR (it warns on every read-only restore); TFDS's
  progress bars are turned off.
* `library_prints()`: holds back what a library prints to stdout inside the block (TFDS's
  "Downloading and preparing dataset Unknown size ..."), shown as it was at verbosity >= 1.
* `table(title, rows)`: the short aligned table a command ends with.
"""

from __future__ import annotations

import contextlib
import io
import logging as py_logging
import os
import sys
from collections.abc import Iterator, Sequence

from absl import logging

_OURS = tuple(
  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d) + os.sep
  for d in ("tvunet_jax", "experiments", "tfds_builder")
)
_installed: list[py_logging.Filter] = []


def verbose() -> bool:
  """Whether absl's --verbosity asks for library output (>= 1)."""
  return logging.get_verbosity() >= 1


def _keep(record: py_logging.LogRecord) -> bool:
  if verbose():
    return True
  path = os.path.abspath(record.pathname or "")
  if "orbax" in path:
    return record.levelno >= py_logging.ERROR
  return record.levelno >= py_logging.WARNING or path.startswith(_OURS)


def quiet_libraries() -> None:
  """Drops libraries' INFO (Orbax's warnings too) from the console unless verbose; idempotent."""
  if not _installed:
    f = py_logging.Filter()
    f.filter = _keep  # type: ignore[method-assign]
    logging.get_absl_handler().addFilter(f)
    _installed.append(f)
  if not verbose():
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

      tfds.disable_progress_bar()
    except ImportError:  # the inference-only install has no TFDS
      pass


def configure(verbosity: int = 0) -> None:
  """For command lines without absl's flags (argparse): absl's verbosity (0: the project's INFO
  lines, 1: the libraries' too), then `quiet_libraries`."""
  logging.set_verbosity(verbosity)
  quiet_libraries()


@contextlib.contextmanager
def library_prints(loggers: Sequence[str] = ()) -> Iterator[None]:
  """Within the block, a library's prints to stdout are held back unless verbose, and the named
  Python `loggers` (e.g. a converter's, which warns about what is harmless) log ERROR only."""
  if verbose():
    yield
    return
  named = [py_logging.getLogger(name) for name in loggers]
  levels = [lg.level for lg in named]
  for lg in named:
    lg.setLevel(py_logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    for lg, level in zip(named, levels):
      lg.setLevel(level)


def table(title: str, rows: Sequence[tuple[str, str]], footer: str = "") -> str:
  """`title`, then one '  name  value' line per row with the names aligned, then `footer`."""
  width = max((len(name) for name, _ in rows), default=0)
  lines = [title, *(f"  {name:<{width}}  {value}" for name, value in rows)]
  if footer:
    lines.append(footer)
  return "\n".join(lines)


def print_table(title: str, rows: Sequence[tuple[str, str]], footer: str = "") -> None:
  print(table(title, rows, footer), file=sys.stdout, flush=True)
