"""Operations of one decode step, as a CUDA graph replays them: what each costs a kernel launch.

Counted with a TorchDispatchMode on the step the graphs capture (`Scheduler._step` with one length
bucket for every row), eagerly, on any device. Views (slices, reshapes, transposes) and empty
tensors (an allocation from the graph's pool, no kernel) launch nothing and are not counted. Per layer: the step with every layer less the step with one fewer; outside:
the rest (embedding, rotary tables, the final norm and the vocabulary projection, the sampler).
"""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

VIEWS = {"view", "_unsafe_view", "slice", "select", "unsqueeze", "squeeze", "transpose", "t", "reshape",
         "expand", "as_strided", "alias", "detach", "permute", "flatten", "unflatten", "split", "chunk",
         "empty", "new_empty", "empty_like", "empty_strided"}


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def decode_step_ops(scheduler, batch: int = 4, length: int = 256) -> dict:
    """{"total", "per_layer", "outside"} for one graph-shaped decode step of `batch` rows (run on the
    engine thread; no request may be in flight). The step writes only to the scratch slot."""
    forward = scheduler.forward
    layers = forward.weights

    def count(n_layers: int) -> int:
        counter = _Counter()
        forward.weights = layers[:n_layers]
        try:
            with counter:
                scheduler._step(batch, length)
        finally:
            forward.weights = layers
        return len(counter.ops)

    total, fewer = scheduler.call(lambda: (count(len(layers)), count(len(layers) - 1)))
    per_layer = total - fewer
    return {"total": total, "per_layer": per_layer, "outside": total - len(layers) * per_layer}
