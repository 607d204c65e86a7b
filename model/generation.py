"""Batched autoregressive generation with the latent KV cache (greedy or temperature / top-p sampling).

Prompts of different lengths share one batch: they are padded on the left or the right, padded slots
are masked in the cache and do not count as positions, so each sequence sees exactly what it would
see alone. A sequence stops at `eos_id` (kept in its output) or after `max_new_tokens`.

Sampling draws from counter-based noise keyed by (seed, the prompt's index, the step), not from a
generator shared by the batch, so a prompt gets the same tokens whichever batch, data-parallel rank
or pipeline micro-batch it is decoded in (`parallel/inference/` relies on it). The noise is a
splitmix64 hash in int64 arithmetic: the same numbers on every machine.

`Decoding` is the per-batch state of the token choice (new tokens preallocated [B, N], which rows
still run); `generate` drives it with the whole model in this process, the distributed drivers with
the last pipeline stage's logits. `generate(slots=)` batches continuously instead: at most `slots`
rows decode at once and a row whose sequence ended takes the next waiting prompt
(`ContinuousDecoding`, `decode_continuous`), with the same tokens as the whole batch at once.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

import torch

from .kv_cache import LatentKVCache

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 (multiplication wraps like uint64)."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def keyed_uniform(keys: torch.Tensor, step: int | torch.Tensor, size: int) -> torch.Tensor:
    """keys [B] int64, step (or one per row [B]) -> uniform noise [B, size] float64 in (0, 1), a
    function of (key, step, column) only."""
    row = _splitmix64(_splitmix64(keys.long()) ^ step)                                # [B]
    cols = torch.arange(size, dtype=torch.long, device=keys.device)
    bits = _shift_right(_splitmix64(row[:, None] ^ _splitmix64(cols)[None, :]), 11)   # [B, size] < 2^53
    return (bits.double() + 0.5) * 2.0 ** -53


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """logits [..., V] -> the distribution sampled from: softmax(logits / temperature), cut to the
    smallest set of top tokens whose mass reaches top_p (not renormalized; the draw does not need it)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)                     # [..., V]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs                             # mass ranked above
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)               # keeps the top token
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, keys: torch.Tensor,
                step: int | torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]: argmax when temperature == 0, else a draw from
    `sampling_probs` with row b's noise `keyed_uniform(keys, step)[b]` (exponential race:
    argmax p / -log(u) picks token v with probability p_v / sum p)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_p)                              # [B, V]
    race = -torch.log(keyed_uniform(keys, step, probs.shape[-1]))                   # [B, V] Exp(1)
    return (probs.double() / race).argmax(dim=-1)


def sampling_keys(seed: int, rows: torch.Tensor) -> torch.Tensor:
    """The noise key of each prompt: rows [B] (the prompts' indices in the caller's list) mixed with
    the seed."""
    return _splitmix64(torch.full_like(rows, seed, dtype=torch.long)) ^ rows.long()


def chosen_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits [..., V], tokens [...] -> log softmax(logits / temperature)[token] [...] fp32 (temperature
    <= 0: of the logits as they are). The rollout records it per sampled token and RL losses recompute it
    the same way on the training forward."""
    scaled = logits.float() / temperature if temperature > 0 else logits.float()
    return torch.log_softmax(scaled, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def check_sampling(max_new_tokens: int, top_p: float) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")


def pad_prompts(prompts: list[list[int]], padding_side: str, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """-> tokens [B, P] and valid [B, P] bool, each prompt placed on the given side."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r}: allowed 'left' or 'right'")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt needs >= 1 token")
    P = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), P, dtype=torch.bool)
    for b, p in enumerate(prompts):
        cols = slice(P - len(p), P) if padding_side == "left" else slice(0, len(p))
        tokens[b, cols] = torch.tensor(p, dtype=torch.long)
        valid[b, cols] = True
    return tokens, valid


def last_valid_index(valid: torch.Tensor) -> torch.Tensor:
    """valid [B, T] -> index of each row's last True [B]."""
    T = valid.shape[1]
    return T - 1 - valid.flip(1).long().argmax(dim=1)


