"""Generate text from a trained model.

    python sample.py --start "The future of AI"             # out/best_model.pt
    python sample.py --checkpoint out/checkpoints/checkpoint_epoch1_step5000.pt --temperature 0
    python sample.py --model_dir out/final_model --start FILE:prompt.txt --num_samples 3
    python sample.py --num_samples 50 --max_new_tokens 500 --compile     # CPU: compiled steps, for long runs

Tokens are printed as they are generated (--no_stream prints each sample when it is complete);
a sample ends at <|endoftext|> or after --max_new_tokens. The speed goes to stderr.
"""

import argparse
import codecs
import sys
import time
from pathlib import Path

from cli import ctrl_c_ends_it, fail, plural, quiet_on_closed_pipe, say as cli_say, tolerant_output

if __name__ == "__main__":
    ctrl_c_ends_it()  # from here on, also while PyTorch loads (seconds)

import torch

import hardware
import export_hf
from checkpoint import DEFAULT_OUT_DIR, CheckpointError
from data import EOT_TOKEN, N_VOCAB, DataError, check_tokenizer_fits, get_tokenizer
from model import PACK_MIN_NEW_TOKENS, compiled_decoding_failure

TEMPERATURE, TOP_K = 0.8, 200  # the defaults here, and what train.py's samples at each evaluation use


class SampleError(Exception):
    """A wrong option or a missing model; one line saying what to do."""


def load_model(checkpoint=None, model_dir=None, out_dir=DEFAULT_OUT_DIR):
    """(the GPT to sample from, of the GPT-2 vocabulary; where it came from): export_hf.load_model's."""
    model, _, source = export_hf.load_model(checkpoint, model_dir, out_dir)
    try:
        check_tokenizer_fits(model.config.vocab_size)
    except DataError as e:
        raise SampleError(f"{e}: sample.py needs a model of the GPT-2 vocabulary") from None
    return model, source


def read_prompt(start):
    """The prompt text: --start itself, or the file named after FILE: without the one line break that ends
    a file saved by an editor (a prompt ending in a line break would make the model start a new line)."""
    if not start.startswith("FILE:"):
        return start
    path = Path(start[len("FILE:"):]).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SampleError(f"cannot read the prompt file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise SampleError(f"the prompt file {path} is not UTF-8 text ({e.reason} at byte {e.start}): save it as "
                          f"UTF-8") from None
    return text.removeprefix("\ufeff").removesuffix("\n")  # a UTF-8 byte-order mark (Notepad's) is no text


def encode_prompt(text, n_positions, say=None):
    """Prompt token ids, (1, T): <|endoftext|> alone for an empty prompt (an unconditional sample);
    a prompt longer than the context keeps its last n_positions tokens, with a note (to stderr, or to `say`)."""
    ids = get_tokenizer().encode(text, allowed_special="all") or [EOT_TOKEN]
    if len(ids) > n_positions:
        note = (f"note: the prompt is {len(ids)} tokens, longer than the model's context "
                f"(n_positions={n_positions}); keeping its last {n_positions} tokens")
        (say or cli_say)(note)
        ids = ids[-n_positions:]
    return torch.tensor([ids])


def sample(model, idx, out, stream=True, **gen_kwargs):
    """Generate one sample after prompt idx (1, T) and write prompt + continuation to `out`.

    Streaming decodes incrementally: a character split across tokens is written once its bytes are complete.
    Returns the number of tokens generated.
    """
    enc = get_tokenizer()
    prompt = idx[0].tolist()
    prompt = [] if prompt == [EOT_TOKEN] else prompt  # an unconditional sample shows no prompt
    new = []
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    if stream:
        out.write(enc.decode(prompt))
        out.flush()
    n = 0
    # A vocabulary larger than the tokenizer's has ids nothing decodes: never drawn.
    for tok in model.generate_stream(idx, eos_token_id=EOT_TOKEN, vocab_limit=N_VOCAB, **gen_kwargs):
        n += 1
        t = tok.item()
        if t == EOT_TOKEN:
            break
        new.append(t)
        if stream:
            out.write(utf8.decode(enc.decode_single_token_bytes(t)))
            out.flush()
    out.write((utf8.decode(b"", final=True) if stream else enc.decode(prompt + new)) + "\n")
    out.flush()
    return n


