"""Checkpoints: atomic saves, rotation by step, discovery for resume, and RNG state capture.

Layout (the original guide's):
    out_dir/best_model.pt                                  lowest val loss so far, never rotated
    out_dir/emergency_checkpoint.pt                        written on interruption
    checkpoint_dir/checkpoint_epoch{E}_step{S}.pt          every save_steps, newest `keep` by step

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(..., weights_only=True)` and never needs to unpickle arbitrary objects.
"""

import difflib
import errno
import json
import math
import os
import random
import re
import secrets
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np

from cli import NO_ROOM, check_readable, say

# torch is imported by the functions that use it, not here: data.py writes its meta.json, and plot.py its PNG,
# with this module's atomic writes, and neither needs PyTorch's seconds of start-up (and hundreds of MB) for that.

FORMAT_VERSION = 1  # bump when the layout of the dict changes incompatibly

BEST_NAME = "best_model.pt"
EMERGENCY_NAME = "emergency_checkpoint.pt"
DEFAULT_OUT_DIR = "out"  # train.py's out_dir unless set; where sample.py, evaluate.py and export_hf.py look
CHECKPOINTS_SUBDIR = "checkpoints"  # the rotated checkpoints' folder in out_dir unless checkpoint_dir says otherwise
FINAL_MODEL_DIR = "final_model"  # the HuggingFace export at a run's end, in out_dir
# Only files with exactly this name are ever listed or rotated.
_CHECKPOINT_RE = re.compile(r"checkpoint_epoch(\d+)_step(\d+)\.pt")
# Temp files: ".{final name}.{pid}.{8 hex}.tmp" next to the final file, hidden and never matching the above.
_TEMP_RE = re.compile(r"\..+\.(\d+)\.[0-9a-f]{8}\.tmp")
# The keys every checkpoint of ours has and that resume and discovery rely on.
_REQUIRED_KEYS = ("format_version", "model_state_dict", "config", "epoch", "step")
_USE_ANOTHER = "use another checkpoint"


class CheckpointError(Exception):
    """A checkpoint could not be saved, found or loaded; the message is one line saying what to do."""


class NewerFormatError(CheckpointError):
    """A checkpoint of a newer format than this code reads: written by a newer version of this trainer."""


# --- atomic writes -----------------------------------------------------------------------------

class _FdWriter:
    """A minimal file object over a raw fd that keeps the OSError of a failed write.

    torch.save turns a failed write into a RuntimeError without errno ("unexpected pos ..."); writing
    through this object lets us report the real cause (disk full, file too large).
    """

    def __init__(self, fd):
        self.fd = fd
        self.error = None

    def write(self, data):
        view = memoryview(data).cast("B")
        size = len(view)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as e:
            self.error = e
            raise
        return size

    def flush(self):
        pass  # unbuffered: every write already went to the kernel


def _pid_alive(pid):
    if os.name == "nt":  # os.kill(pid, 0) there sends Ctrl-C (CTRL_C_EVENT is 0): never probe, keep (the age rule)
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # (a pid too large for the kernel: no process has it)
        return False
    except OSError:
        return True  # exists but belongs to someone else
    return True


# A temp entry untouched this long is a dead writer's even if its pid is alive again (another process).
STALE_TEMP_AGE_S = 3600.0


def remove_stale_temps(folder, pattern=_TEMP_RE):
    """Delete what killed writers left behind in `folder`: the entries whose name fullmatches `pattern`
    (group 1: the writer's pid) and whose writer is gone; a folder goes whole. Default: our temp files.

    Gone: its pid is not running; or is this process's own (a new session can be given the pid of the one
    that was killed, and this process writes one thing at a time and calls this before it starts); or the
    entry has not changed for STALE_TEMP_AGE_S (its pid now belongs to some other process).
    A kill -9 mid-save leaves a temp file as large as a checkpoint (export_hf: a temp folder as large as
    the model); over several interrupted sessions these would fill the disk.
    """
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    now = time.time()
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if not m:
            continue
        pid = int(m.group(1))
        try:
            idle = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if pid == os.getpid() or not _pid_alive(pid) or idle > STALE_TEMP_AGE_S:
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            except OSError:
                pass


