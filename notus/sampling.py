"""Sampling for every slot of the batch at once, each row with its own settings, on the device.

Per row, in this order (generate's, with OpenAI's penalties beside the repetition penalty):
repetition_penalty over the prompt and the reply so far (as `generate`), presence_penalty and
frequency_penalty over the reply so far (as OpenAI), EOS held off until min_tokens, then greedy
(temperature 0) or: temperature, top_k, top_p, and a draw from what is left.

Everything is a tensor op on per-slot state (no host synchronisation, no Python branch on data),
so a decode step and its sampling fit in one CUDA graph. The draw is Gumbel-max with noise hashed
from (the request's seed, its token index, the candidate's token id): a seed gives the same text
alone or beside 31 other requests, and the draw follows exactly the distribution softmax(processed scores).
No setting in range can put NaN or inf into it: scores are finite or -inf, temperature divides
scores shifted to a maximum of 0, and the best candidate is always kept.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class RowSettings:
    """One request's sampling settings (see notus/params.py for their meaning and limits)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    seed: int = 0


class Sampler:
    """Per-slot settings and state on the device, and `sample()` for any rows of slots."""

    def __init__(self, slots: int, vocab_size: int, eos_id: int, device: torch.device):
        self.vocab_size, self.eos_id = vocab_size, eos_id

        def per_slot(fill, dtype):
            return torch.full((slots,), fill, dtype=dtype, device=device)

        self.temperature = per_slot(0.0, torch.float32)
        self.top_p = per_slot(1.0, torch.float32)
        self.top_k = per_slot(0, torch.long)
        self.repetition_penalty = per_slot(1.0, torch.float32)
        self.presence_penalty = per_slot(0.0, torch.float32)
        self.frequency_penalty = per_slot(0.0, torch.float32)
        self.min_tokens = per_slot(0, torch.long)
        self.seed = per_slot(0, torch.long)
        self.generated = per_slot(0, torch.long)  # tokens sampled so far: the noise's counter
        self.counts = torch.zeros(slots, vocab_size, dtype=torch.float32, device=device)  # in the reply
        self.seen = torch.zeros(slots, vocab_size, dtype=torch.bool, device=device)  # prompt + reply

    def start(self, slot: int, settings: RowSettings, prompt_ids: torch.Tensor) -> None:
        """A new request in `slot`. Fills with the values as kernel arguments: `tensor[slot] = value`
        would first make each value a host tensor and copy it over (a synchronising copy on the GPU)."""
        for setting in fields(RowSettings):  # one per-slot tensor of the same name each
            getattr(self, setting.name)[slot].fill_(getattr(settings, setting.name))
        self.generated[slot].zero_()
        self.counts[slot].zero_()
        self.seen[slot].fill_(False)
        self.seen[slot].index_fill_(0, prompt_ids, True)

    def sample(self, logits: torch.Tensor, slots: torch.Tensor, active: torch.Tensor | None = None,
               candidates: int | None = None, penalties: bool = True) -> torch.Tensor:
        """The next token of each row (`logits` [n, vocab] for `slots` [n], overwritten if float32:
        no copy of the vocabulary-wide scores); updates the rows' state.

        `active` [n] (bool) marks the rows whose state advances (the others are padding in a batch
        bucket). The CPU passes what it knows of the rows to skip work: `candidates`, how many of
        the best tokens top_k/top_p look at (None: all, one shape for CUDA graphs; 1: every row is
        greedy), and `penalties=False` when no row uses one.
        """
        scores = _finite_or_minus_inf(logits.float(), out=logits if logits.dtype == torch.float32 else None)
        if penalties:
            scores = self._penalised(scores, slots)
        early = self.generated[slots] < self.min_tokens[slots]
        scores[:, self.eos_id] = torch.where(early, -torch.inf, scores[:, self.eos_id])
        token = scores.argmax(dim=-1) if candidates == 1 else self._draw(scores, slots, candidates)

        advance = torch.ones_like(token, dtype=torch.bool) if active is None else active
        self.generated[slots] += advance.long()
        self.counts[slots, token] += advance.float()
        self.seen[slots, token] |= advance
        return token

    def _draw(self, scores: torch.Tensor, slots: torch.Tensor, candidates: int | None) -> torch.Tensor:
        """Greedy rows take the best token; the others draw from softmax(truncated scores / t)."""
        temperature = self.temperature[slots]
        k = candidates or self.vocab_size
        if k < self.vocab_size:
            top, index = top_k(scores, k)
        else:
            top, index = scores.sort(dim=-1, descending=True, stable=True)
        # Temperature keeps the order, so it applies to the candidates only, shifted to a maximum of 0.
        safe_t = torch.where(temperature > 0, temperature, 1.0)[:, None]
        best = top[:, :1].clamp(min=torch.finfo(top.dtype).min)  # a row of only -inf stays -inf, not NaN
        top = (top - best) / safe_t
        top = top.masked_fill(self._truncated(top, slots), -torch.inf)
        noise = gumbel_noise(self.seed[slots], self.generated[slots], index)
        sampled = index.gather(1, (top + noise).argmax(dim=-1, keepdim=True)).squeeze(1)
        return torch.where(temperature > 0, sampled, index[:, 0])

    def _penalised(self, scores: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        repetition = self.repetition_penalty[slots][:, None]
        penalised = torch.where(scores < 0, scores * repetition, scores / repetition)
        scores = torch.where(self.seen[slots], penalised, scores)
        counts = self.counts[slots]
        scores = (scores - self.frequency_penalty[slots][:, None] * counts
                  - self.presence_penalty[slots][:, None] * (counts > 0).float())
        return _finite_or_minus_inf(scores)

    def _truncated(self, top: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Which of the sorted candidates top_k and top_p remove (the best one always stays)."""
        rank = torch.arange(top.shape[-1], device=top.device)[None, :]
        k = self.top_k[slots][:, None]
        removed = (k > 0) & (rank >= k)
        probs = torch.softmax(top.masked_fill(removed, -torch.inf), dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the better candidates
        top_p = self.top_p[slots][:, None]
        removed |= (before >= top_p) & (top_p < 1)  # the smallest set reaching top_p stays
        return removed & (rank > 0)


def top_k(scores: torch.Tensor, k: int, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """scores.topk(k) (values and indices, best first), in two cheap passes instead of one costly one.

    The k best scores lie in the k blocks with the best maxima, so one topk over the block maxima
    and one over those blocks' scores find them (2.5x faster for k=50 over notus's 32,000 tokens
    on a CPU). Ties at the k-th score may pick a different token of equal score, as topk's may.
    """
    rows, vocab = scores.shape
    if vocab % block or k * block >= vocab:
        return scores.topk(k, dim=-1)
    blocks = scores.view(rows, vocab // block, block)
    best_blocks = blocks.amax(dim=-1).topk(k, dim=-1, sorted=False).indices
    candidates = blocks.gather(1, best_blocks[:, :, None].expand(rows, k, block)).reshape(rows, k * block)
    top, at = candidates.topk(k, dim=-1)
    return top, best_blocks.gather(1, at // block) * block + at % block


def gumbel_noise(seed: torch.Tensor, index: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise for `token_ids` [n, k]: a pure function of (seed, index, token id).

    No generator state, and keyed by token id, not by rank, so ties in the scores cannot reorder it.
    """
    row = _mix32(_mix32(seed & _M32) ^ (index & _M32))[:, None]
    return gumbel_of_bits(_mix32(_mix32((row + token_ids * 0x9E3779B1) & _M32) ^ row))


def gumbel_of_bits(bits: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise from 32 random bits, finite for every one of their values (a test tries all).

    The top 23 bits b give uniform = (b + 0.5) / 2^23, exact in float32 (b + 0.5 needs 24 bits), so it
    lies in [2^-24, 1 - 2^-24] and both logs stay finite. With 24 bits the largest, 2^24 - 0.5, rounds to
    2^24: uniform 1.0, noise +inf, and a token top_k/top_p had removed (-inf + inf = NaN) was drawn.
    """
    uniform = ((bits >> 9).float() + 0.5) * 2.0**-23
    return -torch.log(-torch.log(uniform))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) in int64 arithmetic, so nothing overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def _finite_or_minus_inf(scores: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.nan_to_num(scores, nan=-torch.inf, posinf=torch.finfo(scores.dtype).max, neginf=-torch.inf, out=out)
