"""The README's timm example runs as written (the other code blocks are fragments: they need a
GPU or variables of their context)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def timm_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return [b for b in blocks if "effkern.convert(" in b]


def test_readme_timm_example_runs():
    blocks = timm_blocks()
    assert blocks, "README.md lost its effkern.convert example"
    pytest.importorskip("timm", reason="the README's timm example needs timm (and torchvision)")
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md effkern.convert example {i}", "exec"), {})
