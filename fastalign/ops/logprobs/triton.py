"""Triton kernels of linear_logprobs: the logits are recomputed tile by tile and never written to memory.

Design (N rows, D hidden size, V vocabulary, e bytes per input element; blocks BN x BV x BD fixed per
(D, V, dtype), never per N: 64 x 128 x 64 for bf16/fp16, 64 x 64 x 32 for float32):

- Forward ``_fwd_kernel``: grid over N-blocks. Each program loops over the V-blocks in order; for each it
  forms the [BN, BV] logit tile with ``tl.dot`` over D-blocks (float32 accumulation; tensor cores for
  bf16/fp16, IEEE float32 products for float32 inputs), applies bias, logit_scale, softcap and temperature in
  registers, and folds the tile into an online logsumexp (running max ``m``, ``s = sum exp(z - m)``), an online
  ``t = sum exp(z - m) (z - m)`` for the entropy, and the target's logit. Outputs ``lse = m + log s``,
  ``z_target`` and ``sum_pz = m + t / s`` ([N] each; lse and sum_pz in float64 so that the entropy
  ``lse - sum_pz = log s - t / s`` does not cancel at large logits).
  FLOPs 2·N·D·V. Bytes: compulsory N·D·e + V·D·e + 20·N; W is streamed once per N-block,
  ceil(N/BN)·V·D·e in all (from L2 when it is shared by the programs in flight), i.e. BN/e·2 = 64 FLOP per
  byte of W at bf16.
- Backward, without atomics, so it is deterministic (``deterministic=True`` costs nothing):
  ``_bwd_dh_kernel`` over N-blocks loops over V-blocks, recomputes the logit tile, forms
  ``ds = dL/d(raw logit)`` (formula below) and accumulates ``dh[BN, D] += ds W[BV, D]`` into a float32 [N, D]
  buffer whose rows only this program touches; ``_bwd_dw_kernel`` over V-blocks loops over N-blocks,
  recomputes the tile and accumulates ``dW[BV, D] += ds^T h[BN, D]`` and ``db += sum_n ds`` the same way.
  FLOPs 4·N·D·V each: 8·N·D·V for the backward, 10·N·D·V with the forward. Bytes per tile step of the dh
  kernel: 2·BV·D·e of W (logits, then dh) and a read-modify-write of its dh rows, 8·BN·D bytes, for
  4·BN·BV·D FLOPs; in all ceil(N/BN)·2·V·D·e + ceil(V/BV)·8·N·D bytes (mostly L2), and symmetrically for the
  dW kernel. ``_bwd_dw_kernel`` is skipped when the weight needs no gradient (a frozen head) and has no bias.
- Gradient: with ``g = dL/dlogprob``, ``e = dL/dentropy``, ``p = exp(z - lse)``:
  ``dz_v = g (1[v = y] - p_v) - e p_v (z_v - sum_pz)``; ``z = c tanh(x / c) / T`` with ``x = scale (h W^T + b)``
  gives ``ds = dz (1 - (z T / c)^2) scale / T``. ``ds`` is rounded to the input dtype before its tile products
  (as the reference's autograd does), and accumulated in float32.
- Workspace: nothing grows with N x V. Besides the O(N) outputs there are only the float32 gradient
  accumulators: the gradients themselves for float32 inputs; for bf16/fp16, float32 copies of grad_hidden and
  grad_weight (4·(N + V)·D bytes), cast at the end. Those are gradient-sized, not constant: keeping dW in
  float32 is what the design asks for (bf16 accumulation of dW diverges), and an on-chip accumulator does not
  fit ([BV, D] float32 is 1 MiB at D = 4096).
- Batch invariance: a row's forward reduction (over D inside ``tl.dot``, then over the V-blocks in order)
  depends only on the fixed block sizes, never on N, the other rows or the row's position.
- Under ``TRITON_INTERPRET=1`` (the tests on CPU) the tile products are float32 sums over K in order
  (``_dot``): the interpreter's own ``tl.dot`` calls the host BLAS, whose result for a row depends on its
  position in the tile, and its bf16 path is broken in Triton 3.9; bf16 rounding is done on the bits there
  (``_round_to``), since the interpreter's float32 -> bf16 cast truncates.

Status and what remains for the GPU targets: the kernels compile for sm_80 and sm_90 (PTX and ptxas; a test
checks it); the tests run them under the interpreter, so block sizes, warps and stages are reasoned, not
tuned on a GPU. The forward has one program per N-block (128 programs at N = 8192, about one wave on an H100); the
backward recomputes the logits twice (8·N·D·V, against 6·N·D·V with one recompute, which needs either
atomics on dh/dW or a bounded ds buffer and cuBLAS-style products); the dh/dW read-modify-writes double the
L2 traffic of the backward tile steps.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastalign._backend import triton_interpret
from fastalign._utils import new_output


def block_sizes(D: int, V: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """``(BN, BV, BD, num_warps)``: a function of (D, V, dtype) only, never of N (batch invariance)."""
    if triton_interpret():
        return 16, 32, 16, 4  # small, so that tests on tiny shapes cross several V- and D-blocks
    if dtype == torch.float32:
        return 64, 64, 32, 4
    return 64, 128, 64, 8


@triton.jit
def _tanh(x):
    # tanh from exp (interpreter-friendly), with exp(-2|x|) <= 1 so nothing overflows.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, INTERP: tl.constexpr):
    """``acc + a @ b`` with float32 accumulation.

    INTERP (TRITON_INTERPRET=1 only) multiplies in float32 and sums over K in order for every output element,
    as the GPU's MMA does; the interpreter's own ``tl.dot`` goes to the host BLAS, whose result for a row
    depends on the row's position in the tile (so batch invariance could not be tested), and whose bf16 path
    returns garbage in Triton 3.9. bf16/fp16 products are exact in float32, so the values are the same.
    """
    if INTERP:
        return acc + tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _round_to(x, dtype: tl.constexpr, INTERP: tl.constexpr):
    """``x`` rounded to ``dtype`` (round to nearest even). Under INTERP with bf16 (the interpreter's float32 ->
    bf16 cast truncates) the rounding is done on the bits and the value stays float32."""
    if INTERP and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _logit_tile(p_h, p_w, p_b, o_n, o_v, m_n, m_v, D, stride_h, stride_w, scale, inv_temp, softcap,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
                BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
    """Processed logits ``z [BN, BV]`` (float32) and ``tanh(x / c)`` (for the softcap's backward)."""
    b_x = tl.zeros([BN, BV], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        b_h = tl.load(p_h + o_n[:, None] * stride_h + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_w = tl.load(p_w + o_v[:, None] * stride_w + o_d[None, :], mask=m_v[:, None] & m_d[None, :], other=0.0)
        b_x = _dot(b_h, tl.trans(b_w), b_x, PREC, INTERP)
    if HAS_BIAS:
        b_x += tl.load(p_b + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
    b_x = b_x * scale
    if HAS_SOFTCAP:
        b_tanh = _tanh(b_x / softcap)
        b_z = softcap * b_tanh * inv_temp
    else:
        b_tanh = b_x
        b_z = b_x * inv_temp
    return b_z, b_tanh


@triton.jit
def _fwd_kernel(p_h, p_w, p_b, p_t, p_lse, p_zt, p_spz, N, V, D, stride_h, stride_w, vocab_start,
                scale, inv_temp, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                ENTROPY: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr, BN: tl.constexpr,
                BV: tl.constexpr, BD: tl.constexpr):
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    b_y = tl.load(p_t + o_n, mask=m_n, other=-1).to(tl.int64) - vocab_start
    b_m = tl.full([BN], float("-inf"), dtype=tl.float32)
    b_s = tl.zeros([BN], dtype=tl.float32)
    b_t = tl.zeros([BN], dtype=tl.float32)
    b_zt = tl.zeros([BN], dtype=tl.float32)
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV).to(tl.int64)
        m_v = o_v < V
        b_z, _ = _logit_tile(p_h, p_w, p_b, o_n, o_v, m_n, m_v, D, stride_h, stride_w, scale, inv_temp, softcap,
                             HAS_BIAS, HAS_SOFTCAP, PREC, INTERP, BN, BV, BD)
        b_z = tl.where(m_v[None, :], b_z, float("-inf"))
        # m_v: a target of another shard may fall in this block's padding, where z is -inf
        b_zt += tl.sum(tl.where((o_v[None, :] == b_y[:, None]) & m_v[None, :], b_z, 0.0), axis=1)
        b_m_new = tl.maximum(b_m, tl.max(b_z, axis=1))
        # A row whose logits so far are all -inf (masked entries) has m' = -inf: exponents are taken relative to
        # 0 instead, so exp(-inf - -inf) = NaN never occurs (s and t stay 0; nothing else changes).
        b_m_ref = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_alpha = tl.exp(b_m - b_m_ref)
        b_p = tl.exp(b_z - b_m_ref[:, None])
        if ENTROPY:
            # t = sum exp(z - m)(z - m); a new max m' rescales it to alpha (t + (m - m') s). An entry with p = 0
            # (z = -inf, or z - m' overflowing) adds p (z - m') = 0: p log p = 0 at p = 0.
            # alpha = 0 (the old max far below the new one) drops the old t whole: (m - m') s may overflow.
            b_shift = tl.where(b_s > 0, b_m - b_m_new, 0.0)
            b_zr = tl.where(b_p > 0, b_z - b_m_ref[:, None], 0.0)
            b_t = tl.where(b_alpha > 0, b_alpha * (b_t + b_shift * b_s), 0.0) + tl.sum(b_p * b_zr, axis=1)
        b_s = b_s * b_alpha + tl.sum(b_p, axis=1)
        b_m = b_m_new
    # lse and sum_pz in float64: entropy = lse - sum_pz = log(s) - t / s then loses nothing to cancellation
    # when the logits are large (|lse| ~ 1e4 has a float32 ulp of 1e-3).
    b_m64 = b_m.to(tl.float64)
    tl.store(p_lse + o_n, b_m64 + tl.log(b_s).to(tl.float64), mask=m_n)
    tl.store(p_zt + o_n, b_zt, mask=m_n)
    if ENTROPY:
        tl.store(p_spz + o_n, b_m64 + (b_t / b_s).to(tl.float64), mask=m_n)


@triton.jit
def _grad_logit_tile(b_z, b_tanh, b_y, o_v, m_n, m_v, b_lse, b_spz, b_g, b_e, scale, inv_temp, softcap,
                     HAS_SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr):
    """``ds = dL/d(raw logit)`` for a tile, zero outside the valid rows and columns."""
    m_nv = m_n[:, None] & m_v[None, :]
    b_zs = tl.where(m_nv, b_z, 0.0)
    b_p = tl.where(m_nv, tl.exp(b_zs - b_lse[:, None]), 0.0)
    # dz_v = g (1[v = y] - p_v) - e p_v (z_v - sum_pz)
    b_dz = tl.where(o_v[None, :] == b_y[:, None], b_g[:, None], 0.0) - b_g[:, None] * b_p
    if ENTROPY:  # (z - sum_pz) taken as 0 where p = 0, as in the forward (z = -inf would give 0 * -inf)
        b_dz -= b_e[:, None] * b_p * tl.where(b_p > 0, b_zs - b_spz[:, None], 0.0)
    if HAS_SOFTCAP:
        b_dz = b_dz * (1.0 - b_tanh * b_tanh)
    return tl.where(m_nv, b_dz * (scale * inv_temp), 0.0)


@triton.jit
def _load_rows(p_t, p_lse, p_spz, p_g, p_e, o_n, m_n, vocab_start, ENTROPY: tl.constexpr):
    b_y = tl.load(p_t + o_n, mask=m_n, other=-1).to(tl.int64) - vocab_start
    b_lse = tl.load(p_lse + o_n, mask=m_n, other=0.0)
    b_g = tl.load(p_g + o_n, mask=m_n, other=0.0)
    if ENTROPY:
        b_spz = tl.load(p_spz + o_n, mask=m_n, other=0.0)
        b_e = tl.load(p_e + o_n, mask=m_n, other=0.0)
    else:
        b_spz = b_lse
        b_e = b_g
    return b_y, b_lse, b_spz, b_g, b_e


@triton.jit
def _ds_tile(p_h, p_w, p_b, o_n, o_v, m_n, m_v, b_y, b_lse, b_spz, b_g, b_e, D, stride_h, stride_w, scale, inv_temp,
             softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr, PREC: tl.constexpr,
             INTERP: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
    """The logit tile recomputed, then ``ds = dL/d(raw logit)`` [BN, BV] in float32."""
    b_z, b_tanh = _logit_tile(p_h, p_w, p_b, o_n, o_v, m_n, m_v, D, stride_h, stride_w, scale, inv_temp, softcap,
                              HAS_BIAS, HAS_SOFTCAP, PREC, INTERP, BN, BV, BD)
    return _grad_logit_tile(b_z, b_tanh, b_y, o_v, m_n, m_v, b_lse, b_spz, b_g, b_e, scale, inv_temp, softcap,
                            HAS_SOFTCAP, ENTROPY)


@triton.jit
def _accumulate_rows(p_acc, o_r, m_r, b_a, p_x, o_x, m_x, stride_x, D, keep, PREC: tl.constexpr,
                     INTERP: tl.constexpr, BD: tl.constexpr):
    """``acc[o_r, :] = (acc[o_r, :] if keep else 0) + b_a @ x[o_x, :]``, D-block by D-block, for a float32
    accumulator of row stride D owned by this program (so no atomics)."""
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        p_out = p_acc + o_r[:, None] * D + o_d[None, :]
        m_out = m_r[:, None] & m_d[None, :]
        b_acc = tl.load(p_out, mask=m_out & keep, other=0.0)
        b_x = tl.load(p_x + o_x[:, None] * stride_x + o_d[None, :], mask=m_x[:, None] & m_d[None, :], other=0.0)
        tl.store(p_out, _dot(b_a, b_x, b_acc, PREC, INTERP), mask=m_out)


@triton.jit
def _bwd_dh_kernel(p_h, p_w, p_b, p_t, p_lse, p_spz, p_g, p_e, p_dh, N, V, D, stride_h, stride_w, vocab_start,
                   scale, inv_temp, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   ENTROPY: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr,
                   BD: tl.constexpr):
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    b_y, b_lse, b_spz, b_g, b_e = _load_rows(p_t, p_lse, p_spz, p_g, p_e, o_n, m_n, vocab_start, ENTROPY)
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV).to(tl.int64)
        m_v = o_v < V
        b_ds = _ds_tile(p_h, p_w, p_b, o_n, o_v, m_n, m_v, b_y, b_lse, b_spz, b_g, b_e, D, stride_h, stride_w, scale,
                        inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP, ENTROPY, PREC, INTERP, BN, BV, BD)
        # dh[n, :] = sum over the V-blocks, in order, of ds[n, v] W[v, :]
        _accumulate_rows(p_dh, o_n, m_n, _round_to(b_ds, p_w.dtype.element_ty, INTERP), p_w, o_v, m_v, stride_w, D,
                         v0 > 0, PREC, INTERP, BD)


@triton.jit
def _bwd_dw_kernel(p_h, p_w, p_b, p_t, p_lse, p_spz, p_g, p_e, p_dw, p_db, N, V, D, stride_h, stride_w, vocab_start,
                   scale, inv_temp, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   ENTROPY: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr,
                   BD: tl.constexpr):
    i_v = tl.program_id(0).to(tl.int64)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_db = tl.zeros([BV], dtype=tl.float32)
    for n0 in range(0, N, BN):
        o_n = n0 + tl.arange(0, BN).to(tl.int64)
        m_n = o_n < N
        b_y, b_lse, b_spz, b_g, b_e = _load_rows(p_t, p_lse, p_spz, p_g, p_e, o_n, m_n, vocab_start, ENTROPY)
        b_ds = _ds_tile(p_h, p_w, p_b, o_n, o_v, m_n, m_v, b_y, b_lse, b_spz, b_g, b_e, D, stride_h, stride_w, scale,
                        inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP, ENTROPY, PREC, INTERP, BN, BV, BD)
        b_db += tl.sum(b_ds, axis=0)
        # dW[v, :] = sum over the N-blocks, in order, of ds[n, v] h[n, :]
        _accumulate_rows(p_dw, o_v, m_v, tl.trans(_round_to(b_ds, p_h.dtype.element_ty, INTERP)), p_h, o_n, m_n,
                         stride_h, D, n0 > 0, PREC, INTERP, BD)
    if HAS_BIAS:
        tl.store(p_db + o_v, b_db, mask=m_v)


def _prepare(hidden, weight, bias, temperature, softcap, logit_scale, vocab_start, entropy):
    if hidden.dtype == torch.float64:
        raise TypeError("the triton impl takes float32/bfloat16/float16 inputs; got float64 (use impl='torch')")
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    N, D = hidden.shape
    V = weight.shape[0]
    BN, BV, BD, num_warps = block_sizes(D, V, hidden.dtype)
    common = dict(
        N=N, V=V, D=D, stride_h=hidden.stride(0), stride_w=weight.stride(0), vocab_start=vocab_start,
        scale=logit_scale, inv_temp=1.0 / temperature, softcap=1.0 if softcap is None else softcap,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, ENTROPY=entropy,
        PREC="ieee" if hidden.dtype == torch.float32 else "tf32",
        INTERP=triton_interpret(), BN=BN, BV=BV, BD=BD, num_warps=num_warps,
    )
    return hidden, weight, bias, common


# The launchers run as torch.library custom ops (with fake impls), so torch.compile sees one opaque op each.
# Absent optional results are returned as empty tensors (a custom op cannot return None).

@torch.library.custom_op("fastalign::linear_logprobs_triton_fwd", mutates_args=(), schema=(
    "(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, float temperature, float? softcap, "
    "float logit_scale, bool return_entropy, int vocab_start) -> (Tensor, Tensor, Tensor)"))
def _fwd_op(hidden, weight, targets, bias, temperature, softcap, logit_scale, return_entropy, vocab_start):
    hidden, weight, bias, common = _prepare(hidden, weight, bias, temperature, softcap, logit_scale, vocab_start,
                                            return_entropy)
    N, device = hidden.shape[0], hidden.device
    lse = new_output((N,), dtype=torch.float64, device=device)
    z_target = new_output((N,), dtype=torch.float32, device=device)
    sum_pz = new_output((N if return_entropy else 0,), dtype=torch.float64, device=device)
    if N:
        grid = (triton.cdiv(N, common["BN"]),)
        _fwd_kernel[grid](hidden, weight, bias, targets, lse, z_target, sum_pz if return_entropy else lse, **common)
    return lse, z_target, sum_pz


@_fwd_op.register_fake
def _(hidden, weight, targets, bias, temperature, softcap, logit_scale, return_entropy, vocab_start):
    N = hidden.shape[0]
    return (hidden.new_empty(N, dtype=torch.float64), hidden.new_empty(N, dtype=torch.float32),
            hidden.new_empty(N if return_entropy else 0, dtype=torch.float64))


@torch.library.custom_op("fastalign::linear_logprobs_triton_bwd", mutates_args=(), schema=(
    "(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, Tensor lse, Tensor? sum_pz, Tensor grad_logprobs, "
    "Tensor? grad_entropy, float temperature, float? softcap, float logit_scale, int vocab_start, "
    "bool compute_grad_weight) -> (Tensor, Tensor, Tensor)"))
def _bwd_op(hidden, weight, targets, bias, lse, sum_pz, grad_logprobs, grad_entropy, temperature, softcap,
            logit_scale, vocab_start, compute_grad_weight):
    entropy = grad_entropy is not None
    hidden, weight, bias, common = _prepare(hidden, weight, bias, temperature, softcap, logit_scale, vocab_start,
                                            entropy)
    (N, D), V, device = hidden.shape, weight.shape[0], hidden.device
    f32 = hidden.dtype == torch.float32
    grad_logprobs = grad_logprobs.float().contiguous()
    lse = lse.float().contiguous()
    rows = (targets, lse, sum_pz.float().contiguous() if entropy else lse, grad_logprobs,
            grad_entropy.float().contiguous() if entropy else grad_logprobs)
    dh = new_output((N, D), dtype=torch.float32, device=device)
    if N and V:
        _bwd_dh_kernel[(triton.cdiv(N, common["BN"]),)](hidden, weight, bias, *rows, dh, **common)
    elif N:
        dh.zero_()
    need_dw = compute_grad_weight or bias is not None
    dw = new_output((V, D) if need_dw else (0,), dtype=torch.float32, device=device)
    db = new_output((V if bias is not None else 0,), dtype=torch.float32, device=device)
    if need_dw:
        if N and V:
            _bwd_dw_kernel[(triton.cdiv(V, common["BV"]),)](hidden, weight, bias, *rows, dw,
                                                            db if bias is not None else dw, **common)
        else:
            dw.zero_()
            db.zero_()
    grad_weight = dw if compute_grad_weight else hidden.new_empty(0)
    grad_weight = grad_weight if f32 or not compute_grad_weight else grad_weight.to(weight.dtype)
    return (dh if f32 else dh.to(hidden.dtype)), grad_weight, db


@_bwd_op.register_fake
def _(hidden, weight, targets, bias, lse, sum_pz, grad_logprobs, grad_entropy, temperature, softcap, logit_scale,
      vocab_start, compute_grad_weight):
    V = weight.shape[0]
    return (torch.empty_like(hidden), weight.new_empty(weight.shape if compute_grad_weight else (0,)),
            hidden.new_empty(V if bias is not None else 0, dtype=torch.float32))


def linear_logprobs_fwd(hidden, weight, targets, bias, params):
    """``(lse, z_target, sum_pz)`` [N] each: lse and sum_pz float64, z_target float32 (``sum_pz`` None without
    entropy); see api.py's contract."""
    lse, z_target, sum_pz = torch.ops.fastalign.linear_logprobs_triton_fwd(
        hidden, weight, targets, bias, params.temperature, params.softcap, params.logit_scale,
        params.return_entropy, params.vocab_start)
    return lse, z_target, sum_pz if params.return_entropy else None


def linear_logprobs_bwd(hidden, weight, targets, bias, lse, sum_pz, grad_logprobs, grad_entropy, params):
    """``(grad_hidden, grad_weight, grad_bias)`` accumulated in float32; grad_hidden and grad_weight in the inputs'
    dtype, grad_bias float32 (grad_weight None unless ``params.compute_grad_weight``, grad_bias None without
    bias)."""
    grad_hidden, grad_weight, grad_bias = torch.ops.fastalign.linear_logprobs_triton_bwd(
        hidden, weight, targets, bias, lse, sum_pz, grad_logprobs, grad_entropy, params.temperature,
        params.softcap, params.logit_scale, params.vocab_start, params.compute_grad_weight)
    return (grad_hidden, grad_weight if params.compute_grad_weight else None,
            grad_bias if bias is not None else None)
