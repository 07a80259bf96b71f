# mypy: disable-error-code="no-untyped-def"
"""Triton kernels: page copies straight between device blocks and mapped pinned host memory,
layout conversion on the device, and the row copies of packed NIXL transfers.

Importing this module needs `triton`; the copy engine imports it lazily and falls back to DMA or
torch when it is missing. Both kernels also run under `TRITON_INTERPRET=1` on CPU tensors, which
is how the CPU test suite checks their index arithmetic.

Copy kernel. Every (page, plane, block-of-page) triple is one *item*: `ITEM` contiguous elements
on the device (one row of one plane) and `ITEM` contiguous elements in the page blob. One launch
covers every page and plane of a job (or of one layer, for layer-wise loads); each program copies
`BLOCK` elements of one item. Pinned host memory is UVA-mapped, so a device thread's load or store
to it becomes a PCIe transaction with no staging buffer and no DMA engine. Offsets are in
elements relative to two base pointers (a device tensor, the host pool tensor); `ALIGN` tells the
compiler that every offset is a multiple of ALIGN elements, which with a 16-byte ALIGN gives
16-byte vector loads and stores (what keeps enough bytes in flight to fill PCIe).

The copy grid may be smaller than the number of tiles: each program then walks tiles
pid, pid + grid, ... (a persistent grid). A grid bounded to a few programs per SM leaves room on
every SM for a second copy launched on another stream, so a store and a load run at the same
time (one grid covering every tile would occupy the whole GPU until its last wave is placed,
and the two directions would take turns instead of sharing PCIe's two lanes).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def copy_items_kernel(
    dev_base,
    host_base,
    plane_off,
    plane_stride,
    plane_ids,
    blocks,
    slot_off,
    n_planes_job,
    n_tiles,
    N_SUB: tl.constexpr,
    ITEM: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGN: tl.constexpr,
    TO_HOST: tl.constexpr,
):
    """dev_base/host_base: pointers of the movement dtype; plane_off[p], plane_stride[p]: element
    offset of row 0 of plane p from dev_base and the row stride; plane_ids[k]: the planes this
    launch copies; blocks[i * N_SUB + j]: engine block j of page i; slot_off[i]: element offset
    of page i's payload from host_base. Tiles: pages * n_planes_job * N_SUB * cdiv(ITEM, BLOCK);
    any grid size from 1 to n_tiles covers them all."""
    CHUNKS = (ITEM + BLOCK - 1) // BLOCK
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        pid = tl.cast(tile, tl.int64)  # a plain int under the interpreter
        chunk = pid % CHUNKS
        item = pid // CHUNKS
        j = item % N_SUB
        rest = item // N_SUB
        k = rest % n_planes_job
        page = rest // n_planes_job
        p = tl.load(plane_ids + k)
        blk = tl.load(blocks + page * N_SUB + j)
        d_off = tl.load(plane_off + p) + blk * tl.load(plane_stride + p)
        h_off = tl.load(slot_off + page) + (p * N_SUB + j) * ITEM
        d_off = tl.multiple_of(d_off, ALIGN)
        h_off = tl.multiple_of(h_off, ALIGN)
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        if ITEM % BLOCK == 0:
            if TO_HOST:
                x = tl.load(dev_base + d_off + offs)
                tl.store(host_base + h_off + offs, x)
            else:
                x = tl.load(host_base + h_off + offs)
                tl.store(dev_base + d_off + offs, x)
        else:
            mask = offs < ITEM
            if TO_HOST:
                x = tl.load(dev_base + d_off + offs, mask=mask)
                tl.store(host_base + h_off + offs, x, mask=mask)
            else:
                x = tl.load(host_base + h_off + offs, mask=mask)
                tl.store(dev_base + d_off + offs, x, mask=mask)


@triton.jit
def permute_runs_kernel(
    src,
    dst,
    n_rows,
    s1,
    s2,
    s3,
    s4,
    s5,
    t0,
    t1,
    t2,
    t3,
    t4,
    t5,
    ROW: tl.constexpr,
    ROWS: tl.constexpr,
    EVEN: tl.constexpr,
    WIDE: tl.constexpr,
):
    """dst is dense; its rows of ROW contiguous elements (a power of two) are numbered in dst
    order, and row r splits into six indices (i0..i5) over the sizes (., s1..s5), outermost
    first. Row r is read from src + sum(i_a * t_a) (element strides of src; every t_a is a
    multiple of ROW). Each program copies ROWS consecutive rows; grid: cdiv(n_rows, ROWS).
    EVEN: n_rows % ROWS == 0 (no mask). WIDE: row numbers need 64 bits (else the index
    arithmetic, once per row, runs in 32 bits)."""
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    r = rows
    i5 = r % s5
    r = r // s5
    i4 = r % s4
    r = r // s4
    i3 = r % s3
    r = r // s3
    i2 = r % s2
    r = r // s2
    i1 = r % s1
    i0 = r // s1
    src_off = (
        i0.to(tl.int64) * t0
        + i1.to(tl.int64) * t1
        + i2.to(tl.int64) * t2
        + i3.to(tl.int64) * t3
        + i4.to(tl.int64) * t4
        + i5.to(tl.int64) * t5
    )
    src_off = tl.multiple_of(src_off, ROW)
    dst_off = tl.multiple_of(rows.to(tl.int64) * ROW, ROW)
    cols = tl.arange(0, ROW)
    if EVEN:
        x = tl.load(src + src_off[:, None] + cols[None, :])
        tl.store(dst + dst_off[:, None] + cols[None, :], x)
    else:
        mask = (rows < n_rows)[:, None]
        x = tl.load(src + src_off[:, None] + cols[None, :], mask=mask)
        tl.store(dst + dst_off[:, None] + cols[None, :], x, mask=mask)


@triton.jit
def copy_rows_kernel(
    src_base,
    dst_base,
    src_off,
    dst_off,
    src_add,
    dst_add,
    n_rows,
    ROW: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """Row r < n_rows: ROW elements from src_base + src_add + src_off[r] to dst_base + dst_add +
    dst_off[r] (element offsets, int64; may be negative when a row lives in another tensor than
    the base). Tiles: n_rows * cdiv(ROW, BLOCK); any grid size from 1 covers them (persistent
    grid). ALIGN: every offset and ROW is a multiple of ALIGN elements (vector width)."""
    CHUNKS = (ROW + BLOCK - 1) // BLOCK
    for tile in range(tl.program_id(0), n_rows * CHUNKS, tl.num_programs(0)):
        t = tl.cast(tile, tl.int64)  # a plain int under the interpreter
        chunk = t % CHUNKS
        r = t // CHUNKS
        s = tl.multiple_of(tl.load(src_off + r) + src_add, ALIGN)
        d = tl.multiple_of(tl.load(dst_off + r) + dst_add, ALIGN)
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        if ROW % BLOCK == 0:
            tl.store(dst_base + d + offs, tl.load(src_base + s + offs))
        else:
            mask = offs < ROW
            tl.store(dst_base + d + offs, tl.load(src_base + s + offs, mask=mask), mask=mask)


@triton.jit
def copy_plane_rows_kernel(
    src_base,
    dst_base,
    planes,
    src_ids,
    dst_ids,
    n_planes,
    ROW: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGN: tl.constexpr,
    SPREAD: tl.constexpr = False,
):
    """Row i < count of plane p: ROW elements from src_base + src_start + src_ids[at + i] * ROW
    to dst_base + dst_start + dst_ids[at + i] * ROW, where planes[0] = max_rows (the widest
    plane's count) and planes[1 + p] = (src_start, dst_start, at, count), 4 int64 each, in
    elements / ids. Block ids, not per-row tables, so a request uploads a few KiB however many
    rows it has; and every count lives in that upload, not in the launch, so one captured CUDA
    graph serves requests of any length that fit its buffers. Tiles: n_planes * max_rows *
    cdiv(ROW, BLOCK), those with i >= count skipped; any grid size from 1 covers them
    (persistent grid). Tiles run row by row through a plane, or with SPREAD plane by plane
    through a row (neighbouring programs then write into different tensors)."""
    CHUNKS = (ROW + BLOCK - 1) // BLOCK
    max_rows = tl.load(planes)
    for tile in range(tl.program_id(0), n_planes * max_rows * CHUNKS, tl.num_programs(0)):
        t = tl.cast(tile, tl.int64)  # a plain int under the interpreter
        chunk = t % CHUNKS
        r = t // CHUNKS
        if SPREAD:
            p = r % n_planes
            i = r // n_planes
        else:
            i = r % max_rows
            p = r // max_rows
        q = planes + 4 * p + 4
        count = tl.load(q + 3)
        if i < count:
            at = tl.load(q + 2) + i
            s = tl.multiple_of(tl.load(q) + tl.load(src_ids + at) * ROW, ALIGN)
            d = tl.multiple_of(tl.load(q + 1) + tl.load(dst_ids + at) * ROW, ALIGN)
            # the same masked tail as copy_rows_kernel, written out: moved into a shared
            # @triton.jit helper it compiled to scalar loads and stores (a helper's arguments
            # lose the base pointers' 16-byte divisibility; PTX checked on an H100)
            offs = chunk * BLOCK + tl.arange(0, BLOCK)
            if ROW % BLOCK == 0:
                tl.store(dst_base + d + offs, tl.load(src_base + s + offs))
            else:
                mask = offs < ROW
                tl.store(dst_base + d + offs, tl.load(src_base + s + offs, mask=mask), mask=mask)
