"""scripts/benchmark_throughput.py: the structure of its report and its refusals, never the machine's speed."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("benchmark_throughput", ROOT / "scripts" / "benchmark_throughput.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

TINY = ["--layers", "1", "--hidden-size", "16", "--heads", "2", "--vocab-size", "50", "--seq-len", "8",
        "--n", "1", "2", "3", "--trials", "1", "--warmup", "0", "--min-run-time", "0.01", "--device", "cpu"]


@pytest.mark.parametrize("unit", ["sequences", "instances"])
def test_a_tiny_run_reports_every_model_and_n_against_one_vanilla_model(tmp_path, capsys, unit):
    out = tmp_path / "throughput.json"
    report = bench.main([*TINY, "--model", "rsa", "tmux", "contextual", "--batch", "4", "--batch-unit", unit,
                         "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))  # the file holds what main returned

    rows = {r["name"]: r for r in report["results"]}
    assert list(rows) == ["vanilla"] + [f"{m} N={n}" for m in ("rsa", "tmux", "contextual") for n in (1, 2, 3)]
    assert rows["vanilla"]["vanilla"] and rows["vanilla"]["n"] == 1 and rows["vanilla"]["ratio"] == 1.0
    for name, r in rows.items():
        n = r["n"]
        assert r["instances"] == (4 * n if unit == "sequences" else 4)
        assert r["sequences"] == (4 if unit == "sequences" else -(-4 // n))
        prefix = n if r["model"] == "tmux" else 0  # T-MUX's N index tokens; RSA keeps the length
        assert r["backbone_tokens"] == 8 + prefix
        assert r["ratio"] > 0 and r["instances_per_second"] > 0 and r["spread"] >= 0 and len(r["trials"]) == 1
    for m in ("rsa", "tmux", "contextual"):  # the headline ratios, flat
        assert [report[f"throughput_ratio_{m}_n{n}"] for n in (1, 2, 3)] == [rows[f"{m} N={n}"]["ratio"] for n in (1, 2, 3)]
    assert report["model"] == ["rsa", "tmux", "contextual"]
    assert report["convention"]["batch"] == 4 and report["convention"]["batch_unit"] == unit
    assert report["config"]["n"] == [1, 2, 3] and report["config"]["seq_len"] == 8
    assert report["environment"]["precision"] == "fp32" and report["environment"]["device"] == "cpu"
    assert report["environment"]["torch"] == torch.__version__ and report["environment"]["threads"] >= 1

    printed = capsys.readouterr().out
    assert "batch convention:" in printed and "contextual N=3" in printed and "precision: fp32" in printed


def test_bad_input_exits_with_a_message_naming_it(tmp_path, capsys):
    out = ["--out", str(tmp_path / "x.json")]
    with pytest.raises(SystemExit) as stop:
        bench.main([*TINY, "--n", "0", *out])
    assert stop.value.code == 2
    assert "argument --n: N (instances multiplexed together) must be an integer >= 1, got 0" in capsys.readouterr().err
    cases = [(["--device", "tpu"], "invalid choice: 'tpu'"),
             (["--hidden-size", "10", "--heads", "3"], "--hidden-size (10) must be a multiple of --heads (3)"),
             (["--min-run-time", "0"], "min-run-time must be a number of seconds > 0"),
             (["--out", str(tmp_path / "x.txt")], "--out must name a .json file")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "CUDA is not available"))
    if not bench._cpu_has_native("bf16"):
        cases.append((["--precision", "bf16"], "this CPU has no native bf16"))
    for extra, message in cases:
        with pytest.raises(SystemExit):
            bench.main([*TINY, *out, *extra])
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "x.json").exists()  # nothing was measured
