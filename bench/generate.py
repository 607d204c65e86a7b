"""Generation benchmark: tokens/s of cached decoding (absorbed vs naive MLA) and KV-cache size.

- throughput: `tiny` and `small` presets, freshly initialised (speed does not depend on training),
  greedy decoding of a batch of random prompts; prefill time and decode tokens/s (new tokens over the
  whole batch per second of decoding), for the absorbed (latent) and the naive attention form, and
  `auto` (each step takes the form with fewer FLOPs: naive prefill, absorbed decoding at small/V3);
- KV-cache bytes per token, computed for the `v3_671b` shape (main layers, BF16): the latent cache
  (c_kv + k_pe, kv_lora_rank + qk_rope_head_dim per layer) against a full per-head K/V cache;
- with `--checkpoint` (a trained run dir / checkpoint / HF folder): MTP speculative decoding against
  plain greedy decoding on prompts from the embedded held-out corpus: acceptance rate, main-model
  forwards, wall time, and whether the outputs are identical (they must be).

    python bench/generate.py [--presets tiny small] [--threads 1] [--device cpu] [--checkpoint RUN]
    python bench/generate.py --vs-hf     # ours vs transformers' generate, batch 32: generate_vs_hf.json
    python bench/generate.py --continuous   # continuous vs static batching: generate_continuous.json

Prints one line per run and writes bench/results/generate_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from twinpipe.model import LatentKVCache, ModelConfig, Transformer, generate, speculative_generate
from twinpipe.model.generation import last_valid_index, pad_prompts

# batch, prompt length, new tokens, dtype per preset (small stays in BF16 on CPU to save memory)
SETTINGS = {
    "tiny": dict(batch=4, prompt_len=32, new_tokens=64, dtype=torch.float32),
    "small": dict(batch=2, prompt_len=16, new_tokens=8, dtype=torch.bfloat16),
}


@torch.no_grad()
def time_decode(model, prompts: list[list[int]], new_tokens: int, absorb: bool | None) -> dict[str, float]:
    """Greedy decoding with the latent cache, timed as prefill and per-token decode."""
    device = model.embed_tokens.weight.device
    tokens, valid = pad_prompts(prompts, "left")
    tokens, valid = tokens.to(device), valid.to(device)
    cache = LatentKVCache.for_model(model, len(prompts), tokens.shape[1] + new_tokens, absorb=absorb)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    logits = model(tokens, cache=cache, valid=valid)
    nxt = logits[torch.arange(len(prompts), device=device), last_valid_index(valid)].argmax(-1)
    sync()
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        nxt = model(nxt[:, None], cache=cache)[:, -1].argmax(-1)
    sync()
    decode = time.perf_counter() - start
    steps = new_tokens - 1
    return {"prefill_s": prefill, "decode_s": decode, "decode_steps": steps,
            "decode_tokens_per_s": steps * len(prompts) / decode if decode > 0 else float("nan"),
            "decode_ms_per_step": 1e3 * decode / max(steps, 1)}


def kv_cache_sizes() -> dict[str, float]:
    cfg = ModelConfig.preset("v3_671b")
    latent = LatentKVCache.bytes_per_token(cfg, bytes_per_value=2, latent=True)
    naive = LatentKVCache.bytes_per_token(cfg, bytes_per_value=2, latent=False)
    return {"shape": "v3_671b", "dtype": "bfloat16", "layers": cfg.num_hidden_layers,
            "latent_values_per_layer": cfg.kv_lora_rank + cfg.qk_rope_head_dim,
            "naive_values_per_layer": cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim),
            "latent_bytes_per_token": latent, "naive_bytes_per_token": naive, "ratio": naive / latent,
            "latent_GiB_per_128k_tokens": latent * 131072 / 2**30,
            "naive_GiB_per_128k_tokens": naive * 131072 / 2**30}


def speculative(checkpoint: str, device: torch.device, num_prompts: int = 8, prompt_len: int = 32,
                new_tokens: int = 48) -> dict:
    """MTP drafts vs plain greedy decoding of held-out prompts with a trained model."""
    from twinpipe.data.corpus import embedded_corpus_files
    from twinpipe.trainer.checkpoint.io import load_model_for_inference

    model, tokenizer = load_model_for_inference(checkpoint, torch.float32)
    model = model.to(device)
    ids: list[int] = []
    for f in embedded_corpus_files("heldout"):
        ids += tokenizer.encode(f.read_text(encoding="utf-8", errors="ignore")[:2000])
        if len(ids) >= num_prompts * 4 * prompt_len:
            break
    step = len(ids) // num_prompts
    prompts = [ids[i * step: i * step + prompt_len] for i in range(num_prompts)]
    start = time.perf_counter()
    plain = generate(model, prompts, new_tokens)
    plain_s = time.perf_counter() - start
    start = time.perf_counter()
    spec = speculative_generate(model, prompts, new_tokens)
    spec_s = time.perf_counter() - start
    return {"checkpoint": str(checkpoint), "prompts": num_prompts, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "acceptance_rate": spec.acceptance_rate, "drafted": spec.drafted,
            "accepted": spec.accepted, "forwards_speculative": spec.forwards,
            "forwards_plain": new_tokens, "plain_s": plain_s, "speculative_s": spec_s,
            "identical_output": plain == spec.tokens}


VS_HF = {  # the shapes: tiny, and a 10-50M-parameter config; batch 32, greedy, fp32
    "tiny": {},
    "mid": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                num_hidden_layers=6, num_attention_heads=8, q_lora_rank=128, kv_lora_rank=64,
                qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16),
}


@torch.no_grad()
def vs_hf(name: str, batch: int = 32, prompt_len: int = 32, new_tokens: int = 64, seed: int = 0,
          rounds: int = 3) -> dict:
    """Our `generate` and transformers' `generate` (its default cache on) on the same exported weights
    (save_hf, fp32), in this process and thread count, greedy, each warmed up: end-to-end seconds and
    decode tokens/s (the N-token run minus the 1-token run, i.e. prefill removed; the best of `rounds`
    alternating rounds), and how many rows' tokens agree (fp32 rounding differs, so near-ties may
    flip a row of a random model)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from twinpipe.model import save_hf

    torch.manual_seed(seed)
    cfg = ModelConfig.preset("tiny", **VS_HF[name])
    model = Transformer(cfg).eval()
    with tempfile.TemporaryDirectory() as folder:
        save_hf(model, folder, dtype=None)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = torch.randint(3, cfg.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))
    ids = prompts

    def ours(n: int) -> tuple[float, list]:
        start = time.perf_counter()
        out = generate(model, prompts.tolist(), n)
        return time.perf_counter() - start, out

    def theirs(n: int) -> tuple[float, list]:
        start = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
        return time.perf_counter() - start, out[:, prompt_len:].tolist()

    ours(2), theirs(2)  # warm-up
    result = {"preset": name, "params": cfg.num_parameters(), "batch": batch, "prompt_len": prompt_len,
              "new_tokens": new_tokens, "dtype": "float32", "rounds": rounds}
    runs = {"twinpipe": ours, "transformers": theirs}
    ones: dict[str, list[float]] = {label: [] for label in runs}
    fulls: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(rounds):  # the two generators alternate, so a change of machine load hits both
        for label, run in runs.items():
            ones[label].append(run(1)[0])
            seconds, result[f"{label}_tokens"] = run(new_tokens)
            fulls[label].append(seconds)
    for label in runs:
        one, full = min(ones[label]), min(fulls[label])
        result[label] = {"end_to_end_s": full, "prefill_s": one,
                         "decode_tokens_per_s": batch * (new_tokens - 1) / (full - one)}
    result["decode_speedup"] = (result["twinpipe"]["decode_tokens_per_s"]
                                / result["transformers"]["decode_tokens_per_s"])
    result["end_to_end_speedup"] = result["transformers"]["end_to_end_s"] / result["twinpipe"]["end_to_end_s"]
    same = sum(a == b for a, b in zip(result.pop("twinpipe_tokens"), result.pop("transformers_tokens")))
    result["rows_identical"] = f"{same}/{batch}"
    return result


