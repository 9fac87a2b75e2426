"""train.py under a real torchrun (gloo on CPU): same result as one process, signals, resume across world sizes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint as ckpt
from test_train import ROOT, TINY, assert_resumed_run_is_bit_identical, final_state, write_bins

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None and not torch.distributed.is_available(),
                                reason="needs torch.distributed")

# Evaluate every step so eval_history.json holds every step's train loss at full precision.
COMMON = [*TINY, "--gradient_accumulation_steps=4", "--eval_steps=1", "--eval_iters=1", "--save_steps=100"]


@pytest.fixture(scope="module")
def bins(tmp_path_factory):
    return write_bins(tmp_path_factory.mktemp("data"), train_tokens=6000)


@pytest.fixture(scope="module")
def one(tmp_path_factory, bins):
    """The reference: 4 steps on one process (tests compare their 2-process runs with it, never write into it)."""
    out = tmp_path_factory.mktemp("one")
    launch(1, out, bins, "--max_steps=4")
    return out


@pytest.fixture(scope="module")
def two(tmp_path_factory, bins):
    """The same 4 steps on 2 processes: (out_dir, its finished process). Tests read it, never write into it."""
    out = tmp_path_factory.mktemp("two")
    return out, launch(2, out, bins, "--max_steps=4")


def launch(nproc, out_dir, bins, *extra, popen=False, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "train.py"), *COMMON, f"--data_dir={bins}", f"--out_dir={out_dir}", *extra]
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "train.py"), *cmd[cmd.index(str(ROOT / "train.py")) + 1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def train_losses(out_dir, key="train_loss"):
    return {r["step"]: r[key] for r in json.loads((out_dir / "eval_history.json").read_text())}


def final_weights(out_dir):
    return final_state(out_dir)["model_state_dict"]


def assert_close_runs(a, b, exact=False):
    la, lb = train_losses(a), train_losses(b)
    assert la.keys() == lb.keys()
    for step in la:
        assert (la[step] == lb[step]) if exact else abs(la[step] - lb[step]) < 1e-5, (step, la[step], lb[step])
    wa, wb = final_weights(a), final_weights(b)
    for k in wa:
        if exact:
            assert torch.equal(wa[k], wb[k]), k
        else:
            torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_two_processes_match_one(one, two):
    two, p = two
    assert "2 processes" in (two / "train.log").read_text()
    assert_close_runs(one, two)
    # eval_iters=1 scores the first batch_size windows of val, however many processes share them.
    val_one, val_two = train_losses(one, "val_loss"), train_losses(two, "val_loss")
    assert all(abs(val_one[s] - val_two[s]) < 1e-5 for s in val_one), (val_one, val_two)
    # Only rank 0 writes: one log, one history, one set of checkpoints.
    assert len(train_losses(two)) == 4
    assert p.stdout.count(f"saved {two / 'checkpoints' / 'checkpoint_epoch1_step4.pt'}") == 1
    assert len(ckpt.list_checkpoints(two / "checkpoints")) == 1


def test_compile_is_decided_on_each_processs_share_of_the_tokens(tmp_path, bins):
    """11 steps of 16 x 32 tokens per epoch, 107 epochs: 603k tokens in all, 301k for each of 2 processes. The
    decision counts a process's share (and, the session being capped at 1 s here so that the test ends, only what
    fits in it: hardware's own tests cover both rules' thresholds)."""
    launch(2, tmp_path, bins, "--compile=auto", "--epochs=107", "--max_runtime=1")
    assert "compile: off (a 301k-token run, ~900 of them within max_runtime: would save" in \
        (tmp_path / "train.log").read_text()


def test_dropout_resumes_exactly_on_as_many_processes(tmp_path, bins):
    """Each rank's own RNG streams are in the checkpoint: with dropout, resumed from step 4 on 2 processes, the run
    ends bit-identical to one of 8 straight steps (from that run's own step-4 checkpoint: a launch fewer)."""
    assert_resumed_run_is_bit_identical(lambda out, b, *a: launch(2, out, b, *a), tmp_path, bins, "--dropout=0.1",
                                        from_straight=True)


@pytest.mark.parametrize("setting, error", [
    ("--gradient_accumulation_steps=3", "error: gradient_accumulation_steps (3) must be divisible by the number of "
                                        "processes (2): use --gradient_accumulation_steps=4"),
    ("--data_dir={tmp}/nowhere", "error: {tmp}/nowhere/train.bin not found: prepare it first"),
    # (found after the processes connect: every process looks for it)
    ("--resume_from_checkpoint={tmp}/nowhere.pt", "error: no checkpoint at {tmp}/nowhere.pt; check the path"),
])
def test_a_bad_setting_is_said_once_not_per_rank(tmp_path, bins, setting, error):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           *COMMON, f"--data_dir={bins}", f"--out_dir={tmp_path / 'out'}", setting.format(tmp=tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0
    assert (p.stdout + p.stderr).count(error.format(tmp=tmp_path)) == 1, p.stdout + p.stderr  # once, not per rank
    assert "resume_from" in setting or not (tmp_path / "out").exists()  # found before any folder is made


def test_an_out_dir_that_cannot_be_created_is_said_once_before_connecting(tmp_path, bins):
    """Under torchrun an out_dir rank 0 can't create (here: under a file) stops the run before the processes
    connect: one line from rank 0, no other rank's lost-peer traceback, nothing written."""
    (tmp_path / "a_file").write_text("x")
    out_dir = tmp_path / "a_file" / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           *COMMON, f"--data_dir={bins}", f"--out_dir={out_dir}"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert out.count(f"error: cannot write in {out_dir}: Not a directory; point out_dir") == 1
    assert "gloo" not in out.lower() and "Connection" not in out  # no rank lost its peer mid-collective


def worker_pids(launcher_pid):
    out = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def killed_output(proc):
    """What a torchrun a test gives up on printed: its workers (sessions of their own) killed, then torchrun."""
    for pid in worker_pids(proc.pid):
        os.kill(pid, signal.SIGKILL)
    proc.kill()
    return proc.communicate(timeout=60)[0]


@pytest.mark.slow
def test_sigterm_to_one_worker_stops_all_and_resume_is_exact(tmp_path, bins, two):
    """Stopped in its third step, the run resumes to the end of `two`'s 4 steps. A step takes 2 s: the time the
    test has to see step 2's record and send the signal, on a machine the suite loads (1 s was tight)."""
    straight, _ = two
    run = tmp_path / "run"
    proc = launch(2, run, bins, "--max_steps=4", popen=True, env={"GPT_TEST_STEP_DELAY": "2"})
    deadline = time.time() + 120
    while not ((run / "eval_history.json").exists() and len(train_losses(run)) >= 2):
        assert time.time() < deadline and proc.poll() is None, killed_output(proc)
        time.sleep(0.05)
    workers = worker_pids(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGTERM)  # one worker only, as a scheduler on one node would
    output, _ = proc.communicate(timeout=60)  # every process exits within a bounded time
    assert proc.returncode != 0
    assert output.count(f"saved {run / 'emergency_checkpoint.pt'}") == 1, output
    emergency = ckpt.load_checkpoint(run / "emergency_checkpoint.pt")
    assert 2 <= emergency["step"] < 4

    # Resumed on as many processes (exact), and, from a copy of the folder, on one (the same to rounding).
    shutil.copytree(run, tmp_path / "one")
    for nproc, folder in ((2, run), (1, tmp_path / "one")):
        launch(nproc, folder, bins, "--max_steps=4", "--resume_from_checkpoint=latest")
        assert_close_runs(straight, folder, exact=nproc == 2)


@pytest.mark.parametrize("ranks", ["all", "1"])
def test_out_of_memory_back_off_is_agreed_by_all_ranks(tmp_path, bins, one, ranks):
    """Out of memory on every rank, or on rank 1 alone (rank 0 then got through the synchronised forward)."""
    two = tmp_path / "two"
    p = launch(2, two, bins, "--max_steps=4", env={"GPT_TEST_OOM_ABOVE_BATCH": "2",
                                                    **({} if ranks == "all" else {"GPT_TEST_OOM_RANK": ranks})})
    # Both ranks halve together (4 -> 2 per rank; accumulation 4 -> 8 in all) and stay in step.
    assert p.stdout.count("out of memory: micro-batch now 2 x 8 accumulation steps") == 1
    state = final_state(two)
    assert (state["batch_size"], state["gradient_accumulation_steps"]) == (2, 8)
    assert_close_runs(one, two)


def test_out_of_memory_in_the_last_backward_on_every_rank_backs_off_together(tmp_path, bins, one):
    """Every rank out of memory in its last micro-batch's backward (the same shapes run out together), where the
    gradient all-reduce runs: all back off together and the result is that of one process."""
    two = tmp_path / "two"
    p = launch(2, two, bins, "--max_steps=4", env={"GPT_TEST_OOM_ABOVE_BATCH": "2", "GPT_TEST_OOM_IN_LAST_BACKWARD": "1"})
    assert p.stdout.count("out of memory: micro-batch now 2 x 8 accumulation steps") == 1, p.stdout + p.stderr
    assert_close_runs(one, two)
