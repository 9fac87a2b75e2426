"""train.py and sample.py on a real CUDA GPU: what a Kaggle T4 (fp16 + GradScaler, compiled), a P100 (fp16,
eager) and an A100/H100 (bf16, compiled and eager) run, interrupted and resumed; a real CUDA out-of-memory
error (the allocator capped with set_per_process_memory_fraction) backed off; a checkpoint trained on the GPU
sampled and exported; cuda_graphs' training step (accumulated, resumed, out of memory). Skipped where no GPU is visible (CI); run on one with `python -m pytest -q tests/test_cuda.py`.
"""

import os
import subprocess
import sys
import warnings

import pytest
import torch

import model as model_module
from export_hf import load_hf
from model import GPTConfig, KVCache
from test_model import TINY as TINY_MODEL, randomized
from test_train import ROOT, TINY, assert_resumed_run_is_bit_identical, final_state, write_bins

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = [*TINY, "--device=cuda", "--eval_iters=2"]


@pytest.fixture(scope="module")
def bins(tmp_path_factory):
    return write_bins(tmp_path_factory.mktemp("data"), train_tokens=70_000)


def run(out_dir, bins, *extra, prelude=""):
    """train.py in a subprocess; with prelude, Python run first in the same process (before train.py's main)."""
    args = [*CUDA, f"--data_dir={bins}", f"--out_dir={out_dir}", *extra]
    if prelude:
        cmd = [sys.executable, "-c", f"{prelude}\nimport runpy, sys\nsys.argv = ['train.py', *{args!r}]\n"
                                     "runpy.run_path('train.py', run_name='__main__')"]
    else:
        cmd = [sys.executable, str(ROOT / "train.py"), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ})
    assert p.returncode == 0, f"train.py exited {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def bf16_capable():
    return torch.cuda.get_device_capability() >= (8, 0)


@pytest.mark.parametrize("dtype, compile", [("float16", True), ("float16", False), ("bfloat16", True),
                                            ("bfloat16", False)],
                         ids=["T4-fp16-compiled", "P100-fp16-eager", "A100-bf16-compiled", "A100-bf16-eager"])
def test_interrupted_and_resumed_gpu_run_matches_a_straight_one(tmp_path, bins, dtype, compile):
    """With a 32-token context the attention backward has one key block, so every kernel here is deterministic
    and the resume can be checked to the bit: what it restores (weights, AdamW, GradScaler, RNG, data position)."""
    if dtype == "bfloat16" and not bf16_capable():
        pytest.skip("bf16 needs capability 8.0")
    p, a, b = assert_resumed_run_is_bit_identical(run, tmp_path, bins, f"--dtype={dtype}", f"--compile={compile}")
    assert f"dtype: {dtype}" in p.stdout and f"compile: {'on' if compile else 'off'}" in p.stdout
    if dtype == "float16":  # GradScaler's state travels with the checkpoint
        assert a["scaler_state_dict"]["scale"] == b["scaler_state_dict"]["scale"] > 0


def test_a_real_cuda_out_of_memory_backs_off_and_keeps_the_result(tmp_path, bins):
    """The allocator capped at 1.5 GiB: the default-width model at 64 x 512 tokens per micro-batch needs more
    (~4 GB of activations), so train.py meets real CUDA OOMs, halves the micro-batch until it fits, and
    ends where a run with that micro-batch from the start ends."""
    p = assert_capped_run_backs_off_to_the_result_of_its_micro_batch(tmp_path, bins, "--compile=False")
    assert "out of memory: micro-batch now 32 x 2 accumulation steps" in p.stdout


def assert_capped_run_backs_off_to_the_result_of_its_micro_batch(tmp_path, bins, *extra, graphs=()):
    """The default-width model in fp32 at 64 x 512 tokens a micro-batch, with the allocator capped at 1.5 GiB (it
    needs ~4 GB of activations), then a run with the micro-batch it backed off to from the start (and without
    `graphs`, the capped run's own extra settings): both end alike. Returns the capped run's process."""
    common = ["--n_positions=512", "--max_length=512", "--n_embd=256", "--n_head=8", "--n_inner=1024",
              "--n_layer=8", "--dtype=float32", "--max_steps=2", "--save_steps=2", *extra]
    capped = tmp_path / "capped"
    cap = (1.5 * 2**30) / torch.cuda.get_device_properties(0).total_memory
    p = run(capped, bins, *common, *graphs, "--batch_size=64", "--gradient_accumulation_steps=1",
            prelude=f"import torch; torch.cuda.set_per_process_memory_fraction({cap!r})")
    state = final_state(capped)
    batch, accum = state["batch_size"], state["gradient_accumulation_steps"]
    assert batch * accum == 64 and batch <= 32
    run(tmp_path / "ref", bins, *common, f"--batch_size={batch}", f"--gradient_accumulation_steps={accum}")
    ref = final_state(tmp_path / "ref")
    for k, v in ref["model_state_dict"].items():
        torch.testing.assert_close(state["model_state_dict"][k], v, rtol=1e-4, atol=2e-5, msg=k)
    return p


