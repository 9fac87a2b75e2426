"""notebooks/kaggle_train.ipynb: valid nbformat, its launcher choice, and Run All headless (nbclient) on CPU
against a tiny config and a tiny corpus prepared with `python data.py text`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "kaggle_train.ipynb"
# kaggle_t4.py's settings, shrunk to a model and run that take seconds on a CPU.
TINY = ["--n_positions=32", "--n_embd=32", "--n_layer=2", "--n_head=2", "--n_inner=64", "--max_length=32",
        "--batch_size=4", "--gradient_accumulation_steps=2", "--device=cpu", "--dtype=float32", "--compile=False",
        "--warmup_steps=2", "--max_steps=4", "--eval_steps=2", "--save_steps=2", "--log_steps=1",
        "--sample_prompt="]
# `nvidia-smi -L` on Kaggle's "GPU T4 x2"
T4_X2 = ("GPU 0: Tesla T4 (UUID: GPU-2a3c1a8e-0b5e-7d4a-9f3e-1c2b3d4e5f60)\n"
         "GPU 1: Tesla T4 (UUID: GPU-7f6e5d4c-3b2a-1908-7a6b-5c4d3e2f1a0b)\n")


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def tagged(nb, tag):
    (cell,) = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    return cell


def helpers():
    """The namespace of the notebook's helpers cell, run here."""
    namespace = {}
    exec(tagged(read_notebook(), "helpers").source, namespace)
    return namespace


def test_notebook_is_valid_and_never_imports_torch():
    nb = read_notebook()
    nbformat.validate(nb)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "import torch" not in code and "torch.cuda" not in code
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # shipped without outputs


@pytest.mark.parametrize("n_gpus,command", [
    (0, [sys.executable]),
    (1, [sys.executable]),
    (2, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]),
    (4, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]),
])
def test_launcher_is_python_for_one_gpu_and_torchrun_for_more(n_gpus, command):
    assert helpers()["launcher"](n_gpus) == command


def test_gpus_are_counted_from_nvidia_smi_output():
    parse = helpers()["parse_gpu_list"]
    assert parse(T4_X2) == 2
    assert parse(T4_X2.splitlines()[0]) == 1
    assert parse("") == 0
    assert parse("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.") == 0


def test_run_streams_output_and_a_failure_stops_run_all(capsys):
    """A failed step stops Run All in one line under the script's own (IPython shows a NotebookError so), not a
    traceback of the notebook's helper."""
    run = helpers()["run"]
    with pytest.raises(Exception, match="exited with 3") as e:
        run([sys.executable, "-c", "print('first'); import sys; sys.stdout.write('bar 1\\rbar 2\\n'); sys.exit(3)"])
    assert e.value._render_traceback_() == ["error: the command exited with 3: see its output above"]
    assert capsys.readouterr().out.endswith("first\nbar 1\rbar 2\n")  # \r kept: a progress bar redraws in place


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="a kernel's start is read from Linux's /proc")
def test_max_runtime_counts_from_the_sessions_start(tmp_path):
    """config/kaggle_t4.py's max_runtime counts from train.py's start: after a long data preparation, or on Run All
    again later in the session, the run would go past Kaggle's limit. On Kaggle the notebook passes the session's
    start as --max_runtime_from, kept in a file that a new session (a new machine) starts without."""
    h, kept = helpers(), tmp_path / "session-start"
    # A kernel that sat open 2 s before the first call: the session counts from the kernel's start (Linux /proc).
    child = ("import sys, time\ntime.sleep(2)\nnamespace = {}\nexec(sys.stdin.read(), namespace)\n"
             f"print(namespace['session_start']({str(kept)!r}), time.time())")
    launched = time.time()
    p = subprocess.run([sys.executable, "-c", child], input=tagged(read_notebook(), "helpers").source,
                       capture_output=True, text=True, timeout=120)
    start, called = map(float, p.stdout.split())
    assert launched - 1.5 < start < launched + 1 < called - 1, (launched, p.stdout, p.stderr)
    assert float(kept.read_text()) == start
    kept.write_text(repr(start - 3600))  # an hour later, Run All again: the same start
    assert h["session_start"](kept) == start - 3600
    for kernel in (time.time() - 13 * 3600, time.time() + 3600):  # no session's start: the first call's time
        h["process_start"] = lambda: kernel
        kept.unlink()
        called = time.time()
        assert called <= h["session_start"](kept) <= time.time()
    cell = next(c.source for c in read_notebook().cells if "run(launcher(n_gpus)" in c.source)
    assert '*([f"--max_runtime_from={SESSION_START:.0f}"] if SESSION_START else [])' in cell