def parse_args(argv):
    p = argparse.ArgumentParser(description="Generate text from a trained GPT (a checkpoint or a HuggingFace folder).")
    p.add_argument("--start", default="", help='prompt text, or FILE:path to read it from a file '
                                               '("" = unconditional, from <|endoftext|>)')
    export_hf.add_model_args(p)
    p.add_argument("--num_samples", type=int, default=1, help="samples to draw, one after the other")
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate per sample at most")
    p.add_argument("--temperature", type=float, default=TEMPERATURE, help="0 = greedy; higher = more random")
    p.add_argument("--top_k", type=int, default=TOP_K, help="sample from the k likeliest tokens only (0 = all)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling: the smallest set with this mass")
    p.add_argument("--seed", type=int, default=1337, help="seed of the sampling generator")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cuda, cuda:N, mps or cpu")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (autocast)")
    p.add_argument("--no_stream", action="store_true", help="print each sample when complete, not token by token")
    p.add_argument("--compile", action="store_true",
                   help="on a CPU, compile generation's one-token steps (~16 s the first time, ~3 s later; "
                        "then 1.4-1.8x the tokens/s): for long or many samples")
    p.error = fail
    args = p.parse_args(argv)
    for name, ok, rule in (("num_samples", args.num_samples >= 1, ">= 1"),
                           ("max_new_tokens", args.max_new_tokens >= 1, ">= 1"),
                           ("temperature", args.temperature >= 0, ">= 0"),
                           ("top_k", args.top_k >= 0, ">= 0"),
                           ("top_p", 0 < args.top_p <= 1, "in (0, 1]"),
                           ("seed", -2**63 <= args.seed < 2**64, "a 64-bit integer")):
        if not ok:
            raise SampleError(f"--{name} must be {rule}, got {getattr(args, name)}")
    return args


def main(argv=None):
    try:
        args = parse_args(argv)
        facts, plan = hardware.inference_plan(args.device, args.dtype, compile=args.compile)
        model, source = load_model(args.checkpoint, args.model_dir, args.out_dir)
        model.to(plan.device).eval()
        prompt = read_prompt(args.start)
        n_ctx = model.config.n_positions
        idx = encode_prompt(prompt, n_ctx).to(plan.device)
        beyond = min(args.max_new_tokens, idx.size(1) + args.max_new_tokens - n_ctx)
        if not model.prepares_one_token_steps(idx.size(1), args.max_new_tokens):
            plan = hardware.without_steps_to_compile(plan, PACK_MIN_NEW_TOKENS)
        if beyond > 0:
            print(f"note: up to {beyond} of the new tokens lie beyond the model's context (n_positions={n_ctx}): "
                  f"each of those recomputes the last {n_ctx} tokens (exact, but slower per token)", file=sys.stderr)
    except (SampleError, CheckpointError, export_hf.ExportError, hardware.HardwareError, ValueError) as e:
        fail(str(e))
    print(f"model: {source}", file=sys.stderr)  # (the default, the best model, is not the newest weights)
    print(hardware.describe(facts, plan), file=sys.stderr)
    generator = torch.Generator(device=plan.device).manual_seed(args.seed)
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k or None, top_p=args.top_p, generator=generator, compile=plan.compile)
    # Compile before the timed samples (their speed is then generation's own), where the samples would use it.
    if plan.compile:
        t0 = time.perf_counter()
        with hardware.autocast(plan.device, plan.dtype):
            model.generate(idx, PACK_MIN_NEW_TOKENS, temperature=0, compile=True)  # greedy: no random draws
        if compiled_decoding_failure() is None:
            print(f"compile: a first generation call, which compiles the steps, took "
                  f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
        else:  # it warned why; the samples run uncompiled, without warning again
            gen_kwargs["compile"] = False
    n_tokens, t0 = 0, time.perf_counter()
    with hardware.autocast(plan.device, plan.dtype):
        for i in range(args.num_samples):
            if i:
                print("-" * 40, flush=True)
            n_tokens += sample(model, idx, sys.stdout, stream=not args.no_stream, **gen_kwargs)
    elapsed = time.perf_counter() - t0
    print(f"{n_tokens} {plural(n_tokens, 'token')} in {elapsed:.2f} s ({n_tokens / elapsed:.1f} tokens/s)",
          file=sys.stderr)


if __name__ == "__main__":
    tolerant_output(stdout_errors="replace")  # a console that cannot show a generated character shows "?"
    quiet_on_closed_pipe()
    main()
