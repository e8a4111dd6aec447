"""The batched sampler (notus/sampling.py): exactly the processed distribution, penalties as their reference."""

from __future__ import annotations

import math

import pytest
import torch

from notus.sampling import RowSettings, Sampler, gumbel_noise, gumbel_of_bits, top_k

VOCAB, EOS = 32000, 2
CPU = torch.device("cpu")


def reference_distribution(logits: torch.Tensor, s: RowSettings) -> torch.Tensor:
    """The processed distribution, written out plainly: temperature, then top_k, then top_p."""
    probs = torch.softmax(logits.double() / s.temperature, dim=-1)
    order = probs.argsort(descending=True).tolist()
    kept = order[: s.top_k] if s.top_k else order
    total = sum(probs[i].item() for i in kept)
    chosen, mass = [], 0.0
    for i in kept:  # the smallest set of the best tokens whose renormalised mass reaches top_p
        chosen.append(i)
        mass += probs[i].item() / total
        if s.top_p < 1 and mass >= s.top_p:
            break
    out = torch.zeros_like(probs)
    out[chosen] = probs[chosen]
    return out / out.sum()


@pytest.mark.parametrize(
    "settings",
    [RowSettings(temperature=1.0), RowSettings(temperature=0.6, top_k=5),
     RowSettings(temperature=1.4, top_p=0.8), RowSettings(temperature=0.9, top_k=7, top_p=0.9)],
    ids=["plain", "top_k", "top_p", "both"],
)
def test_draws_follow_exactly_the_processed_distribution(settings):
    # A small vocabulary keeps 20,000 draws fast; the code does not depend on its size. Ten
    # plausible tokens and a tail, as a language model's logits look.
    vocab = 64
    logits = torch.full((vocab,), -4.0)
    logits[10:20] = torch.tensor([3.0, 2.5, 2.2, 2.0, 1.5, 1.4, 0.9, 0.3, -0.5, -1.0])
    expected = reference_distribution(logits, settings)
    rows = 4000
    sampler = Sampler(rows, vocab, EOS, CPU)
    for slot in range(rows):
        sampler.start(slot, RowSettings(**{**settings.__dict__, "seed": slot}), torch.tensor([1]))
    counts = torch.zeros(vocab, dtype=torch.float64)
    slots = torch.arange(rows)
    for _ in range(5):  # 20,000 draws: 4,000 seeds, 5 tokens each
        tokens = sampler.sample(logits.expand(rows, vocab).clone(), slots)
        counts += torch.bincount(tokens, minlength=vocab).double()
    n = counts.sum().item()
    assert counts[expected == 0].sum() == 0, "drew a token the processing removed"
    # Pearson's chi-squared: each plausible token a bin, the tail pooled into one.
    head = torch.zeros(vocab, dtype=torch.bool)
    head[10:20] = True
    observed = torch.cat([counts[head], counts[~head].sum()[None]])
    wanted = n * torch.cat([expected[head], expected[~head].sum()[None]])
    observed, wanted = observed[wanted > 0], wanted[wanted > 0]
    assert (wanted >= 5).all()
    chi2 = ((observed - wanted) ** 2 / wanted).sum().item()
    dof = len(wanted) - 1
    # The 0.999 quantile of chi-squared (Wilson-Hilferty): a correct sampler fails 1 run in 1,000,
    # and these seeds are fixed, so the outcome is the same every run.
    z = 3.09
    limit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 <= limit, f"chi2 {chi2:.1f} > {limit:.1f} (dof {dof}): {observed.tolist()} vs {wanted.tolist()}"