@torch.no_grad()
def continuous(num_prompts: int = 128, slots: int = 32, new_tokens: int = 64, seed: int = 0) -> dict:
    """Continuous batching (`generate(slots=)`) against static batches of the same size, on a workload
    whose output lengths differ widely: the tiny preset's eos row of lm_head is scaled until about half
    of the prompts (random, 8..32 tokens) emit eos within the first eighth of the budget (greedy; the
    scale is found by bisection, the same model serves both). Generated tokens per second of wall
    time, the length distribution, and whether the outputs are identical."""
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("tiny")
    model = Transformer(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, cfg.vocab_size, (int(n),), generator=gen).tolist()
               for n in torch.randint(8, 33, (num_prompts,), generator=gen)]
    eos, early = cfg.eos_token_id, new_tokens // 8  # "stops early": within the first eighth of the budget
    row = model.lm_head.weight[eos].clone()

    def share(scale: float) -> float:
        model.lm_head.weight[eos] = row * scale
        return sum(t[-1:] == [eos] for t in generate(model, prompts, early, eos_id=eos)) / num_prompts
    low, high = 1.0, 64.0
    for _ in range(12):
        low, high = ((low + high) / 2, high) if share((low + high) / 2) < 0.5 else (low, (low + high) / 2)
    model.lm_head.weight[eos] = row * high

    def static() -> list[list[int]]:
        return [t for i in range(0, num_prompts, slots)
                for t in generate(model, prompts[i:i + slots], new_tokens, eos_id=eos)]

    def cont() -> list[list[int]]:
        return generate(model, prompts, new_tokens, eos_id=eos, slots=slots)

    generate(model, prompts[:slots], 2, eos_id=eos)  # warm-up
    result = {"preset": "tiny", "prompts": num_prompts, "slots": slots, "max_new_tokens": new_tokens,
              "eos_id": eos, "eos_row_scale": high, "dtype": "float32"}
    outs = {}
    for label, run in (("static", static), ("continuous", cont)):
        times = []
        for _ in range(2):
            start = time.perf_counter()
            outs[label] = run()
            times.append(time.perf_counter() - start)
        tokens = sum(len(t) for t in outs[label])
        result[label] = {"seconds": min(times), "new_tokens": tokens, "tokens_per_s": tokens / min(times)}
    lengths = [len(t) for t in outs["static"]]
    result["stopped_early"] = sum(n <= early for n in lengths) / num_prompts
    result["ran_to_max"] = sum(n == new_tokens for n in lengths) / num_prompts
    result["length_mean"] = sum(lengths) / num_prompts
    result["speedup"] = result["continuous"]["tokens_per_s"] / result["static"]["tokens_per_s"]
    result["identical_output"] = outs["static"] == outs["continuous"]
    return result


