"""checkpoint.py: atomic saves under kill -9 and failed writes, rotation by step, low-disk behaviour,
load errors, discovery for resume, read-only sources, RNG state and a realistic weights_only round trip."""

import fractions
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint as ck
from checkpoint import CheckpointError
from model import GPT, GPTConfig, configure_optimizer

REPO = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=4, n_inner=48)


def state(step, epoch=0, numel=16, fill=None):
    """A minimal valid checkpoint dict whose weights are all `fill` (default: step), so a file can be
    checked for being whole and matching its step."""
    value = float(step if fill is None else fill)
    return {"model_state_dict": {"w": torch.full((numel,), value)}, "config": dict(TINY),
            "epoch": epoch, "step": step}


def assert_whole(path):
    """The file loads with weights_only and its weights match the step it claims."""
    c = ck.load_checkpoint(path)
    assert torch.all(c["model_state_dict"]["w"] == float(c["step"])), path
    return c


def temps(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp"))


def python(code, *args, prefix=(), **kwargs):
    """Run `code` in a fresh interpreter with the repo importable."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([*prefix, sys.executable, "-c", code, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120, **kwargs)


def snapshot(folder):
    """Names, sizes, mtimes and content hashes of everything under `folder`."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns,
                                         hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
            for p in sorted(Path(folder).rglob("*"))}


# --- atomic writes

def test_atomic_writes_round_trip_and_leave_no_temp(tmp_path):
    ck.atomic_write_json(tmp_path / "sub" / "h.json", [{"epoch": 1, "val_loss": 3.5}])
    ck.atomic_write_text(tmp_path / "t.txt", "héllo\n")
    ck.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    ck.atomic_write_json(tmp_path / "sub" / "h.json", {"replaced": True})
    assert (tmp_path / "sub" / "h.json").read_text() == '{\n  "replaced": true\n}\n'
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert temps(tmp_path) == temps(tmp_path / "sub") == []
    # The mode follows the umask like a plain open(), not mkstemp's private 0o600.
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "t.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_save_is_a_new_file_renamed_over_the_old_one_after_its_fsync(tmp_path, monkeypatch):
    first = ck.save_best(state(1), tmp_path)
    with open(first, "rb") as reader:  # a reader (sample.py, a resume) that opened the old file
        inode = os.fstat(reader.fileno()).st_ino
        ck.save_best(state(2), tmp_path)
        assert first.stat().st_ino != inode  # never rewritten in place: a crash could leave it half-written
        assert torch.load(reader, weights_only=True)["step"] == 1  # the reader still has the whole old one
    # Durable in this order: the file's data, then the rename, then the folder that holds the new name.
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):  # recorded, then done for real
        events.append("fsync folder" if Path(os.readlink(f"/proc/self/fd/{fd}")) == tmp_path else "fsync file")
        return real_fsync(fd)

    def replace(src, dst):
        events.append(f"rename to {Path(dst).name}")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ck.save_best(state(3), tmp_path)
    assert events == ["fsync file", f"rename to {ck.BEST_NAME}", "fsync folder"]


KILL_CHILD = """
import sys, torch
from pathlib import Path
from checkpoint import save_best, save_checkpoint
ckdir, out, step = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
w = torch.empty(4 << 20)  # 16 MiB: a save takes long enough to be killed in the middle of it
print("ready", flush=True)
while True:
    w.fill_(step)
    s = {"model_state_dict": {"w": w}, "config": {}, "epoch": 0, "step": step}
    save_checkpoint(s, ckdir, keep=2)
    save_best(s, out)  # overwrites a final name in place
    step += 1
"""


def test_json_is_written_strict_with_non_finite_numbers_as_null(tmp_path):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    record = {"step": 3, "train_loss": float("nan"), "val_perplexity": float("inf"), "more": [float("-inf"), 1.5]}
    ck.atomic_write_json(tmp_path / "h.json", [record])
    assert json.loads((tmp_path / "h.json").read_text(), parse_constant=refuse) == [
        {"step": 3, "train_loss": None, "val_perplexity": None, "more": [None, 1.5]}]


