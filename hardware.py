"""Device, dtype and torch.compile decisions, made right for the hardware users actually get.

The decisions are a pure function of a few device facts, so the whole table (P100, V100, T4, A100,
L4, H100, CPUs with and without native bf16, Apple MPS) is tested on a CPU-only machine:

    facts = probe_facts(device_for(cfg.device, choose_device(cfg.device)))  # reads torch, /proc/cpuinfo
    preflight(facts)                                  # sm_XY in this torch build? does a kernel run?
    plan = decide(facts, cfg.dtype, cfg.compile, planned_tokens)
    print(describe(facts, plan))                      # the one device line printed at start
    scaler = grad_scaler(plan)                        # active for float16 only
    model = compile_or_eager(model, plan.compile)     # falls back to eager, with one line, if compile fails
    with autocast(plan.device, plan.dtype): ...
    nccl_check()                                      # DDP: fail fast if all_reduce hangs (T4 x2)

Weights, optimizer state, loss and softmax stay float32 under every plan: autocast only runs the
matmuls in bf16/fp16, so a checkpoint resumes on another machine with another dtype.
"""

import contextlib
import functools
import os
import platform
import re
import sys
import threading
import warnings
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from cli import one_line, plural, say

CU126_INSTALL = "pip install torch --index-url https://download.pytorch.org/whl/cu126"
CU128_INSTALL = "pip install torch --index-url https://download.pytorch.org/whl/cu128"

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                  "float16": "float16", "fp16": "float16"}

# CPU flags that mean bf16 matmuls run natively (oneDNN uses them), best first.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")

# torch.compile on CPU pays only on a long enough run. Measured on a 2-thread AMD EPYC (avx512_bf16),
# torch 2.13, default model shape, batch 8 x 512, train.py's training step (bench/train_throughput.py,
# quiet machine, 2026-11-26): eager tokens/s per CPU thread, and the speed-up once compiled (fp32, matmuls on
# oneDNN (onednn_fp32_matmuls), 1799 -> 2458; bf16, with the blocked attention and fused loss compiled runs use,
# 2709 -> 4145-4250 tokens/s). fp32 on MKL (what Intel and AVX2-only AMD CPUs keep) measured here before:
# 1159 -> 1413, slower and a smaller speed-up, the same expected saving per token within 4%, so one figure
# serves both engines.
# Compiling costs 20-60 s on the first step there, ~80 s on a 2-core Intel Xeon (2026-11-27).
CPU_EAGER_TOKENS_PER_S_PER_THREAD = {"float32": 900, "bfloat16": 1355}
CPU_COMPILE_SPEEDUP = {"float32": 1.37, "bfloat16": 1.54}
# Compile is switched on when the time it is expected to save is at least this: twice the
# slowest first-step compile measured (~80 s), so it pays even then.
CPU_COMPILE_MIN_SAVING_S = 160.0


class HardwareError(Exception):
    """A device problem the user can fix; the message is one line naming the problem and the fix."""


# ---------------------------------------------------------------------------------------------
# Facts


@dataclass(frozen=True)
class DeviceFacts:
    """What decide() needs to know about a device. Pure data, so tests can describe any GPU."""

    type: str  # 'cuda' | 'cpu' | 'mps'
    name: str = ""  # 'Tesla T4', 'AMD EPYC 7B13', ...
    index: int = 0  # CUDA device index (cuda:N)
    capability: tuple | None = None  # CUDA compute capability (major, minor)
    arch_list: tuple = ()  # torch.cuda.get_arch_list(): the GPU code this torch build carries
    gpu_count: int = 0  # CUDA GPUs visible to this process
    memory_bytes: int | None = None  # GPU memory on CUDA, RAM on CPU/MPS
    cpu_threads: int = 1  # torch.get_num_threads()
    cpu_bf16: bool = False  # the CPU does bf16 natively
    cpu_bf16_flag: str = ""  # which flag says so: 'amx_bf16' | 'avx512_bf16'
    cpu_bf16_source: str = ""  # where that was read: '/proc/cpuinfo' | 'torch.cpu'
    torch_version: str = ""  # torch.__version__, e.g. '2.8.0+cu128'
    cuda_version: str | None = None  # torch.version.cuda: the CUDA the build targets, None if CPU-only
    platform: str = "linux"  # sys.platform

    @property
    def device(self):
        """The torch device string: 'cuda:0', 'cpu' or 'mps'."""
        return f"cuda:{self.index}" if self.type == "cuda" else self.type


