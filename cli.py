"""What the command-line scripts share: how a user's mistake ends the program, how a closed pipe does, how a
warning is said, and how their messages count things and quote an exception."""

import atexit
import contextlib
import errno
import os
import signal
import sys
from pathlib import Path


def fail(message, code=2):
    """Print `error: <message>` as one line on stderr and exit with `code` (2: bad input or usage)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


_keepers = []  # where a line said also goes: a running train.py's train.log (keeping_said)


def say(message):
    """A line for the user that is no error (a warning, a note): on stderr, and in a running train.py's train.log
    too (a module's warning in the middle of a run: a failed compile, a checkpoint skipped)."""
    show(message)
    for keep in _keepers:
        keep(message)


def show(message):
    """message on stderr, as a line of its own above a progress bar on the terminal (not glued to the bar's)."""
    from tqdm import tqdm
    if getattr(tqdm, "_instances", None):
        tqdm.write(message, file=sys.stderr)
        sys.stderr.flush()
    else:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def keeping_said(keep):
    """Within it, every line said (say) is also passed to keep(line)."""
    _keepers.append(keep)
    try:
        yield
    finally:
        _keepers.remove(keep)


def bar_size(file=None):
    """tqdm's size arguments for a progress bar on `file` (stderr): the terminal's width, followed as it changes;
    fixed at 100 x 24 where the terminal reports a size of 0 (`docker exec -t`, some consoles), on which tqdm would
    draw nothing at all."""
    file = sys.stderr if file is None else file
    try:
        size = os.get_terminal_size(file.fileno())
    except (OSError, ValueError, AttributeError):  # no terminal: tqdm draws (or not) as it decides
        return {"dynamic_ncols": True}
    return {"dynamic_ncols": True} if size.columns > 0 and size.lines > 0 else {"ncols": 100, "nrows": 24}


def plural(n, word, many=None):
    """`word` for n == 1, else `many` (default: word + "s"): f"{n} {plural(n, 'token')}"."""
    return word if n == 1 else many or word + "s"


def is_number(v):
    """An int or float from a file or a config, not a bool (True is an int to Python)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def one_line(e, limit=200):
    """An exception for a one-line message: "TypeName: its first line", at most `limit` characters of that line."""
    first = (str(e).strip().splitlines() or [""])[0][:limit]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def check_readable(path, error):
    """Raise error(f"cannot read PATH: REASON") when the file at path does not open for reading (its permissions, a
    failing disk), so that a parser never takes an unreadable file for a damaged one."""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from e


def file_in_the_way(path):
    """The first folder above `path` that exists as a file (what keeps path from being created there), or None."""
    return next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)


def ctrl_c_ends_it(message="interrupted"):
    """For a script with nothing to save (sample.py, evaluate.py), called before it imports PyTorch: Ctrl-C at
    any moment (while PyTorch loads, the model is read, text is generated) ends it at once with `message` on a
    line of its own and exit code 130, never a traceback; what it printed so far stays. (A Ctrl-C ignored from the
    start, in a script run with `&`, stays ignored.)"""
    def stop(signum, frame):
        _end_interrupted(message)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, stop)


def run_cleaning_up_on_ctrl_c(main, message="interrupted"):
    """main() of a script that writes files (export_hf.py, plot.py), whose start ctrl_c_ends_it covered: Ctrl-C is a
    KeyboardInterrupt again, so that the write's clean-up runs (its temp file removed, a folder it replaces put
    back), and then ends the script as ctrl_c_ends_it does. A second Ctrl-C does not cut that clean-up short."""
    def interrupt(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, interrupt)
    try:
        main()
    except KeyboardInterrupt:
        _end_interrupted(message)


def _end_interrupted(message):
    """`message` on a line of its own on stderr, then exit code 130 at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C (or a copy of this one) changes nothing
    flush_quietly()
    try:
        os.write(2, f"\n{message}\n".encode())
    except OSError:
        pass
    os._exit(128 + signal.SIGINT)


def flush_quietly():
    """Flush stdout and stderr before an os._exit, whatever stands in the way (a reader gone, a full disk:
    _EndsWhenFull's exit, a write cut short)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (Exception, SystemExit):
            pass


def quiet_on_closed_pipe():
    """Let `python script.py ... | head` end the script silently, as it ends `cat`, instead of with a
    BrokenPipeError traceback. Only for scripts with nothing to save when their reader goes away (not a
    training run, which must reach its emergency checkpoint)."""
    if hasattr(signal, "SIGPIPE"):  # not on Windows
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)


NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # a full disk, a file-size limit, a quota


def fix_for_folder(e, elsewhere):
    """The fix to name for an OSError `e` making or writing in a folder: room, where the disk is full (moving to
    another folder of the same disk would not help, and on Kaggle the folder is already the right one), else
    `elsewhere`."""
    return "free disk space" if e.errno in NO_ROOM else elsewhere


def tolerant_output(stdout_errors="backslashreplace", full_ends_it=True):
    """Let the script's output hold any text: what the encoding of stdout or stderr cannot (Windows writes a
    redirected stdout in its ANSI code page, e.g. cp1252) is escaped (\\u65e5) instead of ending the program
    with a UnicodeEncodeError; stdout_errors="replace" shows it as "?". With no stdout at all (`>&-`), output
    goes nowhere. With `full_ends_it`, stdout redirected to a full disk ends the program with exit code 1 and one
    line that says so, not a traceback (a training run goes on instead: outlive_closed_output). For a script's
    own process (`if __name__ == "__main__"`), not for an importer's."""
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")
    for stream, errors in ((sys.stdout, stdout_errors), (sys.stderr, "backslashreplace")):
        if stream is not None and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=errors)
    if full_ends_it and not isinstance(sys.stdout, _EndsWhenFull):
        sys.stdout = _EndsWhenFull(sys.stdout)  # (at exit: _flush_or_exit_1)


