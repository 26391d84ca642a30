"""The machine record: CPU model and ISA, what oneDNN dispatched, OpenMP runtimes, threads, load.

Everything here is standard library only, so the parent process (which must not start JAX's or
PyTorch's thread pools) and every child can use it. The parsers take the text of
/proc/cpuinfo, /proc/self/maps, /proc/stat and oneDNN's verbose output, so tests feed them
fixed text:

  * `cpu_info(text)`: model name and the ISA flags that decide the kernels (avx2, avx512f,
    avx512_bf16, amx_*); `native_bf16(isa)`: whether the CPU has bf16 arithmetic at all;
  * `openmp_runtimes(maps)`: the OpenMP libraries a process has mapped (PyTorch bundles its own
    libgomp; the oneDNN wheel under the JAX kernels uses the system one);
  * `parse_onednn_verbose(text)`: oneDNN's version, the ISA it detected, its threading runtime and
    the kernel it picked for each primitive it ran (`ONEDNN_VERBOSE=1` in a probe child);
  * `usable_cpus()`: the CPUs this process may run on (the affinity mask, not `os.cpu_count()`);
  * `ForeignLoad`: the share of the machine other processes used while a block ran.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import resource
import subprocess
import time
from typing import Any

ISA_FLAGS = (
  "avx2",
  "fma",
  "avx512f",
  "avx512bw",
  "avx512vl",
  "avx512_vnni",
  "avx512_bf16",
  "amx_tile",
  "amx_bf16",
  "amx_int8",
)
VERSIONED = ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "onnxruntime", "jax2onnx")
# Shared objects that implement OpenMP: GNU (libgomp), Intel (libiomp5) and LLVM (libomp).
_OPENMP = re.compile(r"/lib(gomp|iomp5|iomp|omp)(-[0-9a-f]+)?\.so[.\d]*$")


def read_text(path: str) -> str:
  """The file's text, or "" where it cannot be read (not Linux, no permission)."""
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return ""


