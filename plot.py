"""Loss curves of a training run.

    python plot.py out                # -> out/loss_curve.png
    python plot.py out --output curves.png

Reads out_dir/eval_history.json (one record per evaluation, written by train.py) and, when present,
out_dir/training_history.json (one record per epoch). Left: train and val loss against steps; right: the
learning rate. The top axes give the same positions in tokens seen. train.py redraws the PNG at each
evaluation when matplotlib is installed; matplotlib is optional and only needed here.
"""

import argparse
import importlib.util
import io
import json
import math
import warnings
from pathlib import Path

from cli import (check_readable, ctrl_c_ends_it, fail, file_in_the_way, is_number, run_cleaning_up_on_ctrl_c,
                 tolerant_output)

if __name__ == "__main__":
    ctrl_c_ends_it()  # while numpy (and matplotlib) load; the PNG's write cleans up (run_cleaning_up_on_ctrl_c)

import numpy as np

from checkpoint import CheckpointError, atomic_write_bytes

PNG_NAME = "loss_curve.png"
EVAL_HISTORY = "eval_history.json"  # one record per evaluation (train.py writes both)
EPOCH_HISTORY = "training_history.json"  # one record per epoch, the guide's format


class PlotError(Exception):
    """No history to draw, or matplotlib missing; one line saying what to do."""


def matplotlib_available():
    """True when matplotlib can be imported (without importing it)."""
    return importlib.util.find_spec("matplotlib") is not None


PERPLEXITY_CAP_LOSS = 50


def perplexity(loss):
    """exp(loss), the figure every history record and message gives beside a loss; capped at exp(50) so that a
    diverged run's records stay numbers JSON can hold."""
    return math.exp(min(loss, PERPLEXITY_CAP_LOSS))


def perplexity_text(ppl):
    """A perplexity (perplexity()) for a line: its digits, or "over ..." where it was capped (a diverged model)."""
    return f"{ppl:.2f}" if not ppl >= math.exp(PERPLEXITY_CAP_LOSS) else f"over {ppl:.3g} (exp({PERPLEXITY_CAP_LOSS}))"


# Fields a history record may hold as numbers (or null); `required`, below, must be there.
NUMERIC_FIELDS = ("step", "epoch", "tokens", "train_loss", "val_loss", "val_perplexity", "lr")
AXIS_FIELDS = ("step", "epoch", "tokens")  # positions: finite


def read_records(path, required):
    """The list of records in a history JSON file; [] when the file does not exist. PlotError when it is not
    train.py's: each record a dict with a number under `required` ('step' for evaluations, 'epoch' for epochs)."""
    path = Path(path)
    if not path.exists():
        return []
    check_readable(path, PlotError)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PlotError(f"cannot read {path} ({e}): it is not a history file written by train.py") from None
    if not isinstance(records, list):
        raise PlotError(f"{path} is not a list of records: it is not a history file written by train.py")
    for i, r in enumerate(records, 1):
        if not isinstance(r, dict) or not is_number(r.get(required)):
            raise PlotError(f"{path} record {i} has no number {required!r}: it is not a history file written by "
                            f"train.py")
        odd = next((k for k in NUMERIC_FIELDS if r.get(k) is not None and not is_number(r[k])), None)
        if odd:
            raise PlotError(f"{path} record {i} holds {odd}={r[odd]!r:.40}, not a number: it is not a history "
                            f"file written by train.py")
        # Losses may be NaN (a run's non-finite step); a position on the x axis never is, nor beyond 2^53.
        odd = next((k for k in AXIS_FIELDS if r.get(k) is not None and not abs(r[k]) <= 2 ** 53), None)
        if odd:
            raise PlotError(f"{path} record {i} holds {odd}={r[odd]!r:.40}, not a count: it is not a history "
                            f"file written by train.py")
    return records


def _number(v):
    return float("nan") if v is None else float(v)


def _linear_map(xp, fp):
    """x -> y, piecewise linear through (xp, fp) (xp increasing), extended past both ends by the mean slope."""
    xp, fp = np.asarray(xp, dtype=float), np.asarray(fp, dtype=float)
    slope = (fp[-1] - fp[0]) / (xp[-1] - xp[0])

    def f(x):
        x = np.asarray(x, dtype=float)
        y = np.interp(x, xp, fp)
        y = np.where(x > xp[-1], fp[-1] + (x - xp[-1]) * slope, y)
        return np.where(x < xp[0], fp[0] + (x - xp[0]) * slope, y)

    return f


