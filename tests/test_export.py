"""export.py / exported.py: ONNX and StableHLO exports equal the Flax model, are portable, carry
their contract and card, and every bad input is refused with one line, leaving nothing behind."""

from __future__ import annotations

import datetime
import functools
import glob
import hashlib
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import onnx
import pytest

from tests.conftest import random_variables, tiny_config_for
from tvunet_jax import atomic, export, exported, models, predict, sharding
from tvunet_jax import contract as contract_lib
from tvunet_jax.kernels import conv, library

TOL = 1e-4
FIXED_BATCH = 3


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
  """A trained tiny run (workdir with best/, config.json, test_metrics.json)."""
  from tvunet_jax import train  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path_factory.mktemp("export_run") / "run")
  train.train_and_evaluate(tiny_config_for(tiny_data), workdir)
  return workdir


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory):
  """{"fixed": folder exported at batch FIXED_BATCH, "dynamic": symbolic batch}."""
  root = tmp_path_factory.mktemp("exports")
  out = {"fixed": str(root / "fixed"), "dynamic": str(root / "dynamic")}
  export.export_model(run, out["fixed"], batch=FIXED_BATCH)
  export.export_model(run, out["dynamic"], batch=None)
  return out


@pytest.fixture(scope="module")
def reference(run):
  """(inputs (N, h, w) f32, probabilities (N, h, w) f64) of the run's Flax model, XLA convs,
  with the sigmoid taken in numpy."""
  _, variables, contract = predict.load_model(run, sharding.make_mesh(1))
  model = models.build({**contract["model"], "conv_backend": "xla"})
  h, w = contract["image_size"]
  rng = np.random.default_rng(0)
  # 5 slices: not a multiple of the fixed batch, so the padded last chunk is exercised.
  x = np.concatenate([rng.uniform(0, 1, (3, h, w)), rng.normal(0.5, 0.5, (2, h, w))])
  x = x.astype(np.float32)
  logits = np.asarray(model.apply(variables, jnp.asarray(x[..., None]), train=False), np.float64)
  return x, 1.0 / (1.0 + np.exp(-logits[..., 0]))


def _one_line_error(excinfo, *names):
  msg = str(excinfo.value)
  assert "\n" not in msg, msg
  for name in names:
    assert name in msg, msg
  return msg


def _nothing_left(out):
  parent = os.path.dirname(os.path.abspath(out))
  assert not os.path.exists(out)
  assert not [p for p in os.listdir(parent) if p.startswith(atomic.TEMP_PREFIX)]


def _copy(src, tmp_path, name="copy"):
  dst = str(tmp_path / name)
  shutil.copytree(src, dst)
  return dst


def _edit_run_contract(workdir, edit):
  """Applies `edit(contract) -> contract | None` to every copy of a run's contract (checkpoint
  metas and the workdir file); None removes it."""
  for meta_file in glob.glob(os.path.join(workdir, "*", "[0-9]*", "meta", "metadata")):
    with open(meta_file) as f:
      meta = json.load(f)
    new = edit(meta.pop("contract"))
    if new is not None:
      meta["contract"] = new
    with open(meta_file, "w") as f:
      json.dump(meta, f)
  path = os.path.join(workdir, contract_lib.FILE)
  with open(path) as f:
    new = edit(json.load(f))
  if new is None:
    os.remove(path)
  else:
    with open(path, "w") as f:
      json.dump(new, f)


# ----------------------------------------------------------------------------- equality


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
@pytest.mark.parametrize("runtime", ["onnx", "stablehlo"])
def test_export_equals_flax_model(exports, reference, kind, runtime):
  x, want = reference
  assert want.std() > 1e-3  # a non-constant network, so equality means something
  predictor = exported.load_exported(exports[kind], runtime=runtime, batch_size=2)
  assert predictor.runtime == runtime
  assert predictor.graph_batch == (FIXED_BATCH if kind == "fixed" else None)
  got = predictor(x)
  assert got.shape == x.shape and got.dtype == np.float32
  assert got.min() >= 0.0 and got.max() <= 1.0
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
  assert predictor(x[:0]).shape == (0, *x.shape[1:])


