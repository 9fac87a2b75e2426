"""Train a GPT-2 model on token bins made by data.py.

    python train.py config/kaggle_t4.py [--name=value ...]
    torchrun --standalone --nproc_per_node=2 train.py config/kaggle_t4.py
    python train.py --help          # every setting with its default

A step is one optimizer step (gradient_accumulation_steps micro-batches). Checkpointing, signal
handling and the time budget keep a run safe: see README.md, "Training".
"""

import os
import signal
import sys

NOT_STARTED = "interrupted before training started: nothing to save"


class StoppedEarly(KeyboardInterrupt):
    """Ctrl-C or SIGTERM (a `kill`, a scheduler) before training starts: a KeyboardInterrupt, so that the same
    handlers end the process with the same one line (exit code 130 or 143). Training's own handler takes over at
    its start (StopRequest)."""

    def __init__(self, signum):
        super().__init__()
        self.signum = signum


_EARLY_STOP = []  # the signal, also kept here: code that a library calls from C can swallow the exception


def _stopped_early(signum, frame):
    _EARLY_STOP.append(signum)
    raise StoppedEarly(signum)


def _end_before_training(e, own_process=True):
    """Exit code of a Ctrl-C or SIGTERM before training, after its one line; in the script's own process (not an
    importer's, whose handlers stay) later copies of either are ignored first."""
    if own_process:
        for s in (signal.SIGINT, signal.SIGTERM, *_BREAK):
            signal.signal(s, signal.SIG_IGN)
    print(f"\n{NOT_STARTED}", file=sys.stderr, flush=True)
    return 128 + getattr(e, "signum", signal.SIGINT)


# One process (under torchrun the launcher passes SIGTERM on, and ends the other processes with it when one fails:
# they stay silent, as the one that failed says why).
_BREAK = [signal.SIGBREAK] if hasattr(signal, "SIGBREAK") else []  # Windows' Ctrl-Break: a stop, as Ctrl-C is

if __name__ == "__main__" and int(os.environ.get("WORLD_SIZE") or 1) == 1:
    for s in (signal.SIGTERM, *_BREAK):
        signal.signal(s, _stopped_early)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # (Python's: not when it started ignored)
        signal.signal(signal.SIGINT, _stopped_early)

try:  # Ctrl-C while Python loads the modules (PyTorch's take seconds): one line, not a traceback from an import
    import ast
    import contextlib
    import dataclasses
    import difflib
    import gc
    import inspect
    import json
    import math
    import re
    import runpy
    import shlex
    import socket
    import time
    import traceback
    import uuid
    from dataclasses import dataclass
    from datetime import datetime
    from pathlib import Path

    # Before torch's first allocation: CPU tensors of 2 MB and more get transparent huge pages. A CPU step makes its
    # logits afresh, chunk by chunk (about 100 MB a chunk in compiled bf16, 800 MB in compiled fp32), and the kernel
    # faults them in 2 MB at a time instead of 4 KB: +8-11% tokens/s for the compiled bf16 step on 2 cores, measured
    # when its logits were one 400 MB tensor (bench/NOTES.md). No effect on GPUs.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

    import torch
    import torch.distributed as dist

    import checkpoint as ckpt
    import hardware
    from cli import (bar_size, fix_for_folder, keeping_said, one_line, outlive_closed_output, plural,
                     quiet_on_closed_pipe, say, show, tolerant_output)
    from data import DEFAULT_DATA_DIR, EOT_TOKEN, N_VOCAB, DataError, TokenBins, get_tokenizer, read_bin
    from model import GPT, GPTConfig, configure_optimizer, set_weight_decay
    import plot
    import sample
    from tracking import Tracker
except KeyboardInterrupt as e:
    if __name__ != "__main__":  # imported (tests, benches): the importer's own Ctrl-C handling
        raise
    # First: a second Ctrl-C, or a copy of this one (`timeout -s INT`, a process group's), would cut the line short
    # or end the process in Python's shutdown with a traceback (one already pending is dropped too).
    sys.exit(_end_before_training(e))

PROCESS_START = time.time()
SAID_BY_ANOTHER_RANK_WAIT_S = 10.0  # see train_main


@dataclass
class TrainConfig:
    # model (the names of the original guide / HF GPT2Config)
    vocab_size: int = 50257  # tokenizer vocabulary (GPT-2 BPE)
    n_positions: int = 512  # context length the model supports
    n_embd: int = 256  # embedding width
    n_layer: int = 8  # transformer blocks
    n_head: int = 8  # attention heads
    n_inner: int = 1024  # MLP hidden width
    dropout: float = 0.0  # dropout during training (0 is best for one pass over big data)
    bias: bool = True  # biases in Linear/LayerNorm (needed for the HF export)
    layer_norm_epsilon: float = 1e-5  # LayerNorm epsilon
    init_from: str = "scratch"  # 'scratch', a checkpoint .pt, or a HuggingFace GPT-2 folder
    # data
    data_dir: str = DEFAULT_DATA_DIR  # folder with train.bin/val.bin from data.py
    max_length: int = 512  # tokens per training sequence (<= n_positions)
    # optimisation
    batch_size: int = 8  # micro-batch per device (halved automatically on out-of-memory)
    gradient_accumulation_steps: int = 8  # micro-batches per step, over all processes
    learning_rate: float = 5e-4  # peak learning rate
    min_lr: float = 5e-5  # learning rate at the end of the decay
    lr_decay: str = "cosine"  # 'cosine', 'linear' or 'constant' after warmup
    warmup_steps: int = 500  # linear warmup to learning_rate (its first step at 1/(warmup_steps+1) of it)
    weight_decay: float = 0.01  # AdamW decay on 2-D weights only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    epochs: int = 3  # passes over the train split
    max_steps: int = 0  # stop after this many steps (0 = epochs decide)
    # evaluation and logging
    eval_steps: int = 500  # evaluate every N steps (and at each epoch's end and the run's end)
    eval_iters: int = 0  # val batches of batch_size per evaluation, over all processes (0 = the whole val split)
    log_steps: int = 10  # a step line every N steps: in train.log always, on screen when stderr is no terminal
    sample_prompt: str = "The future of AI"  # sample printed at each evaluation ('' = off)
    sample_tokens: int = 40  # length of that sample
    plot: bool = True  # redraw out_dir/loss_curve.png after each evaluation (when matplotlib is installed)
    # checkpoints
    out_dir: str = ckpt.DEFAULT_OUT_DIR  # best_model.pt, final_model/, history and logs go here
    checkpoint_dir: str = ""  # rotated checkpoints ('' = out_dir/checkpoints)
    save_steps: int = 1000  # save a checkpoint every N steps (and at the run's end and at max_runtime)
    max_checkpoints: int = 4  # keep only the newest N rotated checkpoints
    resume_from_checkpoint: str = "auto"  # a path, 'latest', 'auto' (latest if any) or '' (fresh)
    export_final_model: bool = True  # write out_dir/final_model/ (HuggingFace format) at the end
    # system
    device: str = "auto"  # 'auto' (cuda > mps > cpu), 'cuda', 'cuda:1', 'mps', 'cpu'
    dtype: str = "auto"  # 'auto', 'float32', 'bfloat16', 'float16'
    compile: object = "auto"  # torch.compile: 'auto', True or False
    cuda_graphs: bool = False  # replay the compiled step as CUDA graphs (one CUDA GPU; experimental)
    seed: int = 1337  # seed for init, data order and dropout
    max_runtime: str = ""  # stop cleanly with a checkpoint after this long ('8h30m', '90m', seconds; '' or 0: never)
    max_runtime_from: float = 0.0  # the Unix time max_runtime counts from (0: train.py's start; the notebook's session)
    max_nonfinite: int = 5  # stop after this many non-finite losses in a row
    # optional tracking
    tensorboard: bool = False  # log to out_dir/tensorboard (needs the tensorboard package)
    wandb_project: str = ""  # log to this Weights & Biases project (needs the wandb package)
    wandb_run_name: str = ""  # the W&B run's name ('': out_dir's folder name)


class ConfigError(Exception):
    """A wrong setting: one line that says what and how to fix it."""


class FolderInUse(ConfigError):
    """Another train.py holds `folder` (run_lock)."""

    def __init__(self, message, folder):
        super().__init__(message)
        self.folder = folder


# --- configuration ---------------------------------------------------------------------------

def setting_comments():
    """{name: comment} read from the TrainConfig source, for --help."""
    comments = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2)
    return comments


SETTING_TYPES = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def unknown_setting(name, fix=None):
    """The ConfigError for a name that is no setting: the closest setting, else `fix` (if given)."""
    close = difflib.get_close_matches(name, SETTING_TYPES, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    fix = fix if fix and not close else "`python train.py --help` lists them all"
    if name == "config":
        hint = " (a config file is named without a flag: python train.py config/kaggle_t4.py --name=value)"
    return ConfigError(f"unknown setting '{name}'{hint}; {fix}")


def check_setting(name, value):
    """Return value checked against the TrainConfig field's type; ConfigError otherwise."""
    if name not in SETTING_TYPES:
        raise unknown_setting(name)
    expected = SETTING_TYPES[name]
    if expected is object:  # compile: 'auto', True or False
        if value in ("auto", True, False):
            return value
        raise ConfigError(f"{name} must be 'auto', True or False, got {value!r}")
    if expected is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):  # 1e999 parses as inf
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if expected is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # --max_runtime=3600 or --sample_prompt=1984 parse as numbers
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        spelled = " (written True or False)" if expected is bool else ""
        raise ConfigError(f"{name} must be {expected.__name__}{spelled}, got {value!r} ({type(value).__name__})")
    return value


