"""hardware.py: the device/dtype/compile decision table over real GPUs and CPUs, the arch check,
the preflight, compile fallback with real torch.compile failures, and the all_reduce check on a
real 2-process gloo group."""

import datetime
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hardware
from hardware import (CU126_INSTALL, DeviceFacts, HardwareError, arch_supported, autocast, choose_device,
                      compile_or_eager, cpu_compile_saving_s, decide, describe, multi_gpu_hint, nccl_check,
                      preflight, resolve_device)

GiB = 2**30
# torch.cuda.get_arch_list() of the PyTorch 2.9 wheels (pytorch.org), by CUDA version.
CU126 = ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")
CU128 = ("sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")
CU130 = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120")


def gpu(name, capability, memory_gib=16, count=1, arch_list=CU128):
    return DeviceFacts(type="cuda", name=name, capability=capability, arch_list=arch_list, gpu_count=count,
                       memory_bytes=int(memory_gib * GiB), torch_version="2.8.0+cu128", cuda_version="12.8")


P100 = gpu("Tesla P100-PCIE-16GB", (6, 0))
V100 = gpu("Tesla V100-SXM2-16GB", (7, 0))
T4 = gpu("Tesla T4", (7, 5), memory_gib=14.7)
T4X2 = gpu("Tesla T4", (7, 5), memory_gib=14.7, count=2)
A100 = gpu("NVIDIA A100-SXM4-40GB", (8, 0), memory_gib=39.4)
L4 = gpu("NVIDIA L4", (8, 9), memory_gib=22.0)
H100 = gpu("NVIDIA H100 80GB HBM3", (9, 0), memory_gib=79.1)
CPU_BF16 = DeviceFacts(type="cpu", name="AMD EPYC", cpu_threads=2, memory_bytes=24 * GiB, cpu_bf16=True,
                       cpu_bf16_flag="avx512_bf16", cpu_bf16_source="/proc/cpuinfo", torch_version="2.13.0+cpu")
CPU_AMX = DeviceFacts(type="cpu", name="Intel Xeon Platinum 8480+", cpu_threads=8, cpu_bf16=True,
                      cpu_bf16_flag="amx_bf16", cpu_bf16_source="/proc/cpuinfo")
CPU_FP32 = DeviceFacts(type="cpu", name="Intel Core i5-8250U", cpu_threads=4, memory_bytes=8 * GiB)
MPS = DeviceFacts(type="mps", name="Apple GPU (MPS)", memory_bytes=16 * GiB, platform="darwin")
LONG_RUN = 300_000_000  # tokens: the default 3-epoch wikitext-103 run is of this order
SHORT_RUN = 50_000


