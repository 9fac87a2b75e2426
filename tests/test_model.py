"""model.py: config validation, parameter count, parity with HF GPT2LMHeadModel, KV-cache generation."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from export_hf import export_hf
import model as model_module
from model import GPT, CompiledDecode, DecodeGraph, GPTConfig, KVCache, blocked_causal_attention, sample_next

REPO = Path(__file__).resolve().parent.parent
BF16_TOL = dict(atol=0.02, rtol=0.02)
TINY = dict(vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=4, n_inner=48)


def randomized(config, seed=0):
    """A GPT whose every parameter is random (biases and LayerNorms too, which init leaves at 0 and 1)."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn_like(p))
        model.transformer.wte.weight[config.vocab_size:].zero_()
    return model.eval()


# --- config

@pytest.mark.parametrize("kwargs, fragment", [
    (dict(n_embd=256, n_head=6), "divisible by n_head"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(vocab_size=-1), "vocab_size must be a positive integer"),
    (dict(n_positions=512.0), "n_positions must be a positive integer"),
    (dict(n_head=True), "n_head must be a positive integer"),
    (dict(dropout=1.0), "dropout must be in [0, 1)"),
    (dict(dropout="0.1"), "dropout must be in [0, 1)"),
    (dict(layer_norm_epsilon="x"), "layer_norm_epsilon must be a positive number"),
    (dict(layer_norm_epsilon=0.0), "layer_norm_epsilon must be a positive number"),
    (dict(bias="yes"), "bias must be True or False"),
])
def test_config_validation(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        GPTConfig(**kwargs)


def test_config_from_dict_ignores_training_keys():
    d = dict(GPTConfig(n_layer=3).to_dict(), learning_rate=3e-4, batch_size=8)
    assert GPTConfig.from_dict(d) == GPTConfig(n_layer=3)


def test_param_count_of_default_config():
    model = GPT(GPTConfig())
    assert model.num_params() == 19_315_456
    assert model.num_params(non_embedding=True) == 6_318_592
    # The count is what an exported model holds: the tied head once, the vocab unpadded.
    exported = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert sum(v.numel() for v in exported.values()) == 19_315_456


# --- parity with transformers

@pytest.mark.parametrize("config", [GPTConfig(), GPTConfig(n_layer=3, n_inner=640, n_positions=64)],
                         ids=["default", "n_layer3_n_inner640"])
def test_logits_match_hf(config, tmp_path):
    ours = randomized(config)
    export_hf(ours, tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, config.vocab_size, (2, config.n_positions), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = ours(idx, all_logits=True)
        hf_logits = hf(idx).logits
    assert logits.shape == hf_logits.shape == (2, config.n_positions, config.vocab_size)
    assert (logits - hf_logits).abs().max().item() < 1e-5


# --- generation

def no_cache_greedy(model, idx, n):
    """The reference: a full forward pass over the last n_positions tokens for every new token."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.n_positions:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def test_kv_cache_generate_equals_no_cache_loop_past_the_context():
    model = randomized(GPTConfig(**TINY))
    with torch.no_grad():  # sharper weights: the next token depends on the whole window, not the last token only
        for name, p in model.named_parameters():
            if p.dim() == 2 and "wte" not in name:
                p.mul_(5)
    idx = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(0))
    n = 3 * model.config.n_positions  # the window slides twice
    with torch.no_grad():
        expected = no_cache_greedy(model, idx, n)
    assert torch.equal(model.generate(idx, n, temperature=0), expected)


def test_compile_without_onednn_says_so_and_decodes_eagerly(monkeypatch):
    """generate(compile=True) on a CPU whose PyTorch has no oneDNN (the compiled step's head needs it; some ARM
    builds) warns once that it runs without torch.compile and gives the eager tokens."""
    model = randomized(GPTConfig(**TINY))
    idx = torch.randint(0, 97, (1, 3), generator=torch.Generator().manual_seed(0))
    eager = model.generate(idx, 20, temperature=0)  # one-token steps from 16 new tokens on
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = model.generate(idx, 20, temperature=0, compile=True)
    assert torch.equal(tokens, eager)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and messages[0].startswith("generation runs without torch.compile (its head needs oneDNN")


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="packed decoding needs oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_equals_forward(dtype):
    """generate's one-token step (prepared weights, fp32 cache) gives forward()'s logits in fp32; under bf16
    autocast its attention runs in fp32, so it must be as close to the fp32 logits as forward() is."""
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bf16 on this CPU")
    model = randomized(GPTConfig(**TINY))
    idx = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = model(idx, all_logits=True)[0][:, 4:]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            packed = model.pack_for_decoding(dtype, 3)
            assert packed is not None
            slow, fast = KVCache(model.config, 3, "cpu", dtype), KVCache(model.config, 3, "cpu", torch.float32)
            model(idx[:, :4], cache=slow)
            model(idx[:, :4], cache=fast)
            expected, got = [], []
            for t in range(4, 12):
                expected.append(model(idx[:, t:t + 1], cache=slow)[0][:, -1])
                got.append(model.decode_step(idx[:, t:t + 1], fast, packed))
                assert got[-1].dtype == expected[-1].dtype == dtype
    expected, got = torch.stack(expected, 1).float(), torch.stack(got, 1).float()
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(fast.k[:, :, :, :12], slow.k[:, :, :, :12])
    else:
        error, forward_error = (got - exact).abs().max(), (expected - exact).abs().max()
        assert 0 < forward_error and error <= 1.25 * forward_error
        # The first layer's keys come before any attention: the same bf16 values.
        assert torch.equal(fast.k[0, :, :, :12], slow.k[0, :, :, :12].float())


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="packed decoding needs oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_shape_decode_step_equals_the_sliced_one(dtype):
    """decode_step's form for a CUDA graph (a position tensor: the whole cache attended to, later positions
    masked) gives the logits and cache of its plain form, also after the window slid (old values beyond)."""
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bf16 on this CPU")
    model = randomized(GPTConfig(**TINY))
    n = model.config.n_positions
    idx = torch.randint(0, 97, (2, n + 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        packed = model.pack_for_decoding(dtype, 2)
        sliced, static = KVCache(model.config, 2, "cpu", torch.float32), KVCache(model.config, 2, "cpu", torch.float32)
        static.k.zero_()  # as DecodeGraph does: the masked positions' values are multiplied by 0
        static.v.zero_()
        position = torch.zeros(1, dtype=torch.long)
        for start in (0, 4):  # then as after a slide: refilled from position 0 over the earlier values
            for cache in (sliced, static):
                cache.length = 0
                model(idx[:, start:start + 3], cache=cache)
            for t in range(start + 3, start + n):
                expected = model.decode_step(idx[:, t:t + 1], sliced, packed)
                position.fill_(static.length)
                got = model.decode_step(idx[:, t:t + 1], static, packed, position)
                torch.testing.assert_close(got, expected)
        torch.testing.assert_close(static.k, sliced.k)
        torch.testing.assert_close(static.v, sliced.v)
        assert torch.equal(static.k[0], sliced.k[0])  # before any attention: written to the same places
        with pytest.raises(ValueError, match="cache is full"):
            model.decode_step(idx[:, :1], static, packed, position)


def test_a_failed_cuda_graph_capture_leaves_eager_steps_and_says_so():
    """Capture fails for real here (a CPU cache): one warning, no graph, the cache at position 0 for the prompt."""
    model = randomized(GPTConfig(**TINY))
    cache = KVCache(model.config, 1, "cpu", torch.float32)
    packed = model.pack_for_decoding(torch.float32, 1)
    with pytest.warns(UserWarning, match="generation runs without a CUDA graph"):
        assert model._or_eager_steps("a CUDA graph", cache, lambda: DecodeGraph(model, cache, packed, 1)) is None
    assert cache.length == 0


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the head is packed by oneDNN")
@pytest.mark.parametrize("dtype,bias", [(torch.float32, True), (torch.bfloat16, False)])
def test_compiled_decoding_matches_decode_step(dtype, bias):
    """generate(compile=True)'s one-token steps (CompiledDecode: inductor, the cache length dynamic) give
    decode_step's logits, in fp32 to reordering, in bf16 as close to the exact logits as decode_step is, at every
    position and after the window slid (refilled from 0 over older values); a model without biases too."""
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bf16 on this CPU")
    model = randomized(GPTConfig(**TINY, bias=bias))
    n = model.config.n_positions
    idx = torch.randint(0, 97, (2, n + 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        packed = model.pack_for_decoding(dtype, 2)
        eager, cache = KVCache(model.config, 2, "cpu", torch.float32), KVCache(model.config, 2, "cpu", dtype, spare=1)
        compiled = CompiledDecode(model, cache, dtype, 2, model.packed_head(dtype, 2))
        errors = []
        with torch._dynamo.config.patch(error_on_recompile=True):  # one compilation, every position
            for start in (0, 4):
                for c in (eager, cache):
                    c.length = 0
                    model(idx[:, start:start + 3], cache=c)
                for t in range(start + 3, start + n):
                    expected = model.decode_step(idx[:, t:t + 1], eager, packed)
                    got = compiled(idx[:, t:t + 1])
                    assert got.dtype == expected.dtype == dtype and cache.length == eager.length == t - start + 1
                    if dtype == torch.float32:
                        torch.testing.assert_close(got, expected)
                    else:
                        with torch.autocast("cpu", enabled=False):
                            exact = model(idx[:, start:t + 1])[0][:, -1]
                        errors.append(((got.float() - exact).abs(), (expected.float() - exact).abs()))
        torch.testing.assert_close(cache.k[:, :, :, :n].float(), eager.k, **({} if dtype == torch.float32 else BF16_TOL))
        with pytest.raises(ValueError, match="cache is full"):
            compiled(idx[:, :1])
    if errors:  # mean errors: the max is one logit's final bf16 rounding (measured 0.90-0.97x over 6 seeds)
        ours, theirs = (torch.stack(e).mean() for e in zip(*errors))
        assert 0 < theirs and ours <= 1.1 * theirs


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the head is packed by oneDNN")
def test_compiled_generate_gives_the_eager_tokens_and_leaves_the_model_alone(monkeypatch):
    model = randomized(GPTConfig(**TINY)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    n = 3 * model.config.n_positions  # the window slides twice
    steps = []
    original = CompiledDecode.__call__
    monkeypatch.setattr(CompiledDecode, "__call__", lambda self, i: steps.append(1) or original(self, i))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="generation runs without")  # no falling back to eager steps
        compiled = model.generate(idx, n, temperature=0, compile=True)
    # The warm-up, then every one-token step until the context is full; beyond it each token is a forward().
    assert len(steps) == 1 + model.config.n_positions - 5
    assert torch.equal(compiled, model.generate(idx, n, temperature=0))
    # A one-token prompt (sample.py's default, <|endoftext|>) goes through forward(), as longer ones do: a step at
    # cache length 0 would compile again, as long as the first time.
    steps.clear()
    with torch._dynamo.config.patch(error_on_recompile=True), warnings.catch_warnings():
        warnings.filterwarnings("error", message="generation runs without")  # a recompile is not swallowed
        compiled = model.generate(idx[:, :1], 20, temperature=0, compile=True)
    assert len(steps) == 1 + 15  # the warm-up, then positions 1-15 (0 is the prompt's forward())
    assert torch.equal(compiled, model.generate(idx[:, :1], 20, temperature=0))
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


FAILED_COMPILE = """
import json, sys, warnings
import torch
import model as model_module
from model import GPT, GPTConfig
torch.manual_seed(0)
model = GPT(GPTConfig(**json.loads(sys.argv[1]))).eval()
idx = torch.randint(0, 97, (1, 4))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first = model.generate(idx, 20, temperature=0, compile=True)
    remembered = isinstance(model_module._compiled_decode_hidden, str)
    second = model.generate(idx, 20, temperature=0, compile=True)
print(json.dumps({"warnings": [str(w.message) for w in caught if "generation runs" in str(w.message)],
                  "remembered": remembered, "same": torch.equal(first, second) and torch.equal(first,
                  model.generate(idx, 20, temperature=0))}))
"""


def test_a_failed_compile_leaves_eager_steps_and_says_so(tmp_path):
    """Compiling fails for real (no C++ compiler; an empty inductor cache, so nothing compiled earlier is
    reused): each generate call warns once and decodes eagerly, the same tokens; the failure is remembered, so
    a later call does not spend seconds failing again."""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", FAILED_COMPILE, json.dumps(TINY)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["remembered"] and result["same"]
    assert len(result["warnings"]) == 2 and all(
        w.startswith("generation runs without torch.compile (") and "C++ compiler" in w for w in result["warnings"])


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="packed decoding needs oneDNN")
def test_packed_generate_equals_unpacked_and_leaves_the_model_alone(monkeypatch):
    model = randomized(GPTConfig(**TINY)).train()
    assert model.pack_for_decoding(torch.float32, 2) is not None  # else both runs below take the same path
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    n = 3 * model.config.n_positions  # the window slides twice
    packed = model.generate(idx, n, temperature=0)
    monkeypatch.setattr(model, "pack_for_decoding", lambda dtype, batch_size: None)
    assert torch.equal(packed, model.generate(idx, n, temperature=0))
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("temperature", [0, 2.0])
def test_generate_never_draws_beyond_vocab_limit(temperature):
    model = randomized(GPTConfig(**TINY))
    with torch.no_grad():  # the ids at and above 90 dominate every position's logits
        model.lm_head.weight[90:97] *= 50
    idx = torch.randint(0, 97, (2, 3), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    assert model.generate(idx, 20, temperature=temperature, generator=gen)[:, 3:].max() >= 90  # else no test
    out = model.generate(idx, 20, temperature=temperature, generator=gen, vocab_limit=90)[:, 3:]
    assert out.max() < 90


def test_generate_from_a_prompt_longer_than_the_context():
    model = randomized(GPTConfig(**TINY))
    idx = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = no_cache_greedy(model, idx, 10)
    assert torch.equal(model.generate(idx, 10, temperature=0), expected)


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = randomized(GPTConfig(**TINY))
    idx = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(0))
    greedy = model.generate(idx, 20, temperature=0)
    assert torch.equal(model.generate(idx, 20, temperature=1.5, top_k=1), greedy)
    assert torch.equal(model.generate(idx, 20, temperature=1.5, top_p=1e-6), greedy)


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = randomized(GPTConfig(**TINY))
    idx = torch.zeros((2, 1), dtype=torch.long)

    def sample(seed):
        return model.generate(idx, 30, temperature=1.0, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))


def test_top_k_and_top_p_keep_only_their_tokens():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, top_k=3, generator=g).tolist()) == {0, 1, 2}
    # top_p=0.7: token 1 is kept (mass before it 0.5 < 0.7), token 2 is not (0.8 >= 0.7).
    assert set(sample_next(logits, top_p=0.7, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, generator=g).tolist()) == {0, 1, 2, 3}
    assert set(sample_next(logits, temperature=0).tolist()) == {0}
    for tiny in (1e-45, 1e-38, 1e-6):  # logits / temperature would overflow to inf (NaN probabilities)
        assert set(sample_next(logits, temperature=tiny, generator=g).tolist()) == {0}


def test_generate_stops_rows_at_eos():
    model = randomized(GPTConfig(**TINY))
    idx = torch.zeros((4, 1), dtype=torch.long)
    out = model.generate(idx, 200, temperature=3.0, eos_token_id=5, generator=torch.Generator().manual_seed(0))
    assert out.shape[1] < 201  # the generation ended once every row had its eos
    for row in out[:, 1:].tolist():
        assert set(row[row.index(5):]) == {5}  # every row has one, and after it only repeats it


# --- padded vocabulary and dropout

def test_padded_vocab_never_leaks():
    config = GPTConfig(**TINY)
    model = randomized(config)
    assert model.padded_vocab == 128 > config.vocab_size
    sd = model.state_dict()
    assert sd["transformer.wte.weight"].shape == sd["lm_head.weight"].shape == (97, 32)
    fresh = GPT(config)
    fresh.load_state_dict(sd)
    idx = torch.randint(0, 97, (2, 8))
    logits, loss = model(idx, targets=idx)
    assert logits.shape[-1] == 97 and torch.isfinite(loss)
    assert torch.equal(fresh.eval()(idx)[0], model(idx)[0])
    # A hot temperature samples near-uniformly: never a padded id.
    out = model.generate(idx, 200, temperature=50.0, generator=torch.Generator().manual_seed(0))
    assert out.max().item() < 97


def test_return_logits_false_gives_only_the_loss():
    model = randomized(GPTConfig(**TINY)).train()
    idx = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    logits, loss = model(idx, targets=idx)
    nothing, same = model(idx, targets=idx, return_logits=False)
    assert logits.shape == (2, 8, 97) and nothing is None
    torch.testing.assert_close(loss, same)  # training: the chunked loss, equal up to summation order


def test_inputs_and_targets_may_be_slices_of_one_window():
    """idx and targets cut from one (B, T + 1) window, as nanoGPT-style loaders do, are not contiguous: both loss
    paths take them (a view(-1) of the targets failed)."""
    model = randomized(GPTConfig(**TINY)).train()
    window = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(0))
    _, chunked = model(window[:, :-1], window[:, 1:], return_logits=False)
    _, plain = model(window[:, :-1], window[:, 1:])
    _, ref = model(window[:, :-1].contiguous(), window[:, 1:].contiguous())
    torch.testing.assert_close(chunked, ref)
    torch.testing.assert_close(plain, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_equals_plain_cross_entropy(dtype, monkeypatch):
    """The eager training loss (LinearCrossEntropy) gives the plain path's loss and gradients: padded
    vocab, ignored targets, several chunks and a short last one, tied head and embedding."""
    monkeypatch.setattr(model_module, "LOSS_CHUNK_ROWS", 5)
    model = randomized(GPTConfig(**TINY)).train()
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 97, (3, 16), generator=gen)
    targets = torch.randint(0, 97, (3, 16), generator=gen)
    targets[0, :7] = -1
    targets[2, 4] = -1

    def loss_and_grads(chunked):
        model.chunked_loss = chunked
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            _, loss = model(idx, targets, return_logits=False)
        (0.5 * loss).backward()  # a grad_output other than 1, as with gradient accumulation
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    loss, grads = loss_and_grads(True)
    plain_loss, plain_grads = loss_and_grads(False)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(loss, plain_loss, **tol)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], **tol, msg=name)
    assert not grads["transformer.wte.weight"][97:].any()  # padded rows get no gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_evaluation_loss_is_chunked_and_equals_the_plain_loss(dtype, monkeypatch):
    """Without grad (evaluation) the loss comes chunk by chunk, in any autocast dtype, with the plain loss's value."""
    monkeypatch.setattr(model_module, "EVAL_CHUNK_ROWS", 5)
    model = randomized(GPTConfig(**TINY)).eval()
    idx = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(0))
    targets = idx.clone()
    targets[1, :6] = -1
    calls = []
    monkeypatch.setattr(model_module, "chunked_cross_entropy",
                        lambda *a, real=model_module.chunked_cross_entropy: calls.append(1) or real(*a))
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        _, chunked = model(idx, targets, return_logits=False)
        assert calls  # the chunked path ran
        _, plain = model(idx, targets)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(chunked, plain, **tol)


