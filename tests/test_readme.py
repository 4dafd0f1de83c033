"""The README's Python snippets run as written, each on its own, on whatever machine runs the tests
(they pick their device at run time), with UserWarnings turned into errors: a snippet that warns on a
CPU-only machine (a GradScaler that disables itself, say) is not running as the README says."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"^```python\n(.*?)^```$", README.read_text(), re.MULTILINE | re.DOTALL)


def test_the_readme_has_its_snippets():
    assert len(SNIPPETS) >= 2, "the README's ```python blocks were not found"


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs_verbatim(code, tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, "-W", "error::UserWarning", str(script)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{code}\n--- stderr:\n{result.stderr}"
