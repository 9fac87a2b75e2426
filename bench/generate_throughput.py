"""Generation tokens/s: our KV-cache generate vs transformers' generate(use_cache=True), greedy.

    python bench/generate_throughput.py                  # batch 1, 16-token prompt, 200 new tokens
    python bench/generate_throughput.py --dtype float32 --json

Ours: GPT.generate(temperature=0) under the dtype hardware.decide picks (sample.py's rule: autocast
bf16 on a CPU with native bf16), without torch.compile (as sample.py runs unless --compile) or with it
(--compile true: CompiledDecode on a CPU; the first call, which compiles, is a warm-up and its time is
reported as first_call_s). Peer: GPT2LMHeadModel(attn_implementation="sdpa") with
the same weights, generate(do_sample=False, use_cache=True) under the same autocast. Both produce
exactly --new_tokens tokens from the same prompt; the calls alternate after a warm-up and tokens/s
are medians (of the rounds where other processes left the CPU alone, see common.quiet_rounds).
"""

import argparse
import statistics
import sys
import time

import common
import torch

import hardware
from model import GPT


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", help="auto (hardware.decide), float32/fp32, bfloat16/bf16, float16/fp16")
    p.add_argument("--config", default="default", choices=sorted(common.CONFIGS), help="model shape")
    p.add_argument("--batch_size", type=common.at_least_one, default=1)
    p.add_argument("--prompt_tokens", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=None, help="default 200, or what fits the context")
    p.add_argument("--rounds", type=common.at_least_one, default=7, help="timed generations per side, alternating")
    p.add_argument("--compile", default="false", choices=["false", "true"],
                   help="generate(compile=...): compiled one-token steps on a CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    common.add_threads_arg(p)
    args = p.parse_args(argv)
    threads = common.set_threads(args.threads)

    # sample.py's rules (--compile: compiled steps on a CPU only)
    facts, plan = hardware.inference_plan(args.device, args.dtype, compile=args.compile == "true")
    print(hardware.describe(facts, plan), file=sys.stderr)
    config = common.CONFIGS[args.config]
    if args.new_tokens is None:
        args.new_tokens = min(200, config.n_positions - args.prompt_tokens)
    if args.prompt_tokens + args.new_tokens > config.n_positions:
        p.error(f"--prompt_tokens + --new_tokens must fit the context ({config.n_positions}) so that "
                "both sides decode with a plain KV cache")

    torch.manual_seed(args.seed)
    ours = GPT(config).to(plan.device).eval()
    hf = common.hf_peer(ours).eval()
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, config.vocab_size, (args.batch_size, args.prompt_tokens), generator=g).to(plan.device)
    n = args.new_tokens
    compile = plan.compile
    out = {}

    def run_ours():
        with hardware.autocast(plan.device, plan.dtype):
            out["ours"] = ours.generate(prompt, n, temperature=0, compile=compile)[:, -n:].tolist()

    def run_peer():
        with torch.no_grad(), hardware.autocast(plan.device, plan.dtype):
            # eos_token_id=None and min_new_tokens: exactly n tokens, as ours makes.
            gen = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=True,
                              max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
            out["peer"] = gen[:, -n:].tolist()

    sides = {"ours": run_ours, "peer": run_peer}
    first_call_s, peak_mem = {}, {}
    memory = common.StepMemory(plan.device)
    for name, step in sides.items():  # warm-up (kernel selection, allocator, compiling), then its memory
        since = memory.allocated()
        t0 = time.perf_counter()
        step()
        first_call_s[name] = round(time.perf_counter() - t0, 2)
        peak_mem[name] = memory.measure(step, since)[1]
    times, contention = common.interleaved(
        sides, args.rounds,
        lambda r, this: print(f"round {r + 1}/{args.rounds}: " + "  ".join(
            f"{k} {args.batch_size * n / s:6.1f} tok/s" for k, s in this.items()), file=sys.stderr),
        device=plan.device)
    quiet, is_quiet = common.quiet_rounds(contention)
    kept = {k: [v[i] for i in quiet] for k, v in times.items()}
    tps = {k: args.batch_size * n / statistics.median(v) for k, v in kept.items()}
    same = sum(a == b for ra, rb in zip(out["ours"], out["peer"]) for a, b in zip(ra, rb)) / (args.batch_size * n)

    result = {
        "bench": "generate_throughput", "device": plan.device, "device_name": facts.name, "dtype": plan.dtype,
        "compile": compile, "first_call_s": first_call_s, "config": args.config, "batch": args.batch_size,
        "prompt_tokens": args.prompt_tokens, "new_tokens": n,
        "ours": round(tps["ours"], 1), "peer": round(tps["peer"], 1),
        "ratio": round(common.paired_ratio(kept["ours"], kept["peer"]), 3),
        "same_tokens": round(same, 3), "rounds": args.rounds,
        "quiet_rounds": len(quiet) if is_quiet else 0, "threads": threads,
        **memory.fields(peak_mem, "call"),
    }
    print(f"\n{facts.name} ({plan.device}), {args.config} model, greedy, batch {args.batch_size}, "
          f"{args.prompt_tokens}-token prompt + {n} new, {plan.dtype}{', compiled' if compile else ''}")
    print(f"  ours {result['ours']:7.1f} tok/s   HF generate {result['peer']:7.1f} tok/s   -> {result['ratio']:.2f}x"
          f"   (same tokens: {same:.0%}; {len(quiet) if is_quiet else 0}/{args.rounds} quiet rounds)")
    if args.json:
        common.emit_json(result)


if __name__ == "__main__":
    common.run_main(main, hardware.HardwareError)
