"""What the benches share: the repo on sys.path, the HF peer model, the matmul peak, FLOP counts,
memory readings, fair interleaved timing and the `--json` last line.

Shared machines are noisy (other processes come and go), so every bench times both sides in one
process, alternating, and reports medians and ratios of paired measurements.
"""

import argparse
import ctypes
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

try:
    import resource
except ImportError:  # Windows: the CPU memory figures read 0 there (not measured)
    resource = None

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# train.py and evaluate.py run with transparent huge pages for big CPU tensors (set before torch allocates);
# a bench runs in the same allocator setting, and since both sides share the process, so does the peer.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

import hardware  # noqa: E402
from model import GPTConfig, mm_nt  # noqa: E402

# Configs the benches run: the default model, and a tiny one for the test suite.
CONFIGS = {
    "default": GPTConfig(),
    "tiny": GPTConfig(vocab_size=512, n_positions=64, n_embd=32, n_layer=2, n_head=2, n_inner=128),
}


def hf_peer(model):
    """transformers.GPT2LMHeadModel (SDPA attention) with `model`'s config and weights, on its device."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise SystemExit("error: the benches compare against HF transformers: pip install -r requirements-dev.txt") from None

    from export_hf import hf_config, to_hf_state_dict
    hf = GPT2LMHeadModel(GPT2Config(**hf_config(model.config), attn_implementation="sdpa"))
    assert hf.config._attn_implementation == "sdpa"
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=False)
    assert not unexpected and all(k.endswith(".attn.bias") for k in missing), (missing, unexpected)
    return hf.to(next(model.parameters()).device)


def sync(device):
    """Wait for a CUDA device's queued work (nothing elsewhere)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def peak_size(device):
    """The side of the square matmul whose speed stands for the device's peak (issue #6): 8192 on a GPU, 2048
    on a CPU."""
    return 8192 if str(device).startswith("cuda") else 2048


