"""Rows a block at a time: the one block iterator of every per-row stage (the q
vectors, the checks, the decomposition, the statistics, the new table columns
and the pixel maps), and the rows of each group (experiment, panel) by one sort.
"""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor

import numpy as np


#: Rows handled at a time by every per-row stage (compute_q, the decomposition,
#: the statistics' per-row values). A block's temporaries (1.5 MB for a vector
#: column) stay in the CPU's cache and reuse the heap memory the block before
#: freed; whole-table temporaries faulted in fresh pages on every operation,
#: which at 10M rows cost more than the arithmetic.
BLOCK_ROWS = 1 << 16


def rows_by_group(labels, count: int, select=None) -> list[np.ndarray]:
    """For each group 0..count-1, its row numbers (ascending) among the rows
    where ``select`` is True: one stable sort of the labels (none when they
    are already in order, as DIALS writes experiments), not a pass over the
    table per group, so that thousands of experiments cost no more than one."""
    rows = np.flatnonzero(select) if select is not None else np.arange(len(labels))
    label = np.asarray(labels)
    label = label if rows.size == label.size else label[rows]  # every row selected: no gathering
    if count == 1:
        mine = label == 0
        return [rows if mine.all() else rows[mine]]
    inside = (label >= 0) & (label < count)
    if not inside.all():
        rows, label = rows[inside], label[inside]
    if label.size and np.any(label[1:] < label[:-1]):
        small = label.astype(np.int16 if count <= 2**15 else np.int32)  # 16-bit keys sort by radix: O(n)
        order = np.argsort(small, kind="stable")
        rows, label = rows[order], label[order]
    bounds = np.searchsorted(label, np.arange(count + 1))
    return [rows[bounds[i]:bounds[i + 1]] for i in range(count)]


#: Blocks of fewer rows do not release the input's pages (:func:`release_block`):
#: small experiments' blocks, whose pages are few, would cost a call each.
RELEASE_ROWS = BLOCK_ROWS // 4


def release_block(release, rows) -> None:
    """Tell ``release(start, stop)`` (None: nothing to tell) that a block of
    rows (a slice, or ascending row numbers) has been read: the input's pages
    from its first to its last row may go. Blocks of fewer than
    :data:`RELEASE_ROWS` rows are not told."""
    if release is None:
        return
    if isinstance(rows, slice):
        if rows.stop - rows.start >= RELEASE_ROWS:
            release(rows.start, rows.stop)
    elif rows.size >= RELEASE_ROWS:
        release(int(rows[0]), int(rows[-1]) + 1)


def row_blocks(count: int, size: int | None = None) -> list[slice]:
    """Consecutive slices of at most ``size`` rows (:data:`BLOCK_ROWS` when None,
    read at each call) covering ``range(count)``."""
    size = size or BLOCK_ROWS
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


#: Blocks :func:`map_blocks` hands to its pool ahead of the one it yields: the
#: threads always have work, and at most this many results wait in memory.
BLOCKS_AHEAD = 4


def map_blocks(count: int, work, pool=None):
    """``work(block)`` for every slice of :func:`row_blocks`, the results
    yielded in block order, computed by the threads of ``pool`` (a
    ThreadPoolExecutor) when given, :data:`BLOCKS_AHEAD` blocks ahead at most:
    sums of the results added in that order are the same floats whatever the
    threads. An error in a block is raised here, the blocks not begun dropped."""
    blocks = row_blocks(count)
    if pool is None or len(blocks) <= 1:
        yield from map(work, blocks)
        return
    pending = collections.deque()
    try:
        for block in blocks:
            pending.append(pool.submit(work, block))
            if len(pending) > BLOCKS_AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def for_each_block(count: int, work, threads: int = 1) -> None:
    """``work(block)`` for every slice of :func:`row_blocks`, on up to ``threads``
    threads (numpy releases the GIL in its loops). Each block must write only
    its own rows, so the results are the same bits whatever the thread count;
    an error in any block is raised here."""
    blocks = row_blocks(count)
    if threads <= 1 or len(blocks) <= 1:
        for block in blocks:
            work(block)
        return
    with ThreadPoolExecutor(min(threads, len(blocks))) as pool:
        for _ in pool.map(work, blocks):
            pass

