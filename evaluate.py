"""Perplexity of a trained model on a whole split, the way papers report it.

    python evaluate.py --split test                                   # out/best_model.pt on its data_dir
    python evaluate.py --checkpoint out/best_model.pt --split test --json
    python evaluate.py --model_dir out/final_model --data_dir data/wikitext103 --split test

Every token of the split is scored once, with real context: windows of `--block_size` tokens slide by
`--stride` (default half the window), and each window scores only the tokens the previous one did not,
so all but the first window's tokens see at least block_size - stride tokens before them. The split is
read as one stream after an <|endoftext|>, so even its first token has a (start-of-text) context.
<|endoftext|> separators between documents are context, never scored: they are not part of the text.

Reported: mean loss (nats per token) and token-level perplexity exp(loss); for WikiText (data.py's
meta.json names it) also word-level perplexity exp(total NLL / words), where words are the
whitespace-separated words of the split's text (decoded from the bin, <|endoftext|> read as a line break;
that text is the raw split, since GPT-2's BPE is lossless). Word-level perplexity is the figure papers quote
for WikiText (GPT-2 117M, zero-shot on WikiText-103: 37.50, measured with the paper's detokenizers, so
not strictly comparable); for code, markup or languages written without spaces it would mean little.
Runs in float32 unless --dtype says otherwise, so results compare across machines.
"""

import argparse
import codecs
import json
import os
import sys
import time
from pathlib import Path

from cli import bar_size, ctrl_c_ends_it, fail, quiet_on_closed_pipe, tolerant_output

if __name__ == "__main__":
    ctrl_c_ends_it()  # from here on, also while PyTorch loads (seconds)

import numpy as np

# Before torch's first allocation: CPU tensors of 2 MB and more get transparent huge pages, so the logits, made
# afresh for every chunk of 1024 rows (100-200 MB), are faulted in 2 MB at a time, not 4 KB: 1.6x faster on CPU,
# measured when each batch's logits were one tensor of 100-800 MB (bench/NOTES.md). train.py asks for the same.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch

import hardware
from checkpoint import CheckpointError
from data import DEFAULT_DATA_DIR, EOT_TOKEN, DataError, get_tokenizer, read_bin
from export_hf import ExportError, add_model_args, load_model
from plot import perplexity, perplexity_text


class EvalError(Exception):
    """A wrong option, model or data folder; one line saying what to do."""


# --- what to evaluate ---------------------------------------------------------------------------

def dataset_name(data_dir):
    """The `dataset` recorded in data_dir/meta.json by data.py, or None."""
    try:
        return json.loads((Path(data_dir) / "meta.json").read_text()).get("dataset")
    except (OSError, ValueError, AttributeError):
        return None


# --- scoring ----------------------------------------------------------------------------------------

def windows(n_tokens, block_size, stride):
    """(begin, first scored, end) for each window over the stream [EOT] + tokens, of length n_tokens + 1.

    A window's inputs are stream[begin:end], its targets stream[begin + 1:end + 1]; it scores the targets
    at stream indices first..end (those the previous window did not reach). Together they score indices
    1..n_tokens, each exactly once.
    """
    out, scored, begin = [], 0, 0
    while scored < n_tokens:
        end = min(begin + block_size, n_tokens)
        out.append((begin, scored + 1, end))
        scored, begin = end, begin + stride
    return out


def check_window(block_size, stride, n_positions):
    """EvalError unless 1 <= stride <= block_size <= n_positions."""
    if block_size > n_positions:
        raise EvalError(f"--block_size {block_size} exceeds the model's context n_positions={n_positions}")
    if not 1 <= stride <= block_size:
        raise EvalError(f"--stride must be between 1 and --block_size ({block_size}), got {stride}")


@torch.no_grad()
def sliding_window_nll(model, tokens, block_size, stride, batch_size=8, device="cpu", dtype="float32",
                       progress=False):
    """(total NLL in nats, tokens scored) of `tokens` (1-D uint16 array) under `model`, sliding windows.

    <|endoftext|> targets are not scored (see the module docstring).
    """
    check_window(block_size, stride, model.config.n_positions)
    from tqdm import tqdm

    model.eval()
    n = len(tokens)
    spans = windows(n, block_size, stride)
    total, count = torch.zeros((), dtype=torch.float64), 0
    with tqdm(total=len(spans), unit="window", disable=None if progress else True, file=sys.stderr,
              **bar_size()) as bar:
        for i in range(0, len(spans), batch_size):
            batch = spans[i:i + batch_size]
            x = np.full((len(batch), block_size), EOT_TOKEN, dtype=np.int64)  # padding after the end: causal,
            y = np.full((len(batch), block_size), -1, dtype=np.int64)  # so it changes nothing before it
            for row, (begin, first, end) in enumerate(batch):
                # stream[j] = EOT for j == 0, else tokens[j - 1]
                x[row, 0] = EOT_TOKEN if begin == 0 else tokens[begin - 1]
                x[row, 1:end - begin] = tokens[begin:end - 1]
                y[row, first - begin - 1:end - begin] = tokens[first - 1:end]
            y[y == EOT_TOKEN] = -1
            n_scored = int((y != -1).sum())
            if n_scored:
                with hardware.autocast(device, dtype):
                    _, loss = model(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), return_logits=False)
                # (the mean over scored targets; float64 on the CPU: MPS has no float64)
                total += loss.detach().cpu().double() * n_scored
                count += n_scored
            bar.update(len(batch))
    return total.item(), count