def parse_value(text):
    """`--name=value`: a Python literal, or else the bare text as a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _config_exit(code=None):
    """exit() / quit() in a config file: raised as SystemExit (the built-ins would close stdin first)."""
    raise SystemExit(code)


def refuse_what_sets_nothing(path):
    """A config file written as YAML (`name: value`, a valid Python annotation) or JSON (a dict expression) runs
    without setting anything: a ConfigError naming the line instead. Syntax errors are left to running it."""
    try:
        tree = ast.parse(path.read_bytes(), str(path))
    except (SyntaxError, ValueError):
        return
    bare = {id(n.target) for n in ast.walk(tree) if isinstance(n, ast.AnnAssign) and n.value is None}
    assigned = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
                and id(n) not in bare}  # (`out_dir: str` before an if/else that assigns it is Python's own style)
    for node in tree.body:
        if (isinstance(node, ast.AnnAssign) and node.value is None and getattr(node.target, "id", None) not in assigned
                or isinstance(node, ast.Expr) and isinstance(node.value, (ast.Dict, ast.Set, ast.List))):
            raise ConfigError(f"config file '{path}' line {node.lineno} sets nothing (YAML or JSON?); write plain "
                              f"Python: name = value lines")


def load_config(argv):
    """(TrainConfig, names given on the command line) from an optional config file (plain Python
    assignments) and --name=value overrides."""
    file_values, cli_values = {}, {}
    for arg in argv:
        if arg.startswith("--"):
            name, eq, text = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"'{arg}' needs a value: --{name}=VALUE")
            value = parse_value(text)
            # A text setting keeps what was typed (--out_dir=1.50 is not 1.5), unless it was quoted.
            cli_values[name] = text if SETTING_TYPES.get(name) is str and not isinstance(value, str) else value
        else:
            path = Path(arg)
            if path.is_dir():
                raise ConfigError(f"config file '{arg}' is a folder: give a .py file (the shipped ones are in config/)")
            if path.is_file() and path.suffix != ".py" and path.read_bytes()[:4] == b"PK\x03\x04":  # torch.save's zip
                raise ConfigError(f"'{arg}' is no config file but a checkpoint (or a zip): resume its run with "
                                  f"--resume_from_checkpoint={arg}, or start a new one from its weights with "
                                  f"--init_from={arg}")
            if not path.is_file():
                name, eq, _ = arg.partition("=")
                if eq and name in SETTING_TYPES:  # max_steps=5: a setting without its --
                    raise ConfigError(f"'{arg}' is no config file; a setting is given as --{arg}")
                raise ConfigError(f"config file '{arg}' not found; the shipped ones are in config/")
            # The file runs in its own namespace; its public, non-module names are settings.
            refuse_what_sets_nothing(path)
            try:
                namespace = runpy.run_path(str(path), init_globals={"exit": _config_exit, "quit": _config_exit})
            except (Exception, SystemExit) as e:  # a typo in the file (or an exit() in it): say where, in one line
                line = e.lineno if isinstance(e, SyntaxError) else next(
                    (f.lineno for f in reversed(traceback.extract_tb(e.__traceback__))
                     if Path(f.filename).resolve() == path.resolve()), None)
                detail = (f"SyntaxError: {e.msg}" if isinstance(e, SyntaxError) else
                          f"it calls exit({'' if e.code is None else repr(e.code)})" if isinstance(e, SystemExit) else
                          one_line(e))
                raise ConfigError(f"config file '{arg}'{f' line {line}' if line else ''}: {detail}; fix the file "
                                  f"(it is plain Python: name = value lines)") from None
            values = {name: value for name, value in namespace.items()
                      if not name.startswith("_") and not inspect.ismodule(value) and not callable(value)}
            unknown = [name for name in values if name not in SETTING_TYPES]
            if unknown:
                fix = f"a name of the file's own, not a setting, starts with _ (as _{unknown[0]})"
                raise ConfigError(f"config file '{arg}': {unknown_setting(unknown[0], fix)}")
            file_values.update(values)
    checked = {name: check_setting(name, value) for name, value in {**file_values, **cli_values}.items()}
    for name in ("data_dir", "out_dir", "checkpoint_dir", "init_from"):  # --out_dir=~/runs: no shell expands that ~
        if name in checked and checked[name].startswith("~"):
            checked[name] = os.path.expanduser(checked[name])
    return TrainConfig(**checked), set(cli_values)


def print_help():
    print(__doc__)
    comments = setting_comments()
    for f in dataclasses.fields(TrainConfig):
        print(f"  --{f.name}={f.default!r}".ljust(44) + comments.get(f.name, ""))


def parse_duration(text):
    """'8h30m', '90m', '45s', '3600' -> seconds (0 for '')."""
    if text in ("", None):
        return 0.0
    if isinstance(text, (int, float)) or re.fullmatch(r"\d+(\.\d+)?", str(text)):
        return float(text)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", str(text).strip())
    if not parts or not any(parts.groups()):
        raise ConfigError(f"max_runtime '{text}' is not a duration; use e.g. '8h30m', '90m' or seconds")
    h, m, s = (int(g or 0) for g in parts.groups())
    return h * 3600.0 + m * 60.0 + s


def _same_source(a, b):
    """Whether two init_from values name the same source ('' is 'scratch'; ./x and x are one path)."""
    norm = [os.path.normpath(os.path.expanduser(s)) if s not in ("", "scratch") else "scratch" for s in (a, b)]
    return norm[0] == norm[1]


def model_config(cfg):
    return GPTConfig.from_dict(dataclasses.asdict(cfg))


def check_accumulation(cfg, world_size):
    """Each of world_size processes takes an equal share of the accumulation steps."""
    if cfg.gradient_accumulation_steps % world_size:
        fit = -(-cfg.gradient_accumulation_steps // world_size) * world_size
        per_step = cfg.batch_size * cfg.gradient_accumulation_steps
        keep = (f" --batch_size={per_step // fit} (the same {per_step} sequences per step)"
                if per_step % fit == 0 and per_step // fit != cfg.batch_size else "")
        raise ConfigError(f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be divisible by "
                          f"the number of processes ({world_size}): use --gradient_accumulation_steps={fit}{keep}")


def validate(cfg, world_size=1):
    """ConfigError for settings no run can use; world_size: the processes the run is launched with."""
    check_accumulation(cfg, world_size)
    try:
        model_config(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.max_length > cfg.n_positions:
        raise ConfigError(f"max_length ({cfg.max_length}) exceeds n_positions ({cfg.n_positions}); lower max_length")
    if not cfg.out_dir.strip():
        raise ConfigError("out_dir is empty; name a folder (out_dir='.' for the current one)")
    final = (Path(cfg.out_dir) / ckpt.FINAL_MODEL_DIR).expanduser().resolve()
    checkpoints = run_folders(cfg)[1].expanduser().resolve()
    if cfg.export_final_model and (checkpoints == final or final in checkpoints.parents):
        raise ConfigError(f"checkpoint_dir {cfg.checkpoint_dir} lies in {final}, which the export at the end "
                          f"replaces whole: pick another checkpoint_dir")
    if cfg.export_final_model and not cfg.bias:  # (else found by the export, at the end of the whole run)
        raise ConfigError("bias=False cannot be exported to final_model/ (HF GPT-2 has biases in every Linear and "
                          "LayerNorm): add --export_final_model=False, or train with bias=True")
    for name in ("max_length", "batch_size", "gradient_accumulation_steps", "eval_steps", "save_steps",
                 "max_checkpoints", "log_steps", "max_nonfinite"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("max_grad_norm", "eval_iters", "max_steps", "warmup_steps", "learning_rate", "min_lr", "weight_decay",
                 "sample_tokens"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must not be negative, got {getattr(cfg, name)}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {getattr(cfg, name)} (AdamW's defaults: 0.9, 0.95)")
    if 0 < cfg.learning_rate < cfg.min_lr:
        raise ConfigError(f"min_lr ({cfg.min_lr}) is above learning_rate ({cfg.learning_rate}), where the decay would "
                          f"climb instead; lower min_lr")
    if not 0 <= cfg.seed < 2 ** 32:
        raise ConfigError(f"seed must be in [0, 2**32), got {cfg.seed}")
    if cfg.max_steps == 0 and cfg.epochs < 1:
        raise ConfigError(f"epochs must be at least 1 (or set max_steps), got {cfg.epochs}")
    if cfg.lr_decay not in ("cosine", "linear", "constant"):
        raise ConfigError(f"lr_decay must be 'cosine', 'linear' or 'constant', got {cfg.lr_decay!r}")
    parse_duration(cfg.max_runtime)
    if not 0 <= cfg.max_runtime_from <= time.time() + 60:
        raise ConfigError(f"max_runtime_from must be a Unix time not in the future (`date +%s` gives now), or 0 for "
                          f"train.py's start; got {cfg.max_runtime_from:g}")
    try:
        hardware.normalize_dtype(cfg.dtype)
        hardware.normalize_compile(cfg.compile)
    except hardware.HardwareError as e:
        raise ConfigError(str(e)) from None


# --- distributed -----------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def master(self):
        return self.rank == 0


def init_distributed(device_type):
    """Join the torchrun group when launched by torchrun (RANK/WORLD_SIZE set), else a single process."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return Dist()
    d = Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(d.local_rank)
    dist.init_process_group(backend=backend)
    return d