def _fsync_dir(folder):
    """Make a rename durable. Some filesystems (network mounts) cannot fsync a folder; the file itself
    is already synced then, so that is not an error."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_error(path, err):
    reason = err.strerror or str(err)
    is_checkpoint = Path(path).suffix == ".pt"
    rotated = is_checkpoint and Path(path).name.startswith("checkpoint_")  # (lower max_checkpoints: fewer of them)
    if err.errno in NO_ROOM:
        fix = "free disk space or lower max_checkpoints" if rotated else "free disk space"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        where = "point checkpoint_dir/out_dir elsewhere" if is_checkpoint else "write to another folder"
        fix = f"make {Path(path).parent} writable or {where}"
    else:
        fix = "check the disk"
    if Path(path).exists():
        intact = f"the {Path(path).name} there before is intact"
    else:
        others = rotated and any(p != Path(path) for p in list_checkpoints(Path(path).parent))
        intact = "earlier checkpoints are intact" if others else "nothing was written"
    return CheckpointError(f"could not save {path}: {reason}; {intact}; {fix}")


def _temp_path(path):
    """The hidden temp file a write of `path` goes through (a name remove_stale_temps knows)."""
    path = Path(path)
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def check_writable(folder):
    """Create and remove a file in `folder` the way a save does; OSError if the folder refuses files (read-only)."""
    probe = _temp_path(Path(folder) / "write-test")
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    probe.unlink()


def _atomic_write(path, write):
    """Call write(file) on a temp file next to `path`, fsync it, rename it over `path`, fsync the folder.

    At every instant `path` is either its old content or the complete new one. On failure the temp
    file is removed and an OSError becomes a one-line CheckpointError; other errors propagate.
    """
    path = Path(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _save_error(path, e) from e
    remove_stale_temps(folder)
    tmp = _temp_path(path)
    writer = None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            writer = _FdWriter(fd)
            write(writer)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        err = writer.error if writer is not None and writer.error is not None else e
        if isinstance(err, OSError):
            raise _save_error(path, err) from e
        raise
    _fsync_dir(folder)


def atomic_write_bytes(path, data):
    """Write bytes to `path` atomically (see _atomic_write)."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text):
    """Write UTF-8 text to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    """Write `obj` as indented, strict JSON to `path` atomically: a float that is not finite (a diverged loss, its
    perplexity) is written as null, as JSON has no NaN or Infinity and strict readers refuse Python's."""
    def strict(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: strict(v) for k, v in o.items()}
        return [strict(v) for v in o] if isinstance(o, (list, tuple)) else o

    atomic_write_text(path, json.dumps(strict(obj), indent=2, allow_nan=False) + "\n")


def atomic_copy(src, path):
    """Copy file `src` to `path` atomically (see _atomic_write)."""
    with open(src, "rb") as f:
        _atomic_write(path, lambda out: shutil.copyfileobj(f, out, 1 << 20))


def atomic_save(obj, path):
    """torch.save `obj` to `path` atomically; a failed write raises CheckpointError, leaving `path` as it was."""
    import torch

    _atomic_write(path, lambda f: torch.save(obj, f))


# --- rotated checkpoints -----------------------------------------------------------------------

def checkpoint_path(checkpoint_dir, epoch, step):
    """checkpoint_dir/checkpoint_epoch{epoch}_step{step}.pt"""
    return Path(checkpoint_dir) / f"checkpoint_epoch{int(epoch)}_step{int(step)}.pt"


def _epoch_step(path):
    epoch, step = _CHECKPOINT_RE.fullmatch(path.name).groups()
    return int(epoch), int(step)


