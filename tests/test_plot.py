"""plot.py: the figure holds the history's numbers, the PNG is written, the CLI's errors are one line."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from plot import PlotError, _linear_map, draw, plot_history

REPO = Path(__file__).resolve().parent.parent
TOKENS_PER_STEP = 4096
STEPS_PER_EPOCH = 20


def eval_records(steps=(10, 20, 30, 40)):
    """Records as train.py's run_eval writes them."""
    return [{"step": s, "epoch": s / STEPS_PER_EPOCH, "tokens": s * TOKENS_PER_STEP, "lr": 1e-3 * (1 - s / 50),
             "train_loss": 9.0 - s / 10, "val_loss": 9.5 - s / 12, "val_perplexity": math.exp(9.5 - s / 12),
             "elapsed_s": s * 1.5, "timestamp": "2025-01-01T00:00:00"} for s in steps]


def epoch_records():
    """Records as train.py's end_epoch writes them."""
    return [{"epoch": e, "train_loss": 8.0 - e, "val_loss": 8.5 - e, "val_perplexity": math.exp(8.5 - e),
             "timestamp": "2025-01-01T00:00:00"} for e in (1, 2)]


def write_run(folder, evals=None, epochs=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval_history.json").write_text(json.dumps(eval_records() if evals is None else evals))
    (folder / "training_history.json").write_text(json.dumps(epoch_records() if epochs is None else epochs))
    return folder


def run_plot(*args, pre=""):
    """python plot.py ARGS as a subprocess; `pre` is Python run first (to hide a package)."""
    code = f"{pre}\nimport runpy, sys\nsys.argv = ['plot.py'] + {list(map(str, args))!r}\n" \
           f"runpy.run_path({str(REPO / 'plot.py')!r}, run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_figure_holds_losses_lr_epoch_means_and_a_token_axis():
    fig = draw(eval_records(), epoch_records())
    ax_loss, ax_lr = fig.axes[:2]
    lines = {line.get_label(): line for line in ax_loss.lines + ax_lr.lines}
    train, val, epoch_means = lines["train (last step)"], lines["val"], lines["train (epoch mean)"]
    assert list(train.get_xdata()) == [10, 20, 30, 40]
    assert np.allclose(train.get_ydata(), [8.0, 7.0, 6.0, 5.0])
    assert np.allclose(val.get_ydata(), [9.5 - s / 12 for s in (10, 20, 30, 40)])
    assert list(epoch_means.get_xdata()) == [20, 40] and np.allclose(epoch_means.get_ydata(), [7.0, 6.0])
    assert np.allclose(lines["learning rate"].get_ydata(), [1e-3 * (1 - s / 50) for s in (10, 20, 30, 40)])
    assert "best val loss 6.1667" in ax_loss.get_title() and "at step 40" in ax_loss.get_title()
    assert [ax.get_xlabel() for ax in ax_loss.child_axes] == ["tokens"]


def test_step_to_token_map_is_exact_at_records_and_extends_past_them():
    # A resumed run that doubled the batch at step 20: 4096 then 8192 tokens per step.
    steps, tokens = [0, 10, 20, 30], [0, 40960, 81920, 163840]
    to_tokens, to_steps = _linear_map(steps, tokens), _linear_map(tokens, steps)
    assert np.allclose(to_tokens(np.array([10, 25])), [40960, 122880])
    assert np.allclose(to_steps(np.array([163840, 122880])), [30, 25])
    slope = 163840 / 30  # past the ends (the axes' margins): the mean slope
    assert np.allclose(to_tokens(np.array([-5, 40])), [-5 * slope, 163840 + 10 * slope])


def test_an_epoch_cut_short_by_max_steps_ends_at_the_last_evaluation():
    # train.py's epoch records (the guide's format) have no step: epoch 2 of 20 steps ended at step 30.
    fig = draw(eval_records((10, 20, 30)), epoch_records())
    (means,) = [line for line in fig.axes[0].lines if line.get_label() == "train (epoch mean)"]
    assert list(means.get_xdata()) == [20, 30]


@pytest.mark.parametrize("name", ["out", "W" * 300, "run-" + "x" * 200 + "-lr3e-4", "$5-$10 budget"])
def test_the_title_fits_the_figure_however_long_the_folder_name(name):
    fig = draw(eval_records(), epoch_records(), title=name)
    fig.canvas.draw()
    box, title = fig.bbox, fig.get_suptitle()
    extent = fig._suptitle.get_window_extent()
    assert box.x0 <= extent.x0 and extent.x1 <= box.x1, (extent, box)
    assert title.replace("\\$", "$") == name or (title[:4] == name[:4] and title[-6:] == name[-6:] and "..." in title)
    # shown as written: a name with two "$" is not typeset as math
    assert fig._suptitle._preprocess_math(title) == (name if title == name or "$" in name else title, False)


def test_resumed_history_with_a_repeated_step_and_missing_train_loss_still_draws():
    evals = eval_records((10, 20)) + eval_records((20, 30))
    evals[0]["train_loss"] = None  # every step before the first eval was non-finite
    fig = draw(evals)
    assert list(fig.axes[0].lines[0].get_xdata()) == [10, 20, 30]
    assert math.isnan(fig.axes[0].lines[0].get_ydata()[0])


def test_plot_history_writes_a_png(tmp_path):
    run = write_run(tmp_path / "out")
    path = plot_history(run)
    assert path == run / "loss_curve.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in run.iterdir() if p.name not in ("loss_curve.png", "eval_history.json",
                                                            "training_history.json")]  # no temp left


