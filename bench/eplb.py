"""EPLB benchmark: GPU balance (max / mean GPU load) and planning time of expert placement plans.

Plans compared on the same loads:
- `none`: no EPLB, experts in id order, E / G per GPU, no replicas;
- `loop_ref`: DeepSeek's policy as straightforward per-layer Python loops (written here, checked to give
  the same plan as ours with default options);
- `ours`: `twinpipe.parallel.eplb.rebalance_experts` with default options (the reference's plan,
  vectorized), and with `avoid_colocation`, `refine`, and both.
Then a drift simulation compares re-planning from scratch with re-planning with `current_phy2log`
(moved experts per re-plan), and real routing counts are planned when given (`--counts FILE`: a
metrics.jsonl written by the trainer, or a JSON object or list of objects, with per-layer expert loads
under `expert_load`; all records are summed) or made (`--route-model tiny`: the freshly initialised
model's router on the embedded corpus, bytes as token ids).

    python bench/eplb.py [--seeds 5] [--counts run/metrics.jsonl] [--route-model tiny]

Prints a table and writes bench/results/eplb.json. Runs on one CPU thread by default (`--threads`).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from twinpipe.parallel.eplb import rebalance_experts
from twinpipe.parallel.eplb.planner import balancedness, colocated_replicas
from twinpipe.parallel.eplb.relabel import moved_experts

OPTIONS = {
    "ours": {},
    "ours+avoid": {"avoid_colocation": True},
    "ours+refine": {"refine": True},
    "ours+avoid+refine": {"avoid_colocation": True, "refine": True},
}


# ----------------------------------------------------------------------------- loop reference


def _loop_pack(weights: list, num_packs: int) -> tuple[list, list]:
    n = len(weights)
    per_pack = n // num_packs
    if per_pack == 1:
        return list(range(n)), [0] * n
    load, count = [np.float32(0)] * num_packs, [0] * num_packs
    pack, rank = [0] * n, [0] * n
    for item in sorted(range(n), key=lambda i: -weights[i]):
        best = min((p for p in range(num_packs) if count[p] < per_pack), key=load.__getitem__)
        pack[item], rank[item] = best, count[best]
        count[best] += 1
        load[best] = np.float32(load[best] + weights[item])
    return pack, rank


def loop_reference(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                   num_gpus: int) -> torch.Tensor:
    """phy2log [L, R] by DeepSeek's hierarchical / global policy, one layer and one item at a time
    (fp32 scalar arithmetic, as the reference does on fp32 tensors)."""
    num_layers, num_experts = weight.shape
    if num_groups % num_nodes != 0:
        num_groups, num_nodes = 1, 1
    group_size = num_experts // num_groups
    slots_node, slots_gpu = num_replicas // num_nodes, num_replicas // num_gpus
    phy2log = torch.empty(num_layers, num_replicas, dtype=torch.int64)
    group_loads = weight.float().view(num_layers, num_groups, group_size).sum(-1).numpy()
    weights = weight.float().numpy()
    for layer in range(num_layers):
        w = list(weights[layer])
        group_node, group_rank = _loop_pack(list(group_loads[layer]), num_nodes)
        for node in range(num_nodes):
            groups = sorted((g for g in range(num_groups) if group_node[g] == node),
                            key=group_rank.__getitem__)
            experts = [g * group_size + i for g in groups for i in range(group_size)]
            count = [np.float32(1)] * len(experts)
            local = list(range(len(experts)))
            for _ in range(len(experts), slots_node):
                best = max(range(len(experts)), key=lambda x: w[experts[x]] / count[x])
                local.append(best)
                count[best] += 1
            gpu, pos = _loop_pack([w[experts[x]] / count[x] for x in local], num_gpus // num_nodes)
            for r, x in enumerate(local):
                phy2log[layer, node * slots_node + gpu[r] * slots_gpu + pos[r]] = experts[x]
    return phy2log


# ----------------------------------------------------------------------------- loads


def zipf_loads(num_layers: int, num_experts: int, exponent: float, seed: int) -> torch.Tensor:
    """Token counts ~ 1 / rank**exponent with the ranking shuffled per layer: [L, E] fp32."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.rand(num_layers, num_experts, generator=g).argsort(-1).float() + 1
    return (1e6 / ranks**exponent).round()


def read_counts(path: Path) -> torch.Tensor:
    """Sum of `expert_load` ([L][E]) over all records of a JSON / JSON-lines file."""
    text = path.read_text()
    try:
        records = json.loads(text)
        records = records if isinstance(records, list) else [records]
    except json.JSONDecodeError:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    loads = [torch.tensor(r["expert_load"], dtype=torch.float64) for r in records if "expert_load" in r]
    if not loads:
        raise ValueError(f"--counts {path}: no record has the key 'expert_load'")
    return torch.stack(loads).sum(0)


