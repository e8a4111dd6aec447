"""How uniform and independent the sampler's race noise is: the hash of notus/sampling.py's RaceNoise
against the 32-bit hash it replaced (lowbias32 of key ^ a Weyl term, top 23 bits) and against
independent random numbers (torch's generator: what a perfect hash gives).

For `--keys` draw keys (draw_key(seed, 0..K-1)) and the 381 ids of a row's draw, each hash's top 23
bits as u in (0, 1): the largest |z| of the 381 means, of the 381 x 380 pairwise correlations and of
the pairwise race wins among 80 ids (u_i > u_j half the time); and the p-values of chi-square tests
of exponential races argmax(log(u) / w) against w / sum(w), for a few weight sets. With a perfect
hash the largest |z| are about 3-4 (means), 4.5 (correlations), 3.5 (wins), and the p-values uniform.

    python scripts/noise_quality.py --keys 2000000 --seed 7    # about 4 minutes a hash on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from notus.sampling import _M32, BLOCK, RaceNoise, draw_key  # noqa: E402

VOCAB = 32000
IDS = 32000 // BLOCK + BLOCK  # 125 blocks, then 256 places


def lowbias32_bits(keys: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
    """The hash before (until 2026-11-29): lowbias32 of key ^ term, less its last xorshift, bits 9-31."""
    x = (keys[:, None] & _M32) ^ terms  # draw_key's 32 random bits (it adds 2^32 for the race hash)
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    return ((x * 0x735A2D97) & _M32) >> 9


def races() -> dict[str, tuple[int, torch.Tensor]]:
    """Weight sets raced (the first id each covers, the weights): exponential weights over the 256
    places and over the 125 blocks, two equal weights, weights 1 against 2^-10, the first and last place."""
    g = torch.Generator().manual_seed(0)
    places = torch.empty(BLOCK).exponential_(generator=g)
    blocks = torch.empty(VOCAB // BLOCK).exponential_(generator=g)

    def two(a: float, b: float, at: int = 1) -> torch.Tensor:
        w = torch.zeros(BLOCK)
        w[0], w[at] = a, b
        return w

    first_place = VOCAB // BLOCK
    return {"places, exponential": (first_place, places), "blocks, exponential": (0, blocks),
            "1 and 1": (first_place, two(1, 1)), "1 and 2^-10": (first_place, two(1, 2**-10)),
            "first and last place": (first_place, two(1, 1, BLOCK - 1))}


def measure(bits_of, keys: int, seed: int) -> dict:
    weights = races()
    counts = {name: torch.zeros(len(w), dtype=torch.float64) for name, (_, w) in weights.items()}
    total, products = torch.zeros(IDS, dtype=torch.float64), torch.zeros(IDS, IDS, dtype=torch.float64)
    some = torch.cat([torch.arange(40), VOCAB // BLOCK + torch.arange(40)])  # 40 blocks, 40 places
    wins = torch.zeros(len(some), len(some), dtype=torch.int64)
    chunk = 100_000
    for start in range(0, keys, chunk):
        n = min(chunk, keys - start)
        m = bits_of(draw_key(torch.full((n,), seed), torch.arange(start, start + n)))
        log_u = torch.log((m + 0.5) * 2.0**-23)  # float32, as log_uniform
        for name, (first, w) in weights.items():
            won = (log_u[:, first : first + len(w)] / w).argmax(-1)
            counts[name] += torch.bincount(won, minlength=len(w)).double()
        u = (m.double() + 0.5) / 2**23 - 0.5
        total += u.sum(0)
        products += u.T @ u
        for s in range(0, n, 10_000):
            b = u[s : s + 10_000, some]
            wins += (b[:, :, None] > b[:, None, :]).sum(0)
    mean = total / keys
    cov = products / keys - mean[:, None] * mean[None, :]
    sd = cov.diag().sqrt()
    off_diagonal = ~torch.eye(IDS, dtype=torch.bool)
    corr = (cov / (sd[:, None] * sd[None, :]))[off_diagonal]
    win_z = (wins.double() / keys - 0.5) / math.sqrt(0.25 / keys)
    out = {"max |z| of the means": (mean.abs() / math.sqrt(1 / 12 / keys)).max().item(),
           "max |z| of the correlations": (corr.abs() * math.sqrt(keys)).max().item(),
           "max |z| of the pairwise wins": win_z[~torch.eye(len(some), dtype=torch.bool)].abs().max().item()}
    for name, (_, w) in weights.items():
        kept = w > 0
        expected = keys * w[kept].double() / w.sum()
        chi2 = ((counts[name][kept] - expected) ** 2 / expected).sum()
        dof = int(kept.sum()) - 1
        out[f"race p-value, {name}"] = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), chi2 / 2).item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=2_000_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--hashes", nargs="+", default=["race", "lowbias32", "random"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    noise = RaceNoise(VOCAB, torch.device("cpu"))
    ids = torch.cat([VOCAB + torch.arange(VOCAB // BLOCK), torch.arange(BLOCK)])
    generator = torch.Generator().manual_seed(args.seed)
    hashes = {"race": lambda k: (noise.bits(k[:, None])[:, 0] >> 41) + 2**22,  # the top 23 bits, as 0..2^23-1
              "lowbias32": lambda k: lowbias32_bits(k, (ids * 0x9E3779B1) & _M32),
              "random": lambda k: torch.randint(0, 2**23, (k.shape[0], IDS), generator=generator)}
    for name in args.hashes:
        result = {"hash": name, "keys": args.keys, "seed": args.seed, **measure(hashes[name], args.keys, args.seed),
                  "torch": torch.__version__, "command": "python scripts/noise_quality.py " + " ".join(sys.argv[1:])}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
