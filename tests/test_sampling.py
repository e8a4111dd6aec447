"""The batched sampler (notus/sampling.py): exactly the processed distribution over notus's whole
vocabulary, in the GPU's shape and the CPU's, penalties as their reference, seeds independent of the batch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from notus.sampling import RaceNoise, RowSettings, Sampler, draw_key, first_argmax, log_uniform, shortcuts, top_k

VOCAB, EOS = 32000, 2
CPU = torch.device("cpu")
DRAWS = 100_000


def reference_penalties(logits: list[float], prompt: list[int], reply: list[int], s: RowSettings) -> list[float]:
    """generate's repetition penalty over prompt + reply, then OpenAI's penalties over the reply."""
    out = list(logits)
    for token in set(prompt) | set(reply):
        out[token] = out[token] * s.repetition_penalty if out[token] < 0 else out[token] / s.repetition_penalty
    for token in set(reply):
        out[token] -= s.frequency_penalty * reply.count(token) + s.presence_penalty
    return out


def reference_distribution(scores: torch.Tensor, s: RowSettings) -> torch.Tensor:
    """The processed distribution, written out plainly in float64: temperature, then top_k, then top_p."""
    probs = torch.softmax(scores.double() / s.temperature, dim=-1)
    order = probs.argsort(descending=True, stable=True)
    p = probs[order]
    if s.top_k:
        p[s.top_k :] = 0
    p = p / p.sum()
    if s.top_p < 1:  # the smallest set of the best tokens whose renormalised mass reaches top_p
        p[p.cumsum(0) - p >= s.top_p] = 0
    out = torch.zeros_like(probs)
    out[order] = p
    return out / out.sum()


def chi_square(counts: torch.Tensor, expected: torch.Tensor, minimum: float = 10.0) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom, tokens pooled in order of probability into
    bins of at least `minimum` expected draws (the likely tokens one bin each, the tail in groups)."""
    bins, observed, wanted = [], 0.0, 0.0
    for token in expected.argsort(descending=True).tolist():
        if expected[token] == 0:
            break
        observed, wanted = observed + counts[token].item(), wanted + expected[token].item()
        if wanted >= minimum:
            bins.append((observed, wanted))
            observed, wanted = 0.0, 0.0
    if wanted:  # the last few join the last bin
        last_observed, last_wanted = bins.pop()
        bins.append((last_observed + observed, last_wanted + wanted))
    return sum((o - w) ** 2 / w for o, w in bins), len(bins) - 1


def chi_square_limit(dof: int, z: float = 3.72) -> float:
    """The 0.9999 quantile of chi-squared (Wilson-Hilferty): a correct sampler fails 1 time in 10,000,
    and every draw here is seeded, so the outcome is the same every run."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def started(rows: int, settings: RowSettings, prompt: list[int], reply: list[int], device: torch.device = CPU) -> Sampler:
    """A sampler whose `rows` slots each hold a request with these settings, prompt and reply so far."""
    sampler = Sampler(rows, VOCAB, EOS, device)
    for slot in range(rows):
        sampler.start(slot, settings, torch.tensor(prompt, device=device))
        for token in reply:  # the reply so far, as the sampler would have drawn it
            sampler.advance(torch.tensor([slot], device=device), torch.tensor([token], device=device))
    return sampler


# The settings, and the one reported drawing a removed token (0.7, top_k 50, top_p 0.95).
SETTINGS = {
    "plain": RowSettings(temperature=1.0),
    "top_k": RowSettings(temperature=1.0, top_k=50),
    "top_p": RowSettings(temperature=1.0, top_p=0.9),
    "cold": RowSettings(temperature=0.3),
    "hot": RowSettings(temperature=1.5),
    "penalties": RowSettings(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4),
    "reported": RowSettings(temperature=0.7, top_k=50, top_p=0.95),
}


@dataclass
class DrawCase:
    """One setting's case for 10^5 draws: logits, prompt and reply, the expected counts, the keys of
    token indices 0..DRAWS-1."""

    settings: RowSettings
    logits: torch.Tensor
    prompt: list[int]
    reply: list[int]
    expected: torch.Tensor
    keys: torch.Tensor

    @classmethod
    def of(cls, name: str) -> "DrawCase":
        settings = RowSettings(**{**SETTINGS[name].__dict__, "seed": 7})
        generator = torch.Generator().manual_seed(3)
        logits = torch.randn(1, VOCAB, generator=generator) * 2.5  # a head of likely tokens, a long tail
        prompt = torch.randint(0, VOCAB, (200,), generator=generator).tolist()
        reply = torch.randint(0, VOCAB, (100,), generator=generator).tolist()
        processed = torch.tensor(reference_penalties(logits[0].tolist(), prompt, reply, settings))
        expected = reference_distribution(processed, settings) * DRAWS
        keys = draw_key(torch.full((DRAWS,), settings.seed), torch.arange(DRAWS))[None, :]
        return cls(settings, logits, prompt, reply, expected, keys)

    def draws(self, distribution) -> torch.Tensor:
        """The DRAWS tokens `distribution` (of one row) draws with the case's keys, on the CPU."""
        keys = self.keys.to(distribution.weight.device)
        return torch.cat([distribution.draw(chunk)[0] for chunk in keys.split(10_000, dim=1)]).cpu()

    def check(self, tokens: torch.Tensor, shape: str) -> None:
        """No removed token, and frequencies as the processed distribution's (chi-square)."""
        counts = torch.bincount(tokens, minlength=VOCAB).double()
        assert counts[self.expected == 0].sum() == 0, f"{shape}: drew a token the processing removed"
        chi2, dof = chi_square(counts, self.expected)
        assert chi2 <= chi_square_limit(dof), f"{shape}: chi2 {chi2:.1f} > {chi_square_limit(dof):.1f} ({dof} dof)"


