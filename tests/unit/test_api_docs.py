"""docs/api.md's examples run: every ```python block, each in a fresh namespace, so the page
cannot drift from the API it documents."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[2] / "docs" / "api.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def blocks() -> list[tuple[int, str]]:
    text = PAGE.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in BLOCK.finditer(text)]


def test_every_section_has_an_example():
    assert len(blocks()) >= 5  # tracker, NAT, tunnel ends, simulator, judge


@pytest.mark.parametrize("line,code", blocks(), ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_example_runs(line, code):
    # compiled under the page's name and line, so a failure points into docs/api.md
    exec(compile("\n" * (line - 1) + code, str(PAGE), "exec"), {"__name__": f"api_md_line{line}"})
