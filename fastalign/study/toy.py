"""``fastalign study toy``: the seed study's synthetic experiment (Xu et al. 2024, Section 4, Figure 1) and its
Table 1 counter-example, built from the library's own losses.

The setting: ``n`` prompts and ``n`` responses (the study: 8 and 8). The policy is a small MLP on the one-hot
prompt giving a categorical distribution over the responses; the reward model is an MLP of the same shape giving
one score per response. The optimal response to prompt ``i`` is response ``i``. The preference data hold, for each
prompt ``i``, ``pairs_per_prompt`` pairs ``(i preferred to j)`` with distinct random ``j != i``: every other
(prompt, response) cell is *uncovered* (no pair mentions it).

- DPO: the policy starts at pi_ref and minimizes :func:`fastalign.losses.dpo.dpo_loss` on the pairs.
- PPO: a reward model is fitted to the same pairs with :func:`fastalign.losses.reward.reward_model_loss`; the
  policy starts at pi_ref and samples its own one-step episodes (a prompt, one response, the reward model's score),
  with KL-shaped rewards, a critic and whitened advantages (:func:`fastalign.rl.ppo_advantages`, GAE underneath),
  the clipped :func:`fastalign.losses.ppo.ppo_policy_loss` and :func:`fastalign.losses.ppo.ppo_value_loss`.
- pi_ref (``--ref``): ``sft`` (default) is the policy MLP fitted by cross-entropy to the responses of the pairs
  (chosen and rejected alike): the analogue of Table 1's pi_ref = (0.5, 0.5, 0), all mass on what the data cover
  (here 0.5 on the chosen response, 0.25 on each rejected one); ``init`` is the MLP at its seeded random
  initialization, a near-uniform distribution (cells around 1/8, like the study's figure, whose pi_ref cell is
  0.11); ``uniform`` is exactly uniform.

Everything the study leaves open is an option with a stated default (``fastalign study toy --help``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from fastalign.losses.dpo import dpo_loss
from fastalign.losses.ppo import ppo_policy_loss, ppo_value_loss
from fastalign.losses.reward import reward_model_loss
from fastalign.rl.ppo import ppo_advantages

REFS = ("sft", "init", "uniform")


@dataclass(frozen=True)
class ToyConfig:
    """The toy's settings; each field is the option ``--<field with dashes>``."""

    size: int = 8  # prompts = responses (the study: 8)
    pairs_per_prompt: int = 2  # pairs (i > j) per prompt i, distinct random j != i
    ref: str = "sft"  # pi_ref: sft | init | uniform
    hidden: int = 64  # MLP hidden width
    depth: int = 1  # MLP hidden layers
    beta: float = 0.1  # DPO's beta
    kl_coef: float = 0.1  # PPO's KL coefficient (the same regularization strength as DPO's beta)
    lr: float = 0.01  # Adam learning rate of every network (policy, reward model, critic, SFT)
    dpo_steps: int = 500  # full-batch DPO steps
    rm_steps: int = 500  # full-batch reward-model steps
    sft_steps: int = 200  # full-batch SFT steps (ref=sft only)
    ppo_iters: int = 100  # PPO rollout batches
    ppo_rollouts: int = 64  # sampled responses per prompt per rollout batch
    ppo_epochs: int = 4  # passes over each rollout batch
    ppo_minibatches: int = 1  # minibatches per pass
    clip: float = 0.2  # PPO's ratio clip
    seeds: int = 10  # seeds seed, seed+1, ...
    seed: int = 0  # first seed (its run is the figure's)