def test_interrupting_the_notebook_sends_ctrl_c_to_the_command_and_waits(capsys, tmp_path):
    # Jupyter's interrupt button is a KeyboardInterrupt in the kernel; here an alarm raises it mid-command.
    run, ready = helpers()["run"], tmp_path / "ready"
    child = ("import signal, sys, time\n"
             "def stop(*_):\n    print('child: saving a checkpoint', flush=True); sys.exit(130)\n"
             "signal.signal(signal.SIGINT, stop); print('child: training', flush=True)\n"
             f"open({str(ready)!r}, 'w').close(); time.sleep(60)")

    run_interrupted(run, [sys.executable, "-c", child], ready, shown=["child: training\n"])
    assert capsys.readouterr().out.endswith("child: training\nchild: saving a checkpoint\n")


def test_an_interrupt_while_output_is_shown_still_reaches_the_command(capsys, monkeypatch, tmp_path):
    # The interrupt lands where the kernel happens to be; with a progress bar that is most often while output
    # is shown. Here it lands in the first write after the command has its handler: it must get Ctrl-C too.
    run, ready = helpers()["run"], tmp_path / "ready"
    child = ("import signal, sys, time\n"
             "def stop(*_):\n    print('child: saving a checkpoint', flush=True); sys.exit(130)\n"
             "signal.signal(signal.SIGINT, stop)\n"
             f"open({str(ready)!r}, 'w').close()\n"
             "for _ in range(200):\n    print('child: step', flush=True); time.sleep(0.05)")

    run_interrupted_in_a_write(run, [sys.executable, "-c", child], monkeypatch, lambda text: ready.exists())
    assert capsys.readouterr().out.endswith("\nchild: saving a checkpoint\n")  # (the interrupted write is lost)


def test_an_interrupt_after_the_command_has_ended_still_shows_all_its_output(capsys, monkeypatch, tmp_path):
    # The command's last lines (train.py's "saved ..." and "Resume with") may still be in the pipe when it has
    # ended: an interrupt then must not leave them unshown.
    run, go, ended = helpers()["run"], tmp_path / "go", tmp_path / "ended"
    child = ("import os, sys, time\n"
             "print('child: started', flush=True)\n"
             f"while not os.path.exists({str(go)!r}):\n    time.sleep(0.01)\n"
             "sys.stdout.write('child: line\\n' * 4000); print('child: done', flush=True)\n"  # 48 KB: fits a pipe
             f"open({str(ended)!r} + '.tmp', 'w').write(str(os.getpid())); os.replace({str(ended)!r} + '.tmp', "
             f"{str(ended)!r})")

    def started_then_ended(text):  # the child's first line: let it go on, and wait for its exit
        if not text.startswith("child: started"):  # (not the "$ command" line)
            return False
        go.touch()
        deadline = time.monotonic() + 60
        while not ended.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.waitid(os.P_PID, int(ended.read_text()), os.WEXITED | os.WNOWAIT)  # it has exited (not reaped)
        return True

    run_interrupted_in_a_write(run, [sys.executable, "-c", child], monkeypatch, started_then_ended, after=True)
    out = capsys.readouterr().out
    assert out.endswith("child: line\nchild: done\n") and out.count("child: line\n") == 4000


