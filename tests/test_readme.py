"""Every Python snippet of the README and of every page under docs/ runs, so the documentation cannot drift
from the API, and what its comments claim about its output holds: `print(...)  # prints: TEXT` must print the
line TEXT; `print(a, b)  # the same loss` must print numbers equal to 4 significant digits.

The pages are found by globbing docs/ (a new page needs no edit here). A snippet that calls
init_process_group runs under `torchrun --standalone` on 2 ranks (or the count a `# ranks: N` line gives);
the others run in plain Python. A snippet whose first line is `# (after "SECTION")` runs after the first
snippet of the section whose title starts with SECTION, looked for on its own page first, then on the others
(without its closing destroy_process_group line). A program that several pages show (the README repeats
snippets of the guide) runs once.
"""

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Snippet:
    page: str     # path from the repository root, e.g. "docs/guide.md"
    section: str  # the title of the last heading above it
    code: str


def pages(root: Path = ROOT) -> list[Path]:
    """The README and every Markdown page under docs/, in a fixed order."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def snippets(page: Path, root: Path = ROOT) -> list[Snippet]:
    """Every ```python block of one page, in order, with the section it stands in."""
    found, section = [], ""
    for part in re.split(r"(^```python\n.*?^```)", page.read_text(), flags=re.S | re.M):
        if part.startswith("```python"):
            found.append(Snippet(str(page.relative_to(root)), section, part[len("```python\n"):-3]))
        else:
            headings = re.findall(r"^#+ (.+)$", part, flags=re.M)
            section = headings[-1] if headings else section
    return found


def program(snippet: Snippet, everything: list[Snippet]) -> str:
    """What runs for a snippet: itself, after the snippet its `# (after "SECTION")` line names."""
    after = re.match(r'# \(after "([^"]+)"', snippet.code)
    if not after:
        return snippet.code
    own_page_first = sorted(everything, key=lambda s: s.page != snippet.page)
    first = next((s.code for s in own_page_first if s.section.startswith(after.group(1))), None)
    assert first is not None, f"{snippet.page}: no section starts with {after.group(1)!r}"
    first = "\n".join(line for line in first.splitlines() if not line.startswith("dist.destroy_process_group"))
    return first + "\n" + snippet.code


def programs(root: Path = ROOT) -> dict[str, list[Snippet]]:
    """Each distinct program, with the snippets that are it (where the pages show it)."""
    everything = [s for page in pages(root) for s in snippets(page, root)]
    found: dict[str, list[Snippet]] = {}
    for snippet in everything:
        found.setdefault(program(snippet, everything), []).append(snippet)
    return found


def _where(shown: list[Snippet]) -> str:
    return ", ".join(f"{s.page} ({s.section})" for s in shown)


PROGRAMS = programs()


def test_the_docs_have_their_snippets():
    by_page = {}
    for shown in PROGRAMS.values():
        for s in shown:
            by_page.setdefault(s.page, []).append(s.section)
    assert len(snippets(ROOT / "README.md")) == 3
    assert any(section.startswith("Your first pipeline") for section in by_page["docs/guide.md"])
    assert len(PROGRAMS) >= 8


def test_a_new_page_is_found_and_a_repeated_snippet_runs_once(tmp_path):
    (tmp_path / "docs" / "more").mkdir(parents=True)
    (tmp_path / "README.md").write_text("# A\n```python\nprint(1)  # prints: 1\n```\n")
    (tmp_path / "docs" / "guide.md").write_text(
        "# Start\n```python\nx = 2\n```\n```python\nprint(1)  # prints: 1\n```\n")
    (tmp_path / "docs" / "more" / "new.md").write_text('# Next\n```python\n# (after "Start")\nprint(x)\n```\n')
    found = programs(tmp_path)
    assert sorted(found) == ["print(1)  # prints: 1\n", "x = 2\n", 'x = 2\n# (after "Start")\nprint(x)\n']
    assert [s.page for s in found["print(1)  # prints: 1\n"]] == ["README.md", "docs/guide.md"]


@pytest.mark.parametrize("code", [pytest.param(code, id=shown[0].page + ":" + str(i))
                                  for i, (code, shown) in enumerate(PROGRAMS.items())])
def test_doc_snippet_runs(code, tmp_path):
    where = _where(PROGRAMS[code])
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
    assert done.returncode == 0, f"the snippet of {where}:\n{code}\n{done.stderr[-3000:]}"
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
