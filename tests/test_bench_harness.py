"""The benchmark harness (bench/_harness.py): a failing peer is a result, the record is written, the command parses,
every benchmark module keeps the contract, and docs/benchmarks.md is what the committed JSON gives."""

from __future__ import annotations

import json
import types

import pytest

from bench import _harness, report
from fastalign import cli

FAKE = '''
import os
import time


def make(case, provider, mode, device):
    if provider == "boom":
        raise ValueError("no such thing here")
    if provider == "die":
        def step():
            os._exit(3)
        return step
    return lambda: time.sleep(case["sleep"])
'''


def test_a_failing_or_dying_peer_is_recorded_not_raised(tmp_path, monkeypatch):
    (tmp_path / "fake_bench_module.py").write_text(FAKE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    rows = _harness.compare("fake_bench_module", {"case": "c", "sleep": 0.001}, ["ok", "boom", "die"], ["fwd"],
                            "cpu", rounds=2, reps=2, max_seconds=1)
    by = {r["provider"]: r for r in rows}
    assert by["ok"]["samples"] == 5 and by["ok"]["ms_min"] <= by["ok"]["ms"] <= by["ok"]["ms_max"]
    assert "ValueError: no such thing here" in by["boom"]["error"] and "ms" not in by["boom"]
    assert "worker exited with code 3" in by["die"]["error"]


def test_ratios_to_floor_and_baseline():
    rows = [{"case": "c", "mode": "m", "provider": "floor", "ms": 2.0},
            {"case": "c", "mode": "m", "provider": "naive", "ms": 8.0},
            {"case": "c", "mode": "m", "provider": "ours", "ms": 3.0},
            {"case": "c", "mode": "m", "provider": "broken", "error": "OOM"}]
    _harness.add_ratios(rows, floor={"m": "floor"}, baseline="naive")
    assert rows[2]["vs_floor"] == 1.5 and rows[2]["vs_naive"] == 3.0 / 8.0 and rows[2]["floor"] == "floor"
    assert "vs_floor" not in rows[0] and "vs_floor" not in rows[3]


def test_main_writes_json_markdown_and_records_a_crashing_benchmark(tmp_path, monkeypatch):
    good = types.SimpleNamespace(TITLE="good one", COLUMNS=["case", "provider", "ms", "error"],
                                 run=lambda device, quick, out: [{"case": "c", "provider": "p", "ms": 1.5}],
                                 notes=lambda rows: "a note")

    def crash(device, quick, out):
        raise RuntimeError("kaput")

    modules = {"gae": good, "dpo": types.SimpleNamespace(run=crash)}
    monkeypatch.setattr(_harness, "load", lambda name: modules.get(name))
    monkeypatch.setattr(_harness, "ceilings", lambda device, quick: {
        "matmul": {"shape": "s", "ms": 1.0, "TFLOP/s": 1.0}, "copy": {"bytes": 1, "GB/s": 1.0}})
    assert _harness.main(["gae", "dpo", "ppo", "--device", "cpu", "--out", str(tmp_path), "--no-progress"]) == 0
    record = json.loads((tmp_path / "gae.json").read_text())
    assert record["rows"] == [{"case": "c", "provider": "p", "ms": 1.5}]
    assert record["environment"]["device_type"] == "cpu" and "torch" in record["environment"]
    assert record["notes"] == "a note" and record["columns"] == good.COLUMNS
    assert "| c | p | 1.5 |" in (tmp_path / "gae.md").read_text()
    assert "RuntimeError: kaput" in json.loads((tmp_path / "dpo.json").read_text())["rows"][0]["error"]
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["benchmarks"]["ppo"] == "missing" and set(run["benchmarks"]) == {"gae", "dpo", "ppo"}


def test_the_command_line_parses():
    args = _harness.parser().parse_args(["gae", "logprobs", "--device", "cpu", "--quick", "--out", "x"])
    assert args.benchmarks == ["gae", "logprobs"] and args.quick and str(args.out) == "x"
    with pytest.raises(SystemExit):
        _harness.main(["nonsense", "--device", "cpu"])


def test_fastalign_bench_says_where_bench_lives_when_it_is_absent(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site" / "fastalign" / "cli.py"))
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "not the wheel" in err and "root of a fastalign checkout" in err


@pytest.mark.parametrize("name", [b for b in _harness.BENCHMARKS if _harness.load(b) is not None])
def test_every_benchmark_module_keeps_the_contract(name):
    module = _harness.load(name)
    assert callable(module.run), f"bench/bench_{name}.py must define run(device, quick, out)"
    if hasattr(module, "cases"):
        for quick in (True, False):
            for case in module.cases("cpu", quick):
                assert isinstance(case.get("case"), str), f"bench_{name}.cases: every case needs a 'case' label"
                json.dumps(case)  # it travels to the worker processes as JSON


def test_docs_benchmarks_page_is_generated_from_the_committed_json():
    assert report.PAGE.read_text() == report.render(), "docs/benchmarks.md is stale: run python -m bench.report"