def check_context(prompts: list[list[int]], max_new_tokens: int, max_positions: int) -> None:
    """A prompt whose continuation would pass the model's context is refused, naming it."""
    for i, p in enumerate(prompts):
        if len(p) + max_new_tokens > max_positions:
            raise ValueError(f"prompt {i} has {len(p)} tokens + max_new_tokens={max_new_tokens} > the model's "
                             f"context max_position_embeddings={max_positions}: shorten it or lower "
                             "max_new_tokens")


class Decoding:
    """The token choice of one batch: new tokens [B, N] preallocated, `running` [B] bool.

    `choose(logits)` picks each row's next token from its last-position logits [B, V], records it for
    the rows still running and stops rows at eos; the next forward takes `last` [B, 1] with valid
    `running[:, None]`. `finished` costs a host sync only when stopping needs one (an eos_id is set).
    `live` [B] False marks filler rows (kept in step with the others, never recorded).
    `record_logprobs`: also keep each chosen token's `chosen_logprobs` in `logprobs` [B, N] fp32.
    """

    def __init__(self, batch: int, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 eos_id: int | None = None, keys: torch.Tensor | None = None,
                 device: torch.device | str = "cpu", live: torch.Tensor | None = None,
                 record_logprobs: bool = False):
        self.max_new_tokens, self.temperature, self.top_p, self.eos_id = max_new_tokens, temperature, top_p, eos_id
        self.keys = (torch.arange(batch) if keys is None else keys).to(device)
        self.new = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)   # [B, N]
        self.length = torch.zeros(batch, dtype=torch.long, device=device)               # [B] recorded
        self.running = (torch.ones(batch, dtype=torch.bool) if live is None else live.bool()).to(device)
        self.step = 0
        self.logprobs = (torch.zeros(batch, max_new_tokens, dtype=torch.float32, device=device)
                         if record_logprobs else None)                                 # [B, N]

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> next tokens [B]; recorded where running."""
        nxt = sample_next(logits, self.temperature, self.top_p, self.keys, self.step)  # [B]
        self.new[:, self.step] = nxt
        if self.logprobs is not None:
            self.logprobs[:, self.step] = chosen_logprobs(logits, nxt, self.temperature)
        self.length += self.running.long()
        if self.eos_id is not None:
            self.running &= nxt != self.eos_id
        self.step += 1
        return nxt

    def any_running(self) -> bool:
        """Whether a row still runs (host sync)."""
        return bool(self.running.any())

    @property
    def finished(self) -> bool:
        return self.step >= self.max_new_tokens or (self.eos_id is not None and not self.any_running())

    def tokens(self) -> list[list[int]]:
        """The new tokens of every row (eos included when reached)."""
        return [row[:n] for row, n in zip(self.new.tolist(), self.length.tolist())]


class ContinuousDecoding:
    """Continuous batching's token choice: `slots` rows decode at once and a row whose sequence ended
    is given to the next waiting prompt (in prompt order).

    Results are kept per prompt: `new` [num_prompts + 1, N] (the last row is the scratch of idle
    rows, so every step writes every row without a host sync). Each row counts its own steps: a
    prompt's k-th token draws its noise at step k whichever row or round decodes it, so seeded
    sampling does not depend on the number of slots. `start` assigns rows to prompts and chooses
    their first tokens from the prefill's logits; `step` chooses every row's next token; `ended`
    (a host sync when an eos_id is set) frees the rows whose sequence ended.
    """

    def __init__(self, num_prompts: int, slots: int, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, eos_id: int | None = None, keys: torch.Tensor | None = None,
                 device: torch.device | str = "cpu", record_logprobs: bool = False):
        self.max_new_tokens, self.temperature, self.top_p, self.eos_id = max_new_tokens, temperature, top_p, eos_id
        self.waiting = deque(range(num_prompts))
        self.scratch = num_prompts
        self.prompt_keys = (torch.arange(num_prompts) if keys is None else keys).to(device)   # [P]
        self.owner = [self.scratch] * slots                                                   # host
        self.owner_t = torch.full((slots,), self.scratch, dtype=torch.long, device=device)  # [B]
        self.keys = torch.zeros(slots, dtype=torch.long, device=device)                       # [B]
        self.steps = torch.zeros(slots, dtype=torch.long, device=device)                      # [B]
        self.steps_host = [0] * slots
        self.running = torch.zeros(slots, dtype=torch.bool, device=device)                    # [B]
        self.last = torch.zeros(slots, dtype=torch.long, device=device)                       # [B] next input
        self.new = torch.zeros(num_prompts + 1, max_new_tokens, dtype=torch.long, device=device)
        self.logprobs = (torch.zeros(num_prompts + 1, max_new_tokens, dtype=torch.float32, device=device)
                         if record_logprobs else None)
        self.length = [0] * num_prompts

    def idle_rows(self) -> list[int]:
        return [b for b, p in enumerate(self.owner) if p == self.scratch]

    def active(self) -> bool:
        return any(p != self.scratch for p in self.owner)

    def _record(self, index: torch.Tensor, logits: torch.Tensor) -> None:
        """Choose the next token of rows `index` [n] from logits [n, V] and record it."""
        owner, steps = self.owner_t[index], self.steps[index]
        nxt = sample_next(logits, self.temperature, self.top_p, self.keys[index], steps)  # [n]
        self.new[owner, steps] = nxt
        if self.logprobs is not None:
            self.logprobs[owner, steps] = chosen_logprobs(logits, nxt, self.temperature)
        running = self.running[index] & (steps + 1 < self.max_new_tokens)
        if self.eos_id is not None:
            running &= nxt != self.eos_id
        self.steps[index] = steps + self.running[index].long()
        self.running[index] = running
        self.last[index] = nxt

    def start(self, rows: list[int], prompts: list[int], logits: torch.Tensor) -> None:
        """Rows `rows` take prompts `prompts`; logits [n, V] at their prompts' last tokens."""
        index = torch.tensor(rows, dtype=torch.long, device=self.steps.device)
        owner = torch.tensor(prompts, dtype=torch.long, device=self.steps.device)
        self.owner_t[index], self.keys[index] = owner, self.prompt_keys[owner]
        self.steps[index], self.running[index] = 0, True
        for b, p in zip(rows, prompts):
            self.owner[b], self.steps_host[b] = p, 1
        self._record(index, logits)

    def step(self, logits: torch.Tensor) -> None:
        """logits [B, V] at every row's last token: the next token of every running row."""
        self._record(torch.arange(len(self.owner), device=self.steps.device), logits)
        self.steps_host = [n + (p != self.scratch) for n, p in zip(self.steps_host, self.owner)]

    def ended(self) -> list[int]:
        """Free the rows whose sequence ended (eos or max_new_tokens); returns them."""
        if self.eos_id is not None:
            running = self.running.tolist()
        else:
            running = [n < self.max_new_tokens for n in self.steps_host]
        done = [b for b, p in enumerate(self.owner) if p != self.scratch and not running[b]]
        for b in done:
            self.length[self.owner[b]] = self.steps_host[b]
            self.owner[b], self.steps_host[b] = self.scratch, 0
        if done:
            index = torch.tensor(done, dtype=torch.long, device=self.steps.device)
            self.owner_t[index], self.steps[index] = self.scratch, 0
        return done

    def tokens(self) -> list[list[int]]:
        return [row[:n] for row, n in zip(self.new.tolist(), self.length)]


