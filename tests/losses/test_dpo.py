"""dpo_loss: every loss type against a straightforward float64 implementation written from its formula."""

import math
import pathlib
import subprocess
import sys

import pytest
import torch

from fastalign import BCORunningMean, dpo_loss
from fastalign.losses.dpo import DOC_PAGE, LOSS_TYPES, LOSSES, REFERENCE_FREE, loss_types_markdown
from fastalign.testing import assert_close_to_ref

BETA, EPS, GAMMA, ALPHA, TAU = 0.2, 0.15, 0.7, 0.8, 0.3


def logsig(x):
    return -torch.log1p(torch.exp(-x))


def sig(x):
    return 1 / (1 + torch.exp(-x))


def sorted_(x):
    return x[torch.argsort(x)]


def reference(kind, pc, pr, rc, rr, nc, nr, beta=BETA, e=EPS):
    """Per-pair loss of ``kind``, written from the formula of its paper (TRL's conventions where they differ)."""
    lc, lr = pc - rc, pr - rr
    h = lc - lr
    nll = None if nc is None else -pc.sum() / nc.sum()
    if kind == "sigmoid":
        return -(1 - e) * logsig(beta * h) - e * logsig(-beta * h)
    if kind == "hinge":
        return torch.clamp(1 - beta * h, min=0)
    if kind == "ipo":
        return (lc / nc - lr / nr - 1 / (2 * beta)) ** 2
    if kind == "exo_pair":
        p_w, p_l = sig(beta * h), sig(-beta * h)
        return p_w * torch.log(p_w / (1 - e)) + p_l * torch.log(p_l / e)
    if kind == "nca_pair":
        return -logsig(beta * lc) - 0.5 * logsig(-beta * lc) - 0.5 * logsig(-beta * lr)
    if kind == "robust":
        return ((1 - e) * -logsig(beta * h) - e * -logsig(-beta * h)) / (1 - 2 * e)
    if kind == "bco_pair":  # TRL 1.16's DPOTrainer: no shift (the paper's running-mean shift is bco_shift=True)
        return -logsig(beta * lc) - logsig(-beta * lr)
    if kind == "sppo_hard":
        return (lc - 1 / (2 * beta)) ** 2 + (lr + 1 / (2 * beta)) ** 2
    if kind == "aot":
        z = beta * (sorted_(pc - pr) - sorted_(rc - rr))
        return -(1 - e) * logsig(z) - e * logsig(-z)
    if kind == "aot_unpaired":
        z = beta * (sorted_(lc) - sorted_(lr))
        return -(1 - e) * logsig(z) - e * logsig(-z)
    if kind == "apo_zero":
        return (1 - sig(beta * lc)) + sig(beta * lr)
    if kind == "apo_down":
        return sig(beta * lc) + (1 - sig(beta * h))
    if kind == "discopop":
        m = sig(beta * h / TAU)
        return (1 - m) * -logsig(beta * h) + m * torch.exp(-beta * h)
    if kind == "sft":
        return nll * torch.ones_like(pc)
    if kind == "sigmoid_norm":
        return -logsig(beta * (lc / nc - lr / nr))
    if kind == "simpo":
        z = beta * pc / nc - beta * pr / nr - GAMMA
        return -(1 - e) * logsig(z) - e * logsig(-z)
    if kind == "cpo":
        z = beta * (pc - pr)
        return -(1 - e) * logsig(z) - e * logsig(-z) + ALPHA * nll
    if kind == "orpo":
        p_c, p_r = torch.exp(pc / nc), torch.exp(pr / nr)
        odds_ratio = (p_c / (1 - p_c)) / (p_r / (1 - p_r))
        return nll - beta * logsig(torch.log(odds_ratio))
    raise AssertionError(kind)


def make_inputs(B, dtype=torch.float64):
    """Sums of log-probabilities over 3..40 tokens, references near the policy (log-ratios of a few nats)."""
    nc, nr = torch.randint(3, 40, (B,)), torch.randint(3, 40, (B,))
    pc = -nc * (0.2 + 2 * torch.rand(B, dtype=torch.float64))
    pr = -nr * (0.2 + 2 * torch.rand(B, dtype=torch.float64))
    rc, rr = pc + 3 * torch.randn(B, dtype=torch.float64), pr + 3 * torch.randn(B, dtype=torch.float64)
    return [t.to(dtype) for t in (pc, pr, rc, rr)], nc, nr


def options(kind):
    smoothing = kind in ("sigmoid", "exo_pair", "robust", "aot", "aot_unpaired", "simpo", "cpo")
    return dict(beta=BETA, loss_type=kind, label_smoothing=EPS if smoothing else 0.0, simpo_gamma=GAMMA,
                cpo_alpha=ALPHA, discopop_tau=TAU)