def test_auto_runtime_prefers_onnx(exports, monkeypatch):
  assert exported.load_exported(exports["fixed"]).runtime == "onnx"
  monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
  assert exported.load_exported(exports["fixed"]).runtime == "stablehlo"
  with pytest.raises(ValueError) as e:
    exported.load_exported(exports["fixed"], runtime="onnx")
  _one_line_error(e, "onnxruntime", "pip install -e '.[export]'")


def test_output_channel_and_max_pool(tmp_path):
  """A 2-channel head exported at output_channel 1; the contract's `max_pool` (which jax2onnx
  cannot convert) is exported as the reshape pool, whose forward pass is the same max."""
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top

  cfg = {
    "base": 4,
    "depth": 2,
    "dropout": 0.2,
    "num_outputs": 2,
    "dtype": "float32",
    "upsample": "conv_transpose",
    "pool": "max_pool",
    "bn_momentum": 0.9,
  }
  ref_model = models.build({**cfg, "conv_backend": "xla"})
  variables = random_variables(ref_model, (1, 32, 32, 1), seed=3)
  x = np.random.default_rng(1).normal(size=(2, 32, 32, 1)).astype(np.float32)
  logits = np.asarray(ref_model.apply(variables, x, train=False), np.float64)
  want = 1.0 / (1.0 + np.exp(-logits[..., 1]))
  assert np.abs(want - 1.0 / (1.0 + np.exp(-logits[..., 0]))).max() > 0.01  # channels differ
  fn = functools.partial(
    export.network_probabilities, export.xla_model(cfg), variables, output_channel=1
  )
  session = ort.InferenceSession(
    export.export_onnx(fn, (2, 32, 32, 1), metadata={}), providers=["CPUExecutionProvider"]
  )
  np.testing.assert_allclose(session.run(None, {"image": x})[0], want, atol=TOL, rtol=0)
  module = jax.export.deserialize(bytearray(export.export_stablehlo(fn, (None, 32, 32, 1))))
  np.testing.assert_allclose(np.asarray(module.call(x)), want, atol=TOL, rtol=0)

  base = {"image_size": [32, 32], "intensity": "raw_hu", "target": "lesion", "threshold": 0.5}
  assert (
    contract_lib.output_channel({**base, "model": {"num_outputs": 2}, "output_channel": 1}) == 1
  )
  assert contract_lib.output_channel({**base, "model": {"num_outputs": 1}}) == 0
  for bad in (2, -1, True, "1"):
    with pytest.raises(ValueError) as e:
      contract_lib.check({**base, "model": {"num_outputs": 2}, "output_channel": bad}, "run7")
    _one_line_error(e, "run7", "output_channel")


def test_bfloat16_model_exports_a_valid_onnx_graph(run, reference, tmp_path):
  """A model that computes in bfloat16 (the TPU config's) exports an ONNX graph ONNX Runtime
  loads, computing in float32 (ONNX's Conv takes no bfloat16): the float32 reference's numbers;
  its StableHLO keeps bfloat16 (within bf16 rounding of them). The card says which is which."""
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top

  bf16_run = _copy(run, tmp_path, "bf16_run")
  _edit_run_contract(bf16_run, lambda c: {**c, "model": {**c["model"], "dtype": "bfloat16"}})
  out = str(tmp_path / "bf16_export")
  card = export.export_model(bf16_run, out, batch=None)
  assert card["compute_dtype"] == {"onnx": "float32", "stablehlo": "bfloat16"}
  with open(os.path.join(out, export.CONTRACT_FILE)) as f:
    assert json.load(f)["compute_dtype"] == card["compute_dtype"]
  x, want = reference
  session = ort.InferenceSession(
    os.path.join(out, export.ONNX_FILE), providers=["CPUExecutionProvider"]
  )
  got = session.run(None, {export.INPUT_NAME: x[..., None]})[0]
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
  with open(os.path.join(out, export.STABLEHLO_FILE), "rb") as f:
    module = jax.export.deserialize(bytearray(f.read()))
  got_bf16 = np.asarray(module.call(x[..., None]))
  assert 0 < np.abs(got_bf16 - want).max() < 0.1  # bf16 compute: close, not equal