def reference_penalties(logits: list[float], prompt: list[int], reply: list[int], s: RowSettings) -> list[float]:
    """generate's repetition penalty over prompt + reply, then OpenAI's penalties over the reply."""
    out = list(logits)
    for token in set(prompt) | set(reply):
        out[token] = out[token] * s.repetition_penalty if out[token] < 0 else out[token] / s.repetition_penalty
    for token in set(reply):
        out[token] -= s.frequency_penalty * reply.count(token) + s.presence_penalty
    return out


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
    sampler = Sampler(2, VOCAB, EOS, CPU)
    sampler.start(1, settings, torch.tensor(prompt))
    for token in reply:  # the reply so far, as the sampler would have drawn it
        sampler.counts[1, token] += 1
        sampler.seen[1, token] = True
    logits = torch.randn(1, VOCAB, generator=generator) * 4
    ours = sampler._penalised(logits.clone(), torch.tensor([1]))[0]
    expected = torch.tensor(reference_penalties(logits[0].tolist(), prompt, reply, settings))
    torch.testing.assert_close(ours, expected)


def test_min_tokens_holds_off_eos_then_lets_it_through():
    sampler = Sampler(1, VOCAB, EOS, CPU)
    sampler.start(0, RowSettings(temperature=0, min_tokens=3), torch.tensor([1]))
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 10.0  # EOS is by far the best
    drawn = [sampler.sample(logits.clone(), torch.tensor([0])).item() for _ in range(4)]
    assert EOS not in drawn[:3] and drawn[3] == EOS


def test_noise_depends_only_on_seed_index_and_token():
    sampler = Sampler(3, VOCAB, EOS, CPU)
    for slot, seed in enumerate([5, 5, 6]):
        sampler.start(slot, RowSettings(temperature=1.0, seed=seed), torch.tensor([1]))
    logits = torch.randn(1, VOCAB).expand(3, VOCAB).clone()
    tokens = [sampler.sample(logits.clone(), torch.arange(3)).tolist() for _ in range(20)]
    assert all(a == b for a, b, _ in tokens)  # same seed, same draws, whatever the row
    assert any(a != c for a, _, c in tokens)  # another seed, other draws


@pytest.mark.parametrize("k", [1, 5, 50, 700])
def test_two_pass_top_k_equals_topk(k):
    """The CPU's candidates: the same values and tokens as torch.topk, best first, including rows
    whose best tokens crowd into one block and rows mostly -inf (every token penalised away)."""
    generator = torch.Generator().manual_seed(k)
    scores = torch.randn(6, VOCAB, generator=generator) * 3
    scores[1, 640:640 + 2 * k] += 20  # the best all in a few neighbouring blocks
    scores[2, :] = -torch.inf
    scores[2, torch.randperm(VOCAB, generator=generator)[: k + 3]] = torch.randn(k + 3, generator=generator)
    expected_values, expected_tokens = scores.topk(k, dim=-1)
    values, tokens = top_k(scores, k)
    assert torch.equal(values, expected_values)
    assert torch.equal(tokens, expected_tokens)
    assert torch.equal(scores.gather(1, tokens), values)


def test_the_noise_is_finite_for_every_value_of_its_random_bits():
    # gumbel_of_bits reads the top 23 of the hash's 32 bits: each of their 2^23 values, with the 9
    # bits it drops all clear and all set.
    top = torch.arange(2**23, dtype=torch.long) << 9
    for dropped in (0, 2**9 - 1):
        noise = gumbel_of_bits(top | dropped)
        assert torch.isfinite(noise).all()
    assert noise.min() > -3 and noise.max() < 17  # Gumbel's range at this resolution


def test_a_token_top_k_removed_is_never_drawn_over_the_whole_vocabulary():
    """The draw that picked a removed token with 24-bit noise (its noise was +inf: -inf + inf is NaN,
    which argmax takes): seed 1, token index 829, token 28884. The GPU's shape, every candidate
    sorted, so noise is drawn for all 32,000 tokens."""
    assert torch.isfinite(gumbel_noise(torch.tensor([1]), torch.tensor([829]), torch.tensor([[28884]]))).all()
    sampler = Sampler(1, VOCAB, EOS, CPU)
    sampler.start(0, RowSettings(temperature=0.7, top_k=50, top_p=0.95, seed=1), torch.tensor([1]))
    sampler.generated[0] = 829
    logits = torch.linspace(10.0, -50.0, VOCAB)[None, :].clone()  # token t is the (t+1)-th best
    token = sampler.sample(logits, torch.tensor([0]), penalties=False).item()
    assert token < 50
