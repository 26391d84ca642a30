"""The one atomic writer: every file and folder the project writes appears whole or not at all.

`replacing(path)` yields a temporary path beside `path` (same folder, so the final rename is atomic
on POSIX) and renames it into place only when the block ends without an exception; on any error,
including KeyboardInterrupt, the temporary file is removed and `path` keeps what it held before.
`replacing_dir(path)` does the same for a folder (an export, a phantom). Text and JSON are thin
uses of the same mechanism. Outputs get the permissions of a normal `open()` under the umask
(mkstemp's private 0600 would hide them from other users).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

TEMP_PREFIX = ".tmp-"  # leftovers with this prefix are never read as outputs


def _umask_mode(mode: int) -> int:
  umask = os.umask(0)
  os.umask(umask)
  return mode & ~umask


@contextlib.contextmanager
def replacing(path: str | os.PathLike, *, suffix: str = "") -> Iterator[str]:
  """Yields a temporary file path; on success it is renamed to `path`, on error removed.

  Args:
    path: the final file. Its folder is created if missing.
    suffix: ending of the temporary name, for writers that infer the format from it
      (nibabel's `.nii.gz`, matplotlib's `.png`); default: the final name's own ending.
  """
  path = os.path.abspath(os.fspath(path))
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  name = os.path.basename(path)
  suffix = suffix or (".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1])
  fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=suffix, dir=folder)
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, _umask_mode(0o666))
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def replacing_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
  """Yields an empty temporary folder beside `path`; on success it becomes `path`.

  Raises:
    FileExistsError: `path` exists and `overwrite` is False (checked before anything is written).
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path}: exists (not overwritten)")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.path.basename(path)}-", dir=parent)
  try:
    yield tmp
    os.chmod(tmp, _umask_mode(0o777))
    if os.path.exists(path):
      old = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}old-", dir=parent)
      os.replace(path, os.path.join(old, "x"))
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, path)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""
  with replacing(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes `obj` as indented, key-sorted JSON atomically (non-JSON leaves as `str`)."""
  write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
