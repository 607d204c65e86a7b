"""The FP8 Triton kernels compile for Hopper (sm_90a), without a GPU.

The other tests run the kernels in Triton's CPU interpreter, which accepts programs that compiled
Triton refuses (dot shapes and dtypes, constexpr misuse, tensor descriptors). Triton compiles ahead of
time for a target it is given, with the ptxas it ships, so this builds the cubins the lent H100/H200
would build: every autotuning config of the dense GEMM with TMA descriptors (the one with the largest
shared-memory stages), and one config of each other kernel and variant. Each cubin's shared memory must
fit a Hopper block (227 KB); a config over it would fail at launch, not here.

In a subprocess: tests/fp8/conftest.py puts this process's Triton in interpreter mode.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from twinpipe.fp8 import triton_gemm as tg, triton_quant as tq

HOPPER_SHARED_BYTES = 227 * 1024
F8, F32 = "*fp8e4nv", "*fp32"
GEMM = {"a_ptr": F8, "b_ptr": F8, "as_ptr": F32, "bs_ptr": F32, "offsets_ptr": "*i32"}

def build(fn, types, constexprs, num_warps, num_stages):
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    assert kernel.metadata.shared <= HOPPER_SHARED_BYTES, (fn.__name__, constexprs, kernel.metadata.shared)
    return kernel

def tiles(config):
    return dict(config.kwargs, BLOCK_K=128), config.num_warps, config.num_stages

for config in tg._CONFIGS:
    meta, warps, stages = tiles(config)
    kernel = build(tg._fp8_gemm_kernel, dict(GEMM, c_ptr="*bf16"), dict(meta, B_PER_ROW=False, USE_TMA=True),
                   warps, stages)
    assert "wgmma" in kernel.asm["ptx"] and "cp.async.bulk.tensor" in kernel.asm["ptx"], config
meta, warps, stages = tiles(tg._CONFIGS[0])
build(tg._fp8_gemm_kernel, dict(GEMM, c_ptr="*fp32"), dict(meta, B_PER_ROW=True, USE_TMA=False), warps, stages)
build(tg._fp8_grouped_gemm_kernel, dict(GEMM, c_ptr="*bf16"), meta, warps, stages)
build(tg._fp8_k_grouped_gemm_kernel, dict(GEMM, c_ptr="*fp32"), meta, warps, stages)
quant = {"x_ptr": "*bf16", "w_ptr": "*bf16", "q_ptr": F8, "s_ptr": F32, "amax_floor": "fp32"}
build(tq._act_quant_kernel, quant, {"BLOCK": 128, "ROWS": 8, "POW2": True, "EXACT_CAST": False}, 4, 3)
build(tq._weight_quant_kernel, quant, {"BLOCK": 128, "POW2": False, "EXACT_CAST": False}, 8, 3)
print("compiled")
"""


def test_fp8_kernels_compile_for_sm90():
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "",
           "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
