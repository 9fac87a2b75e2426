"""cli.fail: the one way a script here ends on a user's mistake."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_fail_prints_one_error_line_and_exits_2():
    p = subprocess.run([sys.executable, "-c", "import cli; cli.fail('no model at out/best_model.pt')"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stdout == "" and p.stderr == "error: no model at out/best_model.pt\n"