def any_rank(flag, ddp, device):
    """True on every rank when flag is True on any rank (all ranks must call it together)."""
    if not ddp.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def min_over_ranks(value, ddp, device):
    if not ddp.enabled:
        return value
    t = torch.tensor([value], device=device, dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


# --- small pieces of the loop ------------------------------------------------------------------

def raised_by_oom(e):
    """Whether an OutOfMemoryError is e, or what e was raised from or while handling (not `from None`)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, torch.OutOfMemoryError):
            return True
        seen.add(id(e))
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return False


def _has_records(path):
    """Whether path is a history file with at least one record (a damaged one is read_history's to handle)."""
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(records, list) and len(records) > 0


def lr_lambda(cfg, total_steps):
    """Multiplier of learning_rate at a step: linear warmup, then decay to min_lr."""
    floor = cfg.min_lr / cfg.learning_rate if cfg.learning_rate else 0.0

    def at(step):
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_decay == "constant" or total_steps <= cfg.warmup_steps:
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.lr_decay == "cosine" else 1.0 - progress
        return floor + (1.0 - floor) * shape

    return at


def stop_signals():
    """The signals that stop a run: SIGINT, SIGTERM and SIGHUP (a closed terminal), unless SIGHUP is ignored (nohup)
    or the platform has none (Windows, where Ctrl-Break's SIGBREAK stops it instead)."""
    hup = getattr(signal, "SIGHUP", None)
    return [signal.SIGINT, signal.SIGTERM] + ([hup] if hup and signal.getsignal(hup) == signal.SIG_DFL else []) + _BREAK


class StopRequest:
    """SIGINT/SIGTERM (and SIGHUP, a closed terminal or SSH session, unless the run ignores it, as under nohup) set a flag
    the loop checks at each micro-step (under torchrun, at the end of each step, where the ranks agree on it: a rank
    stopping alone would leave the others waiting in their all-reduce) and at each batch of an evaluation. A second
    Ctrl-C (SIGINT) exits at once, unless it comes within REPEAT_GRACE_S of the first: that is the same stop passed
    on (a process group's, or a notebook's, that reaches the launcher and the workers alike), not an impatient user.
    A repeated SIGTERM or SIGHUP never cuts the save short: it is a supervisor's reminder (ipykernel's shutdown of a
    notebook's children sends seven SIGTERMs over 4.4 s, then SIGKILL at 14 s). Under torchrun that includes the
    second Ctrl-C in a terminal: it reaches torchrun alone, which ends its workers with SIGTERM then, as it does on a
    supervisor's SIGTERM after the Ctrl-C, and the two cannot be told apart; so no 'Ctrl-C again' is offered there."""

    REPEAT_GRACE_S = 2.0

    def __init__(self, verbose=True, distributed=False):
        self.signum, self.first_at, self.verbose, self.distributed = None, None, verbose, distributed
        self.where = "the end of the step" if distributed else "the next micro-step"

    def install(self):
        if _EARLY_STOP:  # a stop before training whose exception something swallowed (C code that calls Python
            raise StoppedEarly(_EARLY_STOP[0])  # code and clears its errors, as CPython's PyObject_HasAttr does)
        for s in stop_signals():
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:
            if signum != signal.SIGINT or time.monotonic() - self.first_at < self.REPEAT_GRACE_S:
                return
            print("\nCtrl-C (SIGINT) during the stop: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum, self.first_at = signum, time.monotonic()
        if self.verbose:
            again = "" if self.distributed else (
                " (Ctrl-C again to exit at once)" if signum == signal.SIGINT else " (Ctrl-C to exit at once)")
            print(f"\n{signal.Signals(signum).name} received: stopping at {self.where}, saving an emergency "
                  f"checkpoint{again}", file=sys.stderr, flush=True)


class Logger:
    """Lines to the terminal (above the progress bar) and to out_dir/train.log (rank 0 only)."""

    def __init__(self, path, enabled):
        self.enabled, self.path = enabled, path
        try:
            self.file = self._open() if enabled else None
        except OSError as e:
            fix = fix_for_folder(e, "point out_dir at a writable folder (on Kaggle: under /kaggle/working)")
            raise ConfigError(f"cannot write {path}: {e.strerror}; {fix}") from None
        self.bar = None
        self.failing = False  # the last write to train.log failed (a full disk): warned once, retried each line

    def __call__(self, msg):
        if not self.enabled:
            return
        # A path or prompt with bytes the locale could not decode (surrogate escapes) cannot be printed or
        # written as UTF-8: shown escaped instead of stopping the run.
        msg = msg.encode("utf-8", "backslashreplace").decode("utf-8")
        if self.bar is not None and not self.bar.disable:
            self.bar.write(msg)
        else:
            print(msg, flush=True)
        self.record(msg)

    def close(self):
        """At the run's end (main() may be called again in the same process, as the tests do): lines after it go to
        the terminal only."""
        if self.file is not None:
            try:
                self.file.close()
            except OSError:  # its last lines could not be written (a full disk): said when they were
                pass
            self.file = None

    def _open(self):
        return open(self.path, "a", encoding="utf-8", errors="backslashreplace")

    def reopen(self):
        """A new train.log where the run's was deleted, as the run's next saves make their folders again."""
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        new = self._open()
        self.close()
        self.file = new

    def record(self, msg):
        """Write msg to train.log only (e.g. the error line main() prints to stderr)."""
        if self.file is None:
            return
        # A full disk must not stop training here (nor the emergency save after an error): the terminal has
        # every line anyway, and the file catches up as soon as there is room.
        try:
            if os.fstat(self.file.fileno()).st_nlink == 0:  # deleted under the run (out_dir with it, perhaps)
                self.reopen()
            self.file.write(f"{datetime.now().isoformat(timespec='seconds')} {msg}\n")
            self.file.flush()
        except OSError as e:
            if not self.failing:
                show(f"warning: could not write {self.path}: {e.strerror}; training goes on, lines are missing "
                     f"from it until it can be written again (a full disk: once there is room)")
            self.failing = True
        else:
            self.failing = False


class Throughput:
    """The session's tokens/s, counted from the end of its first step on: that one carries torch.compile's
    compilation (tens of seconds, where a step takes a fraction of one), which would make the figure and the
    estimate of the time left many times too slow. Evaluations and saves since then count (they take time too)."""

    def __init__(self, tokens_per_step):
        self.tokens_per_step, self.steps, self.since = tokens_per_step, 0, time.time()

    def step_done(self):
        self.steps += 1
        now = time.time()
        if self.steps == 1:  # the first step's own rate, until the second
            self.first_rate, self.since = self.tokens_per_step / max(1e-9, now - self.since), now

    def tokens_per_s(self):
        if self.steps <= 1:
            return self.first_rate
        return (self.steps - 1) * self.tokens_per_step / max(1e-9, time.time() - self.since)


def gpu_memory(device_type):
    """{'gpu/allocated_gib', 'gpu/peak_gib'} on CUDA, {} elsewhere."""
    if device_type != "cuda":
        return {}
    return {"gpu/allocated_gib": torch.cuda.memory_allocated() / 2**30,
            "gpu/peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def memory_note(device_type):
    mem = gpu_memory(device_type)
    return f"mem {mem['gpu/allocated_gib']:.2f}G peak {mem['gpu/peak_gib']:.2f}G" if mem else ""


def fmt_duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def read_history(path, keep):
    """Records of a JSON list file that `keep` accepts (a resumed run drops what came after its checkpoint).
    A file that is not such a list (damaged, edited) is moved aside to NAME.unreadable-TIME with a warning,
    never silently overwritten by the run's next write."""
    if not path.exists():
        return []
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(records, list):
            raise ValueError(f"a JSON {type(records).__name__}, not a list of records")
        odd = next((r for r in records if not isinstance(r, dict)), None)
        if odd is not None:
            raise ValueError(f"it holds {odd!r:.40}, not a record")
        kept = [r for r in records if keep(r)]  # TypeError: an edited record, e.g. {"step": "4"}
    except (ValueError, OSError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        aside = path.with_name(f"{path.name}.unreadable-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
        try:
            path.rename(aside)
            where = f"moved to {aside.name}"
        except OSError:
            where = "left as it is"
        say(f"warning: {path} is not a list of records ({one_line(e)}): {where}; the run starts a new one")
        return []
    return kept


# --- the run -----------------------------------------------------------------------------------

def run_folders(cfg):
    """(out_dir, checkpoint_dir) of a run."""
    out_dir = Path(cfg.out_dir)
    return out_dir, Path(cfg.checkpoint_dir or out_dir / ckpt.CHECKPOINTS_SUBDIR)


def _make_folder(path, made):
    """Path.mkdir(parents=True, exist_ok=True) of `path` as given (the kernel resolves its '..' and links), appending
    each folder this call made to `made` (not one another process made meanwhile)."""
    made.append(path)  # (before the mkdir: a Ctrl-C as it returns finds it; one before it, a folder that is not there)
    try:
        os.mkdir(path)
    except FileNotFoundError:
        made.pop()
        if path.parent == path:
            raise
        _make_folder(path.parent, made)
        _make_folder(path, made)
    except OSError:
        made.pop()
        if not path.is_dir():
            raise


def make_run_folders(cfg, made=None):
    """Create out_dir and checkpoint_dir (rank 0's job), or a ConfigError naming the folder and the fix. The folders
    this call makes, parents included, are appended to `made` as they are made (so that a Ctrl-C meanwhile still
    finds them)."""
    made = [] if made is None else made
    for folder in run_folders(cfg):
        try:
            _make_folder(folder, made)
            ckpt.check_writable(folder)  # a folder that exists may still refuse files (read-only)
        except OSError as e:
            hint = (" (to resume from checkpoints in a read-only folder, name one with --resume_from_checkpoint=PATH)"
                    if folder != Path(cfg.out_dir) else "")
            fix = fix_for_folder(e, f"point out_dir (and checkpoint_dir) at a writable folder (on Kaggle: under "
                                    f"/kaggle/working){hint}")
            raise ConfigError(f"cannot write in {folder}: {e.strerror}; {fix}") from None


LOCK_NAME = ".train.lock"
LOG_NAME = "train.log"


def remove_refused_run_folders(created):
    """A run refused (or stopped) before training leaves no folders behind: those it created (make_run_folders, in
    the order it made them; none another run holds), last first, go if they hold nothing but its own lock and
    train.log, once its own temp files are gone (a stop can land as the check that a folder takes files is about to
    remove its file). Anything else in one keeps it."""
    for folder in reversed(created):
        ckpt.remove_stale_temps(folder)  # (this process's, and dead writers')
        try:
            names = {p.name for p in folder.iterdir()}
            if names <= {LOCK_NAME, LOG_NAME}:
                for name in names:
                    (folder / name).unlink()
                folder.rmdir()
        except OSError:  # (not there, or not empty: the next, never in the way of the line that says why it stopped)
            continue


@contextlib.contextmanager
def run_lock(cfg):
    """Hold out_dir (and checkpoint_dir) for this run: a second train.py on the same folder would overwrite its
    checkpoints, best model and histories. The lock is the kernel's (flock), so a run killed any way, even with
    kill -9, leaves none behind. ConfigError naming the other run's process if one holds it. Where the
    filesystem has no locks (or on Windows), nothing is held."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    with contextlib.ExitStack() as held:
        # One lock per folder, however it is spelled (out_dir/checkpoints given as an absolute path, a symlink).
        for folder in dict.fromkeys(Path(os.path.realpath(f)) for f in run_folders(cfg)) if fcntl else ():
            path = folder / LOCK_NAME
            try:
                f = held.enter_context(open(path, "a+", encoding="utf-8"))
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                other = f.read().strip() or "another process"
                raise FolderInUse(f"{folder} is in use by another train.py ({other}): two runs in one folder would "
                                  f"overwrite each other's checkpoints; wait for it, stop it, or give this run "
                                  f"other folders (out_dir, checkpoint_dir)", folder) from None
            except OSError:
                continue  # no locks on this filesystem: run unlocked, as before
            try:  # who holds it, for the message above (a full disk must not stop the run here)
                f.truncate(0)
                f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
                f.flush()
            except OSError:
                pass
        yield


class Trainer:
    """Holds the run's state; `run()` is the loop, the methods are its named pieces."""

    def __init__(self, cfg, ddp, given=()):
        self.cfg, self.ddp = cfg, ddp
        self.given = set(given)  # settings named on the command line: init_from must not silently override them
        self.out_dir, self.checkpoint_dir = run_folders(cfg)
        if ddp.master:
            make_run_folders(cfg)
        self.stop = StopRequest(verbose=ddp.master, distributed=ddp.enabled)
        self.t0 = None  # when this session's training started (start_session)
        self.max_runtime = parse_duration(cfg.max_runtime)
        # Test hooks (tests/test_train.py): a real OutOfMemoryError above a micro-batch size (on one rank only,
        # if given; in the last micro-batch's backward instead of the forward, if asked), a NaN loss at given
        # steps, an error in the evaluation of a step or after a step's saves (where a lost peer shows under DDP),
        # a pause per micro-step so that signals land mid-run, and cuda_graphs' bookkeeping on a CPU (where inductor
        # runs the compiled step without graphs and counts it skipped).
        oom_above, oom_rank = os.environ.get("GPT_TEST_OOM_ABOVE_BATCH"), os.environ.get("GPT_TEST_OOM_RANK")
        self.test_oom_above = int(oom_above) if oom_above and oom_rank in (None, str(ddp.rank)) else None
        self.test_error_at_eval = int(os.environ.get("GPT_TEST_ERROR_AT_EVAL_STEP", "0"))
        self.test_error_after = int(os.environ.get("GPT_TEST_ERROR_AFTER_STEP", "0"))
        self.test_oom_in_last_backward = os.environ.get("GPT_TEST_OOM_IN_LAST_BACKWARD") == "1"
        self.test_nan_steps = {int(s) for s in os.environ.get("GPT_TEST_NAN_AT_STEPS", "").split(",") if s}
        self.test_step_delay = float(os.environ.get("GPT_TEST_STEP_DELAY", "0"))
        self.test_history_write_failures = int(os.environ.get("GPT_TEST_FAIL_HISTORY_WRITES", "0"))
        self.unwritten_histories = {}  # {file name: records} whose last write failed (write_history)
        self.test_signal_in_eval = int(os.environ.get("GPT_TEST_SIGTERM_IN_EVAL_STEP", "0")) if ddp.master else 0
        self.test_graphs_on_cpu = os.environ.get("GPT_TEST_CUDA_GRAPHS_ON_CPU") == "1"
        self.log = Logger(self.out_dir / LOG_NAME, ddp.master)  # last: train_main closes it once it has a Trainer

    # setup ------------------------------------------------------------------------------------
    def setup(self):
        cfg, ddp = self.cfg, self.ddp
        device_type = hardware.choose_device(cfg.device)
        self.device = f"cuda:{ddp.local_rank}" if device_type == "cuda" and ddp.enabled else (
            hardware.device_for(cfg.device, device_type))
        self.device_type = device_type
        self.facts = facts = hardware.probe_facts(self.device)
        hardware.preflight(facts)
        hardware.decide(facts, cfg.dtype, cfg.compile)  # a dtype this device cannot run fails before any data work
        if ddp.enabled:
            hardware.nccl_check()  # before any other collective: it is the one with a timeout
        check_accumulation(cfg, ddp.world_size)

        resume = ckpt.find_checkpoint(cfg.resume_from_checkpoint, self.checkpoint_dir, self.out_dir)
        # A fresh start moves an earlier run's history in out_dir aside (a fresh start over checkpoints: refused below).
        if resume is None and not ckpt.checkpoint_files(self.checkpoint_dir, self.out_dir):
            self.keep_an_earlier_history()
        self.refuse_a_moved_checkpoint_dir(resume)
        init_source = self.load_init_source(resume)
        cfg = self.cfg
        self.train_bins = TokenBins(cfg.data_dir, "train", cfg.max_length, cfg.seed, ddp.rank, ddp.world_size,
                                    cfg.vocab_size)
        self.val_bins = TokenBins(cfg.data_dir, "val", cfg.max_length, cfg.seed, ddp.rank, ddp.world_size,
                                  cfg.vocab_size)
        self.batch_size = cfg.batch_size
        self.accum = cfg.gradient_accumulation_steps // ddp.world_size  # micro-steps per process
        # The val windows each evaluation scores (None: all): the run's, kept by a resume with another batch_size.
        self.val_windows = val_windows(cfg.eval_iters, cfg.batch_size)
        windows_per_step = cfg.batch_size * cfg.gradient_accumulation_steps
        self.steps_per_epoch = self.train_bins.n_windows // windows_per_step
        if self.steps_per_epoch == 0:
            raise DataError(f"the train split of {cfg.data_dir} has {self.train_bins.n_windows} sequences of "
                            f"{cfg.max_length + 1} tokens, fewer than one step needs ({windows_per_step}); lower "
                            f"batch_size, gradient_accumulation_steps or max_length, or add data")
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.tokens_per_step = windows_per_step * cfg.max_length

        # Each process compiles for itself and trains its share of the tokens this session has left: that decides
        # (CPU; a resume with a few steps to go does not compile for them).
        done = ckpt.peek_step(resume) if resume is not None else 0
        left_s = max(1.0, self.max_runtime - self.elapsed_session()) if self.max_runtime else None  # (max_runtime_from)
        self.plan = hardware.decide(facts, cfg.dtype, cfg.compile, planned_tokens=max(
            0, self.total_steps - done) * self.tokens_per_step // ddp.world_size, cuda_graphs=cfg.cuda_graphs,
            world_size=ddp.world_size, max_seconds=left_s)
        if self.test_graphs_on_cpu and self.plan.compile:
            self.plan = dataclasses.replace(self.plan, cuda_graphs=True)
        torch.manual_seed(cfg.seed + ddp.rank)
        try:
            self.model = GPT(model_config(cfg)).to(self.device)
        except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError, as a failed CPU alloc
            if not (isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "alloc" in str(e).lower()):
                raise
            E, inner = cfg.n_embd, cfg.n_inner
            gb = 4 * ((cfg.vocab_size + cfg.n_positions) * E + cfg.n_layer * (4 * E * E + 2 * E * inner)) / 1e9
            raise hardware.HardwareError(f"the model's weights (~{gb:,.1f} GB in fp32) do not fit in "
                                         f"{self.device_type} memory; lower vocab_size, n_positions, n_embd or "
                                         f"n_layer") from None
        self.optimizer = configure_optimizer(self.model, cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                             device_type=device_type)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.total_steps))
        self.scaler = hardware.grad_scaler(self.plan)
        self.step, self.tokens_seen, self.best_val_loss = 0, 0, float("inf")
        # Which run a checkpoint belongs to: drawn when a run starts (from os.urandom: no RNG stream moves), kept
        # by its resumes, so that a resume is refused into folders holding another run's checkpoints.
        self.run_id = uuid.uuid4().hex[:16]
        self.val_loss, self.last_train_loss, self.epoch_loss_sum, self.epoch_loss_count = None, None, 0.0, 0
        self.last_step_finite = True  # the latest step's loss was finite (else its update was skipped)
        self.elapsed_before = 0.0  # training seconds of earlier sessions of this run
        # (epoch loss sums) from a completed step until its evaluation is done: an error in between
        # writes an emergency checkpoint that has resume redo that evaluation.
        self.pending_after_step = None
        self.graph_skips_seen = hardware.cuda_graph_skips()  # inductor's count is for the whole process
        self.plot_failure = None  # why the last redraw of loss_curve.png failed, if it did
        # (data state, RNG state) at the start of the step in progress; (None, None) between steps, where a
        # checkpoint takes the state as it is.
        self.step_start = (None, None)

        if cfg.resume_from_checkpoint not in ("auto", "latest"):  # those resume the newest, or find none
            self.refuse_newer_checkpoints(resume)
        newer_format = ckpt.newer_format_files(self.checkpoint_dir, self.out_dir) if resume else []
        if newer_format:  # ('auto' skips them, so it resumes from an older one of ours)
            raise ConfigError(f"resuming from {resume}, but checkpoints of a newer format (a newer version of this "
                              f"trainer's) are here: {_some(newer_format)}; this run would overwrite or rotate them "
                              f"away: update the code (git pull), or move them away first")
        if resume is not None:
            self.restore(resume)
        if ddp.enabled and min_over_ranks(self.step, ddp, self.device) != -min_over_ranks(-self.step, ddp, self.device):
            raise ConfigError("the processes found different checkpoints to resume from: on several machines, "
                              "out_dir and checkpoint_dir must be on a filesystem that every node shares")
        if resume is not None:
            # (after the check above: they have every rank agree) Another val split: the run's best is no yardstick.
            other_val = any_rank(not self.val_bins.holds(self.resumed_val_fingerprint), ddp, self.device)
            self.carry_over_its_run(resume, its_best=not other_val)
            if other_val:
                self.start_the_best_over_on_another_val_split()
        if resume is None:
            if cfg.resume_from_checkpoint == "auto":
                self.log(f"resume: no checkpoint in {self.out_dir} or {self.checkpoint_dir}, so this is a fresh run "
                         f"(to continue one whose checkpoints are elsewhere, an earlier Kaggle session's output say, "
                         f"give --resume_from_checkpoint=PATH)")
            if init_source is not None:
                self.model.load_state_dict(init_source.state_dict())
                self.log(f"initialised weights from {cfg.init_from}")
            self.train_bins.start_epoch(0)
        del init_source
        self.train_model = self.model
        if self.plan.compile:
            self.train_model = hardware.compile_or_eager(
                self.model, True, **({"mode": "reduce-overhead"} if self.plan.cuda_graphs else {}))
        if self.plan.cuda_graphs:
            # The backward graph's gradients live in the graphs' memory, which the next replay writes over: a
            # parameter without .grad would take the first micro-batch's gradient tensor itself as its .grad,
            # and the next micro-batch would overwrite it (pytorch/pytorch#96693). Gradients allocated once here
            # and zeroed in place (_update) are added into instead: the same sums, bit for bit. (An out-of-memory
            # back-off, the one place that frees them, turns the graphs off.)
            for p in self.model.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
        if ddp.enabled:
            self.train_model = self.wrap_ddp(self.train_model)
        self.autocast = hardware.autocast(device_type, self.plan.dtype)

    def wrap_ddp(self, module):
        return torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[self.ddp.local_rank] if self.device_type == "cuda" else None)  # no buffers to sync

    # the loop ---------------------------------------------------------------------------------
    def run(self):
        """The training loop: 0 when the run (or this session of it) ended with its last step saved."""
        cfg, ddp = self.cfg, self.ddp
        bar = self.start_session()
        final_saved = True
        try:
            if self.pending_after_step is not None:
                self.log(f"redoing the evaluation of step {self.step}, which was cut short")
                if not self.after_step(cfg.learning_rate * lr_lambda(cfg, self.total_steps)(self.step - 1)):
                    return self.emergency_exit(after_step_pending=True)
                if self.step >= self.total_steps:  # the last step's: its end was not saved (the loop does that)
                    final_saved = self.save_rotated(session_end=True)
            while self.step < self.total_steps:
                if self.train_bins.epoch != self.step // self.steps_per_epoch:
                    self.train_bins.start_epoch(self.step // self.steps_per_epoch)
                lr = self.scheduler.get_last_lr()[0]
                loss = self.train_step()
                if loss is None:  # stopped inside the step: it is redone on resume
                    return self.emergency_exit(self.step_start)
                self.complete_step(loss)
                if self.nonfinite >= cfg.max_nonfinite:
                    return self.nonfinite_exit(self.nonfinite)
                self.pending_after_step = (self.epoch_loss_sum, self.epoch_loss_count)
                self.report_progress(bar, loss, lr)
                last = self.step == self.total_steps
                if not self.after_step(lr):  # a stop cut its evaluation short
                    return self.emergency_exit(after_step_pending=True)
                out_of_time = self.max_runtime and any_rank(self.elapsed_session() > self.max_runtime, ddp, self.device)
                if self.step % cfg.save_steps == 0 or last or out_of_time:
                    final_saved = self.save_rotated(session_end=last or out_of_time)
                if self.step == self.test_error_after:
                    raise RuntimeError(f"injected: an error after step {self.step}")
                if out_of_time and not last:
                    if final_saved:  # else the error line below says what is on disk
                        self.log(f"max_runtime ({cfg.max_runtime}) reached at step {self.step}: stopped cleanly. "
                                 f"Resume with: {self.resume_command()}")
                    break
                if any_rank(self.stop.signum is not None, ddp, self.device) and not last:
                    return self.emergency_exit()
        except BaseException as e:
            # Anything unexpected: keep the last completed step's state, then let the error through.
            if self.ddp.master and self.step > 0 and not isinstance(e, SystemExit):
                self.log("error during training: writing an emergency checkpoint of the last completed step")
                self.save_emergency_local()
            raise
        finally:
            bar.close()
            self.tracker.close()
        self.finish()
        return 0 if final_saved else self.last_save_failed()

    def start_session(self):
        """The session's opening lines, histories, signal handlers, tracker and progress bar (returned)."""
        from tqdm import tqdm
        cfg, ddp = self.cfg, self.ddp
        self.stop.install()  # before the first line: a signal after it stops the run with its save
        self.t0 = time.time()  # (training has started: train_main keeps its folders, whatever happens)
        self.banner(self.model.num_params(), self.model.num_params(non_embedding=True))
        self.log("config: " + ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(cfg).items()))
        done_epochs = self.step // self.steps_per_epoch
        # The histories are rank 0's to read and write (one warning, one file moved aside if it is damaged).
        self.history = read_history(self.out_dir / plot.EPOCH_HISTORY,
                                    lambda r: r.get("epoch", 0) <= done_epochs) if ddp.master else []
        self.eval_history = read_history(self.out_dir / plot.EVAL_HISTORY,
                                         lambda r: r.get("step", 0) <= self.step) if ddp.master else []
        self.tracker = Tracker(self.out_dir, cfg.tensorboard, cfg.wandb_project, dataclasses.asdict(cfg),
                               start_step=self.step, enabled=ddp.master, wandb_run_name=cfg.wandb_run_name)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=None if ddp.master else True, unit="step",
                   **bar_size())
        self.log.bar = bar
        self.nonfinite = 0  # non-finite losses in a row
        self.sample_ids = None  # sample_prompt's tokens, read at the first sample
        self.throughput = Throughput(self.tokens_per_step)
        if self.step >= self.total_steps and self.pending_after_step is None:
            self.log(f"nothing to train: the run is at step {self.step}, and "
                     f"{f'max_steps={cfg.max_steps}' if cfg.max_steps else f'epochs={cfg.epochs}'} ends it at step "
                     f"{self.total_steps} (raise it to train on)")
        return bar

    def complete_step(self, loss):
        """Count the step just done: its tokens, its loss in the epoch's mean, or one more non-finite in a row."""
        self.step_start = (None, None)  # the step is done: an error from here on keeps it
        self.step += 1
        self.throughput.step_done()
        self.tokens_seen += self.tokens_per_step
        self.last_step_finite = math.isfinite(loss)
        if self.last_step_finite:
            self.nonfinite = 0
            self.last_train_loss = loss
            self.epoch_loss_sum += loss
            self.epoch_loss_count += 1
        else:
            self.nonfinite += 1
            self.log(f"step {self.step}: non-finite loss or gradient, update skipped ({self.nonfinite} in a row)")

    def report_progress(self, bar, loss, lr):
        """The bar, the tracker, a step line every log_steps, and after the session's tenth step the time left."""
        cfg, tok_s = self.cfg, self.throughput.tokens_per_s()
        bar.set_description(f"epoch {self.epoch_of(self.step)}/{math.ceil(self.total_steps / self.steps_per_epoch)}")
        bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {tok_s:,.0f} tok/s {memory_note(self.device_type)}".strip())
        bar.update(1)
        self.tracker.log(self.step, {"train/loss": loss, "train/lr": lr, "train/grad_norm": self.grad_norm,
                                     "train/tokens_per_s": tok_s, **gpu_memory(self.device_type)})
        if self.ddp.master and self.step % cfg.log_steps == 0:  # with a bar on screen: train.log's only
            (self.log if bar.disable else self.log.record)(
                f"step {self.step}/{self.total_steps}: loss {loss:.4f}, lr {lr:.2e}, {tok_s:,.0f} tok/s "
                f"{memory_note(self.device_type)}".rstrip())
        if self.throughput.steps == 10:
            left = (self.total_steps - self.step) * self.tokens_per_step / tok_s
            self.log(f"estimated time left: {fmt_duration(left)} at {tok_s:,.0f} tokens/s")

    def save_rotated(self, session_end):
        """A rotated checkpoint; True when it is on disk. A session's end must be: out_dir's emergency checkpoint
        takes it when checkpoint_dir can't."""
        saved = self.save("rotated")
        if not saved and session_end:
            saved = self.save("emergency")
        return saved

    def last_save_failed(self):
        """1 when this session's last step is on disk nowhere (not a success to a script or a notebook), with the
        line that says so; 0 when a checkpoint has it all the same (best_model.pt)."""
        if not self.ddp.master:
            return 0
        newest = ckpt.newest_checkpoint(self.checkpoint_dir, self.out_dir)
        if newest is not None and newest[0] >= self.step:
            return 0
        self.log(f"error: the last checkpoint (step {self.step}) could not be saved (see the warning above); "
                 f"{self.newest_note(newest)}. Fix what the warnings say (free disk space, a folder that can be "
                 f"written) and run the same command again to redo those steps")
        return 1

    # one optimizer step -----------------------------------------------------------------------
    def train_step(self):
        """Forward/backward over the step's micro-batches and one update. Returns the mean loss, or None
        when a stop was requested before the step finished (the step is then redone on resume)."""
        self.step_start = (self.train_bins.state_dict(), ckpt.capture_rng_state())
        while True:
            try:
                loss = self._accumulate_and_update()
                if self.plan.cuda_graphs:
                    self.check_graph_skips()
                return loss
            except torch.OutOfMemoryError:
                pass
            except Exception as e:
                # A CUDA graph whose capture runs out of memory may end with an error of its own from the capture.
                if not (self.plan.cuda_graphs and raised_by_oom(e)):
                    raise
            # Outside the except block: the exception's traceback no longer holds the failed step's tensors,
            # so back_off_oom's empty_cache can hand their memory back.
            self.back_off_oom()

    def _accumulate_and_update(self):
        total = torch.zeros((), device=self.device)
        oom = False
        for micro in range(self.accum):
            if self.stop.signum is not None and not self.ddp.enabled:
                return None
            last = micro == self.accum - 1
            if self.test_step_delay:
                time.sleep(self.test_step_delay / self.accum)
            x, y = self.train_bins.next_batch(self.batch_size, self.device)
            # Under DDP gradients are all-reduced only after the last micro-batch.
            sync = contextlib.nullcontext() if (last or not self.ddp.enabled) else self.train_model.no_sync()
            loss = None
            if not oom:
                try:
                    if self.plan.cuda_graphs:  # each micro-batch's replay may reuse the last one's memory
                        torch.compiler.cudagraph_mark_step_begin()
                    with sync, self.autocast:
                        self.inject_oom(in_last_backward=False)
                        _, loss = self.train_model(x, y, return_logits=False)
                except torch.OutOfMemoryError:
                    oom = True
            # A rank out of memory must not leave the others waiting in the all-reduce: all agree
            # before the synchronising backward, and all back off together.
            if (oom and not self.ddp.enabled) or (last and any_rank(oom, self.ddp, self.device)):
                raise torch.OutOfMemoryError("out of memory")
            if oom:
                continue
            try:
                if last:
                    self.inject_oom(in_last_backward=True)
                self.scaler.scale(loss / self.accum).backward()
            except torch.OutOfMemoryError:
                # In the last backward the other ranks may be in the gradient all-reduce: the back-off's own
                # collective then works only if they ran out of memory too (the usual case: the same shapes).
                if last or not self.ddp.enabled:
                    raise
                oom = True
                continue
            total += loss.detach()
        if self.step + 1 in self.test_nan_steps:
            total = total * float("nan")
        try:  # a smaller micro-batch saves nothing from here on: no retry (and no half-done update redone)
            return self._update(total)
        except torch.OutOfMemoryError:
            raise hardware.HardwareError(
                "out of memory in the optimizer update (AdamW keeps two fp32 copies of the parameters, and the "
                "batch's activations are freed by then): use a smaller model (n_layer, n_embd) or a GPU with more "
                "memory") from None

    def inject_oom(self, in_last_backward):
        """Test hook: a real OutOfMemoryError above GPT_TEST_OOM_ABOVE_BATCH, in the forward or (if asked) the
        last micro-batch's backward."""
        if (self.test_oom_above is not None and self.batch_size > self.test_oom_above
                and in_last_backward == self.test_oom_in_last_backward):
            raise torch.OutOfMemoryError(f"injected: micro-batch {self.batch_size} > {self.test_oom_above}")

    def _update(self, total):
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm or float("inf"))
        loss = total.item() / self.accum
        if self.ddp.enabled:
            t = torch.tensor([loss], device=self.device)
            dist.all_reduce(t)
            loss = t.item() / self.ddp.world_size
        finite = math.isfinite(loss) and (self.scaler.is_enabled() or math.isfinite(norm.item()))
        if finite:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=not self.plan.cuda_graphs)
        self.scheduler.step()
        self.grad_norm = norm.item()
        return loss if finite else float("nan")

    def check_graph_skips(self):
        """After a step with cuda_graphs: say so when inductor has newly decided to run compiled graphs without them
        (mostly when it compiles, at the first step; also later, e.g. a graph re-recorded too often)."""
        skipped = hardware.cuda_graph_skips() - self.graph_skips_seen
        if skipped > 0:
            self.graph_skips_seen += skipped
            self.log(f"warning: cuda_graphs: inductor runs {skipped} compiled {plural(skipped, 'graph')} of the step "
                     f"without CUDA graphs (PyTorch's log says why; TORCH_LOGS=perf_hints on older versions)")

    def back_off_oom(self):
        self.optimizer.zero_grad(set_to_none=True)
        if self.plan.cuda_graphs:
            # A graph recorded for the old micro-batch is of no use for the new one, and an error while one was
            # being recorded may have left PyTorch's graph bookkeeping half done: drop them all (and the memory
            # they hold), and go on compiled without graphs.
            if self.device_type == "cuda":
                torch.cuda.synchronize()  # a failed warm-up can leave its side stream running
            self.plan = dataclasses.replace(self.plan, cuda_graphs=False)
            torch._dynamo.reset()
            gc.collect()  # cycles (the error's frames, inductor's objects) may hold tensors of the graphs' memory
            self.train_model = hardware.compile_or_eager(self.model, True)
            self.log("out of memory: cuda_graphs off for the rest of this session (their memory is freed)")
        if self.device_type == "cuda":
            torch.cuda.empty_cache()
        # The largest micro-batch of at most half the size that divides this process's sequences per step,
        # so that the effective batch stays exactly what it was (10 -> 5 -> 2 x 5 accumulation).
        per_step = self.batch_size * self.accum
        new_batch = max((b for b in range(1, self.batch_size // 2 + 1) if per_step % b == 0), default=0)
        new_batch = min_over_ranks(new_batch, self.ddp, self.device)
        if new_batch < 1:
            raise hardware.HardwareError("out of memory even at batch_size=1; lower max_length or the model size, "
                                         "or use a GPU with more memory")
        self.batch_size, self.accum = new_batch, per_step // new_batch
        self.log(f"out of memory: micro-batch now {self.batch_size} x {self.accum * self.ddp.world_size} accumulation "
                 f"steps (same effective batch); redoing step {self.step + 1}")
        if self.ddp.enabled:  # a rank that got through its synchronised forward left DDP waiting for a backward
            self.train_model = self.wrap_ddp(self.train_model.module)
        self.train_bins.load_state_dict(self.step_start[0])
        ckpt.restore_rng_state(self.step_start[1])

    # evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self):
        """Mean val loss over the val split (or its first eval_iters x batch_size windows, as the run set them at
        its start: whatever the number of processes, the batch a resume sets or an out-of-memory back-off),
        averaged over all ranks; None when a stop cut it short."""
        if self.step == self.test_error_at_eval:
            self.test_error_at_eval = 0  # once per process
            raise RuntimeError(f"injected: an error in the evaluation of step {self.step}")
        self.model.eval()
        loss_sum, count = 0.0, 0  # (Python floats: float64, which MPS has not)
        batches = self.val_bins.eval_batches(self.batch_size, self.val_windows, self.device)
        for _ in range(self.val_bins.eval_batch_count(self.batch_size, self.val_windows)):
            # A stop cuts it short (agreed by the ranks at each batch): a whole val split can take minutes, and the
            # seconds a supervisor (or torchrun) gives before its SIGKILL go to the save; the resume evaluates again.
            if any_rank(self.stop.signum is not None, self.ddp, self.device):
                self.model.train()
                return None
            batch = next(batches, None)
            if batch is None:  # (this rank's share has one batch fewer)
                continue
            x, y = batch
            with self.autocast:
                _, loss = self.model(x, y, return_logits=False)
            loss_sum, count = loss_sum + loss.item() * y.numel(), count + y.numel()
            if self.step == self.test_signal_in_eval:
                self.test_signal_in_eval = 0
                os.kill(os.getpid(), signal.SIGTERM)
        if self.ddp.enabled:
            total = torch.tensor([loss_sum, count], device=self.device, dtype=torch.float64)
            dist.all_reduce(total)
            loss_sum, count = total.tolist()
        self.model.train()
        return loss_sum / count if count else float("nan")

    def sample(self):
        if not self.cfg.sample_prompt or not self.ddp.master or self.cfg.vocab_size < N_VOCAB:
            return  # (a model smaller than the GPT-2 vocabulary, on data of its own ids, has no text to show)
        if self.stop.signum is not None:  # a stop is due: its seconds go to the save (a sample is for show)
            return
        if not math.isfinite(self.val_loss):  # weights gone NaN: nothing to draw from (multinomial would raise)
            self.log("sample: none, the model's outputs are not finite")
            return
        # Read and drawn as sample.py does (its settings): the sample here is what sample.py gives for that prompt.
        if self.sample_ids is None:  # once a session (a prompt longer than the context says so once)
            self.sample_ids = sample.encode_prompt(self.cfg.sample_prompt, self.cfg.n_positions, say=self.log)
        idx = self.sample_ids.to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed)  # leaves the training RNG alone
        with self.autocast:
            # A vocabulary larger than the tokenizer's has ids nothing decodes: never drawn.
            out = self.model.generate(idx, self.cfg.sample_tokens, temperature=sample.TEMPERATURE, top_k=sample.TOP_K,
                                      eos_token_id=EOT_TOKEN, generator=gen, vocab_limit=N_VOCAB)
        text = get_tokenizer().decode(out[0].tolist()).replace("\n", " ")
        self.log(f"sample: {text}")

    def epoch_of(self, step):
        """The epoch (from 1) that `step` completes or lies in; step 0 is in the first."""
        return max(1, math.ceil(step / self.steps_per_epoch))

    def elapsed(self):
        return self.elapsed_before + time.time() - self.t0

    def run_eval(self, lr, epoch_end):
        """Evaluate, record it, close the epoch if this step ends one, then save the best model: after the
        epoch record, so that a resume from best_model.pt starts the next epoch's train loss afresh. False (and
        nothing done) when a stop cut the evaluation short."""
        val = self.evaluate()
        if val is None:
            return False
        self.val_loss = val
        improved = val < self.best_val_loss
        ppl = plot.perplexity(val)
        self.log(f"step {self.step}: val loss {val:.4f}, perplexity {plot.perplexity_text(ppl)}" +
                 (" (best)" if improved else ""))
        if self.ddp.master:
            self.eval_history = [r for r in self.eval_history if r.get("step") != self.step] + [{
                "step": self.step, "epoch": self.step / self.steps_per_epoch, "tokens": self.tokens_seen,
                # The last step's loss: null when it was not finite (its update skipped), not an older step's.
                "lr": lr, "train_loss": self.last_train_loss if self.last_step_finite else None, "val_loss": val,
                "val_perplexity": ppl,
                "elapsed_s": round(self.elapsed(), 1), "timestamp": datetime.now().isoformat(timespec="seconds")}]
            self.write_history(plot.EVAL_HISTORY, self.eval_history)
        self.tracker.log(self.step, {"val/loss": val, "val/perplexity": ppl})
        if epoch_end:
            self.end_epoch()
        if improved:
            # best_model.pt holds its own val loss as the best; a failed save leaves the one on disk the best.
            previous, self.best_val_loss = self.best_val_loss, val
            if not self.save("best"):
                self.best_val_loss = previous
        self.sample()
        return True

    def after_step(self, lr):
        """The evaluation, epoch record and best model due after the step just completed; False when a stop cut
        the evaluation short (they stay pending: the emergency checkpoint says so, and the resume does them)."""
        epoch_end = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
        if self.step % self.cfg.eval_steps == 0 or epoch_end:
            if not self.run_eval(lr, epoch_end):
                return False
            self.refresh_plot()  # once, with this evaluation and any epoch record it closed
        self.pending_after_step = None
        return True

    def refresh_plot(self):
        """Redraw out_dir/loss_curve.png when matplotlib is there; a plot never stops a run."""
        if not self.cfg.plot or not self.ddp.master or not plot.matplotlib_available():
            return
        try:
            plot.plot_history(self.out_dir)
            self.plot_failure = None
        except Exception as e:  # said once while the reason stays the same (a history record it cannot draw)
            if str(e) != self.plot_failure:
                self.log(f"warning: could not draw the loss curve: {e}")
            self.plot_failure = str(e)

    def end_epoch(self):
        epoch = self.epoch_of(self.step)  # a run cut short by max_steps ends inside one
        # (no finite loss in the whole epoch: nan, written as null, not a mean of 0)
        train_loss = self.epoch_loss_sum / self.epoch_loss_count if self.epoch_loss_count else float("nan")
        val = self.val_loss if self.val_loss is not None else float("nan")
        done = self.step - (epoch - 1) * self.steps_per_epoch
        what = "done" if done == self.steps_per_epoch else f"ended after {done} of its {self.steps_per_epoch} steps"
        self.log(f"epoch {epoch} {what}: train loss {train_loss:.4f}, val loss {val:.4f}")
        if self.ddp.master:
            self.history = [r for r in self.history if r.get("epoch") != epoch] + [{
                "epoch": epoch, "train_loss": train_loss, "val_loss": val, "val_perplexity": plot.perplexity(val),
                "timestamp": datetime.now().isoformat(timespec="seconds")}]
            self.write_history(plot.EPOCH_HISTORY, self.history)
        if done == self.steps_per_epoch:  # a run stopped inside an epoch keeps its sums for a longer resume
            self.epoch_loss_sum, self.epoch_loss_count = 0.0, 0

    def banner(self, n_params, n_params_ne):
        cfg = self.cfg
        self.log(hardware.describe(self.facts, self.plan))
        hint = hardware.multi_gpu_hint(self.facts, self.ddp.world_size)
        if hint:
            self.log(hint)
        self.log(f"model: {n_params / 1e6:.2f}M parameters ({n_params_ne / 1e6:.2f}M without embeddings)")
        self.log(f"batch: {self.batch_size} x {self.accum * self.ddp.world_size} accumulation x {cfg.max_length} tokens = "
                 f"{self.tokens_per_step:,} tokens per step, {self.ddp.world_size} "
                 f"{plural(self.ddp.world_size, 'process', 'processes')}")
        self.log(f"data: {self.train_bins.n_tokens:,} train tokens, {self.steps_per_epoch} "
                 f"{plural(self.steps_per_epoch, 'step')} per epoch, "
                 f"{self.total_steps} {plural(self.total_steps, 'step')} in all")
        if self.step < self.total_steps <= cfg.warmup_steps and cfg.learning_rate > 0:  # (500 on a small corpus)
            top = cfg.learning_rate * self.total_steps / (cfg.warmup_steps + 1)
            decay = "" if cfg.lr_decay == "constant" else ", and never decays"
            self.log(f"warning: warmup_steps={cfg.warmup_steps} is not below the run's {self.total_steps} steps: the "
                     f"learning rate only ramps up, to {top:.2e} at the last step (learning_rate={cfg.learning_rate:g})"
                     f"{decay}; lower warmup_steps (a few percent of the steps is usual)")

    # checkpoints ------------------------------------------------------------------------------
    def state(self, data_state=None, rng_state=None, after_step_pending=False):
        """The run as a checkpoint holds it. after_step_pending: the step is done but its evaluation, epoch
        record and best-model save are not (a resume does them first)."""
        state = {
            "format_version": ckpt.FORMAT_VERSION,
            "run_id": self.run_id,
            "model_state_dict": ckpt.unwrapped_state_dict(self.model),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "scheduler_state_dict": self.scheduler.state_dict(),
            "scaler_state_dict": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "epoch": self.epoch_of(self.step),
            "step": self.step,
            "train_loss": self.last_train_loss,
            "last_step_finite": self.last_step_finite,
            "val_loss": self.val_loss,
            "best_val_loss": self.best_val_loss,
            "tokens_seen": self.tokens_seen,
            "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_loss_count": self.epoch_loss_count,
            "elapsed_s": self.elapsed(),
            "config": dataclasses.asdict(self.cfg),
            "data_state": data_state or self.train_bins.state_dict(),
            "rng_state": rng_state or ckpt.capture_rng_state(),
            "batch_size": self.batch_size,
            "gradient_accumulation_steps": self.accum * self.ddp.world_size,
            "val_windows": self.val_windows,
            "val_fingerprint": self.val_bins.fingerprint(),  # (best_val_loss is a loss on these tokens: restore)
        }
        if after_step_pending:
            state["after_step_pending"] = True
        return state

    def save(self, kind, **state_parts):
        """Write a checkpoint ('rotated', 'best' or 'emergency') on rank 0; a failed save never stops the run.
        Returns whether it was written, on every rank."""
        failed = False
        ranks = None
        if self.ddp.enabled:  # every rank's RNG streams (its dropout), for a resume on as many processes
            state_parts["rng_state"] = state_parts.get("rng_state") or ckpt.capture_rng_state()
            ranks = [None] * self.ddp.world_size
            dist.all_gather_object(ranks, state_parts["rng_state"])
        if self.ddp.master:
            state = self.state(**state_parts)
            if ranks is not None:
                state["rank_rng_states"] = ranks
            try:
                if kind == "rotated":
                    path = ckpt.save_checkpoint(state, self.checkpoint_dir, self.cfg.max_checkpoints, self.out_dir)
                elif kind == "best":
                    path = ckpt.save_best(state, self.out_dir, self.checkpoint_dir)
                else:
                    path = ckpt.save_emergency(state, self.out_dir, self.checkpoint_dir)
                self.log(f"saved {path}")
            except ckpt.CheckpointError as e:
                self.log(f"warning: {e}")
                failed = True
            self.write_unwritten_histories()  # (the save may have made room)
        return not any_rank(failed, self.ddp, self.device)  # under DDP also what keeps the ranks together

    def write_history(self, name, records, again=False):
        """out_dir/name rewritten whole. A failed write (a full disk) is a warning: the file is written again with
        its next record and after every checkpoint save (`again`, silent), so that a stop in between, whose resume
        reads the file, loses no record."""
        try:
            if self.test_history_write_failures:
                self.test_history_write_failures -= 1
                raise ckpt.CheckpointError(f"injected: could not write {self.out_dir / name}")
            ckpt.atomic_write_json(self.out_dir / name, records)
        except ckpt.CheckpointError as e:
            if not again:
                self.log(f"warning: {e}")
            self.unwritten_histories[name] = records
        else:
            self.unwritten_histories.pop(name, None)

    def write_unwritten_histories(self):
        """After a checkpoint save: the histories whose last write failed, written again (write_history)."""
        for name, records in list(self.unwritten_histories.items()):
            self.write_history(name, records, again=True)

    # resume -----------------------------------------------------------------------------------
    def load_init_source(self, resume):
        """The model named by init_from (a checkpoint or a HuggingFace GPT-2 folder), or None for 'scratch'.

        Its sizes become this run's model settings, so `--init_from=path/to/gpt2` needs no other flag. A run
        that resumes (`resume`, a checkpoint path) has its weights and sizes in that checkpoint: they are taken
        from there and init_from is not read, so a resume works after the source is gone (a Kaggle dataset
        not attached to the next session). Returns None then too."""
        src = self.cfg.init_from or "scratch"
        if resume is not None:  # (a run from init_from resumed without it too: its checkpoints would say 'scratch')
            saved = ckpt.peek_config(resume)
            started = saved.get("init_from") or "scratch"
            if not _same_source(started, src):
                raise ConfigError(f"checkpoint {resume} is of a run started from init_from={started!r}, not {src!r}: "
                                  f"to resume that run use --init_from={started!r} (its source need not exist any "
                                  f"more); to start a new run from {src}, use another out_dir")
            if src != "scratch":
                self.take_sizes(f"checkpoint {resume}", GPTConfig.from_dict(saved), saved.get("max_length"),
                                "a resumed run keeps its checkpoint's model settings")
            return None
        if src == "scratch":
            return None
        import export_hf
        try:
            source = export_hf.load_hf(src) if Path(src).is_dir() else export_hf.load_checkpoint_model(src)
        except export_hf.ExportError as e:
            raise ConfigError(f"init_from: {e}") from None
        self.take_sizes(f"init_from {src}", source.config, None, "the model settings come from init_from")
        return source

    def take_sizes(self, what, config, max_length, why):
        """Make `config`'s model sizes (all but dropout, which stays this run's) this run's, and max_length
        (None: this run's, lowered to n_positions if longer). A size or max_length set on the command line
        to something else is a ConfigError. `what` names the source in messages, `why` says why it rules."""
        sizes = {k: v for k, v in config.to_dict().items() if k != "dropout"}
        if max_length is None and self.cfg.max_length > sizes["n_positions"]:
            if "max_length" in self.given:
                raise ConfigError(f"max_length ({self.cfg.max_length}) exceeds the n_positions ({sizes['n_positions']}) "
                                  f"of {what}; use --max_length={sizes['n_positions']} or less")
            max_length = sizes["n_positions"]
        if max_length is not None:
            sizes["max_length"] = max_length
        changed = {k: v for k, v in sizes.items() if getattr(self.cfg, k) != v}
        clash = [k for k in changed if k in self.given]
        if clash:
            raise ConfigError(f"{what} is a model with " + ", ".join(f"{k}={sizes[k]}" for k in clash)
                              + f"; {why}: drop " + " ".join(f"--{k}={getattr(self.cfg, k)!r}" for k in clash))
        self.cfg = dataclasses.replace(self.cfg, **sizes)
        validate(self.cfg, self.ddp.world_size)  # what the sizes taken may make unusable (bias=False and the export)
        if changed:
            self.log(f"{what}: model settings taken from it: " + ", ".join(f"{k}={v}" for k, v in changed.items()))

    def refuse_a_moved_checkpoint_dir(self, resume):
        """checkpoint_dir changed since the run's last session: an 'auto'/'latest' resume from out_dir's best or
        emergency checkpoint would go back past the newer rotated checkpoints left in the old folder (refused)."""
        if resume is None or self.cfg.resume_from_checkpoint not in ("auto", "latest") or resume.parent != self.out_dir:
            return  # a checkpoint named by path: the run goes where this one's folders say
        before = ckpt.peek_config(resume).get("checkpoint_dir") or ""
        before = Path(before).expanduser() if before else self.out_dir / ckpt.CHECKPOINTS_SUBDIR
        if not before.is_dir() or before.resolve() == self.checkpoint_dir.resolve():
            return
        step = ckpt.peek_step(resume)
        newer = ckpt.checkpoints_after(before, self.out_dir, step)
        if newer:
            raise ConfigError(f"{resume} is at step {step}, but its run kept its rotated checkpoints in {before}, "
                              f"with newer ones there ({newer[-1]}), and this run's checkpoint_dir is "
                              f"{self.checkpoint_dir}: resume with --checkpoint_dir={before} (or move them over)")

    def keep_an_earlier_history(self):
        """A fresh start in an out_dir that holds a run's history but none of its checkpoints (they are in another
        checkpoint_dir, or were never written): the history is moved aside with a warning, not overwritten."""
        if not self.ddp.master:
            return
        for name in (plot.EPOCH_HISTORY, plot.EVAL_HISTORY):
            path = self.out_dir / name
            if not _has_records(path):
                continue
            aside = path.with_name(f"{name}.earlier-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
            try:
                path.rename(aside)
            except OSError as e:
                raise ConfigError(f"{path} holds an earlier run's history, which this fresh run would overwrite, "
                                  f"and it cannot be moved aside ({e.strerror}): move it, or use another out_dir") from None
            self.log(f"warning: {path} held the history of an earlier run with no checkpoint here or in "
                     f"{self.checkpoint_dir}: moved to {aside.name}, and this run starts afresh (if that run kept "
                     f"its checkpoints in another checkpoint_dir, stop and resume it with that one)")

    def refuse_newer_checkpoints(self, resume):
        """A fresh run, or one resumed from an older checkpoint, must not rotate away, overwrite or later be
        auto-resumed into checkpoints beyond its own start."""
        step = ckpt.peek_step(resume) if resume else -1
        others = ckpt.other_runs(self.checkpoint_dir, self.out_dir, ckpt.peek_run_id(resume)) if resume else []
        if others:
            raise ConfigError(f"resuming from {resume}, but {_some(others)} belong to another run (its run id "
                              f"differs): the two runs would mix (rotation, best_model.pt, the histories); resume "
                              f"into another out_dir, or move them away first")
        newer = ([p for p in ckpt.checkpoints_after(self.checkpoint_dir, self.out_dir, step) if p != resume] if resume
                 else ckpt.checkpoint_files(self.checkpoint_dir, self.out_dir))  # (fresh: unreadable ones too)
        if not newer:
            return
        names = _some(newer)
        if resume is None:
            raise ConfigError(f"{names} hold an earlier run: a fresh run here would overwrite or rotate them away; "
                              f"resume it (resume_from_checkpoint='auto'), use another out_dir, or move them away")
        raise ConfigError(f"resuming from {resume} at step {step}, but {names} are further on: this run would mix "
                          f"with them (rotation, best_model.pt, later 'auto' resumes); move them away first")

    def restore(self, path):
        state = ckpt.load_checkpoint(path, map_location="cpu")
        saved, current = GPTConfig.from_dict(state["config"]), model_config(self.cfg)
        if dataclasses.replace(saved, dropout=current.dropout) != current:  # dropout is training's, not a shape
            diff = {k: (v, getattr(current, k)) for k, v in saved.to_dict().items()
                    if getattr(current, k) != v and k != "dropout"}
            # (a run from another init_from is refused before: load_init_source)
            raise ConfigError(f"checkpoint {path} is a different model ({', '.join(f'{k}: {a} vs {b}' for k, (a, b) in diff.items())}); "
                              f"use the same model settings, or start afresh in another out_dir")
        cfg, saved_cfg = self.cfg, state["config"]
        windows = (state["batch_size"] * state["gradient_accumulation_steps"], saved_cfg.get("max_length"))
        per_step = cfg.batch_size * cfg.gradient_accumulation_steps
        if windows != (per_step, cfg.max_length):
            raise ConfigError(
                f"checkpoint {path} was trained with {windows[0]} sequences of {windows[1]} tokens per step "
                f"(batch_size x gradient_accumulation_steps); this run has {per_step} "
                f"of {cfg.max_length}: the data position and the epochs count in those steps, so keep the product "
                f"and max_length (a smaller batch_size with more accumulation is fine), or start afresh in another "
                f"out_dir")
        self.train_bins.load_state_dict(state["data_state"])  # (other data: refused before a line says what applies)
        self.model.load_state_dict(state["model_state_dict"])
        self.optimizer.load_state_dict(state["optimizer_state_dict"])
        # The optimizer's saved hyper-parameters give way to this run's settings (the same on a plain resume):
        # the schedule is rebuilt at the saved step from learning_rate, min_lr, warmup and decay as set now.
        for group in self.optimizer.param_groups:
            group["initial_lr"], group["betas"] = cfg.learning_rate, (cfg.beta1, cfg.beta2)
        set_weight_decay(self.optimizer, cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.total_steps),
                                                           last_epoch=state["step"] - 1)
        changed = [f"{k} {saved_cfg[k]!r} -> {getattr(cfg, k)!r}" for k in
                   ("learning_rate", "min_lr", "warmup_steps", "lr_decay", "weight_decay", "beta1", "beta2",
                    "epochs", "max_steps", "dropout", "eval_iters")
                   if k in saved_cfg and saved_cfg[k] != getattr(cfg, k)]
        if saved_cfg.get("eval_iters") == cfg.eval_iters:  # the same val windows as the run's other evaluations
            self.val_windows = state.get("val_windows", val_windows(saved_cfg["eval_iters"], saved_cfg["batch_size"]))
        if changed:
            self.log("resume: changed since the checkpoint, applied from here (the schedule now runs to step "
                     f"{self.total_steps}): " + ", ".join(changed))
        if saved_cfg.get("seed", cfg.seed) != cfg.seed:
            self.log(f"resume: seed {saved_cfg['seed']} -> {cfg.seed} not applied: the data order and random "
                     f"streams go on as the checkpoint left them (a new seed takes a fresh run)")
        if state.get("scaler_state_dict"):
            self.scaler.load_state_dict(state["scaler_state_dict"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.run_id = state.get("run_id") or self.run_id  # (a checkpoint from before run ids: its run gets one now)
        self.best_val_loss, self.val_loss, self.last_train_loss = state["best_val_loss"], state["val_loss"], state["train_loss"]
        self.resumed_val_fingerprint = state.get("val_fingerprint")  # (start_the_best_over_on_another_val_split)
        self.last_step_finite = state.get("last_step_finite", True)  # (for a pending evaluation's record)
        self.epoch_loss_sum, self.epoch_loss_count = state["epoch_loss_sum"], state["epoch_loss_count"]
        self.elapsed_before = state.get("elapsed_s", 0.0)
        # An OOM back-off (a micro-batch smaller than its run's batch_size) is remembered, unless this run sets
        # another batch (in its config file or on its command line).
        backed_off = state["batch_size"] < saved_cfg.get("batch_size", state["batch_size"])
        same_batch = all(getattr(cfg, k) == saved_cfg.get(k) for k in ("batch_size", "gradient_accumulation_steps"))
        if (backed_off and same_batch and state["gradient_accumulation_steps"] % self.ddp.world_size == 0
                and not {"batch_size", "gradient_accumulation_steps"} & self.given):
            self.batch_size = state["batch_size"]
            self.accum = state["gradient_accumulation_steps"] // self.ddp.world_size
            self.log(f"resume: micro-batch {self.batch_size} x {state['gradient_accumulation_steps']} accumulation, "
                     f"as the checkpoint's run backed off to after running out of memory")
        self.pending_after_step = ((self.epoch_loss_sum, self.epoch_loss_count)
                                   if state.get("after_step_pending") else None)
        ranks = state.get("rank_rng_states")
        if self.ddp.enabled and ranks and len(ranks) == self.ddp.world_size:
            ckpt.restore_rng_state(ranks[self.ddp.rank])  # each rank's own streams (dropout) go on exactly
        else:
            ckpt.restore_rng_state(state["rng_state"])
            if self.ddp.enabled:  # another number of processes, or an error's rank-0-only checkpoint: each
                # rank's dropout stream starts from a seed of its own (the data order is shared and exact)
                torch.manual_seed(self.cfg.seed + 1000003 * self.step + self.ddp.rank)
        del state  # nothing of it stays on the GPU (map_location='cpu')
        epoch = (self.step // self.steps_per_epoch + 1 if self.step < self.total_steps  # the epoch it goes on in,
                 else self.epoch_of(self.step))  # or, with nothing left, its last one
        self.log(f"resumed from {path} at step {self.step} (epoch {epoch})")

    def carry_over_its_run(self, resume, its_best=True):
        """A resume from a checkpoint outside this run's folders (a Kaggle input, a copy), or into an out_dir without
        the run's best model (a new out_dir beside the old one's checkpoint_dir). A checkpoint from outside is copied
        into checkpoint_dir, so that a later 'auto' resume (after a kill before the first save) goes on from it, not
        from an older file here or from scratch. Into an out_dir with no best model come the best_model.pt and
        histories of the checkpoint's run, so that best_model.pt, final_model/ and the curves stay the whole run's;
        without that best model the best starts over from here, with a warning (else no best_model.pt would be
        written until the old best val loss is beaten). Not `its_best` (another val split): the histories only.
        Rank 0 copies and decides: the others may see its copies."""
        outside = resume.parent.resolve() not in {folder.resolve() for folder in (self.out_dir, self.checkpoint_dir)}
        needs_best = math.isfinite(self.best_val_loss) and not (self.out_dir / ckpt.BEST_NAME).exists()
        if not any_rank(self.ddp.master and (outside or needs_best), self.ddp, self.device):
            return
        lost_best = False
        if self.ddp.master:
            if outside:
                try:
                    copy, copied = ckpt.copy_as_rotated(resume, self.checkpoint_dir)
                    self.log(f"resume: copied {resume} to {copy}: a later 'auto' resume goes on from this run's "
                             f"folders" if copied else f"resume: {copy} is there already (the same step of this run)")
                except ckpt.CheckpointError as e:
                    self.log(f"warning: {e}")
            if needs_best:
                lost_best, run_folder = self.copy_its_best(resume, its_best)
                lost_best = lost_best and its_best  # (else start_the_best_over_on_another_val_split says why)
        if any_rank(lost_best, self.ddp, self.device):
            if self.ddp.master:
                why = (f"its best_model.pt in {run_folder} is from a later step (a branch from an older checkpoint)"
                       if run_folder is not None else "its best_model.pt is not beside it")
                self.log(f"warning: the run of {resume} had a best val loss of {self.best_val_loss:.4f}, but {why}: "
                         f"best_model.pt (and final_model/) in {self.out_dir} will be the best from step {self.step} on")
            self.best_val_loss = float("inf")

    def start_the_best_over_on_another_val_split(self):
        """A resume on another val split than the run's (as many windows or not; the ranks agreed on it: each reads
        its own val.bin, and a node's copy may differ): its losses compare not with the run's best, which starts over
        from here, with a warning."""
        if math.isfinite(self.best_val_loss):
            self.log(f"warning: {self.val_bins.path} holds other tokens than the run was evaluated on: its best val "
                     f"loss ({self.best_val_loss:.4f}) is not comparable, so best_model.pt (and final_model/) in "
                     f"{self.out_dir} will be the best from step {self.step} on")
        self.best_val_loss, self.val_loss = float("inf"), None  # (no evaluation on this split yet)

    def copy_its_best(self, resume, its_best=True):
        """Copy the best_model.pt of resume's run (unless not `its_best`), and its histories where out_dir has none
        (read_history drops their records after the resumed step), into out_dir: the histories also where that best
        model is from a later step. Returns (whether the best model is still to be had, the run's out_dir or None)."""
        try:
            best, run_folder = ckpt.best_of_its_run(resume)
        except ckpt.CheckpointError:
            best, run_folder = None, None
        source = best.parent if best is not None else run_folder
        best = best if its_best else None
        if source is None:
            return True, None
        # A history file out_dir has already, readable or not, is read_history's to keep or move aside.
        histories = [name for name in (plot.EPOCH_HISTORY, plot.EVAL_HISTORY)
                     if (source / name).is_file() and not (self.out_dir / name).exists()]
        try:  # the histories first: the best model copied marks the carry-over as done
            for name in histories:
                ckpt.atomic_copy(source / name, self.out_dir / name)
            if best is not None:
                ckpt.atomic_copy(best, self.out_dir / ckpt.BEST_NAME)
        except (OSError, ckpt.CheckpointError) as e:
            self.log(f"warning: could not copy {best or source / histories[0]} to {self.out_dir}: {e}")
            return True, None
        copied = ([f"{best} (val loss {self.best_val_loss:.4f})"] if best is not None else []) + histories
        if copied:
            self.log(f"resume: copied {', '.join(copied)} from {source}" if best is None else
                     f"resume: copied {', '.join(copied)} to {self.out_dir}")
        return best is None, run_folder

    # endings ----------------------------------------------------------------------------------
    def elapsed_session(self):
        """Seconds since this process started, or since max_runtime_from (a notebook's session): what max_runtime
        counts."""
        return time.time() - (self.cfg.max_runtime_from or PROCESS_START)

    def resume_command(self, again=False):
        """The command that resumes this run (again: the command as it was given, for a run with nothing on disk to
        resume from). Quoted for a shell: a --sample_prompt with spaces pastes back as one argument."""
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or self.ddp.world_size)
        return run_command(sys.argv[1:], self.ddp.world_size if self.ddp.enabled else 0, local, again)

    def save_emergency_local(self):
        """After an error: inside a step, the last completed step with the data and RNG state it left; after
        a step, that step, marked so that resume redoes its evaluation (and epoch record)."""
        try:
            if self.pending_after_step is None:
                state = self.state(*self.step_start)
            else:
                state = self.state(after_step_pending=True)
                state["epoch_loss_sum"], state["epoch_loss_count"] = self.pending_after_step
            path = ckpt.save_emergency(state, self.out_dir, self.checkpoint_dir)
            self.log(f"saved {path}. Resume with: {self.resume_command()}")
        except Exception as e:  # the original error matters more
            self.log(f"warning: could not write the emergency checkpoint: {e}; {self.newest_note()}")
        self.write_unwritten_histories()

    def emergency_exit(self, step_start=(None, None), after_step_pending=False):
        """Save the last completed step (with the data and RNG state of the step that comes next) and leave.
        after_step_pending: its evaluation (and what comes after it) is still to do, by the resume."""
        self.optimizer.zero_grad(set_to_none=True)
        saved = self.save("emergency", data_state=step_start[0], rng_state=step_start[1],
                          after_step_pending=after_step_pending)
        newest = () if saved or not self.ddp.master else ckpt.newest_checkpoint(self.checkpoint_dir, self.out_dir)
        if newest is None:  # (a failed save with no checkpoint on disk here: nothing of this session to resume)
            self.log(f"interrupted at step {self.step}: {self.kept_note(saved, newest=newest)} here, so the same "
                     f"command starts this session again: {self.resume_command(again=True)}")
        else:
            self.log(f"interrupted at step {self.step}: {self.kept_note(saved, newest=newest)}. Resume with: "
                     f"{self.resume_command()}")
        signum = self.stop.signum or signal.SIGTERM
        return 128 + int(signum)

    def nonfinite_exit(self, count):
        # The step counts as done (its update was skipped, the weights are the last good ones); its evaluation,
        # epoch record and best-model save are due, and a resume does them first.
        saved = self.save("emergency", after_step_pending=True)
        hint = " fp16 runs are known to overflow after many steps: rerun with --dtype=float32 (or bfloat16 on an A100/L4/H100)." \
            if self.plan.dtype == "float16" else (
            " They may have diverged already: to go back, move it (and any checkpoint after the loss rose) aside and "
            "resume with a lower learning_rate or more warmup_steps, or start afresh.")
        self.log(f"error: {count} non-finite {plural(count, 'loss', 'losses')} in a row at step {self.step}; stopped. "
                 f"{self.kept_note(saved, 'the last weights with a finite loss')}.{hint}")
        return 3

    def kept_note(self, saved, what="the last completed step", newest=()):
        """Where the run's progress is, for the message of a stopped run: the emergency checkpoint, or, when
        that save failed, the newest checkpoint that is on disk (newest: as newest_note takes it)."""
        if saved:
            return f"{self.out_dir / ckpt.EMERGENCY_NAME} holds {what}"
        return f"the emergency checkpoint could not be written; {self.newest_note(newest)}"

    def newest_note(self, newest=()):
        """Which checkpoint a resume would start from, as a message says it (rank 0 looks, unless `newest`, what
        checkpoint.newest_checkpoint returned, is given)."""
        if newest == ():
            newest = ckpt.newest_checkpoint(self.checkpoint_dir, self.out_dir) if self.ddp.master else None
        if newest is None:
            return "there is no other checkpoint"
        return f"the newest on disk is {newest[1]} (step {newest[0]}), a resume repeats the steps after it"

    def finish(self):
        if not self.ddp.master:
            return
        if self.cfg.export_final_model:
            best, final = self.out_dir / ckpt.BEST_NAME, self.out_dir / ckpt.FINAL_MODEL_DIR
            try:
                import export_hf
                export_hf.export_hf(best if best.exists() else self.state(), final)
                what = ckpt.BEST_NAME if best.exists() else f"the last weights: no {ckpt.BEST_NAME} yet"
                self.log(f"exported {final} from {what} (HuggingFace GPT2LMHeadModel + GPT2Tokenizer)")
            except Exception as e:
                redo = (f"; export it again with: python export_hf.py {shlex.quote(str(best))} "
                        f"{shlex.quote(str(final))}" if best.exists() else "")
                self.log(f"warning: could not export final_model/: {e}{redo}")
        if math.isfinite(self.best_val_loss):
            best = f"best val loss {self.best_val_loss:.4f}"
        elif self.val_loss is not None:  # evaluated, but no best_model.pt could be written (a full disk)
            best = f"last val loss {self.val_loss:.4f}, no {ckpt.BEST_NAME} saved"
        else:
            best = "no evaluation yet"
        self.log(f"done: {self.step} {plural(self.step, 'step')}, {best} in {fmt_duration(self.elapsed())}")


def val_windows(eval_iters, batch_size):
    """The val windows an evaluation scores: eval_iters batches of batch_size (None: eval_iters 0, the whole split)."""
    return eval_iters * batch_size or None


def run_command(argv, world_size, local_world_size, again=False):
    """The command line that resumes a run started with train.py's arguments argv (again: that starts it again)
    by python (world_size 0) or torchrun, on one node or several (where only the user knows the rendezvous)."""
    # (max_runtime_from is a session's: a resume is another session)
    args = [a for a in argv if (again or not a.startswith("--resume_from_checkpoint=")) and
            not a.startswith("--max_runtime_from=")]
    if not world_size:
        launcher = "python"
    elif local_world_size >= world_size:
        launcher = f"torchrun --standalone --nproc_per_node={world_size}"
    else:
        launcher = (f"on each node, torchrun --nnodes={world_size // local_world_size} "
                    f"--nproc_per_node={local_world_size} <the rendezvous options it was started with>")
    return " ".join([launcher, "train.py", *map(shlex.quote, args), *([] if again else
                                                                     ["--resume_from_checkpoint=latest"])])


def _some(paths, shown=3):
    """paths for a message: the first `shown` of them, and how many more."""
    return ", ".join(map(str, paths[:shown])) + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def asks_for_help(argv):
    return any(a in ("-h", "--help") for a in argv)


def main(argv):
    if asks_for_help(argv):
        quiet_on_closed_pipe()  # `python train.py --help | head`
        print_help()
        return 0
    # `python train.py ... | tee log` and Ctrl-C: tee is gone before the save. `held`: the run's folders (rank 0).
    with outlive_closed_output(when_full="training goes on; train.log has its lines"), contextlib.ExitStack() as held:
        return train_main(argv, held)


def train_main(argv, held):
    ddp, trainer, created = Dist(), None, []
    launched_world = int(os.environ.get("WORLD_SIZE") or 1)  # torchrun's processes, known before they connect
    try:
        cfg, given = load_config(argv)
        validate(cfg, launched_world)
        device_type = hardware.choose_device(cfg.device)  # no such device: said before any folder is made
        for split in ("train", "val"):  # missing or broken bins too (and, under torchrun, once: before connecting)
            read_bin(Path(cfg.data_dir) / f"{split}.bin")
        if os.environ.get("RANK", "0") == "0":
            # Before the processes connect: a folder rank 0 can't create (or another run holds) then stops the run
            # with one line, where after connecting the other ranks would lose their peer mid-collective.
            make_run_folders(cfg, created)  # (what it makes goes again if the run stops before training)
            try:
                held.enter_context(run_lock(cfg))
            except FolderInUse as e:  # the other run's folder, and what is above it, are not this run's to remove
                created = [f for f in created if not e.folder.is_relative_to(os.path.realpath(f))]
                raise
        ddp = init_distributed(device_type)
        trainer = Trainer(cfg, ddp, given)
        held.enter_context(keeping_said(trainer.log.record))  # other modules' warnings go to train.log too
        trainer.setup()
        code = trainer.run()
        if ddp.enabled:
            dist.barrier()  # leave together: a rank tearing down gloo while another still runs can abort both
            dist.destroy_process_group()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)  # skip interpreter teardown, where the backend's threads can still abort the process
        return code
    except KeyboardInterrupt as e:  # before training started (its own Ctrl-C handling begins with start_session)
        code = _end_before_training(e, own_process=__name__ == "__main__")  # (a second Ctrl-C is ignored from here)
        forget_the_folders(trainer, created)
        return code
    except (ConfigError, DataError, ckpt.CheckpointError, hardware.HardwareError) as e:
        # Under torchrun every process reads the same settings: a mistake in them, found before the processes
        # connect, is said once, by rank 0. A device error or a missing bin, found on each node before connecting, is
        # said once a node. After connecting, a setting or checkpoint refused (a resume's checkpoint not there, say)
        # is too: the processes of a node read the same files. A device error then is each process's own.
        before_connecting = launched_world > 1 and not ddp.enabled
        not_local_rank_0 = os.environ.get("LOCAL_RANK", "0") != "0"
        said_elsewhere = (isinstance(e, ConfigError) and os.environ.get("RANK", "0") != "0") or (
            isinstance(e, (hardware.HardwareError, DataError)) and not_local_rank_0)
        if (before_connecting and said_elsewhere) or (
                ddp.enabled and not_local_rank_0 and isinstance(e, (ConfigError, ckpt.CheckpointError))):
            # torchrun stops every process once one exits: leave the saying to rank 0 (which meets the same mistake),
            # and time to say it, instead of having it stopped before it has (seen on a slow machine).
            time.sleep(SAID_BY_ANOTHER_RANK_WAIT_S)
        else:
            print(f"error: {e}", file=sys.stderr, flush=True)
        if trainer is not None:
            trainer.log.record(f"error: {e}")  # train.log tells why the run stopped, too
        forget_the_folders(trainer, created)
        if ddp.enabled:
            os._exit(2)  # a collective may be hung (see hardware.nccl_check): tearing the group down could hang too
        return 2
    finally:
        if trainer is not None:
            trainer.log.close()
        if ddp.enabled and dist.is_initialized():
            dist.destroy_process_group()


def forget_the_folders(trainer, created):
    """Refused or stopped before training started: the folders the run created go again (remove_refused_run_folders)."""
    if trainer is None or trainer.t0 is None:
        if trainer is not None:
            trainer.log.close()
        remove_refused_run_folders(created)


if __name__ == "__main__":
    # A training run goes on when its stdout's disk is full (main: outlive_closed_output); its --help ends.
    tolerant_output(full_ends_it=asks_for_help(sys.argv[1:]))
    code = main(sys.argv[1:])
    # The run is over: a late copy of a stop signal (torchrun or a process group passing it on) must not reach the
    # default handlers that Python puts back while it shuts down, which would kill it with another exit code.
    for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None), *_BREAK):
        if s is not None:
            signal.signal(s, signal.SIG_IGN)
    sys.exit(code)
