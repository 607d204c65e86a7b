"""FP8 tests run the Triton kernels in Triton's CPU interpreter.

TRITON_INTERPRET is read when Triton decorates a function, including its own `tl.*` library at
`import triton`. Nothing in twinpipe imports Triton before the `triton` backend is first used, so
setting it here, while tests are collected, is early enough; if something did import Triton earlier,
say so instead of failing later with a confusing interpreter error.
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

if "triton" in sys.modules:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.max, InterpretedFunction):
        raise RuntimeError("tests/fp8: Triton was imported before tests/fp8/conftest.py could set "
                           "TRITON_INTERPRET=1; run pytest with TRITON_INTERPRET=1 in the environment")
