"""Every script in examples/ runs on the bundled model and prints what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(script: str) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_examples_folder_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(SCRIPTS)


SCRIPTS = {
    "basic_generate.py": ["'The three primary colors are' -> ", "'A haiku about autumn:\\n' -> "],
    "chat.py": ["assistant:"],
    "migrate_from_nano_vllm.py": ["Prompt: ", "Completion: "],
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_example_runs(script):
    out = run(script)
    for expected in SCRIPTS[script]:
        assert expected in out
    assert "Completion: ''" not in out and " -> ''" not in out  # every completion has text