def _check(cfg: ToyConfig) -> ToyConfig:
    """``cfg`` if every option is in range, else a ValueError naming the option, the range and the value."""
    def need(ok: bool, name: str, expected: str):
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} must be {expected}; got {getattr(cfg, name)!r}")

    need(cfg.size >= 2, "size", "an integer >= 2")
    need(1 <= cfg.pairs_per_prompt <= cfg.size - 1, "pairs_per_prompt", f"in [1, size - 1] = [1, {cfg.size - 1}]")
    need(cfg.ref in REFS, "ref", f"one of {REFS}")
    for name in ("hidden", "depth", "ppo_rollouts", "ppo_epochs", "ppo_minibatches", "seeds"):
        need(getattr(cfg, name) >= 1, name, "an integer >= 1")
    for name in ("dpo_steps", "rm_steps", "sft_steps", "ppo_iters", "seed"):
        need(getattr(cfg, name) >= 0, name, "an integer >= 0")
    for name in ("beta", "lr"):
        need(math.isfinite(getattr(cfg, name)) and getattr(cfg, name) > 0, name, "a finite number > 0")
    need(math.isfinite(cfg.kl_coef) and cfg.kl_coef >= 0, "kl_coef", "a finite number >= 0")
    need(0 <= cfg.clip < 1, "clip", "in [0, 1)")
    need(cfg.ppo_minibatches <= cfg.size * cfg.ppo_rollouts, "ppo_minibatches",
         f"at most the rollout batch size (size * ppo-rollouts = {cfg.size * cfg.ppo_rollouts})")
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# the setting


def make_pairs(size: int, pairs_per_prompt: int, gen: torch.Generator) -> torch.Tensor:
    """``[size * pairs_per_prompt, 3]`` rows ``(prompt i, chosen i, rejected j)``, distinct random ``j != i``."""
    rows = []
    for i in range(size):
        others = torch.tensor([j for j in range(size) if j != i])
        for j in others[torch.randperm(size - 1, generator=gen)[:pairs_per_prompt]].tolist():
            rows.append((i, i, j))
    return torch.tensor(rows, dtype=torch.long)


def coverage(pairs: torch.Tensor, size: int) -> torch.Tensor:
    """``[size, size]`` bool: cell (prompt, response) appears in some pair, as the chosen or the rejected."""
    covered = torch.zeros(size, size, dtype=torch.bool)
    covered[pairs[:, 0], pairs[:, 1]] = True
    covered[pairs[:, 0], pairs[:, 2]] = True
    return covered


def mlp(size: int, hidden: int, depth: int, out: int) -> torch.nn.Sequential:
    """one-hot prompt ``[size]`` -> ``depth`` ReLU layers of width ``hidden`` -> ``[out]``; PyTorch's default init."""
    layers, width = [], size
    for _ in range(depth):
        layers += [torch.nn.Linear(width, hidden), torch.nn.ReLU()]
        width = hidden
    layers.append(torch.nn.Linear(width, out))
    return torch.nn.Sequential(*layers).double()


def table(net: torch.nn.Module, size: int, logprobs: bool) -> torch.Tensor:
    """``[size, size]``: the net on every one-hot prompt; its log-softmax when ``logprobs`` (a policy)."""
    out = net(torch.eye(size, dtype=torch.float64))
    return F.log_softmax(out, dim=-1) if logprobs else out


