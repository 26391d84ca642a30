"""experiments/benchmark.py and its PyTorch peer: parity with the Flax model and the result format.

No timed run here: the PyTorch network has the Flax network's parameter count, its loss and TV the
numbers of `tvunet_jax.losses`, the analytic FLOP count matches a hand count, and the JSON records
carry the fields the issue asks for.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import benchmark
from tvunet_jax import losses
from tvunet_jax import models
from tvunet_jax.kernels import conv

_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse avx2 fma avx512f avx512_bf16 amx_tile amx_bf16
processor\t: 1
model name\t: something else
flags\t\t: fpu
"""


def _flax_counts(base, depth, num_outputs):
  model = models.UNet(base=base, depth=depth, num_outputs=num_outputs)
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)),
                                        train=False))
  return models.count_params(v["params"]), models.count_params(v["batch_stats"]), v["params"]


@pytest.mark.parametrize("name", ["paper", "demo"])
def test_torch_peer_has_the_flax_parameter_count(name):
  torch = pytest.importorskip("torch")
  from experiments import torch_unet  # pylint: disable=g-import-not-at-top
  m = benchmark.model_config(name).model
  flax_params, flax_stats, _ = _flax_counts(m.base, m.depth, m.num_outputs)
  with torch.device("meta"):  # shapes only: the paper net's 31M weights are never allocated
    net = torch_unet.TorchUNet(m.base, m.depth, m.dropout, m.num_outputs)
  assert torch_unet.count_params(net) == (flax_params, flax_stats)


def test_torch_peer_matches_the_paper_preset():
  """The authors' 2-channel head gives Keras' 34,535,810 total variables (models.py docstring)."""
  torch = pytest.importorskip("torch")
  from experiments import torch_unet  # pylint: disable=g-import-not-at-top
  with torch.device("meta"):
    net = torch_unet.TorchUNet(base=64, depth=4, num_outputs=2)
  assert sum(torch_unet.count_params(net)) == 34_535_810


def test_torch_tv_and_loss_equal_the_jax_ones():
  torch = pytest.importorskip("torch")
  from experiments import torch_unet  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7, 2)).astype(np.float32)  # (B, H, W, C)
  labels = (rng.random((2, 5, 7, 2)) < 0.3).astype(np.float32)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  probs = 1 / (1 + np.exp(-logits))

  # TV value and gradient with respect to the probabilities.
  p_t = nchw(probs).requires_grad_(True)
  tv_t = torch_unet.anisotropic_tv(p_t)
  tv_t.backward()
  tv_j, g_j = jax.value_and_grad(lambda p: losses.anisotropic_tv(p, "mean"))(probs)
  np.testing.assert_allclose(float(tv_t.detach()), float(tv_j), rtol=1e-6)
  np.testing.assert_allclose(p_t.grad.numpy().transpose(0, 2, 3, 1), g_j, rtol=1e-5, atol=1e-8)

  # The whole loss against losses.total_loss with no Dice term.
  loss_t = torch_unet.tv_bce_loss(nchw(logits), nchw(labels), tv_weight=0.7)
  loss_j, _ = losses.total_loss(logits, labels, tv_weight=0.7, tv_reduction="mean",
                                dice_weight=0.0)
  np.testing.assert_allclose(float(loss_t), float(loss_j), rtol=1e-6)


def test_torch_tv_hand_value():
  torch = pytest.importorskip("torch")
  from experiments import torch_unet  # pylint: disable=g-import-not-at-top
  p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])[None, None]
  # Vertical |differences|: rows 0->1: 0,1,0; rows 1->2: 1,1,1 -> mean 4/6.
  # Horizontal: row 0: 1,1; row 1: 0,0; row 2: 0,0 -> mean 2/6.
  assert float(torch_unet.anisotropic_tv(p)) == pytest.approx(1.0)


def test_torch_forward_shape_and_bad_input():
  torch = pytest.importorskip("torch")
  from experiments import torch_unet  # pylint: disable=g-import-not-at-top
  net = torch_unet.TorchUNet(base=2, depth=2, num_outputs=3).to(memory_format=torch.channels_last)
  x = torch.zeros(2, 1, 16, 12).contiguous(memory_format=torch.channels_last)
  assert tuple(net(x).shape) == (2, 3, 16, 12)
  with pytest.raises(ValueError, match="divisible by 4"):
    net(torch.zeros(1, 1, 10, 12))