@pytest.mark.parametrize("name", SETTINGS)
def test_draws_follow_exactly_the_processed_distribution_over_the_whole_vocabulary(name):
    """10^5 draws over notus's 32,000 tokens, in the GPU's shape (every candidate sorted) and the CPU's
    (the candidates its eager step looks at), each with its block weights summed in token-id order,
    the order CUDA sums them in (its kernel groups the additions its own way: the same distribution,
    not the same bits): no removed token ever, frequencies as the processed distribution's, the same
    tokens in both shapes, and the very tokens `sample()` draws at those token indices."""
    case = DrawCase.of(name)
    settings, logits, prompt, reply = case.settings, case.logits, case.prompt, case.reply
    drawn = {}
    candidates = shortcuts([settings])["candidates"]  # None with top_k 0: the CPU's shape is the GPU's
    shapes = {"gpu": None, **({"cpu": candidates} if candidates else {})}
    for shape, candidates in shapes.items():
        sampler, row = started(1, settings, prompt, reply), torch.tensor([0])
        distribution = sampler.distribution(sampler.scores(logits.clone(), row), row, candidates)
        tokens = case.draws(distribution)
        case.check(tokens, shape)
        drawn[shape] = tokens

        # sample() itself: rows at token indices 0..199 (the prompt's last position, then each one after).
        rows = 200
        sampler = started(rows, settings, prompt, reply)
        positions = len(prompt) - 1 + torch.arange(rows)
        sampled = sampler.sample(logits.expand(rows, VOCAB).clone(), torch.arange(rows), positions, candidates)
        assert torch.equal(sampled, tokens[:rows]), shape
    assert torch.equal(drawn["gpu"], drawn.get("cpu", drawn["gpu"]))


@pytest.mark.parametrize(
    "settings",
    [RowSettings(repetition_penalty=1.3), RowSettings(presence_penalty=1.5), RowSettings(frequency_penalty=0.8),
     RowSettings(repetition_penalty=0.7, presence_penalty=-1.0, frequency_penalty=-0.5)],
    ids=["repetition", "presence", "frequency", "all"],
)
def test_penalties_equal_a_straightforward_reference(settings):
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 60, (30,), generator=generator).tolist()
    reply = torch.randint(30, 90, (40,), generator=generator).tolist()  # overlaps the prompt, repeats itself
    sampler = started(2, settings, prompt, reply)
    logits = torch.randn(1, VOCAB, generator=generator) * 4
    ours = sampler.scores(logits.clone(), torch.tensor([1]))[0]
    expected = torch.tensor(reference_penalties(logits[0].tolist(), prompt, reply, settings))
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("settings", [RowSettings(temperature=0, min_tokens=3), RowSettings(temperature=1.0, min_tokens=3)],
                         ids=["greedy", "sampled"])