def test_kill_9_mid_save_never_leaves_a_partial_file_under_a_final_name(tmp_path):
    out, ckdir = tmp_path / "out", tmp_path / "out" / "checkpoints"
    ck.save_checkpoint(state(0), ckdir, keep=2)
    ck.save_best(state(0), out)
    ck.save_emergency(state(0), out)  # the child never writes this one: it must stay byte-identical
    emergency = (out / "emergency_checkpoint.pt").read_bytes()
    killed_mid_write = 0
    # Kills at plain delays land anywhere (between saves, mid-rotation); the others wait until a
    # temp file exists, so some kills surely land inside a write.
    for delay, while_writing in ((0.05, False), (0.45, False), (1.1, False), (0.0, True), (0.01, True), (0.03, True)):
        newest = ck.load_checkpoint(ck.list_checkpoints(ckdir)[-1])["step"]
        child = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(ckdir), str(out), str(newest + 1)],
                                 env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30
        while while_writing and not (temps(ckdir) or temps(out)) and time.monotonic() < deadline:
            time.sleep(0.0005)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        killed_mid_write += bool(temps(ckdir) or temps(out))
        finals = [p for p in [*ckdir.iterdir(), *out.iterdir()] if p.is_file() and not p.name.startswith(".")]
        assert ck.list_checkpoints(ckdir), "a checkpoint must always survive"
        for path in finals:
            assert_whole(path)
        assert (out / "emergency_checkpoint.pt").read_bytes() == emergency
    assert killed_mid_write >= 1  # the test really killed a save in the middle
    # The next save cleans up what the dead processes left, keeping everything loadable.
    newest = ck.load_checkpoint(ck.list_checkpoints(ckdir)[-1])["step"]
    ck.save_checkpoint(state(newest + 1), ckdir, keep=2)
    ck.save_best(state(newest + 1), out)
    assert temps(ckdir) == temps(out) == []
    assert [assert_whole(p)["step"] for p in ck.list_checkpoints(ckdir)] == [newest, newest + 1]


def test_temps_of_a_live_process_are_not_touched(tmp_path):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        live = tmp_path / f".best_model.pt.{sleeper.pid}.0123abcd.tmp"
        live.write_bytes(b"in progress")
        # Left by a killed process whose pid is now this one's (a new session), and by one whose pid another
        # process has taken since: untouched for over an hour.
        own = tmp_path / f".best_model.pt.{os.getpid()}.4567abcd.tmp"
        own.write_bytes(b"left by a killed process")
        reused = tmp_path / f".checkpoint_epoch1_step2.pt.{sleeper.pid}.89abcdef.tmp"
        reused.write_bytes(b"left long ago")
        hours_ago = time.time() - 2 * ck.STALE_TEMP_AGE_S
        os.utime(reused, (hours_ago, hours_ago))
        huge = tmp_path / f".best_model.pt.{10 ** 20}.0123abcd.tmp"  # no process has a pid this large (not an error)
        huge.write_bytes(b"?")
        ck.save_best(state(1), tmp_path)
        assert live.exists() and not own.exists() and not reused.exists() and not huge.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


FSIZE_CHILD = """
import resource, signal, sys
import torch
from checkpoint import CheckpointError, save_checkpoint
# A real failed write: writes past 1 MiB fail with EFBIG instead of killing the process.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    big = {"model_state_dict": {"w": torch.full((1 << 19,), 2.0)}, "config": {}, "epoch": 0, "step": 2}
    save_checkpoint(big, sys.argv[1], keep=1)  # 2 MiB of weights
except CheckpointError as e:
    print(e)
try:
    save_checkpoint(big, sys.argv[1] + "-first", keep=1)  # a run's first: no earlier checkpoint to speak of
except CheckpointError as e:
    print(e)
from checkpoint import atomic_write_json
atomic_write_json(sys.argv[1] + "/eval_history.json", [{"step": 1, "val_loss": 2.0}])  # small: written
try:
    atomic_write_json(sys.argv[1] + "/eval_history.json", [{"step": 1, "val_loss": 2.0}] * 40000)
except CheckpointError as e:
    print(e)
"""


def test_failed_write_is_one_line_removes_its_temp_and_keeps_old_checkpoints(tmp_path):
    ckdir = tmp_path / "checkpoints"
    old = ck.save_checkpoint(state(1), ckdir, keep=1)
    before = old.read_bytes()
    p = python(FSIZE_CHILD, ckdir)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 3, p.stdout
    assert lines[0].startswith(f"could not save {ckdir / 'checkpoint_epoch0_step2.pt'}: File too large;")
    assert "earlier checkpoints are intact" in lines[0] and "free disk space" in lines[0]
    assert lines[1] == f"could not save {ckdir}-first/checkpoint_epoch0_step2.pt: File too large; nothing was " \
                       f"written; free disk space or lower max_checkpoints"
    assert lines[2] == f"could not save {ckdir / 'eval_history.json'}: File too large; the eval_history.json " \
                       f"there before is intact; free disk space"
    assert sorted(os.listdir(ckdir)) == sorted([old.name, "eval_history.json"])  # temps removed, old one kept
    assert json.loads((ckdir / "eval_history.json").read_text()) == [{"step": 1, "val_loss": 2.0}]
    assert old.read_bytes() == before and assert_whole(old)["step"] == 1
    # Training goes on: the next save (here without the limit) succeeds and only then rotates.
    new = ck.save_checkpoint(state(2, numel=1 << 19), ckdir, keep=1)
    assert ck.list_checkpoints(ckdir) == [new] and assert_whole(new)["step"] == 2