def test_unet_forward_flops_hand_count():
  _, _, params = _flax_counts(base=2, depth=1, num_outputs=1)
  # 4x4 input; 2 FLOPs per multiply-add; kernel (kh, kw, Cin, Cout) at the module's resolution.
  hand = (2 * 16 * 9 * 1 * 2 + 2 * 16 * 9 * 2 * 2  # down_0 at 4x4
          + 2 * 4 * 9 * 2 * 4 + 2 * 4 * 9 * 4 * 4  # bottleneck at 2x2
          + 2 * 4 * 9 * 4 * 2  # upsample_0: 9 taps per input pixel of the 2x2 level
          + 2 * 16 * 9 * 4 * 2 + 2 * 16 * 9 * 2 * 2  # up_0 at 4x4 (input: 2 + 2 channels)
          + 2 * 16 * 1 * 2 * 1)  # head
  assert hand == 7552
  assert benchmark.unet_forward_flops(params, (4, 4), depth=1) == hand
  with pytest.raises(ValueError, match="unknown module 'extra'"):
    benchmark.unet_forward_flops({**params, "extra": {}}, (4, 4), depth=1)


def test_unet_forward_flops_equals_a_torch_hook_count():
  """Same count from the PyTorch peer's layers as they run (independent of the Flax tree)."""
  torch = pytest.importorskip("torch")
  from experiments import torch_unet  # pylint: disable=g-import-not-at-top
  net = torch_unet.TorchUNet(base=4, depth=3, num_outputs=1).eval()
  counted = []

  def hook(module, inputs, output):
    kh, kw = module.kernel_size
    cin, cout = module.in_channels, module.out_channels
    # A conv costs per output pixel; a transposed conv per input pixel (all taps once).
    h, w = (output if isinstance(module, torch.nn.Conv2d) else inputs[0]).shape[2:]
    counted.append(2 * h * w * kh * kw * cin * cout)

  for mod in net.modules():
    if isinstance(mod, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
      mod.register_forward_hook(hook)
  with torch.no_grad():
    net(torch.zeros(1, 1, 32, 24))
  _, _, params = _flax_counts(base=4, depth=3, num_outputs=1)
  assert benchmark.unet_forward_flops(params, (32, 24), depth=3) == sum(counted)


def test_cpu_info_reads_model_and_isa_flags():
  info = benchmark.cpu_info(_CPUINFO)
  assert info["cpu_model"] == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
  isa = info["isa_flags"]
  assert isa["avx512f"] and isa["avx512_bf16"] and isa["amx_tile"] and isa["avx2"]
  assert not isa["avx512_vnni"] and not isa["amx_int8"]
  assert set(isa) == set(benchmark.ISA_FLAGS) and info["cores"] >= 1


def test_plan_quick_and_bad_names():
  plan = benchmark.make_plan(True)
  # The smoke run adds the oneDNN variant exactly when the kernels are built.
  quick_variants = ["default", "onednn"] if conv.available() else ["default"]
  assert (plan.models, plan.batches, plan.warmup, plan.steps, plan.variants) == (
      ["demo"], [4], 1, 3, quick_variants)
  assert not plan.conv_ops
  full = benchmark.make_plan(False)
  assert full.models == ["paper", "demo"] and full.batches == [8, 16] and full.steps >= 5
  assert full.variants == ["default", "ynn", "onednn", "onednn_ynn", "onednn_direct"]
  assert full.volume_size == 512
  assert full.volume_slices == 100 and full.conv_ops  # issue 8: a 100-slice volume
  assert {benchmark.CONV_BACKENDS[v] for v in full.variants} == {"xla", "onednn"}
  with pytest.raises(ValueError, match=r"unknown models \['resnet'\]"):
    benchmark.make_plan(True, models=["resnet"])
  with pytest.raises(ValueError, match="steps must be >= 1"):
    benchmark.make_plan(True, steps=0)


def test_child_xla_flags(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_dump_to=/x")
  assert benchmark._child_xla_flags("default") == "--xla_dump_to=/x"
  assert benchmark._child_xla_flags("ynn") == (
      "--xla_dump_to=/x --xla_cpu_experimental_ynn_fusion_type=individual_dot,eltwise,reduce")


def _fake_variant(name, jax_img_s, torch_img_s, matmul):
  train_rec = {"model": "paper", "dtype": "float32", "batch": 8, "params": 100,
               "jax_img_s": jax_img_s, "jax_gflops": jax_img_s * 80.0,
               "model_gflop_per_img": 60.0, "xla_gflop_per_img": 80.0, "jax_trace_s": 0.5,
               "jax_compile_s": 2.5, "jax_tv_share": 0.01, "load_avg": [0.5, 0.5, 0.5],
               "torch_params": 100, "torch_img_s": torch_img_s, "torch_tv_share": 0.05}
  return {"variant": name, "xla_flags": benchmark.XLA_VARIANTS[name], "device_kind": "cpu",
          "torch": {"threads": 2}, "matmul_gflops": {"float32": matmul}, "train": [train_rec],
          "inference": [{"model": "paper", "volume_shape": [512, 512, 24], "batch_size": 8,
                         "slices_s_volume": 3.0, "slices_s_network": 4.0, "first_call_s": 9.0}],
          "peak_rss_mb": 1000.0}


def _fake_results(env, variants):
  """A results dict of `variants` (all successful) as `main` writes it."""
  return {
      "command": "python -m experiments.benchmark", "mode": "full",
      "started_utc": "2026-01-01T00:00:00+00:00", "duration_s": 900.0, "environment": env,
      "load_avg_end": [0.4, 0.4, 0.4], "device_kind": "cpu",
      "plan": {"steps": 5, "warmup": 1, "matmul_n": 4096},
      "matmul_gflops": benchmark.peak_gflops(variants),
      "records": benchmark.make_records(env, variants), "inference": [],
      "input_pipeline": {"batch": 8, "dataset_slices": 90, "slices_s": {"plain": 400.0}},
      "torch": {"threads": 2}, "peak_rss_mb": {"parent": 800.0}, "errors": [],
  }


def test_records_and_markdown_on_a_fake_result():
  env = {"cpu_model": "Fake CPU", "cores": 2, "isa_flags": {f: False for f in benchmark.ISA_FLAGS},
         "commit": "abc", "dirty": False, "versions": {"jax": "0.10.2"},
         "load_avg_start": [0.1, 0.2, 0.3]}
  variants = [_fake_variant("default", 1.0, 2.5, {"jax": 200.0, "torch": 250.0}),
              _fake_variant("ynn", 2.0, 2.4, {"jax": 180.0, "torch": 240.0}),
              {"variant": "broken", "error": "exit code 1"}]
  records = benchmark.make_records(env, variants)
  assert len(records) == 2  # the failed variant adds none
  for r in records:
    assert set(benchmark.RECORD_FIELDS) <= set(r)
    assert r["conv_backend"] == "xla" and r["cpu_model"] == "Fake CPU"
    assert r["peak_gflops"] == 250.0  # the max of all matmuls of the run
    assert r["params_match"] is True
  default, ynn = records
  assert default["xla_variant"] == "default" and ynn["xla_variant"] == "ynn"
  # Each record's ratio uses the PyTorch steps timed beside its own JAX steps.
  assert default["ratio"] == pytest.approx(1.0 / 2.5) and ynn["ratio"] == pytest.approx(2.0 / 2.4)
  assert default["jax_mfu"] == pytest.approx(80.0 / 250.0)
  assert ynn["jax_mfu_model"] == pytest.approx(2.0 * 60.0 / 250.0)
  assert ynn["torch_mfu_model"] == pytest.approx(2.4 * 60.0 / 250.0)

  # Without PyTorch the JAX numbers stay and the comparison fields are empty.
  alone = _fake_variant("default", 1.0, None, {"jax": 200.0})
  rec = benchmark.make_records(env, [alone])[0]
  assert rec["torch_img_s"] is None and rec["ratio"] is None and rec["params_match"] is None
  assert rec["peak_gflops"] == 200.0

  results = {
      "command": "python -m experiments.benchmark", "mode": "full",
      "started_utc": "2026-01-01T00:00:00+00:00", "duration_s": 900.0, "environment": env,
      "load_avg_end": [0.4, 0.4, 0.4], "device_kind": "cpu",
      "plan": {"steps": 5, "warmup": 1, "matmul_n": 4096},
      "matmul_gflops": benchmark.peak_gflops(variants[:2]), "records": records,
      "inference": [{**r, "xla_variant": v["variant"]} for v in variants[:2]
                    for r in v["inference"]],
      "input_pipeline": {"batch": 8, "dataset_slices": 90, "slices_s": {"plain": 400.0}},
      "torch": {"threads": 2}, "peak_rss_mb": {"parent": 800.0}, "errors": ["variant broken"],
  }
  assert results["matmul_gflops"]["float32"] == {
      "jax_default": 200.0, "torch_default": 250.0, "jax_ynn": 180.0, "torch_ynn": 240.0,
      "peak": 250.0}
  json.dumps(results)  # every field is JSON-able
  md = benchmark.to_markdown(results)
  assert "| paper | float32 | 8 | ynn | xla | 2.00 | 3.0 | 2.40 | 0.83 |" in md
  assert "| float32 | 200.0 | 250.0 | 180.0 | 240.0 | 250.0 |" in md
  assert "| paper | default | 512x512x24 | 8 | 3.00 | 4.00 | - | - | 9.0 |" in md
  assert "Fake CPU" in md and "## Errors" in md and "900 s" in md


def test_busy_cpu_seconds_and_foreign_load():
  # user nice system idle iowait irq softirq steal guest guest_nice, in ticks of 1/100 s.
  stat = "cpu  100 20 30 1000 50 5 5 40 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n"
  assert benchmark.busy_cpu_seconds(stat, 100) == pytest.approx((100 + 20 + 30 + 5 + 5 + 40) / 100)
  with pytest.raises(ValueError, match="not the 'cpu' total"):
    benchmark.busy_cpu_seconds("intr 1 2 3 4 5 6 7 8 9\n", 100)
  with benchmark.ForeignLoad() as foreign:
    sum(i * i for i in range(200_000))  # some CPU time of our own
  assert foreign.share is None or 0.0 <= foreign.share <= 1.0


def test_md_path():
  assert benchmark._md_path("out/results.json") == "out/results.md"
  assert benchmark._md_path("out/results") == "out/results.md"
  assert math.isnan(benchmark._xla_flops(_FakeCompiled()))


class _FakeCompiled:

  def cost_analysis(self):
    return [{}]


def test_torch_batchnorm_follows_keras_or_the_config():
  torch = pytest.importorskip("torch")
  from experiments import torch_unet  # pylint: disable=g-import-not-at-top
  bns = lambda net: [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  keras = torch_unet.TorchUNet(base=2, depth=1)
  assert len(bns(keras)) == 6  # two per block: down_0, bottleneck, up_0
  assert all(m.eps == 1e-3 and m.momentum == pytest.approx(0.01) for m in bns(keras))
  demo = benchmark.model_config("demo").model
  net = torch_unet.TorchUNet(base=2, depth=1, bn_momentum=1.0 - demo.bn_momentum)
  assert all(m.momentum == pytest.approx(1.0 - demo.bn_momentum) for m in bns(net))


def test_onednn_records_and_conv_table():
  """A oneDNN variant's record says so, has no XLA-count MFU (custom calls are invisible to
  XLA's cost analysis), and the per-layer conv table lists every distinct paper-model conv."""
  env = {"cpu_model": "Fake CPU", "cores": 2, "isa_flags": {f: False for f in benchmark.ISA_FLAGS},
         "commit": "abc", "dirty": False, "versions": {"jax": "0.10.2"},
         "load_avg_start": [0.1, 0.2, 0.3]}
  v = {**_fake_variant("onednn", 3.0, 2.5, {"jax": 200.0}), "conv_backend": "onednn",
       "winograd": "auto"}
  direct = {**_fake_variant("onednn_direct", 2.0, 2.5, {"jax": 200.0}), "conv_backend": "onednn",
            "winograd": "off"}
  rec, rec_direct = benchmark.make_records(env, [v, direct])
  assert rec["conv_backend"] == "onednn" and rec["jax_mfu"] is None
  assert rec["jax_mfu_model"] == pytest.approx(3.0 * 60.0 / 200.0)
  assert (rec["winograd"], rec_direct["winograd"]) == ("auto", "off")
  rows = [line for line in benchmark.to_markdown(_fake_results(env, [v, direct])).splitlines()
          if line.startswith("| paper | float32 | 8 |")]
  assert "| onednn + winograd auto |" in rows[0] and "| onednn |" in rows[1]
  assert "Winograd kernels run" in benchmark.to_markdown(_fake_results(env, [v, direct]))
  used = {"winograd_ms": {"forward": 1.0, "input_grad": 2.0, "weight_grad": 3.25},
          "winograd_in_model": True}
  assert benchmark._winograd_cell(used) == "1.0 / 2.0 / 3.2 (the model's)"
  assert benchmark._winograd_cell({**used, "winograd_in_model": False}) == "1.0 / 2.0 / 3.2"
  assert benchmark._winograd_cell({}) == "-"
  layers = benchmark.conv_layers(batch=8)
  names = [n for layer in layers for n in layer["layers"]]
  # 2 convs per block x (4 down + bottleneck + 4 up) + 4 up-samplings + head, each once.
  assert len(names) == len(set(names)) == 23
  by_name = {n: layer for layer in layers for n in layer["layers"]}
  assert by_name["bottleneck.conv_1"]["x"] == [8, 8, 8, 1024]
  assert by_name["upsample_0"] == {"layers": ["upsample_0"], "x": [8, 64, 64, 128],
                                   "w": [3, 3, 128, 64], "pads": [0, 1, 0, 1],
                                   "transposed": True}
  assert by_name["up_3.conv_0"]["x"] == [8, 16, 16, 1024]
  assert by_name["head"]["w"] == [1, 1, 64, 2] and by_name["head"]["pads"] == [0, 0, 0, 0]
  assert by_name["down_0.conv_1"] is by_name["up_0.conv_1"]  # same shape: listed once


@pytest.mark.parametrize("backend", ["xla", "onednn"])
def test_conv_op_table_times_each_layer_in_its_backend_form(backend, monkeypatch):
  """The per-layer table runs (batch 1, two layers: a 3x3 conv and an up-sampling) and times
  the up-sampling as the backend runs it in the model: oneDNN's transposed conv (with its kernel
  names) or XLA's sub-pixel 2x2 conv."""
  if backend == "onednn" and not conv.available():
    pytest.skip("oneDNN kernel library not built")
  layers = [l for l in benchmark.conv_layers(batch=1)
            if l["layers"][0] in ("down_3.conv_0", "upsample_3")]
  monkeypatch.setattr(benchmark, "conv_layers", lambda batch=8: layers)
  rows = benchmark.conv_op_table(backend, with_torch=False, batch=1)
  forms = {r["layers"][0]: r["form"] for r in rows}
  assert forms == {"down_3.conv_0": "conv",
                   "upsample_3": ("transposed conv, stride 2" if backend == "onednn"
                                  else "sub-pixel 2x2 conv")}
  for r in rows:
    assert set(r["jax_ms"]) == {"forward", "input_grad", "weight_grad"}
    assert all(ms > 0 for ms in r["jax_ms"].values())
    assert ("onednn_impl" in r) == (backend == "onednn")
    # The Winograd kernels are timed beside oneDNN's on the 3x3 conv only; at batch 1 a 16x16
    # image has 16 tiles, too few for the model to use them.
    wino = backend == "onednn" and r["layers"][0] == "down_3.conv_0"
    assert ("winograd_ms" in r) == wino
    if wino:
      assert all(ms > 0 for ms in r["winograd_ms"].values()) and r["winograd_in_model"] is False
