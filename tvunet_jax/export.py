r"""Deploying a trained model: a checkpoint in, an ONNX graph and serialized StableHLO out.

This module owns the export of the network in inference mode (BatchNorm running statistics, no
dropout) as the function (N, h, w, 1) float32 NHWC network inputs -> (N, h, w) float32 lesion
probabilities, sigmoid(logits[..., output_channel]), and the export folder:

  model.onnx           ONNX (opset `ONNX_OPSET`), input "image", output "probabilities"; the
                       layout, shapes and the contract in the model's metadata_props
  model.stablehlo      `jax.export` serialized for platforms cpu, cuda and tpu
  model_contract.json  the run's input contract (preprocessing, orientation, target, threshold)
                       plus the export's formats, input/output names and shapes and the size and
                       sha256 of each model file (checked on load)
  model_card.json      provenance: config digest, test metrics, library versions, parameter
                       fingerprint, export time, formats, batch

  python -m tvunet_jax.export --checkpoint runs/demo --out exported/demo \
      [--formats onnx,stablehlo] [--batch N | --dynamic_batch] [--overwrite]

The graphs have a fixed batch (`--batch`, default 1) or a symbolic one (`--dynamic_batch`:
jax2onnx 0.12.5 and `jax.export` both take it; onnxruntime then runs any N). The folder is built
in a temporary sibling and renamed into place (`atomic.replacing_dir`), so a failure leaves
nothing. Exports always use XLA's convolutions: the oneDNN kernels are CPU-only custom calls
without a portable serialization. `tvunet_jax.exported.load_exported` runs an export.
"""

from __future__ import annotations

from tvunet_jax import host_memory

if __name__ == "__main__":  # run as a program: before JAX's threads exist
  host_memory.keep_freed_memory()

import argparse
import datetime
import functools
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tvunet_jax import atomic, checkpointing, console, exported, models, predict, sharding
from tvunet_jax import contract as contract_lib
from tvunet_jax.kernels import conv

# The folder's names are the reader's (exported.py), so writer and reader cannot drift apart.
ONNX_FILE, STABLEHLO_FILE = exported.ONNX_FILE, exported.STABLEHLO_FILE
CONTRACT_FILE, CARD_FILE = exported.CONTRACT_FILE, exported.CARD_FILE
FORMATS, FORMAT_FILES = exported.FORMATS, exported.FORMAT_FILES
INSTALL_HINT = exported.INSTALL_HINT
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
LAYOUT = "NHWC"
# 18, not 17: jax2onnx 0.12.5 writes ReduceMax (the 2x2 pooling) with its axes as an input, which
# opset 18 introduced; at 17 onnxruntime rejects the graph.
ONNX_OPSET = 18
PLATFORMS = ("cpu", "cuda", "tpu")
# Converter and IR libraries that log (or print) at DEBUG / WARNING during a normal export.
QUIET_LOGGERS = ("jax2onnx", "onnx_ir", "onnx")
CARD_PACKAGES = ("jax", "jaxlib", "flax", "numpy", "jax2onnx", "onnx", "onnxruntime", "tvunet_jax")
CARD_METRICS = ("dice", "iou", "precision", "recall")  # of test_metrics.json's "operating" block
CUSTOM_CALL_RE = re.compile(r"custom_call\s*@([\w.$-]+)")


# ----------------------------------------------------------------------------- the network


def network_probabilities(
  model: models.UNet, variables: Any, images: jax.Array, *, output_channel: int = 0
) -> jax.Array:
  """The exported function: (N, h, w, 1) float32 network inputs -> (N, h, w) float32 in [0, 1].

  Inference mode (BatchNorm running statistics, no dropout); sigmoid of the lesion channel.
  """
  logits = model.apply(variables, images, train=False)  # (N, h, w, num_outputs) f32
  return jax.nn.sigmoid(logits[..., output_channel].astype(jnp.float32))


