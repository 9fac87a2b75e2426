"""What the command-line scripts share: how a user's mistake ends the program, how a closed pipe does, and
how their messages count things and quote an exception."""

import signal
import sys


def fail(message, code=2):
    """Print `error: <message>` as one line on stderr and exit with `code` (2: bad input or usage)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


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


def quiet_on_closed_pipe():
    """Let `python script.py ... | head` end the script silently, as it ends `cat`, instead of with a
    BrokenPipeError traceback. Only for scripts with nothing to save when their reader goes away (not a
    training run, which must reach its emergency checkpoint)."""
    if hasattr(signal, "SIGPIPE"):  # not on Windows
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
