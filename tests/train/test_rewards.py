import json
import random
from importlib import resources

import numpy as np
import pytest
import torch

from fastalign.train.config import ConfigError
from fastalign.train.rewards import RewardError, addition_reward, call_reward_fn, load_reward_fn


def _embedded(name):
    text = resources.files("fastalign.assets").joinpath("data", name).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_addition_reward_on_the_embedded_data():
    rows = _embedded("eval.jsonl")  # held-out prompts with their correct completions
    prompts = [r["prompt"] for r in rows]
    assert addition_reward(prompts, [r["completion"] for r in rows]) == [1.0] * len(rows)
    # Off-by-one answers (and padded / surrounded ones) are wrong.
    wrong = [str(int(r["completion"]) + random.choice([-1, 1])) for r in rows]
    assert addition_reward(prompts, wrong) == [0.0] * len(rows)
    assert addition_reward(["26+78="] * 5, [" 104\n", "0104", "104 apples", "", "1 04"]) == [1.0, 0, 0, 0, 0]
    # The preference data: the chosen answer is the sum, the rejected one is not.
    pairs = _embedded("pref_train.jsonl")
    pp = [r["prompt"] for r in pairs]
    assert addition_reward(pp, [r["chosen"] for r in pairs]) == [1.0] * len(pairs)
    assert addition_reward(pp, [r["rejected"] for r in pairs]) == [0.0] * len(pairs)
    # The SFT data holds sloppy demonstrations (forgotten carries): the reward finds exactly those.
    sft = _embedded("sft_train.jsonl")
    got = addition_reward([r["prompt"] for r in sft], [r["completion"] for r in sft])
    right = [float(sum(map(int, r["prompt"][:-1].split("+"))) == int(r["completion"])) for r in sft]
    assert got == right and 0 < sum(right) < len(sft)


def test_addition_reward_partial_credit_per_digit():
    prompts = ["26+78=", "26+78=", "26+78=", "26+78=", " 5 + 4 = ", "50+50="]
    completions = ["105", "903", "14", "abc", "8", "100"]
    got = addition_reward(prompts, completions, partial_credit=0.3)
    want = [0.3 * 2 / 3, 0.3 * 1 / 3, 0.0, 0.0, 0.0, 1.0]
    assert got == pytest.approx(want, rel=1e-15, abs=0)
    assert addition_reward(prompts, completions) == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]  # default: no partial credit


def test_addition_reward_bad_inputs():
    with pytest.raises(ValueError, match="prompt 1 must look like 'a\\+b=' .*got '2\\*3='"):
        addition_reward(["1+2=", "2*3="], ["3", "6"])
    with pytest.raises(ValueError, match="prompt 0 must look like .*got '1\\+2'"):
        addition_reward(["1+2"], ["3"])
    with pytest.raises(ValueError, match="same length; got 2 and 1"):
        addition_reward(["1+2=", "2+3="], ["3"])
    with pytest.raises(ValueError, match="partial_credit must be a number in \\[0, 1\\); got 1.0"):
        addition_reward(["1+2="], ["3"], partial_credit=1.0)
    with pytest.raises(TypeError, match="prompts must be a list of str; got str"):
        addition_reward("1+2=", ["3"])


def test_load_reward_fn_embedded_module_and_file(tmp_path):
    assert load_reward_fn("embedded") is addition_reward
    assert load_reward_fn("fastalign.train.rewards:addition_reward") is addition_reward
    f = tmp_path / "my_reward.py"
    f.write_text("class Scorer:\n    @staticmethod\n    def length(prompts, completions):\n"
                 "        return [float(len(c)) for c in completions]\n\n"
                 "def shout(prompts, completions):\n    return [c.count('!') for c in completions]\n\nLIMIT = 3\n")
    assert load_reward_fn(f"{f}:shout")(["p"], ["a!!"]) == [2]
    assert load_reward_fn(f"{f}:Scorer.length")(["p", "q"], ["ab", ""]) == [2.0, 0.0]


def test_load_reward_fn_errors(tmp_path):
    f = tmp_path / "rf.py"
    f.write_text("LIMIT = 3\ndef score(p, c):\n    return [0.0] * len(c)\n")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom at import')\n")
    cases = [
        ("addition", "must be 'embedded', 'module:function' or 'path/file.py:function'; got 'addition'"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("fastalign.train.rewards:nope", "'fastalign.train.rewards' has no attribute 'nope'; its callables: .*"
                                         "addition_reward"),
        (f"{tmp_path / 'missing.py'}:f", "no such file"),
        (f"{f}:LIMIT", "'LIMIT' is a int, not callable"),
        (f"{f}:scor", "has no attribute 'scor'; its callables: score"),
        (f"{broken}:f", "running .*broken.py' raised RuntimeError: boom at import"),
    ]
    for spec, msg in cases:
        with pytest.raises(ConfigError, match=msg) as info:
            load_reward_fn(spec)
        assert isinstance(info.value, ValueError)
    with pytest.raises(ConfigError, match="must be a string"):
        load_reward_fn(None)


def test_call_reward_fn_accepts_lists_tensors_and_arrays():
    prompts, completions = ["1+2=", "2+2=", "3+3="], ["3", "5", "6"]
    want = torch.tensor([1.0, 0.0, 1.0])
    vals = torch.randn(3, dtype=torch.float64)
    for fn in (addition_reward, lambda p, c: torch.tensor([1, 0, 1]), lambda p, c: np.array([1.0, 0.0, 1.0]),
               lambda p, c: (True, False, True), lambda p, c: [torch.tensor(1.0), np.float32(0), 1]):
        got = call_reward_fn(fn, prompts, completions, "f")
        assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(call_reward_fn(lambda p, c: vals, prompts, completions, "f"), vals.float())


def test_call_reward_fn_errors_name_the_function_and_the_problem():
    prompts, completions = ["1+2=", "2+2=", "3+3="], ["3", "5", "6"]

    def raises(p, c):
        raise KeyError("missing column")

    with pytest.raises(RewardError, match="reward function my_fn raised KeyError: 'missing column'") as info:
        call_reward_fn(raises, prompts, completions, "my_fn")
    assert isinstance(info.value.__cause__, KeyError)
    cases = [
        (lambda p, c: [1.0, 2.0], "one reward per completion: expected 3, got 2"),
        (lambda p, c: torch.ones(3, 1), "must return 3 real numbers; got a tensor of shape \\(3, 1\\)"),
        (lambda p, c: 1.0, "must return a list of 3 numbers; got float"),
        (lambda p, c: "1.0", "must return a list of 3 numbers; got str"),
        (lambda p, c: [1.0, "0.5", 0.0], "returned a str at index 1 \\(prompt '2\\+2='\\)"),
        (lambda p, c: [1.0, None, 0.0], "returned a NoneType at index 1"),
        (lambda p, c: [1.0, 0.0, float("nan")], "non-finite reward nan at index 2 \\(prompt '3\\+3=', "
                                                "completion '6'\\)"),
        (lambda p, c: torch.tensor([1.0, float("-inf"), 0.0]), "non-finite reward -inf at index 1"),
        (lambda p, c: [1e300, 0.0, 0.0], "non-finite reward 1e\\+300 at index 0 .*too large for float32"),
    ]
    for fn, msg in cases:
        with pytest.raises(RewardError, match=msg):
            call_reward_fn(fn, prompts, completions, "my_fn")
    with pytest.raises(ValueError, match="same length; got 3 and 2"):
        call_reward_fn(addition_reward, prompts, completions[:2], "embedded")
