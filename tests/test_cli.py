"""cli.py: the one way a script here ends on a user's mistake, a closed pipe, an exception in one line."""

import subprocess
import sys
from pathlib import Path

import cli
from cli import one_line

ROOT = Path(__file__).resolve().parent.parent


def test_fail_prints_one_error_line_and_exits_2():
    p = subprocess.run([sys.executable, "-c", "import cli; cli.fail('no model at out/best_model.pt')"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stdout == "" and p.stderr == "error: no model at out/best_model.pt\n"


def test_quiet_on_closed_pipe_ends_without_a_traceback():
    # `python sample.py ... | head -1`: the reader goes away while the script still writes (10 MB here,
    # far more than a pipe holds, so the writes after the close are certain).
    flood = "import sys\nfor _ in range(100_000):\n    print('x' * 100)\n"
    for quiet in (False, True):
        code = ("import cli; cli.quiet_on_closed_pipe()\n" if quiet else "") + flood
        p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        p.stdout.readline()
        p.stdout.close()
        err = p.stderr.read().decode()
        p.wait()
        assert ("BrokenPipeError" in err) is not quiet, err


def test_one_line_names_the_exception_and_keeps_its_first_line():
    assert one_line(RuntimeError("CUDA error: no kernel image\nmore detail\n")) == "RuntimeError: CUDA error: no kernel image"
    assert one_line(ValueError("  x" * 200), limit=10) == "ValueError: x  x  x  x"
    assert one_line(KeyError()) == "KeyError"


def test_is_number_takes_ints_and_floats_not_bools_or_text():
    assert cli.is_number(3) and cli.is_number(0.5) and cli.is_number(float("nan"))
    assert not any(cli.is_number(v) for v in (True, False, "3", None, [1]))


WRITER = """
import os, sys, time
from cli import outlive_closed_output
with outlive_closed_output():
    print("first", flush=True)
    time.sleep(float(sys.argv[1]))  # the reader goes away meanwhile
    for i in range(10_000):  # ~90 KB a stream, more than a pipe holds: a late close still breaks a write
        print("line", i, flush=True)
        print("err", i, file=sys.stderr, flush=True)
open(sys.argv[2], "w").write("reached the end")
"""


def test_output_outlives_its_reader_and_a_missing_stream(tmp_path):
    """A run's stdout/stderr whose reader is gone (a pipe closed: `| tee` ended by the same Ctrl-C) or that do not
    exist at all (`1>&-`, pythonw) never stop it: it reaches its end, without a traceback."""
    done = tmp_path / "done"
    p = subprocess.Popen([sys.executable, "-c", WRITER, "0.5", str(done)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert p.stdout.readline() == b"first\n"
    p.stdout.close()
    p.stderr.close()
    assert p.wait(timeout=30) == 0 and done.read_text() == "reached the end"
    done.unlink()
    q = subprocess.run(["bash", "-c", f'"{sys.executable}" -c "$0" 0 "{done}" 1>&- 2>&-', WRITER], cwd=ROOT)
    assert q.returncode == 0 and done.read_text() == "reached the end"