def test_min_tokens_holds_off_eos_until_allowed(settings):
    """The hold is what the step subtracts from EOS's score (+inf), in the GPU's shape and the CPU's;
    the scheduler allows EOS before sampling token min_tokens (tests/test_scheduler.py checks when)."""
    for shape in ({}, shortcuts([settings])):  # the GPU's, the CPU's (penalties skipped: no row has one)
        sampler = Sampler(1, VOCAB, EOS, CPU)
        sampler.start(0, settings, torch.tensor([1]))
        logits = torch.zeros(1, VOCAB)
        logits[0, EOS] = 30.0  # EOS is by far the best
        drawn = [sampler.sample(logits.clone(), torch.tensor([0]), torch.tensor([i]), **shape).item() for i in range(3)]
        sampler.allow_eos(0)
        drawn.append(sampler.sample(logits.clone(), torch.tensor([0]), torch.tensor([3]), **shape).item())
        assert EOS not in drawn[:3] and drawn[3] == EOS, (shape, drawn)


def test_draws_depend_only_on_seed_and_token_index():
    """A request's draw for its token i (at position L - 1 + i, L its prompt's length) is the same
    whatever its row, its prompt's length, its max_tokens and the request its slot held before."""
    sampler = Sampler(4, VOCAB, EOS, CPU)
    sampler.start(3, RowSettings(temperature=1.0, seed=9), torch.tensor([1]))  # slot 3's last request
    for slot, seed, prompt, max_tokens in [(0, 5, 1, None), (1, 5, 1, None), (2, 6, 1, None), (3, 5, 7, 20)]:
        sampler.start(slot, RowSettings(temperature=1.0, seed=seed), torch.tensor([1] * prompt), max_tokens)
    logits = torch.randn(1, VOCAB).expand(4, VOCAB).clone()
    first = torch.tensor([0, 0, 0, 6])  # each row's first token's position
    tokens = [sampler.sample(logits.clone(), torch.arange(4), first + i).tolist() for i in range(20)]
    assert all(a == b == d for a, b, _, d in tokens)  # same seed, same draws, whatever the row
    assert any(a != c for a, _, c, _ in tokens)  # another seed, other draws


@pytest.mark.parametrize("settings", [RowSettings(temperature=1.0, top_k=50, top_p=0.5, seed=3),
                                      RowSettings(temperature=1.0, top_k=48, seed=3)], ids=["top_p cut", "top_k cut"])
