"""Native CPU kernels called from `jax.jit` through the XLA FFI: oneDNN convolutions and
transposed convolutions.

`onednn_conv.cc` (the C++ handlers), `build.py` (compiles them: `python -m tvunet_jax.kernels.build`)
and `conv.py` (the JAX side: loading, dispatch between oneDNN and XLA, the `custom_vjp`, sharding).
"""
