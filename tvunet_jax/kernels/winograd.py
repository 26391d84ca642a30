"""Which 3x3 convolutions the oneDNN backend runs by Winograd F(4x4, 3x3), per layer and pass.

Winograd (`winograd.cc`) trades multiplications (36 instead of 144 per 4x4 output tile and channel
pair) for transform traffic. Whether that wins depends on the CPU's direct kernels (oneDNN's AVX2,
AVX-512 and AMX forms differ several-fold), on the layer's channels and resolution, and on the
pass (forward, input gradient, weight gradient). So the choice is a measurement of this CPU:

* `python -m tvunet_jax.tune --config CFG` times oneDNN's direct kernel and Winograd's for every
  3x3 conv of the config's model, each pass apart, and merges the medians into the table at
  `tuning_path()` (beside the kernel library, one section per `machine_key()`: CPU model, ISA
  level, usable cores, oneDNN version). `load_table()` reads this machine's section.
* `choose(...)` gives (forward, input_grad, weight_grad) flags: for a shape in the table, each
  pass runs whichever kernel measured faster; for a shape it lacks, the fallback `rule` by ISA
  level (`RULES`: thresholds from per-layer measurements, experiments/README.md). Modes: 'auto'
  (that), 'off' (never), 'all' (always); $TVUNET_WINOGRAD sets it, read by `conv.choose`.

Only float32 3x3 pad-1 convolutions qualify: bfloat16 keeps oneDNN's direct kernels, which use
bf16 arithmetic where the CPU has it (AVX-512 bf16, AMX), and the transforms' coefficients (up to 8
in A^T, 5 in B^T) would cost bf16 too many bits. This module imports no JAX.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from tvunet_jax.kernels import build as _build

ENV_MODE = "TVUNET_WINOGRAD"  # auto (default) / off / all
ENV_TABLE = "TVUNET_WINOGRAD_TABLE"  # the tuning table's path; default: beside the library
MODES = ("auto", "off", "all")
PASSES = ("forward", "input_grad", "weight_grad")
Choice = tuple[bool, bool, bool]  # Winograd for (forward, input_grad, weight_grad)
NONE: Choice = (False, False, False)
ALL: Choice = (True, True, True)
# Fallback when the table lacks a shape: ISA level -> (min work, min tiles). Winograd runs where
# Ci * Co / (Ci + Co) >= min work (GEMM work per tile over transform traffic, which grows with
# Ci + Co) and the call has >= min tiles 4x4 tiles per device (to amortise the weight transform,
# which does not shrink with the batch). None: never. Measured per-layer, experiments/README.md.
RULES: dict[str, tuple[int, int] | None] = {
  # AMD EPYC, AVX2: every paper conv at batch 8 but the first and the 128 px 64 -> 64 ones.
  "avx2": (40, 32),
  # Intel Xeon with AMX (float32 runs on its AVX-512 units), batch 8: only the 16-32 px convs
  # with >= 256 channels, where Winograd won every pass; oneDNN's AVX-512 direct kernels tie or
  # win elsewhere (Zen 4's, the issue's measurement, likewise). Also for AVX-512 without AMX.
  "avx512": (128, 64),
  "amx": (128, 64),
}
ISA_FLAGS = {  # /proc/cpuinfo flag -> ISA level, best first
  "amx_tile": "amx",
  "avx512f": "avx512",
  "avx2": "avx2",
}

_recording: list[list[tuple[tuple[int, ...], tuple[int, ...], int]]] = []


def mode_from_env() -> str:
  """$TVUNET_WINOGRAD: 'auto' (default), 'off' or 'all'."""
  mode = os.environ.get(ENV_MODE) or "auto"
  if mode not in MODES:
    raise ValueError(f"${ENV_MODE} must be one of {MODES}, got {mode!r}")
  return mode


def isa_level(flags: set[str] | None) -> str:
  """'amx', 'avx512', 'avx2' or 'other' from a CPU's /proc/cpuinfo flags (None: 'other')."""
  for flag, level in ISA_FLAGS.items():
    if flags and flag in flags:
      return level
  return "other"


def machine_key(cpu_model: str, flags: set[str] | None, cores: int, onednn: str | None) -> str:
  """The table section a measurement belongs to, e.g. 'Intel(R) Xeon(R) | amx | 2 cores |
  oneDNN 3.2.0': the same kernels on the same cores time alike."""
  return f"{cpu_model} | {isa_level(flags)} | {cores} cores | oneDNN {onednn}"