def cpu_bf16_flag(flags):
    """The best native-bf16 flag among a CPU's flags (from /proc/cpuinfo), or '' if none."""
    return next((f for f in CPU_BF16_FLAGS if f in flags), "")


def _read_cpuinfo():
    """(model name, vendor id, set of flags) from /proc/cpuinfo; ('', '', None) where there is no such file."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return "", "", None
    name = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    vendor = re.search(r"^vendor_id\s*:\s*(\S+)", text, re.M)  # x86: 'GenuineIntel', 'AuthenticAMD'
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)  # x86; ARM has 'Features' and no bf16 we use
    return ((name.group(1).strip() if name else ""), (vendor.group(1) if vendor else ""),
            set(flags.group(1).split() if flags else ()))


@functools.lru_cache(maxsize=None)
def onednn_fp32_matmuls():
    """Whether this CPU's fp32 matmuls should run on oneDNN rather than torch's default, MKL. On AMD CPUs with
    AVX-512 MKL runs its AVX2 code, and on the 2-core AMD EPYC (Zen 5) this project measures on, oneDNN's kernels
    are ~2x faster for the model's matmuls (a 2048^2 fp32 product 210 vs 467 GFLOP/s; bench/NOTES.md, ninth
    pass); on AMD CPUs whose AVX-512 units are 256 bits wide (Zen 4, Zen 5 laptops) the gain should be smaller
    (not measured). Elsewhere (Intel, AMD with AVX2 only, where both libraries run AVX2 code, ARM, builds without
    oneDNN) MKL or the platform's BLAS stays. GPT_ONEDNN_FP32=1 / =0 in the environment overrides the rule."""
    forced = os.environ.get("GPT_ONEDNN_FP32", "").strip()
    if forced not in ("", "0", "1"):
        warnings.warn(f"GPT_ONEDNN_FP32={forced!r} ignored: use 0 (torch's default engine) or 1 (oneDNN)", stacklevel=2)
    if not torch.backends.mkldnn.is_available():
        if forced == "1":
            warnings.warn("GPT_ONEDNN_FP32=1 ignored: this PyTorch build has no oneDNN", stacklevel=2)
        return False
    if forced in ("0", "1"):
        return forced == "1"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    vendor = _read_cpuinfo()[1] or platform.processor()  # Windows: '... AuthenticAMD'
    return "AuthenticAMD" in vendor


def _ram_bytes():
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # Windows has no sysconf
        return None


def probe_facts(device="cpu"):
    """Read the DeviceFacts of `device` ('cpu', 'mps', 'cuda' or 'cuda:N') from torch and the OS.

    For 'cpu' and 'mps' nothing touches CUDA, so no CUDA context is created (a notebook that later
    starts torchrun must not have one)."""
    device_type, _, index = device.partition(":")
    common = dict(torch_version=torch.__version__, cuda_version=torch.version.cuda,
                  platform=sys.platform, cpu_threads=torch.get_num_threads())
    if device_type == "cuda":
        idx = int(index) if index else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        return DeviceFacts(type="cuda", name=props.name, index=idx, capability=(props.major, props.minor),
                           arch_list=tuple(torch.cuda.get_arch_list()), gpu_count=torch.cuda.device_count(),
                           memory_bytes=props.total_memory, **common)
    if device_type == "mps":
        return DeviceFacts(type="mps", name="Apple GPU (MPS)", memory_bytes=_ram_bytes(), **common)
    if device_type != "cpu":
        raise HardwareError(f"unknown device {device!r}: use auto, cuda, cuda:N, mps or cpu")
    name, _, flags = _read_cpuinfo()
    flag, source = "", ""
    if flags is not None:
        flag, source = cpu_bf16_flag(flags), "/proc/cpuinfo"
    elif getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():  # macOS/Windows x86
        flag, source = "avx512_bf16", "torch.cpu"
    return DeviceFacts(type="cpu", name=name or platform.processor() or platform.machine(),
                       memory_bytes=_ram_bytes(), cpu_bf16=bool(flag), cpu_bf16_flag=flag,
                       cpu_bf16_source=source if flag else "", **common)


# ---------------------------------------------------------------------------------------------
# Device choice and preflight


def device_request(requested):
    """A --device value as the rules read it: 'CUDA:1 ' is 'cuda:1'."""
    return str(requested).strip().lower()


def device_for(requested, device_type):
    """The device to put tensors on: 'cuda:N' when GPU N was asked for, else the chosen type."""
    req = device_request(requested)
    return req if req.startswith("cuda:") else device_type


