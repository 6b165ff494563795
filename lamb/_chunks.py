"""Split a list of tensors into chunks for the foreach backends, so that temporaries stay bounded.

A foreach op over all parameters at once allocates a buffer as large as all of them; over a chunk it
allocates a chunk's worth. Chunks hold tensors of one device and dtype (foreach ops and ``torch.stack``
need that) and about ``total / CHUNKS`` elements each; a tensor larger than that is a chunk of its own.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import pairwise

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


# Cache blocking for CPU foreach steps: about this many elements per block, so that the ~10 successive
# elementwise ops over a block's parameter, gradient, moments and temporaries hit the L2/L3 caches instead
# of making ~10 passes over DRAM. 2**18 fp32 elements: 1 MiB per array, about 7 MiB for a block's arrays
# and temporaries (2**18..2**19 measured best of 2**14..2**20 on BERT shapes; smaller blocks pay per-op overhead).
BLOCK = 1 << 18


def by_block(tensors: list[Tensor], splittable: list[bool], block: int | None = None) -> list[list[tuple[int, int, int]]]:
    """Pieces ``(i, start, stop)`` (flat element ranges of ``tensors[i]``) packed into blocks of about ``block``.

    Blocks hold one (device, dtype). A tensor of at most ``block`` elements (or one not ``splittable``) is
    one whole piece, packed with its neighbours; a larger splittable tensor is cut into about equal pieces
    of at most ``block`` elements, one block each.
    """
    block = BLOCK if block is None else block
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    out: list[list[tuple[int, int, int]]] = []
    for idx in groups.values():
        current: list[tuple[int, int, int]] = []
        size = 0
        for i in idx:
            n = tensors[i].numel()
            if n > block and splittable[i]:
                q = -(-n // block)
                bounds = [n * j // q for j in range(q + 1)]
                out.extend([(i, a, b)] for a, b in pairwise(bounds))
                continue
            if current and size + n > block:
                out.append(current)
                current, size = [], 0
            current.append((i, 0, n))
            size += n
        if current:
            out.append(current)
    return out
