"""The engine thread: requests join and leave a running batch at step boundaries.

One long-lived thread owns the model, the KV cache (notus/forward.py) and the sampler
(notus/sampling.py). Each turn of its loop:
1. takes new requests (in order) and drops those whose consumer has stopped (cancel, stop sequence,
   error): a stopped request frees its slot at once, wherever it was;
2. gives free slots to waiting requests, oldest first: where a slot still holds the start of the
   prompt (a finished request's keys and values stay until the slot is needed), its prefill starts
   where they diverge, in that slot or from a copy into another (notus/prefix_cache.py);
3. runs ONE prefill forward of at most CHUNK tokens, packed from the prompts waiting to be
   prefilled, the least left first: each takes what is left of its prompt, of the turn's CHUNK
   tokens and of the window (a chunk), each attending only to itself; so a burst of short prompts
   is prefilled in a few forwards (not one each, every forward reading all the weights), a long
   prompt stalls the decoding batch by one chunk at most and a shorter prompt gets its first token
   within two chunks' time, and a cancel is seen between chunks. Prompts that finish sample their
   first tokens together and join the decoding batch. A packed forward that fails runs each chunk
   again alone, so only a request that fails on its own fails (a chunk that could not be run
   again, one that wraps its ring, is never packed: notus/prefill_plan.py);
4. runs ONE decode step for every decoding slot (a batch bucket of the lowest slots: requests move
   down into slots freed below them, so the bucket covers just the requests in flight), replayed
   on the GPU from the CUDA graph of its batch bucket, each row's attention reading its own ring
   entries (or, where that kernel failed its setup check, of its batch and length bucket, one
   covering every row's position); eager (the CPU), each row reads its own length: rows of one
   length in one call, rows of similar lengths in one masked call, others a call each;
5. hands out the tokens of the previous step: the host reads tokens one step behind, so the GPU
   always has the next step queued and never waits on Python.

A request that fails (out of memory in its prefill, say) fails alone; the others go on.
"""

from __future__ import annotations

import bisect
import logging
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from notus.forward import Forward, KVCache, Segment, one_length
from notus.prefill_plan import plan_chunks
from notus.prefix_cache import PrefixCache
from notus.request import Request, own_copy
from notus.sampling import Sampler, one_pass_greedy, shortcuts

log = logging.getLogger("notus")

LENGTH_BUCKETS = (256, 512, 1024, 1536, 2048, 3072, 4096)  # a graph's attention reads the bucket, not the window


@dataclass
class _Read:
    """Tokens on their way to the host: `values` is ready once `ready` (a CUDA event) is."""

    values: torch.Tensor
    ready: torch.cuda.Event | None
    rows: list[tuple[Request, int]]


