"""bench/gpu_suite.py --dry: every code path of the GPU suite on CPU (Triton interpreter, tiny shapes),
as the lent GPU image would run it: no installed twinpipe and none of the project's dependencies beyond
torch and triton that the image lacks (or that the suite should not need). Checks what the suite writes,
not speed (a dry run times the interpreter); and that a part which fails or overruns is recorded as such
while the others still run."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("hydra", "omegaconf", "deepspeed", "wandb", "datasets", "transformers", "tokenizers", "matplotlib")

# Runs in every process of the suite (parent and parts) through PYTHONPATH: drops the editable install
# of twinpipe, makes the BLOCKED packages unimportable, and at exit appends the top-level non-stdlib
# modules the process imported to $IMPORTS_OUT.
_SITECUSTOMIZE = f"""
import atexit, importlib.abc, os, sys

def _editable(obj):
    return getattr(obj, "__module__", "").startswith("__editable___twinpipe")

class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not on the lent GPU image)")
        return None

sys.meta_path[:] = [_Blocked()] + [f for f in sys.meta_path if not _editable(f)]
sys.path_hooks[:] = [h for h in sys.path_hooks if not _editable(h)]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
sys.path_importer_cache.clear()

def _report():
    loaded = {{n.split(".")[0] for n, m in list(sys.modules.items()) if m is not None}}
    with open(os.environ["IMPORTS_OUT"], "a") as f:
        f.write(" ".join(sorted(loaded - set(sys.stdlib_module_names) - set(sys.builtin_module_names))) + "\\n")
atexit.register(_report)
"""


def test_gpu_suite_dry_run_writes_every_part_without_install_or_extras(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    imports = tmp_path / "imports.txt"
    env = {"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(tmp_path / "site"), "IMPORTS_OUT": str(imports)}
    probe = subprocess.run([sys.executable, "-c", "import twinpipe"], env=env, capture_output=True, text=True)
    assert "No module named 'twinpipe'" in probe.stderr          # the simulated image has no install
    imports.unlink()
    proc = subprocess.run([sys.executable, "bench/gpu_suite.py", "--dry", "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = [set(line.split()) for line in imports.read_text().splitlines()]
    assert len(loaded) == 4 and all({"torch", "twinpipe"} <= names for names in loaded)
    assert not set().union(*loaded) & set(BLOCKED)
    out = tmp_path / "cpu-dry"
    parts = {name: json.loads((out / f"{name}.json").read_text()) for name in ("correctness", "gemm", "train_step")}
    assert {part["status"] for part in parts.values()} == {"done"}
    checks = parts["correctness"]["result"]
    ops = {(c["backend"], c.get("op")) for c in checks}
    assert {("triton", op) for op in ("quant", "dense", "grouped", "k_grouped")} <= ops
    assert all(c["ok"] for c in checks) and any("skipped" in c for c in checks)  # cuBLAS: no GPU here
    gemm = parts["gemm"]["result"]
    assert {r["kind"] for r in gemm} == {"dense", "grouped"}
    assert all(r["fp8_vs_bf16"] > 0 and not any(k.endswith("error") for k in r) for r in gemm)
    train = parts["train_step"]["result"]
    assert train["fp32"]["fp8"] == "off" and train["fp8"]["fp8"] == "auto"
    assert train["fp8"]["tokens_per_s"] > 0 and train["decode"]["decode_tokens_per_s"] > 0
    table = (out / "summary.md").read_text()
    passed, total = re.search(r"Correctness: (\d+)/(\d+) checks passed", table).groups()
    assert passed == total == str(len(checks)) and "| grouped x4 |" in table and "| fp8 |" in table
    assert table.count("| done |") == 3


# A part's stand-in: writes a JSON with one row, then `crash` exits 3, `hang` sleeps past its deadline,
# `ok` finishes; run_parts appends --deadline, which these ignore.
_FAKE_PART = """
import json, sys, time
path, mode = sys.argv[1], sys.argv[2]
json.dump({"status": "running", "result": [{"row": 1}]}, open(path, "w"))
if mode == "crash":
    sys.exit(3)
if mode == "hang":
    time.sleep(60)