def xla_model(model_cfg: dict, dtype: str | None = None) -> models.UNet:
  """The contract's U-Net for export: `conv.XLA` (lax convolutions: no CPU-only oneDNN custom
  call, whatever TVUNET_CONV_BACKEND says, since a given `ConvOps` is not resolved again) and
  `pool="reshape"`. The pooling switch changes the gradient only (the forward pass is the same max
  over each 2x2 window, same parameters), and jax2onnx 0.12.5 fails on `max_pool`. `dtype`
  replaces the compute dtype (ONNX's Conv takes no bfloat16: an ONNX graph computes in float32).
  """
  cfg = {**model_cfg, "conv_backend": conv.XLA, "pool": "reshape"}
  if dtype is not None:
    cfg["dtype"] = dtype
  return models.build(cfg)


def custom_call_targets(mlir_text: str) -> set[str]:
  """Targets of every `stablehlo.custom_call @target` in a module's text."""
  return set(CUSTOM_CALL_RE.findall(mlir_text))


# ----------------------------------------------------------------------------- the two formats


def export_stablehlo(
  fn: Callable[[jax.Array], jax.Array], input_shape: tuple[int | None, ...]
) -> bytes:
  """`jax.export` of `fn` for `PLATFORMS`, serialized.

  Args:
    fn: (N, h, w, 1) float32 -> (N, h, w) float32, closing over its (host) variables.
    input_shape: (N, h, w, 1); N None for a symbolic batch dimension "b".

  Raises:
    RuntimeError: the lowered module calls a tvunet kernel (a model not built by `xla_model`).
  """
  if input_shape[0] is None:
    (batch,) = jax.export.symbolic_shape("b")
    input_shape = (batch, *input_shape[1:])
  spec = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  module = jax.export.export(jax.jit(fn), platforms=PLATFORMS)(spec)
  kernels = sorted(t for t in custom_call_targets(module.mlir_module()) if t.startswith("tvunet"))
  if kernels:
    raise RuntimeError(
      f"export traced the CPU-only kernels {kernels}; build the model with "
      "conv_backend='xla' (export.xla_model)"
    )
  return bytes(module.serialize())


def export_onnx(
  fn: Callable[[jax.Array], jax.Array],
  input_shape: tuple[int | None, ...],
  *,
  metadata: dict[str, str],
) -> bytes:
  """jax2onnx conversion of `fn`, serialized ONNX (opset `ONNX_OPSET`).

  Args:
    fn: (N, h, w, 1) float32 -> (N, h, w) float32.
    input_shape: (N, h, w, 1); N None for a symbolic batch dimension "N".
    metadata: the model's metadata_props (string to string).

  Raises:
    ValueError: jax2onnx or onnx is not installed (with the install hint).
  """
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top  (optional: the [export] extra)
    import onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(
      f"ONNX export needs jax2onnx and onnx ({e.name} missing): {INSTALL_HINT}"
    ) from None
  shape = tuple("N" if d is None else int(d) for d in input_shape)
  # jax2onnx prints DEBUG lines on stdout and its IR library warns about untyped shape values:
  # harmless, so they are held back unless --verbosity=1.
  with console.library_prints(QUIET_LOGGERS):
    proto = jax2onnx.to_onnx(
      fn,
      [shape],
      opset=ONNX_OPSET,
      model_name="tvunet",
      input_names=[INPUT_NAME],
      output_names=[OUTPUT_NAME],
    )
  # The converter annotates the NHWC <-> NCHW transposes around each conv with swapped shapes,
  # which onnxruntime reports ("Error merging shape info") before inferring its own; the
  # annotations are optional, so they are dropped.
  del proto.graph.value_info[:]
  onnx.helper.set_model_props(proto, metadata)
  onnx.checker.check_model(proto)
  return proto.SerializeToString()


# ----------------------------------------------------------------------------- provenance


def parameter_fingerprint(variables: Any) -> dict[str, Any]:
  """sha256 over every variable leaf (path, dtype, shape, bytes, in path order) and the count of
  trainable scalars: equal fingerprints mean bit-identical weights and statistics."""
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(variables))[0]
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.ascontiguousarray(leaf)
    h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape};".encode())
    h.update(a.tobytes())
  count = sum(math.prod(np.shape(x)) for x in jax.tree.leaves(variables.get("params", variables)))
  return {"sha256": h.hexdigest(), "num_params": int(count)}