def count_words(tokens, chunk=1 << 20):
    """Whitespace-separated words of the text `tokens` decode to, <|endoftext|> read as a line break.

    Decoded in chunks, so a split of any size fits in memory; a word cut by a chunk edge counts once.
    """
    enc = get_tokenizer()
    newline = enc.encode_ordinary("\n")[0]
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    words, in_word = 0, False
    for start in range(0, len(tokens), chunk):
        part = np.asarray(tokens[start:start + chunk], dtype=np.int64)
        part[part == EOT_TOKEN] = newline
        text = utf8.decode(enc.decode_bytes(part.tolist()), final=start + chunk >= len(tokens))
        if not text:
            continue
        words += len(text.split()) - (in_word and not text[0].isspace())
        in_word = not text[-1].isspace()
    return words


def is_wikitext(dataset):
    """True for a dataset name that data.py gives WikiText (wikitext103, wikitext2, or an HF 'wikitext')."""
    return "wikitext" in str(dataset or "").lower()


def evaluate(model, tokens, block_size, stride, batch_size=8, device="cpu", dtype="float32", words=True,
             progress=False):
    """The figures for one split: {tokens, loss, perplexity, words, word_perplexity} (the last two None
    unless `words`)."""
    nll, n_scored = sliding_window_nll(model, tokens, block_size, stride, batch_size, device, dtype, progress)
    if n_scored == 0:
        raise EvalError("the split holds no tokens to score (only <|endoftext|>)")
    n_words = count_words(tokens) if words else 0
    # (capped at exp(50), as train.py's records are: a diverged model's loss in the thousands overflows exp())
    return {"tokens": n_scored, "loss": nll / n_scored, "perplexity": perplexity(nll / n_scored),
            "words": n_words or None, "word_perplexity": perplexity(nll / n_words) if n_words else None}


# --- command line -----------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description="Loss and perplexity (token- and word-level) of a trained GPT on a "
                                            "whole data split, with a sliding window.")
    add_model_args(p)
    p.add_argument("--data_dir", help="folder of {split}.bin from data.py (default: the checkpoint's data_dir, "
                                      f"else {DEFAULT_DATA_DIR})")
    p.add_argument("--split", default="test", help="which bin: test, val or train (default test)")
    p.add_argument("--block_size", type=int, help="window length (default: the context the model was trained "
                                                  "with, max_length, else n_positions)")
    p.add_argument("--stride", type=int, help="tokens a window slides by (default: half the window)")
    p.add_argument("--batch_size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cuda, cuda:N, mps or cpu")
    p.add_argument("--dtype", default="float32", help="float32 (default, comparable with papers), bfloat16, "
                                                      "float16 or auto")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.error = fail
    args = p.parse_args(argv)
    for name in ("block_size", "stride", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise EvalError(f"--{name} must be at least 1, got {value}")
    return args


def table(r):
    """The human-readable result: one 'name  value' line each."""
    rows = [("model", r["model"]), ("data", f"{r['data']} ({r['dataset'] or 'dataset unknown'})"),
            ("window", f"{r['block_size']} tokens, stride {r['stride']}, {r['dtype']} on {r['device']}"),
            ("tokens scored", f"{r['tokens']:,}"),
            ("loss", f"{r['loss']:.4f}"),
            ("perplexity", f"{perplexity_text(r['perplexity'])} (token-level)")]
    if r["word_perplexity"] is not None:
        rows += [("words", f"{r['words']:,}"), ("word perplexity", perplexity_text(r["word_perplexity"]))]
    rows.append(("time", f"{r['elapsed_s']:.1f} s"))
    return "\n".join(f"{name:<16}{value}" for name, value in rows)


def main(argv=None):
    try:
        args = parse_args(argv)
        facts, plan = hardware.inference_plan(args.device, args.dtype)
        model, config, source = load_model(args.checkpoint, args.model_dir, args.out_dir)
        model.to(plan.device)
        n_positions = model.config.n_positions
        block_size = args.block_size or min(config.get("max_length", n_positions), n_positions)
        stride = args.stride or max(1, block_size // 2)
        check_window(block_size, stride, n_positions)
        data_dir = args.data_dir or config.get("data_dir") or DEFAULT_DATA_DIR  # (an HF folder records none)
        if not args.data_dir and config.get("data_dir") and not Path(data_dir).is_dir():
            relative = "" if Path(data_dir).is_absolute() else ", relative to the folder train.py ran in,"
            raise EvalError(f"no folder {data_dir}: that data_dir is the one the model was trained on{relative} "
                            f"as its checkpoint says; give the folder of the bins with --data_dir")
        tokens = read_bin(Path(data_dir) / f"{args.split}.bin", model.config.vocab_size)
        dataset = dataset_name(data_dir)
        print(hardware.describe(facts, plan), file=sys.stderr)
        t0 = time.perf_counter()
        result = evaluate(model, tokens, block_size, stride, args.batch_size, plan.device, plan.dtype,
                          words=is_wikitext(dataset), progress=not args.json)
    except (EvalError, CheckpointError, ExportError, DataError, hardware.HardwareError) as e:
        fail(str(e))
    result = {"model": source, "data": str(Path(data_dir) / f"{args.split}.bin"), "split": args.split,
              "dataset": dataset, "block_size": block_size, "stride": stride,
              "device": plan.device, "dtype": plan.dtype, **result,
              "elapsed_s": round(time.perf_counter() - t0, 2)}
    print(json.dumps(result) if args.json else table(result))


if __name__ == "__main__":
    tolerant_output()
    quiet_on_closed_pipe()
    main()