def onednn_calls(fn):
    """(fn()'s result, how many products ran through the oneDNN custom op), counted by torch.profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(e.count for e in prof.key_averages() if e.key == "gpt::onednn_linear")


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("n_in, n_out, bias", [(24, 40, True), (40, 24, False), (32, 32, True)])
def test_onednn_linear_equals_f_linear(monkeypatch, n_in, n_out, bias, compiled):
    """With fp32 matmuls on oneDNN a Linear's output and its three gradients (both orientations of the weight
    gradient) equal F.linear's to fp32 reordering, eagerly and compiled, and all three products ran on oneDNN."""
    monkeypatch.setattr(model_module, "ONEDNN_FP32", True)
    torch.manual_seed(0)
    lin = model_module.Linear(n_in, n_out, bias=bias)
    x = torch.randn(3, 50, n_in, requires_grad=True)
    g = torch.randn(3, 50, n_out)
    params = [x, *lin.parameters()]
    f = torch.compile(lin, fullgraph=True) if compiled else lin
    step = lambda: (lambda y: (y, torch.autograd.grad(y, params, g)))(f(x))  # noqa: E731
    step()  # compiles forward and backward outside the profiled call
    (y, grads), calls = onednn_calls(step)
    assert calls == 3
    y_ref = F.linear(x, lin.weight, lin.bias)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, torch.autograd.grad(y_ref, params, g)):
        assert a.shape == b.shape and a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_onednn_linear_behaves_as_nn_linear_in_the_corners(monkeypatch):
    """On oneDNN a Linear still is an nn.Linear to its callers: no rows and no input features (oneDNN refuses an
    empty sum) work, its output may be changed in place, it has a second derivative (so do mm_nt and mm_tn), and
    bad shapes or devices get F.linear's one-line errors."""
    monkeypatch.setattr(model_module, "ONEDNN_FP32", True)
    torch.manual_seed(0)
    lin, ref = model_module.Linear(8, 4), torch.nn.Linear(8, 4)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(0, 3, 8, requires_grad=True)
    y = lin(x)
    y.sum().backward()
    assert y.shape == (0, 3, 4) and x.grad.shape == x.shape
    assert not lin.weight.grad.any() and not lin.bias.grad.any()
    assert model_module.Linear(0, 4)(torch.randn(3, 0)).shape == (3, 4)

    def second_order(m, x):
        y = torch.relu_(m(x))  # in place on the output
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        gx.sum().backward()
        return gx.detach(), m.weight.grad.clone()

    lin.zero_grad()
    x = torch.randn(5, 8)
    (gx, gw), calls = onednn_calls(lambda: second_order(lin, x.clone().requires_grad_()))
    assert calls >= 3
    gx_ref, gw_ref = second_order(ref, x.clone().requires_grad_())
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-6)

    a, b = torch.randn(6, 5, requires_grad=True), torch.randn(6, 3, requires_grad=True)
    for product, reference in ((model_module.mm_nt, lambda a, b: a @ b.t()), (model_module.mm_tn, lambda a, b: a.t() @ b)):
        args = (a, b) if product is model_module.mm_tn else (a.t(), b.t())
        got = torch.autograd.grad(product(*args).square().sum(), (a, b))
        want = torch.autograd.grad(reference(*args).square().sum(), (a, b))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)

    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        model_module.Linear(64, 96)(torch.randn(5, 32))
    with pytest.raises(RuntimeError, match="device"):
        model_module.Linear(4, 3, device="meta")(torch.ones(2, 4))


