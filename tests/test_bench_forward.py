"""`rmac bench forward`: both forms of the extractor timed on the same query crops, alternating, and
checked to compute the same activations (float rounding apart); the CLI prints and writes the figures."""
from __future__ import annotations

import json


def test_bench_forward_cli(tmp_path, capsys):
    from rmac.workflows.cli import main

    assert main(["bench", "forward", "--queries", "2", "--rounds", "2", "--threads", "1", "--max-size", "256",
                 "--json", str(tmp_path / "f.json")]) == 0
    out = json.loads((tmp_path / "f.json").read_text())
    assert out["queries"] == 2 and out["threads"] == 1
    assert [len(v) for v in out["runs"].values()] == [2, 2]
    assert out["package_s"] > 0 and out["for_inference_s"] > 0
    # the ratio of the medians themselves, which the printed seconds give only to their rounding (half a
    # ms each, on rounds of ~0.02 s at this size); the ratio is rounded to 3 places itself
    ratio, f, p, h = out["ratio_for_inference_over_package"], out["for_inference_s"], out["package_s"], 0.0005
    assert (f - h) / (p + h) - h <= ratio <= (f + h) / (p - h) + h
    assert 0 < out["max_abs_activation_difference"] < 1e-3  # folded, not the same modules; same function
    assert json.loads(capsys.readouterr().out)["queries"] == 2