def loss_and_grads(fn, pc, pr, *rest):
    pc, pr = pc.detach().clone().requires_grad_(), pr.detach().clone().requires_grad_()
    loss = fn(pc, pr, *rest)
    gc, gr = torch.autograd.grad(loss, (pc, pr), allow_unused=True)
    return loss.detach(), torch.zeros_like(pc) if gc is None else gc, torch.zeros_like(pr) if gr is None else gr


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", LOSS_TYPES)
def test_every_loss_type_matches_its_formula(kind, dtype):
    (pc, pr, rc, rr), nc, nr = make_inputs(7)
    lowp = [t.to(dtype) for t in (pc, pr, rc, rr)]
    ours = loss_and_grads(lambda a, b, c, d: dpo_loss(a, b, c, d, chosen_lengths=nc, rejected_lengths=nr,
                                                      **options(kind))[0], *lowp)
    ref_fn = lambda a, b, c, d: reference(kind, a, b, c, d, nc.to(a.dtype), nr.to(a.dtype),
                                          e=options(kind)["label_smoothing"]).mean()
    ref64 = loss_and_grads(ref_fn, pc, pr, rc, rr)
    ref_lowp = loss_and_grads(ref_fn, *lowp)
    assert ours[0].dtype == dtype
    # atol: a few units of the last place of the result's dtype (the formulas round in different orders), relative
    # to the result, and for gradients at least to beta/B, the scale of the O(1) terms that cancel in them.
    ulps = 8 * torch.finfo(dtype).eps
    for name, o, r, rl in zip(("loss", "grad chosen", "grad rejected"), ours, ref64, ref_lowp):
        scale = float(r.abs().max()) + (BETA / pc.numel() if name != "loss" else 0.0)
        assert_close_to_ref(o, r, rl if dtype != torch.float64 else None, atol=ulps * scale, name=f"{kind} {name}")
    assert ours[1].abs().max() > 0 or ours[2].abs().max() > 0


def test_reference_free_types_need_no_reference():
    (pc, pr, _, _), nc, nr = make_inputs(5)
    for kind in REFERENCE_FREE:
        loss, metrics = dpo_loss(pc, pr, chosen_lengths=nc, rejected_lengths=nr, **options(kind))
        expected = reference(kind, pc, pr, 0 * pc, 0 * pr, nc.double(), nr.double(),
                             e=options(kind)["label_smoothing"]).mean()
        assert_close_to_ref(loss, expected, atol=1e-12, name=kind)
        assert_close_to_ref(metrics["rewards/chosen"], BETA * pc.mean(), atol=1e-12)


def test_combined_types_are_the_weighted_sum():
    (pc, pr, rc, rr), nc, nr = make_inputs(6)
    kinds, weights = ["sigmoid", "sft", "ipo"], [1.0, 0.5, 0.25]
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type=kinds, loss_weights=weights,
                             chosen_lengths=nc, rejected_lengths=nr)
    expected = sum(w * reference(k, pc, pr, rc, rr, nc.double(), nr.double(), e=0.0).mean()
                   for k, w in zip(kinds, weights))
    assert_close_to_ref(loss, expected, atol=1e-12, name="combined")
    assert_close_to_ref(metrics["nll_loss"], -pc.sum() / nc.sum(), atol=1e-12, name="nll_loss")
    loss_default, _ = dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type=["sigmoid", "hinge"])
    each = [dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type=k)[0] for k in ("sigmoid", "hinge")]
    assert_close_to_ref(loss_default, each[0] + each[1], atol=1e-12, name="default weights are 1")


@pytest.mark.parametrize("kind", ["ipo", "sigmoid_norm", "simpo", "orpo", "sigmoid"])
def test_length_averaged_logps_equal_sums_with_lengths(kind):
    (pc, pr, rc, rr), nc, nr = make_inputs(5)
    opts = options(kind)
    from_sums, _ = dpo_loss(pc, pr, rc, rr, chosen_lengths=nc, rejected_lengths=nr, **opts)
    from_means, m = dpo_loss(pc / nc, pr / nr, rc / nc, rr / nr, average_log_prob=True, **opts)
    if kind == "sigmoid":  # a sum-based loss on averages is a different loss (TRL's length-normalized DPO)
        expected = reference("sigmoid", pc / nc, pr / nr, rc / nc, rr / nr, nc, nr, e=opts["label_smoothing"])
        assert_close_to_ref(from_means, expected.mean(), atol=1e-12, name="sigmoid on averages")
    elif kind == "orpo":  # the NLL of averages is the mean over pairs, not over tokens
        nll_tokens, nll_pairs = -pc.sum() / nc.sum(), -(pc / nc).mean()
        assert_close_to_ref(from_means, from_sums - nll_tokens + nll_pairs, atol=1e-12, name=kind)
    else:
        assert_close_to_ref(from_means, from_sums, atol=1e-12, name=kind)
    assert_close_to_ref(m["logps/chosen"], (pc / nc).mean(), atol=1e-12, name="metrics use the given logps")