# ----------------------------------------------------------------------------- the folder


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_onnx_graph(exports, run, kind):
  proto = onnx.load(os.path.join(exports[kind], export.ONNX_FILE))
  onnx.checker.check_model(proto)
  assert {o.domain: o.version for o in proto.opset_import}[""] >= 17
  h, w = contract_lib.read(run)["image_size"]
  (inp,), outs = proto.graph.input, proto.graph.output
  assert inp.name == "image" and [o.name for o in outs] == ["probabilities"]
  assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
  dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
  out_dims = [d.dim_value or d.dim_param for d in outs[0].type.tensor_type.shape.dim]
  if kind == "fixed":
    assert dims == [FIXED_BATCH, h, w, 1] and out_dims == [FIXED_BATCH, h, w]
  else:
    assert isinstance(dims[0], str) and dims[1:] == [h, w, 1] and out_dims[1:] == [h, w]
  # Inference mode: no dropout or random op, BatchNorm never in training mode.
  ops = {n.op_type for n in proto.graph.node}
  assert not ops & {"Dropout", "RandomUniform", "RandomUniformLike", "Bernoulli"}
  for node in proto.graph.node:
    if node.op_type == "BatchNormalization":
      assert all(a.i == 0 for a in node.attribute if a.name == "training_mode")
  meta = {p.key: p.value for p in proto.metadata_props}
  assert meta["layout"] == "NHWC"
  assert json.loads(meta["input_shape"]) == [FIXED_BATCH if kind == "fixed" else None, h, w, 1]
  assert json.loads(meta["contract"]) == contract_lib.read(run)


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_stablehlo_is_portable(exports, run, kind):
  with open(os.path.join(exports[kind], export.STABLEHLO_FILE), "rb") as f:
    module = jax.export.deserialize(bytearray(f.read()))
  assert module.platforms == ("cpu", "cuda", "tpu")
  h, w = contract_lib.read(run)["image_size"]
  shape = module.in_avals[0].shape
  assert shape[1:] == (h, w, 1)
  assert shape[0] == FIXED_BATCH if kind == "fixed" else str(shape[0]) == "b"
  text = module.mlir_module()
  assert "stablehlo.convolution" in text
  assert "@tvunet" not in text
  kernels = {*library.TARGETS.values(), *library.WINOGRAD_TARGETS}
  assert not export.custom_call_targets(text) & kernels


@pytest.mark.skipif(not library.available(), reason="oneDNN kernel library not built")
def test_custom_call_check_sees_onednn_kernels():
  """The check above can fail: a oneDNN model's lowering holds the tvunet targets."""
  model = models.UNet(base=4, depth=2, num_outputs=1, conv_backend="onednn")
  variables = random_variables(model, (1, 32, 32, 1))
  fn = functools.partial(export.network_probabilities, model, variables)
  text = jax.jit(fn).lower(jax.ShapeDtypeStruct((2, 32, 32, 1), jnp.float32)).as_text()
  assert library.TARGETS[0] in export.custom_call_targets(text)


def test_environment_cannot_put_onednn_into_an_export(run, tmp_path, monkeypatch):
  monkeypatch.setenv(conv.ENV_BACKEND, "onednn")
  out = str(tmp_path / "env")
  export.export_model(run, out, formats=["stablehlo"], batch=2)
  assert os.environ[conv.ENV_BACKEND] == "onednn"  # restored
  with open(os.path.join(out, export.STABLEHLO_FILE), "rb") as f:
    text = jax.export.deserialize(bytearray(f.read())).mlir_module()
  assert "@tvunet" not in text
  assert sorted(os.listdir(out)) == ["model.stablehlo", "model_card.json", "model_contract.json"]
  assert exported.load_exported(out).runtime == "stablehlo"  # auto without model.onnx