def list_checkpoints(checkpoint_dir):
    """Rotated checkpoint files in checkpoint_dir, oldest first by step (then epoch); [] if none."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _CHECKPOINT_RE.fullmatch(p.name) and p.is_file()]
    return sorted(found, key=lambda p: (_epoch_step(p)[1], _epoch_step(p)[0]))


def _delete(path):
    """Remove one rotated checkpoint; True if it is gone. A failure is reported, never fatal."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as e:
        say(f"warning: could not delete old checkpoint {path}: {e.strerror}")
        return False
    return True


def _check_keep(keep):
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        raise CheckpointError(f"max_checkpoints must be an integer >= 1, got {keep!r}")


def rotate_checkpoints(checkpoint_dir, keep, protect=None):
    """Delete all but the newest `keep` checkpoints (by step) in checkpoint_dir; returns the deleted paths.

    Touches nothing but files named checkpoint_epoch{E}_step{S}.pt directly in checkpoint_dir.
    `protect` (a path) is never deleted, even when older checkpoints from another run outnumber it.
    """
    _check_keep(keep)
    protect = Path(protect).resolve() if protect is not None else None
    old = list_checkpoints(checkpoint_dir)[:-keep]
    return [p for p in old if p.resolve() != protect and _delete(p)]


def _same_disk(a, b):
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


def _make_room(checkpoint_dir, target=None, out_dir=None):
    """Before a save into `target` (default: checkpoint_dir): remove dead writers' temp files there and in
    checkpoint_dir and out_dir (a killed emergency save's is as large as a checkpoint), then, if free disk is
    below the size of the newest rotated checkpoint, delete the oldest rotated ones until it is not (only when
    they are on target's disk: elsewhere deleting frees nothing there).

    Never deletes the newest, so at least one checkpoint always survives; unless out_dir holds a whole best or
    emergency checkpoint at its step or further on, which a resume would take instead (looked at only then).
    """
    target = Path(target or checkpoint_dir)
    for folder in {Path(checkpoint_dir), target, *([Path(out_dir)] if out_dir else [])}:
        remove_stale_temps(folder)
    existing = list_checkpoints(checkpoint_dir)
    if not existing or not _same_disk(checkpoint_dir, target):
        return
    need = existing[-1].stat().st_size
    for old in existing:
        free = shutil.disk_usage(target).free
        if free >= need or (old == existing[-1] and not _superseded(old, out_dir)):
            break
        if _delete(old):
            say(f"checkpoint: low disk ({free / 2**20:.0f} MiB free, a checkpoint is "
                f"{need / 2**20:.0f} MiB): deleted {old.name} before saving")


def _superseded(rotated, out_dir):
    """Whether out_dir holds a whole (checksums verified) best or emergency checkpoint at the step of rotated
    checkpoint `rotated` or further on: one a resume would take instead."""
    if out_dir is None:
        return False
    step = _epoch_step(rotated)[1]
    for stored, _, path, _ in _peek(_candidates(None, out_dir), warn=False):
        if stored >= step:
            try:
                _verify_checksums(path)
                return True
            except CheckpointError:
                pass
    return False


def _stamped(state):
    return {**state, "format_version": FORMAT_VERSION}


def save_checkpoint(state, checkpoint_dir, keep, out_dir=None):
    """Save `state` as checkpoint_dir/checkpoint_epoch{E}_step{S}.pt, then keep only the newest `keep`.

    Old checkpoints are deleted only after the new one is on disk, except when free disk is below the
    size of the newest checkpoint: then the oldest go first (never the newest, unless out_dir's best or emergency
    checkpoint is as far on) so the save can succeed. With out_dir, an emergency checkpoint there of an earlier step
    of the run, or of its step (an interrupted session's, resumed), is deleted too, once the new one is on disk.
    Raises CheckpointError when the save fails; earlier checkpoints are untouched then.
    """
    _check_keep(keep)
    path = checkpoint_path(checkpoint_dir, state["epoch"], state["step"])
    _make_room(checkpoint_dir, out_dir=out_dir)
    atomic_save(_stamped(state), path)
    rotate_checkpoints(checkpoint_dir, keep, protect=path)
    if out_dir is not None:
        _drop_passed_emergency(out_dir, state, path)
    return path