def route_counts(preset: str, num_tokens: int, seed: int) -> tuple[torch.Tensor, dict]:
    """Expert counts of a freshly initialised model's router on the embedded corpus (bytes as ids)."""
    from twinpipe.data.corpus import embedded_corpus_files
    from twinpipe.model import ModelConfig, Transformer

    torch.manual_seed(seed)
    config = ModelConfig.preset(preset)
    model = Transformer(config).eval()
    data = bytearray()
    for path in embedded_corpus_files("heldout"):
        data += path.read_bytes()
        if len(data) >= num_tokens:
            break
    tokens = torch.tensor(list(data[:num_tokens]), dtype=torch.int64) % config.vocab_size
    seq = 256
    tokens = tokens[: len(tokens) // seq * seq].view(-1, seq)  # [B, T]
    with torch.no_grad():
        counts = sum(model.forward_train(batch).expert_counts for batch in tokens.split(8))
    return counts.double(), {"preset": preset, "tokens": tokens.numel(), "n_group": config.n_group}


# ----------------------------------------------------------------------------- measurements


def plan_quality(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                 num_gpus: int) -> dict:
    num_layers, num_experts = weight.shape
    out = {}
    if num_experts % num_gpus == 0:
        static = torch.arange(num_experts).expand(num_layers, -1)
        out["none"] = {"balancedness": balancedness(weight, static, num_gpus).mean().item()}
    reference = loop_reference(weight, num_replicas, num_groups, num_nodes, num_gpus)
    plans = {"loop_ref": reference}
    for name, options in OPTIONS.items():
        plans[name] = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus,
                                        **options)[0]
    # GPUs an expert's replicas can spread over: its node's (hierarchical policy) or all (global).
    reach = num_gpus // num_nodes if num_groups % num_nodes == 0 else num_gpus
    for name, phy2log in plans.items():
        ratio = balancedness(weight, phy2log, num_gpus)
        shared = colocated_replicas(phy2log, num_gpus)
        logcnt = torch.zeros(num_layers, num_experts, dtype=torch.int64).scatter_add_(
            -1, phy2log, torch.ones_like(phy2log))
        out[name] = {"balancedness": ratio.mean().item(), "worst_layer": ratio.max().item(),
                     "colocated": int(shared.sum()), "layers_with_colocated": int((shared > 0).sum()),
                     "colocated_unavoidable": int((logcnt - reach).clamp(min=0).sum())}
    out["ours_equals_loop_ref"] = bool(torch.equal(plans["ours"], reference))
    return out