def one_line(exc_info):
    msg = str(exc_info.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


# ---------------------------------------------------------------------------------------------
# The decision table


@pytest.mark.parametrize("facts, dtype, scaler, compiled", [
    (P100, "float16", True, False),   # fp16 + scaler; Triton refuses sm_60
    (V100, "float16", True, True),
    (T4, "float16", True, True),      # no native bf16 (is_bf16_supported() lies: emulation)
    (T4X2, "float16", True, True),    # each DDP rank decides like one T4
    (A100, "bfloat16", False, True),
    (L4, "bfloat16", False, True),
    (H100, "bfloat16", False, True),
    (CPU_BF16, "bfloat16", False, True),
    (CPU_AMX, "bfloat16", False, True),
    (CPU_FP32, "float32", False, True),
    (MPS, "float32", False, False),
], ids=["P100", "V100", "T4", "T4x2", "A100", "L4", "H100", "CPU-avx512bf16", "CPU-amx", "CPU-fp32", "MPS"])
def test_decision_table(facts, dtype, scaler, compiled):
    plan = decide(facts, planned_tokens=LONG_RUN)
    assert (plan.dtype, plan.use_scaler, plan.compile) == (dtype, scaler, compiled)
    assert plan.device == facts.device
    assert plan.reasons["dtype"].startswith(dtype) and plan.reasons["compile"].startswith(("on", "off"))
    assert plan.torch_dtype == getattr(torch, dtype)


def test_reasons_name_the_cause():
    assert decide(CPU_BF16).reasons["dtype"] == "bfloat16 (CPU has avx512_bf16)"
    assert decide(CPU_AMX).reasons["dtype"] == "bfloat16 (CPU has amx_bf16)"
    assert "no native bf16" in decide(CPU_FP32).reasons["dtype"]
    assert decide(T4).reasons["dtype"] == "float16 + GradScaler (capability 7.5 has no native bf16)"
    assert decide(A100).reasons["dtype"] == "bfloat16 (capability 8.0 has native bf16)"
    assert "Triton" in decide(P100).reasons["compile"]
    assert "MPS" in decide(MPS).reasons["dtype"] and "MPS" in decide(MPS).reasons["compile"]


def test_gpu_without_fast_fp16_trains_in_float32():
    plan = decide(gpu("Tesla M60", (5, 2), arch_list=CU126))
    assert (plan.dtype, plan.use_scaler, plan.compile) == ("float32", False, False)


def test_cpu_compile_only_pays_on_long_runs():
    assert decide(CPU_BF16).compile is False  # run length unknown
    assert "unknown" in decide(CPU_BF16).reasons["compile"]
    short = decide(CPU_BF16, planned_tokens=SHORT_RUN)
    assert short.compile is False and "less than" in short.reasons["compile"]
    assert decide(CPU_BF16, planned_tokens=LONG_RUN).compile is True
    # the threshold sits where the expected saving reaches CPU_COMPILE_MIN_SAVING_S
    per_token = cpu_compile_saving_s(1, "bfloat16", CPU_BF16.cpu_threads)
    edge = hardware.CPU_COMPILE_MIN_SAVING_S / per_token
    assert decide(CPU_BF16, planned_tokens=int(edge * 0.99)).compile is False
    assert decide(CPU_BF16, planned_tokens=int(edge * 1.01) + 1).compile is True
    # a CPU with more threads is faster eagerly, so it needs a longer run before compiling pays
    big = DeviceFacts(type="cpu", cpu_threads=64, cpu_bf16=True, cpu_bf16_flag="amx_bf16")
    assert decide(big, planned_tokens=int(edge * 1.01) + 1).compile is False
    # fp32 has its own measured eager speed and compile speed-up, so its own threshold
    edge32 = hardware.CPU_COMPILE_MIN_SAVING_S / cpu_compile_saving_s(1, "float32", CPU_BF16.cpu_threads)
    assert edge32 != edge
    assert decide(CPU_BF16, dtype="float32", planned_tokens=int(edge32 * 0.99)).compile is False
    assert decide(CPU_BF16, dtype="float32", planned_tokens=int(edge32 * 1.01) + 1).compile is True
    # A session capped by max_runtime trains only what fits in it: a long run's 90-second session does not compile
    # (its minute of compiling would take most of it), its 8.5-hour Kaggle session does.
    capped = decide(CPU_BF16, planned_tokens=10 ** 9, max_seconds=90)
    assert capped.compile is False and "a 1000.0M-token run, ~244k of them within max_runtime: would save" in \
        capped.reasons["compile"], capped.reasons["compile"]
    assert decide(CPU_BF16, planned_tokens=10 ** 9, max_seconds=8.5 * 3600).compile is True
    assert decide(CPU_BF16, planned_tokens=SHORT_RUN, max_seconds=10 ** 6).reasons["compile"] == short.reasons["compile"]


def test_windows_keeps_compile_off_unless_asked():
    win = DeviceFacts(type="cpu", cpu_threads=2, platform="win32")
    assert decide(win, planned_tokens=LONG_RUN).compile is False
    assert "Windows" in decide(win, planned_tokens=LONG_RUN).reasons["compile"]
    assert decide(win, compile=True).compile is True


# ---------------------------------------------------------------------------------------------
# Explicit settings


def test_explicit_dtypes_and_aliases():
    assert decide(A100, dtype="fp16").dtype == "float16" and decide(A100, dtype="fp16").use_scaler
    assert decide(H100, dtype="float32").dtype == "float32" and not decide(H100, dtype="fp32").use_scaler
    assert decide(T4, dtype=" FP16 ").dtype == "float16"
    assert decide(CPU_BF16, dtype="float32").dtype == "float32"
    assert decide(CPU_BF16, dtype="bf16").reasons["dtype"] == "bfloat16 (set by dtype)"
    forced = decide(CPU_FP32, dtype="bfloat16")  # allowed, but the reason says it is emulated
    assert forced.dtype == "bfloat16" and "emulated" in forced.reasons["dtype"]
    assert decide(MPS, dtype="float16").use_scaler


def test_bf16_on_a_t4_is_a_one_line_error_suggesting_float16():
    for facts in (T4, T4X2, V100, P100):
        with pytest.raises(HardwareError) as e:
            decide(facts, dtype="bfloat16")
        msg = one_line(e)
        assert "no native bf16" in msg and "--dtype=float16" in msg and facts.name in msg


def test_float16_on_cpu_is_an_error():
    with pytest.raises(HardwareError) as e:
        decide(CPU_BF16, dtype="float16")
    assert "--dtype=bfloat16" in one_line(e)


def test_explicit_compile():
    assert decide(H100, compile=False).compile is False
    assert decide(H100, compile=False).reasons["compile"] == "off (set by compile)"
    assert decide(CPU_FP32, compile=True).compile is True
    assert decide(CPU_FP32, compile="true").compile is True
    assert decide(MPS, compile=True).compile is True
    with pytest.raises(HardwareError) as e:
        decide(P100, compile=True)
    assert "--compile=False" in one_line(e)


def test_cuda_graphs_only_for_a_compiled_run_on_one_cuda_gpu():
    assert decide(H100).cuda_graphs is False and "cuda_graphs" not in decide(H100).reasons  # off unless asked
    assert "cuda graphs" not in describe(H100, decide(H100))
    for facts, kwargs, on, why in [
        (H100, {}, True, "on (set by cuda_graphs"),
        (T4, {}, True, "on (set by cuda_graphs"),
        (T4X2, dict(world_size=2), False, "off (not with 2 processes"),
        (H100, dict(compile=False), False, "off (they replay the compiled step: needs compile on)"),
        (CPU_FP32, dict(compile=True), False, "off (CUDA GPUs only, not cpu)"),
        (MPS, dict(compile=True), False, "off (CUDA GPUs only, not mps)"),
    ]:
        plan = decide(facts, cuda_graphs=True, **kwargs)
        assert plan.cuda_graphs is on and plan.reasons["cuda_graphs"].startswith(why), (facts.name, plan)
        assert f"| cuda graphs: {why}" in describe(facts, plan)
    assert decide(P100, cuda_graphs=True).cuda_graphs is False  # compile='auto' is off below capability 7.0


@pytest.mark.parametrize("kwargs, needle", [
    (dict(dtype="int8"), "unknown dtype"),
    (dict(dtype="half"), "unknown dtype"),
    (dict(compile="yes"), "unknown compile"),
    (dict(compile=1), "unknown compile"),
])
def test_unknown_values_are_one_line_errors(kwargs, needle):
    with pytest.raises(HardwareError) as e:
        decide(CPU_BF16, **kwargs)
    assert needle in one_line(e)


# ---------------------------------------------------------------------------------------------
# Arch list and preflight


@pytest.mark.parametrize("capability, arch_list, ok", [
    ((6, 0), CU128, False),   # Kaggle's P100 with its default torch
    ((6, 0), CU126, True),
    ((6, 1), CU126, True),    # GTX 10xx / P40 run sm_60 code
    ((7, 0), CU128, True),
    ((7, 0), CU130, False),
    ((7, 5), CU130, True),
    ((8, 9), CU128, True),    # L4 runs the sm_86 / sm_80 code
    ((9, 0), CU126, True),
    ((12, 0), CU126, False),  # Blackwell needs a CUDA 12.8+ build
    ((12, 1), CU130, True),   # via compute_120 PTX, JIT-compiled
    ((9, 0), ("sm_80",), False),          # machine code never crosses a major version
    ((9, 0), ("compute_80",), True),      # PTX does: JIT for any newer GPU
    ((8, 6), ("compute_89",), False),     # but not for an older one
    ((9, 0), ("sm_80", "sm_90a"), True),  # 'a': exactly that GPU
    ((10, 0), ("sm_90a", "compute_90a"), False),
    ((10, 3), ("sm_100f",), True),        # 'f': the family
    ((12, 0), ("sm_100f",), False),
    ((9, 0), ("gfx90a", "gfx942"), True),  # a ROCm build: not checkable by sm names
])
def test_arch_supported(capability, arch_list, ok):
    assert arch_supported(capability, arch_list) is ok


def test_preflight_p100_on_cu128_says_switch_to_t4_or_install_cu126():
    with pytest.raises(HardwareError) as e:
        preflight(P100)  # the arch check comes first: no CUDA needed to get here
    msg = one_line(e)
    assert "sm_60" in msg and "T4" in msg and CU126_INSTALL in msg and "2.8.0+cu128" in msg


def test_preflight_new_gpu_on_old_build_suggests_newer_cuda():
    with pytest.raises(HardwareError) as e:
        preflight(gpu("NVIDIA RTX PRO 6000 Blackwell", (12, 0), arch_list=CU126))
    assert "sm_120" in one_line(e) and "cu128" in one_line(e)


def test_preflight_passes_on_cpu():
    assert preflight(hardware.probe_facts("cpu")) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_preflight_reports_a_failing_first_kernel():
    # arch check passes, then the tiny op really fails (this torch cannot run CUDA kernels)
    with pytest.raises(HardwareError) as e:
        preflight(gpu("Tesla T4", (7, 5)))
    assert "first kernel on Tesla T4 (cuda:0) failed" in one_line(e)


# ---------------------------------------------------------------------------------------------
# Probing and device choice


def test_cpu_bf16_flag():
    assert hardware.cpu_bf16_flag({"avx2", "avx512_bf16", "amx_bf16"}) == "amx_bf16"
    assert hardware.cpu_bf16_flag({"avx2", "avx512f", "avx512_bf16"}) == "avx512_bf16"
    assert hardware.cpu_bf16_flag({"avx2", "avx512f"}) == ""


def test_probe_cpu_reads_proc_cpuinfo_without_touching_cuda():
    code = ("import torch, hardware; f = hardware.probe_facts('cpu'); "
            "print(f.cpu_bf16, f.cpu_bf16_flag, f.cpu_bf16_source, f.cpu_threads, torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    has = hardware.cpu_bf16_flag(flags)
    assert out[0] == str(bool(has))
    if has:
        assert out[1:3] == [has, "/proc/cpuinfo"]
    assert out[-1] == "False"  # no CUDA context was created
    facts = hardware.probe_facts("cpu")
    assert facts.type == "cpu" and facts.device == "cpu" and facts.name and facts.torch_version == torch.__version__


@pytest.mark.parametrize("name, flags, bf16", [
    ("Intel(R) Xeon(R) Platinum 8480+", "fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile", "amx_bf16"),
    ("Intel(R) Xeon(R) Platinum 8380", "fpu sse2 avx2 avx512f avx512_vnni", ""),
    ("AMD EPYC 9654 96-Core Processor", "fpu sse2 avx2 avx512f avx512_bf16", "avx512_bf16")])
def test_probe_cpu_reads_the_bf16_flags_of_a_cpuinfo(tmp_path, monkeypatch, name, flags, bf16):
    """The probe on other CPUs' /proc/cpuinfo (two processors, as the kernel lists each; the test above checks the
    flag only where this machine's CPU has one): the flag, its source, the name, and the dtype a CPU run trains in."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("".join(f"processor\t: {i}\nvendor_id\t: {'AuthenticAMD' if 'AMD' in name else 'GenuineIntel'}"
                               f"\nmodel name\t: {name}\nflags\t\t: {flags}\n\n" for i in range(2)))
    real_open = open
    monkeypatch.setattr(hardware, "open", lambda path, *a, **k: real_open(
        cpuinfo if path == "/proc/cpuinfo" else path, *a, **k), raising=False)
    facts = hardware.probe_facts("cpu")
    assert (facts.name, facts.cpu_bf16, facts.cpu_bf16_flag) == (name, bool(bf16), bf16)
    assert facts.cpu_bf16_source == ("/proc/cpuinfo" if bf16 else "")
    assert hardware.decide(facts).dtype == ("bfloat16" if bf16 else "float32")


def test_onednn_fp32_rule_reads_the_cpu_and_the_override():
    """fp32 matmuls go to oneDNN on x86 AMD CPUs with AVX-512 (MKL runs AVX2 code there), and model.py follows
    the rule; GPT_ONEDNN_FP32=0/1 overrides it either way (1 only where the build has oneDNN)."""
    def rule(value):
        env = {k: v for k, v in os.environ.items() if k != "GPT_ONEDNN_FP32"}
        if value is not None:
            env["GPT_ONEDNN_FP32"] = value
        code = "import hardware, model; print(hardware.onednn_fp32_matmuls(), model.ONEDNN_FP32)"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                              cwd=Path(hardware.__file__).parent)
        out = proc.stdout.split()
        assert out[0] == out[1]
        return out[0] == "True", proc.stderr

    available = torch.backends.mkldnn.is_available()
    assert rule("0") == (False, "")
    assert rule("1")[0] is available
    auto, _ = rule(None)
    yes, warning = rule("yes")  # not a value: the rule decides, and a warning names the two values
    assert yes is auto and "GPT_ONEDNN_FP32='yes' ignored: use 0" in warning
    try:
        vendor_amd = "AuthenticAMD" in open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    expected = (available and vendor_amd and platform.machine() == "x86_64"
                and torch.backends.cpu.get_cpu_capability().startswith("AVX512"))
    assert auto is expected


@pytest.mark.parametrize("args, expected", [
    (("auto", 2, False, "12.8"), "cuda"),
    (("auto", 0, True, None), "mps"),
    (("auto", 0, False, None), "cpu"),
    (("cuda:1", 2, False, "12.8"), "cuda"),  # the type; the index was checked
    (("CUDA", 1, False, "12.8"), "cuda"),
    (("cpu", 2, False, "12.8"), "cpu"),
])
def test_resolve_device(args, expected):
    assert resolve_device(*args) == expected


@pytest.mark.parametrize("requested, device_type, expected", [
    ("cuda:1", "cuda", "cuda:1"), ("CUDA:1", "cuda", "cuda:1"), (" cuda:1", "cuda", "cuda:1"),  # GPU 1, not 0
    ("cuda", "cuda", "cuda"), ("auto", "cpu", "cpu"), ("CPU", "cpu", "cpu"),
])
def test_the_device_keeps_the_gpu_index_however_it_is_written(requested, device_type, expected):
    assert hardware.device_for(requested, device_type) == expected


@pytest.mark.parametrize("args, needle", [
    (("cuda", 0, False, None), "device='cuda' but no CUDA GPU is visible (this torch is a CPU-only build)"),
    (("cuda", 0, False, "12.8"), "built for CUDA 12.8"),
    (("cuda:2", 2, False, "12.8"), "only 2 CUDA GPU(s)"),
    (("mps", 0, False, None), "MPS is not available"),
    (("tpu", 0, False, None), "unknown device"),
])
def test_resolve_device_errors(args, needle):
    with pytest.raises(HardwareError) as e:
        resolve_device(*args)
    assert needle in one_line(e)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_choose_device_cuda_without_cuda_is_a_one_line_error():
    with pytest.raises(HardwareError) as e:
        choose_device("cuda")
    assert one_line(e).startswith("device='cuda' but no CUDA GPU is visible")
    assert choose_device("cpu") == "cpu"
    if not torch.backends.mps.is_available():
        assert choose_device("auto") == "cpu"


# ---------------------------------------------------------------------------------------------
# The device line and hints


def test_describe_is_one_line_with_everything():
    line = describe(T4X2, decide(T4X2))
    assert "\n" not in line
    for part in ("cuda:0 Tesla T4 (capability 7.5, 14.7 GiB, 2 GPUs visible)", "torch 2.8.0+cu128",
                 "dtype: float16 + GradScaler (capability 7.5 has no native bf16)", "compile: on (capability 7.5"):
        assert part in line, (part, line)
    cpu_line = describe(CPU_BF16, decide(CPU_BF16, planned_tokens=SHORT_RUN))
    assert "cpu AMD EPYC (2 threads, 24.0 GiB RAM)" in cpu_line
    assert "dtype: bfloat16 (CPU has avx512_bf16)" in cpu_line and "compile: off (a 50k-token run" in cpu_line
    assert "MPS" in describe(MPS, decide(MPS))


def test_multi_gpu_hint():
    assert "--nproc_per_node=2" in multi_gpu_hint(T4X2, world_size=1)
    assert "NCCL_P2P_DISABLE=1" in multi_gpu_hint(T4X2, world_size=1)
    assert multi_gpu_hint(T4X2, world_size=2) is None
    assert multi_gpu_hint(T4, world_size=1) is None and multi_gpu_hint(CPU_BF16, world_size=1) is None


# ---------------------------------------------------------------------------------------------
# autocast and GradScaler


def test_autocast():
    a = torch.randn(8, 8)
    with autocast("cpu", "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast("cpu", "float32"):
        assert (a @ a).dtype == torch.float32
    with pytest.raises(HardwareError):
        autocast("cpu", "auto")


def test_grad_scaler_is_off_unless_float16():
    scaler = hardware.grad_scaler(decide(CPU_BF16))
    assert not scaler.is_enabled() and scaler.state_dict() == {}  # what a checkpoint saves: nothing
    scaler = hardware.grad_scaler(decide(CPU_BF16, dtype="float32"))
    assert not scaler.is_enabled()
    if not torch.cuda.is_available():  # a T4's float16 asks for an enabled scaler, which torch turns off here
        with pytest.warns(UserWarning, match="GradScaler is enabled, but CUDA is not available"):
            hardware.grad_scaler(decide(T4, dtype="float16"))


# ---------------------------------------------------------------------------------------------
# compile_or_eager with real torch.compile failures


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 1)
        self.note = "tiny"

    def forward(self, x):
        if x.shape[0] > 64:  # like train.py's OOM test hook: an error of the computation, not of compile
            raise torch.OutOfMemoryError("batch too big")
        return self.out(torch.nn.functional.gelu(self.fc(x)))


def _no_cache():
    # The on-disk compile caches would let a compile skip the C++ compiler these tests take away.
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    return inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False)


def test_compile_disabled_returns_the_model():
    m = Tiny()
    assert compile_or_eager(m, False) is m


def test_compile_failing_at_wrap_time_falls_back(capsys):
    m = Tiny()
    assert compile_or_eager(m, True, backend="no_such_backend") is m
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("torch.compile failed (InvalidBackend")


def test_compile_failing_at_first_call_falls_back_for_good(capsys):
    import torch._inductor.config as inductor_config
    torch.manual_seed(0)
    m, x = Tiny(), torch.randn(4, 8)
    expected = m(x)
    model = compile_or_eager(m, True)
    cache_off, autograd_cache_off = _no_cache()
    # No C++ compiler: what a Windows box without MSVC or a slim Docker image gives Inductor.
    with cache_off, autograd_cache_off, inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
        y = model(x)
        assert not model.compiled
        assert torch.equal(y, expected)
        model(x).sum().backward()  # eager from now on: no second message
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "torch.compile failed" in err and "continuing without compile" in err
    assert m.fc.weight.grad is not None


def test_compile_success_keeps_names_and_catches_backward_failures_in_forward(capsys):
    import torch._inductor.config as inductor_config
    torch.manual_seed(0)
    m, x = Tiny(), torch.randn(4, 8)
    expected = m(x)
    model = compile_or_eager(m, True)
    assert set(model.state_dict()) == {"_orig_mod." + k for k in m.state_dict()}
    assert [p is q for p, q in zip(model.parameters(), m.parameters())] == [True] * 4
    assert model.note == "tiny"  # attributes of the eager model read through
    cache_off, autograd_cache_off = _no_cache()
    with cache_off, autograd_cache_off:
        loss = model(x).sum()
        assert model.compiled
        torch.testing.assert_close(model(x), expected)
        # The backward graph was compiled during the forward (where the wrapper guards it), so a
        # C++ compiler gone by now does not matter; torch's default would compile it only here.
        with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
            loss.backward()
        # Errors of the computation itself propagate, and compile stays on.
        with pytest.raises(torch.OutOfMemoryError):
            model(torch.randn(128, 8))
        assert model.compiled
    assert "torch.compile failed" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# nccl_check on a real 2-process gloo group


def _gloo_worker(rank, stall, out_dir):
    # A file rendezvous: a free port picked here could be taken by another process before rank 0 binds it.
    dist.init_process_group("gloo", init_method=f"file://{out_dir / 'rendezvous'}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    try:
        if stall and rank == 1:
            time.sleep(3)  # rank 0's all_reduce waits for a partner that is not there yet
            dist.all_reduce(torch.ones(1))  # then complete it, so the group shuts down cleanly
            result = "stalled"
        else:
            try:
                nccl_check(timeout_s=1.0 if stall else 30.0)
                result = "ok"
            except HardwareError as e:
                result = f"HardwareError: {e}"
                # Its all_reduce, still waiting, must be issued before the barrier (on a loaded machine the
                # check's thread can be that late), or the two ranks' collectives pair up crosswise.
                for t in threading.enumerate():
                    if t.name == "nccl_check":
                        t.join(60)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    (out_dir / f"rank{rank}.txt").write_text(result)


def _run_gloo(tmp_path, stall):
    ctx = mp.start_processes(_gloo_worker, args=(stall, tmp_path), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("gloo workers did not finish")
    return [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]


def test_nccl_check_passes_on_a_working_gloo_group(tmp_path):
    assert _run_gloo(tmp_path, stall=False) == ["ok", "ok"]


def test_nccl_check_fails_fast_when_the_all_reduce_does_not_finish(tmp_path):
    rank0, rank1 = _run_gloo(tmp_path, stall=True)
    assert rank1 == "stalled"
    assert rank0.startswith("HardwareError: gloo all_reduce across 2 processes did not finish in 1 s")


def test_nccl_check_without_a_group_does_nothing():
    assert not dist.is_initialized()
    assert nccl_check(timeout_s=0.1) is None


def test_inference_plan_compiles_only_generation_on_a_cpu_and_says_why():
    facts, plan = hardware.inference_plan("cpu", "float32")  # evaluation
    assert facts.type == "cpu" and plan.compile is False and plan.dtype == "float32"
    assert describe(facts, plan).endswith("| compile: off (not used for evaluation)")
    facts, plan = hardware.inference_plan("cpu", "float32", compile=False)
    assert plan.compile is False and "--compile compiles generation on a CPU" in plan.reasons["compile"]
    facts, plan = hardware.inference_plan("cpu", "float32", compile=True)
    assert plan.compile is True and plan.reasons["compile"].startswith("on (set by compile")
    for facts in (gpu("Tesla T4", (7, 5)), gpu("NVIDIA H100", (9, 0)), MPS):  # a CUDA graph there, or nothing
        compile, why = hardware.generation_compile(facts, True)
        assert compile is False and why.startswith("off (")
    assert hardware.generation_compile(CPU_FP32, True)[0] is True


def test_a_windows_cpu_line_says_what_compile_needs_there_and_when_ram_is_unknown():
    """Windows has no os.sysconf, so RAM is unknown; a CPU's torch.compile needs a C++ compiler, not Triton."""
    facts = DeviceFacts(type="cpu", name="Intel64 Family 6", cpu_threads=4, platform="win32")
    line = hardware.describe(facts, hardware.decide(facts, planned_tokens=10 ** 9))
    assert "(4 threads, RAM unknown)" in line, line
    assert "compile: off (Windows: torch.compile needs a C++ compiler set up; --compile=True to try)" in line, line