def _drop_passed_emergency(out_dir, state, saved):
    emergency = Path(out_dir) / EMERGENCY_NAME
    for stored, _, _, run_id in _peek([(emergency, 2)] if emergency.is_file() else [], warn=False):
        if stored <= state["step"] and run_id is not None and run_id == state.get("run_id") and _delete(emergency):
            say(f"checkpoint: deleted {emergency.name} (step {stored}): {saved.name} has the same run as far on")


def _save_in_out_dir(state, out_dir, name, checkpoint_dir):
    path = Path(out_dir) / name
    if checkpoint_dir is not None:
        _make_room(checkpoint_dir, out_dir, out_dir)
    atomic_save(_stamped(state), path)
    return path


def save_best(state, out_dir, checkpoint_dir=None):
    """Save `state` atomically as out_dir/best_model.pt (never rotated). With checkpoint_dir, a disk too full
    for it first loses the oldest rotated checkpoints there, as save_checkpoint does (never the newest)."""
    return _save_in_out_dir(state, out_dir, BEST_NAME, checkpoint_dir)


def save_emergency(state, out_dir, checkpoint_dir=None):
    """Save `state` atomically as out_dir/emergency_checkpoint.pt; checkpoint_dir: as for save_best."""
    return _save_in_out_dir(state, out_dir, EMERGENCY_NAME, checkpoint_dir)


def newest_checkpoint(checkpoint_dir, out_dir):
    """(stored step, path) of the checkpoint a resume ('auto') would start from, or None: for a message."""
    try:
        path = find_checkpoint("auto", checkpoint_dir, out_dir)
    except CheckpointError:
        return None
    return None if path is None else (peek_step(path), path)


# --- loading and discovery ---------------------------------------------------------------------

def _reason(e):
    """A short, one-line cause from a torch.load exception (whose messages run to paragraphs)."""
    text = re.sub(r"\x1b\[[0-9;]*m|^\[enforce fail at [^\]]*\][ .]*", "", str(e)).strip()
    if not text:
        return type(e).__name__
    return text.splitlines()[0].split(". ")[0][:200]


def _read(path, map_location, mmap):
    """torch.load(weights_only=True) + checks; every way a file can be bad becomes a CheckpointError.

    Tensor bytes are not checksummed here (torch.load never does); _verify_checksums does that.
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}; check the path")
    if not path.is_file():
        hf = " (a HuggingFace folder: train.py takes it as --init_from, sample.py and evaluate.py as --model_dir)" \
            if (Path(path) / "config.json").is_file() else ""
        raise CheckpointError(f"{path} is not a file; give the path of a .pt checkpoint{hf}")
    check_readable(path, CheckpointError)
    # torch.save writes a zip whose directory is at the very end: a file cut short has none.
    try:
        whole = zipfile.is_zipfile(path)
    except zipfile.BadZipFile as e:  # the end record is there but damaged (is_zipfile lets this one through)
        raise CheckpointError(f"{path} is corrupt ({_reason(e)}); {_USE_ANOTHER}") from e
    if not whole:
        raise CheckpointError(
            f"{path} is truncated or not a PyTorch checkpoint (no zip directory at its end); {_USE_ANOTHER}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"{path} holds Python objects that weights_only loading refuses, so this trainer did not "
                f"write it; load it yourself with weights_only=False only if you trust its source") from e
        raise CheckpointError(f"{path} is corrupt ({_reason(e)}); {_USE_ANOTHER}") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict of this trainer")
    missing = [k for k in _REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this trainer (missing {', '.join(missing)})")
    version = ckpt["format_version"]
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise NewerFormatError(
            f"{path} has checkpoint format {version} but this code reads up to {FORMAT_VERSION}; "
            f"update the code (git pull)")
    return ckpt


def _verify_checksums(path):
    """Check the CRC32 torch.save stores for every record, catching damaged bytes inside the file
    (bit rot, a bad copy) that torch.load would silently load as wrong weights. Reads the whole file."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as e:
        raise CheckpointError(f"{path} is corrupt ({_reason(e)}); {_USE_ANOTHER}") from e
    if bad is not None:
        raise CheckpointError(f"{path} is corrupt (checksum mismatch in {bad}); {_USE_ANOTHER}")


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint dict with torch.load(weights_only=True); CheckpointError if it is missing,
    truncated, corrupt (checksums are verified), not one of ours, or from a newer format.
    Never writes anything."""
    ckpt = _read(path, map_location, mmap=False)
    _verify_checksums(path)
    return ckpt


def peek_step(path):
    """The step stored in checkpoint `path`, read without loading its tensors (mmap)."""
    return int(_read(path, "cpu", mmap=True)["step"])


def peek_run_id(path):
    """The run id stored in checkpoint `path` (train.py draws one when a run starts, and every checkpoint of the
    run carries it), or None for a checkpoint from before run ids were stored."""
    return _read(path, "cpu", mmap=True).get("run_id")


def other_runs(checkpoint_dir, out_dir, run_id):
    """The readable checkpoint files (rotated, emergency, best) that store a run id other than run_id: another
    run's. A file without one (from before run ids were stored), or a run_id of None, matches any."""
    if run_id is None:
        return []
    return [path for _, _, path, other in _peek(_candidates(checkpoint_dir, out_dir), warn=False)
            if other not in (None, run_id)]