def test_onednn_only_for_fp32_on_a_cpu_with_the_switch_on(monkeypatch):
    """oneDNN takes a Linear's products only in fp32 on a CPU without autocast, and only with ONEDNN_FP32 on
    (hardware.onednn_fp32_matmuls: AMD CPUs); bf16 autocast keeps F.linear (oneDNN's bf16 kernels anyway)."""
    lin = model_module.Linear(16, 16)
    x = torch.randn(4, 16)
    if torch.backends.mkldnn.is_available():
        monkeypatch.setattr(model_module, "ONEDNN_FP32", True)
        assert onednn_calls(lambda: lin(x))[1] == 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert onednn_calls(lambda: lin(x))[1] == 0
        assert onednn_calls(lambda: lin.double()(x.double()))[1] == 0
    monkeypatch.setattr(model_module, "ONEDNN_FP32", False)
    assert onednn_calls(lambda: lin.float()(x))[1] == 0


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_training_step_on_onednn_equals_the_default_engine(monkeypatch):
    """A whole fp32 training step (blocks, the tied head, the chunked loss in several chunks) with its matmuls
    on oneDNN gives the default engine's loss and gradients to fp32 reordering. Compiled: the test below."""
    monkeypatch.setattr(model_module, "LOSS_CHUNK_ROWS", 5)
    model = randomized(GPTConfig(**TINY)).train()
    model.before_compile()
    idx = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(0))

    def loss_and_grads(onednn):
        monkeypatch.setattr(model_module, "ONEDNN_FP32", onednn)
        model.zero_grad()
        (_, loss), calls = onednn_calls(lambda: model(idx, idx, return_logits=False))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()], calls

    loss, grads, calls = loss_and_grads(True)
    ref_loss, ref_grads, ref_calls = loss_and_grads(False)
    assert calls > 0 and ref_calls == 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("T, rows", [(1, 128), (5, 2), (64, 16), (200, 64), (300, 128)])
