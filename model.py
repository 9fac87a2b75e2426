"""GPT-2 in plain PyTorch.

The parameter names match HuggingFace's `GPT2LMHeadModel` one to one (`transformer.wte`,
`transformer.h.0.attn.c_attn`, ...), so export and import are a rename-free copy plus the
transposes HF's Conv1D layers need (see export_hf.py).
"""

import functools
import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
from torch.nn import functional as F

import hardware
from cli import is_number, one_line

# The embedding matrix is padded to a multiple of this internally: matmuls with a width that is a
# multiple of 64 run markedly faster. The padding never appears in a state_dict or a config.
VOCAB_PAD_MULTIPLE = 64


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # GPT-2 BPE vocabulary
    n_positions: int = 512  # context length (maximum sequence length)
    n_embd: int = 256  # embedding / residual width
    n_layer: int = 8  # transformer blocks
    n_head: int = 8  # attention heads per block
    n_inner: int = 1024  # MLP hidden width
    dropout: float = 0.0  # dropout on embeddings, attention and residuals (training only)
    bias: bool = True  # biases in Linear and LayerNorm layers (GPT-2 has them; HF export needs them)
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"pick n_head from {[h for h in range(1, 33) if self.n_embd % h == 0]}")
        if not (is_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not (is_number(self.layer_norm_epsilon) and self.layer_norm_epsilon > 0):
            raise ValueError(f"GPTConfig.layer_norm_epsilon must be a positive number, got {self.layer_norm_epsilon!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"GPTConfig.bias must be True or False, got {self.bias!r}")

    @classmethod
    def from_dict(cls, d):
        """Build from a dict that may hold other keys (a training config): only model keys are read."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self):
        return asdict(self)


class KVCache:
    """Keys and values of every layer for incremental decoding: (n_layer, B, nh, n_positions + spare, hs).

    spare: positions allocated beyond the context and never filled. CompiledDecode asks for one, so that the cache
    up to a step's position is never all of the tensor: that slice would have other strides (a contiguous tensor's),
    and the step would compile again at the last position."""

    def __init__(self, config, batch_size, device, dtype, spare=0):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, config.n_positions + spare, hs)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled so far
        self.capacity = config.n_positions

    def check_room(self):
        """Raise if no position is left for one more token."""
        if self.length >= self.capacity:
            raise ValueError(f"the KV cache is full (n_positions={self.capacity})")


def matmul_dtype(t):
    """The dtype matmuls on t's device run in here: autocast's when it is on, else t's own."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


# fp32 matmuls on a CPU whose MKL runs slow code (AMD: AVX2 kernels despite AVX-512) go through oneDNN, ~2x
# faster there (hardware.onednn_fp32_matmuls). Read at every call, so a test or a benchmark can switch it.
ONEDNN_FP32 = hardware.onednn_fp32_matmuls()


@torch.library.custom_op("gpt::onednn_linear", mutates_args=())
def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x @ weight.T (+ bias) by oneDNN, for 2-D x (M, K) and weight (N, K) of any strides. A custom op so that
    torch.compile calls it as it is (inductor's own lowering of the oneDNN op expects prepacked weights)."""
    if not x.size(1):  # an empty sum (a weight gradient over no rows): oneDNN refuses to build it
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@_onednn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(x.size(0), weight.size(0))


def _onednn_tn(a, b):
    """a.T @ b on oneDNN, 2-D a (M, N), b (M, K): a weight gradient. The wider of N and K is put on the kernel's
    weight side, which runs these long sums ~1.5x faster (bench/NOTES.md, ninth pass). The result may be a
    transposed view."""
    if a.size(1) >= b.size(1):
        return _onednn_linear(b.t(), a.t(), None).t()
    return _onednn_linear(a.t(), b.t(), None)


def _setup_onednn_linear(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _onednn_linear_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    dx = _onednn_linear(grad, weight.t(), None) if ctx.needs_input_grad[0] else None
    dw = _onednn_tn(grad, x).contiguous() if ctx.needs_input_grad[1] else None
    db = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dw, db


_onednn_linear.register_autograd(_onednn_linear_backward, setup_context=_setup_onednn_linear)


def _on_onednn(*tensors):
    """Whether products of these tensors (None: no bias) go to oneDNN: the switch on, all of them fp32 on the
    CPU, no autocast (bf16 autocast runs oneDNN's bf16 kernels through F.linear anyway)."""
    if not ONEDNN_FP32 or torch.is_autocast_enabled("cpu"):
        return False
    for t in tensors:
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            return False
    return True


def mm_nt(a, b, bias=None):
    """a @ b.T (+ bias) for 2-D a (M, K), b (N, K): oneDNN for fp32 on CPUs where it is the faster engine, else
    (and for shapes that do not fit, so that the error is F.linear's) F.linear."""
    if a.dim() == b.dim() == 2 and a.size(1) == b.size(1) and _on_onednn(a, b, bias):
        return _onednn_linear(a, b, bias)
    return F.linear(a, b, bias)


def mm_tn(a, b):
    """a.T @ b for 2-D a (M, N), b (M, K), a weight gradient: on oneDNN as mm_nt (then possibly a transposed
    view), else torch.matmul."""
    if a.dim() == b.dim() == 2 and a.size(0) == b.size(0) and _on_onednn(a, b):
        return _onednn_tn(a, b)
    return a.t() @ b


class Linear(nn.Linear):
    """nn.Linear (same parameters and state_dict) whose fp32 CPU matmuls, forward and gradients, run on oneDNN
    where that is faster (ONEDNN_FP32)."""

    def forward(self, x):
        if x.dim() and x.size(-1) == self.in_features and _on_onednn(x, self.weight, self.bias):
            rows = x.reshape(math.prod(x.shape[:-1]), self.in_features)
            return _onednn_linear(rows, self.weight, self.bias).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


# generate prepares the weights for one-token steps (pack_for_decoding) only for at least this many new
# tokens: preparing costs ~20 ms for the default model, and each step then saves ~2.5 ms (1 CPU thread).
PACK_MIN_NEW_TOKENS = 16


class TransposedLinear:
    """An fp32 Linear for one-token steps: addmm on a transposed copy of the weight. For the blocks' small
    weights MKL's fp32 gemv in this layout beats oneDNN's packed one (256 x 768: 10 vs 27 us on 1 thread
    of an AMD EPYC): the fp32 decode step is ~10% faster. Not for bf16: an fp32 copy of bf16-rounded
    weights gives the same products, but at twice the bytes the step's weights no longer fit the L3
    cache with the head's, and the bf16 step got slower (1.96 vs 1.65 ms per token, 2 threads)."""

    def __init__(self, linear):
        self.weight_t = linear.weight.detach().float().t().contiguous()  # (in, out)
        self.bias = None if linear.bias is None else linear.bias.detach().float()

    def __call__(self, x):
        return x @ self.weight_t if self.bias is None else torch.addmm(self.bias, x, self.weight_t)


class PackedLinear:
    """A Linear's weight cast to dtype and reordered once by oneDNN for inputs of a few rows (one token
    per row, decoding), with the private ops inductor uses for frozen weights. The same products and
    accumulation as F.linear in that dtype (bf16 logits come out bit-identical here), but faster on CPU
    for the big head: on 1 thread of an AMD EPYC, bf16, the 50304 x 256 head takes 0.42 ms instead of
    1.2 ms, and fp32 spreads over threads where MKL's gemv does not (2 threads: 0.45 vs 1.3 ms)."""

    def __init__(self, linear, dtype, rows):
        self.dtype = dtype
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().to(dtype), rows)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)

    def __call__(self, x):
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.weight, self.bias, "none", [], "")