def shape_key(x_shape: Sequence[int], w_shape: Sequence[int], local_batch: int) -> str:
  """'N,H,W,Ci,Co' of the per-device call: the table's key for one convolution."""
  return ",".join(str(int(v)) for v in (local_batch, *x_shape[1:3], w_shape[2], w_shape[3]))


def tuning_path() -> str:
  """$TVUNET_WINOGRAD_TABLE, else `winograd_table.json` next to the kernel library."""
  return os.environ.get(ENV_TABLE) or os.path.join(
    os.path.dirname(_build.LIBRARY), "winograd_table.json"
  )


def read_tables(path: str) -> dict[str, dict[str, Any]]:
  """The whole file: machine key -> {shape key -> {pass -> {'direct_ms', 'winograd_ms'}}}.

  A missing file is empty; an unreadable one raises ValueError naming it (never silently
  replaced: `tvunet_jax.tune` merges into it)."""
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      tables = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: unreadable Winograd table ({type(e).__name__}: {e})") from None
  if not isinstance(tables, dict) or not all(isinstance(v, dict) for v in tables.values()):
    raise ValueError(f"{path}: not a Winograd table (machine key -> shapes)")
  return tables


def decisions(section: Mapping[str, Mapping[str, Mapping[str, float]]]) -> tuple:
  """One machine's measurements as the hashable decisions a `ConvOps` carries: sorted
  ((shape key, Choice), ...), Winograd for a pass where its median time was lower."""
  out = []
  for key, passes in section.items():
    out.append(
      (
        key,
        tuple(
          bool(p in passes and passes[p]["winograd_ms"] < passes[p]["direct_ms"]) for p in PASSES
        ),
      )
    )
  return tuple(sorted(out))


def rule(x_shape: Sequence[int], w_shape: Sequence[int], local_batch: int, isa: str) -> Choice:
  """The fallback for a shape the table lacks: `RULES[isa]` for every pass ('other': never)."""
  thresholds = RULES.get(isa)
  if thresholds is None:
    return NONE
  min_work, min_tiles = thresholds
  tiles = local_batch * -(-x_shape[1] // 4) * -(-x_shape[2] // 4)
  ci, co = w_shape[2], w_shape[3]
  return ALL if ci * co >= min_work * (ci + co) and tiles >= min_tiles else NONE


def qualifies(w_shape: Sequence[int], pads: Sequence[int], dtype_name: str) -> bool:
  """Whether Winograd can run the conv at all: a 3x3 kernel, pad 1 all round, float32."""
  return tuple(w_shape[:2]) == (3, 3) and tuple(pads) == (1, 1, 1, 1) and dtype_name == "float32"


def choose(
  x_shape: Sequence[int],
  w_shape: Sequence[int],
  dtype_name: str,
  pads: Sequence[int],
  *,
  local_batch: int | None = None,
  mode: str = "auto",
  table: tuple = (),
  isa: str = "avx2",
) -> Choice:
  """Winograd for (forward, input_grad, weight_grad) of one convolution.

  Args:
    x_shape: (N, H, W, Ci); w_shape: (KH, KW, Ci, Co); dtype_name: the activations' ('float32').
    pads: (top, bottom, left, right).
    local_batch: rows per device (default N): the table and the rule key on the per-device call.
    mode: 'auto', 'off' or 'all'.
    table: `decisions(...)` of this machine's measurements; a shape it has decides per pass.
    isa: `isa_level` of this CPU, for the fallback `rule`.
  """
  if mode not in MODES:
    raise ValueError(f"Winograd mode must be one of {MODES}, got {mode!r}")
  if mode == "off" or not qualifies(w_shape, pads, dtype_name):
    return NONE
  n = local_batch or x_shape[0]
  if _recording:
    _recording[-1].append((tuple(x_shape), tuple(w_shape), n))
  if mode == "all":
    return ALL
  key = shape_key(x_shape, w_shape, n)
  for k, choice in table:
    if k == key:
      return choice
  return rule(x_shape, w_shape, n, isa)


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[tuple[int, ...], tuple[int, ...], int]]]:
  """Collects (x_shape, w_shape, local_batch) of every qualifying conv `choose` is asked about
  while the block runs (e.g. while a model is traced): the shapes `tvunet_jax.tune` measures."""
  seen: list[tuple[tuple[int, ...], tuple[int, ...], int]] = []
  _recording.append(seen)
  try:
    yield seen
  finally:
    _recording.pop()