def _adam(*nets: torch.nn.Module, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam([p for net in nets for p in net.parameters()], lr=lr)


def _copy(net: torch.nn.Sequential) -> torch.nn.Sequential:
    return copy.deepcopy(net).requires_grad_(True)


def make_ref(cfg: ToyConfig, pairs: torch.Tensor) -> torch.nn.Sequential:
    """pi_ref as ``--ref`` says (the random init, exactly uniform, or SFT on the pairs' responses)."""
    net = mlp(cfg.size, cfg.hidden, cfg.depth, cfg.size)
    if cfg.ref == "uniform":
        with torch.no_grad():
            net[-1].weight.zero_()
            net[-1].bias.zero_()
    elif cfg.ref == "sft":
        prompts = torch.cat([pairs[:, 0], pairs[:, 0]])
        targets = torch.cat([pairs[:, 1], pairs[:, 2]])
        opt = _adam(net, lr=cfg.lr)
        for _ in range(cfg.sft_steps):
            loss = F.nll_loss(table(net, cfg.size, True)[prompts], targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


# ----------------------------------------------------------------------------------------------------------------
# the three trainers


def train_dpo(cfg: ToyConfig, ref: torch.nn.Sequential, pairs: torch.Tensor) -> torch.nn.Sequential:
    """The policy from pi_ref after ``dpo_steps`` full-batch steps of the library's sigmoid DPO loss."""
    policy = _copy(ref)
    x, w, lo = pairs[:, 0], pairs[:, 1], pairs[:, 2]
    ref_lp = table(ref, cfg.size, True)
    opt = _adam(policy, lr=cfg.lr)
    for _ in range(cfg.dpo_steps):
        lp = table(policy, cfg.size, True)
        loss, _ = dpo_loss(lp[x, w], lp[x, lo], ref_lp[x, w], ref_lp[x, lo], beta=cfg.beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return policy


def train_rm(cfg: ToyConfig, pairs: torch.Tensor) -> torch.Tensor:
    """``[size, size]`` learned rewards: an MLP after ``rm_steps`` full-batch steps of the Bradley-Terry loss."""
    rm = mlp(cfg.size, cfg.hidden, cfg.depth, cfg.size)
    x, w, lo = pairs[:, 0], pairs[:, 1], pairs[:, 2]
    opt = _adam(rm, lr=cfg.lr)
    for _ in range(cfg.rm_steps):
        r = table(rm, cfg.size, False)
        loss, _ = reward_model_loss(r[x, w], r[x, lo])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return table(rm, cfg.size, False)


def train_ppo(cfg: ToyConfig, ref: torch.nn.Sequential, rewards: torch.Tensor,
              gen: torch.Generator) -> tuple[torch.nn.Sequential, list[dict]]:
    """The policy from pi_ref after ``ppo_iters`` PPO updates on its own samples, scored by ``rewards``.

    Each rollout batch: every prompt ``ppo_rollouts`` times, one response sampled from the policy (an episode of
    one token), score ``rewards[prompt, response]``; :func:`ppo_advantages` adds the per-token KL penalty
    ``-kl_coef * (log pi - log pi_ref)`` (k1), runs GAE (gamma = lam = 1) against the critic's value of the
    prompt, and whitens; then ``ppo_epochs`` passes of ``ppo_minibatches`` minibatches of the clipped policy loss
    plus the value loss. Returns the policy and per-update stats.
    """
    policy = _copy(ref)
    critic = mlp(cfg.size, cfg.hidden, cfg.depth, 1)
    ref_lp = table(ref, cfg.size, True)
    opt = _adam(policy, critic, lr=cfg.lr)
    prompts = torch.arange(cfg.size).repeat_interleave(cfg.ppo_rollouts)
    B = prompts.numel()
    cu = torch.arange(B + 1)
    history = []
    for _ in range(cfg.ppo_iters):
        with torch.no_grad():
            lp_all = table(policy, cfg.size, True)
            responses = torch.multinomial(lp_all.exp()[prompts], 1, generator=gen)[:, 0]
            old_lp = lp_all[prompts, responses]
            old_values = table(critic, cfg.size, False)[prompts, 0]
            adv, ret, _, stats = ppo_advantages(rewards[prompts, responses], old_lp, ref_lp[prompts, responses],
                                                old_values, cu, kl_coef=cfg.kl_coef, kl_estimator="k1",
                                                gamma=1.0, lam=1.0)
        history.append(stats)
        for _ in range(cfg.ppo_epochs):
            for mb in torch.randperm(B, generator=gen).chunk(cfg.ppo_minibatches):
                mcu = torch.arange(mb.numel() + 1)
                lp = table(policy, cfg.size, True)[prompts[mb], responses[mb]]
                pg_loss, _ = ppo_policy_loss(lp, old_lp[mb], adv[mb].double(), cu_seqlens=mcu, clip_low=cfg.clip)
                values = table(critic, cfg.size, False)[prompts[mb], 0]
                v_loss, _ = ppo_value_loss(values, old_values[mb], ret[mb].double(), cu_seqlens=mcu, clip=None)
                opt.zero_grad()
                (pg_loss + v_loss).backward()
                opt.step()
    return policy, history


# ----------------------------------------------------------------------------------------------------------------
# one seed, the measures, many seeds


def measures(probs: torch.Tensor, covered: torch.Tensor) -> dict:
    """Mass on uncovered responses (mean over prompts of each prompt's total; the largest cell) and the rate of
    picking the optimal response (greedy: argmax is the diagonal; sampled: mean probability of the diagonal)."""
    size = probs.shape[0]
    unc = torch.where(covered, 0.0, probs)
    return {"uncovered_mass": float(unc.sum(1).mean()), "uncovered_max_cell": float(unc.max()),
            "optimal_greedy": float((probs.argmax(1) == torch.arange(size)).double().mean()),
            "optimal_prob": float(probs.diagonal().mean())}


def run_seed(cfg: ToyConfig, seed: int) -> dict:
    """Pairs, pi_ref, pi_DPO, the reward model and pi_PPO for one seed: their tables and measures (on one thread:
    with 8 x 64 matrices more threads only add synchronization, 10x slower on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_seed(cfg, seed)
    finally:
        torch.set_num_threads(threads)


def _run_seed(cfg: ToyConfig, seed: int) -> dict:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        pairs = make_pairs(cfg.size, cfg.pairs_per_prompt, gen)
        covered = coverage(pairs, cfg.size)
        ref = make_ref(cfg, pairs)
        dpo = train_dpo(cfg, ref, pairs)
        rewards = train_rm(cfg, pairs)
        ppo, history = train_ppo(cfg, ref, rewards, gen)
    with torch.no_grad():
        probs = {name: table(net, cfg.size, True).exp() for name, net in (("ref", ref), ("dpo", dpo), ("ppo", ppo))}
    unc = ~covered
    rise = {name: torch.where(unc, probs[name] - probs["ref"], -math.inf) for name in ("dpo", "ppo")}
    flat = int(rise["dpo"].argmax())
    cell = (flat // cfg.size, flat % cfg.size)
    return {
        "seed": seed,
        "pairs": pairs.tolist(),
        "covered": covered.int().tolist(),
        "probs": {k: v.tolist() for k, v in probs.items()},
        "reward": rewards.tolist(),
        "measures": {k: measures(v, covered) for k, v in probs.items()},
        "reward_model_accuracy": float((rewards[pairs[:, 0], pairs[:, 1]] > rewards[pairs[:, 0], pairs[:, 2]])
                                       .double().mean()),
        "dpo_largest_uncovered_rise": {"cell": list(cell), "ref": float(probs["ref"][cell]),
                                       "dpo": float(probs["dpo"][cell]), "ppo": float(probs["ppo"][cell])},
        "ppo_final": {k: float(v) for k, v in history[-1].items()} if history else {},
    }


def _spread(values: list[float]) -> dict:
    t = torch.tensor(values, dtype=torch.float64)
    std = float(t.std()) if len(values) > 1 else 0.0
    return {"mean": float(t.mean()), "std": std, "min": float(t.min()), "max": float(t.max())}


def summarize(runs: list[dict]) -> dict:
    """Mean, standard deviation, min and max over seeds of every measure of every policy."""
    out = {}
    for name in ("ref", "dpo", "ppo"):
        keys = runs[0]["measures"][name]
        out[name] = {k: _spread([r["measures"][name][k] for r in runs]) for k in keys}
    rise = [r["dpo_largest_uncovered_rise"] for r in runs]
    out["dpo_largest_uncovered_rise"] = {k: _spread([x[k] for x in rise]) for k in ("ref", "dpo", "ppo")}
    out["dpo_above_ref_seeds"] = sum(r["measures"]["dpo"]["uncovered_mass"] > r["measures"]["ref"]["uncovered_mass"]
                                     for r in runs)
    out["ppo_below_dpo_seeds"] = sum(r["measures"]["ppo"]["uncovered_mass"] < r["measures"]["dpo"]["uncovered_mass"]
                                     for r in runs)
    out["seeds"] = len(runs)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Table 1's counter-example, solved exactly


def ppo_optimum(gap: float, kl_coef: float) -> list[float]:
    """Table 1's KL-regularized optimum ``pi_ref * exp(r / kl_coef) / Z`` for the reward gap ``r1 - r2``
    (``pi_ref = (0.5, 0.5, 0)``; ``kl_coef = 0`` gives the limit, all mass on the better response)."""
    if kl_coef == 0:
        return [1.0, 0.0, 0.0] if gap > 0 else [0.0, 1.0, 0.0] if gap < 0 else [0.5, 0.5, 0.0]
    x = gap / kl_coef
    p1 = 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
    return [p1, 1.0 - p1, 0.0]


def counter_example(beta: float, kl_coef: float) -> dict:
    """Table 1: one prompt, responses y1 y2 y3, pi_ref = (0.5, 0.5, 0), one pair y1 > y2.

    DPO's loss sees y1 and y2 only: ``L(pi) = -log sigmoid(beta * log((pi1 / 0.5) / (pi2 / 0.5)))
    = log(1 + (pi2 / pi1) ** beta)``, whose infimum 0 is reached by every pi with ``pi2 = 0 < pi1``: the family
    ``(a, 0, 1 - a)``, ``0 < a <= 1``, (0.1, 0, 0.9) among them. The KL-regularized objective that PPO maximizes,
    ``E_pi[r] - kl_coef * KL(pi || pi_ref)``, is ``-inf`` wherever ``pi3 > 0 = pi_ref3``, and its maximizer is
    ``pi* = pi_ref * exp(r / kl_coef) / Z = (sigmoid(d / kl_coef), sigmoid(-d / kl_coef), 0)`` for a reward gap
    ``d = r1 - r2``; the Bradley-Terry fit of one pair drives ``d`` to infinity, so ``pi* -> (1, 0, 0)``.
    The DPO losses here are computed with :func:`dpo_loss` itself at ``pi2 = eps`` for shrinking ``eps`` (beside
    the closed form), and the reward gap by fitting ``(r1, r2)`` with :func:`reward_model_loss` (gradient descent,
    learning rate 1, from 0), whose gap keeps growing (about ``log(steps)``).
    """
    ref = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)

    def dpo_at(pi: list[float]) -> float:
        lp = torch.tensor(pi, dtype=torch.float64).log()
        loss, _ = dpo_loss(lp[:1], lp[1:2], ref[:1].log(), ref[1:2].log(), beta=beta)
        return float(loss)

    def closed_form(pi: list[float]) -> float:
        return math.log1p((pi[1] / pi[0]) ** beta)

    eps = [1e-2, 1e-4, 1e-8, 1e-16, 1e-32]
    candidates = {}
    for a in (0.1, 0.5, 0.9, 1.0):
        rows = [[a - e if a == 1.0 else a, e, 1 - a] for e in eps]
        candidates[f"({a:g}, 0, {1 - a:g})"] = {
            "eps": eps, "dpo_loss": [dpo_at(p) for p in rows], "dpo_loss_closed_form": [closed_form(p) for p in rows],
            "kl_to_ref": "inf" if a < 1.0 else math.log(2.0)}
    # the Bradley-Terry fit of the one pair with the library's loss: plain gradient descent on (r1, r2) from 0
    r = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([r], lr=1.0)
    fit = []
    for step in range(1, 1001):
        loss, _ = reward_model_loss(r[:1], r[1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in (1, 10, 100, 1000):
            fit.append({"steps": step, "reward_gap": float(r[0].detach() - r[1].detach())})
    ppo = [{"reward_gap": d, "pi": ppo_optimum(d, kl_coef)} for d in [0.0, 0.1, 0.5, 1.0, 2.0, 5.0]]
    ppo += [{"reward_gap": f["reward_gap"], "rm_steps": f["steps"], "pi": ppo_optimum(f["reward_gap"], kl_coef)}
            for f in fit]
    return {"pi_ref": ref.tolist(), "pair": "y1 > y2", "beta": beta, "kl_coef": kl_coef,
            "dpo_loss_at_ref": dpo_at([0.5, 0.5, 0.0]),
            "dpo_minimizers": "every (a, 0, 1 - a) with 0 < a <= 1 (loss -> 0 as pi2 -> 0)",
            "dpo_candidates": candidates,
            "ppo_optimum": "(sigmoid(d / kl_coef), sigmoid(-d / kl_coef), 0) for reward gap d = r1 - r2; "
                           "-> (1, 0, 0) as the Bradley-Terry fit drives d to infinity",
            "ppo_optimum_by_gap": ppo, "reward_fit": fit}


# ----------------------------------------------------------------------------------------------------------------
# the figure


def plot(run: dict, counter: dict, path: Path) -> None:
    """Five heatmaps of one seed (coverage, pi_ref, pi_PPO, pi_DPO, learned reward; uncovered cells hatched) and
    Table 1's counter-example as bars (pi_ref, a DPO minimizer, PPO's optimum for the fitted reward)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    covered = torch.tensor(run["covered"], dtype=torch.bool)
    size = covered.shape[0]
    coverage_map = torch.zeros(size, size)
    for i, w, lo in run["pairs"]:
        coverage_map[i, w] = 1.0
        coverage_map[i, lo] = -1.0
    panels = [("data coverage (+ chosen, - rejected)", coverage_map, "coolwarm", (-1, 1)),
              ("pi_ref", torch.tensor(run["probs"]["ref"]), "viridis", (0, 1)),
              ("pi_PPO", torch.tensor(run["probs"]["ppo"]), "viridis", (0, 1)),
              ("pi_DPO", torch.tensor(run["probs"]["dpo"]), "viridis", (0, 1)),
              ("learned reward", torch.tensor(run["reward"]), "magma", None)]
    fig, grid = plt.subplots(2, 3, figsize=(17, 10.5))
    axes = grid.ravel()
    for ax, (title, values, cmap, lim) in zip(axes, panels):
        vmin, vmax = lim if lim else (float(values.min()), float(values.max()))
        im = ax.imshow(values.numpy(), cmap=cmap, vmin=vmin, vmax=vmax)
        for i in range(size):
            for j in range(size):
                if not covered[i, j]:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="white",
                                           linewidth=0, alpha=0.6))
                if title != panels[0][0]:
                    v = float(values[i, j])
                    bright = (v - vmin) / max(vmax - vmin, 1e-12) > 0.6
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if bright else "white")
        ax.set_title(title)
        ax.set_xlabel("response")
        ax.set_ylabel("prompt")
        ax.set_xticks(range(size))
        ax.set_yticks(range(size))
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax = axes[5]
    fit = counter["ppo_optimum_by_gap"][-1]
    bars = [("pi_ref", counter["pi_ref"]), ("a DPO minimizer", [0.1, 0.0, 0.9]),
            (f"PPO optimum (gap {fit['reward_gap']:.1f})", fit["pi"])]
    for k, (label, pi) in enumerate(bars):
        ax.bar([j + (k - 1) * 0.27 for j in range(3)], pi, width=0.27, label=label)
    ax.set_xticks(range(3))
    ax.set_xticklabels(["y1 (chosen)", "y2 (rejected)", "y3 (uncovered)"])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("probability")
    ax.set_title("Table 1: one prompt, one pair y1 > y2")
    ax.legend(fontsize=8)
    m = run["measures"]
    mass = ", ".join(f"{label} {m[k]['uncovered_mass']:.3f}" for k, label in
                     (("ref", "pi_ref"), ("ppo", "pi_PPO"), ("dpo", "pi_DPO")))
    fig.suptitle(f"fastalign study toy, seed {run['seed']}: hatched = uncovered (no pair mentions it)\n"
                 f"mass on uncovered responses (mean over prompts): {mass}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# the command


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastalign study toy",
        description="The seed study's synthetic experiment (Xu et al. 2024, Section 4, Figure 1): does DPO put "
                    "probability on responses the preference data never cover, where PPO does not? Trains pi_DPO "
                    "and (reward model, pi_PPO) from one pi_ref over several seeds and writes <out>/<name>.png "
                    "(the five panels of the first seed, and Table 1) and <out>/<name>.json (every table, the "
                    "measures over seeds, the Table 1 counter-example solved exactly). The defaults take about 20 s "
                    "of CPU time on one thread (their wall time on an idle core; 55 to 92 s were measured on a 2-core "
                    "machine at a load average of 15 to 17).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = {
        "size": "prompts = responses (the study: 8)",
        "pairs_per_prompt": "preference pairs (i > j) per prompt i, with distinct random j != i",
        "ref": "pi_ref: sft = the MLP fitted by cross-entropy to the pairs' responses (Table 1's pi_ref: mass on "
               "covered responses only), init = the MLP at its random init (near-uniform), uniform = exactly uniform",
        "hidden": "MLP hidden width (policy, reward model, critic)",
        "depth": "MLP hidden layers",
        "beta": "DPO's beta",
        "kl_coef": "PPO's KL penalty coefficient (default: the same strength as beta)",
        "lr": "Adam learning rate of every network",
        "dpo_steps": "full-batch DPO steps",
        "rm_steps": "full-batch reward-model steps",
        "sft_steps": "full-batch SFT steps for --ref sft",
        "ppo_iters": "PPO rollout batches",
        "ppo_rollouts": "sampled responses per prompt in each rollout batch",
        "ppo_epochs": "passes over each rollout batch",
        "ppo_minibatches": "minibatches per pass",
        "clip": "PPO's ratio clip",
        "seeds": "how many seeds (seed, seed + 1, ...)",
        "seed": "the first seed; its run is the figure's",
    }
    for f in fields(ToyConfig):
        kind = str if f.type == "str" else float if f.type == "float" else int
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default, help=helps[f.name],
                       **({"choices": REFS} if f.name == "ref" else {}))
    p.add_argument("--out", type=Path, default=Path("bench/results"),
                   help="folder of study_toy.png and study_toy.json")
    p.add_argument("--name", default="study_toy", help="file name stem of the outputs")
    return p


