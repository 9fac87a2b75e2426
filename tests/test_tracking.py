"""tracking.py: TensorBoard events read back, a resumed run's re-logged steps replace the old ones, a
missing package is one warning and a no-op; W&B offline when wandb is installed."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tracking import TENSORBOARD_DIR, WANDB_ID_FILE, Tracker

ROOT = Path(__file__).resolve().parent.parent


def tensorboard_scalars(folder):
    """{tag: [(step, value)]} as TensorBoard itself reads the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_every_metric_at_its_step(tmp_path):
    pytest.importorskip("tensorboard")
    t = Tracker(tmp_path, tensorboard=True, config={"n_layer": 2, "learning_rate": 5e-4})
    for step in (1, 2, 3):
        t.log(step, {"train/loss": torch.tensor(5.0 - step), "train/lr": np.float32(1e-3 * step),
                     "gpu/memory_gib": None})
    t.log(3, {"val/loss": 4.5, "val/perplexity": 90.0})
    t.close()
    t.close()
    scalars = tensorboard_scalars(tmp_path / TENSORBOARD_DIR)
    assert scalars["train/loss"] == [(1, 4.0), (2, 3.0), (3, 2.0)]
    assert [s for s, _ in scalars["train/lr"]] == [1, 2, 3]
    assert np.allclose([v for _, v in scalars["train/lr"]], [1e-3, 2e-3, 3e-3])
    assert scalars["val/loss"] == [(3, 4.5)] and "gpu/memory_gib" not in scalars


def test_resumed_run_replaces_the_steps_logged_after_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    first = Tracker(tmp_path, tensorboard=True)
    for step in range(1, 6):  # killed after step 5; the last checkpoint was at step 3
        first.log(step, {"train/loss": 10.0 + step})
    first.close()
    resumed = Tracker(tmp_path, tensorboard=True, start_step=3)
    for step in (4, 5, 6):
        resumed.log(step, {"train/loss": 20.0 + step})
    resumed.close()
    assert tensorboard_scalars(tmp_path / TENSORBOARD_DIR)["train/loss"] == [
        (1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0), (5, 25.0), (6, 26.0)]


def test_missing_packages_warn_once_each_and_do_nothing(tmp_path, monkeypatch, capsys):
    # As if neither were installed: importing them fails.
    for name in ("tensorboard", "torch.utils.tensorboard", "wandb"):
        monkeypatch.setitem(sys.modules, name, None)
    t = Tracker(tmp_path / "out", tensorboard=True, wandb_project="gpt2", config={"a": 1})
    t.log(1, {"train/loss": 3.0})
    t.close()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert err[0].startswith("warning: tensorboard=True but the tensorboard package is not installed")
    assert err[1].startswith("warning: wandb_project='gpt2' but the wandb package is not installed")
    assert not (tmp_path / "out").exists()


def test_disabled_tracker_touches_nothing(tmp_path, capsys):
    t = Tracker(tmp_path / "out", tensorboard=True, wandb_project="gpt2", enabled=False)
    t.log(1, {"train/loss": 3.0})
    t.close()
    assert not (tmp_path / "out").exists() and capsys.readouterr().err == ""