def test_an_interrupt_after_the_output_has_ended_still_reaches_the_command(tmp_path):
    # A command that has closed its output is waited for; an interrupt then must still reach it.
    run, ready, stopped = helpers()["run"], tmp_path / "ready", tmp_path / "stopped"
    child = ("import os, signal, sys, time\n"
             f"def stop(*_):\n    open({str(stopped)!r}, 'w').close(); sys.exit(130)\n"
             "signal.signal(signal.SIGINT, stop); os.close(1); os.close(2)\n"
             f"open({str(ready)!r}, 'w').close(); time.sleep(10)")

    run_interrupted(run, [sys.executable, "-c", child], ready)
    assert stopped.exists()


class WatchedOutput:
    """sys.stdout as the notebook's run() writes to it: what it has shown so far (`shown`), and check(text, done)
    called before each write (done=False) and after it (done=True). A KeyboardInterrupt raised there is Jupyter's
    interrupt landing in that write."""

    def __init__(self, stream, check=lambda text, done: None):
        self.stream, self.check, self.shown = stream, check, ""

    def write(self, text):
        self.check(text, False)
        written = self.stream.write(text)
        self.shown += text
        self.check(text, True)
        return written

    def flush(self):
        self.stream.flush()


def run_interrupted_in_a_write(run, cmd, monkeypatch, at, after=False):
    """The notebook's run(cmd), interrupted once (a KeyboardInterrupt, as Jupyter's button raises it wherever the
    kernel is) in a write of its output: the first whose text at(text) accepts, before the text is shown or, with
    `after`, once it is."""
    raised = []

    def check(text, done):
        if done == after and not raised and at(text):
            raised.append(text)
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdout", WatchedOutput(sys.stdout, check))
    with pytest.raises(KeyboardInterrupt):
        run(cmd)
    assert raised


def run_interrupted(run, cmd, ready, times=1, shown=()):
    """The notebook's run(cmd), interrupted `times` times as Jupyter's button does (a KeyboardInterrupt in the
    kernel, here raised from an alarm), 0.5 s apart, the first once the `ready` file exists: the command has its
    handlers in place (a loaded machine may take seconds to start it). shown[i]: a text the i-th interrupt waits
    for run() to have shown (one landing in its write would lose it, as run() does)."""
    raised, stdout = [], sys.stdout
    watched = WatchedOutput(stdout)

    def interrupt(*_):
        if len(raised) < len(shown) and shown[len(raised)] not in watched.shown:
            return
        if len(raised) < times and ready.exists() and (not raised or time.monotonic() - raised[-1] >= 0.5):
            raised.append(time.monotonic())
            raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    sys.stdout = watched
    signal.setitimer(signal.ITIMER_REAL, 0.1, 0.1)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(cmd)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        sys.stdout = stdout
    assert len(raised) == times


def test_an_earlier_run_is_taken_over_only_into_an_empty_out_dir(tmp_path):
    take_over = helpers()["take_over"]
    previous = tmp_path / "input" / "earlier-run"
    (previous / "checkpoints").mkdir(parents=True)
    (previous / "checkpoints" / "checkpoint_epoch1_step1000.pt").write_bytes(b"weights")
    (previous / "eval_history.json").write_text("[]")
    out = tmp_path / "working"
    assert take_over(str(previous), out)
    assert (out / "checkpoints" / "checkpoint_epoch1_step1000.pt").read_bytes() == b"weights"
    (out / "checkpoints" / "checkpoint_epoch1_step2000.pt").write_bytes(b"newer")
    assert not take_over(str(previous), out)  # this session's own checkpoints win
    assert not take_over("", tmp_path / "other")
    # Its final_model/ stays behind (an interrupted session must not pass off the old one); the run's checkpoints/
    # named for the run is the run; what is no run's output is one line.
    (previous / "final_model").mkdir()
    (previous / "final_model.zip").write_bytes(b"zip")
    assert take_over(str(previous / "checkpoints"), tmp_path / "again")
    assert (tmp_path / "again" / "checkpoints" / "checkpoint_epoch1_step1000.pt").is_file()
    assert not any((tmp_path / "again").glob("final_model*"))
    error = helpers()["NotebookError"]
    for wrong in (previous / "checkpoints" / "checkpoint_epoch1_step1000.pt", tmp_path / "typo", tmp_path / "input"):
        with pytest.raises(Exception, match=f"RESUME_DIR {wrong} is not an earlier run's output folder") as e:
            take_over(str(wrong), tmp_path / "third")
        assert type(e.value).__name__ == error.__name__ and e.value._render_traceback_() == [f"error: {e.value}"]