def test_contract_and_card(exports, run):
  folder = exports["fixed"]
  with open(os.path.join(folder, export.CONTRACT_FILE)) as f:
    contract = json.load(f)
  with open(os.path.join(folder, export.CARD_FILE)) as f:
    card = json.load(f)
  run_contract = contract_lib.read(run)
  assert {k: contract[k] for k in run_contract} == run_contract
  h, w = run_contract["image_size"]
  assert contract["formats"] == ["onnx", "stablehlo"] == card["formats"]
  assert contract["input_name"] == "image" and contract["output_name"] == "probabilities"
  assert contract["input_shape"] == [FIXED_BATCH, h, w, 1]
  assert contract["output_shape"] == [FIXED_BATCH, h, w]
  for name in ("model.onnx", "model.stablehlo"):
    with open(os.path.join(folder, name), "rb") as f:
      data = f.read()
    assert contract["files"][name] == {
      "bytes": len(data),
      "sha256": hashlib.sha256(data).hexdigest(),
    }

  with open(os.path.join(run, "config.json"), "rb") as f:
    assert card["config_sha256"] == hashlib.sha256(f.read()).hexdigest()
  with open(os.path.join(run, "test_metrics.json")) as f:
    test_metrics = json.load(f)
  assert card["test_metrics"]["dice"] == pytest.approx(test_metrics["operating"]["dice"])
  assert card["test_metrics"]["threshold"] == test_metrics["operating_threshold"]
  assert card["batch"] == FIXED_BATCH and card["onnx_opset"] >= 17
  assert card["versions"]["jax"] == jax.__version__
  assert card["versions"]["onnx"] == onnx.__version__
  when = datetime.datetime.fromisoformat(card["exported_at_utc"])
  assert abs((datetime.datetime.now(datetime.UTC) - when).total_seconds()) < 3600

  _, variables, _ = predict.load_model(run, sharding.make_mesh(1))
  variables = jax.device_get(variables)
  assert card["parameters"]["num_params"] == models.count_params(variables["params"])
  assert card["parameters"] == export.parameter_fingerprint(variables)
  with open(os.path.join(exports["dynamic"], export.CARD_FILE)) as f:
    assert json.load(f)["parameters"] == card["parameters"]  # same checkpoint, same weights
  changed = jax.tree.map(np.copy, variables)
  first = jax.tree.leaves(changed["params"])[0]
  first.flat[0] = np.nextafter(first.flat[0], np.float32(np.inf))
  assert export.parameter_fingerprint(changed)["sha256"] != card["parameters"]["sha256"]


def test_cli(run, tmp_path, capfd):
  out = str(tmp_path / "cli")
  assert (
    export.main(["--checkpoint", run, "--out", out, "--formats", "onnx", "--dynamic_batch"]) == 0
  )
  stdout, _ = capfd.readouterr()
  assert "DEBUG" not in stdout and len(stdout.splitlines()) <= 3, stdout
  assert sorted(os.listdir(out)) == ["model.onnx", "model_card.json", "model_contract.json"]
  assert exported.load_exported(out, runtime="onnx").graph_batch is None

  assert export.main(["--checkpoint", run, "--out", out]) == 2  # exists
  _, stderr = capfd.readouterr()
  assert stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1, stderr
  assert (
    export.main(
      ["--checkpoint", run, "--out", out, "--formats", "stablehlo", "--overwrite", "--batch", "2"]
    )
    == 0
  )
  assert sorted(os.listdir(out)) == ["model.stablehlo", "model_card.json", "model_contract.json"]
  with pytest.raises(SystemExit) as e:
    export.main(["--checkpoint", run, "--out", out, "--batch", "2", "--dynamic_batch"])
  assert e.value.code == 2


# ----------------------------------------------------------------------------- bad input


def _no_contract(c):
  del c
  return None


