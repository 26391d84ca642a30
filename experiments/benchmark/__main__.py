"""`python -m experiments.benchmark`: the parent command, or one measuring child (`--child`)."""

from __future__ import annotations

import sys

from tvunet_jax import host_memory

# Before any framework starts its threads (a no-op unless TVUNET_MALLOC=reuse); both frameworks'
# children apply the same policy.
host_memory.keep_freed_memory()

from experiments.benchmark import cli  # noqa: E402

if __name__ == "__main__":
  sys.exit(cli.main())
