"""The order in which torch (on CPU) sorts a row: libstdc++'s ``std::sort``, an introsort.

DeepSeek's EPLB sorts loads with ``torch.sort(descending=True)``, which is not stable: for rows
longer than 16, equal loads come out in the order introsort leaves them, and that order decides
which of two equally loaded groups or copies is packed first. To give the same placement for the
same loads we replay the algorithm: quicksort with the median of (second, middle, last) moved to
the front as the pivot, unguarded partitions, heapsort below a depth of 2*floor(log2 n), then one
insertion-sort pass over 16-element runs. Cross-checked against torch 2.14.1 in
tests/engines/test_eplb_engines.py.
"""

from __future__ import annotations

from collections.abc import Sequence

THRESHOLD = 16  # runs of at most this many are left to the final insertion sort


class _Sorter:
    """Sorts ``idx`` (positions into ``v``) so that larger values come first."""

    def __init__(self, values: Sequence[float]) -> None:
        self.v = [float(x) for x in values]
        self.idx = list(range(len(self.v)))

    def first(self, a: int, b: int) -> bool:
        """Whether item ``a`` goes before item ``b`` (the comparator: a > b)."""
        return self.v[a] > self.v[b]

    def at_first(self, i: int, j: int) -> bool:
        return self.first(self.idx[i], self.idx[j])

    def swap(self, i: int, j: int) -> None:
        self.idx[i], self.idx[j] = self.idx[j], self.idx[i]

    def median_to_front(self, front: int, a: int, b: int, c: int) -> None:
        if self.at_first(a, b):
            if self.at_first(b, c):
                self.swap(front, b)
            elif self.at_first(a, c):
                self.swap(front, c)
            else:
                self.swap(front, a)
        elif self.at_first(a, c):
            self.swap(front, a)
        elif self.at_first(b, c):
            self.swap(front, c)
        else:
            self.swap(front, b)

    def partition(self, lo: int, hi: int, pivot: int) -> int:
        while True:
            while self.at_first(lo, pivot):
                lo += 1
            hi -= 1
            while self.at_first(pivot, hi):
                hi -= 1
            if lo >= hi:
                return lo
            self.swap(lo, hi)
            lo += 1

    def quick(self, lo: int, hi: int, depth: int) -> None:
        while hi - lo > THRESHOLD:
            if depth == 0:
                self.heapsort(lo, hi)
                return
            depth -= 1
            self.median_to_front(lo, lo + 1, lo + (hi - lo) // 2, hi - 1)
            cut = self.partition(lo + 1, hi, lo)
            self.quick(cut, hi, depth)
            hi = cut

    # heap on idx[base:base+n], root the item that goes last
    def sift(self, base: int, hole: int, n: int, item: int) -> None:
        top, child = hole, hole
        while child < (n - 1) // 2:
            child = 2 * (child + 1)
            if self.at_first(base + child, base + child - 1):
                child -= 1
            self.idx[base + hole] = self.idx[base + child]
            hole = child
        if n % 2 == 0 and child == (n - 2) // 2:
            child = 2 * (child + 1)
            self.idx[base + hole] = self.idx[base + child - 1]
            hole = child - 1
        parent = (hole - 1) // 2
        while hole > top and self.first(self.idx[base + parent], item):
            self.idx[base + hole] = self.idx[base + parent]
            hole, parent = parent, (parent - 1) // 2
        self.idx[base + hole] = item

    def heapsort(self, lo: int, hi: int) -> None:
        n = hi - lo
        for parent in range((n - 2) // 2, -1, -1):
            self.sift(lo, parent, n, self.idx[lo + parent])
        for end in range(hi - 1, lo, -1):
            item = self.idx[end]
            self.idx[end] = self.idx[lo]
            self.sift(lo, 0, end - lo, item)

    def insert(self, pos: int) -> None:
        """Move idx[pos] left past the items it goes before (something on its left stops it)."""
        item = self.idx[pos]
        while self.first(item, self.idx[pos - 1]):
            self.idx[pos] = self.idx[pos - 1]
            pos -= 1
        self.idx[pos] = item

    def insertion(self, lo: int, hi: int) -> None:
        for i in range(lo + 1, hi):
            item = self.idx[i]
            if self.first(item, self.idx[lo]):  # new front: shift the run right by one
                self.idx[lo + 1 : i + 1] = self.idx[lo:i]
                self.idx[lo] = item
            else:
                self.insert(i)

    def run(self) -> list[int]:
        n = len(self.idx)
        if n > 1:
            self.quick(0, n, 2 * (n.bit_length() - 1))
            self.insertion(0, min(n, THRESHOLD))
            for i in range(THRESHOLD, n):
                self.insert(i)
        return self.idx


def descending_order(values: Sequence[float]) -> list[int]:
    """Indices of ``values``, largest first, ties as torch's CPU ``sort(descending=True)``."""
    return _Sorter(values).run()