class CastLinear:
    """A Linear's weight and bias cast to dtype once, for one-token steps on a GPU: under autocast every step
    would cast each weight again (a kernel and a read of the fp32 weight per matmul)."""

    def __init__(self, linear, dtype):
        self.dtype = dtype
        self.weight = linear.weight.detach().to(dtype)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)

    def __call__(self, x):
        return F.linear(x.to(self.dtype), self.weight, self.bias)


class DecodeGraph:
    """GPT.decode_step captured once in a CUDA graph and replayed for each new token.

    A one-token step of a small model is a few microseconds of GPU work per kernel, and the CPU launching its
    ~130 kernels one by one is what it waits on; a replay launches them all at once. The step runs in its
    static-shape form (decode_step with a position tensor): same weights, same cache tensors, attention over
    the whole cache with the positions after the new token masked out (their values are multiplied by 0, so
    the cache is zeroed here: an uninitialised NaN would survive that). Build it right after the cache, before
    the prompt fills it: the warm-up steps write position 0. Replays read and write the cache in place.
    """

    def __init__(self, model, cache, packed, batch_size):
        self.device = cache.k.device
        self.cache = cache
        with torch.cuda.device(self.device):
            cache.k.zero_()
            cache.v.zero_()
            self.idx = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
            self.position = torch.zeros(1, dtype=torch.long, device=self.device)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            try:
                with torch.cuda.stream(stream):  # warm-up outside the graph: library handles, kernel choices
                    for _ in range(2):
                        cache.length = 0
                        model.decode_step(self.idx, cache, packed, self.position)
            finally:  # also after a failed warm-up: the prompt's pass must not overtake its writes
                torch.cuda.current_stream(self.device).wait_stream(stream)
                cache.length = 0
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: other threads' CUDA calls (NCCL's watchdog, when train.py samples under torchrun)
            # cannot invalidate this capture; this thread's are still checked.
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.logits = model.decode_step(self.idx, cache, packed, self.position)
            cache.length = 0

    def __call__(self, idx):
        """decode_step(idx, cache, packed): the logits (B, V), in a buffer the next call overwrites."""
        self.cache.check_room()
        with torch.cuda.device(self.device):
            self.idx.copy_(idx)
            self.position.fill_(self.cache.length)
            self.graph.replay()
        self.cache.length += 1
        return self.logits


def rows_linear(x, weight, bias):
    """x (B, in) times weight (out, in) transposed, plus bias, in weight's dtype: products of weight-dtype numbers
    summed in fp32 and rounded once, as F.linear (oneDNN) computes them. Written as a broadcast product and a sum
    for inductor (decode_hidden), which makes it one fused, vectorised loop over the weight: for one row
    (decoding) ~5 us for a 768 x 256 bf16 weight on 2 CPU threads, where a oneDNN or BLAS call takes 15-35 us,
    most of it fixed cost per call. Eager, it would materialise the (B, out, in) product: compiled use only."""
    y = (x.to(weight.dtype).float()[:, None, :] * weight.float()[None]).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(weight.dtype)


