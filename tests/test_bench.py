"""bench/: every bench's --json last-line contract on tiny settings, the HF parity of the generation
bench, bf16 learning as well as fp32 (issue #9), and the shared helpers."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import hardware  # noqa: E402

from model import GPTConfig  # noqa: E402


def run_json(script, *args, timeout=300):
    """Run bench/<script> with --json as a user would; return its last line, parsed."""
    proc = subprocess.run([sys.executable, str(BENCH / script), *args, "--json"], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_bf16_train_row(r):
    """A train_throughput result in bf16: the fp32 peer measured too, and issue #6's MFU against fp32 torch.mm."""
    assert r["dtype"] == "bfloat16" and r["device"] == "cpu" and r["compile"] is False
    assert r["ours"] > 0 and r["peer"] > 0 and r["peer_fp32"] > 0
    assert r["ratio"] > 0 and r["ratio_vs_hf_fp32"] > 0 and 0 < r["mfu"] < 1.5
    assert set(r["peak_mem_mib"]) == {"ours", "peer", "peer_fp32"} and r["process_peak_rss_mib"] > 0
    assert set(r["matmul_peak_gflops"]) == {"bfloat16", "float32"}
    # Issue #6's MFU: against fp32 torch.mm of 2048^2 on a CPU, whatever the dtype (the bf16 peak is higher).
    assert r["spec_peak"] == {"dtype": "float32", "n": 2048, "product": "torch.mm", "gflops": r["spec_peak"]["gflops"]}
    assert r["mfu_spec"] / r["mfu"] == pytest.approx(
        r["matmul_peak_gflops"]["bfloat16"] / r["spec_peak"]["gflops"], rel=0.5)


@pytest.mark.skipif(hardware.decide(hardware.probe_facts("cpu")).dtype == "bfloat16",
                    reason="the quick run_all below measures bf16 on this CPU, its default")
def test_train_throughput_json_in_bf16_has_the_fp32_peer_too():
    check_bf16_train_row(run_json("train_throughput.py", "--config", "tiny", "--dtype", "bf16", "--compile", "false",
                                  "--rounds", "1", "--warmup", "1", "--threads", "1"))


@pytest.mark.native_bf16
def test_bf16_learns_as_well_as_fp32():
    r = run_json("bf16_vs_fp32.py", "--config", "tiny", "--threads", "1")
    assert r["ok"] and abs(r["diff"]) <= 0.03
    # Both learned (ln 50257 = 10.8 at the start), so the agreement is about a trained model.
    assert r["val_loss_fp32"] < 8.0 and r["val_loss_bf16"] < 8.0


@pytest.mark.slow
def test_run_all_quick_prints_one_table():
    proc = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--quick", "--threads", "1", "--json"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    results = json.loads(lines[-1])
    assert {"train fp32", "prepare"} <= set(results)
    generate = [r for name, r in results.items() if name.startswith("generate")]
    assert {r["dtype"] for r in generate} == {"float32", results[f"generate {generate[0]['dtype']}"]["dtype"]}
    # fp32 greedy from the same weights: our KV-cache decoding must pick exactly HF's tokens.
    assert results["generate float32"]["same_tokens"] == 1.0 and results["generate float32"]["new_tokens"] == 16
    fp32 = results["train fp32"]
    assert fp32["dtype"] == "float32" and "ratio_vs_hf_fp32" not in fp32
    assert set(fp32["peak_mem_mib"]) == {"ours", "peer"}
    if "train bfloat16" in results:  # the device's default dtype (test_train_throughput_json_in_bf16_... elsewhere)
        check_bf16_train_row(results["train bfloat16"])
    for r in results.values():
        assert r["ours"] > 0 and r["peer"] > 0 and r["ratio"] > 0
    rows = [line for line in lines if line.startswith(("| train", "| generate", "| prepare"))]
    assert len(rows) == len(results)


def test_train_flops_per_token_counts_the_default_model():
    c = GPTConfig()
    per_layer = 3 * 256 * 256 + 256 * 256 + 2 * 256 * 1024  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert common.train_flops_per_token(c, 512) == 6 * (8 * per_layer + 50257 * 256) + 12 * 8 * 256 * 512


