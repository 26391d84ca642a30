"""One measurement per child: the JAX, PyTorch and ONNX Runtime steps and how each is timed.

Every function here imports its framework inside, so a child imports only the one it measures
(and `experiments/profile_step.py` can import this module without PyTorch):

  * `JaxTrainStep`: the project's own jitted train step, `steps.make_train_fn` on one device
    with `steps.create_state` / `steps.make_optimizer`, a fixed random batch, loss BCE + TV;
  * `jax_inference`: `predict.SlicePredictor` (the network only: host arrays in, probabilities
    out) on random slices;
  * `torch_train` / `torch_inference`: the peer network (`experiments/torch_unet.py`,
    channels_last, bf16 by `torch.autocast("cpu")`) in one of the `peers` variants;
  * `ort_export` (a JAX child) and `ort_inference` (an ONNX Runtime child): the network exported
    by `tvunet_jax.export` (XLA convolutions) and run by ONNX Runtime's CPU provider;
  * `jax_matmul` / `torch_matmul`: the matmul peak of each framework;
  * `jax_probe` / `torch_probe`: one convolution in float32 and bfloat16 (the parent runs these
    with ONEDNN_VERBOSE=1 and reads which kernels oneDNN dispatched) and the framework's setup.

`time_calls` times one measurement: the first call (compilation, warm-up) apart, then `warmup`
untimed calls, then `reps` timed ones, each synchronised, under `machine.ForeignLoad`.
Images/s = images per call / median seconds per call.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from experiments.benchmark import machine
from experiments.configs import default as default_config
from experiments.configs import paper_split1 as paper_config

IMAGE_SIZE = 128
MODEL_CONFIGS: dict[str, Callable[[], ml_collections.ConfigDict]] = {
  "paper": paper_config.get_config,
  "demo": default_config.get_config,
}


def model_config(name: str, dtype: str = "float32") -> ml_collections.ConfigDict:
  """The experiment config of `name` ('paper' or 'demo') with the model's compute dtype set."""
  config = MODEL_CONFIGS[name]()
  config.unlock()
  config.model.dtype = dtype
  return config


def bench_loss_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """BCE + tv_weight * anisotropic mean-TV, no Dice: the loss the PyTorch peer also computes."""
  return ml_collections.ConfigDict(
    {
      "tv_weight": float(config.loss.tv_weight),
      "tv_reduction": "mean",
      "tv_kind": "anisotropic",
      "dice_weight": 0.0,
    }
  )