def decode_hidden(idx, position, k_cache, v_cache, wte, wpe, blocks, ln_f_w, ln_f_b, n_head, eps):
    """A one-token step up to the head on plain tensors, for torch.compile on a CPU (CompiledDecode).

    idx (B, 1); position (1,) long; k_cache and v_cache (n_layer, B, nh, position + 1, hs) in the matmul dtype,
    the positions before `position` filled (this writes `position`); blocks: the blocks' weights stacked over
    layers (DECODE_WEIGHTS order), the Linears' in the matmul dtype, the LayerNorms' in fp32, a missing bias None.
    Returns ln_f's output (B, C). The same operations and dtypes as decode_step: LayerNorm in fp32, matmuls in
    the weights' dtype, attention in fp32 over the cache (keys and values are outputs of those matmuls, so a cache
    in their dtype holds them exactly). The new keys and values are written once, for every layer, at the end:
    one write into the cache itself, where writes into per-layer views of it would make inductor copy it whole.
    """
    B, C = idx.size(0), wte.size(1)
    hs = C // n_head
    x = F.embedding(idx[:, 0], wte) + F.embedding(position, wpe)  # (B, C)
    new = (torch.arange(k_cache.size(3), device=idx.device) == position)[:, None]  # (position + 1, 1)
    new_k, new_v = [], []
    for i in range(k_cache.size(0)):
        ln_1_w, ln_1_b, attn_w, attn_b, proj_w, proj_b, ln_2_w, ln_2_b, fc_w, fc_b, mlp_w, mlp_b = (
            None if w is None else w[i] for w in blocks)
        qkv = rows_linear(F.layer_norm(x, (C,), ln_1_w, ln_1_b, eps), attn_w, attn_b).float()
        q, k, v = qkv.view(B, 3, n_head, hs).unbind(1)  # (B, nh, hs) each
        # The cache's last position is written below, after every layer: here the new key and value take its
        # place (where() picks; whatever the position holds is never used in arithmetic).
        keys = torch.where(new, k[:, :, None, :], k_cache[i].float())  # (B, nh, position + 1, hs)
        values = torch.where(new, v[:, :, None, :], v_cache[i].float())
        probs = ((q[:, :, None, :] * keys).sum(-1) * hs ** -0.5).softmax(-1)  # (B, nh, position + 1)
        y = (probs[..., None] * values).sum(-2)  # (B, nh, hs)
        x = x + rows_linear(y.reshape(B, C), proj_w, proj_b).float()
        h = gelu_tanh(rows_linear(F.layer_norm(x, (C,), ln_2_w, ln_2_b, eps), fc_w, fc_b))
        x = x + rows_linear(h, mlp_w, mlp_b).float()
        new_k.append(k)
        new_v.append(v)
    k_cache.index_copy_(3, position, torch.stack(new_k)[:, :, :, None].to(k_cache.dtype))
    v_cache.index_copy_(3, position, torch.stack(new_v)[:, :, :, None].to(v_cache.dtype))
    return F.layer_norm(x, (C,), ln_f_w, ln_f_b, eps)


# decode_hidden's `blocks`: these parameters of every block, in this order.
DECODE_WEIGHTS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                  "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                  "mlp.c_proj.weight", "mlp.c_proj.bias")


# torch.compile(decode_hidden), made at the first CompiledDecode; or, once compiling it failed, what failed (a
# string, not the exception, whose traceback would keep that call's model and cache alive): later CompiledDecodes
# raise it again at once instead of spending seconds on failing again.
_compiled_decode_hidden = None


def compiled_decoding_failure():
    """Why compiling generation's one-token steps (generate(compile=True)) failed in this process, one line; None
    if it has not failed. Once it has, generate does not try again."""
    return _compiled_decode_hidden if isinstance(_compiled_decode_hidden, str) else None


