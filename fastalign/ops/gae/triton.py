"""GAE and discounted returns in Triton: a reverse scan of affine maps, one program per sequence.

Math. Over the valid tokens of a sequence, ``A_t = r_t - V_t + gamma V_n + gamma lam A_n`` (``n`` = the next
valid token). Writing ``A_t = (r_t - V_t) + E_t`` and unrolling gives ``E_t = B_{next valid after t}`` with
``B_s = e_s + gamma lam B_next``, ``e_s = gamma (lam r_s + (1 - lam) V_s)``, and ``B`` after the last valid token
``= gamma * bootstrap``. So each position ``s`` carries the affine map ``f_s(x) = e_s + gamma lam x`` (the
identity where the mask is 0, which is how masked positions are skipped), and
``E_t = f_{t+1}(f_{t+2}(... (gamma * bootstrap)))``: a reverse scan whose element ``t`` holds the map of
``t + 1``. Maps compose associatively: ``(a2, b2) o (a1, b1) = (a2 a1, a2 b1 + b2)``.

The sequence is walked from its end in tiles of ``BT`` positions, the tile loaded in reversed order so that a
*forward* ``tl.associative_scan`` runs backward in time; each tile's last composite, applied to the carry,
carries into the next tile. (Reversed indices rather than ``reverse=True``: Triton's reverse scan has given
wrong results for non-commutative combines on GPUs, triton-lang/triton#4362, while the forward scan respects
the operand order since 2.2.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastalign._utils import check_cu_seqlens, new_output


@triton.jit
def _compose(a_later, b_later, a_here, b_here):
    # Scan order is backward in time: the accumulated maps (later positions) apply first, then this one.
    return a_here * a_later, a_here * b_later + b_here


@triton.jit
def gae_kernel(p_r, p_v, p_m, p_cu, p_boot, p_adv, p_ret, T, gamma, lam,
               HAS_VALUES: tl.constexpr, HAS_MASK: tl.constexpr, IS_VARLEN: tl.constexpr,
               HAS_BOOTSTRAP: tl.constexpr, BT: tl.constexpr):
    i_s = tl.program_id(0).to(tl.int64)
    if IS_VARLEN:
        begin = tl.load(p_cu + i_s).to(tl.int64)
        end = tl.load(p_cu + i_s + 1).to(tl.int64)
    else:
        begin = i_s * T
        end = begin + T
    gl = gamma * lam
    if HAS_BOOTSTRAP:
        carry = gamma * tl.load(p_boot + i_s).to(tl.float32)
    else:
        carry = gamma * 0.0
    o_i = tl.arange(0, BT)
    n_tiles = tl.cdiv(end - begin, BT)
    for j in range(0, n_tiles):
        o_t = end - 1 - j * BT - o_i                       # reversed: scan index i runs backward in time
        m_t = o_t >= begin
        m_n = m_t & (o_t + 1 < end)                        # position t + 1 exists in this sequence
        b_r = tl.load(p_r + o_t, mask=m_t, other=0.0).to(tl.float32)
        b_rn = tl.load(p_r + o_t + 1, mask=m_n, other=0.0).to(tl.float32)
        if HAS_VALUES:
            b_v = tl.load(p_v + o_t, mask=m_t, other=0.0).to(tl.float32)
            b_vn = tl.load(p_v + o_t + 1, mask=m_n, other=0.0).to(tl.float32)
        else:
            b_v = tl.zeros([BT], dtype=tl.float32)
            b_vn = tl.zeros([BT], dtype=tl.float32)
        if HAS_MASK:
            # Compared in float32: exact for 0/1 in every dtype, and -0.0 is 0 (raw bf16 bits would say otherwise).
            valid = m_t & (tl.load(p_m + o_t, mask=m_t, other=0).to(tl.float32) != 0.0)
            valid_n = m_n & (tl.load(p_m + o_t + 1, mask=m_n, other=0).to(tl.float32) != 0.0)
        else:
            valid = m_t
            valid_n = m_n
        # The map of position t + 1 (identity where it is masked or past the end).
        b_a = tl.where(valid_n, gl, 1.0)
        b_b = tl.where(valid_n, gamma * (lam * b_rn + (1.0 - lam) * b_vn), 0.0)
        b_A, b_B = tl.associative_scan((b_a, b_b), 0, _compose)
        b_e = b_A * carry + b_B                            # E_t
        b_adv = tl.where(valid, b_r - b_v + b_e, 0.0)
        tl.store(p_adv + o_t, b_adv, mask=m_t)
        if HAS_VALUES:
            tl.store(p_ret + o_t, tl.where(valid, b_adv + b_v, 0.0), mask=m_t)
        # E at the earliest position of this tile (identity maps pad a partial tile).
        carry = tl.sum(tl.where(o_i == BT - 1, b_e, 0.0), axis=0)


def _block(max_len: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(max(1, max_len))))


def _mask_arg(mask):
    # The kernel reads the mask in its own dtype (nonzero = valid); bool goes in as its bytes.
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _launch(rewards, values, mask, cu_seqlens, bootstrap, gamma: float, lam: float, block: int | None = None):
    """The kernel launch behind the custom ops (contract of :func:`gae_fwd`)."""
    if cu_seqlens is not None:
        # The op checks CPU offsets itself (as the C++ op does): under torch.compile api.py cannot read them.
        check_cu_seqlens(cu_seqlens, rewards.numel())
    adv = new_output(rewards.shape, dtype=torch.float32, device=rewards.device)
    ret = new_output(rewards.shape, dtype=torch.float32, device=rewards.device) if values is not None else None
    if cu_seqlens is not None:
        S, T = cu_seqlens.numel() - 1, 0
        # Without a host sync the longest sequence is unknown: size the tile by the mean length.
        bt = _block(rewards.numel() // max(S, 1))
    else:
        S, T = rewards.shape
        bt = _block(T)
    if rewards.numel() == 0:
        return adv, ret
    bt = block or bt
    dummy = adv
    gae_kernel[(S,)](
        rewards, values if values is not None else dummy,
        _mask_arg(mask) if mask is not None else dummy,
        cu_seqlens if cu_seqlens is not None else dummy,
        bootstrap if bootstrap is not None else dummy,
        adv, ret if ret is not None else dummy, T, float(gamma), float(lam),
        HAS_VALUES=values is not None, HAS_MASK=mask is not None, IS_VARLEN=cu_seqlens is not None,
        HAS_BOOTSTRAP=bootstrap is not None, BT=bt, num_warps=4 if bt >= 512 else 1,
    )
    return adv, ret


# The launchers run as torch.library custom ops (with fake impls), so torch.compile sees one opaque op each; the
# schemas are those of the C++ ops fastalign::gae / fastalign::discounted_returns.

@torch.library.custom_op("fastalign::gae_triton", mutates_args=(), schema=(
    "(Tensor rewards, Tensor values, Tensor? mask, Tensor? cu_seqlens, Tensor? bootstrap, float gamma, "
    "float lam) -> (Tensor, Tensor)"))
def _gae_op(rewards, values, mask, cu_seqlens, bootstrap, gamma, lam):
    return _launch(rewards, values, mask, cu_seqlens, bootstrap, gamma, lam)


@_gae_op.register_fake
def _(rewards, values, mask, cu_seqlens, bootstrap, gamma, lam):
    return (rewards.new_empty(rewards.shape, dtype=torch.float32),
            rewards.new_empty(rewards.shape, dtype=torch.float32))


@torch.library.custom_op("fastalign::discounted_returns_triton", mutates_args=(), schema=(
    "(Tensor rewards, Tensor? mask, Tensor? cu_seqlens, Tensor? bootstrap, float gamma) -> Tensor"))
def _discounted_returns_op(rewards, mask, cu_seqlens, bootstrap, gamma):
    return _launch(rewards, None, mask, cu_seqlens, bootstrap, gamma, 1.0)[0]


@_discounted_returns_op.register_fake
def _(rewards, mask, cu_seqlens, bootstrap, gamma):
    return rewards.new_empty(rewards.shape, dtype=torch.float32)


def gae_fwd(rewards, values, mask, cu_seqlens, bootstrap, gamma: float, lam: float, block: int | None = None):
    """``(advantages, returns)`` in float32; ``returns`` is None when ``values`` is None (discounted returns are
    then ``advantages``). Inputs contiguous; ``mask`` None or of any dtype (read as is, nonzero = valid);
    ``bootstrap`` float32 or None. Goes through
    the ops ``fastalign::gae_triton`` / ``fastalign::discounted_returns_triton``; ``block`` (tests only) overrides
    the tile length (a power of two, to chain many tiles on short sequences) and launches directly."""
    if block is not None:
        return _launch(rewards, values, mask, cu_seqlens, bootstrap, gamma, lam, block)
    if values is None:
        return torch.ops.fastalign.discounted_returns_triton(rewards, mask, cu_seqlens, bootstrap, gamma), None
    return torch.ops.fastalign.gae_triton(rewards, values, mask, cu_seqlens, bootstrap, gamma, lam)
