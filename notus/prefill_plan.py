"""Which prompts a prefill forward takes, and how much of each (the engine thread's step 3, notus/scheduler.py)."""

from __future__ import annotations

from notus.request import Request

CHUNK = 2048  # prefill tokens per turn
PASSED_TURNS = 2  # turns a prefilling request may be left out before it goes first


def plan_chunks(prefilling: list[Request], window: int, pack: bool = True) -> list[tuple[Request, int]]:
    """This turn's prefill: (request, tokens) for each chunk of the one forward, from the requests
    still prefilling (oldest first); notes in each request's `passed` whether it was left out.

    In order of least prompt left (the oldest of equals), each takes min(its prompt left, the
    turn's budget left, the window) until CHUNK tokens are taken: a burst of short prompts is
    prefilled in a few forwards, a short prompt behind a long one waits for the chunk in
    progress and then runs in the next (two chunks' time at most: a request left out for
    PASSED_TURNS turns goes first, for one turn), and a long prompt gets what the short ones
    leave. Without packing (`pack` off): the first one only.

    The re-run rule: a packed forward that fails is run again chunk by chunk (Scheduler._prefill),
    so each chunk must give the same result when run again. A chunk that wraps its ring (start >
    0 and start + tokens > window) writes entries it also reads (its held positions) and cannot
    be run again: it runs alone, when it comes first.
    """
    budget, chunks = CHUNK, []
    # A request left out of PASSED_TURNS turns in a row goes first, so that a long prompt whose
    # chunks must run alone is not held back for ever by a stream of shorter ones.
    order = sorted(prefilling, key=lambda r: (r.passed < PASSED_TURNS, len(r.input_ids) - r.prefilled))
    for request in order:  # sorted() is stable: the oldest first among equals
        if budget == 0:
            break
        start = request.prefilled
        n = min(len(request.input_ids) - start, budget, window)
        if 0 < start and start + n > window:  # wraps its ring: alone
            if not chunks:
                chunks.append((request, n))
                break
            continue
        chunks.append((request, n))
        budget -= n
        if not pack:
            break
    taken = {id(request) for request, _ in chunks}
    for request in prefilling:
        request.passed = 0 if id(request) in taken else request.passed + 1
    return chunks