class CompiledDecode:
    """GPT.decode_step on a CPU, compiled by inductor up to the head (decode_hidden), for generate(compile=True).

    A one-token step of a small model on a CPU is ~170 small operations; eager, each costs microseconds of
    fixed overhead, and each of the 32 small matmuls 15-25 us where the arithmetic is ~5. Compiled, the blocks
    are fused C++ loops, the matmuls vectorised loops over the weights (rows_linear), one call a token; the
    cache's length is a dynamic dimension, so one compilation serves every position. Another batch size, dtype
    or model shape compiles again; torch allows 8 compilations of one function per process (its recompile
    limit), after which compiling fails and generation runs eagerly. The head stays a oneDNN-packed matmul
    (GPT.packed_head). Default model, 2 CPU threads: compiling takes ~16 s the first time and ~3 s once
    inductor's on-disk cache holds it; then generate makes a bf16 token in ~0.9 ms against ~1.7 eager, fp32 in
    1.6 against 2.2 (bench/NOTES.md, seventh pass). The cache must be in the matmul dtype, the model's weights
    in fp32. Build it right after the cache, before the prompt fills it: the warm-up step (which compiles)
    writes there.
    """

    @torch.no_grad()
    def __init__(self, model, cache, dtype, batch_size, head):
        global _compiled_decode_hidden
        if cache.capacity < 2:
            raise ValueError("a context of one position has no one-token steps")
        if isinstance(_compiled_decode_hidden, str):
            raise RuntimeError(f"compiling failed earlier in this process: {_compiled_decode_hidden}")
        if _compiled_decode_hidden is None:
            _compiled_decode_hidden = torch.compile(decode_hidden, dynamic=False, fullgraph=True)
        self.model, self.cache, self.head = model, cache, head
        per_block = [dict(b.named_parameters()) for b in model.transformer.h]
        self.blocks = [None if name not in per_block[0]  # a bias of a model without biases
                       else torch.stack([p[name].detach().to(torch.float32 if name.startswith("ln_") else dtype)
                                         for p in per_block])
                       for name in DECODE_WEIGHTS]
        # The step's inputs keep their strides from call to call (a token id of another stride would compile again).
        self.idx = torch.zeros(batch_size, 1, dtype=torch.long)
        self.position = torch.zeros(1, dtype=torch.long)
        # A warm-up step compiles here, not mid-generation, at position 1: at 0 the cache's length would be 1,
        # which torch specialises instead of keeping it dynamic. The prompt's pass overwrites what it writes.
        cache.k[:, :, :, :2].zero_()
        cache.v[:, :, :, :2].zero_()
        cache.length = 1
        try:
            self(self.idx)
        except Exception as e:  # compiling failed (no C++ compiler, the recompile limit, ...): not again
            _compiled_decode_hidden = one_line(e)
            raise
        finally:
            cache.length = 0

    @torch.no_grad()
    def __call__(self, idx):
        """decode_step(idx, cache, ...): the logits (B, V)."""
        model, cache, config = self.model, self.cache, self.model.config
        cache.check_room()
        k, v = cache.k[:, :, :, :cache.length + 1], cache.v[:, :, :, :cache.length + 1]
        torch._dynamo.mark_dynamic(k, 3)  # torch._dynamo: imported by torch.compile
        torch._dynamo.mark_dynamic(v, 3)
        self.idx.copy_(idx)
        self.position.fill_(cache.length)
        ln_f = model.transformer.ln_f
        with torch.autocast("cpu", enabled=False):  # every dtype here is explicit
            x = _compiled_decode_hidden(self.idx, self.position, k, v, model.transformer.wte.weight,
                                        model.transformer.wpe.weight, self.blocks, ln_f.weight, ln_f.bias,
                                        config.n_head, config.layer_norm_epsilon)
            cache.length += 1
            return self.head(x)[:, :config.vocab_size]


# Rows per chunk of the chunked loss: 128 rows of the padded GPT-2 vocabulary are 26 MB of fp32 logits.
LOSS_CHUNK_ROWS = 128
# Evaluation keeps no activations for a backward pass, so its chunks can be larger (1024 rows: 206 MB of fp32
# logits): fewer, larger matmuls, and 8x fewer kernel launches on a GPU.
EVAL_CHUNK_ROWS = 1024
# Compiled CPU training, where inductor fuses each chunk's loss and gradient into one pass per row. Under bf16,
# chunks of 1024 rows (103 MB of logits) take ~2.7% off the mean time of a default step against one chunk of all
# 4,096 rows (the median about the same: fewer slow steps), with 160 MB less memory, fewer fresh pages to fault
# in and zero each step; in fp32, where the step is its matmuls', one chunk of all rows is 1.6% faster
# (bench/NOTES.md, sixth pass).
COMPILED_BF16_LOSS_CHUNK_ROWS = 1024


def _rows_cross_entropy(logits, targets, vocab_size, grads):
    """Per-row cross-entropy of logits (rows, Vp) in the matmul dtype, columns from vocab_size on padding,
    against targets (rows, 1) (no -1 here), computed in fp32; with grads also softmax - onehot (rows, Vp),
    zero on the padding, fp32. Two formulations of the same sums: eager runs few, in-place passes over the
    chunk; under torch.compile inductor fuses each line into one pass per row while the row is in cache
    (the eager one there would materialise an fp32 log-softmax: ~1.7x slower, bench/NOTES.md)."""
    if torch.compiler.is_compiling():
        x = logits[:, :vocab_size].float()
        m = x.amax(dim=-1, keepdim=True)
        lse = (x - m).exp().sum(dim=-1, keepdim=True).log() + m
        col = torch.arange(logits.size(1), device=logits.device)
        g = torch.where(col < vocab_size, (logits.float() - lse).exp() - (col == targets).float(), 0.0)
        return lse - x.gather(1, targets), (g if grads else None)
    x = logits.float()
    x[:, vocab_size:] = float("-inf")  # padded columns never win
    logp = x.log_softmax(dim=-1)
    loss = -logp.gather(1, targets)
    return loss, (logp.exp_().scatter_add_(1, targets, logp.new_full(targets.shape, -1.0)) if grads else None)


def chunked_cross_entropy(h, weight, targets, vocab_size, dtype, chunk_rows, grads=False):
    """Mean cross-entropy of h @ weight.T against targets (-1 = ignore), over chunks of chunk_rows rows, so
    the (N, V) logits, their fp32 copy and log-softmax never exist at full size. h (N, C), weight (Vp, C)
    with columns from vocab_size on padding, targets (N,); matmuls in dtype, the rest fp32.

    Returns the loss, and with grads=True also its gradients (dh, dw), formed chunk by chunk as
    softmax - onehot. Evaluation (no grads) uses it as it is: its memory is a chunk's, not the batch's."""
    w = weight.to(dtype)
    n = (targets != -1).sum()
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    dh = []
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads else None
    for s in range(0, h.size(0), chunk_rows):
        hc, tc = h[s:s + chunk_rows].to(dtype), targets[s:s + chunk_rows]
        scale = ((tc != -1) / n)[:, None]  # (rows, 1): d(mean loss) / d(row loss)
        row_loss, g = _rows_cross_entropy(mm_nt(hc, w), tc.clamp(min=0)[:, None], vocab_size, grads)
        loss += (row_loss * scale).sum()
        if grads:
            g = g.to(dtype)
            # The row scale is applied to the (rows, C) factors rather than to the (rows, Vp) g.
            dh.append(mm_nt(g, w.t()) * scale)
            dw += mm_tn(g, (hc * scale).to(dtype))
    if not grads:
        return loss
    return loss, torch.cat(dh).to(h.dtype), dw.to(weight.dtype)