def _run_dir(checkpoint: str) -> str | None:
  """The training workdir of a workdir, `best`/`checkpoints` folder or step folder: the nearest
  of it and its two parents holding config.json."""
  d = os.path.abspath(checkpoint)
  for _ in range(3):
    if os.path.isfile(os.path.join(d, "config.json")):
      return d
    d = os.path.dirname(d)
  return None


def _finite(x: Any) -> float | None:
  x = float(x)
  return x if math.isfinite(x) else None  # JSON has no NaN


def _test_metrics(run_dir: str | None) -> dict[str, Any] | None:
  """A few scalars of the run's test_metrics.json (the operating threshold's row), or None."""
  path = os.path.join(run_dir, "test_metrics.json") if run_dir else None
  if not path or not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      result = json.load(f)
    op = result.get("operating", {})
    out = {"threshold": _finite(result["operating_threshold"])}
    out.update({k: _finite(op[k]) for k in CARD_METRICS if k in op})
    for k in ("average_precision", "mean_volume_dice"):
      if k in result:
        out[k] = _finite(result[k])
    if "num_volumes" in result:
      out["num_volumes"] = int(result["num_volumes"])
    return out
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(f"{path}: unreadable test metrics ({type(e).__name__}: {e})") from None


def _file_entry(path: str) -> dict[str, Any]:
  with open(path, "rb") as f:
    data = f.read()
  return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# ----------------------------------------------------------------------------- the export


def read_checkpoint_contract(checkpoint: str) -> dict:
  """The contract saved with a run, checked (`contract.check`); a
  one-line ValueError naming the checkpoint or the missing file otherwise."""
  try:
    contract = contract_lib.read(checkpoint)
  except FileNotFoundError as e:
    if e.filename:
      raise ValueError(
        f"{checkpoint}: no model contract (neither in the checkpoint's meta nor {e.filename})"
      ) from None
    raise ValueError(str(e).splitlines()[0]) from None
  except (OSError, ValueError) as e:
    raise ValueError(
      f"{checkpoint}: unreadable model contract ({type(e).__name__}: "
      f"{str(e).splitlines()[0][:200]})"
    ) from None
  contract_lib.check(contract, checkpoint)
  return contract


