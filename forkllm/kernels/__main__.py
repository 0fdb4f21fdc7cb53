"""`python -m forkllm.kernels`: build the C++ CPU kernels now (make does this at install)."""

import sys
import time

from forkllm.kernels import ops

t0 = time.perf_counter()
mod = ops()
if mod is None:
    print("forkllm: C++ CPU kernels unavailable; forkllm will use plain PyTorch ops", file=sys.stderr)
else:
    print(f"forkllm: C++ CPU kernels ready ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