def decode_continuous(model: torch.nn.Module, prompts: list[list[int]], decoding: ContinuousDecoding,
                      absorb: bool | None = None, agree: Callable[[int], int] | None = None) -> None:
    """Drive `decoding` over `prompts` with the whole model in this process: rows freed by an ended
    sequence are refilled (prefill of the waiting prompts into a small cache, copied into the rows
    of the preallocated cache, `LatentKVCache.load_rows`), then every row steps by one token.

    `agree(level) -> the largest level among the processes that must run as many forwards` (an
    expert-parallel group): 2 = some process refills (all run a prefill forward; one with nothing
    to refill runs a one-token filler), 1 = some process still decodes (all step), 0 = all done.
    """
    device = model.embed_tokens.weight.device
    slots = len(decoding.owner)
    longest = max((len(p) for p in prompts), default=1)
    cache = LatentKVCache.for_model(model, slots, longest + decoding.max_new_tokens, absorb=absorb)
    while True:
        idle = decoding.idle_rows()
        level = 2 if idle and decoding.waiting else int(decoding.active())
        level = level if agree is None else agree(level)
        if level == 2:
            take = [decoding.waiting.popleft() for _ in idle[:len(decoding.waiting)]]
            tokens, valid = pad_prompts([prompts[i] for i in take] or [[0]], "left")
            tokens, valid = tokens.to(device), valid.to(device)
            prefill = LatentKVCache.for_model(model, len(tokens), tokens.shape[1], absorb=absorb)
            logits = model(tokens, cache=prefill, valid=valid)                      # [n, P, V]
            if take:
                rows = idle[:len(take)]
                cache.load_rows(rows, prefill)
                decoding.start(rows, take, logits[torch.arange(len(take), device=device),
                                                  last_valid_index(valid)])
                cache.clear_rows(decoding.ended())
        elif level == 1:
            if idle and any(cache.fill_list[b] for b in idle):
                cache.clear_rows(idle)  # idle rows step in place (masked), using no slots
            logits = model(decoding.last[:, None], cache=cache, valid=decoding.running[:, None])[:, -1]
            decoding.step(logits)
            cache.clear_rows(decoding.ended())
        else:
            return


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: int | None = None, seed: int = 0, padding_side: str = "left",
             absorb: bool | None = None, rows: list[int] | None = None, logprobs: bool = False,
             agree: Callable[[int], int] | None = None, slots: int | None = None) -> Any:
    """Continue each prompt; returns the new tokens per prompt (eos included when reached).

    `absorb` forces MLA's absorbed (latent) attention (True) or the naive form (False) over the same
    cache; None picks the cheaper per step (see `LatentKVCache`). `rows` are the prompts' indices
    for the sampling noise (default 0..B-1): a prompt decoded with the same seed and row gets the
    same tokens in any batch. `logprobs`: return (new tokens, their `chosen_logprobs`) per prompt.
    `agree(any row running) -> bool` (with eos_id): whether to go on, agreed with the other processes
    that must run as many forwards (an expert-parallel group decoding other prompts); with `slots`,
    see `decode_continuous`. `slots`: continuous batching, at most that many sequences at once
    (`ContinuousDecoding`); the tokens are those of the whole batch decoded at once.
    """
    check_sampling(max_new_tokens, top_p)
    check_context(prompts, max_new_tokens, model.config.max_position_embeddings)
    device = model.embed_tokens.weight.device
    tokens, valid = pad_prompts(prompts, padding_side)
    tokens, valid = tokens.to(device), valid.to(device)
    B = tokens.shape[0]
    rows_t = torch.arange(B) if rows is None else torch.tensor(rows, dtype=torch.long)
    if max_new_tokens == 0:
        return ([[] for _ in range(B)], [[] for _ in range(B)]) if logprobs else [[] for _ in range(B)]
    if slots is not None:
        if slots < 1:
            raise ValueError(f"slots={slots}: must be >= 1 (sequences decoded at once)")
        decoding = ContinuousDecoding(B, min(slots, B), max_new_tokens, temperature, top_p, eos_id,
                                      sampling_keys(seed, rows_t), device, record_logprobs=logprobs)
        decode_continuous(model, prompts, decoding, absorb, agree)
        new = decoding.tokens()
        if not logprobs:
            return new
        return new, [row[:len(t)] for row, t in zip(decoding.logprobs.tolist(), new)]
    decoding = Decoding(B, max_new_tokens, temperature, top_p, eos_id, sampling_keys(seed, rows_t), device,
                        record_logprobs=logprobs)
    cache = LatentKVCache.for_model(model, B, tokens.shape[1] + max_new_tokens, absorb=absorb)
    logits = model(tokens, cache=cache, valid=valid)                                # [B, P, V]
    nxt = decoding.choose(logits[torch.arange(B, device=device), last_valid_index(valid)])  # [B]
    while not (decoding.finished if agree is None or eos_id is None
               else decoding.step >= max_new_tokens or not agree(decoding.any_running())):
        nxt = decoding.choose(model(nxt[:, None], cache=cache, valid=decoding.running[:, None])[:, -1])
    if not logprobs:
        return decoding.tokens()
    new = decoding.tokens()
    return new, [row[:len(t)] for row, t in zip(decoding.logprobs.tolist(), new)]
