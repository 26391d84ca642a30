"""Running an export (`tvunet_jax.export`): network inputs in, lesion probabilities out.

This module owns loading an export folder for inference without building the Flax model: ONNX
through onnxruntime's CPU provider, or the serialized StableHLO through `jax.export.deserialize`.
On load it checks the folder before anything runs: the contract (`contract.check`), each
model file's size and sha256 against `model_contract.json` (a truncated or corrupt file), that the
file parses, and that the graph's input is (N, h, w, 1) with (h, w) the contract's image_size.
Every problem is one ValueError line naming the file.

`ExportedPredictor` has `predict.SlicePredictor`'s call: (N, h, w) float32 network inputs (already
preprocessed) -> (N, h, w) float32 probabilities, in batches: the graph's own batch for a
fixed-batch export (the last chunk zero-padded, the padding dropped), else `batch_size`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import tqdm

from tvunet_jax import contract as contract_lib

ONNX_FILE = "model.onnx"
STABLEHLO_FILE = "model.stablehlo"
CONTRACT_FILE = "model_contract.json"
CARD_FILE = "model_card.json"
FORMATS = ("onnx", "stablehlo")
FORMAT_FILES = {"onnx": ONNX_FILE, "stablehlo": STABLEHLO_FILE}
INSTALL_HINT = "pip install -e '.[export]'"
RUNTIMES = ("auto", "onnx", "stablehlo")
# jax.default_backend() names -> the platform names jax.export records.
_PLATFORM_ALIASES = {"gpu": ("cuda", "rocm")}


class ExportedPredictor:
  """Lesion probabilities of network-ready slices from an exported graph (see the module doc)."""

  def __init__(
    self,
    contract: dict,
    runtime: str,
    run: Callable[[np.ndarray], np.ndarray],
    *,
    graph_batch: int | None,
    batch_size: int,
  ):
    self.contract = contract
    self.runtime = runtime  # "onnx" or "stablehlo"
    self.graph_batch = graph_batch  # the graph's fixed N, or None (symbolic batch)
    self.batch_size = graph_batch or max(1, int(batch_size))
    self._run = run  # (B, h, w, 1) float32 -> (B, h, w) float32

  def __call__(
    self, images: np.ndarray, *, progress: bool = False, desc: str = "slices"
  ) -> np.ndarray:
    """(N, h, w) float32 network inputs -> (N, h, w) float32 probabilities in [0, 1]."""
    images = np.asarray(images, np.float32)
    size = tuple(self.contract["image_size"])
    if images.ndim != 3 or tuple(images.shape[1:]) != size:
      raise ValueError(
        f"exported model takes (N, {size[0]}, {size[1]}) network inputs, got {images.shape}"
      )
    out = np.empty(images.shape, np.float32)
    b = self.batch_size
    for start in tqdm.trange(
      0,
      images.shape[0],
      b,
      disable=not progress,
      desc=desc,
      unit="batch",
      leave=False,
      dynamic_ncols=True,
    ):
      chunk = images[start : start + b]
      rows = len(chunk)
      if self.graph_batch is not None and rows < self.graph_batch:
        chunk = np.concatenate([chunk, np.zeros((self.graph_batch - rows, *size), np.float32)])
      out[start : start + rows] = np.asarray(self._run(chunk[..., None]), np.float32)[:rows]
    return out


def _read_contract(model_dir: str) -> dict:
  path = os.path.join(model_dir, CONTRACT_FILE)
  try:
    with open(path) as f:
      contract = json.load(f)
  except FileNotFoundError:
    raise ValueError(
      f"{path}: missing; not an export folder (python -m tvunet_jax.export)"
    ) from None
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0]})") from None
  contract_lib.check(contract, path)
  for key in ("input_name", "output_name"):
    if not isinstance(contract.get(key), str):
      raise ValueError(f"{path}: lacks {key!r}; not written by python -m tvunet_jax.export")
  return contract


def _read_model_file(model_dir: str, name: str, contract: dict) -> bytes:
  """The file's bytes, checked against the size and sha256 the export recorded (if any)."""
  path = os.path.join(model_dir, name)
  with open(path, "rb") as f:
    data = f.read()
  entry = contract.get("files", {}).get(name)
  if entry:
    if len(data) != entry.get("bytes"):
      raise ValueError(
        f"{path}: {len(data)} bytes, the export wrote {entry.get('bytes')} (truncated or replaced)"
      )
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
      raise ValueError(f"{path}: sha256 differs from {CONTRACT_FILE}'s (corrupt)")
  return data