def resolve_device(requested, cuda_count, mps_available, cuda_version):
    """Pure: the device type ('cuda'|'mps'|'cpu') for `requested` ('auto'|'cuda'|'cuda:N'|'mps'|'cpu').

    auto picks cuda > mps > cpu; for 'cuda:N' the index is checked against `cuda_count` and the type
    returned (the caller keeps the index). `cuda_version` is torch.version.cuda (None: CPU-only build)."""
    req = device_request(requested)
    if req == "auto":
        return "cuda" if cuda_count else "mps" if mps_available else "cpu"
    if req == "cpu":
        return "cpu"
    if req == "mps":
        if not mps_available:
            raise HardwareError("device='mps' but MPS is not available (it needs an Apple-silicon Mac and "
                                "a macOS build of torch); use --device=cpu")
        return "mps"
    m = re.fullmatch(r"cuda(?::(\d+))?", req)
    if not m:
        raise HardwareError(f"unknown device {requested!r}: use auto, cuda, cuda:N, mps or cpu")
    if not cuda_count:
        why = "this torch is a CPU-only build" if cuda_version is None else f"torch is built for CUDA {cuda_version}"
        raise HardwareError(f"device='{requested}' but no CUDA GPU is visible ({why}); enable a GPU "
                            "(Kaggle/Colab: set the notebook accelerator) or use --device=cpu")
    if m.group(1) is not None and int(m.group(1)) >= cuda_count:
        raise HardwareError(f"device='{requested}' but only {cuda_count} CUDA GPU(s) are visible "
                            f"(cuda:0..cuda:{cuda_count - 1}); pick one of those or --device=cuda")
    return "cuda"


def choose_device(requested="auto"):
    """The device type to train on, 'cuda'|'mps'|'cpu': 'auto' picks cuda > mps > cpu; HardwareError if the
    asked one is absent (for 'cuda:N', if there is no GPU N)."""
    req = device_request(requested)
    # Only probe CUDA when it may be used: a CPU run never initialises the CUDA driver.
    cuda_count = torch.cuda.device_count() if req != "cpu" and req != "mps" and torch.cuda.is_available() else 0
    mps_available = req in ("auto", "mps") and torch.backends.mps.is_available()
    return resolve_device(requested, cuda_count, mps_available, torch.version.cuda)


def _arch_number(digits):
    """'86' -> (8, 6); '100' -> (10, 0): the last digit is the minor version."""
    return int(digits[:-1]), int(digits[-1])


def arch_supported(capability, arch_list):
    """Pure: can a torch build whose get_arch_list() is `arch_list` run kernels on this capability?

    - 'sm_XY' (machine code) runs on the same major version with minor >= Y (sm_80 runs on an L4, 8.9);
    - 'compute_XY' (PTX) is JIT-compiled by the driver for XY or any newer GPU;
    - an 'a' suffix (sm_90a) is for exactly that GPU; an 'f' suffix (sm_100f) for its family (same major).
    A list with no sm_/compute_ entries (a ROCm build's gfx names) cannot be checked here: True."""
    cuda_entries = [m for m in (re.fullmatch(r"(sm|compute)_(\d{2,3})([af]?)", a) for a in arch_list) if m]
    if not cuda_entries:
        return True
    cap = tuple(capability)
    for m in cuda_entries:
        kind, (major, minor), suffix = m.group(1), _arch_number(m.group(2)), m.group(3)
        if suffix == "a":
            ok = cap == (major, minor)
        elif suffix == "f" or kind == "sm":
            ok = cap[0] == major and cap[1] >= minor
        else:  # plain PTX
            ok = cap >= (major, minor)
        if ok:
            return True
    return False


def _arch_fix(capability):
    """What to do when this torch has no kernels for a GPU of `capability`."""
    if tuple(capability) < (5, 0):
        return "this GPU is too old for current PyTorch builds: use a T4 or newer, or --device=cpu"
    if tuple(capability) < (7, 5):  # Pascal/Volta: dropped from CUDA 12.8+ builds, kept in 12.6 ones
        return f"switch the notebook accelerator to GPU T4, or install a CUDA 12.6 build of torch: {CU126_INSTALL}"
    return f"install a torch build for a newer CUDA: {CU128_INSTALL}"


def _sm(capability):
    return f"sm_{capability[0]}{capability[1]}"


