"""Native CPU kernels called from `jax.jit` through the XLA FFI: oneDNN convolutions and
transposed convolutions, and Winograd F(4x4, 3x3) convolutions.

`onednn_conv.cc` and `winograd.cc` (the C++ handlers), `build.py` (compiles them:
`python -m tvunet_jax.kernels.build`) and `conv.py` (the JAX side: loading, dispatch between
oneDNN, Winograd and XLA, the `custom_vjp`, sharding).
"""