def test_blocked_causal_attention_equals_sdpa(T, rows):
    """Blocks of query rows (a short last one too) give causal SDPA's output and gradients."""
    gen = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, 3, T, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    g = torch.randn(2, 3, T, 8, generator=gen, dtype=torch.float64)
    ours = blocked_causal_attention(q, k, v, rows)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_compiled_cpu_training_uses_blocked_attention_with_the_same_result(monkeypatch, dropout):
    """Under torch.compile on the CPU the training forward runs blocked_causal_attention (here over 3 blocks of
    rows), with its matmuls on oneDNN where the build has it and the loss in several chunks; loss and gradients
    agree with the eager model's on the default engine (flash attention) to float32 reordering. With dropout the
    compiled model keeps SDPA. (One compile checks all three: each costs tens of seconds on a 2-core machine.)"""
    calls = []
    real = model_module.blocked_causal_attention
    monkeypatch.setattr(model_module, "blocked_causal_attention", lambda *a: calls.append(a[3]) or real(*a))
    monkeypatch.setattr(model_module, "ATTN_BLOCK_ROWS", 8)
    monkeypatch.setattr(model_module, "LOSS_CHUNK_ROWS", 5)
    model = randomized(GPTConfig(**dict(TINY, n_positions=20, dropout=dropout))).train()
    idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))

    def loss_and_grads(m):
        model.zero_grad()
        (_, loss), products = onednn_calls(lambda: m(idx, idx, return_logits=False))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()], products

    monkeypatch.setattr(model_module, "ONEDNN_FP32", False)
    torch.manual_seed(1)
    eager = loss_and_grads(model)
    assert not calls and eager[2] == 0
    model.before_compile()
    onednn = torch.backends.mkldnn.is_available()
    monkeypatch.setattr(model_module, "ONEDNN_FP32", onednn)
    torch.manual_seed(1)
    if dropout:  # compiled dropout draws its masks differently: only the path is checked, where dynamo traces it
        torch.compile(model, backend="eager")(idx, idx, return_logits=False)  # (the path is chosen then: no inductor)
        assert not calls
        return
    compiled = loss_and_grads(torch.compile(model))
    assert calls == [8] * 2  # traced into the graph (2 layers)
    assert (compiled[2] > 0) == onednn
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_chunked_loss_equals_eager(dtype):
    """Under torch.compile chunked_cross_entropy forms loss and softmax - onehot another way (fused by inductor):
    same loss and gradients as eagerly, with padded columns and ignored targets."""
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(24, 16, generator=gen), torch.randn(128, 16, generator=gen)
    w[100:] = 0  # padding rows, as in the model
    targets = torch.randint(0, 100, (24,), generator=gen)
    targets[[0, 5, 6]] = -1
    run = lambda rows: model_module.chunked_cross_entropy(h, w, targets, 100, dtype, rows, grads=True)  # noqa: E731
    eager = run(7)
    graphs = []
    torch.compile(run, fullgraph=True, backend=lambda gm, _: graphs.append(gm) or gm.forward)(24)
    ops = " ".join(str(node.target) for gm in graphs for node in gm.graph.nodes)
    assert "amax" in ops and "log_softmax" not in ops  # the compiled formulation was traced, not the eager one
    compiled = torch.compile(run, fullgraph=True)(24)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, **tol)
    assert not compiled[2][100:].any()  # padded rows get no gradient


