"""Sampling for every slot of the batch at once, each row with its own settings, on the device.

Per row, in this order (generate's, with OpenAI's penalties beside the repetition penalty):
repetition_penalty over the prompt and the reply so far (as `generate`), presence_penalty and
frequency_penalty over the reply so far (as OpenAI), EOS held off until min_tokens (released by the
caller: `allow_eos`), then greedy (temperature 0) or: temperature, top_k, top_p, and a draw from
what is left.

In the GPU's shape everything is a tensor op on per-slot state (no host synchronisation, no Python
branch on data), so a decode step and its sampling fit in one CUDA graph, in few operations (each a
kernel launch): greedy is top_k 1, the settings are stored in the form the step uses, the draw's key
is read from a table made at the request's start, indexed by position. The draw is an exponential
race (Gumbel-max without its second log) in two levels: a block of 256 tokens by its total weight,
then a token inside it, with noise hashed from (the request's seed, its token index, the block
number or the token's place in its block). It follows exactly the distribution softmax(processed
scores), with noise for 381 numbers a row instead of 32,000; and it is an argmax keyed by token id,
so the last-bit differences a batch makes in the logits almost never change it: a seed gives the
same text alone or beside 31 other requests. No setting in range can put NaN or inf into it: scores
are finite but a held EOS's -inf, so a row's best is finite, the weights exp((score - best) /
temperature) lie in [0, 1], the best candidate is always kept, and the noise is finite and below 0
for every value of its bits.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF
# SplitMix64's two multipliers as int64: the race's hash multiplies in int64, wrapping mod 2^64.
_C1, _C2 = 0xBF58476D1CE4E5B9 - 2**64, 0x94D049BB133111EB - 2**64
BLOCK = 256  # tokens per block of the two-level draw: 125 blocks for notus's 32,000


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


class RaceNoise:
    """The races' noise, log(u) for each draw's key and each of 381 ids (the 125 blocks', then the
    256 places in a block), from a hash of both in 4 operations over [n, m, 381].

    Each id has an odd 64-bit multiplier (a Weyl sequence over the ids, spread by SplitMix64's first
    constant); key x multiplier, then one of SplitMix64's xorshift-multiply rounds, all in int64
    wrapping mod 2^64; log_uniform reads the top 23 bits. For one key, two ids' products differ by a
    factor (x times a fixed odd number mod 2^64, which mixes every bit into the top ones), unlike
    xor-ed inputs that differ in fixed bits; the round then folds the top half into the bottom one
    and multiplies again. Its uniformity and independence across ids measure as those of the 32-bit
    hash it replaced and of independent random numbers (scripts/noise_quality.py, docs/design.md);
    the sampler's chi-square tests check the draws themselves.
    """

    def __init__(self, vocab_size: int, device: torch.device):
        ids = torch.cat([vocab_size + torch.arange(vocab_size // BLOCK), torch.arange(BLOCK)])
        self.multipliers = (((ids * 0x9E3779B1) & _M32) * _C1 | 1).to(device)
        self.base = torch.tensor(0.5 + 2.0**-24, dtype=torch.float32, device=device)  # log_uniform's offset

    def __call__(self, keys: torch.Tensor) -> torch.Tensor:
        """log(u) [n, m, 381] for `keys` [n, m] (draw_key's)."""
        return log_uniform(self.bits(keys), self.base)

    def bits(self, keys: torch.Tensor) -> torch.Tensor:
        """The hash [n, m, 381]: 64 bits (int64) for each key and id."""
        x = keys[:, :, None] * self.multipliers
        x = x ^ (x >> 32)  # an arithmetic shift: the result's top bit is always 0, its 63 others mixed
        return x * _C2


@dataclass
class Distribution:
    """Rows' processed distributions: their candidate tokens `index` [n, c], best first (equal scores
    by token id), and the candidates' `weight` [n, c]: exp((score - best) / temperature), 0 where
    top_k or top_p removed them (a probability times a row's constant). Each row's first candidate
    is its best token, never removed."""

    weight: torch.Tensor
    index: torch.Tensor
    vocab: int
    noise: RaceNoise

    def draw(self, keys: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tokens [n, m] drawn with `keys` [n, m] (`draw_key()`: one per draw), into `out` if given.

        An exponential race over the blocks' total weights picks a block, then one over its tokens a
        token: P(block) * P(token | block) = the token's share of the whole. argmax(log(u) / w) is
        argmin(E / w) with E = -log(u) exponential, the race that w wins in proportion to its size
        (Gumbel-max, log(w) - log(E), in one log fewer); a removed token (w = 0) scores -inf.
        """
        n, m = keys.shape
        blocks = self.vocab // BLOCK
        # Every token's weight in token-id order (0 for those not among the candidates), so that each
        # block's weight is summed in one kernel, the same bits on every run and in either shape
        # (atomic adds in rank order would vary from run to run on a GPU). Every token a candidate
        # (the GPU's shape): the scatter writes every entry, so the buffer needs no zeros first.
        every_token = self.index.shape[-1] == self.vocab
        by_id = (self.weight.new_empty if every_token else self.weight.new_zeros)(n, self.vocab)
        by_id = by_id.scatter_(1, self.index, self.weight).view(n, blocks, BLOCK)
        noise = self.noise(keys)  # [n, m, blocks + BLOCK], all < 0
        block_noise, place_noise = noise[:, :, :blocks], noise[:, :, blocks:]
        block = (block_noise / by_id.sum(dim=-1)[:, None, :]).argmax(dim=-1, keepdim=True)  # [n, m, 1]
        inside = by_id.gather(1, block.expand(n, m, BLOCK))  # the block's tokens, by their place in it
        return torch.add((place_noise / inside).argmax(dim=-1), block[:, :, 0], alpha=BLOCK, out=out)


class Sampler:
    """Per-slot settings and state on the device, and `sample()` for any rows of slots.

    The settings are stored in the form the step uses, so that a step spends no operation on them:
    greedy as top_k 1 (the draw can only take the best token) at temperature 1, top_k as a table per
    slot of log(keep) by rank (0 for the best top_k, -inf after: added in the same operation as the
    temperature's division), top_p off as 2 (never reached). The draws' keys are a table per slot,
    made at the request's start from its seed and indexed by position: the token sampled from the
    logits at position p (the prompt's last at L - 1, then each one fed) has index p - (L - 1). What
    seeing a token does is a pair of tables per slot, set in one operation when a token is taken (in
    a step with penalties: `sample`'s `penalties=False` skips them, as no row of it reads them): the
    repetition penalty's factor (1 for tokens not in the prompt or the reply), and what is subtracted
    from its score (the presence penalty for tokens in the reply; +inf on EOS while min_tokens holds
    it, until `allow_eos`). `slots` is a slice (the decode step's rows 0..n-1: every read of a setting
    is a view) or a tensor of slot ids (the first tokens of prefilled requests, tests).
    """

    def __init__(self, slots: int, vocab_size: int, eos_id: int, device: torch.device, context_length: int = 32768):
        if vocab_size % BLOCK:
            raise ValueError(f"the vocabulary must split into blocks of {BLOCK} tokens, got {vocab_size}")
        self.vocab_size, self.eos_id = vocab_size, eos_id

        def per_slot(fill, dtype, *shape):
            return torch.full((slots, *shape), fill, dtype=dtype, device=device)

        self.temperature = per_slot(1.0, torch.float32)
        self.top_p = per_slot(2.0, torch.float32)
        self.frequency_penalty = per_slot(0.0, torch.float32)
        self.ones = per_slot(1.0, torch.float32)
        # draw_key(seed, p - (L - 1)) for each position p a request reaches (a finished row's padding
        # steps read its last: L - 1 + max_tokens, below the context's length). Other entries hold an
        # earlier request's keys, or 0: only padding rows, whose tokens no one reads, draw with them.
        self.draw_keys = per_slot(0, torch.long, context_length)
        self.rank_log_keep = per_slot(0.0, torch.float32, vocab_size)
        self.counts = per_slot(0.0, torch.float32, vocab_size)  # in the reply
        # Per token seen: [:, 0] the repetition factor (prompt + reply), [:, 1] what its score loses
        # (reply; EOS while held); `seen_values` what a token taken sets in each.
        self.seen = per_slot(0.0, torch.float32, 2, vocab_size)
        self.repetition, self.subtracted = self.seen[:, 0], self.seen[:, 1]
        self.seen_values = per_slot(0.0, torch.float32, 2)  # repetition_penalty, presence_penalty
        self.slot_ids = torch.arange(slots, device=device)
        self.pair = torch.arange(2, device=device)
        self.indices = torch.arange(context_length, device=device)
        self.noise = RaceNoise(vocab_size, device)

    def _state(self) -> tuple[torch.Tensor, ...]:
        return (self.temperature, self.rank_log_keep, self.top_p, self.frequency_penalty, self.draw_keys,
                self.counts, self.seen, self.seen_values)

    def start(self, slot: int, settings: RowSettings, prompt_ids: torch.Tensor, max_tokens: int | None = None) -> None:
        """A new request in `slot`, of at most `max_tokens` tokens (None: up to the context's length).
        Fills with the values as kernel arguments: `tensor[slot] = value` would first make each value
        a host tensor and copy it over (a synchronising copy on the GPU)."""
        # As float32 stores them: a temperature that rounds to 0 is greedy (not 0 / 0), a top_p that rounds to 1 is off.
        temperature, top_p = _float32(settings.temperature), _float32(settings.top_p)
        sampled = temperature > 0
        values = {
            self.temperature: temperature if sampled else 1.0,
            # top_p 0 keeps the best token only: any limit below 1 / vocab does, and 2^-23 keeps the
            # best even in float32 (the best's 1 + 2^-23 x total rounds above 1: see distribution()).
            self.top_p: max(top_p, 2.0**-23) if top_p < 1 else 2.0,
            self.frequency_penalty: settings.frequency_penalty,
            self.counts: 0.0,
            self.repetition: 1.0,
            self.subtracted: 0.0,
            self.rank_log_keep: 0.0,
        }
        for state, value in values.items():
            state[slot].fill_(value)
        self.seen_values[slot, 0].fill_(settings.repetition_penalty)
        self.seen_values[slot, 1].fill_(settings.presence_penalty)
        self.rank_log_keep[slot, (settings.top_k or self.vocab_size) if sampled else 1 :].fill_(-torch.inf)
        # The keys of the positions its rows read: L - 1 (its first token) to L - 1 + max_tokens
        # (its padding steps'), not the whole context (a hash over 32,768 positions: 0.3 ms a request on the CPU).
        last = len(prompt_ids) - 1
        reach = self.indices[: (len(self.indices) - last if max_tokens is None else max_tokens + 1)]
        self.draw_keys[slot, last : last + len(reach)] = draw_key(settings.seed, reach)
        self.repetition[slot].index_fill_(0, prompt_ids, settings.repetition_penalty)
        if settings.min_tokens:
            self.subtracted[slot, self.eos_id].fill_(torch.inf)

    def allow_eos(self, slot: int) -> None:
        """Ends the hold on EOS of `slot`'s request: call it before sampling its token min_tokens
        (the token index from which EOS may come), after the work already queued."""
        self.subtracted[slot, self.eos_id].fill_(0.0)

    def move(self, source: int, target: int) -> None:
        """Slot `source`'s request now runs in slot `target`: its settings and state go with it."""
        for state in self._state():
            state[target].copy_(state[source])

    def sample(self, logits: torch.Tensor, slots: slice | torch.Tensor, positions: torch.Tensor,
               candidates: int | None = None, penalties: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
        """The next token of each row (`logits` [n, vocab] for `slots`, overwritten if float32: no
        copy of the vocabulary-wide scores), into `out` [n] if given; with `penalties`, updates the
        rows' tables of tokens seen (`advance`).

        `positions` [n]: the position whose logits each row holds (it picks the draw's key). The CPU
        passes what it knows of the rows to skip work (`shortcuts()`): `candidates`, how many of the
        best tokens top_k/top_p look at (None: all, one shape for CUDA graphs; 1: every row is
        greedy), and `penalties=False` when no row uses one (the hold on EOS still applies).
        """
        if candidates == 1:
            # On the CPU only: the one pass's check reads the device, which an eager GPU step would wait on.
            cpu_shortcut = one_pass_greedy(candidates, penalties) and logits.device.type == "cpu"
            token = self._greedy(logits, slots) if cpu_shortcut else first_argmax(self.scores(logits, slots, penalties))
            token = token if out is None else out.copy_(token)
        else:
            scores = self.scores(logits, slots, penalties)
            keys = self.draw_keys[self.slot_ids[slots], positions]
            token = self.distribution(scores, slots, candidates).draw(keys[:, None], None if out is None else out[:, None])[:, 0]
        if penalties:  # else what advance() writes is what the rows' tables hold (or, for counts, times 0)
            self.advance(slots, token)
        return token

    def advance(self, slots: slice | torch.Tensor, tokens: torch.Tensor) -> None:
        """The rows' requests took `tokens` [n]: counted, and marked seen. A padding row's tables
        change too, but are not read before the next start() in its slot sets them anew."""
        rows = self.slot_ids[slots]
        self.counts.index_put_((rows, tokens), self.ones[slots], accumulate=True)
        self.seen.index_put_((rows[:, None], self.pair, tokens[:, None]), self.seen_values[slots])

    def _greedy(self, logits: torch.Tensor, slots: slice | torch.Tensor) -> torch.Tensor:
        """The CPU's greedy rows when none has a penalty: first_argmax(scores(logits, penalties=False))
        in one pass over the vocabulary where that takes two. Making the scores finite (NaN and -inf
        as the lowest finite score, +inf as the highest) changes no row's first maximum when each
        row's best is finite and above that lowest; where it may for some row (a model gone wrong),
        the whole batch goes that way."""
        scores = logits if logits.dtype == torch.float32 else logits.float()
        eos = scores[:, self.eos_id].clone()
        scores[:, self.eos_id] -= self.subtracted[slots, self.eos_id]  # the hold on EOS
        best, token = first_max(scores)
        if bool(((best > torch.finfo(scores.dtype).min) & (best < torch.inf)).all()):  # NaN fails both
            return token
        scores[:, self.eos_id] = eos
        return first_argmax(self.scores(scores, slots, penalties=False))

    def scores(self, logits: torch.Tensor, slots: slice | torch.Tensor, penalties: bool = True) -> torch.Tensor:
        """The rows' scores after the penalties and the hold on EOS: finite, but a held EOS's -inf."""
        scores = logits if logits.dtype == torch.float32 else logits.float()
        if penalties:
            return self._penalised(scores, slots)
        scores = _finite(scores, out=scores)
        scores[:, self.eos_id] -= self.subtracted[slots, self.eos_id]  # the hold on EOS alone: one column
        return scores

    def distribution(self, scores: torch.Tensor, slots: slice | torch.Tensor, candidates: int | None = None) -> Distribution:
        """Temperature, top_k and top_p applied to `scores`: what the rows draw from.

        The GPU's shape sorts every candidate (`candidates` None); the CPU's looks at the best
        `candidates` only, unless scores tie across the last one's place. Both rank equal scores by
        token id, so they keep the same tokens, with the same weights to the last bit.
        """
        k = candidates or self.vocab_size
        if k < self.vocab_size:
            top, index = top_k(scores, k + 1)
            # The (k+1)-th best equal to the k-th: topk chose among tokens tied across the last
            # place, where only a stable sort chooses as the GPU's shape does (rare with float32
            # logits; a host read, the CPU's eager steps only).
            if bool(((top[:, k] == top[:, k - 1]) & torch.isfinite(top[:, k])).any()):
                k = self.vocab_size
            else:
                top, index = _ties_by_token_id(top[:, :k], index[:, :k])
        if k == self.vocab_size:
            top, index = scores.sort(dim=-1, descending=True, stable=True)
        # Temperature keeps the order, so it applies to the candidates only, shifted to a best of 0
        # (finite: only a held EOS is -inf): weights in [0, 1], the best's 1; top_k's -inf after the
        # first top_k makes theirs 0 (x / t + 0 is x / t to the last bit).
        log_keep = self.rank_log_keep[slots, : top.shape[-1]]  # a view, or the candidates' columns only
        weight = torch.addcdiv(log_keep, top - top[:, :1], self.temperature[slots][:, None]).exp()
        # top_p: the smallest set of the best whose share of what top_k kept reaches it: a candidate
        # goes when the mass before it, mass - weight, reaches top_p x total (compared as mass >=
        # weight + top_p x total, one operation). The best always stays: its mass is its weight, 1,
        # below 1 + top_p x total since top_p >= 2^-23 and the total >= 1.
        mass = weight.cumsum(dim=-1)
        removed = mass >= torch.addcmul(weight, self.top_p[slots][:, None], mass[:, -1:])
        return Distribution(weight.masked_fill(removed, 0), index, self.vocab_size, self.noise)

    def _penalised(self, scores: torch.Tensor, slots: slice | torch.Tensor) -> torch.Tensor:
        """The penalties and the hold on EOS applied to `scores`. Made finite after the repetition
        penalty (the one that can overflow; NaN logits too), so only the hold's +inf makes a -inf."""
        repetition = self.repetition[slots]  # 1 for tokens not seen: scores * 1 and scores / 1 are exact
        penalised = _finite(torch.where(scores < 0, scores * repetition, scores / repetition), out=scores)
        penalised.addcmul_(self.frequency_penalty[slots][:, None], self.counts[slots], value=-1)
        return penalised.sub_(self.subtracted[slots])


def shortcuts(settings: list[RowSettings]) -> dict:
    """The work `Sampler.sample` may skip for rows with these settings (the CPU's eager steps)."""
    sampling = [s for s in settings if s.temperature > 0]
    if not sampling:
        candidates = 1
    elif any(s.top_k == 0 for s in sampling):
        candidates = None
    else:
        candidates = max(s.top_k for s in sampling)
    penalties = any(s.repetition_penalty != 1 or s.presence_penalty or s.frequency_penalty for s in settings)
    return {"candidates": candidates, "penalties": penalties}


def one_pass_greedy(candidates: int | None, penalties: bool) -> bool:
    """Whether `Sampler.sample` takes its rows' tokens in one greedy pass (on the CPU: `_greedy`),
    which reads the logits in either memory layout: every row greedy, none with a penalty."""
    return candidates == 1 and not penalties


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


def first_argmax(scores: torch.Tensor) -> torch.Tensor:
    """scores.argmax(-1), the first index of each row's maximum (first_max's)."""
    return first_max(scores)[1]


def first_max(scores: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's maximum [rows] and its first index [rows] (argmax's), in two passes: the CPU's argmax
    kernel is not vectorised (2.3 ms for 32 rows of notus's 32,000 tokens, amax over blocks 0.15 ms).
    The best block is the first whose maximum is the row's, and its first maximum is the row's first.
    `scores` may be column-major (the CPU's large greedy batches: notus/forward.py): the blocks'
    maxima are then taken across the rows, along the memory (along a row, each read would stride)."""
    rows, vocab = scores.shape
    if vocab % block:
        return scores.max(dim=-1)
    blocks = scores.view(rows, vocab // block, block)
    if scores.stride(-1) == 1:
        block_max = blocks.amax(dim=-1)
    else:
        block_max = scores.t().view(vocab // block, block, rows).amax(dim=1).t()
    best, at = block_max.max(dim=-1, keepdim=True)  # [rows, 1]: max(dim) gives the first index
    inside = blocks.gather(1, at[:, :, None].expand(rows, 1, block))[:, 0].argmax(dim=-1, keepdim=True)
    return best[:, 0], (at * block + inside)[:, 0]


def _ties_by_token_id(top: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """topk's candidates reordered as a stable sort of the whole row orders them: equal scores by
    token id, so that top_p keeps the same tokens in either shape."""
    index, by_id = index.sort(dim=-1)
    top, by_score = top.gather(1, by_id).sort(dim=-1, descending=True, stable=True)
    return top, index.gather(1, by_score)


def draw_key(seed: int | torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The key of a request's draw for its token `index`: a pure function of (seed, index), 32 random
    bits plus 2^32, so never 0 (a key of 0 would give every id the same noise: RaceNoise)."""
    return _mix32(_mix32(seed & _M32) ^ (index & _M32)) | 2**32


def log_uniform(bits: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """log(u) for a uniform u from the top 23 of 64 random bits (int64): finite and below 0 for every
    value of them (a test tries all). `base`: 0.5 + 2^-24, a 0-dim float32 tensor on bits' device.

    The top 23 bits, b = bits >> 41 in [-2^22, 2^22) (an arithmetic shift), give u = (b + 2^22 +
    0.5) / 2^23 = base + b x 2^-23 in one operation, exact in float32 (24 significant bits at most),
    so u lies in [2^-24, 1 - 2^-24]: log(u) is never 0, so a removed token's log(u) / 0 is -inf, not
    NaN. With 24 bits the largest u would round to 1: log(u) = 0, and 0 / 0 = NaN is what argmax
    takes (the bug that once drew a token top_k had removed).
    """
    return torch.add(base, bits >> 41, alpha=2.0**-23).log()


def _float32(x: float) -> float:
    """`x` rounded to float32, as a per-slot tensor holds it."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _mix32(x: int | torch.Tensor) -> int | torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) in int64 arithmetic, so nothing overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def _finite(scores: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """NaN and -inf as the lowest finite score, +inf as the highest: a row's best is finite (a row
    of only NaN, a model gone wrong, draws every token alike)."""
    low, high = torch.finfo(scores.dtype).min, torch.finfo(scores.dtype).max
    return torch.nan_to_num(scores, nan=low, posinf=high, neginf=low, out=out)