class LinearCrossEntropy(torch.autograd.Function):
    """chunked_cross_entropy as an autograd function: the gradients are computed in forward and scaled in
    backward.

    For training in fp32 or bf16 only: under fp16 the gradients formed here, before GradScaler's factor,
    could underflow. Eager steps use chunks of LOSS_CHUNK_ROWS; compiled CPU steps larger ones (_loss_without_logits).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size, dtype, chunk_rows):
        loss, dh, dw = chunked_cross_entropy(h, weight, targets, vocab_size, dtype, chunk_rows, grads=True)
        ctx.save_for_backward(dh, dw)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        dh, dw = ctx.saved_tensors
        return dh * grad_output, dw * grad_output, None, None, None, None


# Compiled CPU training computes causal attention in blocks of this many query rows (blocked_causal_attention),
# up to a context of ATTN_BLOCKED_MAX_T: its backward keeps each block's scores, memory that grows with T^2
# (~0.5 GB for the default model at 8 x 512, ~1.9 GB at 8 x 1024), where the flash kernel keeps O(T).
ATTN_BLOCK_ROWS = 128
ATTN_BLOCKED_MAX_T = 1024


def blocked_causal_attention(q, k, v, rows=ATTN_BLOCK_ROWS):
    """Causal softmax(q k^T / sqrt(hs)) v, (B, nh, T, hs) each, over blocks of `rows` query rows: each block
    attends to the keys up to its own last row, so most of the masked half is never computed. Scores come
    out of the matmul in q's dtype, mask and softmax run in fp32 (or wider), the probabilities go back to v's
    dtype (as the CPU flash kernel does). Under torch.compile on a CPU, where inductor fuses each block's mask and
    softmax between its two matmuls, forward + backward take about half the time of SDPA's CPU flash kernel
    in bf16 at head size 32 (bench/NOTES.md)."""
    T, scale = q.size(-2), q.size(-1) ** -0.5
    outs = []
    for s0 in range(0, T, rows):
        e = min(s0 + rows, T)
        scores = q[..., s0:e, :] @ k[..., :e, :].transpose(-1, -2)
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale  # bf16 -> fp32, fp64 stays
        # The mask as a comparison of positions, not a stored (rows, e) tensor: inductor then fuses mask, max,
        # exp, sum and division into one pass per row (a tril mask tensor split it in two passes and was
        # kept for backward): 1.35x faster forward + backward, bit-identical.
        row = torch.arange(s0, e, device=q.device)[:, None]
        col = torch.arange(e, device=q.device)
        probs = torch.where(col <= row, scores, float("-inf")).softmax(dim=-1).to(v.dtype)
        outs.append(probs @ v[..., :e, :])
    return torch.cat(outs, dim=-2)


GELU_2U = 2 * math.sqrt(2 / math.pi)


def gelu_tanh(x):
    """GELU in its tanh approximation, which GPT-2 uses (HF calls it "gelu_new"): 0.5 x (1 + tanh(u)) with
    u = sqrt(2 / pi) (x + 0.044715 x^3). Compiled for a CPU it is written as x * sigmoid(2u), the same function:
    inductor's vectorised sigmoid (an exp) is ~2.8x faster than its tanh there (a (4096, 1024) bf16 tensor on 2
    threads: 0.92 vs 2.6 ms) and, in bf16, closer to the exact value (outputs other than the float64 value
    rounded to bf16, for inputs 3 * randn: 1.2% against 6.7%). Elsewhere F.gelu, one fused kernel."""
    if not (torch.compiler.is_compiling() and x.device.type == "cpu"):
        return F.gelu(x, approximate="tanh")
    xf = x.float()
    return (xf * torch.sigmoid(GELU_2U * (xf + 0.044715 * xf * xf * xf))).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        causal = True
        if cache is not None:
            start = cache.length
            cache.k[layer, :, :, start:start + T] = k
            cache.v[layer, :, :, start:start + T] = v
            # The cache may hold fp32 (decode_step's attention runs in fp32): read it in q's dtype.
            k = cache.k[layer, :, :, :start + T].to(q.dtype)
            v = cache.v[layer, :, :, :start + T].to(q.dtype)
            # One new token attends to every cached position; a prompt starts at position 0.
            causal = T > 1
            if causal and start:
                raise ValueError("a multi-token step must start at cache position 0")
        dropout = self.dropout if self.training else 0.0
        if (cache is None and not dropout and T <= ATTN_BLOCKED_MAX_T and q.device.type == "cpu"
                and torch.compiler.is_compiling()):
            y = blocked_causal_attention(q, k, v, ATTN_BLOCK_ROWS)  # faster than flash once inductor fuses it
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.n_inner, bias=config.bias)
        self.c_proj = Linear(config.n_inner, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(gelu_tanh(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.padded_vocab = -(-config.vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(self.padded_vocab, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = Linear(config.n_embd, self.padded_vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) (two per block).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        with torch.no_grad():
            self.transformer.wte.weight[config.vocab_size:].zero_()
        self._register_state_dict_hook(_unpad_vocab)
        self._register_load_state_dict_pre_hook(self._pad_vocab)
        # With return_logits=False, training steps (eager; compiled on a CPU) and eager evaluation use the
        # chunked loss (_loss_without_logits); False: always the plain path.
        self.chunked_loss = True

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _pad_vocab(self, state_dict, prefix, *args):
        # Checkpoints hold exactly vocab_size rows; grow them to the internal padded size.
        for key in (prefix + "transformer.wte.weight", prefix + "lm_head.weight"):
            w = state_dict.get(key)
            if w is not None and w.shape[0] == self.config.vocab_size < self.padded_vocab:
                state_dict[key] = torch.cat([w, w.new_zeros(self.padded_vocab - w.shape[0], w.shape[1])])

    def num_params(self, non_embedding=False):
        """Parameters of the model as exported (tied head counted once, vocab unpadded).

        non_embedding=True leaves out the token and position embeddings, the figure scaling laws use.
        """
        n = sum(p.numel() for p in self.parameters())
        n -= (self.padded_vocab - self.config.vocab_size) * self.config.n_embd
        if non_embedding:
            n -= self.config.vocab_size * self.config.n_embd + self.transformer.wpe.weight.numel()
        return n

    def embed(self, idx, start=0):
        """Token plus position embeddings of idx (B, T) at positions start.. (kept out of torch.compile: see
        before_compile)."""
        pos = torch.arange(start, start + idx.size(1), dtype=torch.long, device=idx.device)
        return self.transformer.wte(idx) + self.transformer.wpe(pos)

    def before_compile(self):
        """Called by hardware.compile_or_eager before torch.compile: the embedding lookup stays eager.
        Inductor's embedding backward adds the rows' gradients with atomics, in an order that changes from run
        to run, so a compiled run would not repeat itself to the bit (nor a resumed one match an uninterrupted
        one); the eager backward is deterministic and costs next to nothing here. (Done here rather than with a
        decorator, which would import torch._dynamo, ~1 s, wherever model.py is imported.)"""
        if not getattr(self.embed, "_eager_only", False):
            self.embed = torch.compiler.disable(self.embed)
            self.embed._eager_only = True

    def forward(self, idx, targets=None, all_logits=False, cache=None, return_logits=True):
        """idx: (B, T) token ids. Returns (logits, loss).

        With targets (B, T) (-1 = ignore), logits are for every position and loss is the mean
        cross-entropy. Without, logits are for the last position only, (B, 1, V), unless all_logits.
        return_logits=False returns (None, loss): a training step that needs only the loss then never
        materialises the (B, T, V) logits as an output, which under torch.compile saves writing them
        and a zero gradient of that size in backward (about 12% of a compiled CPU step).
        The loss then comes from chunked_cross_entropy (see _loss_without_logits): not compiling, it never
        holds the full logits, in training through LinearCrossEntropy (fp32, bf16), in evaluation (no grad)
        directly (any dtype); compiled CPU training uses it in larger chunks, fused by inductor.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.n_positions:
            raise ValueError(f"sequence of {start + T} tokens is longer than the context "
                             f"n_positions={self.config.n_positions}")
        x = self.transformer.drop(self.embed(idx, start))
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.length += T
        V = self.config.vocab_size
        if targets is not None and not return_logits and self.chunked_loss:
            loss = self._loss_without_logits(x, targets)
            if loss is not None:
                return None, loss
        if targets is None and not all_logits:
            x = x[:, [-1], :]
        logits = self.lm_head(x)[..., :V]  # the padded columns are never seen
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1), ignore_index=-1)
        return (logits if return_logits else None), loss

    def _loss_without_logits(self, x, targets):
        """The loss of x (B, T, C) computed by chunked_cross_entropy where that is the faster path, else None
        (the plain path: logits, then cross-entropy)."""
        compiling = torch.compiler.is_compiling()
        if compiling and (x.device.type != "cpu" or not torch.is_grad_enabled()):
            return None  # measured on CPUs only; compiled evaluation keeps inductor's fused plain path
        dtype = matmul_dtype(x)
        args = (x.view(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1), self.config.vocab_size, dtype)
        if not torch.is_grad_enabled():  # evaluation: the loss alone, in a chunk's memory
            return chunked_cross_entropy(*args, EVAL_CHUNK_ROWS)
        # Not under fp16: its gradients there would be formed before GradScaler's factor is applied (in
        # backward), so small ones would underflow; the plain path scales first.
        if dtype == torch.float16:
            return None
        # Compiled (CPU): chunks that inductor fuses into one pass over the logits each (the plain path reads
        # them twice and adds a pass over them for nll_loss's backward): 4-6% off a CPU step.
        rows = LOSS_CHUNK_ROWS
        if compiling:
            rows = COMPILED_BF16_LOSS_CHUNK_ROWS if dtype == torch.bfloat16 else x.size(0) * x.size(1)
        return LinearCrossEntropy.apply(*args, rows)

    def pack_for_decoding(self, dtype, batch_size):
        """Weights for decode_step: [(c_attn, attn.c_proj, c_fc, mlp.c_proj) per block], lm_head.

        On a CPU: PackedLinears, except the blocks' in fp32 (TransposedLinears); None where oneDNN can't
        pack: a dtype other than float32 and bfloat16, a torch built without oneDNN. Holds a copy of every
        weight. On a CUDA GPU: CastLinears (a copy in bf16 and fp16, the weights themselves in fp32).
        None on other devices.
        """
        device = self.lm_head.weight.device.type
        if device == "cuda" and dtype in (torch.float32, torch.bfloat16, torch.float16):
            return ([tuple(CastLinear(linear, dtype) for linear in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc,
                                                                    b.mlp.c_proj)) for b in self.transformer.h],
                    CastLinear(self.lm_head, dtype))
        lm_head = self.packed_head(dtype, batch_size)
        if lm_head is None:
            return None
        layers = [tuple(TransposedLinear(linear) if dtype == torch.float32 else PackedLinear(linear, dtype, batch_size)
                        for linear in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj))
                  for b in self.transformer.h]
        return layers, lm_head

    def packed_head(self, dtype, batch_size):
        """lm_head as a PackedLinear for one-token steps on a CPU, or None where oneDNN can't pack it: not a CPU,
        a dtype other than float32 and bfloat16, a torch built without oneDNN (or without bf16 in it)."""
        if self.lm_head.weight.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
            return None
        try:
            if not torch.backends.mkldnn.is_available() or (
                    dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
                return None
            lm_head = PackedLinear(self.lm_head, dtype, batch_size)
            lm_head(torch.zeros(batch_size, self.config.n_embd))  # fail here rather than mid-generation
        except (AttributeError, RuntimeError):  # a torch without these (private) oneDNN ops
            return None
        return lm_head

    def decode_step(self, idx, cache, packed, position=None):
        """forward() for one new token per row, idx (B, 1), in eval mode, with pack_for_decoding's weights
        and a float32 cache. Returns the logits (B, V).

        position: None, or a (1,) long tensor on idx's device holding cache.length. The step then has the same
        shapes at every position, as capture in a CUDA graph needs (DecodeGraph): it writes the new keys and
        values with index_copy_ and attends over the whole cache, the positions after the new one masked out
        (their values must be finite: they are multiplied by 0).

        The same operations in the same dtypes as forward() (which autocast would pick), with one
        difference under bf16 autocast beyond the order of additions: attention runs in fp32 over the
        bf16-rounded query, keys and values, where the bf16 flash kernel also rounds the attention
        probabilities to bf16 (more exact here, and about 2x faster for one query). ~1.9 ms per token instead
        of 4.4 (default model, bf16, 1 CPU thread); most of the gain is the packed weights.
        """
        layers, lm_head = packed
        B, C, nh = idx.size(0), self.config.n_embd, self.config.n_head
        cache.check_room()
        pos = cache.length
        with torch.autocast(idx.device.type, enabled=False):  # every dtype here is explicit
            if position is None:
                x = self.transformer.wte(idx[:, 0]) + self.transformer.wpe.weight[pos]  # (B, C)
                keys, mask = slice(None, pos + 1), None
            else:
                x = self.transformer.wte(idx[:, 0]) + self.transformer.wpe(position)
                keys = slice(None, cache.capacity)
                mask = torch.arange(cache.capacity, device=idx.device)[None] <= position  # (1, T)
            for i, (block, (c_attn, attn_proj, c_fc, mlp_proj)) in enumerate(zip(self.transformer.h, layers)):
                qkv = c_attn(block.ln_1(x)).float()  # bf16 values, attended to in fp32
                q, k, v = qkv.view(B, 3, nh, 1, C // nh).unbind(1)  # (B, nh, 1, hs) each
                if position is None:
                    cache.k[i, :, :, pos:pos + 1] = k
                    cache.v[i, :, :, pos:pos + 1] = v
                else:
                    cache.k[i].index_copy_(2, position, k)
                    cache.v[i].index_copy_(2, position, v)
                y = F.scaled_dot_product_attention(q, cache.k[i, :, :, keys], cache.v[i, :, :, keys], attn_mask=mask)
                x = x + attn_proj(y.view(B, C))
                x = x + mlp_proj(gelu_tanh(c_fc(block.ln_2(x))))
            cache.length += 1
            return lm_head(self.transformer.ln_f(x))[:, :self.config.vocab_size]

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        eos_token_id=None, generator=None, vocab_limit=None, compile=False):
        """Yield the next token of each row, (B,), one step at a time, using a KV cache.

        temperature 0 is greedy. Rows that produced eos_token_id keep producing it; the stream ends
        when every row has. Beyond the context the window slides: the cache is rebuilt from the last
        n_positions tokens, which gives exactly what a forward pass over that window gives.
        vocab_limit: draw only ids below it (a tokenizer's size, where the model's vocabulary is larger).
        compile: on a CPU in fp32 or bf16 (autocast or not; float32 weights), one-token steps run CompiledDecode
        (torch.compile: ~16 s at a process's first call with an empty inductor cache, ~3 s when its on-disk
        cache has the step, nothing at later calls in the process; then 1.4-1.8x the tokens/s); where compiling
        fails, a warning and eager steps (compiled_decoding_failure says why). Ignored elsewhere (a CUDA GPU
        replays a CUDA graph) and where no one-token step would run: fewer than PACK_MIN_NEW_TOKENS new tokens, or
        a prompt that fills the context (every token is then a forward pass).
        """
        was_training = self.training
        self.eval()
        try:
            n_ctx = self.config.n_positions
            B, device = idx.size(0), idx.device
            dtype = matmul_dtype(self.transformer.wte.weight)
            # One-token steps: CompiledDecode, a CUDA graph, or decode_step over weights packed once here, where
            # each is possible; else forward().
            step = None
            prepare = self.prepares_one_token_steps(idx.size(1), max_new_tokens)
            if compile and prepare and self.transformer.wte.weight.dtype == torch.float32:
                head = self.packed_head(dtype, B)  # on a CPU in fp32 or bf16 only
                if head is None and device.type == "cpu":
                    warnings.warn(f"generation runs without torch.compile (its head needs oneDNN in {dtype}, which "
                                  "this PyTorch lacks)", stacklevel=3)
                if head is not None:
                    cache = KVCache(self.config, B, device, dtype, spare=1)
                    step = self._or_eager_steps("torch.compile", cache,
                                                lambda: CompiledDecode(self, cache, dtype, B, head))
            if step is None:
                packed = self.pack_for_decoding(dtype, B) if prepare else None
                cache = KVCache(self.config, B, device, torch.float32 if packed else dtype)
                if packed is not None and device.type == "cuda":
                    step = self._or_eager_steps("a CUDA graph", cache, lambda: DecodeGraph(self, cache, packed, B))
                if packed is not None and step is None:
                    step = functools.partial(self.decode_step, cache=cache, packed=packed)
            done = torch.zeros(B, dtype=torch.bool, device=device)
            tokens = idx
            step_input = idx[:, -n_ctx:]
            for _ in range(max_new_tokens):
                if cache.length + step_input.size(1) > n_ctx:
                    cache.length = 0
                    step_input = tokens[:, -n_ctx:]
                # The prompt's pass is forward(), a one-token prompt's too: at cache length 0 CompiledDecode would
                # compile a second time (torch specialises a dimension of size 1), which costs as much as the first.
                if step is not None and step_input.size(1) == 1 and cache.length > 0:
                    logits = step(step_input)
                else:
                    logits = self(step_input, cache=cache)[0][:, -1, :]
                nxt = sample_next(logits[:, :vocab_limit].float(), temperature, top_k, top_p, generator)
                if eos_token_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                    done |= nxt == eos_token_id
                yield nxt
                if eos_token_id is not None and bool(done.all()):
                    return
                step_input = nxt[:, None]
                tokens = torch.cat([tokens, step_input], dim=1)
        finally:
            self.train(was_training)

    def prepares_one_token_steps(self, prompt_tokens, max_new_tokens):
        """Whether generate prepares its one-token steps (packed weights, a CUDA graph, CompiledDecode) for a prompt
        of prompt_tokens and up to max_new_tokens: for at least PACK_MIN_NEW_TOKENS (preparing costs ~20 ms for the
        default model), and a prompt shorter than the context (else every token is a forward() over the window)."""
        return max_new_tokens >= PACK_MIN_NEW_TOKENS and prompt_tokens < self.config.n_positions

    @staticmethod
    def _or_eager_steps(what, cache, make):
        """make(): a DecodeGraph or CompiledDecode; None (eager one-token steps) where it fails, with a warning
        naming `what` failed: either only saves time."""
        try:
            return make()
        except Exception as e:  # whatever breaks the capture or the compile, the eager steps remain
            cache.length = 0
            warnings.warn(f"generation runs without {what} ({one_line(e)})", stacklevel=4)
            return None

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 eos_token_id=None, generator=None, vocab_limit=None, compile=False):
        """Return idx (B, T) extended by up to max_new_tokens sampled tokens (see generate_stream)."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p,
                                        eos_token_id, generator, vocab_limit, compile))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1)


def _unpad_vocab(module, state_dict, prefix, local_metadata):
    for key in (prefix + "transformer.wte.weight", prefix + "lm_head.weight"):
        if key in state_dict:
            state_dict[key] = state_dict[key][:module.config.vocab_size]
    return state_dict


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row from logits (B, V): greedy at temperature 0, else top-k/top-p sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # From the row's maximum, so that a tiny temperature sends the others to -inf, not the maximum to +inf (NaN).
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    ids = None  # (B, k) token ids of the candidates, sorted likeliest first; None: the whole vocabulary
    if top_k is not None and 0 < top_k < logits.size(-1):
        # Draw among the k candidates only: a multinomial over all V tokens, most of them at
        # probability 0, was the largest per-token cost of sampling.
        logits, ids = torch.topk(logits, top_k)
    if top_p is not None and 0.0 < top_p < 1.0:
        if ids is None:
            logits, ids = torch.sort(logits, descending=True)
        probs = logits.softmax(dim=-1)
        # Drop a token once the mass before it already reaches top_p (the first always stays).
        logits = logits.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float("-inf"))
    choice = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)  # (B, 1)
    return (choice if ids is None else ids.gather(-1, choice)).squeeze(-1)


def _decays(p):
    """Weight decay applies to 2-D weights (matmuls, embeddings), not to biases and LayerNorms."""
    return p.dim() >= 2


def set_weight_decay(optimizer, weight_decay):
    """Set the decayed group's weight decay (a resume applying this run's setting to a loaded optimizer)."""
    for group in optimizer.param_groups:
        group["weight_decay"] = weight_decay if any(_decays(p) for p in group["params"]) else 0.0


def configure_optimizer(model, learning_rate, weight_decay, betas=(0.9, 0.95), eps=1e-8, device_type="cpu"):
    """AdamW with weight decay on 2-D weights only (matmuls, embeddings); none on biases and LayerNorms.

    Uses the fused kernel where this torch has it for the device, else the multi-tensor one.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if _decays(p)], "weight_decay": weight_decay},
        {"params": [p for p in params if not _decays(p)], "weight_decay": 0.0},
    ]
    fast = {"fused": True} if device_type in ("cuda", "cpu", "mps") else {"foreach": True}
    try:
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, **fast)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, foreach=True)