def preflight(facts):
    """Check, before any data or model work, that the device can run this torch's kernels.

    On CUDA: the GPU's sm_XY must be covered by torch.cuda.get_arch_list() (Kaggle's CUDA 12.8 torch
    has no sm_60, so a P100 reports is_available() True and then fails every kernel), and one tiny op
    must run. Raises HardwareError with the fix. Nothing to check on CPU."""
    if facts.type == "cpu":
        return
    if facts.type == "cuda" and not arch_supported(facts.capability, facts.arch_list):
        raise HardwareError(
            f"{facts.name} is {_sm(facts.capability)}, but this torch {facts.torch_version} carries GPU code only "
            f"for {' '.join(facts.arch_list)}: {_arch_fix(facts.capability)}")
    try:
        x = torch.ones(4, 4, device=facts.device)
        (x @ x).sum().item()
    except Exception as e:  # any failure of the first kernel means the device is unusable as is
        first = one_line(e)
        fix = (_arch_fix(facts.capability) if facts.type == "cuda" and "no kernel image" in first
               else "check the GPU (nvidia-smi) and the torch install, or use --device=cpu")
        raise HardwareError(f"the first kernel on {facts.name} ({facts.device}) failed: {first}; {fix}") from e


# ---------------------------------------------------------------------------------------------
# Decisions


@dataclass(frozen=True)
class Plan:
    """How to run: device, autocast dtype, GradScaler on/off, torch.compile on/off, and why."""

    device: str  # 'cuda:0' | 'cpu' | 'mps'
    dtype: str  # autocast dtype: 'float32' (no autocast) | 'bfloat16' | 'float16'
    use_scaler: bool  # GradScaler: float16 only
    compile: bool
    reasons: dict = field(default_factory=dict)  # {'dtype': str, 'compile': str[, 'cuda_graphs': str]}: describe()
    cuda_graphs: bool = False  # the compiled training step replayed as CUDA graphs (train.py's cuda_graphs)

    @property
    def device_type(self):
        return self.device.split(":")[0]

    @property
    def torch_dtype(self):
        return TORCH_DTYPES[self.dtype]


def normalize_dtype(dtype, allow_auto=True):
    """'fp16'/'float16'/... -> 'float16' etc. ('auto' kept when allowed); HardwareError otherwise."""
    key = str(dtype).strip().lower()
    if key == "auto" and allow_auto:
        return "auto"
    if key not in _DTYPE_ALIASES:
        raise HardwareError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16 "
                            "(or fp32, bf16, fp16)")
    return _DTYPE_ALIASES[key]


def normalize_compile(compile):
    """True / False / 'auto' (also the strings 'true'/'false'); HardwareError otherwise."""
    if isinstance(compile, bool):
        return compile
    key = str(compile).strip().lower()
    if key in ("auto", "true", "false"):
        return {"auto": "auto", "true": True, "false": False}[key]
    raise HardwareError(f"unknown compile setting {compile!r}: use True, False or 'auto'")


def native_cuda_bf16(facts):
    """Whether a CUDA GPU computes in bf16 natively (capability 8.0 and up: A100, L4, H100). Never the bare
    torch.cuda.is_bf16_supported(), which is True on a T4, where bf16 is emulated (slowly)."""
    return tuple(facts.capability) >= (8, 0)


def _cuda_dtype(facts, dtype):
    """(dtype, reason) on a CUDA GPU."""
    cap = facts.capability
    capstr = f"capability {cap[0]}.{cap[1]}"
    native_bf16 = native_cuda_bf16(facts)
    if dtype == "auto":
        if native_bf16:
            return "bfloat16", f"bfloat16 ({capstr} has native bf16)"
        if tuple(cap) >= (6, 0):
            return "float16", f"float16 + GradScaler ({capstr} has no native bf16)"
        return "float32", f"float32 ({capstr} has no fast fp16)"
    if dtype == "bfloat16" and not native_bf16:
        # torch.cuda.is_bf16_supported() says True on a T4: bf16 is emulated there, and slow.
        raise HardwareError(f"dtype='bfloat16' but {facts.name} ({capstr}) has no native bf16 (it would be "
                            "emulated, slowly); use --dtype=float16 (or auto)")
    return dtype, f"{dtype} (set by dtype)"


def _cpu_dtype(facts, dtype):
    """(dtype, reason) on a CPU."""
    if dtype == "float16":
        raise HardwareError("dtype='float16' is not supported on CPU (fp16 is emulated there, slowly); "
                            "use --dtype=bfloat16 or --dtype=float32 (or auto)")
    if dtype == "auto":
        if facts.cpu_bf16:
            return "bfloat16", f"bfloat16 (CPU has {facts.cpu_bf16_flag})"
        return "float32", f"float32 (CPU has no native bf16: no {' or '.join(CPU_BF16_FLAGS)})"
    if dtype == "bfloat16" and not facts.cpu_bf16:
        return "bfloat16", "bfloat16 (set by dtype; this CPU has no native bf16, so it is emulated and may be slower)"
    return dtype, f"{dtype} (set by dtype)"


