"""train.py as a user runs it: on tiny bins, real signals, real kill -9; most runs through train.main in the test's
own process (run_train), the ones a process matters to as real subprocesses."""

import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint as ckpt
import hardware
import train
from conftest import in_process
from data import EOT_TOKEN, TokenBins, get_tokenizer
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent

TINY = ["--n_positions=32", "--n_embd=32", "--n_layer=2", "--n_head=2", "--n_inner=64", "--max_length=32",
        "--batch_size=4", "--gradient_accumulation_steps=2", "--device=cpu", "--dtype=float32", "--compile=False",
        "--sample_prompt=", "--warmup_steps=2", "--learning_rate=3e-3", "--min_lr=3e-4", "--log_steps=1",
        "--eval_iters=2", "--export_final_model=False", "--plot=False"]


def write_bins(folder, train_tokens=3000, val_tokens=600):
    """Token bins from real text, as data.py lays them out."""
    enc = get_tokenizer()
    words = "the cat sat on a mat while dogs ran over green hills and birds sang in tall trees".split()
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16", "tokens": {}}
    for split, n in (("train", train_tokens), ("val", val_tokens)):
        ids = []
        while len(ids) < n:
            ids += enc.encode_ordinary(" ".join(rng.choice(words, 40))) + [EOT_TOKEN]
        np.asarray(ids[:n], dtype=np.uint16).tofile(folder / f"{split}.bin")
        meta["tokens"][split] = n
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def bins(tmp_path_factory):
    return write_bins(tmp_path_factory.mktemp("data"))


def train_cmd(out_dir, bins, *extra):
    return [sys.executable, str(ROOT / "train.py"), *TINY, f"--data_dir={bins}", f"--out_dir={out_dir}", *extra]


# Test hooks that train.py reads as a run sets up (Trainer): an in-process run takes them from this process's
# environment, set for its duration (in_process). The others (a SIGTERM the run sends itself, a thread count, ...) get a process.
IN_PROCESS_HOOKS = {"GPT_TEST_NAN_AT_STEPS", "GPT_TEST_OOM_ABOVE_BATCH", "GPT_TEST_OOM_IN_LAST_BACKWARD",
                    "GPT_TEST_ERROR_AT_EVAL_STEP", "GPT_TEST_ERROR_AFTER_STEP", "GPT_TEST_FAIL_HISTORY_WRITES"}


def run_train(out_dir, bins, *extra, env=None, check=True, process=False):
    """`python train.py` with TINY's settings and `extra`: a CompletedProcess (exit code, stdout, stderr). A real
    process where the test asks for one (process: what a process start decides, as max_runtime's clock, or its
    exit), compiles (torch.compile's state is a process's), or sets environment variables other than
    IN_PROCESS_HOOKS; otherwise train.main in this process (conftest's in_process: a tiny run takes about a second
    there, and four more as a process)."""
    cmd, env = train_cmd(out_dir, bins, *extra), env or {}
    if process or "--compile=True" in extra or not set(env) <= IN_PROCESS_HOOKS:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, **env})
    else:
        code, out, err, _ = in_process(train.main, cmd[2:], ROOT, env)
        p = subprocess.CompletedProcess(cmd, code or 0, out, err)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture
def refused(main_in_process):
    """refused(cmd) -> stderr of a train.py command (a train_cmd list) that must stop before training with exit
    code 2, run through train.main in this process: a refusal needs no Python and torch start of its own (and a
    warning fails the test: main_in_process)."""
    def run(cmd):
        code, out, err = main_in_process(train.main, cmd[2:], ROOT)
        assert code == 2, f"exit {code}\n{out}\n{err}"
        return err
    return run


def final_state(out_dir):
    """The newest rotated checkpoint of a run in out_dir."""
    return ckpt.load_checkpoint(ckpt.list_checkpoints(out_dir / "checkpoints")[-1])


def weights(path):
    return ckpt.load_checkpoint(path)["model_state_dict"]


def assert_same_weights(a, b, context=""):
    assert a.keys() == b.keys()
    differ = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not differ, f"weights differ (largest difference per tensor): {differ}\n{context}"


def step_losses(out_dir):
    """{step: loss text} from the plain log lines of train.log."""
    losses = {}
    for line in (out_dir / "train.log").read_text().splitlines():
        if " loss " in line and "/" in line and line.split()[1] == "step":
            step = int(line.split()[2].split("/")[0])
            losses[step] = line.split("loss ")[1].split(",")[0]
    return losses