def peek_config(path):
    """The run config stored in checkpoint `path`, read without loading its tensors (mmap)."""
    return _read(path, "cpu", mmap=True)["config"]


def _candidates(checkpoint_dir, out_dir):
    """(path, tie rank) of every checkpoint file 'latest' considers: emergency > rotated > best on a tie."""
    found = [(p, 1) for p in list_checkpoints(checkpoint_dir)] if checkpoint_dir is not None else []
    if out_dir is not None:
        found += [(Path(out_dir) / name, rank) for name, rank in ((EMERGENCY_NAME, 2), (BEST_NAME, 0))
                  if (Path(out_dir) / name).is_file()]
    return found


def _peek(candidates, warn, unreadable=None):
    """(stored step, tie rank, path, stored run id or None) of the candidates whose header reads (mmap, cheap); the
    others are skipped, with a warning on stderr if warn, and their (path, CheckpointError) appended to unreadable."""
    readable = []
    for path, rank in candidates:
        try:
            state = _read(path, "cpu", mmap=True)
            readable.append((state["step"], rank, path, state.get("run_id")))
        except CheckpointError as e:
            if warn:
                say(f"warning: skipping checkpoint: {e}")
            if unreadable is not None:
                unreadable.append((path, e))
    return readable


def find_checkpoint(spec, checkpoint_dir, out_dir, fix="to train afresh, use another out_dir (or move them away)"):
    """Resolve resume_from_checkpoint to a path, or None to start fresh.

    spec: '' or None -> None; a path -> that file (CheckpointError if missing or unreadable);
    'latest' -> the valid checkpoint with the highest stored step among checkpoint_dir's rotated ones,
    out_dir/emergency_checkpoint.pt and out_dir/best_model.pt (ties: emergency, rotated, best),
    skipping unreadable files with a warning on stderr; CheckpointError if there is none;
    'auto' -> like 'latest', but None when no checkpoint file exists at all.
    fix: the advice when none of the files found can be loaded (the caller's way on).
    Candidates are peeked with mmap (cheap); only the one chosen is read in full to verify checksums.
    """
    if spec is None or spec == "":
        return None
    if not (isinstance(spec, str) and spec in ("latest", "auto")):
        path = Path(spec).expanduser()
        near = difflib.get_close_matches(str(spec), ["latest", "auto"], n=1)
        if near and not path.exists():
            raise CheckpointError(f"no checkpoint at {spec}; did you mean '{near[0]}'?")
        in_run = next((d / path for d in (Path(out_dir), Path(checkpoint_dir))
                       if not path.exists() and not path.is_absolute() and (d / path).is_file()), None)
        if in_run is not None:  # a name inside the run given without its folder
            raise CheckpointError(f"no checkpoint at {spec} (paths are from the current folder); did you mean "
                                  f"{in_run}?")
        _read(path, "cpu", mmap=True)
        _verify_checksums(path)
        return path
    candidates = _candidates(checkpoint_dir, out_dir)
    if not candidates:
        if spec == "auto":
            return None
        raise CheckpointError(
            f"resume_from_checkpoint='latest' but there is no checkpoint in {checkpoint_dir} or "
            f"{out_dir}; give the path of one kept elsewhere (an earlier Kaggle session's output, say), or use "
            f"'auto' to start fresh when there is none")
    for _, _, path, _ in sorted(_peek(candidates, warn=True), key=lambda c: (c[0], c[1]), reverse=True):
        try:
            _verify_checksums(path)
            return path
        except CheckpointError as e:
            say(f"warning: skipping checkpoint: {e}")
    raise CheckpointError(
        f"none of the {len(candidates)} checkpoint files in {checkpoint_dir} and {out_dir} can be "
        f"loaded (see warnings above; they are kept): {fix}")


