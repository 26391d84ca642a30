"""tvunet_jax: TV-UNet lung-infection segmentation for chest CT in JAX/Flax.

Modules are named by role (see README.md): `models`, `losses`, `metrics` hold the science;
`phantom`, `input_pipeline` the data; `sharding`, `checkpointing`, `train`, `main` the recipe;
`predict`, `evaluate` the use of a trained model.
"""

__version__ = "0.1.0"
