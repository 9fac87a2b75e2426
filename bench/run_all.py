"""Run the three throughput benches (train, generate, prepare; not bf16_vs_fp32.py) and print one table.

    python bench/run_all.py                  # full size: about 16 minutes on a 2-core CPU
    python bench/run_all.py --threads 1      # steadier ratios on a busy shared machine
    python bench/run_all.py --quick          # tiny settings, ~1 minute: checks that the benches run

Each bench runs as its own process with --json; its last line is one JSON object, which becomes a row.
Training runs in float32 and in the dtype hardware.decide picks (bf16 where the device has it), and on a
GPU also in float16 (a T4's precision); generation in the picked dtype and, where that is not float32, in float32;
on a CPU also compiled (generate(compile=True), sample.py --compile) in the picked dtype, except with --quick (its
compile would take most of a quick run; tests/test_sample.py compiles that generation).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

QUICK = {
    "train": ["--config", "tiny", "--rounds", "2", "--warmup", "1", "--compile", "false"],
    "generate": ["--config", "tiny", "--prompt_tokens", "8", "--new_tokens", "16", "--rounds", "2"],
    "prepare": ["--sizes", "0.2", "0.4", "--rounds", "1", "--num_workers", "2"],
}


def run_bench(script, args):
    """Run bench/<script> with --json; its last stdout line parsed, or {"error": ...}."""
    cmd = [sys.executable, str(HERE / script), *args, "--json"]
    print("$ " + " ".join(["python", f"bench/{script}", *args, "--json"]), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}"}
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": "no JSON on the last line"}


def rows_of(name, r):
    """Table rows (cells as strings) for one bench result."""
    if "error" in r:
        return [[name, "", "", "", "", r["error"], ""]]
    mem = r.get("peak_mem_mib")
    if name.startswith("train"):
        what = f"{r['dtype']}, {'compiled' if r['compile'] else 'eager'}, batch {r['batch'][0]}x{r['batch'][1]}"
        extra = f"MFU {r['mfu']:.0%} (HF {r['mfu_peer']:.0%}; against issue #6's peak {r['mfu_spec']:.0%}, HF {r['mfu_spec_peer']:.0%})"
        if "ratio_vs_hf_fp32" in r:
            extra += f"; vs HF fp32 ({r['peer_fp32']:.0f} tok/s): {r['ratio_vs_hf_fp32']:.2f}x"
        return [[name, what, f"{r['ours']:.0f} tok/s", f"{r['peer']:.0f} tok/s", f"{r['ratio']:.2f}x", extra,
                 f"{mem['ours']:.0f} / {mem['peer']:.0f} MiB"]]
    if name.startswith("generate"):
        what = f"{r['dtype']}, greedy, batch {r['batch']}, {r['prompt_tokens']}+{r['new_tokens']} tokens"
        notes = f"same tokens {r['same_tokens']:.0%}"
        if r.get("compile"):
            what += ", compiled"
            notes += f"; first call (compiles) {r['first_call_s']['ours']:.1f} s"
        return [[name, what, f"{r['ours']:.0f} tok/s", f"{r['peer']:.0f} tok/s", f"{r['ratio']:.2f}x",
                 notes, f"{mem['ours']:.0f} / {mem['peer']:.0f} MiB"]]
    rss = ", ".join(f"{mb} MB in: {v} MB" for mb, v in r.get("peak_rss_mb", {}).items())
    return [[name, f"tokenize, {r.get('num_workers')} workers", f"{r['ours']} MB/s", f"{r['peer']} MB/s",
             f"{r['ratio']:.2f}x", f"peak RSS {rss}", ""]]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny settings: checks the benches run, measures nothing")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads for the model benches (0 = default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--rounds", type=int, default=0, help="timed rounds of the model benches (0 = their defaults)")
    p.add_argument("--json", action="store_true", help="print all results as one JSON object on the last line")
    args = p.parse_args(argv)
    common = ["--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
    common += ["--rounds", str(args.rounds)] if args.rounds else []
    quick = QUICK if args.quick else {"train": [], "generate": [], "prepare": []}

    results = {}
    auto = run_bench("train_throughput.py", [*common, *quick["train"]])
    if auto.get("dtype") == "float32":  # the device's default: that run is the fp32 row
        results["train fp32"] = auto
    else:  # mixed precision: fp32 measured too, each its own row
        results["train fp32"] = run_bench("train_throughput.py", ["--dtype", "float32", *common, *quick["train"]])
        results[f"train {auto.get('dtype', 'auto')}"] = auto
    if str(auto.get("device", "")).startswith("cuda") and auto.get("dtype") != "float16":
        # What a Kaggle T4 trains in (fp16 + GradScaler), measured here too.
        results["train float16"] = run_bench("train_throughput.py", ["--dtype", "float16", *common, *quick["train"]])
    gen = run_bench("generate_throughput.py", [*common, *quick["generate"]])
    results[f"generate {gen.get('dtype', '')}".strip()] = gen
    if gen.get("device") == "cpu" and not args.quick:  # generate(compile=True), sample.py --compile: CPUs only
        results[f"generate {gen['dtype']} compiled"] = run_bench(
            "generate_throughput.py", ["--compile", "true", *common, *quick["generate"]])
    if gen.get("dtype", "float32") != "float32":
        results["generate float32"] = run_bench("generate_throughput.py", ["--dtype", "float32", *common,
                                                                           *quick["generate"]])
    results["prepare"] = run_bench("prepare_throughput.py", quick["prepare"])

    head = ["bench", "setting", "ours", "HF / peer", "ratio", "notes", "step memory ours / HF"]
    rows = [head] + [row for name, r in results.items() for row in rows_of(name, r)]
    device = next((r.get("device_name") or r.get("device") for r in results.values() if "device" in r), "?")
    print(f"\ndevice: {device}" + (f"; {args.threads} torch threads" if args.threads else ""))
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows[1:]:
        print("| " + " | ".join(row) + " |")
    if args.json:
        print(json.dumps(results, sort_keys=True))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