def test_interleaving_rotates_the_order_and_quiet_rounds_fall_back():
    order = []
    times, contention = common.interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 3)
    assert order == ["a", "b", "b", "a", "a", "b"] and all(len(v) == 3 for v in times.values())
    assert common.quiet_rounds({"a": [0.0, 0.5, 0.0, 0.0], "b": [0.0, 0.0, 0.05, 0.0]}) == ([0, 2, 3], True)
    assert common.quiet_rounds({"a": [0.0, 0.5, 0.9], "b": [0.0, 0.0, 0.0]}) == ([0, 1, 2], False)
    assert common.paired_ratio([1.0, 2.0, 1.0], [2.0, 2.0, 3.0]) == 2.0


def test_the_issues_mfu_peak_is_fp32_on_a_cpu_and_native_half_precision_on_a_gpu():
    from hardware import DeviceFacts
    t4, a100 = (DeviceFacts(type="cuda", name=n, capability=c) for n, c in (("Tesla T4", (7, 5)), ("A100", (8, 0))))
    assert common.spec_peak_dtype(DeviceFacts(type="cpu", name="CPU"), torch.bfloat16) == torch.float32
    assert common.spec_peak_dtype(t4, torch.float16) == torch.float16
    assert common.spec_peak_dtype(t4, torch.float32) == torch.float16  # bf16 is emulated there (is_bf16_supported: True)
    assert common.spec_peak_dtype(a100, torch.float32) == torch.bfloat16
    assert (common.peak_size("cpu"), common.peak_size("cuda:0")) == (2048, 8192)


def test_the_matmul_peak_times_at_full_size_only_the_products_near_the_fastest():
    """A product far slower at a quarter of the size (bf16 torch.mm where a CPU emulates bf16: most of a minute a
    call at 2048^2) is not timed at full size; the peak is the fast product's."""
    sizes = []

    def slow(a, b):
        sizes.append(a.shape[0])
        time.sleep(0.02)
        return torch.mm(a, b)

    peak = common.matmul_peak_flops("cpu", torch.float32, n=256, products=(torch.mm, slow))
    assert sizes == [64, 64]  # its trial's warm-up and timed call only
    assert peak > 2 * 256 ** 3 / 0.02
    sizes.clear()
    common.matmul_peak_flops("cpu", torch.float32, n=256, products=(slow, slow))  # as fast as the fastest: timed
    assert sizes.count(256) == 2 * 4


def test_the_benches_start_without_posix_only_modules():
    """Windows has no `resource` module: every bench still starts (imports, parses its options), in one process
    without it (what they read instead: the next test)."""
    scripts = ["train_throughput.py", "generate_throughput.py", "prepare_throughput.py", "bf16_vs_fp32.py",
               "run_all.py"]
    code = f"""if True:
        import contextlib, io, runpy, sys
        sys.modules["resource"] = None
        sys.path[0] = {str(BENCH)!r}  # as `python bench/X.py` has it
        for script in {scripts!r}:
            sys.argv = [script, "--help"]
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    runpy.run_path(str({str(BENCH)!r} + "/" + script), run_name="__main__")
                except SystemExit as e:
                    assert e.code == 0, (script, e.code)
            assert "usage:" in out.getvalue(), script
            print(script, "ok")"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.count(" ok") == len(scripts), p.stdout + p.stderr[-2000:]


def test_the_benches_measure_nothing_where_the_platform_cannot(monkeypatch):
    """What the benches read where Windows has nothing to read from: the peak RSS (no resource module) is 0, the
    data.py process tree's RSS (no /proc) is 0, the load average is None."""
    import prepare_throughput
    monkeypatch.setattr(common, "resource", None)
    monkeypatch.delattr(os, "getloadavg")
    real_isdir = os.path.isdir
    monkeypatch.setattr(os.path, "isdir", lambda p: False if p == "/proc" else real_isdir(p))
    assert common.peak_rss_bytes() == 0 and prepare_throughput._tree_rss(os.getpid()) == 0
    assert prepare_throughput.load_average() is None