def test_find_dir_finds_attached_datasets_breadth_first(tmp_path):
    find_dir = helpers()["find_dir"]
    (tmp_path / "a" / "deep" / "wikitext103").mkdir(parents=True)
    for name in ("meta.json", "train.bin"):
        (tmp_path / "a" / "deep" / "wikitext103" / name).write_text("x")
    (tmp_path / "b" / "wheels").mkdir(parents=True)
    (tmp_path / "b" / "wheels" / "tiktoken-0.9.0-cp311-cp311-manylinux_2_17_x86_64.whl").write_text("x")
    assert find_dir(tmp_path, "meta.json", "train.bin") == tmp_path / "a" / "deep" / "wikitext103"
    assert find_dir(tmp_path, "*.whl") == tmp_path / "b" / "wheels"
    assert find_dir(tmp_path, "*.whl", depth=1) is None
    assert find_dir(tmp_path / "missing", "*.whl") is None


def test_an_earlier_run_is_found_by_its_checkpoints(tmp_path):
    find_earlier_run = helpers()["find_earlier_run"]
    (tmp_path / "pretrained").mkdir()  # a best model alone: a dataset for init_from, not a run to continue
    (tmp_path / "pretrained" / "best_model.pt").write_bytes(b"weights")
    assert find_earlier_run(tmp_path) is None
    # A session stopped before its first rotated save: its emergency checkpoint (or best model) and train.log.
    for name in ("emergency_checkpoint.pt", "train.log"):
        (tmp_path / "input" / "session1" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "input" / "session1" / name).write_text("x")
    assert find_earlier_run(tmp_path) == tmp_path / "input" / "session1"
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "checkpoint_epoch1_step1000.pt").write_text("x")
    assert find_earlier_run(tmp_path) == tmp_path / "run"  # the furthest: step 1000
    # Kaggle keeps earlier sessions' outputs attached: the newest session's output, the furthest, is continued.
    (tmp_path / "input" / "session3" / "checkpoints").mkdir(parents=True)
    (tmp_path / "input" / "session3" / "checkpoints" / "checkpoint_epoch2_step3000.pt").write_text("x")
    assert find_earlier_run(tmp_path) == tmp_path / "input" / "session3"
    (tmp_path / "input" / "session1" / "eval_history.json").write_text('[{"step": 3500}]')  # its evaluations count
    assert find_earlier_run(tmp_path) == tmp_path / "input" / "session1"
    # ...and its train.log: a session stopped before its next save says there where it stopped.
    (tmp_path / "input" / "session3" / "train.log").write_text(
        "2026-11-26T10:00:00 step 3600/9000: loss 3.2, lr 1e-4, 90,000 tok/s\n2026-11-26T10:00:01 interrupted at "
        "step 3601: out/emergency_checkpoint.pt holds the last completed step. Resume with: ...\n")
    assert helpers()["run_progress"](tmp_path / "input" / "session3") == 3601
    assert find_earlier_run(tmp_path) == tmp_path / "input" / "session3"
    (tmp_path / "odd" / "checkpoints").mkdir(parents=True)  # nothing odd stops the search
    (tmp_path / "odd" / "checkpoints" / "checkpoint_epoch1_step\u00b2\u00b3.pt").write_text("x")
    (tmp_path / "odd" / "eval_history.json").write_text('[{"step": null}, {"step": "200"}, 7]')
    assert helpers()["run_progress"](tmp_path / "odd") == 0