def test_metrics_named_and_computed_as_trl_does():
    (pc, pr, rc, rr), _, _ = make_inputs(9)
    loss, m = dpo_loss(pc.float(), pr.float(), rc.float(), rr.float(), beta=BETA)
    assert set(m) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                      "logps/chosen", "logps/rejected"}
    c, r = BETA * (pc - rc), BETA * (pr - rr)
    expected = {"rewards/chosen": c.mean(), "rewards/rejected": r.mean(), "rewards/accuracies": (c > r).double().mean(),
                "rewards/margins": (c - r).mean(), "logps/chosen": pc.mean(), "logps/rejected": pr.mean()}
    for k, v in expected.items():
        assert not m[k].requires_grad and m[k].dim() == 0
        assert_close_to_ref(m[k], v, atol=1e-5 * (1 + abs(float(v))), name=k)


def test_bco_pair_default_is_trl_without_shift_and_ignores_a_state():
    """TRL 1.16's bco_pair: ``-logsigmoid(b l_c) - logsigmoid(-b l_r)``, no running-mean shift, whatever the
    batch's mean reward; a state passed without ``bco_shift`` is left untouched."""
    (pc, pr, rc, rr), _, _ = make_inputs(5)
    pc = pc + 3.0  # a batch mean reward far from 0, where a shift would show
    state = BCORunningMean()
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type="bco_pair", bco_state=state)
    lc, lr = pc - rc, pr - rr
    expected = (-logsig(BETA * lc) - logsig(-BETA * lr)).mean()
    assert_close_to_ref(loss, expected, atol=1e-12, name="bco_pair")
    assert state.count == 0 and state.mean is None


def test_bco_shift_without_state_uses_the_batch_mean():
    (pc, pr, rc, rr), _, _ = make_inputs(5)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type="bco_pair", bco_shift=True)
    lc, lr = pc - rc, pr - rr
    delta = (BETA * torch.cat([lc, lr])).mean()
    assert_close_to_ref(loss, (-logsig(BETA * lc - delta) - logsig(delta - BETA * lr)).mean(), atol=1e-12)
    with pytest.raises(TypeError, match="bco_shift must be a bool; got str"):
        dpo_loss(pc, pr, rc, rr, loss_type="bco_pair", bco_shift="yes")


def test_bco_running_mean_carries_across_steps():
    state = BCORunningMean()
    batches = [make_inputs(4)[0] for _ in range(3)]
    means = []
    for pc, pr, rc, rr in batches:
        loss, _ = dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type="bco_pair", bco_state=state, bco_shift=True)
        means.append(float((BETA * torch.cat([pc - rc, pr - rr])).mean()))
        delta = sum(means) / len(means)
        lc, lr = pc - rc, pr - rr
        expected = (-logsig(BETA * lc - delta) - logsig(delta - BETA * lr)).mean()
        assert_close_to_ref(loss, expected, atol=1e-12, name=f"bco step {len(means)}")
    restored = BCORunningMean()
    restored.load_state_dict(state.state_dict())
    assert restored.count == 3 and math.isclose(float(restored.mean), sum(means) / 3, rel_tol=1e-12)


def test_bf16_inputs_are_computed_in_float32():
    (pc, pr, rc, rr), _, _ = make_inputs(4)
    loss, _ = dpo_loss(*(t.bfloat16() for t in (pc, pr, rc, rr)))
    assert loss.dtype == torch.float32
    expected = reference("sigmoid", *(t.bfloat16().double() for t in (pc, pr, rc, rr)), None, None, e=0.0,
                         beta=0.1).mean()
    assert_close_to_ref(loss, expected, atol=1e-6)


B_OK = torch.tensor([-3.0, -4.0])