def export_model(
  checkpoint: str,
  out: str,
  *,
  formats: Sequence[str] = FORMATS,
  batch: int | None = 1,
  overwrite: bool = False,
) -> dict:
  """Exports a checkpoint's network into the folder `out` (see the module docstring).

  Args:
    checkpoint: a training workdir (its best checkpoint), a `best`/`checkpoints` folder or a
      step folder.
    out: the export folder; refused if it exists unless `overwrite`.
    formats: a non-empty subset of `FORMATS`.
    batch: the graph's fixed batch N, or None for a symbolic batch dimension.

  Returns:
    The written model card.

  Raises:
    ValueError: a bad checkpoint, contract, format list or batch; one line.
    FileExistsError: `out` exists and not `overwrite`.
  """
  formats = list(dict.fromkeys(formats))
  unknown = [f for f in formats if f not in FORMATS]
  if not formats or unknown:
    raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {formats}")
  if batch is not None and (not isinstance(batch, int) or batch < 1):
    raise ValueError(f"batch must be a positive int or None (dynamic), got {batch!r}")
  with atomic.replacing_dir(out, overwrite=overwrite) as tmp:
    contract = read_checkpoint_contract(checkpoint)
    _, variables, _ = predict.load_model(checkpoint, sharding.make_mesh(1))
    k = contract_lib.output_channel(contract)
    variables = jax.device_get(variables)  # host arrays: constants of the exported graphs
    fn = functools.partial(
      network_probabilities, xla_model(contract["model"]), variables, output_channel=k
    )
    # ONNX's Conv has no bfloat16: a model trained with bf16 compute (e.g. the TPU config) is
    # exported to ONNX computing in float32 (the parameters are float32 either way).
    onnx_fn = functools.partial(
      network_probabilities, xla_model(contract["model"], "float32"), variables, output_channel=k
    )
    h, w = contract["image_size"]
    input_shape, output_shape = [batch, h, w, 1], [batch, h, w]
    export_info = {
      "formats": formats,
      "input_name": INPUT_NAME,
      "output_name": OUTPUT_NAME,
      "layout": LAYOUT,
      "input_shape": input_shape,
      "output_shape": output_shape,
      "batch": batch,
      "output_channel": k,
      "exported_output": f"probabilities (N, h, w) float32 = sigmoid(logits[..., {k}])",
      "compute_dtype": {"onnx": "float32", "stablehlo": contract["model"]["dtype"]},
    }
    if "onnx" in formats:
      metadata = {
        "layout": LAYOUT,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_shape": json.dumps(input_shape),
        "output_shape": json.dumps(output_shape),
        "contract": json.dumps(contract, sort_keys=True),
      }
      data = export_onnx(onnx_fn, tuple(input_shape), metadata=metadata)
      with open(os.path.join(tmp, ONNX_FILE), "wb") as f:
        f.write(data)
    if "stablehlo" in formats:
      data = export_stablehlo(fn, tuple(input_shape))
      with open(os.path.join(tmp, STABLEHLO_FILE), "wb") as f:
        f.write(data)
    files = {FORMAT_FILES[f]: _file_entry(os.path.join(tmp, FORMAT_FILES[f])) for f in formats}
    atomic.write_json(os.path.join(tmp, CONTRACT_FILE), {**contract, **export_info, "files": files})
    run_dir = _run_dir(checkpoint)
    config = os.path.join(run_dir, "config.json") if run_dir else None
    card = {
      "exported_at_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "source_checkpoint": os.path.abspath(checkpoint),
      "formats": formats,
      "batch": batch,
      "output_channel": k,
      "compute_dtype": export_info["compute_dtype"],
      "onnx_opset": ONNX_OPSET if "onnx" in formats else None,
      "stablehlo_platforms": list(PLATFORMS) if "stablehlo" in formats else None,
      "config_sha256": _file_entry(config)["sha256"] if config else None,
      "test_metrics": _test_metrics(run_dir),
      "parameters": parameter_fingerprint(variables),
      "versions": checkpointing.library_versions(CARD_PACKAGES),
      "files": files,
    }
    atomic.write_json(os.path.join(tmp, CARD_FILE), card)
  return card


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
  """Command line; returns the exit code (0 ok, 2 bad input)."""
  ap = argparse.ArgumentParser(
    prog="python -m tvunet_jax.export", description="Export a trained model to ONNX and StableHLO."
  )
  ap.add_argument(
    "--checkpoint",
    required=True,
    help="training workdir (its best checkpoint) or a checkpoint folder",
  )
  ap.add_argument("--out", required=True, help="export folder (must not exist)")
  ap.add_argument(
    "--formats", default=",".join(FORMATS), help=f"comma-separated subset of {','.join(FORMATS)}"
  )
  group = ap.add_mutually_exclusive_group()
  group.add_argument("--batch", type=int, default=1, help="fixed batch N of the graphs (1)")
  group.add_argument(
    "--dynamic_batch",
    action="store_true",
    help="symbolic batch dimension ('N' in ONNX, 'b' in StableHLO)",
  )
  ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  ap.add_argument("--verbosity", type=int, default=0, help="1: the converter's log lines too")
  args = ap.parse_args(argv)
  console.configure(args.verbosity)
  formats = [f.strip() for f in args.formats.split(",") if f.strip()]
  try:
    card = export_model(
      args.checkpoint,
      args.out,
      formats=formats,
      batch=None if args.dynamic_batch else args.batch,
      overwrite=args.overwrite,
    )
  except (ValueError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out = os.path.abspath(args.out)
  batch = "dynamic" if card["batch"] is None else card["batch"]
  print(f"exported {', '.join(card['formats'])} (batch {batch}) to {out}")
  for name, entry in card["files"].items():
    print(f"  {name:<18} {entry['bytes'] / 1e6:8.2f} MB")
  return 0


if __name__ == "__main__":
  sys.exit(main())