def save(name: str, result: dict, threads: int, load_before: float) -> None:
    """bench/results/<name>: `result` with the versions, threads and the 1-minute load before and after."""
    out = Path(__file__).resolve().parent / "results" / name
    out.write_text(json.dumps({"threads": threads, "torch": torch.__version__, "machine": platform.machine(),
                               "load_avg_1min_before": load_before, "load_avg_1min_after": os.getloadavg()[0],
                               **result}, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=sorted(SETTINGS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", default=None, help="trained model for the speculative-decoding run")
    ap.add_argument("--vs-hf", action="store_true",
                    help="ours vs transformers' generate at batch 32 (tiny and mid), bench/results/generate_vs_hf.json")
    ap.add_argument("--continuous", action="store_true",
                    help="continuous vs static batching, half the prompts stopping early: generate_continuous.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = os.getloadavg()[0]
    if args.continuous:
        r = continuous(seed=args.seed)
        print(f"continuous batching, {r['prompts']} prompts, {r['slots']} slots, {r['stopped_early']:.0%} stop "
              f"early, {r['ran_to_max']:.0%} run to the end (mean length {r['length_mean']:.1f} of {r['max_new_tokens']}): "
              f"{r['continuous']['tokens_per_s']:.0f} tok/s vs static batches {r['static']['tokens_per_s']:.0f} "
              f"-> {r['speedup']:.2f}x, identical output: {r['identical_output']}")
        save("generate_continuous.json", r, args.threads, load)
        return
    if args.vs_hf:
        runs = [vs_hf(name, seed=args.seed) for name in VS_HF]
        for r in runs:
            print(f"{r['preset']:5s} ({r['params'] / 1e6:.1f}M params) batch {r['batch']}: decode "
                  f"{r['twinpipe']['decode_tokens_per_s']:.0f} tok/s vs transformers "
                  f"{r['transformers']['decode_tokens_per_s']:.0f} -> {r['decode_speedup']:.2f}x "
                  f"(end to end {r['end_to_end_speedup']:.2f}x), rows identical {r['rows_identical']}")
        save("generate_vs_hf.json", {"transformers": __import__("transformers").__version__, "runs": runs},
             args.threads, load)
        return
    results = {"device": args.device, "threads": args.threads, "torch": torch.__version__,
               "machine": platform.machine(), "cpu_count": os.cpu_count(),
               "load_avg_1min": os.getloadavg()[0], "runs": [], "kv_cache": kv_cache_sizes()}
    kv = results["kv_cache"]
    print(f"KV cache per token at v3_671b (bf16, {kv['layers']} layers): latent {kv['latent_bytes_per_token']:,} B "
          f"vs naive K/V {kv['naive_bytes_per_token']:,} B -> {kv['ratio']:.1f}x smaller")
    for name in args.presets:
        s = SETTINGS[name]
        torch.manual_seed(args.seed)
        cfg = ModelConfig.preset(name)
        with torch.device(device):
            model = Transformer(cfg).to(s["dtype"]).eval()
        gen = torch.Generator().manual_seed(args.seed)
        prompts = torch.randint(3, cfg.vocab_size, (s["batch"], s["prompt_len"]), generator=gen).tolist()
        time_decode(model, prompts, 2, absorb=True)  # warm-up
        for absorb in (True, False, None):
            r = time_decode(model, prompts, s["new_tokens"], absorb)
            r.update(preset=name, form={True: "absorbed", False: "naive", None: "auto"}[absorb], batch=s["batch"],
                     prompt_len=s["prompt_len"], new_tokens=s["new_tokens"], dtype=str(s["dtype"]),
                     params=cfg.num_parameters())
            results["runs"].append(r)
            print(f"{name:6s} {r['form']:8s} batch {s['batch']} prompt {s['prompt_len']}: prefill "
                  f"{r['prefill_s']:.3f}s, decode {r['decode_tokens_per_s']:.1f} tok/s "
                  f"({r['decode_ms_per_step']:.1f} ms/step)")
        del model
    if args.checkpoint:
        r = results["speculative"] = speculative(args.checkpoint, device)
        print(f"MTP speculative ({r['checkpoint']}): acceptance {r['acceptance_rate']:.3f}, "
              f"{r['forwards_speculative']} forwards vs {r['forwards_plain']}, {r['speculative_s']:.2f}s vs "
              f"{r['plain_s']:.2f}s, identical output: {r['identical_output']}")
    out = Path(__file__).resolve().parent / "results" / f"generate_{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
