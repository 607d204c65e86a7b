"""`twinpipe-generate`: continue a text prompt with a trained model (greedy or top-p sampling).

    twinpipe-generate --checkpoint runs/try1 --prompt "def main(" --max-new-tokens 64 --temperature 0.8

The checkpoint may be one of our `checkpoints/step_N` folders, a run dir (newest complete checkpoint)
or an HF DeepSeek-V3 folder. `generate_text` is the same work on a model and tokenizer in memory.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from twinpipe.model import generate, speculative_generate

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def generate_text(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True,
                  speculative: bool = False) -> list[str]:
    """Decode the continuation of each prompt (the prompt itself not repeated). `speculative` drafts
    with the MTP layer (same output distribution; the acceptance rate is logged)."""
    ids = [tokenizer.encode(p) or [tokenizer.eos_id] for p in prompts]  # an empty prompt starts a document
    eos_id = tokenizer.eos_id if stop_at_eos else None
    if speculative:
        result = speculative_generate(model, ids, max_new_tokens, temperature=temperature, top_p=top_p,
                                      eos_id=eos_id, seed=seed)
        logger.info("MTP drafts: %d of %d accepted (%.1f%%), %d main-model forwards", result.accepted,
                    result.drafted, 100 * result.acceptance_rate, result.forwards)
        new = result.tokens
    else:
        new = generate(model, ids, max_new_tokens, temperature=temperature, top_p=top_p, eos_id=eos_id,
                       seed=seed)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in new]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="twinpipe-generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder, run dir or HF folder")
    ap.add_argument("--prompt", action="append", required=True,
                    help="prompt text; repeat the flag for a batch")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-eos-stop", action="store_true", help="keep generating past the eos token")
    ap.add_argument("--speculative", action="store_true",
                    help="draft with the MTP layer (needs a model with num_nextn_predict_layers >= 1)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from twinpipe.trainer.checkpoint import load_model_for_inference

    model, tokenizer = load_model_for_inference(args.checkpoint, DTYPES[args.dtype])
    model = model.to(args.device)
    start = time.perf_counter()
    texts = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_p,
                          args.seed, stop_at_eos=not args.no_eos_stop, speculative=args.speculative)
    logger.info("generated %d continuations in %.2fs", len(texts), time.perf_counter() - start)
    for prompt, text in zip(args.prompt, texts):
        sys.stdout.write(prompt + text + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