def test_run_all_headless_on_cpu(tmp_path):
    corpus = tmp_path / "corpus.txt"
    words = "the river runs past old mills and quiet farms while children play near the bridge".split()
    corpus.write_text("\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(400)))
    wheels = tmp_path / "wheels"  # empty: the offline install path, with everything already installed
    wheels.mkdir()
    out = tmp_path / "out"
    params = dict(PROJECT_DIR=str(REPO), WHEELS_DIR=str(wheels), PREPARE=["text", "--input", str(corpus),
                  "--num_workers", "1"], DATA_DIR=str(tmp_path / "data"), OUT_DIR=str(out), TRAIN_ARGS=TINY,
                  SAMPLE_ARGS=["--max_new_tokens", "5", "--device", "cpu"])  # EVAL_SPLIT: 'test', which text lacks
    nb = read_notebook()
    at = nb.cells.index(tagged(nb, "parameters")) + 1
    # As papermill does: a cell after the parameters cell overrides them.
    nb.cells.insert(at, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items())))
    nb.cells.append(nbformat.v4.new_code_cell('import sys; print("torch imported:", "torch" in sys.modules)'))
    NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    def text(cell):
        return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert text(code[-1]).strip() == "torch imported: False"
    everything = "".join(text(c) for c in code)
    assert f"$ {sys.executable} {REPO / 'train.py'}" in everything  # no GPU here: plain python
    assert "step 4/4" in everything and "wrote " + str(out / "loss_curve.png") in everything
    (train_cell,) = [c for c in code if "launcher(n_gpus) +" in c.source]
    assert any("image/png" in o.get("data", {}) for o in train_cell.outputs)  # live loss curves
    assert any("image/png" in o.get("data", {}) for c in code if '"plot.py"' in c.source for o in c.outputs)
    assert "tokens scored" in everything and "word perplexity" not in everything  # not WikiText
    assert f"{tmp_path / 'data'} has no test split: scoring val instead" in everything
    assert (out / "final_model.zip").is_file() and (out / "final_model" / "config.json").is_file()
    assert len(json.loads((out / "eval_history.json").read_text())) == 2


def test_a_second_interrupt_reaches_the_workers_of_a_launcher(capsys, tmp_path):
    # torchrun's workers get the first Ctrl-C from torchrun; a second one must reach them too (torchrun itself
    # would send them SIGTERM, which train.py takes as a reminder, not as "exit at once").
    run, ready = helpers()["run"], tmp_path / "ready"
    # Each line is one write (stdout may be unbuffered): the second interrupt reaches both at once.
    worker = ("import os, signal, sys, time\n"
              "def stop(*_):\n    os.write(1, b'worker: SIGINT\\n'); sys.exit(130)\n"
              "signal.signal(signal.SIGINT, stop); print('worker: training', flush=True)\n"
              f"open({str(ready)!r}, 'w').close(); time.sleep(60)")
    launcher = ("import os, signal, subprocess, sys\n"
                "signal.signal(signal.SIGINT, lambda *_: os.write(1, b'launcher: SIGINT, not passed on\\n'))\n"
                f"sys.exit(subprocess.call([sys.executable, '-c', {worker!r}]))")

    run_interrupted(run, [sys.executable, "-c", launcher], ready, times=2,
                    shown=["worker: training\n", "launcher: SIGINT, not passed on\n"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "worker: training" in lines and lines.count("worker: SIGINT") == 1, out
    # the first interrupt stopped at the launcher; the worker had it only with the second
    assert lines.index("launcher: SIGINT, not passed on") < lines.index("worker: SIGINT"), out
