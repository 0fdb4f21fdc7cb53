"""`python -m forkllm.kernels`: build the C++ CPU kernels now (make does this at install).

Skipped when FORKLLM_KERNELS=0, as an engine would not use them."""

import os
import sys
import time

from forkllm.kernels import ENV_SWITCH, env_allows_kernels, load_extension

if not env_allows_kernels(os.environ):
    print(f"forkllm: {ENV_SWITCH}=0, C++ CPU kernels not built", file=sys.stderr)
    sys.exit(0)
t0 = time.perf_counter()
if load_extension() is None:
    print("forkllm: C++ CPU kernels unavailable; forkllm will use plain PyTorch ops", file=sys.stderr)
else:
    print(f"forkllm: C++ CPU kernels ready ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