def test_wandb_offline_run_is_continued_after_a_resume(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = Tracker(tmp_path, wandb_project="gpt2-test", config={"n_layer": 2})
    assert first.wandb.name == tmp_path.name  # by default the run is named for its folder
    first.log(1, {"train/loss": 3.0})
    first.close()
    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    resumed = Tracker(tmp_path, wandb_project="gpt2-test", start_step=1, wandb_run_name="kaggle-t4")
    assert resumed.wandb.name == "kaggle-t4"  # (on Kaggle every folder is "working")
    resumed.log(2, {"train/loss": 2.5})
    resumed.close()
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() == run_id
    assert len(runs) in (1, 2)  # one folder per session, both under the same run id (same second: one)
    assert all((run / f"run-{run_id}.wandb").stat().st_size > 0 for run in runs)


def test_tensorboard_that_cannot_start_is_a_warning(tmp_path, capsys):
    pytest.importorskip("torch.utils.tensorboard")
    (tmp_path / TENSORBOARD_DIR).write_text("a file where its folder goes")
    t = Tracker(tmp_path, tensorboard=True)
    t.log(1, {"train/loss": 1.0})
    t.close()
    err = capsys.readouterr().err
    assert err.startswith("warning: TensorBoard did not start (FileExistsError") and err.count("\n") == 1


WANDB_NO_KEY_CHILD = """
import sys, time
sys.path.insert(0, sys.argv[2])
from tracking import Tracker
t0 = time.time()
t = Tracker(sys.argv[1], wandb_project="gpt2-test")
print("wandb:", t.wandb, "in %.0f s" % (time.time() - t0), flush=True)
"""


def test_wandb_without_a_key_on_a_terminal_does_not_wait_for_a_login(tmp_path):
    """On a terminal wandb.init would stop at its interactive login menu: the tracker checks for a key first."""
    pytest.importorskip("wandb")
    import pty
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(HOME=str(tmp_path / "home"), WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"))
    proc = subprocess.Popen([sys.executable, "-c", WANDB_NO_KEY_CHILD, str(tmp_path / "out"), str(ROOT)],
                            stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    try:
        proc.wait(timeout=60)  # a login prompt would wait for input until this kills it
    finally:
        proc.kill()
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    text = out.decode(errors="replace")
    assert "warning: W&B not started: no API key" in text and "wandb: None" in text, text


def test_a_bad_wandb_run_id_file_gets_a_new_id(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / WANDB_ID_FILE).write_text("\n")
    t = Tracker(tmp_path, wandb_project="gpt2-test")
    t.close()
    assert f"{tmp_path / WANDB_ID_FILE} does not hold a W&B run id: this run gets a new one" in capsys.readouterr().err
    assert len((tmp_path / WANDB_ID_FILE).read_text().strip()) == 8


def test_wandb_offline_set_by_its_own_command_needs_no_key(tmp_path, monkeypatch, capsys):
    """`wandb offline` writes wandb/settings in the working folder instead of setting WANDB_MODE."""
    pytest.importorskip("wandb")
    for name in [k for k in os.environ if k.startswith("WANDB")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    subprocess.run([sys.executable, "-m", "wandb", "offline"], check=True, capture_output=True, timeout=120)
    t = Tracker(tmp_path / "out", wandb_project="gpt2-test")
    try:
        assert t.wandb is not None, capsys.readouterr().err
    finally:
        t.close()


WANDB_UNREACHABLE_CHILD = """
import sys
sys.path.insert(0, sys.argv[2])
import tracking
tracking.WANDB_INIT_TIMEOUT_S = 2  # (30 s in a run)
t = tracking.Tracker(sys.argv[1], wandb_project="gpt2-test")
print("wandb:", t.wandb, flush=True)
t.close()
print("done: the run's last line", flush=True)
"""


def test_wandb_with_a_key_that_cannot_connect_points_to_offline_mode(tmp_path):
    """A key is set, but W&B cannot be reached (a Kaggle notebook without internet): the hint is offline mode, not
    `wandb login` (which would not help), and wandb prints nothing after the run's last line. The W&B server here
    is a port of 127.0.0.1 that nothing listens on."""
    pytest.importorskip("wandb")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(HOME=str(tmp_path / "home"), WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"),
               WANDB_API_KEY="0123456789abcdef0123456789abcdef01234567", WANDB_BASE_URL=f"http://127.0.0.1:{port}",
               WANDB_X_GRAPHQL_RETRY_MAX="1")  # wandb gives up in 11 s, not 20: the same error, sooner
    p = subprocess.run([sys.executable, "-c", WANDB_UNREACHABLE_CHILD, str(tmp_path / "out"), str(ROOT)],
                       capture_output=True, text=True, env=env, timeout=180)
    assert p.returncode == 0 and "wandb: None\n" in p.stdout, p.stdout + p.stderr
    assert p.stdout.endswith("done: the run's last line\n"), p.stdout + p.stderr
    warning = [line for line in p.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and warning[0].startswith("warning: W&B did not start (CommError: "), p.stderr
    assert warning[0].endswith("no connection to W&B? set WANDB_MODE=offline to log locally (`wandb sync` sends it "
                               "later); training goes on without W&B"), p.stderr