def test_a_folder_named_in_a_script_the_font_lacks_draws_without_a_warning(tmp_path):
    """The title is the folder's name: drawn as boxes, with no matplotlib warning among a training run's lines."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = plot_history(write_run(tmp_path / "日本語の実験"))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_history_without_evaluations_says_so(tmp_path):
    with pytest.raises(PlotError, match="no evaluations in .*eval_history.json yet"):
        plot_history(write_run(tmp_path / "out", evals=[]))
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(PlotError, match="elsewhere has no eval_history.json: give train.py's out_dir"):
        plot_history(tmp_path / "elsewhere")


def test_cli_writes_the_png(tmp_path):
    run = write_run(tmp_path / "out")
    result = run_plot(run, "--output", tmp_path / "curve.png")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {tmp_path / 'curve.png'}"
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("case,message", [
    ("no_matplotlib", "matplotlib is not installed: `pip install matplotlib`"),
    ("not_a_folder", "is not a folder"),
    ("bad_json", "is not a history file written by train.py"),
    ("svg_output", "--output curve.svg: plot.py writes a PNG, so give a name ending in .png"),
])
def test_cli_errors_are_one_line(tmp_path, case, message):
    run = write_run(tmp_path / "out")
    pre = ""
    if case == "no_matplotlib":
        pre = "import sys; sys.modules['matplotlib'] = None  # as if it were not installed"
    elif case == "not_a_folder":
        run = tmp_path / "nowhere"
    elif case == "bad_json":
        (run / "eval_history.json").write_text("{not json")
    result = run_plot(run, *(["--output", "curve.svg"] if case == "svg_output" else []), pre=pre)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert not (run / "loss_curve.png").exists()


def test_an_output_path_that_cannot_be_a_file_is_one_line(tmp_path, main_in_process):
    from plot import main
    run = write_run(tmp_path / "out")
    (tmp_path / "curves.png").mkdir()
    for output, message in ((tmp_path / "curves.png", f"--output {tmp_path / 'curves.png'} is a folder: give the "
                                                      f"path of a file ending in .png"),
                            (run / "eval_history.json" / "x.png", f"--output {run / 'eval_history.json' / 'x.png'}: "
                                                                  f"{run / 'eval_history.json'} is a file, not a "
                                                                  f"folder; give another path")):
        code, out, err = main_in_process(main, [str(run), "--output", str(output)], tmp_path)
        assert (code, out, err) == (2, "", f"error: {message}\n")
    assert sorted(p.name for p in run.iterdir()) == ["eval_history.json", "training_history.json"]


@pytest.mark.parametrize("moment", ["numpy", "replace"])
def test_ctrl_c_ends_it_in_one_line_and_leaves_no_temp_file(tmp_path, moment, interrupted_at):
    """Ctrl-C while numpy loads, or as the new PNG is moved over the old one: `interrupted`, the old PNG as it
    was, no temp file beside it."""
    run = write_run(tmp_path / "out")
    (run / "loss_curve.png").write_bytes(b"the old curve")
    p = interrupted_at(REPO / "plot.py", moment, run, cwd=tmp_path)
    assert (p.returncode, p.stderr, p.stdout) == (130, "\ninterrupted\n", "")
    assert (run / "loss_curve.png").read_bytes() == b"the old curve"
    assert sorted(p.name for p in run.iterdir()) == ["eval_history.json", "loss_curve.png", "training_history.json"]


@pytest.mark.parametrize("name, records, message", [
    ("eval_history.json", [{"epoch": 0.1, "val_loss": 3.0}], "record 1 has no number 'step'"),
    ("eval_history.json", [1, 2, 3], "record 1 has no number 'step'"),
    ("eval_history.json", [{"step": 10, "val_loss": "abc"}], "record 1 holds val_loss='abc', not a number"),
    ("training_history.json", [{"train_loss": 3}], "record 1 has no number 'epoch'"),
    ("training_history.json", [1], "record 1 has no number 'epoch'"),
    # json reads NaN, Infinity and 1e400 (inf) as numbers: a loss may be NaN, a position on the x axis not.
    ("eval_history.json", [{"step": float("nan"), "val_loss": 3.0}], "record 1 holds step=nan, not a count"),
    ("eval_history.json", [{"step": 10, "tokens": float("inf"), "val_loss": 3.0}], "holds tokens=inf, not a count"),
    ("training_history.json", [{"epoch": 2 ** 60, "train_loss": 3.0}], "holds epoch=1152921504606846976, not a count"),
])
def test_history_records_of_another_shape_are_one_line(tmp_path, name, records, message):
    run = write_run(tmp_path / "out")
    (run / name).write_text(json.dumps(records))
    with pytest.raises(PlotError, match=message.replace("(", r"\(")):
        plot_history(run)
    assert not (run / "loss_curve.png").exists()


def test_a_null_token_count_still_draws(tmp_path):
    run = write_run(tmp_path / "out")
    evals = json.loads((run / "eval_history.json").read_text())
    evals[0]["tokens"] = None
    (run / "eval_history.json").write_text(json.dumps(evals))
    assert plot_history(run).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
