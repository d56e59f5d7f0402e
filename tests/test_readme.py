"""Every Python snippet of the README runs, so the README cannot drift from the API, and what its comments
claim about its output holds: `print(...)  # prints: TEXT` must print the line TEXT; `print(a, b)  # the
same loss` must print numbers equal to 4 significant digits.

A snippet that calls init_process_group runs under `torchrun --standalone` on 2 ranks (or the count a
`# ranks: N` line gives); the others run in plain Python. A snippet whose first line is
`# (after "SECTION")` runs after the first snippet of that section of the README (without its closing
destroy_process_group line).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def snippets() -> list[tuple[str, str]]:
    """(section title, code) of every ```python block, in order."""
    found, section = [], ""
    for part in re.split(r"(^```python\n.*?^```)", README.read_text(), flags=re.S | re.M):
        if part.startswith("```python"):
            found.append((section, part[len("```python\n"):-3]))
        else:
            headings = re.findall(r"^#+ (.+)$", part, flags=re.M)
            section = headings[-1] if headings else section
    return found


def _program(index: int) -> str:
    section, code = snippets()[index]
    after = re.match(r'# \(after "([^"]+)"', code)
    if after:
        first = next(c for s, c in snippets() if s.startswith(after.group(1)))
        first = "\n".join(line for line in first.splitlines() if not line.startswith("dist.destroy_process_group"))
        code = first + "\n" + code
    return code


def test_the_readme_has_its_snippets():
    sections = [s for s, _ in snippets()]
    assert len(sections) >= 5 and any(s.startswith("Use it") for s in sections)


@pytest.mark.parametrize("index", range(len(snippets())))
def test_readme_snippet_runs(index, tmp_path):
    code = _program(index)
    script = tmp_path / "snippet.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if "init_process_group" in code:
        ranks = re.search(r"^# ranks: (\d+)", code, flags=re.M)
        torchrun = Path(sys.executable).parent / "torchrun"
        command = [str(torchrun), "--standalone", "--nproc-per-node", ranks.group(1) if ranks else "2", str(script)]
    else:
        command = [sys.executable, str(script)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, f"snippet {index} ({snippets()[index][0]}):\n{code}\n{done.stderr[-3000:]}"
    check_claims(code, done.stdout)


def check_claims(code: str, stdout: str) -> None:
    """What the snippet's comments say its prints show (module docstring)."""
    lines = [line.strip() for line in stdout.splitlines()]
    for claim in re.findall(r"^print\(.*\)\s+# prints: (.+)$", code, flags=re.M):
        assert claim.strip() in lines, f"the snippet claims it prints {claim.strip()!r}; it printed {lines}"
    if re.search(r"^\s*print\(.*\)\s+# the same \w+", code, flags=re.M):
        numbers = [[float(x) for x in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", line)] for line in lines]
        pairs = [ns for ns in numbers if len(ns) >= 2]
        assert pairs, f"the snippet claims two equal numbers; it printed {lines}"
        for ns in pairs:
            assert all(abs(n - ns[0]) <= 1e-4 * max(abs(ns[0]), 1e-6) for n in ns), f"not the same: {ns}"


def test_a_claim_the_output_contradicts_fails():
    check_claims('print(x)  # prints: 1 2\nprint(a, b)  # the same loss', "1 2\n5.556 5.556\n")
    with pytest.raises(AssertionError, match="claims it prints"):
        check_claims("print(x)  # prints: 1 2", "1 3\n")
    with pytest.raises(AssertionError, match="not the same"):
        check_claims("print(a, b)  # the same loss", "5.556 5.341\n")