def cpu_compile_saving_s(planned_tokens, dtype, cpu_threads):
    """Seconds torch.compile is expected to save on a CPU run of `planned_tokens` tokens.

    saving = eager time x (1 - 1/speedup), eager time from the measured tokens/s per thread times the
    threads. Assuming linear scaling over threads overestimates a big CPU's speed, so the rule stays
    conservative there (it asks for a longer run before compiling)."""
    eager_s = planned_tokens / cpu_eager_tokens_per_s(dtype, cpu_threads)
    return eager_s * (1 - 1 / CPU_COMPILE_SPEEDUP[dtype])


def cpu_eager_tokens_per_s(dtype, cpu_threads):
    """The default model's expected uncompiled training speed on a CPU: the measured speed per thread, times the
    threads (linear: an overestimate on a big CPU)."""
    return CPU_EAGER_TOKENS_PER_S_PER_THREAD[dtype] * max(1, cpu_threads)


def _tokens(n):
    if n < 1000:
        return f"{n}"
    return f"{n / 1e6:.1f}M" if round(n / 1e3) >= 1000 else f"{n / 1e3:.0f}k"  # 999,680: 1.0M, not 1000k


def _duration(s):
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.0f} h"


def _auto_compile(facts, dtype, planned_tokens, max_seconds=None):
    """(compile, reason) for compile='auto'."""
    if facts.platform.startswith("win"):
        needs = "Triton and a C++ compiler" if facts.type == "cuda" else "a C++ compiler"
        return False, f"off (Windows: torch.compile needs {needs} set up; --compile=True to try)"
    if facts.type == "mps":
        return False, "off (torch.compile for MPS is experimental)"
    if facts.type == "cuda":
        cap = facts.capability
        if tuple(cap) < (7, 0):
            return False, f"off (capability {cap[0]}.{cap[1]} < 7.0: Triton does not support this GPU)"
        return True, f"on (capability {cap[0]}.{cap[1]} >= 7.0)"
    if planned_tokens is None:
        return False, "off (run length unknown; on CPU compiling pays only on long runs)"
    run = f"a {_tokens(planned_tokens)}-token run"
    if max_seconds:  # the session ends at max_runtime: what counts is what the eager step would train until then
        fits = int(max_seconds * cpu_eager_tokens_per_s(dtype, facts.cpu_threads))
        if fits < planned_tokens:
            planned_tokens, run = fits, f"{run}, ~{_tokens(fits)} of them within max_runtime"
    saving = cpu_compile_saving_s(planned_tokens, dtype, facts.cpu_threads)
    if saving >= CPU_COMPILE_MIN_SAVING_S:
        return True, f"on ({run}: saves ~{_duration(saving)}, costs up to ~1.5 min at the first step)"
    return False, (f"off ({run}: would save ~{_duration(saving)}, less than the {_duration(CPU_COMPILE_MIN_SAVING_S)} "
                   f"it needs to pay)")


