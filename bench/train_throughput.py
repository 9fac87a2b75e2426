"""Training tokens/s: our trainer vs transformers.GPT2LMHeadModel, side by side in one process.

    python bench/train_throughput.py                       # this machine's defaults (CPU here: bf16, compiled)
    python bench/train_throughput.py --dtype float32
    python bench/train_throughput.py --compile false --rounds 5 --threads 1 --json

Ours: train.py's Trainer itself (setup(), then train_step(): autocast forward, scaled backward, unscale,
clip_grad_norm_, fused AdamW step, zero_grad, LR schedule, with its data reader) on token bins of
random ids, with gradient_accumulation_steps=1 and the dtype and compile hardware.decide picks for a
full training run (the guide's 3 epochs of WikiText-103), or as forced by --dtype/--compile
(--cuda_graphs: train.py's cuda_graphs=True, on a CUDA GPU).
Peer: GPT2LMHeadModel(attn_implementation="sdpa") with the same config and initial weights,
torch.optim.AdamW (its default implementation; train.py's lr, betas and weight decay), the same
step under the same autocast, never compiled (the guide's setup), reading the same batches. Under
bf16/fp16 the peer also runs in float32 in the same rounds (ratio_vs_hf_fp32).

The sides alternate step by step after warm-up (compilation happens in warm-up and is reported as
compile_s); tokens/s are medians and ratios the median of paired rounds, over the rounds in which
other processes left the CPU alone (common.quiet_rounds). MFU is model FLOPs (common.py) over a
matmul peak measured in each round in the side's dtype (the faster of torch.mm and our product); mfu_spec
over issue #6's peak, measured in each round too: fp32 torch.mm of 2048^2 on a CPU, bf16/fp16 torch.mm of
8192^2 on a GPU.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common
import numpy as np
import torch

import hardware
import train
from data import TokenBins

# The guide's run: 3 epochs of WikiText-103 (~117M GPT-2 tokens each). hardware.decide's compile='auto'
# sees this length, so the bench runs what train.py would run on it.
GUIDE_RUN_TOKENS = 3 * 117_000_000


def hf_train_step(model, optimizer, scaler, amp, bins, batch_size, device):
    """The peer's step: what Trainer._accumulate_and_update does with one micro-batch, HF-style loss."""
    x, _ = bins.next_batch(batch_size, device)
    with amp:
        loss = model(input_ids=x, labels=x).loss  # HF shifts the labels itself
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    loss.item(), norm.item()  # train.py reads both (and so waits for the device)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def print_profile(step, n, device):
    """torch.profiler over n calls of step: the ops (on a GPU, the kernels) that took the most time."""
    from torch.profiler import ProfilerActivity, profile
    cuda = str(device).startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(n):
            step()
        common.sync(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60), file=sys.stderr)


def profile_one_step_for_ncu(step, device):
    """One call of step between cudaProfilerStart and Stop: under `ncu --profile-from-start off` only its kernels
    are profiled (Nsight Compute replays each kernel per section: slow, so one warmed-up step)."""
    torch.cuda.synchronize(device)
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize(device)
    torch.cuda.profiler.stop()
    print("ncu: one step of ours profiled", file=sys.stderr)


