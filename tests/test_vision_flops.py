"""mux.vision_flops (and scripts/vision_flops.py): multiply-adds per image against the ConcatPlexer paper's
Table 3, and the wiring of ``--speed`` on a tiny configuration (the machine's speed is never asserted)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mux
from mux import vision_flops

ROOT = Path(__file__).resolve().parents[1]

ROWS = ["vit_b16", "concatplexer_1", "concatplexer_2", "concatplexer_3", "concatplexer_4",
        "image_multiplexer_n2", "image_multiplexer_n4"]
TABLE3 = {"concatplexer_1": 9.81, "concatplexer_2": 11.26, "concatplexer_3": 13.45, "concatplexer_4": 5.81}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.py


def test_gflops_per_image_match_table_3(tmp_path, capsys):
    path = tmp_path / "f.json"
    result = vision_flops.main(["--json", str(path)])
    written = json.loads(path.read_text())
    assert written == result
    assert sorted(written) == sorted(ROWS)
    assert all(isinstance(v, float) for v in written.values())  # flat: one number per model

    assert written["vit_b16"] == pytest.approx(17.58, rel=0.005)
    for name, paper in TABLE3.items():
        assert written[name] == pytest.approx(paper, rel=0.03), name
    # fewer images per pass through the shared blocks costs more: ConcatPlexer (2) < (3) per image
    assert written["concatplexer_4"] < written["concatplexer_1"] < written["concatplexer_2"] < written["concatplexer_3"]
    # 784 tokens through the whole backbone: N = 2 costs about twice N = 4, both more than ConcatPlexer (1)
    assert written["image_multiplexer_n2"] == pytest.approx(2 * written["image_multiplexer_n4"], rel=0.05)
    assert min(written["image_multiplexer_n2"], written["image_multiplexer_n4"]) > written["concatplexer_1"]
    printed = capsys.readouterr().out
    assert "ConcatPlexer(4) N=4, k=1" in printed and "17.58" in printed


def tiny_base(image_size=224, num_classes=1000):
    # depth 7: ConcatPlexer (3) runs 6 blocks per image; 16 patches: a multiple of N = 2 and 4
    return mux.VisionConfig(num_classes=num_classes, image_size=image_size, patch_size=4, in_chans=3,
                            embed_dim=24, depth=7, num_heads=2)


def test_speed_is_wired_on_a_tiny_configuration(tmp_path, monkeypatch):
    monkeypatch.setattr(vision_flops, "base_config", tiny_base)
    path = tmp_path / "speed.json"
    result = vision_flops.main(["--speed", "--batch", "4", "--trials", "1", "--min-run-time", "0.01",
                                "--image-size", "16", "--num-classes", "10", "--threads", "1", "--json", str(path)])
    assert json.loads(path.read_text()) == result
    assert set(ROWS) <= set(result)
    for i in (1, 2, 3, 4):
        assert result[f"speedup_concatplexer_{i}"] > 0
        assert result[f"flops_ratio_concatplexer_{i}"] == pytest.approx(
            result["vit_b16"] / result[f"concatplexer_{i}"])
        assert result[f"images_per_second_concatplexer_{i}"] > 0
    assert result["images_per_second_vit_b16"] > 0
    assert "speedup_vit_b16" not in result


def test_build_refuses_an_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        vision_flops.build("resnet50", tiny_base(16, 10))


def test_the_script_runs_the_module(tmp_path):
    path = tmp_path / "flops.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "vision_flops.py"), "--json", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ConcatPlexer(3)" in done.stdout and json.loads(path.read_text())["concatplexer_3"] > 0