# --- rotation and disk space

def test_list_and_rotate_go_by_step_not_file_time_and_ignore_other_files(tmp_path):
    steps = [900, 1000, 100, 5500, 6500]  # 900 vs 1000: a name sort would get this wrong
    for i, step in enumerate(steps):
        path = ck.save_checkpoint(state(step, epoch=step // 1000), tmp_path, keep=10)
        mtime = 2_000_000_000 - step * 1000  # the highest step gets the OLDEST mtime
        os.utime(path, (mtime, mtime))
    decoys = ["checkpoint_epoch1_step5.pt.bak", "checkpoint_epoch1_step5.pth", "notes.txt",
              "xcheckpoint_epoch1_step1.pt", "best_model.pt", "emergency_checkpoint.pt"]
    for name in decoys:
        (tmp_path / name).write_bytes(b"not mine")
    (tmp_path / "checkpoint_epoch9_step9999.pt").mkdir()  # a folder with the name is not a checkpoint
    assert [ck.load_checkpoint(p)["step"] for p in ck.list_checkpoints(tmp_path)] == sorted(steps)
    assert ck.checkpoint_path(tmp_path, 6, 6500) == tmp_path / "checkpoint_epoch6_step6500.pt"

    deleted = ck.rotate_checkpoints(tmp_path, keep=2)
    assert [p.name for p in deleted] == ["checkpoint_epoch0_step100.pt", "checkpoint_epoch0_step900.pt",
                                         "checkpoint_epoch1_step1000.pt"]
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["checkpoint_epoch5_step5500.pt",
                                                               "checkpoint_epoch6_step6500.pt"]
    assert all((tmp_path / name).read_bytes() == b"not mine" for name in decoys)
    assert (tmp_path / "checkpoint_epoch9_step9999.pt").is_dir()
    with pytest.raises(CheckpointError, match="max_checkpoints must be an integer >= 1"):
        ck.rotate_checkpoints(tmp_path, keep=0)
    with pytest.raises(CheckpointError, match="max_checkpoints must be an integer >= 1, got None"):
        ck.save_checkpoint(state(7000), tmp_path, keep=None)
    assert not ck.checkpoint_path(tmp_path, 0, 7000).exists()  # refused before writing anything


def test_save_never_rotates_out_the_checkpoint_it_just_wrote(tmp_path):
    # Higher-step leftovers from another run must not make a fresh run delete its own new checkpoint.
    for step in (3500, 4500):
        ck.save_checkpoint(state(step), tmp_path, keep=2)
    new = ck.save_checkpoint(state(1000), tmp_path, keep=2)
    assert new.exists() and assert_whole(new)["step"] == 1000
    assert len(ck.list_checkpoints(tmp_path)) == 3


def small_disk(monkeypatch, folder, capacity):
    """Make shutil.disk_usage report a disk of `capacity` bytes holding what is in `folder` (the real
    disk is too big to fill in a test; the files and deletions stay real)."""
    def usage(path):
        used = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
        return shutil._ntuple_diskusage(capacity, used, max(capacity - used, 0))
    monkeypatch.setattr(shutil, "disk_usage", usage)


def test_low_disk_rotates_oldest_first_before_saving(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    ckdir = out / "checkpoints"
    for step in (1, 2, 3, 4):
        ck.save_checkpoint(state(step, numel=1 << 16), ckdir, keep=4)
    ck.save_best(state(2, numel=1 << 16), out)
    size = ck.list_checkpoints(ckdir)[-1].stat().st_size
    # Free space is half a checkpoint: deleting the oldest one is enough.
    small_disk(monkeypatch, ckdir, 4 * size + size // 2)
    ck.save_checkpoint(state(5, numel=1 << 16), ckdir, keep=4)
    assert [ck.load_checkpoint(p)["step"] for p in ck.list_checkpoints(ckdir)] == [2, 3, 4, 5]
    err = capsys.readouterr().err
    assert "low disk" in err and "checkpoint_epoch0_step1.pt" in err

    # A disk too small for anything: everything but the newest goes, never the newest or best_model.pt.
    small_disk(monkeypatch, ckdir, 0)
    ck.save_checkpoint(state(6, numel=1 << 16), ckdir, keep=4)
    assert [ck.load_checkpoint(p)["step"] for p in ck.list_checkpoints(ckdir)] == [5, 6]
    assert ck.load_checkpoint(out / "best_model.pt")["step"] == 2

    # The only checkpoint is never deleted to make room.
    for p in ck.list_checkpoints(ckdir)[:-1]:
        p.unlink()
    ck.save_checkpoint(state(7, numel=1 << 16), ckdir, keep=4)
    assert [ck.load_checkpoint(p)["step"] for p in ck.list_checkpoints(ckdir)] == [6, 7]


def test_a_rotated_save_first_removes_a_dead_writers_temp_file_in_out_dir(tmp_path, monkeypatch, capsys):
    """A kill -9 in the middle of an emergency save leaves its temp file in out_dir, as large as a checkpoint. The
    next rotated save (checkpoint_dir on the same disk) removes it before it counts the free space: no checkpoint
    is deleted for room that a dead file held."""
    out = tmp_path / "out"
    ckdir = out / "checkpoints"
    for step in (1, 2):
        ck.save_checkpoint(state(step, numel=1 << 16), ckdir, keep=4, out_dir=out)
    size = ck.list_checkpoints(ckdir)[-1].stat().st_size
    ended = subprocess.Popen(["true"])
    ended.wait()
    dead = out / f".emergency_checkpoint.pt.{ended.pid}.0123abcd.tmp"
    dead.write_bytes(bytes(size))
    small_disk(monkeypatch, out, 3 * size + size // 2)  # half a checkpoint free, with the dead file
    ck.save_checkpoint(state(3, numel=1 << 16), ckdir, keep=4, out_dir=out)
    assert not dead.exists() and [assert_whole(p)["step"] for p in ck.list_checkpoints(ckdir)] == [1, 2, 3]
    assert "low disk" not in capsys.readouterr().err


def test_low_disk_makes_room_for_best_and_emergency_saves_too(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    ckdir = out / "checkpoints"
    for step in (1, 2, 3, 4):
        ck.save_checkpoint(state(step, numel=1 << 16), ckdir, keep=4)
    size = ck.list_checkpoints(ckdir)[-1].stat().st_size
    ended = subprocess.Popen(["true"])
    ended.wait()
    dead = out / f".best_model.pt.{ended.pid}.0123abcd.tmp"  # what a writer killed mid-save left: a whole checkpoint
    dead.write_bytes(bytes(size))
    # Half a checkpoint free: removing the dead writer's temp file is room enough, no checkpoint goes.
    small_disk(monkeypatch, out, 5 * size + size // 2)
    ck.save_best(state(4, numel=1 << 16), out, ckdir)
    assert not dead.exists() and [assert_whole(p)["step"] for p in ck.list_checkpoints(ckdir)] == [1, 2, 3, 4]
    assert "low disk" not in capsys.readouterr().err
    # Half a checkpoint free again: the oldest rotated checkpoint makes room for each save.
    ck.save_emergency(state(5, numel=1 << 16), out, ckdir)
    ck.save_best(state(6, numel=1 << 16), out, ckdir)
    assert [assert_whole(p)["step"] for p in ck.list_checkpoints(ckdir)] == [3, 4]
    assert "deleted checkpoint_epoch0_step1.pt" in capsys.readouterr().err
    assert assert_whole(out / "emergency_checkpoint.pt")["step"] == 5 and assert_whole(out / "best_model.pt")["step"] == 6
    # The newest rotated one goes only where a best or emergency checkpoint in out_dir is as far on (a resume would
    # take that one): here best_model.pt (step 6) is, and step 4 makes room for the next best.
    small_disk(monkeypatch, out, 0)
    ck.save_best(state(7, numel=1 << 16), out, ckdir)
    assert ck.list_checkpoints(ckdir) == [] and assert_whole(out / "best_model.pt")["step"] == 7
    # Without checkpoint_dir (a caller that has none), nothing is deleted.
    ck.save_checkpoint(state(8, numel=1 << 16), ckdir, keep=4)
    ck.save_best(state(9, numel=1 << 16), out)
    assert [assert_whole(p)["step"] for p in ck.list_checkpoints(ckdir)] == [8]
    # A rotated save told out_dir: best_model.pt (9) is as far on as the newest, 8, which goes; then the new newest,
    # 10, is further on than anything in out_dir, and stays for the next best.
    ck.save_checkpoint(state(10, numel=1 << 16), ckdir, keep=4, out_dir=out)
    ck.save_best(state(11, numel=1 << 16), out, ckdir)
    assert [assert_whole(p)["step"] for p in ck.list_checkpoints(ckdir)] == [10]
    # A best_model.pt as far on, but damaged inside (its header reads; its checksums do not match), covers nothing.
    data = bytearray((out / "best_model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "best_model.pt").write_bytes(bytes(data))
    ck.save_emergency(state(12, numel=1 << 16), out, ckdir)
    assert [assert_whole(p)["step"] for p in ck.list_checkpoints(ckdir)] == [10]


def test_an_emergency_checkpoint_the_run_has_gone_past_is_deleted_at_its_next_rotated_save(tmp_path, capsys):
    """An interrupted session's emergency checkpoint (232 MB for the default model), resumed and gone past (or only
    caught up with: the resume of a stop in the last step's evaluation saves that step), would otherwise ride along
    in the output for good (on Kaggle, copied into every later session)."""
    out = tmp_path / "out"
    ck.save_emergency({**state(5), "run_id": "a"}, out)
    for new in ({**state(4), "run_id": "a"}, {**state(6), "run_id": "b"}, state(6)):  # behind it, or not its run
        ck.save_checkpoint(new, out / "checkpoints", keep=4, out_dir=out)
        assert (out / "emergency_checkpoint.pt").is_file()
    ck.save_checkpoint({**state(6), "run_id": "a"}, out / "checkpoints", keep=4)  # (no out_dir given: not looked at)
    assert (out / "emergency_checkpoint.pt").is_file()
    ck.save_checkpoint({**state(5), "run_id": "a"}, out / "checkpoints", keep=4, out_dir=out)
    assert not (out / "emergency_checkpoint.pt").exists()
    assert "deleted emergency_checkpoint.pt (step 5): checkpoint_epoch0_step5.pt has the same run as far on" in \
        capsys.readouterr().err


def test_low_disk_deletes_nothing_on_another_disk(tmp_path, monkeypatch):
    """Rotated checkpoints on one filesystem are not deleted for a save on another: that frees nothing there."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a /dev/shm on another filesystem than the tests' temp folder")
    ckdir = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        ck.save_checkpoint(state(step, numel=1 << 16), ckdir, keep=4)
    out = Path(tempfile.mkdtemp(dir=shm))
    try:
        small_disk(monkeypatch, tmp_path, 0)
        ck.save_best(state(3, numel=1 << 16), out, ckdir)
        assert [assert_whole(p)["step"] for p in ck.list_checkpoints(ckdir)] == [1, 2, 3]
        ck.save_best(state(3, numel=1 << 16), tmp_path, ckdir)  # the same disk: the oldest go
        assert [assert_whole(p)["step"] for p in ck.list_checkpoints(ckdir)] == [3]
    finally:
        shutil.rmtree(out)


# --- loading

def damage(path, value):
    """Zero some of the weight bytes inside a whole checkpoint (torch.load alone would not notice)."""
    data = path.read_bytes()
    at = data.index(np.float32(value).tobytes() * 64)
    path.write_bytes(data[:at] + bytes(256) + data[at + 256:])


def write_bad(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "truncated":
        ck.atomic_save({**state(5, numel=4096), "format_version": ck.FORMAT_VERSION}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "garbage":
        path.write_bytes(b"this is not a checkpoint\n" * 50)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "a_plain_zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/notes.txt", "a zip, but not from torch.save")
    elif kind == "bit_rot":
        ck.atomic_save({**state(5, numel=4096), "format_version": ck.FORMAT_VERSION}, path)
        damage(path, 5.0)
    elif kind == "damaged_end_record":  # a byte flipped in the zip64 end locator at the file's end: its disk number
        ck.atomic_save({**state(5), "format_version": ck.FORMAT_VERSION}, path)
        data = bytearray(path.read_bytes())
        data[data.rindex(b"PK\x06\x07") + 4] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "a_list":
        torch.save([1, 2, 3], path)
    elif kind == "missing_keys":
        torch.save({"model_state_dict": {}, "epoch": 1}, path)
    elif kind == "newer_format":
        torch.save({**state(5), "format_version": ck.FORMAT_VERSION + 1}, path)
    elif kind == "pickled_object":
        torch.save({**state(5), "format_version": ck.FORMAT_VERSION, "train_loss": fractions.Fraction(1, 3)}, path)
    elif kind == "a_folder":
        path.mkdir()
    return path


BAD = {
    "missing": "no checkpoint at",
    "truncated": "is truncated or not a PyTorch checkpoint",
    "garbage": "is truncated or not a PyTorch checkpoint",
    "empty": "is truncated or not a PyTorch checkpoint",
    "a_plain_zip": "is corrupt (Expected hasRecord(\"version\")",
    "bit_rot": "is corrupt (checksum mismatch in archive/data/0)",
    "damaged_end_record": "is corrupt (zipfiles that span multiple disks are not supported)",
    "a_list": "holds a list, not a checkpoint dict",
    "missing_keys": "missing format_version, config, step",
    "newer_format": f"has checkpoint format {ck.FORMAT_VERSION + 1} but this code reads up to "
                    f"{ck.FORMAT_VERSION}; update the code",
    "pickled_object": "holds Python objects that weights_only loading refuses",
    "a_folder": "is not a file",
}


@pytest.mark.parametrize("kind", BAD)
def test_bad_files_give_one_line_errors_naming_them(tmp_path, kind):
    path = write_bad(tmp_path, kind)
    for load in (ck.load_checkpoint, lambda p: ck.find_checkpoint(str(p), tmp_path / "c", tmp_path / "o")):
        with pytest.raises(CheckpointError) as e:
            load(path)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and BAD[kind] in msg, msg


# --- discovery

def test_find_checkpoint_latest_goes_by_stored_step_with_ties_emergency_rotated_best(tmp_path):
    out = tmp_path / "out"
    ckdir = out / "checkpoints"
    for step in (100, 300):
        ck.save_checkpoint(state(step), ckdir, keep=4)
    ck.save_best(state(200), out)
    ck.save_emergency(state(250), out)
    assert ck.find_checkpoint("latest", ckdir, out) == ckdir / "checkpoint_epoch0_step300.pt"
    assert ck.find_checkpoint("auto", ckdir, out) == ckdir / "checkpoint_epoch0_step300.pt"
    ck.save_emergency(state(400), out)  # interrupted after the last rotated save
    assert ck.find_checkpoint("latest", ckdir, out) == out / "emergency_checkpoint.pt"
    ck.save_emergency(state(300), out)
    assert ck.find_checkpoint("latest", ckdir, out) == out / "emergency_checkpoint.pt"
    (out / "emergency_checkpoint.pt").unlink()
    ck.save_best(state(300), out)
    assert ck.find_checkpoint("latest", ckdir, out) == ckdir / "checkpoint_epoch0_step300.pt"
    ck.save_best(state(301), out)
    assert ck.find_checkpoint("latest", ckdir, out) == out / "best_model.pt"
    # A path is taken as given, even when it is not the newest.
    old = ckdir / "checkpoint_epoch0_step100.pt"
    assert ck.find_checkpoint(str(old), ckdir, out) == old


def test_find_checkpoint_skips_truncated_or_damaged_newest_with_a_warning(tmp_path, capsys):
    ckdir = tmp_path / "checkpoints"
    for step in (100, 200):
        ck.save_checkpoint(state(step), ckdir, keep=4)
    bad = ck.save_checkpoint(state(900, numel=4096), ckdir, keep=4)
    bad.write_bytes(bad.read_bytes()[:1000])  # truncated behind our back
    damage(ck.save_emergency(state(950, numel=4096), tmp_path), 950.0)  # readable, but bad bytes inside
    for spec in ("latest", "auto"):
        assert ck.find_checkpoint(spec, ckdir, tmp_path) == ckdir / "checkpoint_epoch0_step200.pt"
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
        assert len(warnings) == 2
        assert str(bad) in warnings[0] or str(bad) in warnings[1]
        assert any(str(tmp_path / "emergency_checkpoint.pt") in w for w in warnings)


def test_find_checkpoint_with_nothing_to_resume(tmp_path):
    ckdir, out = tmp_path / "none" / "checkpoints", tmp_path / "none"
    assert ck.find_checkpoint(None, ckdir, out) is None
    assert ck.find_checkpoint("", ckdir, out) is None
    assert ck.find_checkpoint("auto", ckdir, out) is None
    with pytest.raises(CheckpointError, match="no checkpoint in .*give the path of one kept elsewhere .*'auto' to start"):
        ck.find_checkpoint("latest", ckdir, out)
    with pytest.raises(CheckpointError, match="no checkpoint at lastest; did you mean 'latest'"):
        ck.find_checkpoint("lastest", ckdir, out)  # a typo is a missing path, with the hint
    # Checkpoints that exist but are all unreadable are an error, not a silent fresh start.
    ckdir.mkdir(parents=True)
    (ckdir / "checkpoint_epoch0_step5.pt").write_bytes(b"junk")
    for spec in ("auto", "latest"):
        with pytest.raises(CheckpointError, match="none of the 1 checkpoint files.*they are kept.*use another out_dir"):
            ck.find_checkpoint(spec, ckdir, out)
    # Sampling and evaluation get their own way on, not training's.
    with pytest.raises(CheckpointError, match="they are kept.*: give a model by path with --checkpoint PATH"):
        ck.find_model_checkpoint("latest", out)
    assert (ckdir / "checkpoint_epoch0_step5.pt").read_bytes() == b"junk"


def test_a_name_inside_the_run_without_its_folder_is_pointed_to(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    best = ck.save_best(state(10), out)
    with pytest.raises(CheckpointError, match=f"no checkpoint at best_model.pt .*did you mean {best}"):
        ck.find_model_checkpoint("best_model.pt", out)
    with pytest.raises(CheckpointError, match="no checkpoint at other.pt; check the path"):
        ck.find_model_checkpoint("other.pt", out)


# --- read-only sources (a Kaggle input dataset)

def make_read_only_source(tmp_path):
    src = tmp_path / "input"
    ck.save_checkpoint(state(6500, epoch=3), src, keep=4)
    ck.save_best(state(6000, epoch=3), src)
    for p in src.iterdir():
        p.chmod(0o444)
    src.chmod(0o555)
    return src


def test_resume_from_read_only_folder_writes_nothing_there(tmp_path):
    # Root ignores 0o555, so this checks the result instead: nothing in the source changes or appears.
    src = make_read_only_source(tmp_path)
    out = tmp_path / "out"
    ckdir = out / "checkpoints"
    elsewhere = out / "checkpoint_epoch0_step1.pt"  # a checkpoint-named file outside checkpoint_dir
    ck.atomic_save({**state(1), "format_version": ck.FORMAT_VERSION}, elsewhere)
    before = snapshot(src)
    try:
        path = ck.find_checkpoint(str(src / "checkpoint_epoch3_step6500.pt"), ckdir, out)
        assert ck.load_checkpoint(path)["step"] == 6500
        assert ck.find_checkpoint("latest", src, src) == src / "checkpoint_epoch3_step6500.pt"
        for step in (6600, 6700, 6800):
            ck.save_checkpoint(state(step, epoch=3), ckdir, keep=1)
        ck.save_best(state(6700, epoch=3), out)
    finally:
        src.chmod(0o755)
    assert snapshot(src) == before
    assert [p.name for p in ck.list_checkpoints(ckdir)] == ["checkpoint_epoch3_step6800.pt"]
    assert assert_whole(elsewhere)["step"] == 1


READ_ONLY_CHILD = """
import sys
from pathlib import Path
import checkpoint as ck
src, out = Path(sys.argv[1]), Path(sys.argv[2])
try:
    (src / "probe").write_text("x")
    sys.exit("the source folder is writable: this test would prove nothing")
except PermissionError:
    pass
path = ck.find_checkpoint(str(src / "checkpoint_epoch3_step6500.pt"), out / "checkpoints", out)
c = ck.load_checkpoint(path)
assert ck.find_checkpoint("latest", src, src) == path
c["step"] += 1
print(ck.save_checkpoint(c, out / "checkpoints", keep=4).name)
"""


def test_resume_from_a_truly_read_only_folder(tmp_path):
    # Enforce the permissions even for root: in a new user namespace root loses its bypass.
    if os.geteuid() != 0:
        prefix = []
    elif shutil.which("unshare") and subprocess.run(["unshare", "--user", "true"]).returncode == 0:
        prefix = ["unshare", "--user"]
    else:
        pytest.skip("running as root without user namespaces: permissions cannot be enforced here")
    src = make_read_only_source(tmp_path)
    try:
        p = python(READ_ONLY_CHILD, src, tmp_path / "out", prefix=prefix)
    finally:
        src.chmod(0o755)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "checkpoint_epoch3_step6501.pt"


# --- RNG state, model weights, a realistic round trip

def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.seed(2)
    np.random.randn()  # and in numpy's
    torch.manual_seed(3)
    ck.atomic_save({"rng": ck.capture_rng_state()}, tmp_path / "rng.pt")

    def draw():
        return (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist())

    expected = draw()
    draw()
    ck.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert draw() == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_state_round_trips(tmp_path):
    torch.cuda.manual_seed_all(4)
    ck.atomic_save({"rng": ck.capture_rng_state()}, tmp_path / "rng.pt")
    expected = torch.rand(3, device="cuda").tolist()
    ck.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True, map_location="cuda")["rng"])
    assert torch.rand(3, device="cuda").tolist() == expected


def test_unwrapped_state_dict_strips_compile_and_ddp_wrappers(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = GPT(GPTConfig(**TINY))
    bare = model.state_dict()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        for wrapped in (torch.compile(model), DDP(model), torch.compile(DDP(model)), DDP(torch.compile(model))):
            assert list(wrapped.state_dict()) != list(bare)  # the wrapper really adds a prefix
            sd = ck.unwrapped_state_dict(wrapped)
            assert list(sd) == list(bare) and all(torch.equal(sd[k], bare[k]) for k in bare)
    finally:
        dist.destroy_process_group()


def train_step(model, optimizer, scheduler, generator=None):
    x = torch.randint(0, TINY["vocab_size"], (2, TINY["n_positions"] + 1), generator=generator)
    _, loss = model(x[:, :-1], targets=x[:, 1:].contiguous())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return loss.item()


def test_realistic_checkpoint_loads_with_weights_only_and_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    config = GPTConfig(**TINY)
    model = GPT(config)
    optimizer = configure_optimizer(model, learning_rate=1e-3, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    scaler = torch.amp.GradScaler("cpu")
    losses = [train_step(model, optimizer, scheduler) for _ in range(2)]
    state = {
        "model_state_dict": ck.unwrapped_state_dict(torch.compile(model)),
        "optimizer_state_dict": optimizer.state_dict(), "scheduler_state_dict": scheduler.state_dict(),
        "scaler_state_dict": scaler.state_dict(), "epoch": 1, "step": 2, "train_loss": losses[-1],
        "val_loss": 4.5, "best_val_loss": 4.5, "tokens_seen": 64,
        "config": {**config.to_dict(), "learning_rate": 1e-3, "out_dir": str(tmp_path), "dtype": "float32"},
        "data_state": {"epoch": 1, "position": 4, "seed": 1337}, "rng_state": ck.capture_rng_state(),
        "batch_size": 2, "gradient_accumulation_steps": 1,
    }
    path = ck.save_best(state, tmp_path)
    next_loss = train_step(model, optimizer, scheduler)

    # The guide's snippet: torch.load's default is weights_only=True since torch 2.6; also ask explicitly.
    checkpoint = torch.load(path)
    assert torch.load(path, weights_only=True)["format_version"] == ck.FORMAT_VERSION
    restored = GPT(GPTConfig.from_dict(checkpoint["config"]))
    restored.load_state_dict(checkpoint["model_state_dict"])
    assert f"{checkpoint['train_loss']:.4f}" == f"{losses[-1]:.4f}" and checkpoint["epoch"] == 1

    # Resume: a fresh optimizer/scheduler/scaler take their states; the next step is bit-identical.
    # Order matters: building a LambdaLR resets the lr in the optimizer's groups, so load the
    # optimizer state after building the scheduler.
    c = ck.load_checkpoint(path)
    opt2 = configure_optimizer(restored, learning_rate=1e-3, weight_decay=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: min(1.0, (s + 1) / 10))
    opt2.load_state_dict(c["optimizer_state_dict"])
    sched2.load_state_dict(c["scheduler_state_dict"])
    torch.amp.GradScaler("cpu").load_state_dict(c["scaler_state_dict"])
    ck.restore_rng_state(c["rng_state"])
    assert train_step(restored, opt2, sched2) == next_loss
    assert sched2.get_last_lr() == scheduler.get_last_lr()
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_run_without_a_best_model_yet_points_at_its_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no model at .*best_model.pt: train one with `python train.py`"):
        ck.find_model_checkpoint(None, tmp_path)
    ck.save_checkpoint(state(40), tmp_path / "checkpoints", keep=4)
    with pytest.raises(CheckpointError, match=r"best_model.pt, but .* holds checkpoints of a run: use --checkpoint "
                                              r"latest \(the newest of them\)"):
        ck.find_model_checkpoint(None, tmp_path)
    assert ck.find_model_checkpoint("latest", tmp_path) == ck.checkpoint_path(tmp_path / "checkpoints", 0, 40)


def test_latest_looks_again_when_its_checkpoint_is_rotated_away_before_it_is_read(tmp_path, monkeypatch):
    ck.save_checkpoint(state(40), tmp_path / "checkpoints", keep=1)
    real_load, loads = ck.load_checkpoint, []

    def a_run_rotates_first(path, map_location="cpu"):  # what a run still training there does, between the two
        if not loads:
            ck.save_checkpoint(state(50), tmp_path / "checkpoints", keep=1)  # step 40's file is deleted
        loads.append(path)
        return real_load(path, map_location)

    monkeypatch.setattr(ck, "load_checkpoint", a_run_rotates_first)
    path, loaded = ck.load_model_checkpoint("latest", tmp_path)
    assert loaded["step"] == 50 and path == ck.checkpoint_path(tmp_path / "checkpoints", 0, 50)
    assert [p.name for p in loads] == ["checkpoint_epoch0_step40.pt", "checkpoint_epoch0_step50.pt"]
    with pytest.raises(CheckpointError, match="no checkpoint at .*gone.pt"):  # a path is not looked for again
        ck.load_model_checkpoint(str(tmp_path / "gone.pt"), tmp_path)
