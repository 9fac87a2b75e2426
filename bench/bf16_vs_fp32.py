"""bf16 must not cost learning: train the same model on the same data in float32 and in bfloat16
(autocast) and compare the validation loss at the end.

    python bench/bf16_vs_fp32.py                      # 4 layers x 128 wide, batch 16 x 128, 600 steps
    python bench/bf16_vs_fp32.py --config tiny --steps 60 --json

Both runs are train.py's Trainer with the same seed (same initial weights, same batch order) and
differ only in `dtype`. The data is real text that every Python install has: the source of the
standard library, tokenized with data.py into train/val bins. The final weights of each run are then
evaluated on the whole val split in float32, so the two losses measure the weights, not the dtype of
the evaluation. Passes when they agree within --tolerance (0.03).
"""

import argparse
import contextlib
import hashlib
import math
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import common
import torch
import torch.nn.functional as F

import data
import train

CONFIGS = {
    # issue #9's bench: 4 layers, 128 wide, batch 16 x 128
    "small4": dict(model=dict(n_positions=128, n_embd=128, n_layer=4, n_head=4, n_inner=512),
                   batch_size=16, block_size=128, steps=600, learning_rate=1e-3, text_mb=6.0),
    # the test suite's: seconds per run
    "tiny": dict(model=dict(n_positions=32, n_embd=32, n_layer=2, n_head=2, n_inner=128),
                 batch_size=8, block_size=32, steps=40, learning_rate=3e-3, text_mb=0.3),
}


def stdlib_text(path, mb):
    """Write about `mb` MB of the Python standard library's source (files in sorted order) to `path`;
    returns its sha256, which names the exact text (it depends on the Python version)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    budget, sha = int(mb * 1e6), hashlib.sha256()
    with open(path, "w", encoding="utf-8") as out:
        for f in sorted(root.rglob("*.py")):
            if budget <= 0:
                break
            try:
                text = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            text = text[:budget]
            out.write(text + "\n")
            sha.update(text.encode("utf-8"))
            budget -= len(text.encode("utf-8")) + 1
    return sha.hexdigest()


@torch.no_grad()
def val_loss_fp32(model, data_dir, block_size, batch_size, device):
    """Mean cross-entropy over every val token, in float32 (no autocast)."""
    model.eval()
    bins = data.TokenBins(data_dir, "val", block_size)
    total, count = 0.0, 0
    for x, y in bins.eval_batches(batch_size, device=device):
        logits, _ = model(x, all_logits=True)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    return total / count


def train_once(dtype, data_dir, out_dir, spec, args):
    """One Trainer run in `dtype`; returns (final val loss in fp32, the run's own last val loss, seconds)."""
    steps = args.steps or spec["steps"]
    lr = args.learning_rate or spec["learning_rate"]
    cfg = train.TrainConfig(
        **spec["model"], data_dir=str(data_dir), out_dir=str(out_dir), max_length=spec["block_size"],
        batch_size=spec["batch_size"], gradient_accumulation_steps=1, max_steps=steps,
        learning_rate=lr, min_lr=lr / 10, warmup_steps=max(1, steps // 10),
        weight_decay=0.1, eval_steps=steps, eval_iters=0, save_steps=10 ** 9, log_steps=max(1, steps // 10),
        device=args.device, dtype=dtype, compile=args.compile, seed=args.seed, resume_from_checkpoint="",
        sample_prompt="", export_final_model=False)
    train.validate(cfg)
    trainer = train.Trainer(cfg, train.Dist())
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's log lines; stdout keeps the bench's result
        trainer.setup()
        trainer.run()
    seconds = time.perf_counter() - start
    final = val_loss_fp32(trainer.model, data_dir, spec["block_size"], spec["batch_size"], trainer.device)
    return final, trainer.val_loss, seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="small4", choices=sorted(CONFIGS))
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per run (0 = the config's)")
    p.add_argument("--learning_rate", type=float, default=0.0, help="peak learning rate (0 = the config's)")
    p.add_argument("--tolerance", type=float, default=0.03, help="largest accepted |val loss bf16 - fp32|")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", default=False, type=lambda s: s.lower() == "true", help="true/false (both runs)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    common.add_threads_arg(p)
    args = p.parse_args(argv)
    threads = common.set_threads(args.threads)
    spec = CONFIGS[args.config]

    with tempfile.TemporaryDirectory(prefix="bf16_bench_") as work:
        work = Path(work)
        sha = stdlib_text(work / "stdlib.txt", spec["text_mb"])
        with contextlib.redirect_stdout(sys.stderr):
            data.prepare_text([work / "stdlib.txt"], out_dir=work / "data", num_workers=1)
        n_train = data.TokenBins(work / "data", "train", spec["block_size"]).n_tokens
        runs = {dtype: train_once(dtype, work / "data", work / dtype, spec, args) for dtype in ("float32", "bfloat16")}

    (fp32, fp32_own, fp32_s), (bf16, bf16_own, bf16_s) = runs["float32"], runs["bfloat16"]
    diff = bf16 - fp32
    ok = math.isfinite(diff) and abs(diff) <= args.tolerance
    result = {
        "bench": "bf16_vs_fp32", "config": args.config, "model": spec["model"],
        "batch": [spec["batch_size"], spec["block_size"]], "steps": args.steps or spec["steps"],
        "learning_rate": args.learning_rate or spec["learning_rate"],
        "train_tokens_in_data": n_train, "text_sha256": sha, "device": args.device, "threads": threads,
        "val_loss_fp32": round(fp32, 4), "val_loss_bf16": round(bf16, 4), "diff": round(diff, 4),
        "tolerance": args.tolerance, "ok": ok,
        "own_eval": {"float32": round(fp32_own, 4), "bfloat16": round(bf16_own, 4)},
        "seconds": {"float32": round(fp32_s, 1), "bfloat16": round(bf16_s, 1)},
    }
    print(f"val loss after {result['steps']} steps (evaluated in fp32): fp32 {fp32:.4f}  bf16 {bf16:.4f}  "
          f"diff {diff:+.4f} ({'within' if ok else 'OUTSIDE'} {args.tolerance}); "
          f"run time fp32 {fp32_s:.0f} s, bf16 {bf16_s:.0f} s")
    if args.json:
        common.emit_json(result)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
