"""bench/fp8_gemm.py runs on the GPU box, which lacks the trainer's extras: it must import without them
and, on a machine without CUDA, refuse with a message instead of a traceback."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = """
import sys
sys.modules.update({name: None for name in ("hydra", "deepspeed", "wandb", "datasets", "omegaconf")})
import twinpipe.fp8.triton_gemm, twinpipe.fp8.triton_quant, twinpipe.fp8.cublas  # what the bench uses
import runpy
sys.argv = ["fp8_gemm.py", "--quick"]
runpy.run_path("bench/fp8_gemm.py", run_name="__main__")
"""


def test_fp8_gemm_bench_imports_without_trainer_extras_and_refuses_on_cpu():
    env = {"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "needs a CUDA device" in proc.stderr
    assert "Traceback" not in proc.stderr