def timed(fn, repeats: int) -> dict:
    """Best of `repeats` runs, in ms: wall time and this process's CPU time (others share this
    machine; the minimum is the least noisy and CPU time leaves out waiting for a core)."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - start_wall)
        cpu = min(cpu, time.process_time() - start_cpu)
    return {"wall": wall * 1e3, "cpu": cpu * 1e3}


DRIFT_MODES = {"fresh": {}, "keep": {"keep_tolerance": None}, "keep_tol0.02": {"keep_tolerance": 0.02},
               "keep_tol0.05": {"keep_tolerance": 0.05}}


def drift(weight: torch.Tensor, layout: tuple, steps: int, sigma: float, seed: int,
          options: dict) -> dict:
    """Re-plan `steps` times while loads drift (multiplicative log-normal noise, the same draws for
    every mode): from scratch (`fresh`), relabelled to the current placement (`keep`), and with
    replicas kept in place within a load tolerance (`keep_tol*`). Moved = replicas landing on a GPU
    that lacked that expert."""
    num_gpus = layout[3]
    result = {}
    for mode, extra in DRIFT_MODES.items():
        g = torch.Generator().manual_seed(seed)
        w = weight.clone()
        current = rebalance_experts(w, *layout, **options)[0]
        moved, ratio = [], []
        for _ in range(steps):
            w = w * torch.exp(sigma * torch.randn(w.shape, generator=g))
            keep = {} if mode == "fresh" else {"current_phy2log": current, **extra}
            plan = rebalance_experts(w, *layout, **options, **keep)[0]
            moved.append(moved_experts(current, plan, num_gpus).double().mean().item())
            ratio.append(balancedness(w, plan, num_gpus).mean().item())
            current = plan
        result[mode] = {"moved_per_layer": sum(moved) / steps,
                        "moved_fraction": sum(moved) / steps / layout[0],
                        "balancedness": sum(ratio) / steps}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=61)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--exponents", type=float, nargs="+", default=[0.6, 1.0, 1.2])
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats (best is reported)")
    parser.add_argument("--drift-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--counts", type=Path, help="metrics.jsonl / JSON with per-layer `expert_load`")
    parser.add_argument("--route-model", help="model preset whose router makes counts (e.g. tiny)")
    parser.add_argument("--route-tokens", type=int, default=65536)
    parser.add_argument("--counts-layout", type=int, nargs=4, default=[12, 4, 2, 4],
                        metavar=("REPLICAS", "GROUPS", "NODES", "GPUS"),
                        help="EP layout for the real counts (default: 8 experts -> 4 GPUs, 3 slots each)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "eplb.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # (name, replicas, groups, nodes, gpus): DeepSeek-V3's 256 experts in 8 groups on 8 nodes x 8 GPUs,
    # hierarchical (8 groups on 8 nodes) and global (groups=1 -> no group constraint).
    # Also 8 groups on 4 nodes of 16 GPUs (2 groups per node) and 32 GPUs on 4 nodes.
    layouts = [
        ("hier_320r_64g_8n", 320, 8, 8, 64), ("hier_384r_64g_8n", 384, 8, 8, 64),
        ("global_320r_64g", 320, 1, 8, 64), ("global_384r_64g", 384, 1, 8, 64),
        ("hier_320r_64g_4n", 320, 8, 4, 64), ("hier_288r_32g_4n", 288, 8, 4, 32),
    ]
    report = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
              "torch": torch.__version__, "layers": args.layers, "experts": args.experts,
              "synthetic": {}, "timing_ms": {}, "drift": {}}
    print(f"balancedness = max / mean GPU load, mean over {args.layers} layers and {args.seeds} seeds")
    for exponent in args.exponents:
        for name, *layout in layouts:
            runs = [plan_quality(zipf_loads(args.layers, args.experts, exponent, seed), *layout)
                    for seed in range(args.seeds)]
            summary = {key: {k: sum(r[key][k] for r in runs) / len(runs) for k in runs[0][key]}
                       for key in runs[0] if key != "ours_equals_loop_ref"}
            summary["ours_equals_loop_ref"] = all(r["ours_equals_loop_ref"] for r in runs)
            summary["slots_per_gpu"] = layout[0] // layout[3]
            report["synthetic"][f"zipf{exponent}_{name}"] = summary
            cells = "  ".join(f"{k} {v['balancedness']:.4f}/{v.get('colocated', 0):.0f}"
                              for k, v in summary.items() if isinstance(v, dict))
            print(f"zipf {exponent} {name:18s} {cells}  "
                  f"(balancedness/colocated; equal={summary['ours_equals_loop_ref']})")

    weight = zipf_loads(args.layers, args.experts, 1.0, 0)
    for name, *layout in layouts[:3]:
        times = {"loop_ref": timed(lambda: loop_reference(weight, *layout), 1)}
        for option, kwargs in OPTIONS.items():
            times[option] = timed(lambda: rebalance_experts(weight, *layout, **kwargs), args.repeats)
        current = rebalance_experts(weight * 1.1, *layout)[0]
        times["ours+keep"] = timed(
            lambda: rebalance_experts(weight, *layout, current_phy2log=current), args.repeats)
        times["ours+refine+keep_tol0.05"] = timed(lambda: rebalance_experts(
            weight, *layout, refine=True, current_phy2log=current, keep_tolerance=0.05), args.repeats)
        report["timing_ms"][name] = times
        cells = "  ".join(f"{k} {v['wall']:.1f}/{v['cpu']:.1f}" for k, v in times.items())
        print(f"plan time {name:18s} {cells}  (ms wall/cpu, best of repeats)")

    print(f"drift: {args.drift_steps} re-plans, loads x exp(0.2 N(0,1)) between them; "
          "moved replicas per layer")
    for name, *layout in (layouts[0], layouts[2], layouts[4]):
        for option in ("ours", "ours+refine"):
            start = zipf_loads(args.layers, args.experts, 1.0, 1)
            result = drift(start, tuple(layout), args.drift_steps, 0.2, 0, OPTIONS[option])
            report["drift"][f"{name}_{option}"] = result
            print(f"drift {name:18s} {option:12s}: " + "  ".join(
                f"{m} {r['moved_per_layer']:.1f} ({100 * r['moved_fraction']:.0f}%) bal {r['balancedness']:.4f}"
                for m, r in result.items()))

    real = []
    if args.counts:
        real.append((str(args.counts), read_counts(args.counts), {}))
    if args.route_model:
        counts, info = route_counts(args.route_model, args.route_tokens, 0)
        real.append((f"route:{args.route_model}", counts, info))
    for source, counts, info in real:
        layout = args.counts_layout
        quality = plan_quality(counts, *layout)
        report.setdefault("real_counts", {})[source] = {
            "layout": layout, "shape": list(counts.shape), **info, **quality}
        print(f"real counts {source} {list(counts.shape)} layout {layout}: " + "  ".join(
            f"{k} {v['balancedness']:.4f}" for k, v in quality.items() if isinstance(v, dict)))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