def decide(facts, dtype="auto", compile="auto", planned_tokens=None, cuda_graphs=False, world_size=1,
           max_seconds=None):
    """Pure: the Plan (dtype, GradScaler, compile, with reasons) for a device. The tested decision table.

    dtype='auto':
      CUDA capability >= 8.0 (A100, L4, H100): bfloat16. The capability decides, never the bare
        torch.cuda.is_bf16_supported(), which is True on a T4 where bf16 is emulated.
      CUDA 6.x / 7.x (P100, V100, T4): float16 autocast + GradScaler. Below 6.0: float32.
      CPU: bfloat16 autocast when the CPU has native bf16 (amx_bf16 / avx512_bf16), else float32.
      MPS: float32 (mixed precision on MPS is recent and depends on the macOS version).
    Explicit dtype: bfloat16 on CUDA below 8.0 and float16 on CPU are HardwareErrors.

    compile='auto':
      CUDA: on from capability 7.0; off below (Triton refuses a P100). bf16 + compile below 8.0
        cannot happen: bf16 is refused there.
      CPU: on when the expected saving (cpu_compile_saving_s: planned_tokens at the measured eager speed
        and compile speedup for this dtype) is at least CPU_COMPILE_MIN_SAVING_S = 160 s, twice the
        worst measured compile cost. With the default model on a 2-thread CPU that is about 1.2M
        tokens in bf16 and 1.1M in fp32: a full training run compiles, a quick try-out does not. A session
        capped at max_seconds (train.py's max_runtime) counts only the tokens the eager step would train in it.
        Unknown planned_tokens: off.
      MPS and Windows: off.
    compile=True on a GPU below 7.0 is a HardwareError; elsewhere True/False are obeyed.

    cuda_graphs=True (train.py's setting; off by default): on for a compiled run on one CUDA GPU, else off with
      the reason (no CUDA, not compiled, or world_size > 1: DDP's gradient all-reduce runs between the
      backward's pieces, outside any graph).
    """
    dtype = normalize_dtype(dtype)
    compile = normalize_compile(compile)
    if facts.type == "cuda":
        dtype, dtype_reason = _cuda_dtype(facts, dtype)
    elif facts.type == "cpu":
        dtype, dtype_reason = _cpu_dtype(facts, dtype)
    elif facts.type == "mps":
        if dtype == "auto":
            dtype, dtype_reason = "float32", ("float32 (mixed precision on MPS is recent and depends on the "
                                              "macOS version; --dtype=bfloat16 to try)")
        else:
            dtype_reason = f"{dtype} (set by dtype)"
    else:
        raise HardwareError(f"unknown device type {facts.type!r}: use cuda, mps or cpu")

    if compile == "auto":
        compile, compile_reason = _auto_compile(facts, dtype, planned_tokens, max_seconds)
    elif compile and facts.type == "cuda" and tuple(facts.capability) < (7, 0):
        cap = facts.capability
        raise HardwareError(f"compile=True but {facts.name} (capability {cap[0]}.{cap[1]}) is below 7.0, which "
                            "Triton (torch.compile on GPUs) requires; use --compile=False (or auto)")
    else:
        compile_reason = f"{'on' if compile else 'off'} (set by compile)"
    reasons = {"dtype": dtype_reason, "compile": compile_reason}
    if cuda_graphs:
        cuda_graphs, reasons["cuda_graphs"] = _training_cuda_graphs(facts, compile, world_size)
    return Plan(device=facts.device, dtype=dtype, use_scaler=dtype == "float16", compile=compile,
                reasons=reasons, cuda_graphs=cuda_graphs)


def _training_cuda_graphs(facts, compile, world_size):
    """(on, reason) when cuda_graphs=True is asked for."""
    if facts.type != "cuda":
        return False, f"off (CUDA GPUs only, not {facts.type})"
    if not compile:
        return False, "off (they replay the compiled step: needs compile on)"
    if world_size > 1:
        return False, f"off (not with {world_size} processes: DDP all-reduces gradients between graph pieces)"
    return True, "on (set by cuda_graphs: the compiled forward and backward replayed, a launch each)"


def generation_compile(facts, compile):
    """(compile, reason) for generation (sample.py --compile): pure, like decide.

    True compiles the one-token steps on a CPU (GPT.generate(compile=True), CompiledDecode): ~16 s the first time
    on a 2-thread CPU, ~3 s once inductor's on-disk cache holds it, then 1.4-1.8x the tokens/s: it pays from
    ~4k tokens with the cache, ~20k without. A CUDA GPU replays the steps as a CUDA graph anyway: off there, as
    on MPS. Not automatic: whether inductor's cache holds the compiled step is not known beforehand.
    None: not generation (evaluation), never compiled."""
    if compile is None:
        return False, "off (not used for evaluation)"
    if not compile:
        return False, "off (--compile compiles generation on a CPU: pays from ~4k tokens, ~20k the first time)"
    if facts.type == "cuda":
        return False, "off (a CUDA GPU replays generation's steps as a CUDA graph instead)"
    if facts.type != "cpu":
        return False, f"off (compiled generation is for CPUs, not {facts.type})"
    return True, "on (set by compile: generation's one-token steps, compiled before the first sample)"


def without_steps_to_compile(plan, min_new_tokens):
    """The plan of a generation with no one-token steps (GPT.prepares_one_token_steps: fewer than min_new_tokens
    new tokens, or a prompt that fills the context): compile off, and the device line says why."""
    if not plan.compile:
        return plan
    why = (f"off (--compile: no one-token steps to compile in a sample of fewer than {min_new_tokens} new tokens "
           f"or one whose prompt fills the context)")
    return replace(plan, compile=False, reasons={**plan.reasons, "compile": why})


