"""``fastalign study toy``: the setting's constraints, the regression numbers of one seed (DPO drifts to uncovered
responses, PPO less), Table 1's counter-example against its closed form, and the command end to end."""

import importlib.util
import json
import math

import pytest
import torch

from fastalign.cli import main as cli_main
from fastalign.study import toy


def test_pairs_prefer_the_diagonal_and_cover_few_cells():
    pairs = toy.make_pairs(8, 3, torch.Generator().manual_seed(3))
    assert pairs.shape == (24, 3)
    for i in range(8):
        rows = pairs[pairs[:, 0] == i]
        rejected = rows[:, 2].tolist()
        assert (rows[:, 1] == i).all(), "the chosen response of prompt i must be i (the optimal one)"
        assert len(set(rejected)) == 3 and i not in rejected
    covered = toy.coverage(pairs, 8)
    assert covered.sum(1).tolist() == [4] * 8 and bool(covered.diagonal().all())


@pytest.fixture(scope="module")
def seed0():
    """The default setting's seed 0 (the committed figure's run), a few seconds of CPU."""
    return toy.run_seed(toy.ToyConfig(), 0)


def test_default_seed0_dpo_drifts_and_ppo_drifts_less(seed0):
    m = seed0["measures"]
    for name in ("ref", "dpo", "ppo"):
        probs = torch.tensor(seed0["probs"][name], dtype=torch.float64)
        assert torch.allclose(probs.sum(1), torch.ones(8, dtype=torch.float64))
    assert m["ref"]["uncovered_mass"] < 0.01, "the SFT reference puts (almost) nothing on uncovered responses"
    assert m["dpo"]["uncovered_mass"] > m["ref"]["uncovered_mass"] + 0.3, m
    assert m["ppo"]["uncovered_mass"] < m["dpo"]["uncovered_mass"], m
    assert m["ppo"]["optimal_prob"] > m["dpo"]["optimal_prob"], m
    assert seed0["reward_model_accuracy"] == 1.0
    rise = seed0["dpo_largest_uncovered_rise"]
    assert seed0["covered"][rise["cell"][0]][rise["cell"][1]] == 0 and rise["dpo"] > rise["ref"]


def test_ppo_with_a_strong_kl_penalty_learns_the_optimum_and_stays_on_covered_cells():
    m = toy.run_seed(toy.ToyConfig(kl_coef=1.0), 0)["measures"]["ppo"]
    assert m["uncovered_mass"] < 0.01 and m["optimal_greedy"] == 1.0 and m["optimal_prob"] > 0.95, m


def test_ppo_optimum_is_the_closed_form():
    for gap, kl in ((0.0, 0.1), (0.3, 0.1), (-2.0, 0.5), (7.6, 1.0)):
        p1 = 1 / (1 + math.exp(-gap / kl))
        assert toy.ppo_optimum(gap, kl) == pytest.approx([p1, 1 - p1, 0.0], abs=1e-15)
    assert toy.ppo_optimum(-1e4, 1e-3) == pytest.approx([0.0, 1.0, 0.0])  # no overflow
    assert toy.ppo_optimum(2.0, 0.0) == [1.0, 0.0, 0.0]


def test_counter_example_dpo_minimizers_include_mass_on_the_uncovered_response():
    beta = 0.1
    ce = toy.counter_example(beta, 0.1)
    assert ce["dpo_loss_at_ref"] == pytest.approx(math.log(2.0))
    assert "(0.1, 0, 0.9)" in ce["dpo_candidates"]
    for name, c in ce["dpo_candidates"].items():
        a = float(name.strip("()").split(",")[0])
        expected = [math.log1p((e / (a - e if a == 1.0 else a)) ** beta) for e in c["eps"]]
        assert c["dpo_loss"] == pytest.approx(expected, rel=1e-9), name  # the library's dpo_loss = closed form
        assert all(x > y for x, y in zip(c["dpo_loss"], c["dpo_loss"][1:])) and c["dpo_loss"][-1] < 1e-3, name
        assert c["kl_to_ref"] == ("inf" if a < 1.0 else pytest.approx(math.log(2.0)))
    gaps = [f["reward_gap"] for f in ce["reward_fit"]]
    assert all(x < y for x, y in zip(gaps, gaps[1:])) and gaps[-1] > 5, "the Bradley-Terry gap keeps growing"
    final = ce["ppo_optimum_by_gap"][-1]["pi"]
    assert final[0] > 1 - 1e-12 and final[2] == 0.0


def test_command_end_to_end(tmp_path):
    rc = cli_main(["study", "toy", "--seeds", "2", "--seed", "5", "--dpo-steps", "30", "--rm-steps", "30",
                   "--sft-steps", "30", "--ppo-iters", "4", "--ppo-rollouts", "8", "--out", str(tmp_path),
                   "--name", "t"])
    assert rc == 0
    result = json.loads((tmp_path / "t.json").read_text())
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["seed"] for r in result["runs"]] == [5, 6] and result["config"]["dpo_steps"] == 30
    for name in ("ref", "dpo", "ppo"):
        values = [r["measures"][name]["uncovered_mass"] for r in result["runs"]]
        assert result["summary"][name]["uncovered_mass"]["mean"] == pytest.approx(sum(values) / 2)
    assert set(result["counter_example"]) >= {"dpo_candidates", "ppo_optimum_by_gap", "reward_fit"}


@pytest.mark.parametrize("argv, message", [
    (["--pairs-per-prompt", "8"], "--pairs-per-prompt must be in [1, size - 1] = [1, 7]; got 8"),
    (["--beta", "0"], "--beta must be a finite number > 0; got 0.0"),
    (["--clip", "1.5"], "--clip must be in [0, 1); got 1.5"),
])
def test_bad_options_are_named(capsys, argv, message):
    assert cli_main(["study", "toy", *argv]) == 2
    assert message in capsys.readouterr().err


def test_study_dispatch(capsys):
    assert cli_main(["study"]) == 2
    assert cli_main(["study", "nope"]) == 2
    assert "experiment must be one of ['ablation', 'toy']; got 'nope'" in capsys.readouterr().err
    if importlib.util.find_spec("fastalign.study.ablation") is None:
        assert cli_main(["study", "ablation"]) == 2
        assert "not available" in capsys.readouterr().err
