"""The Triton kernel behind :mod:`neuron_torch.kernels.fused_triton` (imports triton: import this module only on use).

The kernel is a plain Python function here; :func:`define` hands it to ``triton.jit``, which compiles it for
the GPU or, under ``TRITON_INTERPRET=1``, wraps it for the interpreter, as the setting is when it is called.
"""

from __future__ import annotations

import triton
import triton.language as tl


def neuron_pass(X, Y, W, B, P, m, n, stride_x, stride_y, stride_p,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_TILE: tl.constexpr):
    """One program's share: row blocks pid, pid + P, ... of X (m, n); writes Σ loss_i, Σ dz_i and Σ dz_i·x_i
    over them to its row of P (programs, n + 2). Accumulates in W's dtype (float32 for bfloat16 X).

    With ``ONE_TILE`` (n ≤ BLOCK_N) a block is one tile, read once, and dw stays in registers. Otherwise z needs
    every tile before dz is known, so the block's tiles are read again (from cache) for dw, which is added into
    the program's row of P.
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    acc = W.dtype.element_ty
    b = tl.load(B)
    out = P + pid * stride_p  # this program's partials: loss, db, dw[0..n)
    row_offsets = tl.arange(0, BLOCK_M)
    col_offsets = tl.arange(0, BLOCK_N)
    loss_sum = tl.zeros([BLOCK_M], dtype=acc)  # per row slot, summed once at the end
    db_sum = tl.zeros([BLOCK_M], dtype=acc)
    blocks = tl.cdiv(m, BLOCK_M)
    if ONE_TILE:
        one_mask = col_offsets < n
        w = tl.load(W + col_offsets, mask=one_mask, other=0.0)  # (BLOCK_N,)
        dw_sum = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc)  # reduced over rows once, after the loop
    else:
        for c in range(0, n, BLOCK_N):
            tl.store(out + 2 + c + col_offsets, tl.zeros([BLOCK_N], dtype=acc), mask=c + col_offsets < n)
        tl.debug_barrier()  # the zeros are read back by whichever threads add the first block's dw

    for block in range(pid, blocks, programs):
        rows = block * BLOCK_M + row_offsets
        row_mask = rows < m
        row_ptrs = X + rows.to(tl.int64)[:, None] * stride_x  # int64: m·stride may pass 2³¹
        y = tl.load(Y + rows.to(tl.int64) * stride_y, mask=row_mask, other=0.0).to(acc)  # (BLOCK_M,)
        # z = x·w + b  (BLOCK_M,)
        if ONE_TILE:
            x = tl.load(row_ptrs + col_offsets[None, :], mask=row_mask[:, None] & one_mask[None, :],
                        other=0.0).to(acc)  # (BLOCK_M, BLOCK_N)
            z = tl.sum(x * w[None, :], axis=1) + b
        else:
            z = tl.zeros([BLOCK_M], dtype=acc) + b
            for c in range(0, n, BLOCK_N):
                cols = c + col_offsets
                col_mask = cols < n
                x_tile = tl.load(row_ptrs + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
                w_tile = tl.load(W + cols, mask=col_mask, other=0.0)
                z += tl.sum(x_tile.to(acc) * w_tile[None, :], axis=1)
        # loss_i = softplus(z) − y·z and dz = σ(z) − y, from e = exp(−|z|) in (0, 1], which cannot overflow
        e = tl.exp(-tl.abs(z))
        one_plus_e = 1.0 + e
        a = tl.where(z >= 0, 1.0, e) / one_plus_e  # σ(z): 1/(1+e) for z ≥ 0, e/(1+e) below
        # log1p(e) without a log1p: log(1+e)·e/((1+e)−1) cancels the rounding of 1+e (Goldberg); where 1+e rounds
        # to 1, log1p(e) = e to the last bit
        rounded = one_plus_e - 1.0
        log1p_e = tl.where(rounded == 0, e, tl.log(one_plus_e) * (e / tl.where(rounded == 0, 1.0, rounded)))
        loss = tl.maximum(z, 0.0) + log1p_e - y * z
        dz = tl.where(row_mask, a - y, 0.0)  # rows past m add nothing
        loss_sum += tl.where(row_mask, loss, 0.0)
        db_sum += dz
        # dw += dz·x  (BLOCK_N,) per tile
        if ONE_TILE:
            dw_sum += dz[:, None] * x  # the block still in registers: X is read once
        else:
            for c in range(0, n, BLOCK_N):
                cols = c + col_offsets
                col_mask = cols < n
                x_tile = tl.load(row_ptrs + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
                dw_ptrs = out + 2 + cols
                partial = tl.load(dw_ptrs, mask=col_mask) + tl.sum(dz[:, None] * x_tile.to(acc), axis=0)
                tl.store(dw_ptrs, partial, mask=col_mask)
                tl.debug_barrier()  # the program's threads read back what others of them stored

    if ONE_TILE:
        tl.store(out + 2 + col_offsets, tl.sum(dw_sum, axis=0), mask=one_mask)
    tl.store(out, tl.sum(loss_sum, axis=0))
    tl.store(out + 1, tl.sum(db_sum, axis=0))


def define():
    """``neuron_pass`` compiled by ``triton.jit`` (or wrapped for the interpreter, per ``TRITON_INTERPRET``)."""
    return triton.jit(neuron_pass, do_not_specialize=["m"])