class Scheduler:
    def __init__(self, model, eos_id: int, slots: int, cuda_graphs: bool | None = None, reuse: bool = True,
                 pack: bool = True, send_wakeups: Callable[[], None] = lambda: None):
        self.eos_id, self.slots = eos_id, slots
        # Sends the wake-ups requests' wake() noted (notus/wakeups.py): after stopped requests are
        # dropped (their consumers wait for it), and at the end of each turn.
        self.send_wakeups = send_wakeups
        self.pack = pack  # several prompts' chunks in one prefill forward (off: one a turn, to measure the difference)
        self.device = model.device
        self.cuda = self.device.type == "cuda"
        self.cuda_graphs = self.cuda if cuda_graphs is None else cuda_graphs
        self.cache = KVCache(model.config, slots, self.device, model.dtype)
        self.forward = Forward(model, self.cache)
        self.context_length = model.config.max_position_embeddings
        self.sampler = Sampler(slots, model.config.vocab_size, eos_id, self.device, self.context_length)
        self.window = self.cache.window
        self.prefixes = PrefixCache(slots, self.window) if reuse else None
        # Decode inputs per slot, on the device: the last token, its position, whether it decodes.
        self.tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.active = torch.zeros(slots, dtype=torch.bool, device=self.device)
        # Where each row writes its keys and values: its own slot while it decodes, else the scratch slot.
        self.write_slots = torch.full((slots,), self.cache.scratch, dtype=torch.long, device=self.device)
        # The ring entries each row reads with the variable-length kernel (its position + 1 up to the
        # window; 1 while not decoding), and what a step adds to it (1 until it reaches the window):
        # kept so that the step spends one operation on them (see _set_active and _decode_step).
        self.used = torch.ones(slots, dtype=torch.int32, device=self.device)
        self.grow = torch.zeros(slots, dtype=torch.int32, device=self.device)
        self.batch_buckets = sorted({min(2**i, slots) for i in range(slots.bit_length() + 1)})
        # Length buckets bound what SDPA's graphs read; the variable-length kernel reads each row's own.
        self.length_buckets = sorted({min(n, self.window) for n in LENGTH_BUCKETS} | {self.window})
        if self.forward.varlen is not None:
            self.length_buckets = [self.window]
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        # Each graph's logits, kept so a test can compare a replay with the eager step (2 MB each: 32 rows, bf16).
        self.graph_logits: dict[tuple[int, int], torch.Tensor] = {}
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque[Request] = deque()
        self._prefilling: list[Request] = []
        self._decoding: list[Request] = []
        self._free = list(range(slots))
        self._reads: deque[_Read] = deque()
        # Set once the engine thread has ended (closed, or failed itself): what submit() answers then.
        self._stopped: str | None = None
        self._stopping = threading.Lock()  # a request submitted as the thread ends is ended, not lost
        self._broken: Exception | None = None  # what a device write that frees a slot raised (_finish)
        self.kv_entries = {"read": 0, "live": 0, "steps": 0}  # decode attention's ring entries, summed (_count_kv)
        self._thread = threading.Thread(target=self._serve, name="notus-engine", daemon=True)
        self._thread.start()

    # --- the consumers' side ---

    def submit(self, request: Request) -> Request:
        """Queues `request`. Once the engine thread has ended, raises RuntimeError with the reason
        (the request is then done: its consumer has nothing to wait for)."""
        with self._stopping:
            if self._stopped is None:
                self._inbox.put(request)
                return request
        request.end_unserved(self._stopped, wake=False)
        raise RuntimeError(self._stopped)

    def call(self, fn: Callable[[], object]) -> object:
        """Runs `fn` on the engine thread (where the CUDA graphs live) between turns; its result."""
        future: Future = Future()
        with self._stopping:
            if self._stopped is not None:
                raise RuntimeError(self._stopped)
            self._inbox.put((fn, future))
        return future.result()

    @property
    def alive(self) -> bool:
        """Whether the engine thread still serves requests (predict.py's healthcheck): `_stop`, the
        thread's last act whatever ends it, sets `_stopped`."""
        return self._stopped is None

    def close(self) -> None:
        """Stops the engine thread: the requests still in flight or queued end with "the engine is closed"."""
        self._inbox.put(None)
        self._thread.join()

    def capture_graphs(self) -> int:
        """Captures a CUDA graph for every batch and length bucket (setup's warm-up); how many."""
        if self.cuda_graphs:
            self.call(self._capture_all)
        return len(self.graphs)

    # --- the engine thread ---

    def _serve(self) -> None:
        stopped = "the engine is closed"
        try:
            with torch.inference_mode():
                while self._take_new(block=not self._busy()):
                    try:
                        self._turn()
                    except Exception as e:  # a bug, not a request's fault: fail what is in flight, keep serving
                        self._reads.clear()
                        self._fail([*self._waiting, *self._prefilling, *self._decoding], e)
                    self.send_wakeups()
                    if self._broken is not None:  # the device refused to free a slot: nothing more will run
                        raise self._broken
        except BaseException as e:  # the thread itself fails: a broken device, or a bug outside a turn
            log.critical("the engine thread stopped:\n%s", "".join(traceback.format_exception(e)))
            stopped = f"the engine stopped after an internal error ({type(e).__name__}: {e}); the server must restart"
        finally:  # no request may wait for a thread that is gone: every one left ends now
            self._stop(stopped)

    def _stop(self, reason: str) -> None:
        """Ends every request and call() still waiting, host-side only (the device may be what failed)."""
        with self._stopping:
            self._stopped = reason
            left = [*self._waiting, *self._prefilling, *self._decoding]
            while not self._inbox.empty():
                item = self._inbox.get_nowait()
                if isinstance(item, tuple):
                    item[1].set_exception(RuntimeError(reason))
                elif item is not None:
                    left.append(item)
        for request in left:
            if not request.done.is_set():
                request.end_unserved(reason)
        self.send_wakeups()

    def _turn(self) -> None:
        self._drop_stopped()
        self.send_wakeups()  # before this turn's prefill and step: a stopped request's end waits for neither
        self._admit()
        self._compact()
        if self._prefilling:
            self._prefill(plan_chunks(self._prefilling, self.window, self.pack))
        launched = self._decode_step()
        self._hand_out(keep_newest=launched)

    def _busy(self) -> bool:
        return bool(self._waiting or self._prefilling or self._decoding or self._reads)

    def _take_new(self, block: bool) -> bool:
        """Moves new requests to the waiting line and runs call()s; False once closed."""
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if item is None:
                return False
            if isinstance(item, tuple):
                fn, future = item
                try:
                    future.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    future.set_exception(e)
            else:
                item.queued_at = time.perf_counter()
                if len(item.input_ids) + item.max_tokens > self.context_length:  # Engine fits them first
                    # Its token indices would run past the sampler's tables (on a GPU, a device assert).
                    self._fail([item], ValueError(f"{len(item.input_ids)} prompt tokens and max_tokens "
                                                  f"{item.max_tokens} exceed the context of {self.context_length}"))
                else:
                    self._waiting.append(item)

    def _drop_stopped(self) -> None:
        for request in [*self._waiting, *self._prefilling, *self._decoding]:
            if request.stop.is_set():
                self._finish(request)

    def _admit(self) -> None:
        while self._free and self._waiting:
            request = self._waiting.popleft()
            self._prefilling.append(request)  # first: whatever fails below, it fails with the others
            if self.prefixes is None:
                slot, source = self._free[0], None  # the lowest free slot: batch buckets stay small
            else:
                busy = [r.slot for r in (*self._prefilling, *self._decoding) if r.slot is not None]
                slot, request.cached, source = self.prefixes.choose(self._free, busy, request.input_ids)
            self._free.remove(slot)
            request.slot = slot
            request.admitted_at = time.perf_counter()
            if self.prefixes is not None:
                if source is not None:  # the prefix's keys and values, copied on the device
                    self.cache.copy_prefix(source, slot, request.cached)
                self.prefixes.taken(slot, request.input_ids, request.cached)
                request.prefilled = request.cached

    def _compact(self) -> None:
        """Active rows first: while a free slot lies below an occupied one, the highest occupied
        request moves down into it, so a decode step's batch bucket covers just the requests in
        flight (one request left in slot 20 would otherwise make every step compute and read 32
        rows). The move is on the device, ordered after the step in flight; the free slot's held
        prefix (a finished conversation) moves up in exchange, so it stays reusable."""
        occupied = {r.slot: r for r in (*self._prefilling, *self._decoding) if r.slot is not None}
        while self._free and occupied and self._free[0] < max(occupied):
            request = occupied.pop(max(occupied))
            source, target = request.slot, self._free.pop(0)
            self._move(request, target)
            occupied[target] = request
            bisect.insort(self._free, source)

    def _move(self, request: Request, target: int) -> None:
        source = request.slot
        written = min(self.window, request.prefilled + request.sampled + 1)  # ring entries it wrote (+1: safe)
        if self.prefixes is None:
            self.cache.copy_prefix(source, target, written)
        else:
            kept = len(self.prefixes.held[target] or ())  # what the free slot holds for reuse
            self.cache.swap(source, target, max(written, min(kept, self.window)))
            self.prefixes.swap(source, target)
        self.sampler.move(source, target)
        for state in (self.tokens, self.positions):
            state[target].copy_(state[source])
        self._set_active(target, request in self._decoding and request.sampled < request.max_tokens,
                         len(request.input_ids) + request.sampled)
        self._set_active(source, False)
        request.slot = target

    def _prefill(self, chunks: list[tuple[Request, int]]) -> None:
        """Runs the chunks in one forward. If a packed forward fails, each chunk runs again alone
        (see plan_chunks: each may), so that only a request that fails on its own fails."""
        if len(chunks) > 1:
            try:
                logits = self._forward(chunks)
            except Exception as e:  # noqa: BLE001 - each chunk runs alone below
                log.warning("a prefill of %d prompts together failed, each runs alone: %r", len(chunks), e)
                e.__traceback__ = None  # its frames (and their tensors) go now
            else:
                self._prefilled(chunks, logits)
                return
        for chunk in chunks:
            try:
                logits = self._forward([chunk])
            except Exception as e:  # this request fails alone; its tensors go with the frames
                self._fail([chunk[0]], e)
            else:
                self._prefilled([chunk], logits)

    def _forward(self, chunks: list[tuple[Request, int]]) -> torch.Tensor:
        """The chunks' prefill forward (one transfer of their ids to the device); each one's last logits."""
        ids = self._on_device([t for r, n in chunks for t in r.input_ids[r.prefilled : r.prefilled + n]])
        per_chunk = ids.split([n for _, n in chunks])
        return self.forward.prefill([Segment(r.slot, own, r.prefilled) for (r, _), own in zip(chunks, per_chunk)])

    def _prefilled(self, chunks: list[tuple[Request, int]], logits: torch.Tensor) -> None:
        """Notes the chunks as done; those that end their prompt start decoding."""
        for request, n in chunks:
            if self.prefixes is not None:
                self.prefixes.extend(request.slot, request.input_ids[request.prefilled : request.prefilled + n])
            request.prefilled += n
        done = [row for row, (r, _) in enumerate(chunks) if r.prefilled == len(r.input_ids)]
        if not done:
            return
        requests = [chunks[row][0] for row in done]
        try:
            self._start_decoding(requests, logits if len(done) == len(chunks) else
                                 logits.index_select(0, self._on_device(done)))
        except Exception as e:  # their first tokens failed, as a failing decode step fails its rows
            self._fail(requests, e)

    def _start_decoding(self, requests: list[Request], logits: torch.Tensor) -> None:
        """Their first tokens (`logits` [requests, vocab]) sampled together; they join the decoding batch."""
        slots = self._on_device([r.slot for r in requests])
        last = self._on_device([len(r.input_ids) - 1 for r in requests])  # the prompts' last positions
        for request in requests:
            self.sampler.start(request.slot, request.settings, self._on_device(request.input_ids), request.max_tokens)
        first = self.sampler.sample(logits, slots, last, **self._shortcuts(requests))
        self.tokens[slots] = first
        self.positions[slots] = last + 1
        for request in requests:
            request.sampled = 1
            self._set_active(request.slot, request.sampled < request.max_tokens, len(request.input_ids) + 1)
            self._prefilling.remove(request)
            self._decoding.append(request)
        self._queue_read(first, [(request, row) for row, request in enumerate(requests)])

    def _on_device(self, ids: list[int]) -> torch.Tensor:
        """`ids` as a tensor on the engine's device. To a GPU from pinned memory, copied asynchronously:
        `torch.tensor(ids, device=cuda)` copies from pageable memory and waits for the steps in flight."""
        host = torch.tensor(ids, dtype=torch.long, pin_memory=self.cuda)
        return host.to(self.device, non_blocking=True) if self.cuda else host

    def _decode_step(self) -> bool:
        rows = [r for r in self._decoding if r.sampled < r.max_tokens]
        if not rows:
            return False
        batch = self._bucket(self.batch_buckets, max(r.slot for r in rows) + 1)
        # The entries each row's attention reads: up to the position it feeds this step.
        lengths = [1] * batch  # rows not decoding (the batch bucket's padding) read one
        for r in rows:
            lengths[r.slot] = min(len(r.input_ids) + r.sampled, self.window)
        live = sum(lengths[r.slot] for r in rows)  # each decoding row's own entries
        for r in rows:
            if r.sampled == r.settings.min_tokens:  # this step samples its token min_tokens: EOS may come
                self.sampler.allow_eos(r.slot)
        try:
            if self.cuda_graphs:
                length = self._bucket(self.length_buckets, max(lengths))
                self._count_kv(sum(lengths) if self.forward.varlen else batch * length, live)
                if (batch, length) in self.graphs:
                    self.graphs[batch, length].replay()
                else:
                    self._step(batch, length)  # uncaptured (tests run the graphs' shapes on the CPU)
            else:
                if batch > 1 and not one_length(lengths) and batch * max(lengths) <= 2 * sum(lengths):
                    # Rows of similar lengths: one masked call over the longest reads at most twice
                    # what is live, and costs less than a call per row (kept for lengths far apart).
                    # Rows of one length stay a list: one call, no mask (Forward.decode).
                    lengths = max(lengths)
                self._count_kv(batch * lengths if isinstance(lengths, int) else sum(lengths), live)
                self._step(batch, lengths, **self._shortcuts(rows))
        except Exception as e:  # a failing step fails the requests in it
            self._fail(rows, e)
            return False
        for r in rows:
            r.sampled += 1
            if len(r.input_ids) + r.sampled == self.window:  # its next steps read the whole window
                self.grow[r.slot].fill_(0)
            if r.sampled == r.max_tokens:
                self._set_active(r.slot, False)  # its last token is sampled; it only waits to be read
        self._queue_read(self.tokens[:batch], [(r, r.slot) for r in rows])
        return True

    def _count_kv(self, read: int, live: int) -> None:
        """Adds this step's ring entries read by attention and those live (each decoding row's own) to
        `kv_entries`: what a step reads beyond what it needs (x `cache.bytes_per_entry` for bytes)."""
        self.kv_entries["read"] += read
        self.kv_entries["live"] += live
        self.kv_entries["steps"] += 1

    def _step(self, batch: int, lengths: int | list[int], candidates: int | None = None,
              penalties: bool = True) -> torch.Tensor:
        """One decode step of slots 0..batch-1; the new tokens land in self.tokens (fixed buffers).
        Returns the step's logits (as sampling left them: float32 ones are processed in place; a
        column-major view where the step was greedy without penalties: Forward.decode)."""
        positions, used = self.positions[:batch], self.used[:batch]
        # Where the sampler's one pass reads them, the logits may come column-major (faster for many rows on the CPU).
        logits = self.forward.decode(self.tokens[:batch], positions, self.write_slots[:batch], used, lengths,
                                     column_major=one_pass_greedy(candidates, penalties))
        self.sampler.sample(logits, slice(0, batch), positions, candidates, penalties, out=self.tokens[:batch])
        positions.add_(self.active[:batch])  # in place on the view: `+=` would copy it onto itself after
        if self.forward.varlen is not None:
            used.add_(self.grow[:batch])
        return logits

    def _set_active(self, slot: int, decoding: bool, entries: int = 1) -> None:
        """Whether `slot`'s row decodes: its position advances, its keys and values go to its own slot
        and its next step reads `entries` ring entries (its position + 1; a row not decoding pads the
        batch bucket: it writes to the scratch slot and reads one entry)."""
        entries = min(entries, self.window) if decoding else 1
        self.active[slot].fill_(decoding)
        self.write_slots[slot].fill_(slot if decoding else self.cache.scratch)
        self.used[slot].fill_(entries)
        self.grow[slot].fill_(int(decoding and entries < self.window))

    def _shortcuts(self, rows: list[Request]) -> dict:
        """Work the sampler may skip for these rows (none with CUDA graphs: one graph fits all)."""
        return {} if self.cuda_graphs else shortcuts([r.settings for r in rows])

    @staticmethod
    def _bucket(buckets, n: int) -> int:
        return buckets[bisect.bisect_left(buckets, n)]

    def _queue_read(self, values: torch.Tensor, rows: list[tuple[Request, int]]) -> None:
        if not self.cuda:
            self._reads.append(_Read(values.clone(), None, rows))
            return
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        self._reads.append(_Read(host, ready, rows))

    def _hand_out(self, keep_newest: bool) -> None:
        """Delivers read tokens; with `keep_newest` the step just queued stays in flight."""
        while len(self._reads) > (1 if keep_newest else 0):
            read = self._reads.popleft()
            if read.ready is not None:
                read.ready.synchronize()  # this step only, not the one queued after it
            values = read.values.tolist()
            now = time.perf_counter()
            for request, row in read.rows:
                if request.done.is_set():
                    continue  # finished or stopped while the step was in flight
                token = values[row]
                if request.first_token_at is None:
                    request.first_token_at = now
                request.last_token_at = now
                if self.prefixes is not None and request.delivered:  # this step fed the one before
                    self.prefixes.extend(request.slot, [request.last_token])
                request.tokens.append(token)
                request.last_token = token
                request.delivered += 1
                if token == self.eos_id or request.delivered == request.max_tokens:
                    self._finish(request)  # wakes it
                else:
                    request.wake()

    def _finish(self, request: Request) -> None:
        """Ends a request wherever it is and frees its slot. Never raises: a device that refuses even
        this write is broken (a sticky CUDA error), noted in `_broken` for the engine thread to stop on."""
        for line in (self._waiting, self._prefilling, self._decoding):
            if request in line:
                line.remove(request)
        if request.slot is not None:
            slot, request.slot = request.slot, None
            bisect.insort(self._free, slot)
            try:
                self._set_active(slot, False)
            except Exception as e:  # noqa: BLE001 - the request still ends; the engine stops after this turn
                self._broken = self._broken or e
        request.end()

    def _fail(self, requests: list[Request], error: Exception) -> None:
        # Logged as text, then cut from its traceback: nothing (not even a log handler keeping the
        # record) holds the failed work's frames, so its tensors are freed now, not at the next request.
        log.error("generation failed for %d request(s):\n%s", len(requests), "".join(traceback.format_exception(error)))
        error.__traceback__ = error.__context__ = error.__cause__ = None
        for request in requests:
            request.error = own_copy(error)  # each its own (see own_copy)
            if self.prefixes is not None and request.slot is not None:
                self.prefixes.forget(request.slot)  # what its work left in the slot is unknown
            self._finish(request)

    # --- CUDA graphs ---

    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        for batch in self.batch_buckets:
            for length in self.length_buckets:
                # Warm-up runs on a side stream (cuBLAS workspaces, lazy inits), then the capture.
                # No slot is active yet: every write goes to the scratch slot.
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self._step(batch, length)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.graph_logits[batch, length] = self._step(batch, length)
                self.graphs[batch, length] = graph
        torch.cuda.synchronize()
