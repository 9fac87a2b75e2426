"""What the command-line scripts share: how a user's mistake ends the program."""

import sys


def fail(message, code=2):
    """Print `error: <message>` as one line on stderr and exit with `code` (2: bad input or usage)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)
