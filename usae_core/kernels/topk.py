"""Fused ReLU + TopK over the encoder output, one pass over `[batch, n_concepts]`.

For each row, y = ReLU(gamma * h + beta) (or ReLU(h)); the k largest y are returned as
`(values, indices)` together with h at those positions (the BatchNorm backward needs it).
An optional second selection (AuxK) takes the `k_aux` largest y among *dead* columns, alive
columns counting as 0, exactly as `topk(y * dead_mask)`.

Both Triton kernels find the k-th largest value by a binary search over its float bit pattern
(non-negative floats order like their int32 bits), then place the winners with prefix sums;
as many ties at the threshold are taken as k needs, so the result is a valid `torch.topk`.

The main selection reads each row once, one warp per row, and keeps in registers the 4 largest
keys of each of 128 or 256 column slots (slot = column mod slots). The k-th largest held key T is
exact unless some slot's 4th key exceeds T (that slot may have dropped a key above T; with the k
winners spread over the slots at random that happens in about 1 row in 1,000). Then T is still
a lower bound: the keys >= T are compacted into a per-row scratch buffer and searched exactly,
and rows with more candidates than the buffer holds (heavy ties) fall back to an exact search
streamed over the whole row.
The AuxK selection (rare: only while dead latents exist) uses the block-per-row kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from usae_core.kernels import HAVE_TRITON, use_triton


class TopK(NamedTuple):
    values: torch.Tensor
    """`[batch, k]` float32 (float64 for float64 input): the selected y."""
    indices: torch.Tensor
    """`[batch, k]` int64 columns."""
    pre: torch.Tensor
    """`[batch, k]` h at the selected columns (before the affine map and ReLU)."""


def relu_topk(
    h: torch.Tensor,
    k: int,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    dead: torch.Tensor | None = None,
    k_aux: int = 0,
) -> tuple[TopK, TopK | None]:
    """TopK of ReLU(gamma * h + beta) per row, plus the AuxK selection when `dead` is given."""
    if (gamma is None) != (beta is None):
        raise ValueError("give both gamma and beta, or neither")
    aux = dead is not None and k_aux > 0
    if use_triton(h) and h.dtype in (torch.float32, torch.bfloat16, torch.float16):
        if not aux and k <= _SLOTS:
            return _relu_topk_warp_triton(h, k, gamma, beta), None
        return _relu_topk_triton(h, k, gamma, beta, dead if aux else None, k_aux if aux else 0)
    return _relu_topk_torch(h, k, gamma, beta, dead if aux else None, k_aux if aux else 0)


def _relu_topk_torch(h, k, gamma, beta, dead, k_aux):
    hf = h if h.dtype == torch.float64 else h.float()
    y = torch.relu(hf * gamma + beta if gamma is not None else hf)
    values, indices = torch.topk(y, k, dim=1, sorted=False)
    main = TopK(values, indices, hf.gather(1, indices))
    if dead is None:
        return main, None
    aux_values, aux_indices = torch.topk(y * dead.to(y.dtype), k_aux, dim=1, sorted=False)
    return main, TopK(aux_values, aux_indices, hf.gather(1, aux_indices))


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _kth_largest(keys, K: tl.constexpr):
        """Largest bit pattern T with count(keys >= T) >= K."""
        lo = tl.full([], 0, tl.int32)
        hi = tl.full([], 0x7F800001, tl.int32)  # one past +inf: nothing is >= it
        for _ in range(31):
            mid = lo + (hi - lo) // 2
            enough = tl.sum((keys >= mid).to(tl.int32), axis=0) >= K
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid)
        return lo

    @triton.jit
    def _select_topk(keys, cols, pre, out_off, K: tl.constexpr, val_ptr, pre_ptr, idx_ptr):
        """Write the K largest of a whole row held in registers (ties in column order)."""
        lo = _kth_largest(keys, K)
        above = keys > lo
        tied = keys == lo
        need = K - tl.sum(above.to(tl.int32), axis=0)
        tie_rank = tl.cumsum(tied.to(tl.int32), axis=0) - 1
        chosen = above | (tied & (tie_rank < need))
        slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
        tl.store(val_ptr + out_off + slot, keys.to(tl.float32, bitcast=True), mask=chosen)
        tl.store(idx_ptr + out_off + slot, cols.to(tl.int64), mask=chosen)
        tl.store(pre_ptr + out_off + slot, pre, mask=chosen)

    @triton.jit
    def _relu_topk_kernel(
        h_ptr, gamma_ptr, beta_ptr, dead_ptr,
        val_ptr, pre_ptr, idx_ptr, aux_val_ptr, aux_pre_ptr, aux_idx_ptr,
        C, stride_h,
        K: tl.constexpr, K_AUX: tl.constexpr, BLOCK_C: tl.constexpr,
        AFFINE: tl.constexpr, AUX: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        inside = cols < C
        pre = tl.load(h_ptr + row * stride_h + cols, mask=inside, other=0.0).to(tl.float32)
        y = pre
        if AFFINE:
            gamma = tl.load(gamma_ptr + cols, mask=inside, other=1.0).to(tl.float32)
            beta = tl.load(beta_ptr + cols, mask=inside, other=0.0).to(tl.float32)
            y = pre * gamma + beta
        y = tl.where(y > 0.0, y, 0.0)  # also maps -0.0 and NaN to +0.0
        keys = tl.where(inside, y.to(tl.int32, bitcast=True), -1)  # padding never wins
        _select_topk(keys, cols, pre, row * K, K, val_ptr, pre_ptr, idx_ptr)
        if AUX:
            dead = tl.load(dead_ptr + cols, mask=inside, other=0) != 0
            aux_keys = tl.where(dead, keys, tl.where(inside, 0, -1))
            _select_topk(aux_keys, cols, pre, row * K_AUX, K_AUX, aux_val_ptr, aux_pre_ptr, aux_idx_ptr)


_SLOTS = 256  # columns per chunk = slots of the per-slot top keys; k <= _SLOTS
_CANDIDATES = 256  # per-row scratch of the fallback's compacted candidates

if HAVE_TRITON:

    @triton.jit
    def _chunk_keys(h_ptr, gamma_ptr, beta_ptr, row_off, cols, C, AFFINE: tl.constexpr, MASKED: tl.constexpr):
        """int32 bit patterns of ReLU(gamma * h + beta) for one chunk; -1 past the row's end.
        Whole chunks (MASKED=False) skip the bounds test."""
        if MASKED:
            inside = cols < C
            y = tl.load(h_ptr + row_off + cols, mask=inside, other=0.0).to(tl.float32)
            if AFFINE:
                y = y * tl.load(gamma_ptr + cols, mask=inside, other=1.0) + tl.load(beta_ptr + cols, mask=inside, other=0.0)
            y = tl.where(y > 0.0, y, 0.0)
            return tl.where(inside, y.to(tl.int32, bitcast=True), -1)
        else:
            y = tl.load(h_ptr + row_off + cols).to(tl.float32)
            if AFFINE:
                y = y * tl.load(gamma_ptr + cols) + tl.load(beta_ptr + cols)
            y = tl.where(y > 0.0, y, 0.0)  # also maps -0.0 and NaN to +0.0
            return y.to(tl.int32, bitcast=True)

    @triton.jit
    def _insert(x, xc, t1, t2, t3, t4, c1, c2, c3, c4):
        """Insert x (column xc) into each slot's sorted top 4 (t1 >= t2 >= t3 >= t4); on ties the
        earlier column stays ahead."""
        g1 = x > t1
        g2 = x > t2
        g3 = x > t3
        g4 = x > t4
        n4 = tl.where(g3, t3, tl.where(g4, x, t4))
        d4 = tl.where(g3, c3, tl.where(g4, xc, c4))
        n3 = tl.where(g2, t2, tl.where(g3, x, t3))
        d3 = tl.where(g2, c2, tl.where(g3, xc, c3))
        n2 = tl.where(g1, t1, tl.where(g2, x, t2))
        d2 = tl.where(g1, c1, tl.where(g2, xc, c2))
        return tl.where(g1, x, t1), n2, n3, n4, tl.where(g1, xc, c1), d2, d3, d4

    @triton.jit
    def _kth_largest_held(t1, t2, t3, t4, K: tl.constexpr):
        """`_kth_largest` over the four levels of the per-slot top 4 at once."""
        lo = tl.full([], 0, tl.int32)
        hi = tl.full([], 0x7F800001, tl.int32)
        for _ in range(31):
            mid = lo + (hi - lo) // 2
            at_least = (t1 >= mid).to(tl.int32) + (t2 >= mid).to(tl.int32) + (t3 >= mid).to(tl.int32) \
                + (t4 >= mid).to(tl.int32)
            enough = tl.sum(at_least, axis=0) >= K
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid)
        return lo

    @triton.jit
    def _count_above(keys, threshold):
        return tl.sum((keys > threshold).to(tl.int32), axis=0)

    @triton.jit
    def _emit(keys, cols, threshold, need, ties_before, written, out_off, h_ptr, row_off,
              val_ptr, pre_ptr, idx_ptr):
        """Write the entries > threshold, and ties in order while `need` allows."""
        above = keys > threshold
        tied = keys == threshold
        tie_rank = ties_before + tl.cumsum(tied.to(tl.int32), axis=0) - 1
        chosen = above | (tied & (tie_rank < need))
        slot = written + tl.cumsum(chosen.to(tl.int32), axis=0) - 1
        pre = tl.load(h_ptr + row_off + cols, mask=chosen, other=0.0).to(tl.float32)
        tl.store(val_ptr + out_off + slot, keys.to(tl.float32, bitcast=True), mask=chosen)
        tl.store(pre_ptr + out_off + slot, pre, mask=chosen)
        tl.store(idx_ptr + out_off + slot, cols.to(tl.int64), mask=chosen)
        return written + tl.sum(chosen.to(tl.int32), axis=0), ties_before + tl.sum(tied.to(tl.int32), axis=0)

    @triton.jit
    def _select_from_bound(h_ptr, gamma_ptr, beta_ptr, row, row_off, out_off, bound,
                           val_ptr, pre_ptr, idx_ptr, cand_key_ptr, cand_col_ptr, C,
                           K: tl.constexpr, SLOTS: tl.constexpr, CAND: tl.constexpr, AFFINE: tl.constexpr):
        """Exact selection given a lower bound of the row's K-th largest key: compact the
        candidates (>= bound) into scratch and search them; with more than CAND candidates
        (heavy ties, e.g. fewer than K positive values), search the whole row, streamed."""
        lanes = tl.arange(0, SLOTS)
        cand_off = row * CAND
        n_cand = tl.full([], 0, tl.int32)
        for c0 in range(0, C, SLOTS):
            cols = c0 + lanes
            keys = _chunk_keys(h_ptr, gamma_ptr, beta_ptr, row_off, cols, C, AFFINE, True)
            is_cand = keys >= bound
            at = n_cand + tl.cumsum(is_cand.to(tl.int32), axis=0) - 1
            fits = is_cand & (at < CAND)
            tl.store(cand_key_ptr + cand_off + at, keys, mask=fits)
            tl.store(cand_col_ptr + cand_off + at, cols, mask=fits)
            n_cand += tl.sum(is_cand.to(tl.int32), axis=0)
        zero = tl.full([], 0, tl.int32)
        if n_cand <= CAND:
            offs = tl.arange(0, CAND)
            keys = tl.load(cand_key_ptr + cand_off + offs, mask=offs < n_cand, other=-1)
            cols = tl.load(cand_col_ptr + cand_off + offs, mask=offs < n_cand, other=0)
            threshold = _kth_largest(keys, K)
            _emit(keys, cols, threshold, K - _count_above(keys, threshold), zero, zero, out_off, h_ptr, row_off,
                  val_ptr, pre_ptr, idx_ptr)
        else:
            lo = tl.full([], 0, tl.int32)
            hi = tl.full([], 0x7F800001, tl.int32)
            for _ in range(31):
                mid = lo + (hi - lo) // 2
                count = tl.full([], 0, tl.int32)
                for c0 in range(0, C, SLOTS):
                    keys = _chunk_keys(h_ptr, gamma_ptr, beta_ptr, row_off, c0 + lanes, C, AFFINE, True)
                    count += tl.sum((keys >= mid).to(tl.int32), axis=0)
                enough = count >= K
                lo = tl.where(enough, mid, lo)
                hi = tl.where(enough, hi, mid)
            n_above = tl.full([], 0, tl.int32)
            for c0 in range(0, C, SLOTS):
                n_above += _count_above(_chunk_keys(h_ptr, gamma_ptr, beta_ptr, row_off, c0 + lanes, C, AFFINE, True), lo)
            written = zero
            ties = zero
            for c0 in range(0, C, SLOTS):
                cols = c0 + lanes
                keys = _chunk_keys(h_ptr, gamma_ptr, beta_ptr, row_off, cols, C, AFFINE, True)
                written, ties = _emit(keys, cols, lo, K - n_above, ties, written, out_off, h_ptr, row_off,
                                      val_ptr, pre_ptr, idx_ptr)

    @triton.jit
    def _relu_topk_warp_kernel(
        h_ptr, gamma_ptr, beta_ptr, val_ptr, pre_ptr, idx_ptr, cand_key_ptr, cand_col_ptr,
        C, stride_h,
        K: tl.constexpr, SLOTS: tl.constexpr, CAND: tl.constexpr, AFFINE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_off = row * stride_h
        out_off = row * K
        lanes = tl.arange(0, SLOTS)
        # One pass over the row keeps each slot's 4 largest keys (slot = column mod SLOTS).
        t1 = tl.full([SLOTS], -1, tl.int32)
        t2 = t1
        t3 = t1
        t4 = t1
        c1 = tl.full([SLOTS], 0, tl.int32)
        c2 = c1
        c3 = c1
        c4 = c1
        whole = C - C % SLOTS
        for c0 in range(0, whole, SLOTS):
            x = _chunk_keys(h_ptr, gamma_ptr, beta_ptr, row_off, c0 + lanes, C, AFFINE, False)
            t1, t2, t3, t4, c1, c2, c3, c4 = _insert(x, c0 + lanes, t1, t2, t3, t4, c1, c2, c3, c4)
        if whole < C:
            x = _chunk_keys(h_ptr, gamma_ptr, beta_ptr, row_off, whole + lanes, C, AFFINE, True)
            t1, t2, t3, t4, c1, c2, c3, c4 = _insert(x, whole + lanes, t1, t2, t3, t4, c1, c2, c3, c4)
        threshold = _kth_largest_held(t1, t2, t3, t4, K)
        # A slot whose 4th key exceeds the threshold may have dropped a key above it too; else
        # every key above the threshold is held, and it is the row's K-th largest.
        if _count_above(t4, threshold) == 0:
            need = K - _count_above(t1, threshold) - _count_above(t2, threshold) - _count_above(t3, threshold) \
                - _count_above(t4, threshold)
            written = tl.full([], 0, tl.int32)
            ties = written
            written, ties = _emit(t1, c1, threshold, need, ties, written, out_off, h_ptr, row_off, val_ptr, pre_ptr, idx_ptr)
            written, ties = _emit(t2, c2, threshold, need, ties, written, out_off, h_ptr, row_off, val_ptr, pre_ptr, idx_ptr)
            written, ties = _emit(t3, c3, threshold, need, ties, written, out_off, h_ptr, row_off, val_ptr, pre_ptr, idx_ptr)
            _emit(t4, c4, threshold, need, ties, written, out_off, h_ptr, row_off, val_ptr, pre_ptr, idx_ptr)
        else:
            # The threshold of the held keys is still a lower bound of the row's K-th largest.
            _select_from_bound(h_ptr, gamma_ptr, beta_ptr, row, row_off, out_off, threshold,
                               val_ptr, pre_ptr, idx_ptr, cand_key_ptr, cand_col_ptr, C, K, SLOTS, CAND, AFFINE)


def _slots(k: int) -> int:
    """Fewer slots make the per-row work smaller, but more of the k winners share a slot: with
    k balls in `slots` bins, a slot gets more than 4 of them in ~7e-4 of rows at k = 32 over 128
    slots (~2e-3 at k = 64 over 256), and only those rows' programs take the fallback."""
    return 128 if 4 * k <= 128 else _SLOTS