def matmul_peak_flops(device, dtype, n=None, reps=3, products=(torch.mm, mm_nt)):
    """Best FLOP/s of an n x n matmul (n: peak_size) in `dtype` on `device`, the fastest of `products`: by
    default torch.mm and model.mm_nt, the product our linears use (on AMD CPUs fp32 torch.mm runs MKL's AVX2
    code, at about half the speed of the oneDNN kernels mm_nt calls there, and the device's peak is the faster
    one). A product more than twice as slow as the fastest at a quarter of the size is not timed at full size:
    where a CPU emulates bf16, bf16 torch.mm of 2048^2 takes most of a minute a call (mm_nt: about a second)."""
    n = n or peak_size(device)
    if len(products) > 1:
        trial = {product: best_matmul_time(product, n // 4, device, dtype, reps=1) for product in products}
        products = [p for p in products if trial[p] <= 2 * min(trial.values())]
    return 2 * n ** 3 / min(best_matmul_time(product, n, device, dtype, reps) for product in products)


def best_matmul_time(product, n, device, dtype, reps):
    """Fastest of `reps` timed calls of product(a, b), n x n operands in `dtype`, after a warm-up call (kernel
    selection, page faults)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    product(a, b)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        product(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def spec_peak_dtype(facts, dtype):
    """The dtype of issue #6's MFU peak (torch.mm of peak_size^2): fp32 on a CPU; on a CUDA GPU the run's own half
    precision, or for an fp32 run bf16 where the GPU has it natively, else fp16."""
    if facts.type != "cuda":
        return torch.float32
    if dtype in (torch.bfloat16, torch.float16):
        return dtype
    return torch.bfloat16 if hardware.native_cuda_bf16(facts) else torch.float16


def train_flops_per_token(config, block_size):
    """Model FLOPs of one training token (forward + backward = 3 x forward), PaLM-style.

    Matmul weights only (the unpadded vocabulary: padding is our trick, not model work), plus causal
    attention's QK^T and AV counted as full T x T as PaLM and nanoGPT do."""
    C, L = config.n_embd, config.n_layer
    n_matmul = L * (4 * C * C + 2 * C * config.n_inner) + config.vocab_size * C
    return 6 * n_matmul + 12 * L * C * block_size


def rss_bytes():
    """This process's resident memory now (Linux /proc; else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes():
    """This process's peak resident memory so far (0 where it is not known: Windows)."""
    if resource is None:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def release_free_heap():
    """Hand the C heap's free pages back to the kernel (glibc's malloc_trim; nothing elsewhere), so that RSS
    counts what a call allocates even where it would reuse blocks earlier calls freed."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


class StepMemory:
    """Peak memory one call adds on top of what was resident before it.

    CUDA: torch.cuda.max_memory_allocated during the call minus memory allocated before it, or before `since`
    (allocated(), taken before the side's first call): what a side keeps allocated between its calls (its
    optimizer state; its gradients, which CUDA graphs keep) then counts for each side alike.
    CPU: resident set size sampled every millisecond by a thread, peak minus the RSS just before.
    Both sides of a comparison live in the same process, so the figure is what the step itself
    needs (activations, gradients, logits), not the process total."""

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")
        self.device = device
        self._peak = 0
        self._running = False

    def _sample(self):
        while self._running:
            self._peak = max(self._peak, rss_bytes())
            time.sleep(0.001)

    def allocated(self):
        """CUDA: the bytes allocated now, for measure's `since`; elsewhere None."""
        if not self.cuda:
            return None
        sync(self.device)
        return torch.cuda.memory_allocated(self.device)

    def measure(self, fn, since=None):
        """Run fn(); return (its result, peak bytes above the memory in use before it, or on CUDA at `since`)."""
        if self.cuda:
            sync(self.device)
            before = torch.cuda.memory_allocated(self.device) if since is None else since
            torch.cuda.reset_peak_memory_stats(self.device)
            out = fn()
            sync(self.device)
            return out, torch.cuda.max_memory_allocated(self.device) - before
        release_free_heap()  # else memory freed by earlier steps, still resident, would be reused unseen
        before = self._peak = rss_bytes()
        self._running = True
        sampler = threading.Thread(target=self._sample, daemon=True)
        sampler.start()
        try:
            out = fn()
        finally:
            self._running = False
            sampler.join()
        return out, max(self._peak, rss_bytes()) - before

    def fields(self, peaks, what):
        """The JSON fields of a bench's memory figures: `peaks` ({side: bytes} from measure) for one `what`
        ('step', 'call'), how they were measured, and the process's own peak resident set."""
        kind = ("cuda max_memory_allocated above the side's memory before its first call" if self.cuda
                else f"cpu RSS above the {what}'s start")
        return {"peak_mem_mib": {k: round(v / 2**20, 1) for k, v in peaks.items()}, "peak_mem_kind": kind,
                "process_peak_rss_mib": round(peak_rss_bytes() / 2**20, 1)}


class CpuContention:
    """Share of this machine's CPU time used by other processes between start() and stop().

    From /proc/stat (all CPUs' busy time) minus /proc/self/stat (ours). A step timed while other
    processes ran is slow for reasons of their making: the benches keep the rounds where contention
    was low. None where /proc is missing (not Linux): then every round counts."""

    def __init__(self):
        self.n_cpu = os.cpu_count() or 1
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.available = os.path.exists("/proc/stat") and os.path.exists("/proc/self/stat")

    def _read(self):
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = sum(v) - v[3] - v[4]  # all but idle and iowait
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return busy, int(own[11]) + int(own[12]), time.perf_counter()  # utime + stime

    def start(self):
        if self.available:
            self._start = self._read()

    def stop(self):
        if not self.available:
            return None
        (b0, o0, t0), (b1, o1, t1) = self._start, self._read()
        return max(0.0, (b1 - b0) - (o1 - o0)) / self.tick / (self.n_cpu * max(t1 - t0, 1e-9))


def interleaved(sides, rounds, on_round=None, device=None):
    """Time each side's step `rounds` times, alternating: round r runs the sides rotated by r, so no
    side always goes first (or right after a slow neighbour). sides: {name: fn() -> None}. On a CUDA
    `device` each step is timed to the end of its GPU work (a step that leaves work queued, as an optimizer
    launched after the last .item() does, would else hand its tail to the next side's time).
    Returns (times, contention): {name: [seconds per round]}, {name: [share of the CPU other
    processes used during that step, or None]}; on_round(r, times_of_round) is called after each round."""
    names = list(sides)
    times, contention = {n: [] for n in names}, {n: [] for n in names}
    cpu = CpuContention()
    for r in range(rounds):
        k = r % len(names)
        this = {}
        for name in names[k:] + names[:k]:
            sync(device)
            cpu.start()
            t = time.perf_counter()
            sides[name]()
            sync(device)
            this[name] = time.perf_counter() - t
            times[name].append(this[name])
            contention[name].append(cpu.stop())
        if on_round:
            on_round(r, this)
    return times, contention


def quiet_rounds(contention, threshold=0.1, minimum=3):
    """(rounds to use, whether they are quiet): the rounds in which every side ran while other
    processes used < threshold of the CPU, or every round (and False) when fewer than `minimum`
    qualify or contention is unknown."""
    per_round = list(zip(*contention.values()))
    quiet = [i for i, c in enumerate(per_round) if all(x is not None and x < threshold for x in c)]
    return (quiet, True) if len(quiet) >= minimum else (list(range(len(per_round))), False)


def at_least_one(text):
    """argparse type of a count that must be 1 or more (--rounds, --warmup, --batch_size)."""
    try:
        n = int(text)
    except ValueError:
        n = None
    if n is None or n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return n


def run_main(main, *errors):
    """A bench's `__main__`: main(), with the errors it knows (a device or dtype this machine lacks, settings
    train.py refuses) ended as one `error:` line and exit code 2, as the project's scripts end."""
    from cli import fail
    try:
        return main()
    except errors as e:
        fail(str(e))


def add_threads_arg(parser):
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0 = torch's default). On a shared, busy machine 1 thread gives "
                             "steadier ratios: a multi-threaded kernel waits for its slowest, pre-empted thread")


def set_threads(n):
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def paired_ratio(fast, slow):
    """Median over rounds of slow[i] / fast[i]: how many times faster `fast` is, robust to load drift."""
    return statistics.median(s / f for f, s in zip(fast, slow))


def emit_json(result):
    """The benches' contract: with --json the last line printed is one JSON object."""
    print(json.dumps(result, sort_keys=True), flush=True)