@pytest.mark.parametrize("call, error, match", [
    (lambda: dpo_loss(B_OK, torch.tensor([-1.0, -2.0, -3.0]), B_OK, B_OK), ValueError,
     r"policy_rejected_logps must have the batch size .*\[2\]"),
    (lambda: dpo_loss(B_OK, B_OK, B_OK, B_OK[:1]), ValueError, "ref_rejected_logps must have the batch size"),
    (lambda: dpo_loss(B_OK, B_OK, B_OK, B_OK, loss_type="kto"), ValueError,
     "'kto' is unknown; valid loss types are sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, "
     "aot, aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm, simpo, cpo, orpo"),
    (lambda: dpo_loss(B_OK, B_OK, B_OK, B_OK, loss_type=["sigmoid", "nope"]), ValueError, "'nope' is unknown"),
    (lambda: dpo_loss(B_OK, B_OK, B_OK, B_OK, beta=0.0), ValueError, "beta must be > 0; got 0.0"),
    (lambda: dpo_loss(B_OK, B_OK, B_OK, B_OK, beta=-1), ValueError, "beta must be > 0; got -1.0"),
    (lambda: dpo_loss(B_OK, B_OK, B_OK, B_OK, beta="0.1"), TypeError, "beta must be a real number; got str"),
    (lambda: dpo_loss(B_OK, B_OK, B_OK, B_OK, beta=float("nan")), ValueError, "beta must be finite"),
    (lambda: dpo_loss(B_OK, B_OK), ValueError, r"loss_type \['sigmoid'\] needs ref_chosen_logps"),
    (lambda: dpo_loss(B_OK, B_OK, B_OK, None), ValueError, "must be given together"),
    (lambda: dpo_loss(B_OK, B_OK, B_OK, B_OK, loss_type="ipo"), ValueError, "pass chosen_lengths and rejected_length"),
    (lambda: dpo_loss(B_OK, B_OK, B_OK, B_OK, loss_type="sft", chosen_lengths=torch.tensor([3, 0]),
                      rejected_lengths=torch.tensor([1, 1])), ValueError,
     "chosen_lengths must be > 0 .*completion tokens.*got 0 at pair 1"),
    (lambda: dpo_loss(B_OK, B_OK, B_OK, B_OK, loss_type="simpo", chosen_lengths=torch.tensor([3, 1]),
                      rejected_lengths=torch.tensor([3])), ValueError, "rejected_lengths must have the batch size"),
    (lambda: dpo_loss(B_OK, B_OK, B_OK, B_OK, loss_type=["sigmoid", "sft"], loss_weights=[1.0]), ValueError,
     "loss_weights must have one weight per loss type"),
    (lambda: dpo_loss(B_OK, B_OK, B_OK, B_OK, loss_type=["sigmoid", "sigmoid"]), ValueError, "must not repeat"),
    (lambda: dpo_loss(B_OK, B_OK, B_OK, B_OK, loss_type=[]), TypeError, "loss_type must be a string or a non-empty"),
    (lambda: dpo_loss(B_OK, B_OK, B_OK, B_OK, loss_type="robust", label_smoothing=0.5), ValueError,
     r"label_smoothing must be in \[0, 0.5\) with loss_type robust"),
    (lambda: dpo_loss(B_OK, B_OK, B_OK, B_OK, label_smoothing=-0.1), ValueError, "label_smoothing must be in"),
    (lambda: dpo_loss(B_OK, B_OK, B_OK, B_OK, loss_type="discopop", discopop_tau=0), ValueError,
     "discopop_tau must be > 0"),
    (lambda: dpo_loss(B_OK[None], B_OK, B_OK, B_OK), ValueError, "policy_chosen_logps must be 1-D"),
    (lambda: dpo_loss(B_OK.long(), B_OK, B_OK, B_OK), TypeError, "policy_chosen_logps must have dtype"),
    (lambda: dpo_loss(B_OK[:0], B_OK[:0], B_OK[:0], B_OK[:0]), ValueError, "at least one pair"),
    (lambda: dpo_loss([-1.0], B_OK, B_OK, B_OK), TypeError, "policy_chosen_logps must be a torch.Tensor"),
])
def test_bad_input_raises_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_doc_page_is_generated_from_the_table():
    page = (ROOT / DOC_PAGE).read_text()
    assert page == loss_types_markdown(), f"{DOC_PAGE} is stale: run python bench/gen_dpo_table.py"
    for name, t in LOSSES.items():
        row = next(line for line in page.splitlines() if line.startswith(f"| `{name}` |"))
        assert t.formula.replace("|", "\\|") in row and ("| yes |" in row) == (name in REFERENCE_FREE)


def test_doc_page_script_check_fails_on_a_stale_page(tmp_path):
    script = ROOT / "bench" / "gen_dpo_table.py"
    assert subprocess.run([sys.executable, str(script), "--check"], capture_output=True).returncode == 0
    (tmp_path / "bench").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "bench" / script.name).write_text(script.read_text())
    (tmp_path / DOC_PAGE).write_text(loss_types_markdown().replace("relu(1 - b d)", "relu(2 - b d)"))
    stale = subprocess.run([sys.executable, str(tmp_path / "bench" / script.name), "--check"], capture_output=True,
                           text=True)
    assert stale.returncode == 1 and "out of date" in stale.stdout


def test_docstring_table_lists_every_type_from_the_table():
    doc = dpo_loss.__doc__
    assert "{loss_types}" not in doc
    for name, t in LOSSES.items():  # the table's first code span of each formula, never wrapped
        assert f"\n    {name:<16}" in doc and f"``{t.formula.split('`')[1]}``" in doc, name
