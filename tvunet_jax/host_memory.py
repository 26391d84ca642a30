"""The process's host-memory policy: glibc's malloc keeps freed memory for reuse.

This module owns one process-wide setting, applied by every entry point (`main`, `predict`,
`evaluate`, and the experiments' benchmark, profiler, reproduction and precision studies) before
JAX starts its threads. Why: on CPU, XLA allocates the buffers
of every executable run afresh (the paper model's train step: ~1.1 GB of temporaries) and frees
them at its end. glibc serves blocks over its mmap threshold (32 MiB at most) with `mmap` and
returns them with `munmap`, so every run touches fresh pages: 280,000 page faults per paper
train step at batch 8, 32,000 per inference batch (measured with `getrusage`). With

  * `M_MMAP_MAX = 0`: no block is served by `mmap`; big blocks come from the heap,
  * `M_TRIM_THRESHOLD = 2**31 - 1`: freed memory at the top of the heap stays mapped,
  * `M_ARENA_MAX = 1`: every thread allocates from the main heap (XLA's worker threads do the
    allocating, and glibc's per-thread arenas fall back to `mmap` for blocks over 64 MiB),

the pages stay mapped from one run to the next and the faults are gone after the first run.
The cost: the process keeps its peak heap mapped until it exits (its resident memory does not
shrink between steps), which is what a training or inference process wants anyway. PyTorch
in the same process benefits alike, so the benchmark measures both sides under the same policy
and records it (`experiments/README.md` has the measured effect).

`TVUNET_MALLOC=system` turns the policy off. Other C libraries (musl, macOS) are left alone.
"""

import ctypes
import os
import sys

ENV = 'TVUNET_MALLOC'  # 'reuse' (default) or 'system' (leave malloc as it is)

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))

_applied: bool | None = None


def _glibc() -> ctypes.CDLL | None:
  if not sys.platform.startswith('linux'):
    return None
  try:
    libc = ctypes.CDLL('libc.so.6')
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  # glibc only
  except (OSError, AttributeError):
    return None
  return libc


def keep_freed_memory() -> bool:
  """Applies the policy of the module docstring once per process; True if it is in force.

  Call it before the first JAX computation: glibc reads the arena limit when a thread first
  needs an arena, so threads that allocated before the call keep their own.
  """
  global _applied
  if _applied is not None:
    return _applied
  mode = os.environ.get(ENV, 'reuse')
  if mode not in ('reuse', 'system'):
    raise ValueError(f"{ENV} must be 'reuse' or 'system', got {mode!r}")
  libc = None if mode == 'system' else _glibc()
  # Every setting is attempted (a list, not a short-circuiting all()), so a failure cannot leave
  # some in force while status() says 'system'; any failure reports the policy as not in force.
  results = [libc.mallopt(k, v) == 1 for k, v in _SETTINGS] if libc is not None else [False]
  _applied = all(results)
  return _applied


def status() -> str:
  """'reuse' when the policy is in force in this process, else 'system'."""
  return 'reuse' if _applied else 'system'
