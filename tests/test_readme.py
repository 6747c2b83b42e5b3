"""The README's commands and Python example stay true."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_two_commands_for_a_fresh_machine():
    bash = "\n".join(_blocks("bash"))
    assert 'pip install "torch==2.14.1" "torchvision==0.29.1" -e . && ember train' in bash
    assert "bash .ci/run" in bash
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci and "torch==2.14.1" in ci


@pytest.mark.slow
def test_python_example_runs(tmp_path):
    example = next(block for block in _blocks("python") if "import ember" in block)
    # the same code on a smaller data set, so the test takes seconds
    small = example.replace("batch_size=32, image_size=64)", "batch_size=32, image_size=64, length=64)")
    small = small.replace("max_epochs=3", "max_epochs=1")
    assert small != example
    script = tmp_path / "example.py"
    script.write_text(small + "\nprint('rows', features.features['features'].shape[0])\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "'accuracy'" in result.stdout and "rows 64" in result.stdout