def run(cfg: ToyConfig) -> dict:
    """Every seed, the summary and the counter-example: the JSON's content (without timing and versions)."""
    runs = [run_seed(cfg, cfg.seed + k) for k in range(cfg.seeds)]
    return {"config": asdict(cfg), "summary": summarize(runs),
            "counter_example": counter_example(cfg.beta, cfg.kl_coef), "runs": runs}


def _line(name: str, s: dict) -> str:
    return (f"  {name:7s} uncovered mass {s['uncovered_mass']['mean']:.3f} ± {s['uncovered_mass']['std']:.3f}   "
            f"largest uncovered cell {s['uncovered_max_cell']['mean']:.3f} ± {s['uncovered_max_cell']['std']:.3f}   "
            f"optimal (greedy) {s['optimal_greedy']['mean']:.3f} ± {s['optimal_greedy']['std']:.3f}   "
            f"p(optimal) {s['optimal_prob']['mean']:.3f} ± {s['optimal_prob']['std']:.3f}")


def main(argv=None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = _check(ToyConfig(**{f.name: getattr(args, f.name) for f in fields(ToyConfig)}))
    except ValueError as e:
        print(f"fastalign study toy: error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    result = run(cfg)
    seconds = time.perf_counter() - start
    result = {"command": "fastalign study toy " + " ".join(sys.argv[1:] if argv is None else argv),
              "seconds": seconds, "torch_threads": 1,
              "versions": {"python": platform.python_version(), "torch": torch.__version__},
              "machine": platform.machine(), **result}
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / f"{args.name}.json", args.out / f"{args.name}.png"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result["runs"][0], result["counter_example"], png_path)
    s = result["summary"]
    print(f"fastalign study toy: {cfg.seeds} seeds in {seconds:.1f} s (mean ± std over seeds)")
    for name, label in (("ref", "pi_ref"), ("dpo", "pi_DPO"), ("ppo", "pi_PPO")):
        print(_line(label, s[name]))
    r = s["dpo_largest_uncovered_rise"]
    print(f"  the uncovered cell DPO raises most: pi_ref {r['ref']['mean']:.3f} -> pi_DPO {r['dpo']['mean']:.3f} "
          f"(pi_PPO {r['ppo']['mean']:.3f}); the study: 0.11 -> 0.23")
    print(f"  DPO above pi_ref on uncovered mass in {s['dpo_above_ref_seeds']}/{cfg.seeds} seeds, "
          f"PPO below DPO in {s['ppo_below_dpo_seeds']}/{cfg.seeds}")
    print(f"wrote {json_path} and {png_path}")
    return 0
