"""Split a list of tensors into chunks for the foreach backends, so that temporaries stay bounded.

A foreach op over all parameters at once allocates a buffer as large as all of them; over a chunk it
allocates a chunk's worth. Chunks hold tensors of one device and dtype (foreach ops and ``torch.stack``
need that) and about ``total / CHUNKS`` elements each; a tensor larger than that is a chunk of its own.
"""

from __future__ import annotations

from collections import defaultdict

from torch import Tensor

# With a 1/8 share per chunk, the two temporaries a LAMB chunk may need (a gradient copy and the update)
# stay under a quarter of the parameter size, or twice the largest tensor where one tensor dominates.
CHUNKS = 8


def by_numel(tensors: list[Tensor], chunks: int = CHUNKS) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), then cut into runs of about total/chunks elements."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    out: list[list[int]] = []
    for idx in groups.values():
        budget = max(1, sum(tensors[i].numel() for i in idx) // chunks)
        current: list[int] = []
        size = 0
        for i in idx:
            n = tensors[i].numel()
            if current and size + n > budget:
                out.append(current)
                current, size = [], 0
            current.append(i)
            size += n
        if current:
            out.append(current)
    return out