def test_equal_scores_keep_the_same_tokens_whatever_candidates_the_batch_looks_at(settings):
    """bf16 logits tie often. Where top_p's or top_k's cut falls inside a group of equal scores, the
    tokens kept are the group's lowest ids in every shape: the GPU's full sort, and the CPU's top
    candidates for this row alone or beside a row wanting more; so the draws are the same too."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(1, VOCAB, generator=generator) - 10
    best = torch.randperm(VOCAB, generator=generator)[:60]
    logits[0, best] = 5 - (torch.arange(60) // 5) * 0.25  # twelve groups of five equal scores
    keys = draw_key(torch.full((2000,), settings.seed), torch.arange(2000))[None, :]
    kept, drawn = {}, {}
    for candidates in (None, settings.top_k, 60, 200):
        sampler, row = started(1, settings, [1], []), torch.tensor([0])
        distribution = sampler.distribution(sampler.scores(logits.clone(), row), row, candidates)
        kept[candidates] = sorted(distribution.index[0][distribution.weight[0] > 0].tolist())
        drawn[candidates] = distribution.draw(keys)
    assert len(kept[None]) % 5, "the cut must split a group of equal scores for this test to mean anything"
    assert all(tokens == kept[None] for tokens in kept.values())
    assert all(torch.equal(drawn[None], tokens) for tokens in drawn.values())


@pytest.mark.parametrize("k", [1, 5, 50, 700])
def test_two_pass_top_k_equals_topk(k):
    """The CPU's candidates: the same values and tokens as torch.topk, best first, including rows
    whose best tokens crowd into one block and rows mostly -inf (every token penalised away)."""
    generator = torch.Generator().manual_seed(k)
    scores = torch.randn(6, VOCAB, generator=generator) * 3
    scores[1, 640 : 640 + 2 * k] += 20  # the best all in a few neighbouring blocks
    scores[2, :] = -torch.inf
    scores[2, torch.randperm(VOCAB, generator=generator)[: k + 3]] = torch.randn(k + 3, generator=generator)
    expected_values, expected_tokens = scores.topk(k, dim=-1)
    values, tokens = top_k(scores, k)
    assert torch.equal(values, expected_values)
    assert torch.equal(tokens, expected_tokens)
    assert torch.equal(scores.gather(1, tokens), values)


def test_the_noise_is_finite_and_below_zero_for_every_value_of_its_random_bits():
    """log(u) / weight: a removed token (weight 0) must score -inf, never NaN (0 / 0), whatever the
    bits. log_uniform reads the top 23 of the hash's 64 bits: each of their 2^23 values (negative
    ones included: int64), with the 41 bits it drops all clear and all set."""
    top = torch.arange(-(2**22), 2**22, dtype=torch.long) << 41
    base = RaceNoise(VOCAB, CPU).base
    for dropped in (0, 2**41 - 1):
        noise = log_uniform(top | dropped, base)
        assert torch.isfinite(noise).all() and (noise < 0).all()
        assert (noise / 0 == -torch.inf).all()
        u = (torch.arange(2**23, dtype=torch.float64) + 0.5) / 2**23  # exactly, in float64
        assert torch.equal(noise, u.float().log())
    assert noise.min() > -17  # log(2^-24)


def test_the_race_hash_wraps_as_unsigned_64_bit_arithmetic():
    """The hash relies on int64 products wrapping mod 2^64 and on arithmetic right shifts: checked
    against Python's exact integers for keys over draw_key's whole range (32 random bits + 2^32) and
    every id."""
    noise = RaceNoise(VOCAB, CPU)
    random_bits = torch.randint(0, 2**32, (60,), generator=torch.Generator().manual_seed(0))
    keys = torch.cat([torch.tensor([0, 1, 2**31, 2**32 - 1]), random_bits]) | 2**32
    multipliers = noise.multipliers.tolist()

    def signed(x: int) -> int:
        x %= 2**64
        return x - 2**64 if x >= 2**63 else x

    expected = []
    for key in keys.tolist():
        for m in multipliers:
            x = signed(key * m)
            x = signed(x ^ (x >> 32))  # Python's >> on negative ints is arithmetic, as torch's on int64
            expected.append((signed(x * (0x94D049BB133111EB - 2**64)) >> 41) + 2**22 + 0.5)
    u = torch.tensor(expected, dtype=torch.float64) / 2**23
    assert torch.equal(noise(keys[:, None]).flatten(), u.float().log())


def test_a_token_top_k_removed_is_never_drawn_over_the_whole_vocabulary():
    """The settings and token index that once drew a removed token (with 24-bit noise and the hash of
    that time: seed 1, token index 829, token 28884); today's hash gives other bits there, so this is
    one draw of top_k in the GPU's shape, and the test above tries every value of the noise's bits."""
    sampler = Sampler(1, VOCAB, EOS, CPU)
    sampler.start(0, RowSettings(temperature=0.7, top_k=50, top_p=0.95, seed=1), torch.tensor([1]))
    logits = torch.linspace(10.0, -50.0, VOCAB)[None, :].clone()  # token t is the (t+1)-th best
    token = sampler.sample(logits, torch.tensor([0]), torch.tensor([829]), penalties=False).item()
    assert token < 50


@pytest.mark.parametrize("value", [-torch.inf, torch.nan])
def test_a_row_of_only_minus_inf_or_nan_draws_without_error(value):
    """A model gone wrong: every score becomes the lowest finite one, so every token is as likely as
    any other (top_p 0.5 keeps the first half by token id); greedy takes token 0."""
    sampler = Sampler(2, VOCAB, EOS, CPU)
    sampler.start(0, RowSettings(temperature=1.0, top_p=0.5), torch.tensor([1]))
    sampler.start(1, RowSettings(temperature=0), torch.tensor([1]))
    tokens = [sampler.sample(torch.full((2, VOCAB), value), torch.arange(2), torch.tensor([i, i])).tolist() for i in range(200)]
    sampled, greedy = [t[0] for t in tokens], [t[1] for t in tokens]
    assert all(0 <= t < VOCAB // 2 for t in sampled) and len(set(sampled)) > 150
    assert set(greedy) == {0}


def test_the_two_pass_argmax_is_torchs_first_index_of_the_maximum():
    """Greedy rows on the CPU (first_argmax): the same token as argmax, ties and rows of -inf included."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(-3, 3, (64, 32000), generator=generator).float()  # every row full of ties
    scores[0] = -torch.inf
    scores[1] = -torch.inf
    scores[1, 31999] = 0.0
    scores[2, 31968:] = 5.0  # the maximum only in the last block
    assert torch.equal(first_argmax(scores), scores.argmax(dim=-1))
    column_major = scores.t().contiguous().t()  # as many greedy rows' logits come on the CPU (notus/forward.py)
    assert column_major.stride(0) == 1 and torch.equal(first_argmax(column_major), scores.argmax(dim=-1))


