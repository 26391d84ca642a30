"""`python -m tvunet_jax.phantom`: writes a phantom folder (see `tvunet_jax.phantom.medseg`)."""

from __future__ import annotations

import sys

from tvunet_jax.phantom.medseg import main

if __name__ == "__main__":
  sys.exit(main())
