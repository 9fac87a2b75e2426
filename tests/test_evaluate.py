"""evaluate.py: the sliding window against a brute-force per-token computation, the word count, the CLI."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data import EOT_TOKEN, get_tokenizer
from evaluate import count_words, evaluate, is_wikitext, sliding_window_nll, table, windows
from evaluate import main as evaluate_main
from export_hf import export_hf
from model import GPT, GPTConfig

REPO = Path(__file__).resolve().parent.parent
TINY = GPTConfig(n_positions=16, n_embd=32, n_layer=2, n_head=2, n_inner=64)
CPU = ["--device", "cpu"]
DOCS = ["The cat sat on the mat.\n It was  warm, and the dog slept.", "Zürich is a city\tin Switzerland;",
        "nothing else happened here at all, said the narrator twice."]


def sharp_model():
    """A tiny GPT whose predictions depend strongly on the context (large random weights), so a token
    scored with the wrong context gives a clearly different loss."""
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


def doc_tokens():
    """The DOCS as data.py writes them: EOT between documents, none at the start."""
    enc = get_tokenizer()
    ids = []
    for i, doc in enumerate(DOCS):
        ids += ([EOT_TOKEN] if i else []) + enc.encode_ordinary(doc)
    return np.asarray(ids, dtype=np.uint16)


def brute_force_nll(model, tokens, block_size, stride):
    """Per token, one forward pass over exactly the context the sliding window gives it: target t of the
    stream [EOT] + tokens is scored by the first window (begins at multiples of stride, block_size long)
    that reaches it, so its context is stream[b:t] with b the smallest such multiple >= t - block_size."""
    stream = [EOT_TOKEN] + tokens.tolist()
    total, count = 0.0, 0
    for t in range(1, len(stream)):
        if stream[t] == EOT_TOKEN:
            continue
        b = max(0, math.ceil((t - block_size) / stride)) * stride
        logits, _ = model(torch.tensor([stream[b:t]]))  # (1, 1, V): the last position
        total -= F.log_softmax(logits[0, -1].double(), -1)[stream[t]].item()
        count += 1
    return total, count


@pytest.mark.parametrize("n,block,stride", [(1, 4, 2), (10, 4, 2), (10, 4, 4), (10, 4, 1), (37, 16, 5), (3, 16, 8)])
def test_windows_score_each_token_once_with_enough_context(n, block, stride):
    scored = []
    for begin, first, end in windows(n, block, stride):
        assert end - begin <= block
        scored += range(first, end + 1)
        if begin:  # after the first window, every token sees at least block - stride tokens before it
            assert first - begin >= block - stride
    assert scored == list(range(1, n + 1))


@pytest.mark.parametrize("stride", [1, 3, 8, 16])
def test_sliding_window_equals_brute_force(stride):
    model, tokens = sharp_model(), doc_tokens()
    # batch_size 3: windows are batched and the last ones padded, which must change nothing
    nll, count = sliding_window_nll(model, tokens, 16, stride, batch_size=3)
    want, want_count = brute_force_nll(model, tokens, 16, stride)
    assert count == want_count == int((tokens != EOT_TOKEN).sum())
    assert nll == pytest.approx(want, rel=1e-6)


def test_context_matters_for_this_model():
    # The brute-force check above is only meaningful if the loss depends on the context it is given.
    model, tokens = sharp_model(), doc_tokens()
    full, _ = sliding_window_nll(model, tokens, 16, 1)
    none, _ = sliding_window_nll(model, tokens, 16, 16)
    assert abs(full - none) > 1.0


def test_count_words_is_the_whitespace_split_of_the_text_with_eot_as_a_break():
    tokens = doc_tokens()
    want = len("\n".join(DOCS).split())
    assert count_words(tokens) == want
    for chunk in (1, 2, 3, 7):  # words and multi-byte characters (ü) cut by chunk edges count once
        assert count_words(tokens, chunk=chunk) == want
    # "twice." + EOT + "Next": two words, not one
    enc = get_tokenizer()
    glued = np.asarray(enc.encode_ordinary("end") + [EOT_TOKEN] + enc.encode_ordinary("start"), dtype=np.uint16)
    assert count_words(glued) == 2


def test_word_level_perplexity_is_for_wikitext_only():
    assert is_wikitext("wikitext103") and is_wikitext("wikitext2") and is_wikitext("Salesforce/wikitext")
    assert not is_wikitext("text") and not is_wikitext(None)
    r = evaluate(sharp_model(), doc_tokens(), 16, 8, words=False)
    assert r["words"] is None and r["word_perplexity"] is None


def test_evaluate_reports_word_and_token_perplexity():
    model, tokens = sharp_model(), doc_tokens()
    r = evaluate(model, tokens, 16, 8, batch_size=4)
    nll, count = sliding_window_nll(model, tokens, 16, 8, batch_size=4)
    assert r["tokens"] == count and r["words"] == len("\n".join(DOCS).split())
    assert r["loss"] == pytest.approx(nll / count)
    assert r["perplexity"] == pytest.approx(math.exp(nll / count))
    assert r["word_perplexity"] == pytest.approx(math.exp(nll / r["words"]))


# --- the command line ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """out/best_model.pt (its config names data_dir), out/final_model/, data/{val,test}.bin + meta.json, and a
    newer checkpoint of other weights in out/checkpoints/ (the best is not the newest)."""
    root = tmp_path_factory.mktemp("run")
    data = root / "data"
    data.mkdir()
    tokens = doc_tokens()
    tokens.tofile(data / "test.bin")
    tokens[::-1].copy().tofile(data / "val.bin")
    (data / "meta.json").write_text(json.dumps({"dataset": "wikitext2"}))  # word-level perplexity too
    model = sharp_model()
    (root / "out" / "checkpoints").mkdir(parents=True)
    config = dict(model.config.to_dict(), data_dir=str(data), max_length=12)
    for weights, epoch, step, path in ((model, 1, 42, "best_model.pt"),
                                       (GPT(model.config), 2, 99, "checkpoints/checkpoint_epoch2_step99.pt")):
        torch.save({"format_version": 1, "model_state_dict": weights.state_dict(), "epoch": epoch, "step": step,
                    "config": config}, root / "out" / path)
    export_hf(model, root / "out" / "final_model")
    return root


def run_eval(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, encoding="utf-8", timeout=120,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def test_cli_defaults_to_best_model_its_data_and_its_training_context(run_dir):
    result = run_eval("--json", *CPU, cwd=run_dir)
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    nll, count = sliding_window_nll(sharp_model(), doc_tokens(), 12, 6)
    assert (r["block_size"], r["stride"], r["split"], r["dtype"], r["dataset"]) == (12, 6, "test", "float32",
                                                                                    "wikitext2")
    assert r["tokens"] == count and r["loss"] == pytest.approx(nll / count, rel=1e-6)
    assert "step 42" in r["model"] and r["words"] == len("\n".join(DOCS).split())
    assert r["word_perplexity"] == pytest.approx(math.exp(nll / r["words"]), rel=1e-6)


def test_cli_model_dir_gives_the_same_figures_and_prints_a_table(run_dir):
    common = ["--data_dir", run_dir / "data", "--split", "val", "--block_size", "16", "--stride", "4", *CPU]
    table = run_eval("--model_dir", run_dir / "out" / "final_model", *common)
    as_json = run_eval("--checkpoint", run_dir / "out" / "best_model.pt", "--json", *common)
    assert table.returncode == as_json.returncode == 0, table.stderr + as_json.stderr
    r = json.loads(as_json.stdout)
    lines = dict(line.split(None, 1) if not line.startswith(("tokens scored", "word perplexity")) else
                 line.rsplit(None, 1) for line in table.stdout.splitlines())
    assert float(lines["loss"]) == pytest.approx(r["loss"], abs=1e-4)
    assert float(lines["word perplexity"]) == pytest.approx(r["word_perplexity"], rel=1e-3)
    assert lines["perplexity"].endswith("(token-level)")


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "nowhere.pt"], "nowhere.pt"),
    (["--out_dir", "empty"], "no model at"),
    (["--split", "train"], "has test, val): pick another split"),
    (["--stride", "13"], "--stride must be between 1 and --block_size (12)"),
    (["--block_size", "17"], "exceeds the model's context n_positions=16"),
    (["--checkpoint", "out/best_model.pt", "--model_dir", "out/final_model"], "not allowed with argument"),
    (["--dtype", "float16"], "float16' is not supported on CPU"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_cli_errors_are_one_line(run_dir, args, message, main_in_process):
    if args[0] == "--checkpoint":  # one case through a real process, as a user runs it
        result = run_eval(*CPU, *args, cwd=run_dir)
        code, out, err = result.returncode, result.stdout, result.stderr
    else:
        code, out, err = main_in_process(evaluate_main, [*CPU, *args], run_dir)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and message in err


def test_a_relative_data_dir_from_the_checkpoint_names_its_origin_and_the_fix(tmp_path, run_dir, main_in_process):
    state = torch.load(run_dir / "out" / "best_model.pt", weights_only=True)
    state["config"]["data_dir"] = "bins"  # as `python train.py --data_dir=bins` saved it, elsewhere
    torch.save(state, tmp_path / "best_model.pt")
    code, out, err = main_in_process(evaluate_main, [*CPU, "--checkpoint", str(tmp_path / "best_model.pt")], tmp_path)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert ("error: no folder bins: that data_dir is the one the model was trained on, relative to the folder train.py "
            "ran in, as its checkpoint says; give the folder of the bins with --data_dir") in err


def test_checkpoint_with_an_invalid_config_is_one_line(tmp_path):
    model = GPT(GPTConfig(n_positions=16, n_embd=32, n_layer=1, n_head=2, n_inner=64))
    config = dict(model.config.to_dict(), n_head=5)  # 32 is not divisible by 5
    torch.save({"format_version": 1, "model_state_dict": model.state_dict(), "config": config, "epoch": 1, "step": 1},
               tmp_path / "bad.pt")
    result = run_eval("--checkpoint", tmp_path / "bad.pt", *CPU, cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "holds an invalid model config: GPTConfig.n_embd (32) must be divisible by n_head (5)" in result.stderr


def _thp_available():
    try:
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not _thp_available(), reason="no transparent huge pages on this kernel")
@pytest.mark.parametrize("script", ["evaluate", "train"])
def test_big_cpu_tensors_get_huge_pages(script):
    # A batch's logits are hundreds of MB: with 4 KB pages the kernel takes one fault per page each
    # time such a tensor is made; evaluate.py and train.py ask torch for huge pages before importing it.
    code = f"""