def inference_plan(device="auto", dtype="auto", compile=None):
    """(facts, plan) for sampling or evaluation on `device`, preflight-checked; compile: see generation_compile."""
    device_type = choose_device(device)
    facts = probe_facts(device_for(device, device_type))
    preflight(facts)
    plan = decide(facts, dtype=dtype, compile=False)
    compile, why = generation_compile(facts, compile)
    return facts, replace(plan, compile=compile, reasons={**plan.reasons, "compile": why})


def describe(facts, plan):
    """The one device line printed at start: device, capability, memory, dtype and compile with reasons."""
    gib = f"{facts.memory_bytes / 2**30:.1f} GiB" if facts.memory_bytes else None
    if facts.type == "cuda":
        extra = f", {facts.gpu_count} GPUs visible" if facts.gpu_count > 1 else ""
        cap = facts.capability
        what = f"{facts.device} {facts.name} (capability {cap[0]}.{cap[1]}, {gib or 'memory unknown'}{extra})"
    elif facts.type == "cpu":
        what = f"cpu {facts.name} ({facts.cpu_threads} {plural(facts.cpu_threads, 'thread')}, " \
               f"{f'{gib} RAM' if gib else 'RAM unknown'})"  # (Windows: no os.sysconf to read it from)
    else:
        what = f"{facts.device} {facts.name} ({f'{gib} shared' if gib else 'memory unknown'})"
    if facts.torch_version:
        what += f", torch {facts.torch_version}"
    graphs = f" | cuda graphs: {plan.reasons['cuda_graphs']}" if "cuda_graphs" in plan.reasons else ""
    return (f"device: {what} | dtype: {plan.reasons['dtype']} | "
            f"compile: {plan.reasons['compile']}{graphs}")


def multi_gpu_hint(facts, world_size):
    """One line when more CUDA GPUs are visible than the run uses (e.g. Kaggle "T4 x2"), else None."""
    if facts.type != "cuda" or facts.gpu_count <= world_size:
        return None
    n = facts.gpu_count
    return (f"{n} GPUs are visible but this run uses {world_size}; to use all: torchrun --standalone "
            f"--nproc_per_node={n} train.py ... (prefix NCCL_P2P_DISABLE=1 if it hangs at start)")


# ---------------------------------------------------------------------------------------------
# Running the plan


def autocast(device_type, dtype):
    """Autocast context for `dtype` on `device_type` ('cuda', 'cuda:1', 'cpu', 'mps'); float32: none."""
    dtype = normalize_dtype(dtype, allow_auto=False)
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type.split(":")[0], dtype=TORCH_DTYPES[dtype])


def grad_scaler(plan):
    """The GradScaler for `plan`: active for float16 only (a no-op otherwise, so its state always saves)."""
    return torch.amp.GradScaler(plan.device_type, enabled=plan.use_scaler)


def _is_compile_error(e):
    """True for errors raised by torch.compile's machinery (Dynamo, Inductor, a missing compiler or Triton),
    as opposed to errors of the computation itself (out of memory, bad input), which must propagate."""
    from torch._dynamo.exc import TorchDynamoException
    return isinstance(e, TorchDynamoException)


def _compile_failed(e):
    say(f"torch.compile failed ({one_line(e)}); continuing without compile")


def _eager_backward_lowering():
    """Compile the backward graph during the forward call, where CompiledWithFallback can catch its
    failure (torch compiles it lazily at the first backward by default, outside any wrapper)."""
    import torch._functorch.config as functorch_config
    if hasattr(functorch_config, "force_non_lazy_backward_lowering"):
        return functorch_config.patch(force_non_lazy_backward_lowering=True)
    return contextlib.nullcontext()


