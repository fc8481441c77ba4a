"""``make gpu-check`` without a GPU: it says what it would do and exits 0 (the GPU run itself is
for a machine that has one)."""

from __future__ import annotations

import pytest
import torch


def test_without_a_gpu_it_says_what_it_would_do_and_exits_0(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: `make gpu-check` runs the real checks")
    from pagedq.bench import gpu_check

    out_file = tmp_path / "gpu-check.txt"
    assert gpu_check.main(["--out", str(out_file)]) == 0
    printed = capsys.readouterr().out
    assert "no CUDA device here" in printed
    for step, what in gpu_check.STEPS.items():
        assert f"{step:7s} {what}" in printed
    assert not out_file.exists()
    with pytest.raises(SystemExit):
        gpu_check.main(["--steps", "nope"])