@pytest.mark.parametrize(
  "edit, words",
  [
    (_no_contract, ["no model contract", "model_contract.json"]),
    (lambda c: {**c, "intensity": "raw_counts"}, ["intensity", "raw_counts"]),
    (lambda c: {k: v for k, v in c.items() if k != "target"}, ["lacks", "target"]),
    (lambda c: {**c, "model": {**c["model"], "base": 8}}, ["checkpoint"]),
    (lambda c: {**c, "output_channel": 1}, ["output_channel"]),
  ],
  ids=["missing", "intensity", "no_target", "other_model", "output_channel"],
)
def test_bad_checkpoint_refused(run, tmp_path, edit, words):
  bad = _copy(run, tmp_path)
  _edit_run_contract(bad, edit)
  out = str(tmp_path / "out")
  with pytest.raises(ValueError) as e:
    export.export_model(bad, out)
  _one_line_error(e, *words)
  _nothing_left(out)
  assert export.main(["--checkpoint", bad, "--out", out]) == 2
  _nothing_left(out)


def test_bad_arguments_refused(run, tmp_path):
  out = str(tmp_path / "out")
  for kwargs, word in [
    ({"formats": ["onnx", "tflite"]}, "tflite"),
    ({"formats": []}, "formats"),
    ({"batch": 0}, "batch"),
  ]:
    with pytest.raises(ValueError) as e:
      export.export_model(run, out, **kwargs)
    _one_line_error(e, word)
    _nothing_left(out)
  with pytest.raises(ValueError) as e:
    export.export_model(str(tmp_path / "nowhere"), out)
  _one_line_error(e, "nowhere", "no checkpoint")
  _nothing_left(out)


def test_existing_folder_and_failed_export(run, tmp_path, monkeypatch):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError):
    export.export_model(run, str(out))
  assert os.listdir(out) == ["keep.txt"]

  def fail(*args, **kwargs):
    raise RuntimeError("disk full")

  monkeypatch.setattr(export, "export_stablehlo", fail)  # after model.onnx is written
  with pytest.raises(RuntimeError):
    export.export_model(run, str(out), overwrite=True)
  assert os.listdir(out) == ["keep.txt"]  # the old folder is intact
  new = str(tmp_path / "new")
  with pytest.raises(RuntimeError):
    export.export_model(run, new)
  _nothing_left(new)


def test_missing_converter_hint(monkeypatch):
  monkeypatch.setitem(sys.modules, "jax2onnx", None)
  with pytest.raises(ValueError) as e:
    export.export_onnx(lambda x: x[..., 0], (1, 16, 16, 1), metadata={})
  _one_line_error(e, "jax2onnx", "pip install -e '.[export]'")


def _truncate(path):
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])