class CompiledWithFallback(nn.Module):
    """A torch.compile'd model that runs eagerly, for good, once compiling fails.

    Compile errors mostly surface at a call (the first, or a recompile for a new shape or eval mode),
    not at torch.compile(): such a call prints one line and is redone eagerly. Errors of the
    computation itself (torch.OutOfMemoryError, bad input) propagate unchanged.
    The eager model is registered as `_orig_mod`, the name torch.compile uses, so state_dict keys are
    those of a compiled model and checkpoint.unwrapped_state_dict strips them the same way."""

    def __init__(self, model, compiled):
        super().__init__()
        self._orig_mod = model
        object.__setattr__(self, "_compiled", compiled)  # not registered: its parameters are model's

    @property
    def compiled(self):
        """False once compiling has failed and the model runs eagerly."""
        return self._compiled is not None

    def forward(self, *args, **kwargs):
        if self._compiled is not None:
            try:
                with _eager_backward_lowering():
                    return self._compiled(*args, **kwargs)
            except Exception as e:
                if not _is_compile_error(e):
                    raise
                _compile_failed(e)
                object.__setattr__(self, "_compiled", None)
        return self._orig_mod(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "_orig_mod":
                raise
            return getattr(self._orig_mod, name)  # model.config, model.generate, ... as on the eager model


def compile_or_eager(model, enabled, **compile_kwargs):
    """torch.compile(model) wrapped in CompiledWithFallback when enabled, else `model` itself; first
    model.before_compile(), where the model has one.

    Compile must never be what breaks a run: a failure at wrap time or at any call prints one line to
    stderr and the model runs eagerly from then on. `compile_kwargs` go to torch.compile (mode=...).

    For a model on a CUDA GPU, inductor's deterministic mode is switched on (where this torch has it), unless
    TORCHINDUCTOR_DETERMINISTIC=0 is set: without it inductor picks some kernels' configurations by timing
    them, so two processes could sum in different orders. (Once, on an H200, a resumed compiled fp16 run
    ended a few ULPs away from an uninterrupted one; the cause was not pinned down: bench/NOTES.md.) The
    setting is inductor's, for the whole process: it stays on for later compiles in it."""
    if not enabled:
        return model
    if hasattr(model, "before_compile"):  # the model's own parts that must stay eager (GPT.before_compile)
        model.before_compile()
    on_cuda = any(p.is_cuda for p in model.parameters())
    if on_cuda and os.environ.get("TORCHINDUCTOR_DETERMINISTIC") != "0":
        import torch._inductor.config as inductor_config
        if hasattr(inductor_config, "deterministic"):
            inductor_config.deterministic = True
    try:
        compiled = torch.compile(model, **compile_kwargs)
    except Exception as e:  # e.g. an unknown backend, or a Python version Dynamo does not support
        _compile_failed(e)
        return model
    return CompiledWithFallback(model, compiled)


def cuda_graph_skips():
    """How many compiled graphs inductor has run without CUDA graphs in this process (torch's own count; 0 where
    this torch does not keep it). A graph is skipped for a reason torch logs with TORCH_LOGS=perf_hints."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return counters["inductor"].get("cudagraph_skips", 0)


# ---------------------------------------------------------------------------------------------
# Multi-GPU


def nccl_check(timeout_s=60.0):
    """Run one all_reduce in the initialised process group and fail fast if it does not finish.

    NCCL can hang between PCIe GPUs whose peer-to-peer path does not work (seen on Kaggle "T4 x2");
    a hang would otherwise sit silent until the 10-minute NCCL watchdog. Raises HardwareError telling
    the user to rerun with NCCL_P2P_DISABLE=1, or if the sum is wrong. A hung collective cannot be
    cancelled: on this error, print it and leave with os._exit(1) rather than tearing the group down.
    Without a group, or with one process, there is nothing to check. Works with gloo (CPU) too."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world, backend = dist.get_world_size(), dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    outcome = []

    def reduce():
        try:
            t = torch.ones(1, device=device)
            dist.all_reduce(t)
            outcome.append(t.item())  # .item() waits for the GPU: a hung NCCL kernel hangs here
        except Exception as e:
            outcome.append(e)

    # In a thread, so a hang in the call itself (communicator set-up) is caught by the timeout too.
    worker = threading.Thread(target=reduce, name="nccl_check", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not outcome:
        if backend != "nccl":
            raise HardwareError(f"{backend} all_reduce across {world} processes did not finish in {timeout_s:g} s; "
                                "check that every rank started and can reach MASTER_ADDR")
        if os.environ.get("NCCL_P2P_DISABLE") == "1":
            raise HardwareError(f"NCCL all_reduce across {world} GPUs did not finish in {timeout_s:g} s even with "
                                "NCCL_P2P_DISABLE=1; check the GPUs (nvidia-smi topo -m) or train on one GPU")
        raise HardwareError(f"NCCL all_reduce across {world} GPUs did not finish in {timeout_s:g} s (GPU peer-to-peer "
                            "transfers hang on some PCIe machines, e.g. Kaggle T4 x2); rerun with NCCL_P2P_DISABLE=1: "
                            f"NCCL_P2P_DISABLE=1 torchrun --standalone --nproc_per_node={world} train.py ...")
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    if outcome[0] != world:
        raise HardwareError(f"{backend} all_reduce across {world} processes summed to {outcome[0]:g}, not {world}: "
                            "transfers between GPUs are broken; rerun with NCCL_P2P_DISABLE=1")