def draw(evals, epochs=(), title=""):
    """A matplotlib Figure of the eval records (and epoch records). Needs matplotlib; no pyplot, so
    nothing global (backend, open figures) changes in the caller's process."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter, FuncFormatter
    except ImportError:
        raise PlotError("matplotlib is not installed: `pip install matplotlib` to draw loss curves") from None
    # One record per step: a resumed run may have evaluated the same step twice.
    by_step = {int(r["step"]): r for r in evals}
    steps = sorted(by_step)
    records = [by_step[s] for s in steps]
    train = [_number(r.get("train_loss")) for r in records]
    val = [_number(r.get("val_loss")) for r in records]
    lr = [_number(r.get("lr")) for r in records]

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_loss, ax_lr = fig.subplots(1, 2)
    ax_loss.plot(steps, train, ".-", color="tab:blue", alpha=0.6, label="train (last step)")
    ax_loss.plot(steps, val, "o-", color="tab:orange", markersize=4, label="val")
    # Epoch means sit at each epoch's last step: epoch x steps per epoch, from step / epoch of an eval record
    # (epoch records, the guide's format, have no step). An epoch cut short by max_steps is the run's last and
    # ends at its last evaluation.
    per_epoch = [r["step"] / r["epoch"] for r in records if r.get("epoch")]
    if epochs and per_epoch:
        ends = [min(round(e["epoch"] * per_epoch[-1]), steps[-1]) for e in epochs]
        ax_loss.plot(ends, [_number(e.get("train_loss")) for e in epochs], "s", color="tab:green",
                     label="train (epoch mean)")
        for end in ends:
            for ax in (ax_loss, ax_lr):
                ax.axvline(end, color="0.8", linestyle=":", zorder=0)
    finite = [v for v in val if math.isfinite(v)]
    if finite:
        best = min(finite)
        ax_loss.set_title(f"best val loss {best:.4f} (perplexity {perplexity(best):.2f}) "
                          f"at step {steps[val.index(best)]:,}", fontsize=10)
    ax_loss.set_ylabel("loss (nats per token)")
    ax_loss.legend()
    ax_lr.plot(steps, lr, ".-", color="tab:purple", label="learning rate")
    ax_lr.set_ylabel("learning rate")
    # No offset text under the top axis; 3 digits, so that close values (a flat schedule) get distinct labels.
    ax_lr.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))

    # Tokens on the top axis, mapped from (step, tokens) of the records: exact even if a resumed run
    # changed the batch.
    tokens = [int(r.get("tokens") or 0) for r in records]
    xp, fp = ([0] + steps, [0] + tokens) if steps[0] > 0 else (steps, tokens)
    for ax in (ax_loss, ax_lr):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(xp) > 1 and fp[-1] > fp[0]:
            top = ax.secondary_xaxis("top", functions=(_linear_map(xp, fp), _linear_map(fp, xp)))
            top.set_xlabel("tokens")
            top.xaxis.set_major_formatter(EngFormatter(sep=""))
    if title:
        fig.suptitle(_fitted(title.replace("$", r"\$"), fig.get_figwidth() * 72 * 0.95))  # ($: not math)
    return fig


def _fitted(title, width_pt):
    """The title, or its start and end around "..." where the whole is wider than width_pt (a long out_dir)."""
    from matplotlib import rcParams
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextPath
    font, text, keep = FontProperties(size=rcParams["figure.titlesize"]), title, len(title)
    while keep > 8 and TextPath((0, 0), text, prop=font).get_extents().width > width_pt:
        keep -= max(1, keep // 10)
        text = title[:keep // 2] + "..." + title[len(title) - (keep - keep // 2):]
    return text


def plot_history(out_dir, output=None):
    """Draw out_dir's eval_history.json (and training_history.json) to out_dir/loss_curve.png (or output).

    The PNG is replaced atomically, so a viewer never sees a half-written file. Returns its path;
    PlotError when there is nothing to draw yet or matplotlib is missing.
    """
    out_dir, evals_path = Path(out_dir), Path(out_dir) / EVAL_HISTORY
    if not evals_path.exists():
        raise PlotError(f"{out_dir} has no {EVAL_HISTORY}: give train.py's out_dir (it writes that file at the "
                        f"first evaluation)")
    evals = read_records(evals_path, "step")
    if not evals:
        raise PlotError(f"no evaluations in {evals_path} yet: train.py writes one record "
                        f"per evaluation (every eval_steps steps)")
    buf = io.BytesIO()
    with warnings.catch_warnings():  # a folder named in a script the font lacks (Japanese): boxes, not a warning
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from (current )?font")  # (matplotlib 3.8: current)
        fig = draw(evals, read_records(out_dir / EPOCH_HISTORY, "epoch"), title=out_dir.resolve().name)
        fig.savefig(buf, format="png", dpi=100)
    path = Path(output) if output else out_dir / PNG_NAME
    atomic_write_bytes(path, buf.getvalue())
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description="Draw train/val loss and learning rate of a run to OUT_DIR/loss_curve.png.")
    p.add_argument("out_dir", help="train.py's out_dir (holds eval_history.json)")
    p.add_argument("--output", help=f"where the PNG goes (default OUT_DIR/{PNG_NAME})")
    p.error = fail
    args = p.parse_args(argv)
    if not Path(args.out_dir).is_dir():
        fail(f"{args.out_dir} is not a folder: give train.py's out_dir")
    if args.output and Path(args.output).suffix.lower() != ".png":
        fail(f"--output {args.output}: plot.py writes a PNG, so give a name ending in .png")
    if args.output and Path(args.output).is_dir():
        fail(f"--output {args.output} is a folder: give the path of a file ending in .png")
    blocker = args.output and file_in_the_way(args.output)
    if blocker:
        fail(f"--output {args.output}: {blocker} is a file, not a folder; give another path")
    try:
        print(f"wrote {plot_history(args.out_dir, args.output)}")
    except (PlotError, CheckpointError) as e:
        fail(str(e))


if __name__ == "__main__":
    tolerant_output()
    run_cleaning_up_on_ctrl_c(main)