def _check_input_shape(path: str, shape: tuple[Any, ...], contract: dict) -> int | None:
  """The graph's fixed batch (None: symbolic), after checking (N, h, w, 1) against the contract."""
  size = [int(s) for s in contract["image_size"]]
  static = [d if isinstance(d, int) else None for d in shape]
  if len(shape) != 4 or static[1:3] != size or static[3] != 1:
    raise ValueError(
      f"{path}: graph input shape {tuple(shape)} does not match "
      f"{CONTRACT_FILE} image_size {size} (expected (N, {size[0]}, "
      f"{size[1]}, 1))"
    )
  return static[0]


def _onnx_run(model_dir: str, contract: dict) -> tuple[Callable, int | None]:
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top  (the [export] extra)

  path = os.path.join(model_dir, ONNX_FILE)
  data = _read_model_file(model_dir, ONNX_FILE, contract)
  try:
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
  except Exception as e:  # onnxruntime's errors (InvalidProtobuf, ...) derive from Exception
    raise ValueError(
      f"{path}: onnxruntime cannot load it ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    ) from None
  inputs, outputs = session.get_inputs(), session.get_outputs()
  names_in, names_out = [i.name for i in inputs], [o.name for o in outputs]
  if names_in != [contract["input_name"]] or contract["output_name"] not in names_out:
    raise ValueError(
      f"{path}: graph inputs {names_in} / outputs {names_out} do not match "
      f"{CONTRACT_FILE} ({contract['input_name']!r} -> "
      f"{contract['output_name']!r})"
    )
  batch = _check_input_shape(path, tuple(inputs[0].shape), contract)
  in_name, out_name = contract["input_name"], contract["output_name"]
  return (lambda x: session.run([out_name], {in_name: x})[0]), batch


def _stablehlo_run(model_dir: str, contract: dict) -> tuple[Callable, int | None]:
  path = os.path.join(model_dir, STABLEHLO_FILE)
  data = _read_model_file(model_dir, STABLEHLO_FILE, contract)
  try:
    exported = jax.export.deserialize(bytearray(data))
    shape = tuple(exported.in_avals[0].shape) if len(exported.in_avals) == 1 else ()
  except Exception as e:  # flatbuffer parsing raises struct.error, IndexError, ...
    raise ValueError(
      f"{path}: not a serialized jax.export module ({type(e).__name__}: "
      f"{str(e).splitlines()[0][:200] if str(e) else ''})"
    ) from None
  batch = _check_input_shape(path, shape, contract)
  backend = jax.default_backend()
  if not set(_PLATFORM_ALIASES.get(backend, (backend,))) & set(exported.platforms):
    raise ValueError(f"{path}: exported for {list(exported.platforms)}, this JAX runs on {backend}")
  # jit caches one compilation per input shape (a symbolic batch compiles per chunk size).
  return jax.jit(exported.call), batch


def load_exported(
  model_dir: str, *, runtime: str = "auto", batch_size: int = 32
) -> ExportedPredictor:
  """An export folder ready for inference; a one-line ValueError naming the file otherwise.

  Args:
    model_dir: a folder written by `python -m tvunet_jax.export`.
    runtime: "onnx" (onnxruntime, CPU provider), "stablehlo" (`jax.export.deserialize`), or
      "auto": ONNX when onnxruntime is importable and model.onnx exists, else StableHLO.
    batch_size: rows per call for a symbolic-batch export (a fixed-batch export runs its own N).

  Raises:
    ValueError: a missing or bad file, a contract that does not match the graph, an unknown
      runtime, or onnxruntime missing for runtime="onnx" (with the install hint).
  """
  if runtime not in RUNTIMES:
    raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
  contract = _read_contract(model_dir)
  has = {f: os.path.isfile(os.path.join(model_dir, FORMAT_FILES[f])) for f in FORMATS}
  try:
    import onnxruntime  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

    have_ort = True
  except ImportError:
    have_ort = False
  if runtime == "auto":
    runtime = "onnx" if have_ort and has["onnx"] else "stablehlo"
  if runtime == "onnx" and not have_ort:
    raise ValueError(f"runtime 'onnx' needs onnxruntime: {INSTALL_HINT}")
  if not has[runtime]:
    missing = os.path.join(model_dir, FORMAT_FILES[runtime])
    hint = "" if have_ort or not has["onnx"] else f" (model.onnx needs {INSTALL_HINT})"
    raise ValueError(f"{missing}: missing{hint}")
  run, batch = (_onnx_run if runtime == "onnx" else _stablehlo_run)(model_dir, contract)
  return ExportedPredictor(contract, runtime, run, graph_batch=batch, batch_size=batch_size)
