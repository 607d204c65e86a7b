"""`twinpipe-generate`: continue a text prompt with a trained model (greedy or top-p sampling).

    twinpipe-generate checkpoint=runs/try1 'prompts=["def main("]' max_new_tokens=64 temperature=0.8

    launch/torchrun.sh 4 -m twinpipe.trainer.cli.generate checkpoint=runs/try1 parallel.pp=2 parallel.ep=2 \
        parallel.schedule=dualpipev 'prompts=[...]'     # pp x dp ranks, dp = 4 / pp

Hydra composes `recipes/generate.yaml` (keys: `GenerateSchema` in `trainer/cli/config.py`). The
checkpoint may be one of our `checkpoints/step_N` folders (of any saved layout), a run dir (newest
complete checkpoint) or an HF DeepSeek-V3 folder. Under several ranks the model is split as
`parallel.*` says and `parallel/inference` decodes (same tokens as one process); rank 0 writes.
`generate_text` is the same work on a model and tokenizer in memory.
"""

from __future__ import annotations

import logging
import sys
import time

from omegaconf import DictConfig

from twinpipe.model import generate, speculative_generate
from twinpipe.parallel.inference import generate_parallel
from twinpipe.trainer.cli.config import check, launch, load_for_inference

logger = logging.getLogger(__name__)


def generate_text(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True,
                  speculative: bool = False, grid=None, schedule: str = "1f1b") -> list[str]:
    """Decode the continuation of each prompt (the prompt itself not repeated). `speculative` drafts
    with the MTP layer (same output distribution; the acceptance rate is logged; one process only).
    `grid`: the model is this rank's part under that process grid and `schedule`."""
    ids = [tokenizer.encode(p) or [tokenizer.eos_id] for p in prompts]  # an empty prompt starts a document
    eos_id = tokenizer.eos_id if stop_at_eos else None
    if grid is not None and grid.world_size > 1:
        if speculative:
            raise ValueError("speculative=true: MTP drafting runs in one process only (world size "
                             f"{grid.world_size}); drop speculative or run one process")
        new = generate_parallel(model, grid, ids, max_new_tokens, temperature=temperature, top_p=top_p,
                                eos_id=eos_id, seed=seed, schedule=schedule)
    elif speculative:
        result = speculative_generate(model, ids, max_new_tokens, temperature=temperature, top_p=top_p,
                                      eos_id=eos_id, seed=seed)
        logger.info("MTP drafts: %d of %d accepted (%.1f%%), %d main-model forwards", result.accepted,
                    result.drafted, 100 * result.acceptance_rate, result.forwards)
        new = result.tokens
    else:
        new = generate(model, ids, max_new_tokens, temperature=temperature, top_p=top_p, eos_id=eos_id,
                       seed=seed)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in new]


def run(cfg: DictConfig) -> list[str]:
    """The CLI's work on a composed `recipes/generate.yaml`: load, generate, write each prompt followed
    by its continuation and a newline to stdout; returns the continuations."""
    check(cfg, "generate")
    if cfg.top_p > 1:
        raise ValueError(f"top_p={cfg.top_p}: allowed values are in (0, 1]")
    if not cfg.prompts:
        raise ValueError("prompts=[]: give at least one prompt, e.g. 'prompts=[\"def main(\"]'")
    model, tokenizer, grid = load_for_inference(cfg)
    prompts = list(cfg.prompts)
    start = time.perf_counter()
    texts = generate_text(model, tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed,
                          stop_at_eos=cfg.stop_at_eos, speculative=cfg.speculative, grid=grid,
                          schedule=cfg.parallel.schedule)
    logger.info("generated %d continuations in %.2fs", len(texts), time.perf_counter() - start)
    if grid.is_main:
        for prompt, text in zip(prompts, texts):
            sys.stdout.write(prompt + text + "\n")
        sys.stdout.flush()
    return texts


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: Hydra overrides from `argv` (tests) or the command line."""
    launch("generate", run, argv)


if __name__ == "__main__":
    main()