def test_help_lists_every_setting():
    p = subprocess.run([sys.executable, "train.py", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0
    for name in ("batch_size=8", "gradient_accumulation_steps=8", "learning_rate=0.0005", "max_checkpoints=4",
                 "resume_from_checkpoint='auto'", "max_runtime=''"):
        assert f"--{name}" in p.stdout
    assert "keep only the newest N rotated checkpoints" in p.stdout
    settings = [line[2:] for line in p.stdout.splitlines() if line.startswith("  --")]
    assert len(settings) == len(dataclasses.fields(train.TrainConfig))
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<summary>all settings</summary>\n\n```\n")[1].split("\n```")[0]
    assert block.splitlines() == settings  # README's list of settings is --help's, line for line


@pytest.mark.parametrize("args, message", [
    (["--learnig_rate=1e-3"], "unknown setting 'learnig_rate' (did you mean 'learning_rate'?)"),
    (["--batch_size=big"], "batch_size must be int, got 'big'"),
    (["--batch_size"], "'--batch_size' needs a value"),
    (["config/nope.py"], "config file 'config/nope.py' not found"),
    (["max_steps=5"], "'max_steps=5' is no config file; a setting is given as --max_steps=5"),
    (["lr=3e-4"], "config file 'lr=3e-4' not found"),  # no setting of that name: no --lr hint
    (["--bias=true"], "bias must be bool (written True or False), got 'true'"),
    (["--sample_tokens=-5"], "sample_tokens must not be negative, got -5"),
    (["--n_embd=30", "--n_head=4"], "must be divisible by n_head"),
    (["--max_runtime=soon"], "max_runtime 'soon' is not a duration"),
    (["--data_dir=/nonexistent/bins"], "python data.py wikitext103"),
    (["--device=cuda"], "device='cuda' but no CUDA GPU is visible"),
    (["--dtype=fp64"], "unknown dtype 'fp64': use auto, float32, bfloat16 or float16"),
    (["--dtype=float16"], "float16"),
    (["--max_grad_norm=-1"], "max_grad_norm must not be negative, got -1.0"),
    (["--epochs=0"], "epochs must be at least 1 (or set max_steps), got 0"),
    (["--n_positions=1000000000000000", "--max_length=32"], "the model's weights (~1,024,000,000.1 GB in fp32) do not"),
])
def test_bad_settings_get_one_line(args, message, tmp_path, bins, refused):
    out = tmp_path / "runs" / "run"
    cmd = [sys.executable, "train.py", "--device=cpu", f"--out_dir={out}", f"--data_dir={bins}", *args]
    # A real process, as a user runs it, for one mistake in the settings and one found in set-up (the model's
    # allocation, whose failure must not take the test's process with it); the rest in this process.
    if args in (["--learnig_rate=1e-3"], ["--n_positions=1000000000000000", "--max_length=32"]):
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert p.returncode == 2
        err = p.stderr
    else:
        err = refused(cmd)
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    # Settings, and that the bins are there, are checked before the run makes its folders; what needs the device
    # is found after, and the folders it made (runs/ too) go again.
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("overrides, message", [
    (dict(seed=-1), "seed must be in [0, 2**32), got -1"),
    (dict(beta1=1.0), "beta1 must be in [0, 1), got 1.0 (AdamW's defaults: 0.9, 0.95)"),
    (dict(beta2=-0.5), "beta2 must be in [0, 1), got -0.5"),
    (dict(max_length=0), "max_length must be at least 1, got 0"),
    (dict(max_nonfinite=0), "max_nonfinite must be at least 1, got 0"),
    (dict(max_runtime_from=time.time() + 3600), "max_runtime_from must be a Unix time not in the future (`date +%s`"),
    (dict(learning_rate=5e-4, min_lr=1e-3), "min_lr (0.001) is above learning_rate (0.0005), where the decay would"),
    (dict(out_dir=" "), "out_dir is empty; name a folder (out_dir='.' for the current one)"),
    (dict(out_dir="run", checkpoint_dir="run/final_model/ck"), "checkpoint_dir run/final_model/ck lies in "),
    # (found at the start, not by the export after the whole run)
    (dict(bias=False), "bias=False cannot be exported to final_model/ (HF GPT-2 has biases in every Linear and "
                       "LayerNorm): add --export_final_model=False, or train with bias=True"),
])
def test_settings_no_run_can_use_are_refused_before_it_starts(overrides, message):
    with pytest.raises(train.ConfigError) as e:
        train.validate(train.TrainConfig(**overrides))
    assert str(e.value).startswith(message)
    train.validate(train.TrainConfig(learning_rate=0.0))  # a frozen run: min_lr has nothing to be above


def test_every_shipped_config_loads_and_readme_gives_its_model_size():
    """Each config/*.py is read and checked as a run would (no run could start from a broken one), and the model
    sizes README's table of configs states are the models' own."""
    readme = (ROOT / "README.md").read_text()
    stated = dict(re.findall(r"\| `(config/\w+\.py)` \|[^|\n]*?([\d.]+M parameters \([\d.]+M without embeddings\))",
                             readme))
    assert set(stated) == {"config/small_5m.py", "config/large_20m.py"}  # (the pattern still reads the table)
    for path in sorted((ROOT / "config").glob("*.py")):
        cfg, _ = train.load_config([str(path)])
        train.validate(cfg)
        name = f"config/{path.name}"
        assert name in readme, f"{name} is not in README's table of configs"
        if name in stated:
            model = GPT(train.model_config(cfg))
            total, body = model.num_params() / 1e6, model.num_params(non_embedding=True) / 1e6
            assert stated[name] == f"{total:.1f}M parameters ({body:.1f}M without embeddings)", name


def test_config_files_that_set_nothing_or_name_no_setting_are_refused(tmp_path):
    config = tmp_path / "mine.py"
    for text, message in (  # YAML's `name: value` is a Python annotation and JSON a dict: both run, setting nothing
            ("max_steps = 2\nlearning_rate: 3e-4\n", "line 2 sets nothing (YAML or JSON?); write plain Python: name ="),
            ('{"learning_rate": 3e-4}\n', "line 1 sets nothing (YAML or JSON?)"),
            ("total = 64\nbatch_size = total // 8\n", "unknown setting 'total'; a name of the file's own, not a "
                                                         "setting, starts with _ (as _total)")):
        config.write_text(text)
        with pytest.raises(train.ConfigError) as e:
            train.load_config([str(config)])
        assert str(e.value).startswith(f"config file '{config}'") and message in str(e.value)
    config.write_text("_total = 64\nbatch_size = _total // 8\n")
    assert train.load_config([str(config)])[0].batch_size == 8
    config.write_text("out_dir: str\nif True:\n    out_dir = 'mine'\n")  # an annotation of a name it sets: fine
    assert train.load_config([str(config)])[0].out_dir == "mine"
    for arg, message in (("--learning_rate=1e999", "learning_rate must be a finite number, got inf"),
                         ("--config=mine.py", "unknown setting 'config' (a config file is named without a flag")):
        with pytest.raises(train.ConfigError, match=re.escape(message)):
            train.load_config([arg])


def test_a_home_folder_in_a_path_setting_is_expanded():
    cfg, _ = train.load_config(["--out_dir=~/runs/a", "--data_dir=~/data", "--checkpoint_dir=/ckpt/~x"])
    assert (cfg.out_dir, cfg.data_dir) == (os.path.expanduser("~/runs/a"), os.path.expanduser("~/data"))
    assert cfg.checkpoint_dir == "/ckpt/~x"


def test_a_broken_config_file_or_an_unwritable_out_dir_gets_one_line(tmp_path, bins, refused):
    for text, message in (("learning_rate = 1e-3 +\n", "line 1: SyntaxError: invalid syntax"),
                          ("n_layer = 2\nlearning_rate = lr\n", "line 2: NameError: name 'lr' is not defined")):
        config = tmp_path / "my_config.py"
        config.write_text(text)
        p = subprocess.run([sys.executable, "train.py", str(config), f"--out_dir={tmp_path / 'out'}"],
                           capture_output=True, text=True, cwd=ROOT)
        assert p.returncode == 2 and p.stderr == f"error: config file '{config}' {message}; fix the file (it is " \
                                                 f"plain Python: name = value lines)\n"
    config.write_text("max_steps = 3\nexit()\n")  # ended train.py silently, with exit code 0
    cmd = train_cmd(tmp_path / "out", bins)
    assert refused([*cmd[:2], str(config), *cmd[2:]]) == f"error: config file '{config}' line 2: it calls exit(); fix " \
                                                        f"the file (it is plain Python: name = value lines)\n"
    # A folder, or a checkpoint (`python train.py out/best_model.pt`: runpy took it for a zipped app).
    assert refused([*cmd[:2], str(tmp_path), *cmd[2:]]) == f"error: config file '{tmp_path}' is a folder: give a .py " \
                                                           f"file (the shipped ones are in config/)\n"
    checkpoint = tmp_path / "best_model.pt"
    torch.save({"step": 1}, checkpoint)
    assert refused([*cmd[:2], str(checkpoint), *cmd[2:]]) == f"error: '{checkpoint}' is no config file but a " \
        f"checkpoint (or a zip): resume its run with --resume_from_checkpoint={checkpoint}, or start a new one from " \
        f"its weights with --init_from={checkpoint}\n"
    (tmp_path / "a_file").write_text("")
    err = refused(train_cmd(tmp_path / "a_file" / "run", bins))  # no folder can be made under a file
    assert err == f"error: cannot write in {tmp_path / 'a_file' / 'run'}: Not a directory; " \
        "point out_dir (and checkpoint_dir) at a writable folder (on Kaggle: under /kaggle/working)\n"
    err = refused(train_cmd(tmp_path / ("a" * 300) / "run", bins))  # a name longer than the filesystem allows
    assert err.startswith(f"error: cannot write in {tmp_path / ('a' * 300) / 'run'}: File name too long; ")
    if Path("/sys/kernel").is_dir():  # Linux
        # A folder that exists but takes no files (sysfs; a Kaggle input is read-only the same way), refused at the
        # start: else every save of the run would fail.
        err = refused(train_cmd(tmp_path / "run", bins, "--checkpoint_dir=/sys"))
        assert err.startswith("error: cannot write in /sys: "), err
        assert err.endswith("(to resume from checkpoints in a read-only folder, name one with "
                            "--resume_from_checkpoint=PATH)\n") and len(err.splitlines()) == 1


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_under_train_log_does_not_stop_the_run(tmp_path, bins):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.log").symlink_to("/dev/full")  # every write to it fails with ENOSPC, as on a full disk
    p = run_train(out, bins, "--max_steps=4", "--save_steps=2", "--eval_steps=2")
    assert p.stderr.count("warning: could not write") == 1 and "No space left on device" in p.stderr
    assert "done: 4 steps, best val loss" in p.stdout  # also without final_model/ (export_final_model=False)
    assert [ckpt.load_checkpoint(c)["step"] for c in ckpt.list_checkpoints(out / "checkpoints")] == [2, 4]


def test_train_log_deleted_under_the_run_starts_again(tmp_path, capsys):
    """out_dir deleted mid-run: the next saves make their folders again, and so does train.log, with the lines
    from then on (writing on into the deleted file would lose them all)."""
    (tmp_path / "out").mkdir()
    log = train.Logger(tmp_path / "out" / "train.log", True)
    log("step 1")
    shutil.rmtree(tmp_path / "out")
    log("step 2")
    log("step 3")
    log.close()
    assert [line.split(" ", 1)[1] for line in (tmp_path / "out" / "train.log").read_text().splitlines()] == [
        "step 2", "step 3"]
    assert capsys.readouterr().err == ""


def test_train_log_takes_undecodable_text(tmp_path, capsys):
    """A path or prompt with bytes the locale could not decode (surrogate escapes) is written escaped, not raised."""
    log = train.Logger(tmp_path / "train.log", True)
    log("out_dir=/data/caf" + b"\xe9".decode("utf-8", "surrogateescape"))
    assert (tmp_path / "train.log").read_text().endswith(" out_dir=/data/caf\\udce9\n")


def test_a_run_whose_last_checkpoint_fails_does_not_end_as_a_success(tmp_path, bins):
    out = tmp_path / "out"
    # the step-4 saves fail: the rotated one, the best model, and the emergency checkpoint tried in its place
    for blocked in ("checkpoints/checkpoint_epoch1_step4.pt", "best_model.pt", "emergency_checkpoint.pt"):
        (out / blocked / "in the way").mkdir(parents=True)
    # (learning_rate 0: every evaluation scores the same, so only a failed save makes step 4's a new best)
    p = run_train(out, bins, "--max_steps=4", "--save_steps=2", "--eval_steps=2", "--learning_rate=0", check=False)
    assert p.returncode == 1, p.stderr
    assert p.stdout.count(f"could not save {out / 'best_model.pt'}") == 2  # a best not on disk is no best
    assert re.search(r"done: 4 steps, last val loss \d+\.\d{4}, no best_model.pt saved in", p.stdout), p.stdout
    newest = out / "checkpoints" / "checkpoint_epoch1_step2.pt"
    assert p.stdout.splitlines()[-1] == (
        f"error: the last checkpoint (step 4) could not be saved (see the warning above); the newest on disk is "
        f"{newest} (step 2), a resume repeats the steps after it. Fix what the warnings say (free disk space, a "
        f"folder that can be written) and run the same command again to redo those steps")
    # Where the rotated save fails at the end, the emergency checkpoint in out_dir holds the last step: a success.
    again = tmp_path / "again"
    (again / "checkpoints/checkpoint_epoch1_step4.pt" / "in the way").mkdir(parents=True)
    long_prompt = "one two three " * 20  # 61 tokens, past the 32-token context: said once, not at each evaluation
    p = run_train(again, bins, "--max_steps=4", "--save_steps=2", "--eval_steps=2", "--learning_rate=0",
                  f"--sample_prompt={long_prompt}", check=False)
    assert p.returncode == 0 and "warning: could not save" in p.stdout
    assert p.stdout.count("note: the prompt is 61 tokens") == 1 and p.stdout.count("sample: ") == 2
    assert f"saved {again / 'emergency_checkpoint.pt'}" in p.stdout
    assert ckpt.load_checkpoint(again / "emergency_checkpoint.pt")["step"] == 4
    assert ckpt.load_checkpoint(again / "best_model.pt")["step"] == 2  # step 4's equal loss is no better


def run_train_on_a_terminal(out_dir, bins, *extra):
    """run_train with stderr, where tqdm draws its bar, on a pseudo-terminal: (process, what the terminal got)."""
    import fcntl
    import pty
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 columns wide
    got = []
    reader = threading.Thread(target=lambda: got.extend(iter(lambda: _read_or_empty(master), b"")))
    reader.start()
    try:
        p = subprocess.run(train_cmd(out_dir, bins, *extra), stdout=subprocess.PIPE, stderr=slave, text=True,
                           cwd=ROOT, timeout=300)
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    assert p.returncode == 0, p.stdout
    return p, b"".join(got).decode(errors="replace")


def _read_or_empty(fd):
    try:
        return os.read(fd, 1 << 16)
    except OSError:  # EIO: the terminal's other end is closed
        return b""


def test_a_console_that_cannot_show_a_character_does_not_stop_a_run(tmp_path, bins):
    """Windows writes a redirected stdout in its ANSI code page (cp1252 here, which has no 日本): what it cannot
    show is escaped on the console; train.log keeps it."""
    out = tmp_path / "日本"
    p = run_train(out, bins, "--max_steps=2", "--save_steps=2", env={"PYTHONIOENCODING": "cp1252"})
    assert "out_dir='" + str(tmp_path) + "/\\u65e5\\u672c'" in p.stdout and "done: 2 steps" in p.stdout
    # (and a warmup as long as the run is said to be one: TINY's 2 steps of it, in 2 steps)
    assert "warning: warmup_steps=2 is not below the run's 2 steps: the learning rate only ramps up, to 2.00e-03 " \
           "at the last step (learning_rate=0.003), and never decays; lower warmup_steps" in p.stdout, p.stdout
    assert f"out_dir='{out}'" in (out / "train.log").read_text(encoding="utf-8")


def test_a_history_record_the_plot_cannot_draw_is_warned_about_once(tmp_path):
    """Trainer.refresh_plot itself, on a run's folder whose eval_history.json was edited by hand: one warning while
    the reason stays, none once it can draw again (train.py calls it after each evaluation)."""
    pytest.importorskip("matplotlib")
    history = tmp_path / "eval_history.json"
    history.write_text(json.dumps([{"step": 1, "val_loss": "2.5 (edited by hand)"}]))
    said = []
    run = types.SimpleNamespace(cfg=types.SimpleNamespace(plot=True), ddp=types.SimpleNamespace(master=True),
                                out_dir=tmp_path, log=said.append, plot_failure=None)
    for _ in range(3):  # three evaluations
        train.Trainer.refresh_plot(run)
    assert len(said) == 1 and said[0].startswith("warning: could not draw the loss curve: "), said
    history.write_text(json.dumps([{"step": 1, "val_loss": 2.5}]))
    train.Trainer.refresh_plot(run)
    assert run.plot_failure is None and (tmp_path / "loss_curve.png").is_file() and len(said) == 1


def test_run_writes_checkpoints_history_and_logs(tmp_path, bins):
    out = tmp_path / "out"
    p, terminal = run_train_on_a_terminal(out, bins, "--epochs=2", "--save_steps=2", "--eval_steps=3",
                                          "--max_checkpoints=2", "--export_final_model=True", "--tensorboard=True",
                                          "--plot=True")
    assert "22/22 [" in terminal and "step 22/22" not in p.stdout  # the progress bar, not the step lines
    # 2700 train tokens... 3000 // 33 = 90 windows, 8 per step -> 11 steps per epoch, 22 in all.
    assert "11 steps per epoch, 22 steps in all" in p.stdout
    kept = ckpt.list_checkpoints(out / "checkpoints")
    assert [c.name for c in kept] == ["checkpoint_epoch2_step20.pt", "checkpoint_epoch2_step22.pt"]
    best = ckpt.load_checkpoint(out / "best_model.pt")
    for key in ("model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "epoch", "step",
                "train_loss", "val_loss", "config"):
        assert key in best
    history = json.loads((out / "training_history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]
    assert set(history[0]) == {"epoch", "train_loss", "val_loss", "val_perplexity", "timestamp"}
    assert history[1]["train_loss"] < history[0]["train_loss"]
    evals = json.loads((out / "eval_history.json").read_text())
    assert [r["step"] for r in evals] == [3, 6, 9, 11, 12, 15, 18, 21, 22]  # and each epoch end
    assert best["val_loss"] == min(r["val_loss"] for r in evals)
    assert {"step", "tokens", "lr", "elapsed_s"} <= set(evals[0])
    log = (out / "train.log").read_text()
    assert "step 22/22" in log and "epoch 1 done" in log and "epoch 2 done" in log
    assert "warning" not in log  # (a warmup of 2 in 22 steps is no warmup longer than the run)
    assert "tokens per step, 1 process\n" in log
    # 'auto' with nothing to resume says so (a new Kaggle session's empty /kaggle/working is no silent fresh start).
    assert f"resume: no checkpoint in {out} or {out / 'checkpoints'}, so this is a fresh run (to continue" in log
    assert (out / "final_model" / "config.json").exists()
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = b"".join(f.read_bytes() for f in (out / "tensorboard").glob("events.out.tfevents.*"))
    for tag in (b"train/loss", b"train/lr", b"train/grad_norm", b"val/loss", b"val/perplexity"):
        assert tag in events


@pytest.mark.parametrize("dtype", ["float32"])  # bf16's exact resume: the compiled resume test
def test_sigterm_writes_emergency_checkpoint_and_resume_is_exact(tmp_path, bins, dtype):
    # With dropout: the random streams must go on from where the stop left them, too.
    straight = tmp_path / "straight"
    run_train(straight, bins, "--max_steps=16", "--save_steps=100", "--eval_steps=100",
              "--gradient_accumulation_steps=4", f"--dtype={dtype}", "--dropout=0.1")
    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(train_cmd(interrupted, bins, "--max_steps=16", "--save_steps=100", "--eval_steps=100",
                                      "--gradient_accumulation_steps=4", f"--dtype={dtype}", "--dropout=0.1"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "GPT_TEST_STEP_DELAY": "0.3"})
    log = interrupted / "train.log"
    deadline = time.time() + 120
    while not (log.exists() and "step 5/16" in log.read_text()):
        assert time.time() < deadline and proc.poll() is None, killed_output(proc)
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Resume with: python train.py" in stdout
    emergency = ckpt.load_checkpoint(interrupted / "emergency_checkpoint.pt")
    assert 5 <= emergency["step"] < 16

    run_train(interrupted, bins, "--max_steps=16", "--save_steps=100", "--eval_steps=100",
              "--gradient_accumulation_steps=4", f"--dtype={dtype}", "--dropout=0.1", "--resume_from_checkpoint=latest")
    assert_same_weights(final_state(straight)["model_state_dict"], final_state(interrupted)["model_state_dict"])
    assert step_losses(interrupted) == step_losses(straight)
    assert f"dtype: {dtype}" in (interrupted / "train.log").read_text()  # the run really was in that dtype


def killed_output(proc):
    """(stdout, stderr) of a background run a test gives up on: killed first (it may still be running)."""
    proc.kill()
    return proc.communicate(timeout=60)


def start_and_wait_for(out, bins, needle, delay, *extra):
    """train.py started in the background (GPT_TEST_STEP_DELAY=delay s a step), once its log has `needle`."""
    proc = subprocess.Popen(train_cmd(out, bins, *extra), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "GPT_TEST_STEP_DELAY": str(delay)})
    deadline = time.time() + 120
    while not ((out / "train.log").exists() and needle in (out / "train.log").read_text()):
        assert time.time() < deadline and proc.poll() is None, killed_output(proc)
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["ctrl-c_with_tee_gone", "hangup"])
def test_a_stop_whose_output_has_no_reader_left_still_saves(tmp_path, bins, signum):
    """`python train.py ... | tee log` and Ctrl-C: the same Ctrl-C ends tee, so every line train.py prints after it
    (the stop notice, "saved ...") meets a broken pipe; a closed terminal (SIGHUP) leaves no reader either.
    The emergency checkpoint is written all the same, and train.log has what the terminal lost."""
    out = tmp_path / "out"
    proc = start_and_wait_for(out, bins, "step 3/", 0.2, "--max_steps=50", "--save_steps=100", "--eval_steps=100")
    proc.stdout.close()  # the reader goes away first, as tee does
    proc.stderr.close()
    proc.send_signal(signum)
    assert proc.wait(timeout=120) == 128 + signum
    assert ckpt.load_checkpoint(out / "emergency_checkpoint.pt")["step"] >= 3
    log = (out / "train.log").read_text()
    assert "interrupted at step" in log and "Resume with: python train.py" in log


@pytest.mark.parametrize("during, signum", [("import torch", signal.SIGINT), ("set-up", signal.SIGINT),
                                            ("import torch", signal.SIGTERM), ("write check", signal.SIGTERM)])
def test_ctrl_c_before_training_starts_is_one_line_and_loses_nothing(tmp_path, bins, during, signum, audit_hooked):
    """The real train.py run as __main__ by a launcher that says when the import of torch begins, when set-up
    opens train.bin, or when the check that out_dir takes files is about to remove its file (audit hooks; it waits
    there for the signal): the Ctrl-C (or a `kill`'s SIGTERM) lands there (`import torch` alone takes seconds,
    set-up makes the folders, the model and the optimizer). A copy of the signal after the line (as `timeout -s INT`
    or a process group sends one) changes nothing: no traceback from Python's shutdown, the same exit code."""
    out = tmp_path / "out"
    say_when = """
        import time
        waited = []
        def hook(event, args):
            if event == "import" and args[0] == "torch" and "torch" not in sys.modules:
                print("import torch", flush=True)
            if event == "open" and str(args[0]).endswith("train.bin"):
                print("set-up", flush=True)
            if event == "os.remove" and ".write-test." in str(args[0]) and not waited:  # (not the clean-up's)
                waited.append(1)  # (first: a signal as print returns must not leave the clean-up's removal to wait)
                print("write check", flush=True)
                time.sleep(60)  # (the signal ends it)"""
    proc = subprocess.Popen([*audit_hooked(say_when), *train_cmd(out, bins)[1:]], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while (line := proc.stdout.readline()) not in (f"{during}\n", ""):
            pass
        assert line == f"{during}\n"
        proc.send_signal(signum)
        said = proc.stderr.readline() + proc.stderr.readline()
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()  # (a no-op once it has exited)
        proc.communicate()
    assert (proc.returncode, said + stderr) == (128 + signum, f"\n{train.NOT_STARTED}\n")
    assert not out.exists()  # (a stop in set-up: the folders it had made go again)
    if during == "import torch":
        assert stdout == ""


def test_a_stop_before_training_is_not_lost_when_a_library_swallows_its_exception(tmp_path, bins, audit_hooked):
    """C code that calls Python code and clears its errors (CPython's PyObject_HasAttr does) can swallow the
    KeyboardInterrupt of a Ctrl-C that lands there: here the set-up's first read of train.bin does, and the run still
    ends as interrupted before training (without the signal kept, it trained on and exited 0). SIGTERM takes the
    same path."""
    out, signum = tmp_path / "out", signal.SIGINT
    swallowing = f"""
        import time
        def hook(event, args):
            if event == "open" and str(args[0]).endswith("train.bin") and not hasattr(hook, "done"):
                hook.done = True
                try:
                    os.kill(os.getpid(), {int(signum)})
                    time.sleep(5)
                except KeyboardInterrupt:
                    print("swallowed", flush=True)"""
    p = subprocess.run([*audit_hooked(swallowing), *train_cmd(out, bins)[1:]], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert (p.returncode, p.stdout.splitlines()[:1], p.stderr) == (128 + signum, ["swallowed"],
                                                                     f"\n{train.NOT_STARTED}\n"), p.stdout
    assert not list(out.rglob("*.pt")) and not (out / "training_history.json").exists()


def test_nohup_keeps_a_hangup_from_stopping_the_run():
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what nohup leaves a program
    try:
        assert signal.SIGHUP not in train.stop_signals()
    finally:
        signal.signal(signal.SIGHUP, old)
    assert signal.SIGHUP in train.stop_signals()


def test_a_second_run_on_a_folder_in_use_is_refused_and_a_killed_run_holds_nothing(tmp_path, bins, refused):
    out = tmp_path / "out"
    # (steps enough to outlive the two runs below on a slow machine: it is killed, never finished)
    first = start_and_wait_for(out, bins, "step 2/", 0.2, "--max_steps=100000", "--save_steps=100000",
                               "--eval_steps=100000")
    try:
        err = refused(train_cmd(out, bins, "--max_steps=4", "--learning_rate=1e-3"))
        assert err == (
            f"error: {out} is in use by another train.py (pid {first.pid} on {socket.gethostname()}): two runs in one "
            f"folder would overwrite each other's checkpoints; wait for it, stop it, or give this run other folders "
            f"(out_dir, checkpoint_dir)\n")
        # Another out_dir sharing the first run's checkpoint_dir is refused too.
        err = refused(train_cmd(tmp_path / "other", bins, f"--checkpoint_dir={out / 'checkpoints'}"))
        assert f"{out / 'checkpoints'} is in use by another train.py" in err
        assert not (tmp_path / "other").exists()  # the out_dir it made (and locked) goes; the other run's stays
        assert (out / "checkpoints" / train.LOCK_NAME).read_text().startswith(f"pid {first.pid} ")
    finally:
        first.kill()  # kill -9: the kernel drops its lock
        first.communicate()  # (and closes its pipes)
    p = run_train(out, bins, "--max_steps=4")  # the lock is free (it resumes what the killed run saved, if anything)
    assert p.returncode == 0 and "done: " in p.stdout


def test_one_folder_spelled_two_ways_is_locked_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = train.TrainConfig(out_dir="run", checkpoint_dir=str(tmp_path / "run"))  # relative and absolute
    train.make_run_folders(cfg)
    with train.run_lock(cfg):  # not refused by its own lock
        assert (tmp_path / "run" / train.LOCK_NAME).read_text().startswith(f"pid {os.getpid()} ")


def test_run_folders_are_made_as_the_path_says_and_only_those_made_go(tmp_path, monkeypatch):
    """'..' is the kernel's to resolve (through a link it is the link target's parent); a folder there already, or
    one a path only passes through, is never removed with those the run made."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere" / "sub")
    made = []
    train.make_run_folders(train.TrainConfig(out_dir="link/../run", checkpoint_dir="q/../ck"), made)
    assert (tmp_path / "elsewhere" / "run").is_dir() and (tmp_path / "ck").is_dir() and (tmp_path / "q").is_dir()
    train.remove_refused_run_folders(made)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "link"]
    assert [p.name for p in (tmp_path / "elsewhere").iterdir()] == ["sub"]


def test_a_repeated_signal_saves_unless_it_comes_later(tmp_path, bins):
    # Twice at once (torchrun passing on the signal it got, Ctrl-C reaching a whole process group): one stop.
    out = tmp_path / "twice"
    proc = start_and_wait_for(out, bins, "step 2/", 0.3, "--max_steps=16", "--save_steps=100", "--eval_steps=100")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "exiting now" not in stderr, stderr
    assert stderr.count("SIGTERM received") == 1 and ckpt.load_checkpoint(out / "emergency_checkpoint.pt")["step"] >= 2
    def signal_twice_inside_the_first_step(out, step_delay, signum):
        """signum, then again after the grace period, both inside the first micro-step's pause; (proc, stderr)."""
        proc = start_and_wait_for(out, bins, "config:", step_delay, "--max_steps=16", "--save_steps=100",
                                  "--eval_steps=100")
        time.sleep(0.3)
        proc.send_signal(signum)
        time.sleep(train.StopRequest.REPEAT_GRACE_S + 0.8)  # (the first one's handler may run late on a loaded machine)
        proc.send_signal(signum)
        return proc, proc.communicate(timeout=120)[1]

    # SIGTERM again later (Jupyter's kernel shutdown sends seven over 4.4 s): a reminder, the save goes on.
    proc, stderr = signal_twice_inside_the_first_step(tmp_path / "reminded", 8, signal.SIGTERM)  # a 4 s micro-step
    assert proc.returncode == 128 + signal.SIGTERM and "exiting now" not in stderr, stderr
    emergency = ckpt.load_checkpoint(tmp_path / "reminded" / "emergency_checkpoint.pt")
    assert emergency["step"] == 0 and emergency["data_state"]["position"] == 0  # the cut step: redone from its start
    # Ctrl-C again after the grace period: the user means it, and the run exits at once, without waiting for the step.
    proc, stderr = signal_twice_inside_the_first_step(tmp_path / "later", 20, signal.SIGINT)  # a 10 s micro-step
    assert proc.returncode == 128 + signal.SIGINT and "Ctrl-C (SIGINT) during the stop: exiting now" in stderr, stderr
    assert not (tmp_path / "later" / "emergency_checkpoint.pt").exists()


@pytest.mark.parametrize("distributed", [False, True])
def test_the_stop_line_offers_a_second_ctrl_c_only_where_it_works(distributed, capsys):
    """Under torchrun a second Ctrl-C in the terminal reaches torchrun alone, which ends its workers with SIGTERM, as
    after a supervisor's SIGTERM: a reminder, which never cuts the save short. So no 'Ctrl-C again' is offered."""
    stop = train.StopRequest(distributed=distributed)
    stop._handle(signal.SIGINT, None)
    err = capsys.readouterr().err
    where = "the end of the step" if distributed else "the next micro-step"
    assert err == f"\nSIGINT received: stopping at {where}, saving an emergency checkpoint" + (
        "\n" if distributed else " (Ctrl-C again to exit at once)\n")


def assert_resumed_run_is_bit_identical(run, tmp_path, bins, *common, from_straight=False):
    """A run stopped at max_steps=4 and resumed to 8 ends with the weights and train loss of one that ran 8
    straight (lr constant after warm-up, so both follow one schedule). from_straight: one run fewer, the resumed
    run starts from the straight run's step-4 checkpoint in a folder of its own. run(out_dir, bins, *args) runs
    train.py; returns the straight run's process."""
    common = [*common, "--lr_decay=constant", "--save_steps=4", "--eval_steps=4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    p = run(straight, bins, *common, "--max_steps=8")
    if from_straight:
        source = straight / "checkpoints" / "checkpoint_epoch1_step4.pt"
    else:
        run(resumed, bins, *common, "--max_steps=4")
        source = "latest"
    run(resumed, bins, *common, "--max_steps=8", f"--resume_from_checkpoint={source}")
    a, b = final_state(straight), final_state(resumed)
    assert a["step"] == b["step"] == 8 and a["train_loss"] == b["train_loss"]
    assert_same_weights(a["model_state_dict"], b["model_state_dict"])
    return p, a, b


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [pytest.param("bfloat16", marks=pytest.mark.native_bf16), "float32"])
def test_a_compiled_run_resumes_bit_identically(tmp_path, bins, dtype):
    """Compiled, the embedding's backward would add rows' gradients with atomics in an order that varies from
    run to run (the weights differed at 1e-9); the embedding stays out of the compiled graph. fp32 too, whose
    products run on oneDNN's custom op on AMD CPUs (model.ONEDNN_FP32).

    In fp32 the resumed run takes cuda_graphs' bookkeeping (hook: on a CPU inductor compiles the step in
    reduce-overhead mode, skips the graphs and counts them skipped, which train.py reports): gradients kept
    allocated and zeroed in place, so that a replay cannot overwrite an earlier micro-batch's .grad, must sum as
    the default path does, to the bit. The graphs themselves: tests/test_cuda.py.

    At two torch threads (the suite's processes have one): the atomics' order varies only between threads."""
    threads, graphs = {"OMP_NUM_THREADS": "2"}, dtype == "float32"

    def run(out, b, *args):
        hook = {"GPT_TEST_CUDA_GRAPHS_ON_CPU": "1"} if graphs and out.name == "resumed" else {}
        return run_train(out, b, *args, env={**threads, **hook})

    p, _, _ = assert_resumed_run_is_bit_identical(run, tmp_path, bins, "--compile=True", f"--dtype={dtype}",
                                                  from_straight=True)  # compiling is slow: two runs, not three
    assert "compile: on" in p.stdout and "torch.compile failed" not in p.stderr and "(2 threads," in p.stdout
    skipped = "warning: cuda_graphs: inductor runs 1 compiled graph of the step without CUDA graphs"
    assert (tmp_path / "resumed" / "train.log").read_text().count(skipped) == (1 if graphs else 0)


def test_cuda_graphs_drop_their_graphs_on_out_of_memory(tmp_path, bins):
    """cuda_graphs' out-of-memory path on a CPU (hook; the bookkeeping's sums: the compiled resume test above): all
    compiled code reset, the step recompiled without graphs at the smaller micro-batch."""
    p = run_train(tmp_path / "oom", bins, "--compile=True", "--max_steps=2", "--save_steps=2",
                  env={"GPT_TEST_CUDA_GRAPHS_ON_CPU": "1", "GPT_TEST_OOM_ABOVE_BATCH": "2"})
    assert "out of memory: cuda_graphs off for the rest of this session" in p.stdout
    assert "micro-batch now 2 x 4 accumulation steps" in p.stdout and "torch.compile failed" not in p.stderr
    assert math.isfinite(final_state(tmp_path / "oom")["train_loss"])


def test_raised_by_oom_follows_the_chain_an_error_was_raised_in():
    def raised(f):
        try:
            f()
        except Exception as e:
            return e

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory")

    def during(handler_error, suppress=False):
        def f():
            try:
                oom()
            except torch.OutOfMemoryError:
                if suppress:
                    raise handler_error from None
                raise handler_error
        return f

    def from_oom():
        raise RuntimeError("capture failed") from torch.OutOfMemoryError("CUDA out of memory")

    assert train.raised_by_oom(raised(oom))
    assert train.raised_by_oom(raised(during(RuntimeError("operation failed due to a previous error during capture"))))
    assert train.raised_by_oom(raised(from_oom))
    # What the update's own out-of-memory becomes (from None) is final, as is any other error.
    assert not train.raised_by_oom(raised(during(hardware.HardwareError("out of memory in the optimizer update"), True)))
    assert not train.raised_by_oom(raised(lambda: 1 / 0))


def test_kill_9_leaves_loadable_checkpoints_and_auto_resume_is_exact(tmp_path, bins):
    """At two torch threads, as a user's CPU run has (the suite's processes have one: tests/conftest.py): a resume
    is exact with the work split over threads too."""
    threads = {"OMP_NUM_THREADS": "2"}
    straight = tmp_path / "straight"
    run_train(straight, bins, "--max_steps=20", "--save_steps=2", "--eval_steps=100", env=threads)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(killed, bins, "--max_steps=20", "--save_steps=2", "--eval_steps=100"),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **threads, "GPT_TEST_STEP_DELAY": "0.3"})  # 4.8 s left to see 2 saves
    deadline = time.time() + 120
    while len(ckpt.list_checkpoints(killed / "checkpoints")) < 2:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    for path in (killed / "checkpoints").iterdir():
        if path.name.startswith("checkpoint_"):
            ckpt.load_checkpoint(path)  # every file under a final name is whole
    p = run_train(killed, bins, "--max_steps=20", "--save_steps=2", "--eval_steps=100", env=threads)  # resume: 'auto'
    assert "epoch 2 ended after 9 of its 11 steps" in p.stdout  # max_steps=20 stops inside epoch 2
    assert "(2 threads," in p.stdout
    assert_same_weights(weights(straight / "checkpoints" / "checkpoint_epoch2_step20.pt"),
                        weights(killed / "checkpoints" / "checkpoint_epoch2_step20.pt"), context=p.stdout)


def test_out_of_memory_halves_micro_batch_and_keeps_the_result_and_the_random_streams(tmp_path, bins):
    # 4 x 2 -> 2 x 4 -> 1 x 8, each attempt running out of memory in its last backward, after its forwards have drawn
    # dropout masks: the step redone at 1 x 8 must draw the masks a run at 1 x 8 from the start draws (the back-off
    # rewinds the random streams with the data), so the two runs end bit for bit the same.
    one_by_eight, backed_off = tmp_path / "1x8", tmp_path / "oom"
    common = ["--max_steps=6", "--save_steps=6", "--eval_steps=100", "--dropout=0.1"]
    run_train(one_by_eight, bins, *common, "--batch_size=1", "--gradient_accumulation_steps=8")
    p = run_train(backed_off, bins, *common, env={"GPT_TEST_OOM_ABOVE_BATCH": "1", "GPT_TEST_OOM_IN_LAST_BACKWARD": "1"})
    assert "out of memory: micro-batch now 2 x 4 accumulation steps" in p.stdout
    assert "out of memory: micro-batch now 1 x 8 accumulation steps" in p.stdout
    state, ref = (ckpt.load_checkpoint(d / "checkpoints" / "checkpoint_epoch1_step6.pt") for d in (backed_off, one_by_eight))
    assert (state["batch_size"], state["gradient_accumulation_steps"]) == (1, 8)
    assert state["data_state"] == ref["data_state"] and state["tokens_seen"] == ref["tokens_seen"]
    assert_same_weights(state["model_state_dict"], ref["model_state_dict"], context=p.stdout)
    # A resume with the same batch settings, here from a config file, keeps the micro-batch that fits, and says
    # why (one that names them on its command line, as run_train's do, sets them).
    (tmp_path / "same.py").write_text("batch_size = 4\ngradient_accumulation_steps = 2\n")
    cmd = [a for a in train_cmd(backed_off, bins, "--max_steps=7", "--save_steps=7", "--eval_steps=100", "--dropout=0.1")
           if not a.startswith(("--batch_size=", "--gradient_accumulation_steps="))]
    p = subprocess.run([*cmd[:2], str(tmp_path / "same.py"), *cmd[2:]], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert "resume: micro-batch 1 x 8 accumulation, as the checkpoint's run backed off to after running out" in p.stdout
    assert ckpt.load_checkpoint(backed_off / "checkpoints" / "checkpoint_epoch1_step7.pt")["batch_size"] == 1
    p = run_train(backed_off, bins, "--max_steps=8", "--save_steps=8", "--eval_steps=100", "--dropout=0.1")  # names the batch
    assert "resume: micro-batch" not in p.stdout
    assert ckpt.load_checkpoint(backed_off / "checkpoints" / "checkpoint_epoch1_step8.pt")["batch_size"] == 4


def test_out_of_memory_keeps_an_odd_effective_batch(tmp_path, bins):
    # The largest micro-batch of at most half that divides the step's sequences: 10 -> 5 x 2 -> 2 x 5, still 10.
    out = tmp_path / "oom"
    p = run_train(out, bins, "--batch_size=10", "--gradient_accumulation_steps=1", "--max_steps=3", "--save_steps=3",
                  "--eval_steps=100", env={"GPT_TEST_OOM_ABOVE_BATCH": "2"})
    assert "micro-batch now 5 x 2 accumulation steps" in p.stdout and "micro-batch now 2 x 5 accumulation" in p.stdout
    state = ckpt.load_checkpoint(out / "checkpoints" / "checkpoint_epoch1_step3.pt")
    assert (state["batch_size"], state["gradient_accumulation_steps"]) == (2, 5)
    # Each failed attempt's batches are read again: 3 steps of 10 sequences, not the 45 the two retries would add.
    assert (state["data_state"]["epoch"], state["data_state"]["position"]) == (0, 30)


def test_out_of_memory_at_micro_batch_1_gives_up_clearly_with_a_checkpoint(tmp_path, bins):
    out = tmp_path / "out"
    run_train(out, bins, "--max_steps=2", "--save_steps=2", "--eval_steps=100")
    p = run_train(out, bins, "--max_steps=4", env={"GPT_TEST_OOM_ABOVE_BATCH": "0"}, check=False)
    assert p.returncode == 2 and p.stderr.startswith("error: out of memory even at batch_size=1"), p.stderr
    assert "out of memory even at batch_size=1" in (out / "train.log").read_text()
    emergency, before = (ckpt.load_checkpoint(out / name) for name in
                         ("emergency_checkpoint.pt", "checkpoints/checkpoint_epoch1_step2.pt"))
    assert emergency["step"] == 2 and emergency["data_state"] == before["data_state"]


def test_an_evaluation_cut_short_by_a_stop_or_an_error_is_redone_on_resume(tmp_path, bins):
    """A SIGTERM during an evaluation (a whole val split can take minutes: the seconds before a supervisor's, or
    torchrun's, SIGKILL go to the save) stops it at the next batch; an error in one stops the run. Each resume
    evaluates that step again, and the run ends as a straight one."""
    common = ["--max_steps=22", "--eval_steps=5", "--save_steps=100", "--eval_iters=0"]  # (5 batches of val)
    straight, failed = tmp_path / "straight", tmp_path / "failed"
    run_train(straight, bins, *common)
    p = run_train(failed, bins, *common, env={"GPT_TEST_SIGTERM_IN_EVAL_STEP": "5"}, check=False)
    assert p.returncode == 128 + signal.SIGTERM, p.stderr
    state = ckpt.load_checkpoint(failed / "emergency_checkpoint.pt")
    assert state["step"] == 5 and state["after_step_pending"]
    history = failed / "eval_history.json"
    assert not history.exists() or json.loads(history.read_text()) == []
    p = run_train(failed, bins, *common, env={"GPT_TEST_ERROR_AT_EVAL_STEP": "11"}, check=False)  # an epoch's end
    assert "redoing the evaluation of step 5" in p.stdout
    assert p.returncode != 0 and "injected: an error in the evaluation of step 11" in p.stderr
    assert f"saved {failed / 'emergency_checkpoint.pt'}. Resume with: python train.py" in p.stdout
    # Stopped in the last step's evaluation: the resume redoes it and saves the run's end, as the loop would have.
    p = run_train(failed, bins, *common, env={"GPT_TEST_SIGTERM_IN_EVAL_STEP": "22"}, check=False)
    assert p.returncode == 128 + signal.SIGTERM and "redoing the evaluation of step 11" in p.stdout, p.stderr
    state = ckpt.load_checkpoint(failed / "emergency_checkpoint.pt")
    assert state["step"] == 22 and state["after_step_pending"]
    assert not (failed / "checkpoints" / "checkpoint_epoch2_step22.pt").exists()
    p = run_train(failed, bins, *common)
    assert "redoing the evaluation of step 22" in p.stdout and "done: 22 steps" in p.stdout
    assert not (failed / "emergency_checkpoint.pt").exists()  # (the step-22 checkpoint has the run as far on)
    for name in ("training_history.json", "eval_history.json"):
        a, b = (json.loads((d / name).read_text()) for d in (straight, failed))
        assert [(r.get("step"), r["train_loss"], r["val_loss"]) for r in a] == \
               [(r.get("step"), r["train_loss"], r["val_loss"]) for r in b], name
    assert_same_weights(weights(straight / "checkpoints" / "checkpoint_epoch2_step22.pt"),
                        weights(failed / "checkpoints" / "checkpoint_epoch2_step22.pt"))


def test_an_error_between_steps_keeps_the_step_it_follows(tmp_path, bins):
    """An error after a step's evaluation and saves (under DDP: a lost peer, noticed in the next collective) keeps
    that step with the data position after it: the resume does not train its batches twice.

    Also: eval_history.json could not be written at step 2 (a full disk), nor again after best_model.pt's save
    then: the emergency checkpoint after the error writes it, so the resume (which reads the file) keeps step 2's
    record. And the resumed run's end tries the final export into a folder an export never replaces: the run is
    saved (exit 0), and the warning ends with the command that exports it again."""
    common = ["--max_steps=8", "--eval_steps=2", "--save_steps=100"]
    straight, failed = tmp_path / "straight", tmp_path / "failed"
    run_train(straight, bins, *common)
    p = run_train(failed, bins, *common, env={"GPT_TEST_ERROR_AFTER_STEP": "3", "GPT_TEST_FAIL_HISTORY_WRITES": "2"},
                  check=False)
    assert p.returncode != 0 and "injected: an error after step 3" in p.stderr
    assert (p.stdout + p.stderr).count("warning: injected: could not write") == 1
    assert [r["step"] for r in json.loads((failed / "eval_history.json").read_text())] == [2]
    state = ckpt.load_checkpoint(failed / "emergency_checkpoint.pt")
    assert state["step"] == 3 and not state.get("after_step_pending")
    assert state["data_state"]["position"] == 3 * 8  # three steps of 8 windows read, not two
    (failed / "final_model").mkdir()
    (failed / "final_model" / "notes.txt").write_text("mine")
    p = run_train(failed, bins, *common, "--export_final_model=True")
    assert_same_weights(final_state(straight)["model_state_dict"], final_state(failed)["model_state_dict"])
    assert step_losses(failed) == step_losses(straight)
    assert [r["step"] for r in json.loads((failed / "eval_history.json").read_text())] == [2, 4, 6, 8]
    line = next(line for line in p.stdout.splitlines() if "could not export" in line)
    assert line.startswith("warning: could not export final_model/: ") and line.endswith(
        f"; export it again with: python export_hf.py {failed / 'best_model.pt'} {failed / 'final_model'}"), line
    assert (failed / "final_model" / "notes.txt").read_text() == "mine"


def test_a_full_disk_at_the_start_says_free_disk_space(full_disk, bins, refused):
    """Not "point out_dir at a writable folder": on Kaggle it already is the right one. Whether the folder cannot be
    made, or it is there (a resume) and takes no file."""
    for run in (full_disk / "run", full_disk / "f0"):
        if run.name == "f0":
            run.unlink()
            run.mkdir()
        assert refused(train_cmd(run, bins)) == \
            f"error: cannot write in {run}: No space left on device; free disk space\n"


@pytest.mark.slow
def test_epoch_train_loss_is_the_same_after_any_resume(tmp_path, bins):
    """Stopped at an epoch's end and resumed from best_model.pt (as after a kill before the next rotated
    save), then stopped inside an epoch and extended: each epoch's mean train loss is the straight run's."""
    common = ["--lr_decay=constant", "--eval_steps=100", "--save_steps=100"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(straight, bins, *common, "--max_steps=22")
    run_train(resumed, bins, *common, "--max_steps=11")
    for path in ckpt.list_checkpoints(resumed / "checkpoints"):
        path.unlink()
    mid_epoch = resumed / "checkpoints" / "checkpoint_epoch2_step15.pt"
    for stop, source in ((15, resumed / "best_model.pt"), (22, mid_epoch)):
        p = run_train(resumed, bins, *common, f"--max_steps={stop}")
        assert f"resumed from {source} at step {11 if stop == 15 else 15}" in p.stdout, p.stdout
    a, b = (json.loads((d / "training_history.json").read_text()) for d in (straight, resumed))
    assert [(r["epoch"], r["train_loss"]) for r in a] == [(r["epoch"], r["train_loss"]) for r in b]


def test_a_fresh_run_never_overwrites_checkpoints_it_cannot_read(tmp_path, bins, refused):
    """Checkpoints this code cannot read (written by a newer format, or damaged) are still a run's: 'auto' says none
    can be loaded and points to another out_dir, and a fresh run there (resume_from_checkpoint='') is refused, where
    it used to overwrite them (the error's own advice was that fresh run)."""
    out = tmp_path / "out"
    run_train(out, bins, "--max_steps=4", "--save_steps=2", "--eval_steps=2")
    files = [*(out / "checkpoints").glob("*.pt"), out / "best_model.pt"]
    # A newer version's checkpoints beside an older readable one: 'auto' skips them, and the resume from step 2 would
    # rotate them away (or overwrite them on reaching their step), so it is refused.
    for path in (out / "checkpoints" / "checkpoint_epoch1_step4.pt", out / "best_model.pt"):
        torch.save({**torch.load(path, weights_only=True), "format_version": ckpt.FORMAT_VERSION + 1}, path)
    before = {p: p.read_bytes() for p in files}
    err = refused(train_cmd(out, bins, "--max_steps=8"))
    assert "but checkpoints of a newer format (a newer version of this trainer's) are here: " in err, err
    assert "update the code (git pull), or move them away first" in err and "best_model.pt" in err
    assert {p: p.read_bytes() for p in files} == before
    for path in files:
        path.write_bytes(path.read_bytes()[:5000])
    before = {p: p.read_bytes() for p in files}
    err = refused(train_cmd(out, bins, "--max_steps=8"))
    assert "none of the 3 checkpoint files" in err and "to train afresh, use another out_dir (or move them away)" in err
    err = refused(train_cmd(out, bins, "--max_steps=8", "--resume_from_checkpoint="))
    assert "hold an earlier run: a fresh run here would overwrite or rotate them away" in err, err
    assert {p: p.read_bytes() for p in files} == before
    assert (out / "eval_history.json").is_file() and not list(out.glob("*.earlier-*"))  # (not moved aside either)


def test_a_run_never_mixes_with_another_runs_checkpoints(tmp_path, bins, refused):
    out = tmp_path / "out"
    run_train(out, bins, "--max_steps=6", "--save_steps=2", "--eval_steps=100")

    def files():
        return sorted(p.name for p in (out / "checkpoints").iterdir()) + sorted(p.name for p in out.glob("*.pt"))

    before = files()
    err = refused(train_cmd(out, bins, "--max_steps=6", "--resume_from_checkpoint="))
    assert "hold an earlier run: a fresh run here would overwrite" in err, err
    older = out / "checkpoints" / "checkpoint_epoch1_step2.pt"
    err = refused(train_cmd(out, bins, "--max_steps=6", f"--resume_from_checkpoint={older}"))
    assert f"resuming from {older} at step 2, but" in err and "move them away" in err
    assert files() == before
    # Another run's checkpoint, resumed by path into this folder: refused even where it is further on than every file
    # here (a run id, drawn at each fresh start and kept by resumes, tells the runs apart).
    other = tmp_path / "other"
    run_train(other, bins, "--max_steps=8", "--save_steps=8", "--eval_steps=100")
    theirs = other / "checkpoints" / "checkpoint_epoch1_step8.pt"
    err = refused(train_cmd(out, bins, "--max_steps=10", f"--resume_from_checkpoint={theirs}"))
    assert f"resuming from {theirs}, but " in err and "belong to another run (its run id differs)" in err, err
    assert files() == before
    # This run's own newest checkpoint, from a copy elsewhere (a Kaggle input of an earlier session), is its own.
    copy = tmp_path / "input" / "checkpoint_epoch1_step6.pt"
    copy.parent.mkdir()
    shutil.copy(out / "checkpoints" / copy.name, copy)
    p = run_train(out, bins, "--max_steps=7", "--save_steps=7", "--eval_steps=100", f"--resume_from_checkpoint={copy}")
    assert f"resume: {out / 'checkpoints' / copy.name} is there already (the same step of this run)" in p.stdout
    assert final_state(out)["step"] == 7


def test_compile_auto_counts_the_tokens_a_resume_has_left(tmp_path, bins):
    out = tmp_path / "out"
    run_train(out, bins, "--max_steps=4", "--save_steps=4", "--eval_steps=100")
    p = run_train(out, bins, "--max_steps=6", "--compile=auto", "--eval_steps=100")
    assert "compile: off (a 512-token run:" in p.stdout  # the 2 steps left of 8 x 32 tokens, not all 6


@pytest.mark.slow
def test_resume_applies_changed_optimizer_settings_and_keeps_the_effective_batch(tmp_path, bins, refused):
    out = tmp_path / "out"
    run_train(out, bins, "--max_steps=4", "--save_steps=2", "--eval_steps=100")
    err = refused(train_cmd(out, bins, "--max_steps=6", "--batch_size=2"))
    assert "was trained with 8 sequences of 32 tokens per step" in err, err
    p = run_train(out, bins, "--max_steps=6", "--save_steps=2", "--eval_steps=100", "--learning_rate=1e-3",
                  "--weight_decay=0.5", "--batch_size=2", "--gradient_accumulation_steps=4")
    assert ("applied from here (the schedule now runs to step 6): learning_rate 0.003 -> 0.001, weight_decay 0.01 -> "
            "0.5, max_steps 4 -> 6" in p.stdout)
    assert "batch: 2 x 4 accumulation x 32 tokens = 256 tokens per step" in p.stdout
    state = ckpt.load_checkpoint(out / "checkpoints" / "checkpoint_epoch1_step6.pt")
    groups = state["optimizer_state_dict"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [1e-3, 1e-3] and [g["weight_decay"] for g in groups] == [0.5, 0.0]
    assert (state["batch_size"], state["gradient_accumulation_steps"]) == (2, 4)
    # The val loss (of the evaluation at the session's end) is over the run's val windows, eval_iters x the
    # batch_size it started with (2 x 4), not 2 x 2: the curve and the best model compare like with like.
    model = GPT(GPTConfig.from_dict(state["config"])).eval()
    model.load_state_dict(state["model_state_dict"])
    val = TokenBins(bins, "val", 32)

    def loss_over(windows):
        with torch.no_grad():
            scored = [(model(x, y)[1].item() * y.numel(), y.numel()) for x, y in val.eval_batches(4, windows)]
        return sum(s for s, _ in scored) / sum(n for _, n in scored)

    assert state["val_loss"] == pytest.approx(loss_over(8), abs=1e-6), (state["val_loss"], loss_over(4))
    # A batch set in a config file is as much this run's as one on the command line (no back-off happened).
    (tmp_path / "bigger.py").write_text("batch_size = 4\ngradient_accumulation_steps = 2\n")
    p = run_train(out, bins, str(tmp_path / "bigger.py"), "--max_steps=8", "--save_steps=2", "--eval_steps=100")
    assert "out of memory" not in p.stdout and "batch: 4 x 2 accumulation" in p.stdout
    state = ckpt.load_checkpoint(out / "checkpoints" / "checkpoint_epoch1_step8.pt")
    assert (state["batch_size"], state["gradient_accumulation_steps"]) == (4, 2)
    # dropout is a training setting (no shape); a seed cannot change a run's data order midway; max_steps behind.
    p = run_train(out, bins, "--max_steps=6", "--dropout=0.1", "--seed=7", "--warmup_steps=50")
    assert "dropout 0.0 -> 0.1" in p.stdout and "resume: seed 1337 -> 7 not applied" in p.stdout
    assert "nothing to train: the run is at step 8, and max_steps=6 ends it at step 6 (raise it" in p.stdout
    assert "warning: warmup_steps" not in p.stdout  # (a warmup longer than a run with nothing left is no matter)
    assert (out / "train.log").read_text().count("resumed from") == 3  # once a resume (the refused one: none)
    assert "is a different model (n_layer: 2 vs 3)" in refused(train_cmd(out, bins, "--max_steps=10", "--n_layer=3"))


def test_the_resume_command_is_the_launch_it_resumes():
    argv = ["config/x.py", "--sample_prompt=a b", "--resume_from_checkpoint=ck.pt"]
    tail = "train.py config/x.py '--sample_prompt=a b' --resume_from_checkpoint=latest"
    assert train.run_command(argv, 0, 0) == f"python {tail}"
    assert train.run_command(argv, 2, 2) == f"torchrun --standalone --nproc_per_node=2 {tail}"
    # Two nodes of four processes: four a node (not eight), on each node, with rendezvous options only the user knows.
    assert train.run_command(argv, 8, 4) == (
        f"on each node, torchrun --nnodes=2 --nproc_per_node=4 <the rendezvous options it was started with> {tail}")
    assert train.run_command(argv, 0, 0, again=True) == "python train.py config/x.py '--sample_prompt=a b' " \
                                                        "--resume_from_checkpoint=ck.pt"


def test_a_resume_with_another_checkpoint_dir_neither_goes_back_nor_overwrites_the_history(tmp_path, bins, refused):
    out, before, after = tmp_path / "out", tmp_path / "ck1", tmp_path / "ck2"
    run_train(out, bins, "--max_steps=4", "--save_steps=2", "--eval_steps=2", f"--checkpoint_dir={before}")
    shutil.copy(before / "checkpoint_epoch1_step2.pt", out / "best_model.pt")  # its best model: an earlier step
    err = refused(train_cmd(out, bins, "--max_steps=6", f"--checkpoint_dir={after}"))
    assert err.startswith(
        f"error: {out / 'best_model.pt'} is at step 2, but its run kept its rotated checkpoints in {before}, with "
        f"newer ones there"), err
    assert err.endswith(f"resume with --checkpoint_dir={before} (or move them over)\n")
    # A checkpoint named by path may start a branch in other folders.
    branch = tmp_path / "branch"
    p = run_train(branch, bins, "--max_steps=3", f"--resume_from_checkpoint={before / 'checkpoint_epoch1_step2.pt'}")
    assert "resumed from" in p.stdout and final_state(branch)["step"] == 3
    # No checkpoint in out_dir at all: a fresh start moves the run's history aside instead of overwriting it.
    (out / "best_model.pt").unlink()
    history = (out / "eval_history.json").read_text()
    p = run_train(out, bins, "--max_steps=2", f"--checkpoint_dir={after}")
    assert f"warning: {out / 'eval_history.json'} held the history of an earlier run with no checkpoint here or " \
           f"in {after}: moved to eval_history.json.earlier-" in p.stdout
    assert [f.read_text() for f in out.glob("eval_history.json.earlier-*")] == [history]


def test_a_resume_into_another_out_dir_takes_its_runs_best_model_and_histories(tmp_path, bins):
    src, out = tmp_path / "src", tmp_path / "out"
    run_train(src, bins, "--max_steps=4", "--save_steps=2", "--eval_steps=2")
    # The earlier session's output, read where it is (a Kaggle input), resumed into a new out_dir.
    p = run_train(out, bins, "--max_steps=4", f"--resume_from_checkpoint={src / 'checkpoints' / 'checkpoint_epoch1_step4.pt'}")
    assert f"resume: copied {src / 'best_model.pt'}" in p.stdout, p.stdout
    for name in ("best_model.pt", "eval_history.json", "training_history.json", "checkpoints/checkpoint_epoch1_step4.pt"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name  # the last: what 'auto' resumes from
    # A new out_dir beside the run's checkpoint_dir ('auto' resumes from there): the run's best model and histories
    # come too, so that this out_dir's best_model.pt and final_model/ are the run's best.
    beside = tmp_path / "beside"
    p = run_train(beside, bins, "--max_steps=5", "--save_steps=5", "--eval_steps=100",
                  f"--checkpoint_dir={src / 'checkpoints'}")
    assert f"resumed from {src / 'checkpoints' / 'checkpoint_epoch1_step4.pt'} at step 4" in p.stdout, p.stdout
    assert f"resume: copied {src / 'best_model.pt'}" in p.stdout
    earlier = json.loads((src / "eval_history.json").read_text())
    assert json.loads((beside / "eval_history.json").read_text())[:len(earlier)] == earlier
    assert ckpt.load_checkpoint(beside / "best_model.pt")["val_loss"] <= min(r["val_loss"] for r in earlier)
    # A branch from an older checkpoint into a new out_dir (where going back is refused in the run's own): the run's
    # best model is from a later step, so the best starts over, but the run's histories up to the checkpoint come.
    assert ckpt.load_checkpoint(src / "best_model.pt")["step"] == 4
    branch = tmp_path / "branch"
    p = run_train(branch, bins, "--max_steps=4", "--eval_steps=2",
                  f"--resume_from_checkpoint={src / 'checkpoints' / 'checkpoint_epoch1_step2.pt'}")
    assert f"but its best_model.pt in {src} is from a later step (a branch from an older checkpoint)" in p.stdout
    assert f"resume: copied training_history.json, eval_history.json from {src}" in p.stdout, p.stdout
    records = json.loads((branch / "eval_history.json").read_text())
    assert [r["step"] for r in records] == [2, 4] and records[0] == earlier[0]  # (src's own step 4: dropped)
    # The checkpoint alone: the best starts over from its step (else, where the run does no better than its best,
    # there would be no best_model.pt at all: here a best val loss of 0 in the checkpoint), with a warning.
    lone, worse = tmp_path / "lone", tmp_path / "worse"
    state = ckpt.load_checkpoint(src / "checkpoints" / "checkpoint_epoch1_step2.pt")
    ckpt.save_checkpoint({**state, "best_val_loss": 0.0}, lone, keep=1)
    src.rename(tmp_path / "gone")  # (the run's out_dir, which its config names, is not there: a Kaggle input not attached)
    p = run_train(tmp_path / "out2", bins, "--max_steps=4", "--eval_steps=2",
                  f"--resume_from_checkpoint={lone / 'checkpoint_epoch1_step2.pt'}")
    assert "but its best_model.pt is not beside it: best_model.pt (and final_model/) in" in p.stdout, p.stdout
    assert ckpt.load_checkpoint(tmp_path / "out2" / "best_model.pt")["step"] == 4
    # On another val split (as many windows, other tokens) the run's best is no yardstick either: it starts over.
    shutil.copytree(bins, worse)
    np.random.default_rng(0).integers(0, 50257, 600, dtype=np.uint16).tofile(worse / "val.bin")
    # Into a new out_dir the run's histories come, its best model does not.
    best = ckpt.load_checkpoint(tmp_path / "out2" / "best_model.pt")["val_loss"]
    p = run_train(tmp_path / "out3", worse, "--max_steps=6", "--eval_steps=2",
                  f"--resume_from_checkpoint={tmp_path / 'out2' / 'checkpoints' / 'checkpoint_epoch1_step4.pt'}")
    assert f"warning: {worse / 'val.bin'} holds other tokens than the run was evaluated on: its best val loss " \
           f"({best:.4f}) is not comparable, so best_model.pt (and final_model/) in {tmp_path / 'out3'} will be the " \
           f"best from step 4 on" in p.stdout, p.stdout
    assert f"resume: copied training_history.json, eval_history.json from {tmp_path / 'out2'}" in p.stdout and "beside it" not in p.stdout, p.stdout
    records = json.loads((tmp_path / "out3" / "eval_history.json").read_text())
    assert [r["step"] for r in records] == [4, 6]
    assert records[0] == json.loads((tmp_path / "out2" / "eval_history.json").read_text())[-1]
    assert ckpt.load_checkpoint(tmp_path / "out3" / "best_model.pt")["step"] == 6


def test_a_resume_on_other_data_is_refused(tmp_path, bins, refused):
    out = tmp_path / "out"
    run_train(out, bins, "--max_steps=4", "--save_steps=2", "--eval_steps=100")
    history = (out / "training_history.json").read_text()
    other = write_bins(tmp_path / "other", train_tokens=5000)
    assert refused(train_cmd(out, other, "--max_steps=8")) == (
        f"error: {other / 'train.bin'} has 151 windows of 33 tokens, but the checkpoint was saved while training on "
        f"90: the data changed since. Resume with the data_dir it was trained on, or start a new run from its "
        f"weights in another out_dir with --init_from=CHECKPOINT\n")
    assert (out / "training_history.json").read_text() == history and final_state(out)["step"] == 4
    assert "applied from here" not in (out / "train.log").read_text()  # (max_steps 4 -> 8 was said, then refused)
    # As many windows, other tokens.
    same_size = tmp_path / "same_size"
    shutil.copytree(bins, same_size)
    np.fromfile(bins / "train.bin", dtype=np.uint16)[::-1].tofile(same_size / "train.bin")
    assert refused(train_cmd(out, same_size, "--max_steps=8")).startswith(
        f"error: {same_size / 'train.bin'} holds other tokens than the checkpoint was saved with")


def test_a_history_that_is_not_a_list_of_records_is_moved_aside(tmp_path, capsys):
    for content in (b"[1, 2]", b'{"step": 1}', b"\xff\xfe", b'[{"step": "4"}]'):
        path = tmp_path / "eval_history.json"
        path.write_bytes(content)
        assert train.read_history(path, lambda r: r.get("step", 0) <= 5) == []
        aside = list(tmp_path.glob("eval_history.json.unreadable-*"))
        assert len(aside) == 1 and aside[0].read_bytes() == content and not path.exists()
        assert capsys.readouterr().err.startswith(f"warning: {path} is not a list of records (")
        aside[0].unlink()


def test_a_damaged_history_file_is_kept_aside_not_overwritten(tmp_path, bins):
    out = tmp_path / "out"
    run_train(out, bins, "--max_steps=4", "--save_steps=2", "--eval_steps=2")
    # A copy as a kill -9 after step 4's evaluation leaves it (no checkpoint past step 2): a resume from step 2
    # drops step 4's record, so that the history matches the weights.
    killed = tmp_path / "killed"
    shutil.copytree(out, killed)
    for path in (killed / "checkpoints" / "checkpoint_epoch1_step4.pt", killed / "best_model.pt"):
        if ckpt.load_checkpoint(path)["step"] > 2:
            path.unlink()
    run_train(killed, bins, "--max_steps=3", "--eval_steps=100")
    assert [r["step"] for r in json.loads((killed / "eval_history.json").read_text())] == [2, 3]

    history = out / "eval_history.json"
    damaged = history.read_bytes()[:-3]  # cut short
    history.write_bytes(damaged)
    p = run_train(out, bins, "--max_steps=6", "--save_steps=2", "--eval_steps=2")
    aside = list(out.glob("eval_history.json.unreadable-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == damaged
    assert p.stderr.count(f"warning: {history} is not a list of records") == 1
    assert f"moved to {aside[0].name}; the run starts a new one" in p.stderr
    assert f"warning: {history} is not a list of records" in (out / "train.log").read_text()  # it has every line
    assert [r["step"] for r in json.loads(history.read_text())] == [6]


def test_throughput_leaves_out_the_first_steps_compilation(monkeypatch):
    """tokens/s and the time-left estimate: a 60 s first step (torch.compile) and then 0.5 s steps is 1,000 tokens
    of 500 a second, not the session's average (~78/s after ten steps, an estimate 13x too long)."""
    clock = [1000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    meter = train.Throughput(tokens_per_step=500)
    clock[0] += 60.0
    meter.step_done()
    assert meter.tokens_per_s() == pytest.approx(500 / 60)  # the only figure there is yet
    for _ in range(9):
        clock[0] += 0.5
        meter.step_done()
    assert meter.tokens_per_s() == pytest.approx(1000)


def test_text_settings_keep_what_was_typed():
    cfg, _ = train.load_config(["--out_dir=1.50", "--sample_prompt=True", "--max_runtime=3600"])
    assert (cfg.out_dir, cfg.sample_prompt, cfg.max_runtime) == ("1.50", "True", "3600")


def test_nonfinite_losses_are_skipped_then_stop(tmp_path, bins):
    one = run_train(tmp_path / "one", bins, "--max_steps=5", "--save_steps=5", "--eval_steps=3",
                    env={"GPT_TEST_NAN_AT_STEPS": "3"})
    assert "step 3: non-finite loss or gradient, update skipped (1 in a row)" in one.stdout
    # The evaluation after the skipped step records its loss as null, not step 2's as if it were step 3's.
    records = json.loads((tmp_path / "one" / "eval_history.json").read_text())
    assert [(r["step"], r["train_loss"] is None) for r in records] == [(3, True), (5, False)]
    final = weights(tmp_path / "one" / "checkpoints" / "checkpoint_epoch1_step5.pt")
    assert all(torch.isfinite(v).all() for v in final.values())

    many = run_train(tmp_path / "many", bins, "--max_steps=10", "--max_nonfinite=3", "--eval_steps=100",
                     env={"GPT_TEST_NAN_AT_STEPS": "2,3,4"}, check=False)
    assert many.returncode == 3
    assert "3 non-finite losses in a row at step 4" in many.stdout
    assert ckpt.load_checkpoint(tmp_path / "many" / "emergency_checkpoint.pt")["step"] == 4

    # Weights blown up for real (a learning rate of 1e30): the evaluation's sample is skipped, not a traceback.
    blown = run_train(tmp_path / "blown", bins, "--max_steps=10", "--max_nonfinite=2", "--eval_steps=2",
                      "--learning_rate=1e30", "--min_lr=0", "--warmup_steps=0", "--sample_prompt=The", check=False)
    assert blown.returncode == 3 and "Traceback" not in blown.stderr, blown.stderr
    assert "step 2: val loss nan" in blown.stdout and "sample: none, the model's outputs are not finite" in blown.stdout


def test_a_nonfinite_stop_at_an_epochs_end_keeps_its_evaluation_and_record(tmp_path, bins):
    """Stopped by non-finite losses at step 11, an epoch's end, then resumed: the evaluation, epoch record and
    weights are those of a run that skipped the same update and went on."""
    common = ["--max_steps=13", "--eval_steps=5", "--save_steps=100"]
    nan = {"GPT_TEST_NAN_AT_STEPS": "11"}
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_train(straight, bins, *common, env=nan)
    p = run_train(stopped, bins, *common, "--max_nonfinite=1", env=nan, check=False)
    assert p.returncode == 3 and (f"{stopped / 'emergency_checkpoint.pt'} holds the last weights with a finite loss. "
                                  f"They may have diverged already") in p.stdout
    state = ckpt.load_checkpoint(stopped / "emergency_checkpoint.pt")
    assert state["step"] == 11 and state["after_step_pending"]
    p = run_train(stopped, bins, *common, env=nan)
    assert "redoing the evaluation of step 11" in p.stdout
    for name in ("training_history.json", "eval_history.json"):
        a, b = (json.loads((d / name).read_text()) for d in (straight, stopped))
        assert [(r.get("step"), r.get("epoch"), r["train_loss"], r["val_loss"]) for r in a] == \
               [(r.get("step"), r.get("epoch"), r["train_loss"], r["val_loss"]) for r in b], name
    assert [r["epoch"] for r in json.loads((stopped / "training_history.json").read_text())] == [1, 2]
    assert_same_weights(final_state(straight)["model_state_dict"], final_state(stopped)["model_state_dict"])


def test_a_failed_emergency_save_says_which_checkpoint_holds_the_run(tmp_path, bins):
    out = tmp_path / "my run"  # a space: the printed resume command must quote it
    (out / "emergency_checkpoint.pt" / "in the way").mkdir(parents=True)  # the save's rename cannot replace it
    p = run_train(out, bins, "--max_steps=10", "--save_steps=2", "--eval_steps=100", "--max_nonfinite=1",
                  env={"GPT_TEST_NAN_AT_STEPS": "5"}, check=False)
    assert p.returncode == 3 and "warning: could not save" in p.stdout
    newest = out / "checkpoints" / "checkpoint_epoch1_step4.pt"
    assert f"the emergency checkpoint could not be written; the newest on disk is {newest} (step 4), a resume " \
           "repeats the steps after it." in p.stdout
    command = p.stdout.split("Resume with: ")[1].splitlines()[0] if "Resume with: " in p.stdout else None
    assert command is None  # a non-finite stop asks for changed settings, not the same command
    # An interruption prints the command to resume, quoted for a shell.
    proc = subprocess.Popen(train_cmd(out, bins, "--max_steps=10", "--save_steps=2", "--eval_steps=100"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "GPT_TEST_STEP_DELAY": "1.0"})  # 4 s left to see step 6
    deadline = time.time() + 120
    while "step 6/10" not in (out / "train.log").read_text():
        assert time.time() < deadline and proc.poll() is None, killed_output(proc)
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "the emergency checkpoint could not be written; the newest on disk is" in stdout
    command = stdout.split("Resume with: ")[1].splitlines()[0]
    assert shlex.split(command) == ["python", "train.py", *train_cmd(out, bins)[2:],
                                    "--max_steps=10", "--save_steps=2", "--eval_steps=100",
                                    "--resume_from_checkpoint=latest"]
    # With no checkpoint on disk at all there is nothing to resume: the line gives the command as it was.
    fresh = tmp_path / "fresh"
    (fresh / "emergency_checkpoint.pt" / "in the way").mkdir(parents=True)
    args = ["--max_steps=10", "--save_steps=100", "--eval_steps=100"]
    proc = subprocess.Popen(train_cmd(fresh, bins, *args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "GPT_TEST_STEP_DELAY": "1.0"})
    while "step 2/10" not in ((fresh / "train.log").read_text() if (fresh / "train.log").exists() else ""):
        assert time.time() < deadline + 120 and proc.poll() is None, killed_output(proc)
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Resume with" not in stdout, stdout
    said = "the emergency checkpoint could not be written; there is no other checkpoint here, so the same command " \
           "starts this session again: "
    assert said in stdout, stdout
    assert shlex.split(stdout.split(said)[1].splitlines()[0]) == ["python", "train.py", *train_cmd(fresh, bins, *args)[2:]]


def test_max_runtime_stops_cleanly_with_a_checkpoint(tmp_path, bins):
    p = run_train(tmp_path / "out", bins, "--max_steps=1000", "--save_steps=1000", "--eval_steps=1000",
                  "--max_runtime=2", env={"GPT_TEST_STEP_DELAY": "0.05"})
    assert "max_runtime (2) reached at step" in p.stdout
    kept = ckpt.list_checkpoints(tmp_path / "out" / "checkpoints")
    assert len(kept) == 1 and 0 < ckpt.load_checkpoint(kept[0])["step"] < 1000
    # Counted from max_runtime_from (the notebook's session start) instead: an hour, of which the session has used
    # all but a few seconds before train.py starts. The resume command is for another session: without it.
    p = run_train(tmp_path / "from", bins, "--max_steps=1000", "--save_steps=1000", "--eval_steps=1000",
                  "--max_runtime=3600", f"--max_runtime_from={time.time() - 3598}")
    assert "max_runtime (3600) reached at step" in p.stdout and "max_runtime_from" not in p.stdout.split("Resume")[1]
    assert ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path / "from" / "checkpoints")[-1])["step"] < 1000


@pytest.mark.slow
def test_default_config_trains_on_cpu(tmp_path, bins):
    """The default model, at a batch of 2 x 512 (the model is the point, and 8 x 512 costs 20 s more)."""
    big = write_bins(tmp_path / "data", train_tokens=2 * 513 * 2 + 10, val_tokens=600)
    p = subprocess.run([sys.executable, "train.py", "config/kaggle_t4.py", f"--data_dir={big}",
                        f"--out_dir={tmp_path / 'out'}", "--batch_size=2", "--gradient_accumulation_steps=1",
                        "--max_steps=2", "--eval_iters=1", "--device=cpu", "--compile=False", "--sample_prompt=",
                        "--max_runtime="], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "19.32M parameters (6.32M without embeddings)" in p.stdout
    assert ckpt.list_checkpoints(tmp_path / "out" / "checkpoints")  # --out_dir moves the checkpoints with it
    assert (tmp_path / "out" / "final_model" / "model.safetensors").exists()


def test_init_from_a_model_without_biases_asks_for_no_export_at_the_start(tmp_path, bins, refused):
    """bias=False comes with the source's sizes: the export at the end would fail, so the start says so, as for
    --bias=False (not a warning after the whole run)."""
    src = tmp_path / "nobias.pt"
    source = GPT(GPTConfig(n_positions=32, n_embd=32, n_layer=2, n_head=2, n_inner=64, bias=False))
    ckpt.atomic_save({"format_version": 1, "model_state_dict": source.state_dict(), "epoch": 0, "step": 0,
                      "config": source.config.to_dict()}, src)
    cmd = [a for a in train_cmd(tmp_path / "out", bins, f"--init_from={src}") if a != "--export_final_model=False"]
    assert refused(cmd) == ("error: bias=False cannot be exported to final_model/ (HF GPT-2 has biases in every Linear "
                            "and LayerNorm): add --export_final_model=False, or train with bias=True\n")


@pytest.mark.parametrize("kind", ["hf_folder", "checkpoint"])
def test_init_from_takes_weights_and_sizes(tmp_path, bins, kind, refused):
    import export_hf
    from model import GPT, GPTConfig

    torch.manual_seed(1)
    source = GPT(GPTConfig(n_positions=32, n_embd=48, n_layer=3, n_head=4, n_inner=96))
    if kind == "hf_folder":
        src = tmp_path / "hf"
        export_hf.export_hf(source, src)
    else:
        src = tmp_path / "src.pt"
        ckpt.atomic_save({"format_version": 1, "model_state_dict": source.state_dict(), "epoch": 0, "step": 0,
                          "config": source.config.to_dict()}, src)
    out = tmp_path / "out"
    # Model sizes named on the command line that differ from the source's are refused, not overridden...
    err = refused(train_cmd(out, bins, f"--init_from={src}", "--max_steps=2"))
    assert err == f"error: init_from {src} is a model with n_embd=48, n_layer=3, n_head=4, n_inner=96; the model " \
                  "settings come from init_from: drop --n_embd=32 --n_layer=2 --n_head=2 --n_inner=64\n"
    # ...and without them the sizes come from the source (here n_positions=32 is given and agrees).
    sizes = ("--n_embd=", "--n_layer=", "--n_head=", "--n_inner=")
    cmd = [a for a in train_cmd(out, bins, f"--init_from={src}", "--max_steps=2", "--learning_rate=0.0",
                                "--min_lr=0.0", "--eval_steps=100", "--save_steps=2") if not a.startswith(sizes)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "model settings taken from it: n_embd=48, n_layer=3, n_head=4, n_inner=96" in p.stdout
    assert f"initialised weights from {src}" in p.stdout
    trained = final_state(out)
    assert trained["config"]["n_layer"] == 3
    for k, v in source.state_dict().items():
        assert torch.equal(trained["model_state_dict"][k], v), k  # learning rate 0: the weights are the source's
    if kind == "checkpoint":  # what follows does not depend on the kind of source: once is enough for CI's time
        return
    # A resume takes the sizes from its checkpoint: the source may be gone by then (another Kaggle session).
    src.rename(src.with_name("moved"))
    p = subprocess.run([a.replace("--max_steps=2", "--max_steps=4") for a in cmd], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "resumed from" in p.stdout and final_state(out)["step"] == 4
    # A max_length given on the command line is never silently lowered to the source's context.
    src.with_name("moved").rename(src)
    other = [a.replace(str(out), str(tmp_path / "other")) for a in cmd if not a.startswith("--n_positions=")]
    assert refused(other + ["--max_length=64"]) == \
        f"error: max_length (64) exceeds the n_positions (32) of init_from {src}; use --max_length=32 or less\n"
    # A checkpoint found by 'auto' resumes only the run it belongs to: not a run from scratch...
    scratch = tmp_path / "scratch"
    run_train(scratch, bins, "--max_steps=2", "--save_steps=2", "--eval_steps=100")
    assert f"is of a run started from init_from='scratch', not '{src}'" in refused(
        [a.replace(str(out), str(scratch)) for a in cmd])
    # ...and the init_from run, resumed without init_from, is told what to add: with other sizes, and with the
    # source's sizes given (it was taken as a run from scratch, whose next checkpoints then said so).
    same_sizes = [a for a in cmd if not a.startswith("--init_from=")] + ["--n_embd=48", "--n_layer=3", "--n_head=4",
                                                                         "--n_inner=96", "--max_steps=6"]
    for resume in (same_sizes, train_cmd(out, bins, "--max_steps=6")):
        err = refused(resume)
        assert f"is of a run started from init_from='{src}', not 'scratch': to resume that run use " \
               f"--init_from='{src}'" in err, err