def random_batch(batch: int, num_outputs: int, seed: int = 0) -> dict[str, np.ndarray]:
  """{"image": (B, 128, 128, 1) float32 in [0, 1), "label": (B, 128, 128, K) float32 0/1}."""
  rng = np.random.default_rng(seed)
  image = rng.random((batch, IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.float32)
  label = (rng.random((batch, IMAGE_SIZE, IMAGE_SIZE, num_outputs)) < 0.1).astype(np.float32)
  return {"image": image, "label": label}


def random_slices(n: int, seed: int = 1) -> np.ndarray:
  """(n, 128, 128) float32 network inputs for the inference measurements."""
  return np.random.default_rng(seed).random((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)


def time_calls(call: Callable[[], Any], *, warmup: int, reps: int) -> dict[str, Any]:
  """Times `call` (which must synchronise): the first call apart, `warmup` untimed, `reps` timed.

  Returns:
    {"first_call_s", "times_s" (reps floats), "median_s", "foreign_cpu_share"}.
  """
  t0 = time.perf_counter()
  call()
  first = time.perf_counter() - t0
  for _ in range(warmup):
    call()
  times = []
  with machine.ForeignLoad() as foreign:
    for _ in range(reps):
      t0 = time.perf_counter()
      call()
      times.append(time.perf_counter() - t0)
  return {
    "first_call_s": first,
    "times_s": times,
    "median_s": statistics.median(times),
    "foreign_cpu_share": foreign.share,
  }


def _rate(timing: dict[str, Any], images: int) -> dict[str, Any]:
  return {**timing, "images": images, "img_s": images / timing["median_s"]}


# ----------------------------------------------------------------------------- JAX


def _jax():
  import jax

  # Compile times must be real compilations, not persistent-cache reads.
  jax.config.update("jax_enable_compilation_cache", False)
  return jax


def _jax_setup() -> dict[str, Any]:
  jax = _jax()
  from tvunet_jax import host_memory
  from tvunet_jax.kernels import conv

  ops = conv.choose("auto")
  return {
    "conv_backend": ops.backend,
    "winograd": ops.describe() if ops.backend == "onednn" else None,
    "device_kind": jax.devices()[0].device_kind,
    "num_devices": jax.device_count(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "malloc": host_memory.status(),
  }


class JaxTrainStep:
  """The project's train step on one device: `steps.make_train_fn` as training builds it.

  Each call runs one synchronised step on a fixed random batch (state donated and replaced).
  """

  def __init__(self, model_name: str, batch: int, dtype: str):
    jax = _jax()
    from tvunet_jax import models, sharding, steps

    self.config = config = model_config(model_name, dtype)
    self.model = models.build(config.model, axis_name=sharding.DATA_AXIS)
    tx = steps.make_optimizer(config.train.learning_rate)
    self.mesh = sharding.make_mesh(1)
    init_fn = functools.partial(
      steps.create_state, model=self.model, tx=tx, image_shape=(IMAGE_SIZE, IMAGE_SIZE, 1)
    )
    rng = jax.random.PRNGKey(0)
    state_sh = sharding.state_shardings(self.mesh, jax.eval_shape(init_fn, rng))
    self.state = jax.jit(init_fn, out_shardings=state_sh)(rng)
    self.fn = steps.make_train_fn(
      model=self.model,
      tx=tx,
      loss_cfg=bench_loss_config(config),
      mesh=self.mesh,
      state_shardings=state_sh,
    )
    self.data = jax.device_put(
      random_batch(batch, config.model.num_outputs), sharding.batch_sharding(self.mesh)
    )
    self.metrics: Any = None

  def __call__(self) -> None:
    import jax

    self.state, self.metrics = self.fn(self.state, self.data)
    jax.block_until_ready((self.state, self.metrics))

  def compiled_text(self) -> str:
    """The optimized HLO of the step (traced under the mesh, as the step itself is)."""
    return self.fn.lower(self.state, self.data).compile().as_text()


def jax_train(spec: dict[str, Any]) -> dict[str, Any]:
  """A train-step measurement of spec (model, dtype, batch, warmup, steps) in JAX."""
  info = _jax_setup()
  step = JaxTrainStep(spec["model"], spec["batch"], spec["dtype"])
  out = _rate(time_calls(step, warmup=spec["warmup"], reps=spec["steps"]), spec["batch"])
  out["loss_finite"] = bool(np.isfinite(float(step.metrics["loss"])))
  return {**info, **out}


def _init_variables(model: Any) -> Any:
  """Random variables of `model` for (1, 128, 128, 1) inputs, initialised as
  `steps.create_state` does it: threefry not partitionable, which compiles several times faster
  on XLA:CPU and buys nothing for replicated parameters."""
  jax = _jax()
  import jax.numpy as jnp

  with jax.threefry_partitionable(False):
    return jax.jit(functools.partial(model.init, train=False))(
      jax.random.PRNGKey(0), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1), jnp.float32)
    )


def jax_network(model_name: str, dtype: str, batch: int):
  """(`predict.SlicePredictor` of the model with random variables, the model) on one device."""
  from tvunet_jax import models, predict, sharding

  model = models.build(model_config(model_name, dtype).model, axis_name=sharding.DATA_AXIS)
  variables = _init_variables(model)
  return predict.SlicePredictor(
    model, variables, mesh=sharding.make_mesh(1), batch_size=batch
  ), model


def jax_inference(spec: dict[str, Any]) -> dict[str, Any]:
  """Network-only inference of `slices` random slices in batches of `batch` in JAX."""
  info = _jax_setup()
  predictor, _ = jax_network(spec["model"], spec["dtype"], spec["batch"])
  x = random_slices(spec["slices"])
  out = _rate(
    time_calls(lambda: predictor(x), warmup=spec["warmup"], reps=spec["reps"]), spec["slices"]
  )
  return {**info, **out, "batch_size": predictor.batch_size}


def jax_matmul(spec: dict[str, Any]) -> dict[str, Any]:
  """GFLOP/s of an (n, n) @ (n, n) product per dtype (float32 accumulation, XLA's fast form)."""
  jax = _jax()
  import jax.numpy as jnp

  out = {}
  for dtype, n in spec["n"].items():
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    t = time_calls(
      lambda f=f, a=a, b=b: jax.block_until_ready(f(a, b)), warmup=0, reps=spec["reps"]
    )
    out[dtype] = {"n": n, "gflops": 2.0 * n**3 / t["median_s"] / 1e9, **t}
  return {"matmul": out}


def jax_tune(spec: dict[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
  """`tvunet_jax.tune` for the float32 models and batches of the plan: measures what this
  machine's Winograd table lacks, so the timed children run the kernels that measured faster.
  Returns the table path, the shape counts and this machine's decisions for those shapes."""
  from tvunet_jax import tune
  from tvunet_jax.kernels import conv, winograd

  shapes = []
  for m in spec["models"]:
    shapes += tune.model_shapes(model_config(m).model, spec["batches"], (IMAGE_SIZE, IMAGE_SIZE))
  lines: list[str] = []
  section = tune.tune(shapes, log=lambda line: (lines.append(line), log(line)))
  todo = int(lines[0].split()[1]) if lines else 0
  decided = dict(winograd.decisions(section))
  keys = list(dict.fromkeys(winograd.shape_key(*s) for s in shapes))
  return {
    "table": winograd.tuning_path(),
    "machine_key": conv.machine_key(),
    "shapes": len(keys),
    "measured": todo,
    "decisions": {k: dict(zip(winograd.PASSES, decided.get(k, winograd.NONE))) for k in keys},
    "timings_ms": {k: section.get(k) for k in keys},
  }


def jax_probe(spec: dict[str, Any]) -> dict[str, Any]:
  """One float32 and one bfloat16 3x3 conv through the model's conv path, and the JAX setup."""
  info = _jax_setup()
  jax = _jax()
  import jax.numpy as jnp

  from tvunet_jax.kernels import conv, library

  x = jnp.ones((2, 32, 32, 64))
  w = jnp.ones((3, 3, 64, 64))
  f = jax.jit(
    lambda x, w: conv.conv_general_dilated("auto")(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
  )
  for dtype in (jnp.float32, jnp.bfloat16):
    jax.block_until_ready(f(x.astype(dtype), w.astype(dtype)))
  return {
    **info,
    "jax_version": jax.__version__,
    "onednn_version": library.onednn_version(),
    "onednn_native_bf16": library.native_bf16(),
  }


# ----------------------------------------------------------------------------- PyTorch


def _torch_setup() -> dict[str, Any]:
  import torch

  from experiments import torch_unet
  from tvunet_jax import host_memory

  torch.manual_seed(0)
  return {
    "torch_version": torch.__version__,
    "threads": torch_unet.set_threads(),
    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    "memory_format": "channels_last",
    "malloc": host_memory.status(),
  }


def _to_torch(a: np.ndarray):
  """(B, H, W, C) numpy -> (B, C, H, W) tensor, channels_last in memory."""
  import torch

  return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def torch_train(spec: dict[str, Any]) -> dict[str, Any]:
  """A train-step measurement of spec in the PyTorch peer variant `spec["variant"]`."""
  info = _torch_setup()
  import torch

  from experiments import torch_unet
  from experiments.benchmark import peers

  config = model_config(spec["model"])
  net = peers.build_net(config.model)
  opt = torch_unet.make_optimizer(net, config.train.learning_rate)
  forward = peers.train_network(spec["variant"], net)
  data = random_batch(spec["batch"], config.model.num_outputs)
  x, y = _to_torch(data["image"]), _to_torch(data["label"])
  autocast = torch.bfloat16 if spec["dtype"] == "bfloat16" else None
  losses = []

  def call():
    loss = torch_unet.train_step(
      forward, opt, x, y, tv_weight=float(config.loss.tv_weight), autocast_dtype=autocast
    )
    losses.append(float(loss))

  out = _rate(time_calls(call, warmup=spec["warmup"], reps=spec["steps"]), spec["batch"])
  params, stats = torch_unet.count_params(net)
  return {
    **info,
    **out,
    "loss_finite": bool(np.isfinite(losses[-1])),
    "params": params,
    "batch_stats": stats,
  }


def torch_inference(spec: dict[str, Any]) -> dict[str, Any]:
  """Network-only inference in the PyTorch peer variant: numpy slices in, probabilities out."""
  info = _torch_setup()
  import torch

  from experiments.benchmark import peers

  config = model_config(spec["model"])
  net = peers.build_net(config.model)
  b, n = spec["batch"], spec["slices"]
  x = random_slices(n)
  autocast = torch.bfloat16 if spec["dtype"] == "bfloat16" else None
  forward = peers.inference_network(spec["variant"], net, _to_torch(x[:b, ..., None]), autocast)
  out = np.empty_like(x)

  def call():
    with peers.call_context(spec["variant"], autocast):
      for i in range(0, n, b):
        logits = forward(_to_torch(x[i : i + b, ..., None]))
        out[i : i + b] = torch.sigmoid(logits[:, 0].float()).numpy()

  return {**info, **_rate(time_calls(call, warmup=spec["warmup"], reps=spec["reps"]), n)}


def torch_matmul(spec: dict[str, Any]) -> dict[str, Any]:
  """GFLOP/s of an (n, n) @ (n, n) product per dtype in PyTorch."""
  _torch_setup()
  import torch

  out = {}
  for dtype, n in spec["n"].items():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(getattr(torch, dtype)) for _ in range(2))
    t = time_calls(lambda a=a, b=b: torch.mm(a, b), warmup=0, reps=spec["reps"])
    out[dtype] = {"n": n, "gflops": 2.0 * n**3 / t["median_s"] / 1e9, **t}
  return {"matmul": out}


def torch_probe(spec: dict[str, Any]) -> dict[str, Any]:
  """One float32 and one bf16-autocast 3x3 conv (channels_last), and the PyTorch setup."""
  info = _torch_setup()
  import torch

  x = torch.ones(2, 64, 32, 32).contiguous(memory_format=torch.channels_last)
  w = torch.ones(64, 64, 3, 3).contiguous(memory_format=torch.channels_last)
  with torch.no_grad():
    torch.nn.functional.conv2d(x, w, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
      torch.nn.functional.conv2d(x, w, padding=1)
  return {**info, "mkldnn": torch.backends.mkldnn.is_available()}


# ----------------------------------------------------------------------------- ONNX Runtime


def ort_export(spec: dict[str, Any], directory: str) -> dict[str, Any]:
  """(JAX child) Exports the model with random variables to `directory`/model.onnx for a fixed
  batch, through `tvunet_jax.export` (XLA convolutions, sigmoid of channel 0)."""
  jax = _jax()
  from tvunet_jax import export

  model_cfg = model_config(spec["model"], spec["dtype"]).model.to_dict()
  model = export.xla_model(model_cfg)
  variables = jax.device_get(_init_variables(model))
  fn = functools.partial(export.network_probabilities, model, variables, output_channel=0)
  t0 = time.perf_counter()
  data = export.export_onnx(fn, (spec["batch"], IMAGE_SIZE, IMAGE_SIZE, 1), metadata={})
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, export.ONNX_FILE)
  from tvunet_jax import atomic

  with atomic.replacing(path) as tmp, open(tmp, "wb") as f:
    f.write(data)
  return {
    "onnx_path": path,
    "export_s": time.perf_counter() - t0,
    "bytes": len(data),
    "input_name": export.INPUT_NAME,
  }


def ort_inference(spec: dict[str, Any], onnx_path: str, input_name: str) -> dict[str, Any]:
  """(ONNX Runtime child) Inference of the exported graph, numpy slices in, probabilities out."""
  import onnxruntime as ort

  from tvunet_jax import host_memory

  options = ort.SessionOptions()
  options.intra_op_num_threads = machine.usable_cpus()
  options.inter_op_num_threads = 1
  options.log_severity_level = 3  # errors only: its shape-merge warnings are harmless
  session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
  b, n = spec["batch"], spec["slices"]
  x = random_slices(n)[..., None]
  out = np.empty(x.shape[:3], np.float32)

  def call():
    for i in range(0, n, b):
      out[i : i + b] = session.run(None, {input_name: x[i : i + b]})[0]

  timing = time_calls(call, warmup=spec["warmup"], reps=spec["reps"])
  return {
    "onnxruntime_version": ort.__version__,
    "threads": options.intra_op_num_threads,
    "malloc": host_memory.status(),
    **_rate(timing, n),
  }
