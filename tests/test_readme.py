"""The README's API tour runs as written."""

import re
from pathlib import Path


def test_readme_api_tour_runs(capsys):
    src = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", src, re.S)
    exec(compile(block, "README.md", "exec"), {})
    assert "quantized weights" in capsys.readouterr().out
