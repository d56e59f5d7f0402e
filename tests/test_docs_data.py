"""docs/data.md's Python snippets run, in order in one folder (the first makes the model folder and the data
the others use), and print what their `# prints: TEXT` comments say. A snippet that calls
init_process_group runs under torchrun on the ranks its `# ranks: N` line gives (default 2)."""

import os
import re
import subprocess
import sys
from pathlib import Path

from test_readme import check_claims

PAGE = Path(__file__).resolve().parents[1] / "docs" / "data.md"


def test_the_data_page_snippets_run_and_print_what_they_claim(tmp_path):
    snippets = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), flags=re.S | re.M)
    assert len(snippets) >= 2
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for i, code in enumerate(snippets):
        script = tmp_path / f"snippet{i}.py"
        script.write_text(code)
        command = [sys.executable, str(script)]
        if "init_process_group" in code:
            ranks = re.search(r"^# ranks: (\d+)", code, flags=re.M)
            command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node",
                       ranks.group(1) if ranks else "2", str(script)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
        assert done.returncode == 0, f"snippet {i}:\n{code}\n{done.stderr[-3000:]}"
        check_claims(code, done.stdout)