def test_compiled_cpu_gelu_is_the_sigmoid_form_of_the_same_function():
    """Compiled for a CPU, gelu_tanh is x * sigmoid(2u) (faster there): equal to F.gelu's tanh form in fp32,
    gradients too, and in bf16 at least as close to the float64 value."""
    graphs = []
    torch.compile(model_module.gelu_tanh, fullgraph=True,
                  backend=lambda gm, _: graphs.append(gm) or gm.forward)(torch.randn(4))
    ops = " ".join(str(node.target) for gm in graphs for node in gm.graph.nodes)
    assert "sigmoid" in ops and "gelu" not in ops  # the compiled form was traced
    x = (3 * torch.randn(64, 256, generator=torch.Generator().manual_seed(0))).requires_grad_()
    compiled = torch.compile(model_module.gelu_tanh, fullgraph=True)
    y = compiled(x)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    y_ref = F.gelu(x, approximate="tanh")
    (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    # In bf16 against what it replaces, inductor's lowering of F.gelu's tanh form.
    xb = (3 * torch.randn(512, 1024, generator=torch.Generator().manual_seed(1))).bfloat16()
    exact = F.gelu(xb.double(), approximate="tanh").bfloat16()
    tanh_form = torch.compile(lambda t: F.gelu(t, approximate="tanh"), fullgraph=True)
    assert compiled(xb).dtype == torch.bfloat16
    assert (compiled(xb) != exact).sum() < (tanh_form(xb) != exact).sum()


def test_compiled_cpu_training_takes_the_chunked_loss():
    """The graph torch.compile captures for a CPU training step holds LinearCrossEntropy, not cross_entropy; an
    evaluation graph (no grad) keeps the plain path."""
    def ops_in_graphs(grad):
        graphs = []

        def record(gm, example_inputs):
            graphs.append(gm)
            return gm.forward  # run the captured graph as it is: only its ops matter here

        model = randomized(GPTConfig(**TINY)).train()
        model.before_compile()
        idx = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
        with torch.set_grad_enabled(grad):
            torch.compile(model, backend=record)(idx, idx, return_logits=False)
        return " ".join(str(node.target) for gm in graphs for node in gm.graph.nodes)

    training, evaluation = ops_in_graphs(True), ops_in_graphs(False)
    assert "autograd_function_apply" in training and "cross_entropy" not in training
    assert "cross_entropy" in evaluation and "autograd_function_apply" not in evaluation


def test_compiled_training_off_cpus_keeps_the_plain_loss(monkeypatch):
    """Only CPUs have measured the compiled chunked loss: elsewhere (a GPU, here the meta device) it declines."""
    model = GPT(GPTConfig(**TINY)).to("meta").train()
    x, targets = torch.zeros(2, 8, 32, device="meta"), torch.zeros(2, 8, dtype=torch.long, device="meta")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert model._loss_without_logits(x, targets) is None
    cpu_x, cpu_targets = torch.zeros(2, 8, 32), torch.zeros(2, 8, dtype=torch.long)
    assert randomized(GPTConfig(**TINY)).train()._loss_without_logits(cpu_x, cpu_targets) is not None


def test_which_loss_an_eager_forward_takes():
    model = randomized(GPTConfig(**TINY)).train()
    idx = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    _, loss = model(idx, targets=idx, return_logits=False)
    assert type(loss.grad_fn).__name__ == "LinearCrossEntropyBackward"
    with torch.no_grad():
        _, loss = model(idx, targets=idx, return_logits=False)
    assert loss.grad_fn is None
    _, loss = model(idx, targets=idx)
    assert type(loss.grad_fn).__name__ == "NllLossBackward0"
    with torch.autocast("cpu", dtype=torch.float16):  # fp16 (GradScaler) keeps the plain path
        _, loss = model(idx, targets=idx, return_logits=False)
    assert type(loss.grad_fn).__name__ == "NllLossBackward0"


def test_dropout_only_in_training():
    model = randomized(GPTConfig(**dict(TINY, dropout=0.5)))
    idx = torch.randint(0, 97, (2, 8))
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    # generate switches to eval for its duration and restores training mode afterwards
    g = model.generate(idx, 5, temperature=0)
    assert model.training and torch.equal(g, model.eval().generate(idx, 5, temperature=0))