def _relu_topk_warp_triton(h, k, gamma, beta) -> TopK:
    h = h.contiguous()
    n, c = h.shape
    dev = h.device
    out = TopK(torch.empty(n, k, dtype=torch.float32, device=dev), torch.empty(n, k, dtype=torch.int64, device=dev),
               torch.empty(n, k, dtype=torch.float32, device=dev))
    cand_keys = torch.empty(n, _CANDIDATES, dtype=torch.int32, device=dev)
    cand_cols = torch.empty(n, _CANDIDATES, dtype=torch.int32, device=dev)
    affine = gamma is not None
    _relu_topk_warp_kernel[(n,)](
        h, gamma.contiguous() if affine else h, beta.contiguous() if affine else h,
        out.values, out.pre, out.indices, cand_keys, cand_cols, c, h.stride(0),
        K=k, SLOTS=_slots(k), CAND=_CANDIDATES, AFFINE=affine, num_warps=1,
    )
    return out


def _relu_topk_triton(h, k, gamma, beta, dead, k_aux):
    h = h.contiguous()
    n, c = h.shape
    dev = h.device

    def outputs(width: int) -> TopK:
        return TopK(
            torch.empty(n, width, dtype=torch.float32, device=dev),
            torch.empty(n, width, dtype=torch.int64, device=dev),
            torch.empty(n, width, dtype=torch.float32, device=dev),
        )

    main = outputs(k)
    aux = outputs(k_aux) if dead is not None else None
    block = triton.next_power_of_2(c)
    affine = gamma is not None
    _relu_topk_kernel[(n,)](
        h,
        gamma.contiguous() if affine else h,
        beta.contiguous() if affine else h,
        dead.to(torch.int8).contiguous() if aux is not None else h,
        main.values, main.pre, main.indices,
        *(aux.values, aux.pre, aux.indices) if aux is not None else (main.values, main.pre, main.indices),
        c, h.stride(0),
        K=k, K_AUX=max(k_aux, 1), BLOCK_C=block, AFFINE=affine, AUX=aux is not None,
        num_warps=min(32, max(4, block // 1024)),
    )
    return main, aux