class _Guarded:
    """A text stream (stdout, stderr) whose failed writes and flushes go to _on_error (what a subclass does about
    them); its other attributes (isatty, fileno, encoding, buffer, ...) are the stream's own."""

    def __init__(self, stream):
        self._stream = stream

    def _guarded(self, op, *args):
        try:
            return op(*args)
        except OSError as e:
            return self._on_error(e, op, args)

    def write(self, text):
        written = self._guarded(self._stream.write, text)
        return len(text) if written is None else written

    def flush(self):
        self._guarded(self._stream.flush)

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _EndsWhenFull(_Guarded):
    """stdout whose write or flush fails for want of room (a full disk under `> results.txt`) ends the program:
    one line on stderr and SystemExit(1), the rest of its output to /dev/null."""

    def __init__(self, stream):
        super().__init__(stream)
        self.failed = False

    def _on_error(self, e, op, args):
        if e.errno not in NO_ROOM:
            raise e
        if not self.failed:
            print(f"error: cannot write the output: {e.strerror} (a full disk? send it to another one)",
                  file=sys.stderr, flush=True)
        self.failed = True
        _to_devnull(self._stream)  # Python's own flush at exit: nothing left to fail
        raise SystemExit(1) from None


def _to_devnull(stream):
    """Point stream's file descriptor at /dev/null: its writes, and what its buffer holds, go nowhere from now."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _flush_or_exit_1():
    """At exit, under tolerant_output's stdout: what it still holds is written, and no room for it (now, or in an
    earlier exit callback's flush, whose SystemExit Python ignores) ends the program with exit code 1. Registered
    as cli is first imported, early in a script, so it runs after the exit callbacks of what is imported later
    (PyTorch's, matplotlib's); os._exit then skips only those of the few modules imported before cli."""
    if not isinstance(sys.stdout, _EndsWhenFull):
        return
    try:
        sys.stdout.flush()
    except (SystemExit, OSError):
        pass  # (OSError: a reader gone; Python's own flush says so, or quiet_on_closed_pipe ended it quietly)
    if sys.stdout.failed:
        sys.stderr.flush()
        os._exit(1)


atexit.register(_flush_or_exit_1)


class _OutlivesItsReader(_Guarded):
    """A text stream (stdout, stderr) whose writes cannot fail: once its reader is gone (a `| tee` that the same
    Ctrl-C stopped, a `| head` that has its lines, a closed terminal), the file descriptor is pointed at
    /dev/null and the program goes on writing into it, as if its output were still read. So it is when there is
    no room for what it writes (a full disk under `> run.txt`): once, `on_full(error)` is told."""

    def __init__(self, stream, on_full=None):
        super().__init__(stream)
        self.lost = False
        self.on_full = on_full

    GONE = (errno.EPIPE, errno.EIO, errno.ENXIO, errno.ECONNRESET)  # no reader left: a pipe, a terminal, a socket

    def _on_error(self, e, op, args):
        if e.errno not in self.GONE + NO_ROOM:
            raise e
        if self.lost:
            return None
        self.lost = True
        _to_devnull(self._stream)  # what the buffer still holds goes there too
        if e.errno in NO_ROOM and self.on_full:
            self.on_full(e)
        try:
            return op(*args)
        except OSError:
            return None


@contextlib.contextmanager
def outlive_closed_output(when_full=""):
    """Within it, sys.stdout and sys.stderr outlive their readers and a full disk (see _OutlivesItsReader): for a
    training run, which must reach its emergency checkpoint however its output is read. A stream with no room
    left is warned about on the other one, with `when_full` ("training goes on")."""
    streams = sys.stdout, sys.stderr

    def warner(name, other):
        return lambda e: print(f"warning: cannot write {name}: {e.strerror}; {when_full}".rstrip("; "),
                               file=other(), flush=True)

    sys.stdout, sys.stderr = (
        s if s is None or isinstance(s, _OutlivesItsReader) else _OutlivesItsReader(s, warner(name, other))
        for s, name, other in ((streams[0], "standard output", lambda: sys.stderr),
                               (streams[1], "standard error", lambda: sys.stdout)))  # None: `1>&-`, pythonw
    try:
        yield
    finally:
        try:
            for s in (sys.stdout, sys.stderr):
                if s is not None:
                    s.flush()
        finally:
            sys.stdout, sys.stderr = streams