def copy_as_rotated(path, checkpoint_dir):
    """Copy checkpoint `path` into checkpoint_dir as checkpoint_epoch{E}_step{S}.pt, unless that file is there
    already; returns (that path, whether it was copied). CheckpointError if it cannot be read or written."""
    state = _read(path, "cpu", mmap=True)
    target = checkpoint_path(checkpoint_dir, state["epoch"], state["step"])
    if target.exists():
        return target, False
    try:
        atomic_copy(path, target)
    except OSError as e:  # reading `path` (a write's failure is a CheckpointError already)
        raise _save_error(target, e) from e
    return target, True


def best_of_its_run(path):
    """(best, folder) for checkpoint `path`'s run, looked for in the run's out_dir: the checkpoint's own folder (an
    emergency checkpoint, a best model), the one above (a rotated one in the default checkpoints/) or the out_dir
    its config names. best: the best_model.pt of the same run (run_id) whose val loss is the checkpoint's best val
    loss, at or before its step, or None. folder: the first of those folders holding a best_model.pt of the same
    run, whatever its step (one after the checkpoint's, for a branch from an older checkpoint): the run's out_dir,
    whose histories are the run's; or None."""
    state = _read(path, "cpu", mmap=True)
    best_loss, step, run = state.get("best_val_loss"), state["step"], state.get("run_id")
    named = (state.get("config") or {}).get("out_dir")
    found = None
    for folder in (Path(path).parent, Path(path).parent.parent, *([Path(named).expanduser()] if named else [])):
        try:
            best = _read(folder / BEST_NAME, "cpu", mmap=True)
        except CheckpointError:
            continue
        if None in (run, best.get("run_id")) or best["run_id"] == run:
            found = found or folder
            if best.get("val_loss") == best_loss and best["step"] <= step:
                return folder / BEST_NAME, folder
    return None, found


def checkpoints_after(checkpoint_dir, out_dir, step):
    """The readable checkpoint files (rotated, emergency, best) whose stored step is above step (what no
    run can resume from cannot be mixed up with one)."""
    return [path for stored, _, path, _ in _peek(_candidates(checkpoint_dir, out_dir), warn=False) if stored > step]


def newer_format_files(checkpoint_dir, out_dir):
    """The checkpoint files (rotated, emergency, best) of a newer format than this code reads: a newer version of
    this trainer's run, which a run of this code must neither overwrite nor rotate away ('auto' skips them)."""
    unreadable = []
    _peek(_candidates(checkpoint_dir, out_dir), warn=False, unreadable=unreadable)
    return [path for path, e in unreadable if isinstance(e, NewerFormatError)]


