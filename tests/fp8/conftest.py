"""FP8 tests run the Triton kernels in Triton's CPU interpreter.

TRITON_INTERPRET is read when a kernel is decorated; twinpipe.fp8 imports its Triton modules lazily
(only when the `triton` backend is first used), so setting it here, before any test runs, is enough.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