def test_cuda_graph_training_accumulates_and_resumes_as_the_default_compiled_run(tmp_path, bins):
    """cuda_graphs with 4 micro-batches a step: PyTorch's graphs hand the backward's gradient buffers, which the
    next replay overwrites, to any parameter whose .grad is None (pytorch/pytorch#96693); train.py keeps the
    gradients allocated so that they are added into. A lost or doubled micro-batch would move these weights by
    ~1e-3 (learning rate 3e-3): they must match the default compiled run's, and resume bit-identically."""
    dtype = "bfloat16" if bf16_capable() else "float16"
    common = [f"--dtype={dtype}", "--compile=True", "--gradient_accumulation_steps=4"]
    p, graphs, _ = assert_resumed_run_is_bit_identical(run, tmp_path, bins, *common, "--cuda_graphs=True")
    assert "cuda graphs: on" in p.stdout and "warning: cuda_graphs" not in p.stdout, p.stdout
    run(tmp_path / "default", bins, *common, "--lr_decay=constant", "--save_steps=4", "--eval_steps=4",
        "--max_steps=8")
    default = final_state(tmp_path / "default")
    for k, v in default["model_state_dict"].items():
        torch.testing.assert_close(graphs["model_state_dict"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_a_real_cuda_out_of_memory_with_cuda_graphs_drops_them_and_goes_on(tmp_path, bins):
    """Out of memory (the allocator capped) while the graphs' step runs: they are dropped with their memory, the
    micro-batch backs off, and the run ends where a compiled run without graphs at that micro-batch ends."""
    p = assert_capped_run_backs_off_to_the_result_of_its_micro_batch(tmp_path, bins, "--compile=True",
                                                                     graphs=["--cuda_graphs=True"])
    assert "out of memory: cuda_graphs off for the rest of this session" in p.stdout, p.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_generation_replays_a_cuda_graph_that_matches_eager_steps(monkeypatch, dtype):
    """generate's one-token steps on a GPU replay decode_step captured in a CUDA graph: logits as the eager
    step's (fp32: to float reordering; fp16, bf16: within their rounding), over a refilled cache too, and in
    fp32 the same greedy tokens."""
    if dtype == torch.bfloat16 and not bf16_capable():
        pytest.skip("bf16 needs capability 8.0")
    model = randomized(GPTConfig(**TINY_MODEL)).cuda()
    n = model.config.n_positions
    idx = torch.randint(0, 97, (2, n + 8), generator=torch.Generator().manual_seed(0)).cuda()
    tol = {} if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        packed = model.pack_for_decoding(dtype, 2)
        graphed, eager = KVCache(model.config, 2, "cuda", torch.float32), KVCache(model.config, 2, "cuda", torch.float32)
        graph = model_module.DecodeGraph(model, graphed, packed, 2)
        for start in (0, 8):  # the second time refilled from position 0 over earlier values: replays read in place
            for cache in (graphed, eager):
                cache.length = 0
                model(idx[:, start:start + 3], cache=cache)
            for t in range(start + 3, start + n):
                got = graph(idx[:, t:t + 1]).clone()
                torch.testing.assert_close(got, model.decode_step(idx[:, t:t + 1], eager, packed), **tol)
        with pytest.raises(ValueError, match="cache is full"):
            graph(idx[:, :1])

        replays = []
        original = model_module.DecodeGraph.__call__
        monkeypatch.setattr(model_module.DecodeGraph, "__call__", lambda self, i: replays.append(1) or original(self, i))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no falling back to eager steps
            out = model.generate(idx[:, :5], 3 * n, temperature=0)
        # Every one-token step until the context is full; beyond it each token rebuilds the cache (forward).
        assert len(replays) == n - 5
        monkeypatch.setattr(model, "_or_eager_steps", lambda *args: None)  # no graph: eager steps
        if dtype == torch.float32:
            assert torch.equal(out, model.generate(idx[:, :5], 3 * n, temperature=0))


def test_a_gpu_checkpoint_samples_and_exports(tmp_path, bins):
    out = tmp_path / "out"
    run(out, bins, "--max_steps=4", "--save_steps=4", "--export_final_model=True",
        f"--dtype={'bfloat16' if bf16_capable() else 'float16'}")
    p = subprocess.run([sys.executable, "sample.py", f"--checkpoint={out / 'best_model.pt'}", "--device=cuda",
                        "--start=The cat", "--max_new_tokens=20", "--seed=1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0 and "The cat" in p.stdout, p.stderr
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out / "final_model")  # on the CPU, written by a CUDA run
    ids = torch.tensor([[464, 3797]])  # "The cat"
    ours = load_hf(out / "final_model")
    torch.testing.assert_close(hf(ids).logits, ours(ids, all_logits=True)[0], rtol=1e-4, atol=1e-4)