def test_the_cpu_greedy_shortcut_takes_the_gpu_shapes_token_whatever_the_model_writes():
    """The CPU's greedy rows without penalties skip making the scores finite when each row's best is
    finite and above the lowest finite score. Batches with a row where that matters (NaN,
    infinities, only the lowest score, EOS at the best while held) go the full way; batches without
    one (plain rows, scattered -inf, EOS at the best, ties across blocks) go the short way. Either
    takes the token of the GPU's shape, which makes the scores finite first, from logits in either
    layout (many greedy rows get them column-major on the CPU: notus/forward.py)."""
    low = torch.finfo(torch.float32).min
    rows = torch.randn(10, VOCAB, generator=torch.Generator().manual_seed(0))
    rows[1, 7] = torch.nan  # a NaN below the best: it becomes the lowest
    rows[2, [50, 100]] = torch.inf  # both become the highest: the first wins
    rows[3] = -torch.inf
    rows[4] = torch.nan
    rows[5, ::3] = -torch.inf
    rows[6, EOS] = 30.0  # EOS the best: the next best while it is held
    rows[7, EOS] = torch.inf  # the highest, less the hold's +inf: -inf (inf - inf is NaN unmade finite)
    rows[8, [300, 9000, 31000]] = 10.0  # ties in three blocks
    rows[9] = low
    rows[9, 0] = -torch.inf  # as low as every other once finite: token 0 is the first maximum

    def tokens(batch: torch.Tensor, settings: RowSettings, shape: dict, column_major: bool = False) -> tuple[torch.Tensor, bool]:
        """The batch's tokens, and whether the scores were made finite (the full way)."""
        logits = batch.t().contiguous().t() if column_major else batch.clone()
        sampler = Sampler(len(batch), VOCAB, EOS, CPU)
        for slot in range(len(batch)):
            sampler.start(slot, settings, torch.tensor([1]))
        full, scores = [], sampler.scores
        sampler.scores = lambda *args, **kwargs: full.append(True) or scores(*args, **kwargs)
        return sampler.sample(logits, slice(0, len(batch)), torch.zeros(len(batch), dtype=torch.long), **shape), bool(full)

    for min_tokens in (0, 3):  # EOS free, EOS held
        settings = RowSettings(temperature=0, min_tokens=min_tokens)
        cpu = shortcuts([settings])
        assert cpu == {"candidates": 1, "penalties": False}
        for batch, short in ((rows, False), (rows[[0, 5, 6, 8]], True)):
            gpu_tokens = tokens(batch, settings, {})[0]
            for column_major in (False, True):
                cpu_tokens, full = tokens(batch, settings, cpu, column_major)
                assert torch.equal(gpu_tokens, cpu_tokens), (min_tokens, short, column_major, gpu_tokens, cpu_tokens)
                assert full != short
        all_tokens = tokens(rows, settings, cpu)[0]
        assert all_tokens[[1, 2, 8, 9]].tolist() == [rows[1].nan_to_num(nan=low).argmax().item(), 50, 300, 0]
        assert (all_tokens[[6, 7]] != EOS).all() if min_tokens else (all_tokens[[6, 7]] == EOS).all()


def test_settings_are_read_as_float32_holds_them():
    """A temperature that rounds to 0 in float32 is greedy (not 0 / 0 = NaN); a top_p that rounds to 1 is off."""
    sampler = Sampler(2, VOCAB, EOS, CPU)
    sampler.start(0, RowSettings(temperature=1e-46, seed=1), torch.tensor([3]))
    sampler.start(1, RowSettings(temperature=1.0, top_p=1 - 2**-26, seed=1), torch.tensor([3]))
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(0))
    distribution = sampler.distribution(sampler.scores(logits.clone(), slice(0, 2)), slice(0, 2))
    assert not distribution.weight.isnan().any()
    assert (distribution.weight[1] > 0).all()  # every token kept
    assert sampler.sample(logits.clone(), slice(0, 2), torch.zeros(2, dtype=torch.long))[0] == logits[0].argmax()