import resource, {script}, torch
torch.ones(64 * 2**20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    torch.ones(64 * 2**20)  # 256 MB
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=Path(__file__).resolve().parent.parent)
    pages_4k = 3 * 256 * 2**20 // 4096
    assert int(out.stdout) < pages_4k // 10


@pytest.mark.parametrize("moment", ["torch", "model"])
def test_ctrl_c_while_it_starts_ends_it_in_one_line(run_dir, moment, interrupted_at):
    p = interrupted_at(REPO / "evaluate.py", moment, "--out_dir", run_dir / "out", cwd=run_dir)
    assert (p.returncode, p.stderr, p.stdout) == (130, "\ninterrupted\n", "")


def test_a_diverged_models_perplexity_is_capped_not_a_traceback():
    """Weights blown up (finite): a loss in the thousands, whose exp() overflows a float. The figures stay numbers
    (capped at exp(50), as train.py's records are) and the table says "over"."""
    model = sharp_model()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(1e4)
    r = evaluate(model, doc_tokens(), 16, 8)
    assert r["loss"] > 1000 and r["perplexity"] == r["word_perplexity"] == math.exp(50)
    json.dumps(r, allow_nan=False)
    lines = table({**r, "model": "m", "data": "d", "dataset": "wikitext2", "block_size": 16, "stride": 8,
                   "dtype": "float32", "device": "cpu", "elapsed_s": 1.0}).splitlines()
    assert "perplexity      over 5.18e+21 (exp(50)) (token-level)" in lines
    assert "word perplexity over 5.18e+21 (exp(50))" in lines
