"""Count the operations that make the host wait for the device.

On a GPU the host queues kernels ahead of the device; an op whose result size or value the host
needs (`.item()`, `bool(t)`, `nonzero`, boolean indexing, CUDA `bincount`, `unique`, a copy to the
CPU) stalls that queue until the device catches up. The trainer promises none of them between
logging points. `SyncCounter` counts them on any device, the CPU included, by watching every op
dispatched inside it (a `TorchDispatchMode`), so CPU tests can hold that promise for CUDA. On
CUDA it also counts copies between the CPU and the GPU that block the host (a pageable source, or
any copy back to the CPU).

It sees eager ops only: inside a compiled graph the ops are inductor's kernels. On CUDA,
`torch.cuda.set_sync_debug_mode("warn")` covers compiled code too (the GPU smoke test uses both).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops whose output the host must read before it can go on (sizes or values); boolean indexing and
# masked assignment dispatch `nonzero`, `.tolist()` and `bool()` dispatch `_local_scalar_dense`
SYNCING = frozenset({
    "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::nonzero",
    "aten::masked_select", "aten::unique", "aten::_unique", "aten::_unique2", "aten::unique_dim",
    "aten::unique_consecutive", "aten::bincount", "aten::histc", "aten::allclose",
})
# these take an optional output size; given it, they do not sync
SIZE_OPTIONAL = {"aten::repeat_interleave": "output_size"}
MASK_INDEXED = frozenset({"aten::index", "aten::index_put_", "aten::index_put", "aten::_index_put_impl_"})


def _bool_indexed(name: str, args) -> bool:
    """x[mask] and x[mask] = v: the result's size is the mask's count, read on the host."""
    if name not in MASK_INDEXED or len(args) < 2:
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ())


def _blocking_copy(name: str, args, kwargs) -> bool:
    """A copy between host and GPU that blocks the host: to the CPU (always, for a value the host
    can read), or from pageable host memory."""
    if name not in ("aten::_to_copy", "aten::copy_"):
        return False
    if name == "aten::copy_":
        dst, src = args[0], args[1]
        if not isinstance(src, torch.Tensor):
            return False
        dst_dev, src_dev = dst.device, src.device
    else:
        src = args[0]
        dst_dev, src_dev = kwargs.get("device") or src.device, src.device
        dst_dev = torch.device(dst_dev)
    if dst_dev.type == src_dev.type:
        return False
    if dst_dev.type == "cpu":
        return True
    return src_dev.type == "cpu" and not src.is_pinned()


class SyncCounter(TorchDispatchMode):
    """`with SyncCounter() as c: ...`; then `c.counts` maps op names to how often they ran and
    `c.total` sums them. Count a training step's syncs; zero is the goal."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()
        self._tolist = None

    # `.tolist()` of a CPU tensor reads memory without dispatching an op; on CUDA it is a copy to the host
    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counts, original = self.counts, self._tolist

        def tolist(t, *a, **kw):
            counts["Tensor.tolist"] += 1
            return original(t, *a, **kw)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        optional = SIZE_OPTIONAL.get(name)
        if name in SYNCING or (optional is not None and kwargs.get(optional) is None
                               and isinstance(args[0], torch.Tensor) and func._overloadname != "self_int"):
            self.counts[name] += 1
        elif _bool_indexed(name, args):
            self.counts[f"{name} (boolean mask)"] += 1
        elif _blocking_copy(name, args, kwargs):
            self.counts[f"{name} (blocking host copy)"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())