def write_random_bins(data_dir, vocab_size, block_size, windows, seed):
    """train.bin / val.bin of uniformly random token ids: speed does not depend on the text."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", windows), ("val", 2)):
        rng.integers(0, vocab_size, n * (block_size + 1), dtype=np.uint16).tofile(Path(data_dir) / f"{split}.bin")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", help="auto (hardware.decide), float32/fp32, bfloat16/bf16, float16/fp16")
    p.add_argument("--compile", default="auto", help="auto (hardware.decide for a full run), true or false: ours only")
    p.add_argument("--config", default="default", choices=sorted(common.CONFIGS), help="model shape")
    p.add_argument("--batch_size", type=common.at_least_one, default=8)
    p.add_argument("--block_size", type=int, default=0, help="sequence length (0 = the config's n_positions)")
    p.add_argument("--warmup", type=common.at_least_one, default=2, help="untimed steps per side (ours compiles here)")
    p.add_argument("--rounds", type=common.at_least_one, default=8, help="timed steps per side, alternating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile_mode", default="",
                   help="ours only, an experiment: torch.compile(mode=...) instead of train.py's default, e.g. "
                        "reduce-overhead (CUDA graphs) or max-autotune-no-cudagraphs")
    p.add_argument("--cuda_graphs", action="store_true",
                   help="ours: train.py's cuda_graphs=True (the compiled step replayed as CUDA graphs; CUDA only)")
    p.add_argument("--profile", type=int, default=0,
                   help="after timing, profile this many of our steps (torch.profiler) and print the top ops")
    p.add_argument("--ncu", action="store_true",
                   help="CUDA: after our warm-up, run one of our steps between cudaProfilerStart and Stop and leave, "
                        "for `ncu --profile-from-start off` (Nsight Compute: bench/gpu_check.sh's ncu_train part)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    common.add_threads_arg(p)
    args = p.parse_args(argv)
    threads = common.set_threads(args.threads)

    facts = hardware.probe_facts(hardware.device_for(args.device, hardware.choose_device(args.device)))  # cuda:N kept
    hardware.preflight(facts)
    plan = hardware.decide(facts, args.dtype, args.compile, planned_tokens=GUIDE_RUN_TOKENS)
    if args.ncu and plan.device_type != "cuda":
        raise SystemExit("--ncu needs a CUDA device (Nsight Compute profiles GPU kernels)")
    config = common.CONFIGS[args.config]
    B, T = args.batch_size, args.block_size or config.n_positions
    print(hardware.describe(facts, plan), file=sys.stderr)

    steps_per_side = args.warmup + args.rounds + 1 + args.profile  # + 1: the memory measurement
    work = tempfile.TemporaryDirectory(prefix="train_bench_")
    write_random_bins(work.name, config.vocab_size, T, steps_per_side * B, args.seed)
    cfg = train.TrainConfig(**config.to_dict(), data_dir=work.name, out_dir=str(Path(work.name) / "out"),
                            max_length=T, batch_size=B, gradient_accumulation_steps=1, max_steps=10 ** 6,
                            device=plan.device, dtype=plan.dtype, compile=plan.compile, seed=args.seed,
                            resume_from_checkpoint="", sample_prompt="", export_final_model=False,
                            cuda_graphs=args.cuda_graphs)
    train.validate(cfg)
    trainer = train.Trainer(cfg, train.Dist())
    trainer.setup()
    if args.compile_mode and plan.compile:  # what train.py does, with another mode
        trainer.train_model = hardware.compile_or_eager(trainer.model, True, mode=args.compile_mode)
    hf = common.hf_peer(trainer.model).train()  # the same initial weights
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                               weight_decay=cfg.weight_decay)
    hf_scaler = hardware.grad_scaler(plan)
    fp32_scaler = torch.amp.GradScaler(facts.type, enabled=False)

    def hf_side(scaler, dtype):
        bins = TokenBins(work.name, "train", T, seed=args.seed)  # the batches ours reads, in its order
        return lambda: hf_train_step(hf, hf_opt, scaler, hardware.autocast(plan.device, dtype), bins, B, plan.device)

    sides = {"ours": trainer.train_step, "peer": hf_side(hf_scaler, plan.dtype)}
    if plan.dtype != "float32":
        sides["peer_fp32"] = hf_side(fp32_scaler, "float32")
    side_dtype = {n: torch.float32 if n == "peer_fp32" else plan.torch_dtype for n in sides}

    first, peak_mem, before = {}, {}, {}
    memory = common.StepMemory(plan.device)
    for name, step in sides.items():  # each side's warm-up, then its step memory, before the next side's
        # From before the first step of the side's model: peer_fp32 trains the peer's model and optimizer too.
        since = before.setdefault("ours" if name == "ours" else "hf", memory.allocated())
        t = time.perf_counter()
        step()
        first[name] = time.perf_counter() - t
        for _ in range(args.warmup - 1):
            step()
        if args.ncu:
            profile_one_step_for_ncu(step, plan.device)
            return
        peak_mem[name] = memory.measure(step, since)[1]

    peaks = {dt: [] for dt in set(side_dtype.values())}  # matmul FLOP/s per dtype, one per round
    spec_dtype = common.spec_peak_dtype(facts, plan.torch_dtype)
    spec_n = common.peak_size(plan.device)
    spec_peaks = []  # issue #6's peak: torch.mm alone, of spec_n^2, in spec_dtype
    flops_tok = common.train_flops_per_token(config, T)

    def report(r, this):
        for dt, found in peaks.items():
            found.append(common.matmul_peak_flops(plan.device, dt))
        spec_peaks.append(common.matmul_peak_flops(plan.device, spec_dtype, spec_n, products=(torch.mm,)))
        line = "  ".join(f"{n} {B * T / s:6.0f} tok/s" for n, s in this.items())
        gf = "  ".join(f"{str(dt)[6:]} {v[-1] / 1e9:.0f}" for dt, v in peaks.items())
        print(f"round {r + 1}/{args.rounds}: {line}  matmul peak GFLOP/s {gf}", file=sys.stderr)

    times, contention = common.interleaved(sides, args.rounds, report, device=plan.device)
    quiet, is_quiet = common.quiet_rounds(contention)
    times = {n: [ts[i] for i in quiet] for n, ts in times.items()}
    peaks = {dt: [v[i] for i in quiet] for dt, v in peaks.items()}
    spec_peaks = [spec_peaks[i] for i in quiet]
    tps = {n: B * T / statistics.median(ts) for n, ts in times.items()}
    # MFU per round against that round's peak in the side's dtype (both feel the same load), then the median;
    # mfu_spec against issue #6's peak (one for all sides).
    mfu = {n: statistics.median(flops_tok * B * T / s / pk for s, pk in zip(ts, peaks[side_dtype[n]]))
           for n, ts in times.items()}
    mfu_spec = {n: statistics.median(flops_tok * B * T / s / pk for s, pk in zip(ts, spec_peaks))
                for n, ts in times.items()}
    compiled = plan.compile and getattr(trainer.train_model, "compiled", False)
    if args.profile:
        print_profile(trainer.train_step, args.profile, plan.device)
    work.cleanup()

    result = {
        "bench": "train_throughput", "device": plan.device, "device_name": facts.name, "dtype": plan.dtype,
        "compile": compiled, "compile_mode": (args.compile_mode or "default") if compiled else None,
        "cuda_graphs": trainer.plan.cuda_graphs,
        "config": args.config,
        "batch": [B, T], "rounds": args.rounds,
        "quiet_rounds": len(quiet) if is_quiet else 0, "threads": threads,
        "ours": round(tps["ours"], 1), "peer": round(tps["peer"], 1),
        "ratio": round(common.paired_ratio(times["ours"], times["peer"]), 3),
        "mfu": round(mfu["ours"], 4), "mfu_peer": round(mfu["peer"], 4),
        "matmul_peak_gflops": {str(dt)[6:]: round(statistics.median(v) / 1e9, 1) for dt, v in peaks.items()},
        "mfu_spec": round(mfu_spec["ours"], 4), "mfu_spec_peer": round(mfu_spec["peer"], 4),
        "spec_peak": {"dtype": str(spec_dtype)[6:], "n": spec_n, "product": "torch.mm",
                      "gflops": round(statistics.median(spec_peaks) / 1e9, 1)},
        "compile_s": round(first["ours"], 1) if compiled else 0.0,
        **memory.fields(peak_mem, "step"),
    }
    if "peer_fp32" in times:
        result["peer_fp32"] = round(tps["peer_fp32"], 1)
        result["ratio_vs_hf_fp32"] = round(common.paired_ratio(times["ours"], times["peer_fp32"]), 3)
        result["mfu_peer_fp32"] = round(mfu["peer_fp32"], 4)
        result["mfu_spec_peer_fp32"] = round(mfu_spec["peer_fp32"], 4)

    print(f"\n{facts.name} ({plan.device}), {args.config} model, batch {B} x {T}, {plan.dtype}, "
          f"ours {'compiled' if compiled else 'eager'} (first step {first['ours']:.1f} s), "
          f"{threads} threads, {result['quiet_rounds']}/{args.rounds} quiet rounds")
    mem, spec = result["peak_mem_mib"], result["spec_peak"]
    print(f"  ours {result['ours']:8.0f} tok/s  MFU {result['mfu']:.0%} ({result['mfu_spec']:.0%})  "
          f"step memory {mem['ours']:.0f} MiB")
    print(f"  HF   {result['peer']:8.0f} tok/s  MFU {result['mfu_peer']:.0%} ({result['mfu_spec_peer']:.0%})  "
          f"step memory {mem['peer']:.0f} MiB  -> ours/HF {result['ratio']:.2f}x")
    if "peer_fp32" in result:
        print(f"  HF fp32 {result['peer_fp32']:5.0f} tok/s  step memory {mem['peer_fp32']:.0f} MiB"
              f"  -> ours/HF fp32 {result['ratio_vs_hf_fp32']:.2f}x")
    print(f"  MFU: against the measured matmul peak in each side's dtype; in brackets against issue #6's, "
          f"{spec['dtype']} torch.mm of {spec['n']}^2 ({spec['gflops']:,.0f} GFLOP/s)")
    if args.json:
        common.emit_json(result)


if __name__ == "__main__":
    common.run_main(main, hardware.HardwareError, train.ConfigError)
