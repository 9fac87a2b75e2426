"""Optional experiment tracking: TensorBoard and Weights & Biases behind one small class.

Neither is required. Each is used only when asked for (train.py settings `tensorboard=True`,
`wandb_project='NAME'`) and installed; otherwise one warning line, and logging goes on without it.

    tracker = Tracker(out_dir, tensorboard=True, wandb_project="gpt2", config=config_dict, start_step=step)
    tracker.log(step, {"train/loss": 3.2, "train/lr": 5e-4})
    tracker.close()

TensorBoard event files go to out_dir/tensorboard (`tensorboard --logdir out/tensorboard`); W&B keeps its
local files in out_dir/wandb and the run id in out_dir/wandb_run_id.txt, so a resumed training run
continues the same W&B run.
"""

import json
import os
import re
import secrets
from pathlib import Path

from checkpoint import CheckpointError, atomic_write_text
from cli import one_line, say

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id.txt"
WANDB_FIX = "run `wandb login` or set WANDB_API_KEY, or WANDB_MODE=offline to log locally; training goes on without W&B"
WANDB_INIT_TIMEOUT_S = 30  # wandb.init's own timeout (without a connection it gives up some 15 s after it)
WANDB_OFFLINE_FIX = ("no connection to W&B? set WANDB_MODE=offline to log locally (`wandb sync` sends it "
                     "later); training goes on without W&B")


def _warn(message):
    say(f"warning: {message}")


class Tracker:
    """Sends metrics to TensorBoard and/or W&B; a no-op for whatever is off, missing or failing to start.

    out_dir: the run's folder. config: the training settings (a dict), stored with the run.
    start_step: the step a resumed run continues from: TensorBoard hides what an earlier session logged
    after it (those steps are trained and logged again). enabled=False (DDP ranks other than 0): no-op.
    """

    def __init__(self, out_dir, tensorboard=False, wandb_project="", config=None, start_step=0, enabled=True,
                 wandb_run_name=""):
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                _warn("tensorboard=True but the tensorboard package is not installed (`pip install tensorboard`); "
                      "training goes on without TensorBoard logs")
            else:
                try:
                    self.tensorboard = SummaryWriter(str(out_dir / TENSORBOARD_DIR), purge_step=start_step + 1)
                    if config:
                        self.tensorboard.add_text("config", "```\n" + json.dumps(config, indent=1, default=str)
                                                  + "\n```", global_step=start_step)
                except OSError as e:  # out_dir/tensorboard is a file, a full disk: logs must not stop training
                    _warn(f"TensorBoard did not start ({one_line(e)}); training goes on without TensorBoard logs")
                    self.tensorboard = None
        if wandb_project:
            self.wandb = self._start_wandb(out_dir, wandb_project, config, wandb_run_name)

    @staticmethod
    def _start_wandb(out_dir, project, config, name):
        try:
            import wandb
        except ImportError:
            _warn(f"wandb_project={project!r} but the wandb package is not installed (`pip install wandb`); "
                  "training goes on without W&B")
            return None
        id_file = out_dir / WANDB_ID_FILE
        try:
            run_id = id_file.read_text().strip() if id_file.is_file() else ""
        except (OSError, UnicodeDecodeError):
            run_id = ""
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id):
            if id_file.exists():
                _warn(f"{id_file} does not hold a W&B run id: this run gets a new one")
            run_id = secrets.token_hex(4)
        has_key = None
        try:
            try:  # without a key, wandb.init would stop at an interactive login prompt
                # Offline (WANDB_MODE, or `wandb offline`, which writes wandb/settings) needs no key.
                mode = str(getattr(wandb.setup().settings, "mode", "") or os.environ.get("WANDB_MODE", "")).lower()
                has_key = mode in ("offline", "disabled", "dryrun") or wandb.login(prompt=False, verify=False)
            except TypeError:  # a wandb older than login(prompt=...): init decides
                has_key = True
            if not has_key:
                _warn(f"W&B not started: no API key; {WANDB_FIX}")
                return None
            out_dir.mkdir(parents=True, exist_ok=True)
            run = wandb.init(project=project, id=run_id, resume="allow", dir=str(out_dir), config=config,
                             name=name or out_dir.resolve().name,
                             settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S))
        except Exception as e:  # no network, a bad project name: tracking must not stop training
            # With a key there, the usual cause is the network (wandb says "context deadline exceeded").
            _warn(f"W&B did not start ({one_line(e)}); "
                  + (WANDB_OFFLINE_FIX if has_key is True else WANDB_FIX))
            try:  # its service would print again at exit, after the run's last line
                wandb.teardown()
            except Exception:
                pass
            return None
        try:
            atomic_write_text(id_file, run_id + "\n")
        except CheckpointError as e:
            _warn(f"{e}: a resumed run will start a new W&B run")
        return run

    def log(self, step, metrics):
        """Record {name: number} at `step`; None values are skipped (tensors and numpy scalars are fine)."""
        values = {name: float(v) for name, v in metrics.items() if v is not None}
        if self.tensorboard is not None:
            for name, v in values.items():
                self.tensorboard.add_scalar(name, v, global_step=step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self):
        """Flush and close whatever is open (safe to call twice)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
