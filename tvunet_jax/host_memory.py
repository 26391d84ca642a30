"""The process's host-memory policy, opt-in: glibc's malloc keeps freed memory for reuse.

This module owns one process-wide setting. With `TVUNET_MALLOC=reuse` every entry point
(`main`, `predict`, `evaluate`, and the experiments' benchmark, profiler, reproduction and
precision studies) applies it before JAX starts its threads. Why: on CPU, XLA allocates the
buffers of every executable run afresh (the paper model's train step: ~1.1 GB of temporaries) and
frees them at its end. glibc serves blocks over its mmap threshold (32 MiB at most) with `mmap` and
returns them with `munmap`, so every run touches fresh pages: 280,000 page faults per paper
train step at batch 8, 32,000 per inference batch (measured with `getrusage`). With

  * `M_MMAP_MAX = 0`: no block is served by `mmap`; big blocks come from the heap,
  * `M_TRIM_THRESHOLD = 2**31 - 1`: freed memory at the top of the heap stays mapped,
  * `M_ARENA_MAX = 1`: every thread allocates from the main heap (XLA's worker threads do the
    allocating, and glibc's per-thread arenas fall back to `mmap` for blocks over 64 MiB),

the pages stay mapped from one run to the next and the faults are gone after the first run.
Measured (`experiments/README.md`): the paper train step 23% faster in JAX and 12% in PyTorch,
inference about 5% on each side. Why it is opt-in: the effect depends on how the heap
fragments. In a program with a single 48 MB temporary, glibc often failed to reuse the freed
block and grew the heap by 48 MB per run (still page-faulting, and the process keeps growing).
The process also keeps its peak heap mapped until it exits. So the default, 'system', leaves
malloc alone; the benchmark records which policy each measurement ran under, for JAX and
PyTorch alike. Other C libraries (musl, macOS) are always left alone.
"""

import ctypes
import os
import sys

ENV = "TVUNET_MALLOC"  # 'system' (default: leave malloc as it is) or 'reuse' (the policy)

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))

_applied: bool | None = None


def _glibc() -> ctypes.CDLL | None:
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL("libc.so.6")
    _ = libc.gnu_get_libc_version  # glibc only: musl has no such symbol
  except (OSError, AttributeError):
    return None
  return libc


def keep_freed_memory() -> bool:
  """Applies the policy of the module docstring once per process if `TVUNET_MALLOC=reuse`;
  True if it is in force.

  Call it before importing JAX. glibc applies the arena limit only to threads that first
  allocate after it is set, and `import jax` (and flax, orbax, ...) already starts threads. A
  thread that has its own arena keeps it, and XLA's threads may then be handed that arena
  round-robin, so their large buffers are mapped afresh on every run again. That is why the
  entry points call it at the top of their module when run as programs.
  """
  global _applied
  if _applied is not None:
    return _applied
  mode = os.environ.get(ENV, "system")
  if mode not in ("reuse", "system"):
    raise ValueError(f"{ENV} must be 'reuse' or 'system', got {mode!r}")
  libc = None if mode == "system" else _glibc()
  # Every setting is attempted (a list, not a short-circuiting all()), so a failure cannot leave
  # some in force while status() says 'system'; any failure reports the policy as not in force.
  results = [libc.mallopt(k, v) == 1 for k, v in _SETTINGS] if libc is not None else [False]
  _applied = all(results)
  return _applied


def status() -> str:
  """'reuse' when the policy is in force in this process, else 'system'."""
  return "reuse" if _applied else "system"
