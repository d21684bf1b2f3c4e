"""Tensors laid end to end in one buffer, those of equal size side by side: their norms in a few kernels.

On the CPU a ``torch._foreach_*`` call runs one kernel per tensor, about 2 µs each whatever the size, so
the norms of the seed's ten parameters cost ~25 µs and a dot product per parameter ~50 µs. Laid out by
size they form five runs, and each run's norms are one ``vector_norm(dim=1)`` of a 2-d view (~2 µs,
or 7 µs for the three 128x128 weights together). The parameter lenses keep their copies (the last
gradient, the parameters before a step) in such buffers, and take the dot products of two such buffers
for the cosines, one ``vecdot`` per run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch._utils import _flatten_dense_tensors

from normtrace.lenses import _ACCUMULATE


class Layout:
    """Where each tensor of a group (one device and dtype) sits in a flat buffer, in the order given.

    Consecutive tensors of one size form a run, whose norms are one kernel: order the tensors by size.
    """

    def __init__(self, like: Sequence[Tensor]) -> None:
        self.shapes = [t.shape for t in like]
        self.device, self.dtype = like[0].device, like[0].dtype
        sizes = [t.numel() for t in like]
        self.total = sum(sizes)
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        # (shape, stride, offset) of each slot and of each run of equal sizes, for ``as_strided``: the
        # cheapest view there is (1 µs; ``split`` then ``view(shape)`` took 3-4 µs a tensor)
        self.slots = [(tuple(t.shape), _contiguous(t.shape), o) for t, o in zip(like, offsets, strict=True)]
        runs: list[list[int]] = []  # [count, size, offset] of consecutive tensors of one size
        for size, offset in zip(sizes, offsets, strict=True):
            if runs and runs[-1][1] == size:
                runs[-1][0] += 1
            else:
                runs.append([1, size, offset])
        self.runs = [((count, size), (size, 1), offset) for count, size, offset in runs]
        self._accumulate = _ACCUMULATE.get(self.dtype)

    def fits(self, tensors: Sequence[Tensor]) -> bool:
        """Whether ``tensors`` (one per slot, in order) have the slots' shapes and dtype."""
        dtype = self.dtype
        return [t.shape for t in tensors] == self.shapes and all(t.dtype == dtype for t in tensors)

    def new(self) -> Flat:
        """An uninitialised buffer in this layout, on the group's device."""
        return Flat(self, torch.empty(self.total, device=self.device, dtype=self.dtype))

    def flatten(self, tensors: Sequence[Tensor]) -> Flat:
        """A new buffer holding a copy of ``tensors`` (dense, one per slot, in order): one call, which
        copies without a Python view per tensor (10 µs for the seed's ten parameters, against 28 for a
        buffer, its views and a grouped copy)."""
        data: Tensor = _flatten_dense_tensors(tensors)  # type: ignore[no-untyped-call]
        # (of one tensor it returns a view of that tensor, not a copy)
        return Flat(self, data.clone() if len(tensors) == 1 else data)


class Flat:
    """A buffer in a ``Layout``: ``views`` shaped as the group's tensors, ``norms()`` and ``dots()`` of each."""

    def __init__(self, layout: Layout, data: Tensor) -> None:
        self.layout = layout
        self.data = data
        self._rows = [data.as_strided(*run) for run in layout.runs]
        self._views: list[Tensor] | None = None

    @property
    def views(self) -> list[Tensor]:
        """One view per slot, shaped as its tensor (made at first use: most steps need none)."""
        if self._views is None:
            as_strided = self.data.as_strided
            self._views = [as_strided(*slot) for slot in self.layout.slots]
        return self._views

    def norms(self) -> Tensor:
        """1-d float32 tensor of the L2 norm of each slot, in layout order (half precision accumulated in
        float32); it stays on the device."""
        acc = self.layout._accumulate
        parts = [torch.linalg.vector_norm(rows, 2, 1, dtype=acc) for rows in self._rows]
        return _joined(parts)

    def dots(self, other: Flat) -> Tensor:
        """1-d float32 tensor of the dot product of each slot with the same slot of ``other`` (same
        layout), in layout order (half precision multiplied and summed in float32)."""
        acc = self.layout._accumulate
        if acc is None:
            parts = [torch.linalg.vecdot(a, b, dim=1) for a, b in zip(self._rows, other._rows, strict=True)]
        else:
            parts = [
                torch.linalg.vecdot(a.to(acc), b.to(acc), dim=1)
                for a, b in zip(self._rows, other._rows, strict=True)
            ]
        return _joined(parts)


def _joined(parts: list[Tensor]) -> Tensor:
    joined = parts[0] if len(parts) == 1 else torch.cat(parts)
    return joined if joined.dtype == torch.float32 else joined.to(torch.float32)


def _contiguous(shape: torch.Size) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape``."""
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * max(shape[i + 1], 1)
    return tuple(strides)