def _flip(path):
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    for i in range(len(data) // 3, len(data) // 3 + 64):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(data)


def _drop_file_records(folder):
  path = os.path.join(folder, export.CONTRACT_FILE)
  with open(path) as f:
    contract = json.load(f)
  del contract["files"]
  with open(path, "w") as f:
    json.dump(contract, f)


@pytest.mark.parametrize(
  "runtime, name", [("onnx", "model.onnx"), ("stablehlo", "model.stablehlo")]
)
@pytest.mark.parametrize(
  "damage, words",
  [
    (_truncate, ["truncated"]),
    (_flip, ["sha256", "corrupt"]),
  ],
  ids=["truncated", "flipped"],
)
def test_damaged_model_file_refused(exports, tmp_path, runtime, name, damage, words):
  folder = _copy(exports["fixed"], tmp_path)
  damage(os.path.join(folder, name))
  with pytest.raises(ValueError) as e:
    exported.load_exported(folder, runtime=runtime)
  _one_line_error(e, os.path.join(folder, name), *words)
  # Without the recorded sizes and hashes the parser itself refuses the truncated file.
  if damage is _truncate:
    _drop_file_records(folder)
    with pytest.raises(ValueError) as e:
      exported.load_exported(folder, runtime=runtime)
    _one_line_error(e, os.path.join(folder, name))


@pytest.mark.parametrize(
  "runtime, name", [("onnx", "model.onnx"), ("stablehlo", "model.stablehlo")]
)
@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_contract_graph_mismatch_refused(exports, tmp_path, runtime, name, kind):
  folder = _copy(exports[kind], tmp_path)
  path = os.path.join(folder, export.CONTRACT_FILE)
  with open(path) as f:
    contract = json.load(f)
  h, w = contract["image_size"]
  contract["image_size"] = [h // 2, w]
  with open(path, "w") as f:
    json.dump(contract, f)
  with pytest.raises(ValueError) as e:
    exported.load_exported(folder, runtime=runtime)
  _one_line_error(e, os.path.join(folder, name), "does not match", "image_size")


def test_bad_folder_refused(exports, tmp_path):
  folder = _copy(exports["fixed"], tmp_path)
  with pytest.raises(ValueError) as e:
    exported.load_exported(folder, runtime="tflite")
  _one_line_error(e, "tflite")
  predictor = exported.load_exported(folder)
  h, w = predictor.contract["image_size"]
  with pytest.raises(ValueError) as e:
    predictor(np.zeros((2, h + 16, w), np.float32))
  _one_line_error(e, "network inputs")

  os.remove(os.path.join(folder, "model.onnx"))
  with pytest.raises(ValueError) as e:
    exported.load_exported(folder, runtime="onnx")
  _one_line_error(e, os.path.join(folder, "model.onnx"), "missing")

  path = os.path.join(folder, export.CONTRACT_FILE)
  with open(path, "w") as f:
    f.write('{"image_size": [64, ')
  with pytest.raises(ValueError) as e:
    exported.load_exported(folder)
  _one_line_error(e, path, "unreadable")
  with open(path, "w") as f:
    json.dump({"image_size": [64, 64]}, f)
  with pytest.raises(ValueError) as e:
    exported.load_exported(folder)
  _one_line_error(e, path, "lacks")
  os.remove(path)
  with pytest.raises(ValueError) as e:
    exported.load_exported(folder)
  _one_line_error(e, path, "missing")


# ----------------------------------------------------------------------------- predict --model


@pytest.mark.parametrize("runtime", ["onnx", "stablehlo"])
def test_predict_from_an_export_equals_the_checkpoint_path(run, exports, tmp_path, runtime):
  """The whole volume pipeline (orientation, resize, window, batching, resize back, report) from
  an export, no Flax model built, against the checkpoint path, on a phantom volume stored with a
  rotated, oblique, non-LAS affine."""
  from tvunet_jax import phantom  # pylint: disable=g-import-not-at-top

  hu, _, _ = phantom.generate_volume(np.random.default_rng(3), 96, 6, lesion=True)
  stored = np.ascontiguousarray(np.transpose(phantom.to_storage(hu), (1, 0, 2))[::-1])
  affine = np.array(
    [[0.0, -0.9, 0.05, 20.0], [-0.8, 0.0, 0.0, 10.0], [0.0, 0.03, 3.0, -40.0], [0, 0, 0, 1]]
  )
  vol = str(tmp_path / "scan.nii.gz")
  nib.save(nib.Nifti1Image(np.round(stored).astype(np.int16), affine), vol)
  results = {}
  for name, args in (
    ("checkpoint", ["--checkpoint", run]),
    ("export", ["--model", exports["dynamic"], "--runtime", runtime]),
  ):
    out = tmp_path / name
    assert predict.main([*args, vol, "--out", str(out), "--probabilities", "--no_progress"]) == 0
    with open(out / "scan_report.json") as f:
      report = json.load(f)
    results[name] = (
      np.asarray(nib.load(out / "scan_probs.nii.gz").dataobj),
      np.asarray(nib.load(out / "scan_mask.nii.gz").dataobj),
      report,
    )
  (p_ckpt, m_ckpt, _), (p_exp, m_exp, r_exp) = results["checkpoint"], results["export"]
  assert p_ckpt.shape == stored.shape
  np.testing.assert_allclose(p_exp, p_ckpt, atol=1e-4, rtol=0)
  assert np.mean(m_exp != m_ckpt) <= 1e-4
  assert r_exp["model"] == os.path.abspath(exports["dynamic"])
