"""cli.py: the one way a script here ends on a user's mistake, a closed pipe, an exception in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


FULL_DISK = pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
NO_ROOM_LINE = "error: cannot write the output: No space left on device (a full disk? send it to another one)\n"


@FULL_DISK
@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_output_to_a_full_disk_ends_with_one_line_and_exit_code_1(tmp_path, unbuffered):
    """`python evaluate.py ... > results.txt` on a full disk: every write fails with ENOSPC (/dev/full's). Whether
    the failure comes at a print (unbuffered) or at the flush at exit (buffered), the script says so in one line."""
    env = {**os.environ, "PYTHONUNBUFFERED": unbuffered, "PYTHONPATH": str(ROOT)}
    code = "import cli; cli.tolerant_output()\nprint('perplexity 12.3')\nopen(__import__('sys').argv[1], 'w').write('on')"
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "went_on")], stdout=full, stderr=subprocess.PIPE,
                           text=True, env=env, timeout=60)
        # a real script, whose other exit callbacks flush stdout before cli's last one does (matplotlib's)
        q = subprocess.run([sys.executable, str(ROOT / "plot.py"), str(write_history(tmp_path))], stdout=full,
                           stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    assert (p.returncode, p.stderr) == (1, NO_ROOM_LINE)
    assert (tmp_path / "went_on").exists() is not bool(unbuffered)  # unbuffered: it stops at the print
    assert (q.returncode, q.stderr) == (1, NO_ROOM_LINE)


@FULL_DISK
def test_ctrl_c_with_output_to_a_full_disk_still_ends_as_an_interruption():
    """Ctrl-C when what stdout holds cannot be written: the flush on the way out fails, and the exit is still
    Ctrl-C's (130, "interrupted"), with the full disk said once, not the full disk's exit 1 instead."""
    code = ("import os, signal, time, cli\ncli.ctrl_c_ends_it()\ncli.tolerant_output()\nprint('perplexity 12.3')\n"
            "os.kill(os.getpid(), signal.SIGINT)\ntime.sleep(10)\nprint('never')")
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=full, stderr=subprocess.PIPE, text=True,
                           timeout=60, env={**os.environ, "PYTHONUNBUFFERED": ""})
    assert (p.returncode, p.stderr) == (130, NO_ROOM_LINE + "\ninterrupted\n")


def write_history(folder):
    (folder / "eval_history.json").write_text(json.dumps([
        {"step": s, "epoch": s / 10, "tokens": s * 100, "lr": 1e-3, "train_loss": 5.0, "val_loss": 5.5 - s / 100}
        for s in (10, 20)]))
    return folder


@FULL_DISK
def test_a_training_run_outlives_a_full_disk_under_its_output(tmp_path):
    """`nohup python train.py ... > run.txt` and the disk fills: the run goes on (train.log keeps its lines), with
    one warning on the stream that still works."""
    done = tmp_path / "done"
    code = WRITER.replace("outlive_closed_output()", "outlive_closed_output(when_full='training goes on')")
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-c", code, "0", str(done)], cwd=ROOT, stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=60)
    assert p.returncode == 0 and done.read_text() == "reached the end"
    warning = "warning: cannot write standard output: No space left on device; training goes on\n"
    assert p.stderr.startswith(warning) and p.stderr.count("warning") == 1
    assert p.stderr.count("\n") == 10_001  # every line to stderr still came


def test_a_warning_goes_above_the_progress_bar_not_into_its_line(capsys):
    """cli.say while a tqdm bar is on the terminal: the bar is cleared first and drawn again after, so the
    warning has a line of its own (a plain print would be glued to the end of the bar's line)."""
    from tqdm import tqdm
    with tqdm(total=10, file=sys.stderr, ascii=True) as bar:  # (file= given: tqdm draws it, terminal or not)
        bar.update(3)
        cli.say("warning: a checkpoint was skipped")
    err = capsys.readouterr().err
    line_with_it = [line for line in err.replace("\r", "\n").split("\n") if "checkpoint was skipped" in line]
    assert line_with_it == ["warning: a checkpoint was skipped"], repr(err)
    assert "3/10" in err.split("skipped\n")[1], repr(err)  # the bar, drawn again below it


def _drawn_on_a_terminal(rows, columns, **size):
    """What a tqdm bar of 3 steps draws on a real pseudo-terminal that reports rows x columns."""
    import fcntl
    import pty
    import struct
    import termios
    from tqdm import tqdm
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    try:
        with os.fdopen(os.dup(slave), "w") as terminal:
            with tqdm(total=3, unit="step", file=terminal, mininterval=0, **(size or cli.bar_size(terminal))) as bar:
                for _ in range(3):
                    bar.update(1)
        got = b""
        os.set_blocking(master, False)
        while True:
            try:
                chunk = os.read(master, 65536)
            except BlockingIOError:
                break
            got += chunk
        return got.decode(errors="replace")
    finally:
        os.close(slave)
        os.close(master)


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_a_terminal_that_reports_no_size_still_gets_the_progress_bar():
    """`docker exec -t` and some consoles report 0 x 0: tqdm, told to follow the terminal's size, draws nothing
    there (the whole run without a sign of progress); bar_size gives it a fixed size instead."""
    assert "3/3" not in _drawn_on_a_terminal(0, 0, dynamic_ncols=True)  # what tqdm does by itself
    assert "3/3" in _drawn_on_a_terminal(0, 0)
    assert "3/3" in _drawn_on_a_terminal(24, 80)
    with open(os.devnull, "w") as not_a_terminal:
        assert cli.bar_size(not_a_terminal) == {"dynamic_ncols": True}  # tqdm's own way there


UNREADABLE_CHILD = """
import sys
import checkpoint, data, export_hf, plot
for read, path in ((data.read_bin, sys.argv[1]), (export_hf.load_hf, sys.argv[2]), (export_hf.load_hf, sys.argv[3]),
                   (lambda p: plot.read_records(p, "step"), sys.argv[4]), (checkpoint.load_checkpoint, sys.argv[5])):
    try:
        read(path)
    except Exception as e:
        print(type(e).__name__, e)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="chmod(0) leaves a file readable on Windows")
def test_an_unreadable_file_is_said_to_be_unreadable_not_damaged(tmp_path, without_root):
    """A token bin, an HF folder's config.json or weights, a history, a checkpoint that the user may not read: each
    reader says so (check_readable), not that the file is damaged or not the kind it expects."""
    from export_hf import export_hf
    from model import GPT, GPTConfig
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.bin").write_bytes(bytes(64))
    hf = [export_hf(GPT(GPTConfig(n_positions=8, n_embd=8, n_layer=1, n_head=2)), tmp_path / f"hf{i}") for i in (1, 2)]
    (tmp_path / "eval_history.json").write_text("[]")
    (tmp_path / "best_model.pt").write_bytes(b"PK")
    unreadable = [tmp_path / "data" / "test.bin", hf[0] / "config.json", hf[1] / "model.safetensors",
                  tmp_path / "eval_history.json", tmp_path / "best_model.pt"]
    for path in unreadable:
        path.chmod(0)
    p = subprocess.run([*without_root, sys.executable, "-c", UNREADABLE_CHILD, *map(str, unreadable[:1] + hf + unreadable[3:])],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    errors = ("DataError", "ExportError", "ExportError", "PlotError", "CheckpointError")
    assert p.stdout.splitlines() == [f"{e} cannot read {path}: Permission denied" for e, path in zip(errors, unreadable)], \
        p.stdout + p.stderr


IGNORED_CTRL_C_CHILD = """
import os, signal
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for `python script.py &` in a script
import cli
cli.ctrl_c_ends_it()
cli.run_cleaning_up_on_ctrl_c(lambda: os.kill(os.getpid(), signal.SIGINT))
print("still ignored:", signal.getsignal(signal.SIGINT) is signal.SIG_IGN)
"""


def test_a_ctrl_c_ignored_from_the_start_stays_ignored():
    """A script started with `&` from a non-interactive shell has Ctrl-C ignored (so does train.py's run): the
    handlers of the scripts that end on Ctrl-C leave it so."""
    p = subprocess.run([sys.executable, "-c", IGNORED_CTRL_C_CHILD], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert (p.returncode, p.stdout, p.stderr) == (0, "still ignored: True\n", "")
