r"""Builds the CPU convolution library (`onednn_conv.cc`, `winograd.cc`) for the CPU fast path.

  pip install -e '.[onednn]'              # oneDNN 3.2 wheels: lib/ and include/ in the venv
  python -m tvunet_jax.kernels.build      # g++ -> tvunet_jax/kernels/_onednn_conv.so (~10 s)

Needs a C++17 compiler (`$CXX`, else g++ or c++) and nothing from the system package manager:
oneDNN comes from the `onednn-cpu-gomp` / `onednn-devel-cpu-gomp` wheels (found under the
interpreter's prefix, or under `$TVUNET_ONEDNN_ROOT`), and the XLA FFI headers ship inside jaxlib.
The library is written next to this file through a temporary name and a rename, so a failed or
interrupted build never leaves a broken library behind. Without it, everything still works with
XLA's own convolutions (see `tvunet_jax/kernels/conv.py`). `--optional` turns a missing compiler
or oneDNN into a message and exit status 0 (for set-up scripts).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys

from tvunet_jax import atomic

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = tuple(os.path.join(_HERE, f) for f in ("onednn_conv.cc", "winograd.cc"))
LIBRARY = os.path.join(_HERE, "_onednn_conv.so")


class MissingPrerequisite(RuntimeError):
  """oneDNN or a C++ compiler is not installed (`--optional` accepts this)."""


def onednn_root() -> str | None:
  """The prefix holding include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so.3, or None."""
  for root in (os.environ.get("TVUNET_ONEDNN_ROOT"), sys.prefix, sys.base_prefix):
    if (
      root
      and os.path.exists(os.path.join(root, "include", "oneapi", "dnnl", "dnnl.hpp"))
      and os.path.exists(os.path.join(root, "lib", "libdnnl.so.3"))
    ):
      return root
  return None


def compiler() -> str | None:
  for cxx in (os.environ.get("CXX"), "g++", "c++"):
    if cxx and shutil.which(cxx):
      return shutil.which(cxx)
  return None


def build(out: str = LIBRARY) -> str:
  """Compiles SOURCES into `out`; returns `out`. Raises RuntimeError with a one-line reason."""
  import jax  # pylint: disable=g-import-not-at-top  # only the header path is needed

  root, cxx = onednn_root(), compiler()
  if root is None:
    raise MissingPrerequisite(
      "oneDNN not found: run `pip install -e '.[onednn]'` (or set "
      "TVUNET_ONEDNN_ROOT to a prefix with include/oneapi/dnnl and lib/libdnnl.so.3)"
    )
  if cxx is None:
    raise MissingPrerequisite("no C++ compiler found (set $CXX, or install g++)")
  lib = os.path.join(root, "lib")
  stack = contextlib.ExitStack()  # the one atomic writer: the library appears whole or not at all
  try:
    tmp = stack.enter_context(atomic.replacing(out, suffix=".so"))
  except OSError as e:
    raise RuntimeError(f"{out}: cannot write there ({e.strerror}); pass --out") from None
  # -march=native: the library is built on the machine that runs it, and the Winograd
  # transforms are plain loops the compiler vectorises for the widest registers there (AVX2,
  # AVX-512). -fopenmp: they run on the same OpenMP pool (libgomp) as oneDNN.
  cmd = [
    cxx,
    "-std=c++17",
    "-O3",
    "-march=native",
    "-fopenmp",
    "-fPIC",
    "-shared",
    *SOURCES,
    "-o",
    tmp,
    "-I",
    jax.ffi.include_dir(),
    "-I",
    os.path.join(root, "include"),
    "-L",
    lib,
    "-l:libdnnl.so.3",
    f"-Wl,-rpath,{lib}",
  ]
  with stack:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise RuntimeError(f"{' '.join(SOURCES)}: compilation failed:\n{proc.stderr.strip()}")
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--out", default=LIBRARY)
  parser.add_argument(
    "--optional",
    action="store_true",
    help="exit 0 with a message when oneDNN or a compiler is missing",
  )
  args = parser.parse_args(argv)
  try:
    path = build(args.out)
  except RuntimeError as e:
    print(f"tvunet_jax.kernels.build: {e}", file=sys.stderr)
    if args.optional and isinstance(e, MissingPrerequisite):
      print("tvunet_jax.kernels.build: continuing with XLA convolutions", file=sys.stderr)
      return 0
    return 1
  print(f"tvunet_jax.kernels.build: wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