def usable_cpus() -> int:
  """CPUs in this process's affinity mask (a container or `taskset` may allow fewer than exist)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def cpu_info(cpuinfo_text: str) -> dict[str, Any]:
  """CPU model and ISA flags from /proc/cpuinfo text (the first processor's entries).

  Returns:
    {"cpu_model": str ("unknown" if absent), "isa_flags": {flag: bool for ISA_FLAGS}}.
  """
  model, flags = "", None
  for line in cpuinfo_text.splitlines():
    key, _, value = line.partition(":")
    key = key.strip()
    if key == "model name" and not model:
      model = value.strip()
    elif key == "flags" and flags is None:
      flags = set(value.split())
  flags = flags or set()
  return {
    "cpu_model": model or platform.processor() or "unknown",
    "isa_flags": {f: f in flags for f in ISA_FLAGS},
  }


def native_bf16(isa_flags: dict[str, bool]) -> bool:
  """Whether the CPU has bf16 arithmetic (AVX-512 BF16 dot products or AMX bf16 tiles)."""
  return bool(isa_flags.get("avx512_bf16") or isa_flags.get("amx_bf16"))


def openmp_runtimes(maps_text: str) -> list[str]:
  """Paths of the OpenMP runtime libraries mapped in a process, from its /proc/<pid>/maps text.

  Two paths (say PyTorch's bundled libgomp and the system one) mean two thread pools that spin
  on the same cores; that is why the benchmark never runs two frameworks in one process.
  """
  paths = set()
  for line in maps_text.splitlines():
    fields = line.split()
    if len(fields) >= 6 and _OPENMP.search(fields[-1]):
      paths.add(fields[-1])
  return sorted(paths)


def parse_onednn_verbose(text: str) -> dict[str, Any]:
  """oneDNN's verbose lines (`ONEDNN_VERBOSE=1`, also the older `dnnl_verbose` prefix) -> record.

  Reads both layouts: oneDNN 3.2's `onednn_verbose,exec,cpu,convolution,<impl>,...` and the
  later `onednn_verbose,v1,primitive,exec,cpu,convolution,<impl>,...`.

  Returns:
    {"version": "3.2.0" or None, "isa": "Intel AVX2" or None, "runtime": "OpenMP, nthr:2" or
    None, "kernels": [{"primitive", "impl", "src_dtype"}, ...] distinct, in order of first use}.
  """
  out: dict[str, Any] = {"version": None, "isa": None, "runtime": None, "kernels": []}
  seen = set()
  for line in text.splitlines():
    fields = line.strip().split(",")
    if fields[0] not in ("onednn_verbose", "dnnl_verbose"):
      continue
    fields = [f for f in fields[1:] if not re.fullmatch(r"v\d+", f)]
    if fields and fields[0] in ("primitive", "graph", "common"):
      fields = fields[1:]
    if len(fields) >= 2 and fields[0] == "info":
      rest = ",".join(fields[1:])
      m = re.match(r"oneDNN v([\w.]+)", rest)
      if m:
        out["version"] = m.group(1)
      elif rest.startswith("cpu,isa:"):
        out["isa"] = rest[len("cpu,isa:") :].strip()
      elif rest.startswith("cpu,runtime:"):
        out["runtime"] = rest[len("cpu,runtime:") :].replace(",", ", ").strip()
    elif len(fields) >= 6 and fields[0] == "exec" and fields[1] == "cpu":
      primitive, impl, descs = fields[2], fields[3], fields[5]
      m = re.search(r"src[_:](\w+?)[:_]", descs + ":")
      kernel = (primitive, impl, m.group(1) if m else None)
      if primitive != "reorder" and kernel not in seen:
        seen.add(kernel)
        out["kernels"].append(dict(zip(("primitive", "impl", "src_dtype"), kernel)))
  return out


def busy_cpu_seconds(proc_stat_text: str, ticks_per_s: float) -> float:
  """CPU-seconds all CPUs spent busy since boot, from /proc/stat's first ('cpu ') line.

  Busy = user + nice + system + irq + softirq + steal (time a hypervisor gave to other guests
  counts: it is contention too); idle and iowait are not.
  """
  fields = proc_stat_text.splitlines()[0].split()
  if fields[0] != "cpu":
    raise ValueError(f"/proc/stat: first line is not the 'cpu' total: {fields[:3]}")
  user, nice, system, _, _, irq, softirq, steal = (int(v) for v in fields[1:9])
  return (user + nice + system + irq + softirq + steal) / ticks_per_s


class ForeignLoad:
  """Share of the machine's CPU time used by *other* processes while a block runs (Linux).

  Compares the machine's busy time with this process's own CPU time over the block:
  (busy - own) / (wall x all CPUs of the machine, since /proc/stat counts them all). 0 means the
  measurement had the machine to itself; `share` is None where /proc/stat is unreadable.
  """

  def __enter__(self) -> ForeignLoad:
    self.share = None
    self._start = self._read()
    return self

  def __exit__(self, *exc) -> None:
    end = self._read()
    if self._start and end:
      busy, own, wall = (e - s for e, s in zip(end, self._start))
      # Both CPU times count whole clock ticks, so over a short block the difference can leave
      # [0, 1] by a tick or two: clipped.
      share = (busy - own) / (wall * (os.cpu_count() or 1)) if wall > 0 else None
      self.share = None if share is None else min(1.0, max(0.0, share))

  @staticmethod
  def _read() -> tuple[float, float, float] | None:
    try:
      busy = busy_cpu_seconds(read_text("/proc/stat"), os.sysconf("SC_CLK_TCK"))
    except (IndexError, ValueError, OSError):
      return None
    t = os.times()
    return busy, t.user + t.system, time.monotonic()


def peak_rss_mb() -> float:
  """Peak resident memory of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def process_record() -> dict[str, Any]:
  """What every child records about itself after its measurement: OpenMP runtimes it mapped,
  usable CPUs, peak memory, load average."""
  return {
    "openmp_runtimes": openmp_runtimes(read_text("/proc/self/maps")),
    "usable_cpus": usable_cpus(),
    "peak_rss_mb": peak_rss_mb(),
    "load_avg": list(os.getloadavg()),
  }


def _git(repo: str, *args: str) -> str:
  try:
    return subprocess.run(
      ["git", *args], cwd=repo, capture_output=True, text=True, timeout=30, check=True
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ""


def environment(repo: str) -> dict[str, Any]:
  """Commit, versions, CPU, usable CPUs and load of this machine; imports no framework."""
  versions = {}
  for pkg in VERSIONED:
    try:
      versions[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      versions[pkg] = None
  cpu = cpu_info(read_text("/proc/cpuinfo"))
  return {
    "commit": _git(repo, "rev-parse", "HEAD") or "unknown",
    # Tracked files with uncommitted changes: the numbers may not belong to `commit` alone.
    "dirty": bool(_git(repo, "status", "--porcelain", "--untracked-files=no")),
    "python": platform.python_version(),
    "platform": platform.platform(),
    "versions": versions,
    **cpu,
    "native_bf16": native_bf16(cpu["isa_flags"]),
    "usable_cpus": usable_cpus(),
    "cpu_count": os.cpu_count(),
    "load_avg_start": list(os.getloadavg()),
  }
