"""bench/gpu_suite.py --dry: every code path of the GPU suite on CPU (Triton interpreter, tiny shapes),
as the lent GPU image would run it: without the trainer's extras (hydra, deepspeed, wandb, datasets).
Checks what the suite writes, not speed (a dry run times the interpreter)."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = """
import sys
sys.modules.update({name: None for name in ("hydra", "deepspeed", "wandb", "datasets", "omegaconf")})
import runpy
sys.argv = ["gpu_suite.py", "--dry", "--out", sys.argv[1]]
runpy.run_path("bench/gpu_suite.py", run_name="__main__")
"""


def test_gpu_suite_dry_run_writes_every_part(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "cpu-dry"
    checks = json.loads((out / "correctness.json").read_text())["result"]
    ops = {(c["backend"], c.get("op")) for c in checks}
    assert {("triton", op) for op in ("quant", "dense", "grouped", "k_grouped")} <= ops
    assert all(c["ok"] for c in checks) and any("skipped" in c for c in checks)  # cuBLAS: no GPU here
    gemm = json.loads((out / "gemm.json").read_text())["result"]
    assert {r["kind"] for r in gemm} == {"dense", "grouped"}
    assert all(r["fp8_vs_bf16"] > 0 for r in gemm)
    train = json.loads((out / "train_step.json").read_text())["result"]
    assert train["fp32"]["fp8"] == "off" and train["fp8"]["fp8"] == "auto"
    assert train["fp8"]["tokens_per_s"] > 0 and train["decode"]["decode_tokens_per_s"] > 0
    table = (out / "summary.md").read_text()
    passed, total = re.search(r"Correctness: (\d+)/(\d+) checks passed", table).groups()
    assert passed == total == str(len(checks)) and "| grouped x4 |" in table and "| fp8 |" in table