json.dump({"status": "done", "result": [{"row": 1}, {"row": 2}]}, open(path, "w"))
"""


def test_run_parts_records_a_crash_and_a_timeout_and_runs_the_next_part(tmp_path, monkeypatch):
    from twinpipe.bench import gpu_suite
    monkeypatch.setattr(gpu_suite, "PART_MAX_S", {"hang": 2.0})
    monkeypatch.setattr(gpu_suite, "PART_MIN_S", {})
    monkeypatch.setattr(gpu_suite, "STOP_MARGIN_S", 0.5)
    commands = {name: [sys.executable, "-c", _FAKE_PART, str(tmp_path / f"{name}.json"), name]
                for name in ("crash", "hang", "ok")}
    start = time.time()
    parts = gpu_suite.run_parts(commands, tmp_path, {"gpu": "fake"}, deadline=start + 30)
    assert parts["crash"]["status"] == "crashed: exit code 3" and parts["crash"]["result"] == [{"row": 1}]
    assert parts["hang"]["status"].startswith("timeout") and parts["hang"]["result"] == [{"row": 1}]
    assert parts["ok"]["status"] == "done" and len(parts["ok"]["result"]) == 2
    assert time.time() - start < 30                      # the hung part was killed at its 2 s, not waited for
    assert json.loads((tmp_path / "hang.json").read_text())["status"].startswith("timeout")
    # the suite's deadline leaves a later part too little time: it is skipped, not started
    monkeypatch.setattr(gpu_suite, "STOP_MARGIN_S", 20.0)
    late = gpu_suite.run_parts({"ok": commands["ok"]}, tmp_path, {"gpu": "fake"}, deadline=time.time() + 5)
    assert late["ok"]["status"] == "skipped: suite deadline" and late["ok"]["result"] is None


def test_summary_of_partial_results():
    """What a GPU run that went wrong leaves: a part with an error, GEMM rows with failed backends, an
    FP8 training run that raised and a decode never reached; the summary shows each, goals beside."""
    from twinpipe.bench import gpu_suite
    meta = {"gpu": "NVIDIA_H100", "dry": False, "torch": "2.11", "triton": "3.6", "seconds": 451.0, "budget_s": 450}
    parts = {
        "correctness": {"status": "crashed: exit code -11", "seconds": 80.0,
                        "result": [{"backend": "triton", "op": "dense", "out": "torch.bfloat16", "rel_err": 1e-3,
                                    "ok": True}, {"backend": "cublas", "shape": [77, 200, 320],
                                                  "error": "RuntimeError: x", "ok": False}]},
        "gemm": {"status": "timeout after 120 s", "seconds": 120.0,
                 "result": [{"kind": "dense", "M": 4096, "N": 7168, "K": 2048, "bf16_ms": 0.1, "bf16_tflops": 600.0,
                             "fp8_triton_ms": 0.05, "fp8_triton_tflops": 1200.0, "fp8_vs_bf16": 2.0,
                             "scaled_mm_error": "RuntimeError: Invalid scaling configuration"},
                            {"kind": "grouped", "experts": 8, "N": 4096, "K": 7168, "skipped": "part deadline"}]},
        "train_step": {"status": "done", "seconds": 200.0,
                       "result": {"bf16": {"tokens_per_s": 1000.0, "mfu_bf16_peak": 0.5, "peak_memory_gb": 30.0},
                                  "fp8": {"error": "RuntimeError: CUDA error"}, "decode": {"skipped": "part deadline"}}},
    }
    table = gpu_suite.summary(meta, parts)
    assert "| correctness | crashed: exit code -11 |" in table and "| gemm | timeout after 120 s |" in table
    assert "Correctness: 1/2 checks passed" in table and "FAILED" in table
    assert "2.00 met (goal 1.6)" in table and "scaled_mm_error: RuntimeError: Invalid scaling" in table
    assert "| grouped x8 | - | 4096 | 7168 |" in table and "skipped: part deadline" in table
    assert "| bf16 | 1e+03 | 0.50 met (goal 0.45) | 30 |" in table and "| fp8 | RuntimeError: CUDA error |" in table


def test_bf16_grouped_mm_arguments_pass_torch_checks():
    """The suite's BF16 baseline `torch._grouped_mm` (CUDA only) on meta tensors at the suite's grouped
    shapes: torch's meta kernel checks dtypes, the 2D x 3D layout, 16-byte strides and int32 offsets."""
    from twinpipe.bench import gpu_suite

    for e, rows, n, k in gpu_suite.shapes(dry=False)["grouped"]:
        x, w, offsets = gpu_suite.grouped_operands(e, rows, n, k, "meta")
        out = gpu_suite.bf16_grouped_mm(x, w, offsets)()
        assert out.shape == (x.shape[0], n) and out.dtype == torch.bfloat16