def checkpoint_files(checkpoint_dir, out_dir):
    """Every checkpoint file (rotated, emergency, best), readable or not: one of a newer format, or damaged, is
    still a run's, and a fresh run must not overwrite it."""
    return [path for path, _ in _candidates(checkpoint_dir, out_dir)]


# --- RNG state and model weights ---------------------------------------------------------------

def find_model_checkpoint(spec, out_dir):
    """The checkpoint to sample from or evaluate: spec (a path, 'latest' or 'auto', looked up in out_dir and
    out_dir/checkpoints), or else out_dir/best_model.pt. CheckpointError saying where it looked if none."""
    path, checkpoints = Path(out_dir) / BEST_NAME, Path(out_dir) / CHECKPOINTS_SUBDIR
    if spec:  # 'latest' with nothing there falls through to the message below
        path = find_checkpoint("auto" if spec == "latest" else spec, checkpoints, out_dir,
                               fix="give a model by path with --checkpoint PATH, or a HuggingFace folder with --model_dir")
    if path is None or not path.is_file():
        where = path or f"{out_dir} or {checkpoints}"
        if not spec and Path(out_dir).is_file():
            raise CheckpointError(f"--out_dir {out_dir} is a file, not a run's folder: give a checkpoint file with "
                                  f"--checkpoint {out_dir}")
        if not spec and (Path(out_dir) / "config.json").is_file():
            raise CheckpointError(f"--out_dir {out_dir} is a HuggingFace folder, not a run's folder: give it with "
                                  f"--model_dir {out_dir}")
        if not spec and _candidates(checkpoints, out_dir):  # a run without a best model yet
            raise CheckpointError(f"no model at {where}, but {out_dir} holds checkpoints of a run: use "
                                  f"--checkpoint latest (the newest of them)")
        raise CheckpointError(f"no model at {where}: train one with `python train.py` (it writes {BEST_NAME} to "
                              f"its out_dir), or point at one with --checkpoint PATH, --out_dir DIR or "
                              f"--model_dir DIR (a HuggingFace folder such as {Path(out_dir) / FINAL_MODEL_DIR})")
    return path


def load_model_checkpoint(spec, out_dir):
    """(path, state) of find_model_checkpoint's checkpoint, loaded. For 'latest' (or 'auto') a file that is gone
    by the time it is read, rotated away by the run still training there, is looked for again, once."""
    for attempt in range(2):
        path = find_model_checkpoint(spec, out_dir)
        try:
            return path, load_checkpoint(path)
        except CheckpointError:
            if attempt or spec not in ("latest", "auto") or path.exists():
                raise


def capture_rng_state():
    """RNG states of python `random`, numpy's global generator, torch CPU, every CUDA device and Apple's MPS.

    Stored as tensors, lists, ints and floats only, so a checkpoint holding it loads with weights_only=True.
    """
    import torch

    py_version, py_state, py_gauss = random.getstate()
    np_key, np_state, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": {"key": str(np_key), "state": torch.from_numpy(np_state.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch_cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        **({"mps": torch.mps.get_rng_state()} if torch.backends.mps.is_available() else {}),
    }


def restore_rng_state(state):
    """Restore what capture_rng_state() returned (CUDA states only for the devices present)."""
    import torch

    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    n = state["numpy"]
    np.random.set_state((n["key"], n["state"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    # map_location may have moved these tensors; the setters want CPU uint8 tensors.
    torch.set_rng_state(state["torch_cpu"].cpu().to(torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu().to(torch.uint8), i)
    if state.get("mps") is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"].cpu().to(torch.uint8))


def unwrapped(model):
    """The bare model inside torch.compile's wrapper (`_orig_mod`) and DDP's (`module`)."""
    import torch

    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        else:
            return model


def unwrapped_state_dict(model):
    """model.state_dict() as the bare model has it: no `_orig_mod.` (torch.compile) or `module.` (DDP) prefix."""
    return unwrapped(model).state_dict()
