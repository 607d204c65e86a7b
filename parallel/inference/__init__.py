"""Inference on a model spread over ranks (pipeline stages, expert parallelism, data parallelism):
`generate.generate_parallel` and the lockstep rules it shares with distributed scoring (`lockstep`)."""

from twinpipe.parallel.inference.generate import generate_parallel, score_parallel

__all__ = ["generate_parallel", "score_parallel"]
