"""benchmarks/gpu_scale.py (issue 10's GPU measurements) runs end to end at toy size on CPU, so the script a
lent GPU will run is exercised by CI; its attention check is a real float64 comparison."""
from __future__ import annotations

import re

import pytest

from benchmarks.gpu_scale import main


def test_gpu_scale_script_runs_at_toy_size(capsys):
    main(["--tiny", "--device", "cpu"])
    out = capsys.readouterr().out
    errors = [float(x) for x in re.findall(r"(?:value|tangent) (\d[0-9.e+-]*)", out)]
    assert len(errors) == 4 and max(errors[:2]) < 1e-5 and max(errors[2:]) < 5e-2  # float32, bf16
    assert re.search(r"stage-2 step .* = [0-9.]+x", out) and "TFLOP per step" in out


def test_gpu_scale_script_checks_the_token_grid():
    with pytest.raises(ValueError, match="--tokens 100 must be a multiple"):
        main(["--device", "cpu", "--tokens", "100", "--height", "8", "--width", "8", "--double", "0", "--single", "0"])
