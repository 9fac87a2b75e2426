"""sample.py on tiny checkpoints made here: as a real subprocess where a process matters (a start, Ctrl-C, compiling),
else its main in the test's process."""

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import in_process
from data import EOT_TOKEN, get_tokenizer
from export_hf import export_hf
from model import GPT, GPTConfig
from sample import main as sample_main, sample

REPO = Path(__file__).resolve().parent.parent
TINY = GPTConfig(n_positions=32, n_embd=32, n_layer=2, n_head=2, n_inner=64)
CPU = ["--device", "cpu", "--dtype", "float32"]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(TINY).eval()


def save_checkpoint(model, path, step=10):
    """A checkpoint with the keys train.py writes and sample.py reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format_version": 1, "model_state_dict": model.state_dict(), "epoch": 1, "step": step,
                "config": dict(model.config.to_dict(), out_dir=str(path.parent))}, path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as train.py leaves it: out/best_model.pt, out/final_model/, and a newer checkpoint of other
    weights in out/checkpoints/ (the best is not the newest)."""
    root = tmp_path_factory.mktemp("run")
    model = tiny_model()
    save_checkpoint(model, root / "out" / "best_model.pt")
    save_checkpoint(tiny_model(seed=3), root / "out" / "checkpoints" / "checkpoint_epoch1_step99.pt", step=99)
    export_hf(model, root / "out" / "final_model")
    return root


def run_sample(*args, cwd=REPO, env=None, process=False):
    """`python sample.py *args` from cwd: a CompletedProcess. A real process where the test sets environment
    variables (env) or asks for one (process); otherwise sample's main in this process (conftest's in_process)."""
    cmd = [sys.executable, str(REPO / "sample.py"), *map(str, args)]
    if env or process:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, encoding="utf-8", timeout=120,
                              env={**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})})
    code, out, err, _ = in_process(sample_main, cmd[2:], cwd)
    return subprocess.CompletedProcess(cmd, code or 0, out, err)


def greedy_text(model, prompt, n):
    idx = torch.tensor([get_tokenizer().encode(prompt)])
    out = model.generate(idx, n, temperature=0, eos_token_id=EOT_TOKEN)[0].tolist()
    return get_tokenizer().decode([t for t in out if t != EOT_TOKEN])


def test_default_is_best_model_of_out_dir(run_dir):
    result = run_sample("--start", "The future of AI", "--temperature", "0", "--max_new_tokens", "20", *CPU,
                        cwd=run_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout == greedy_text(tiny_model(), "The future of AI", 20) + "\n"
    assert "tokens/s" in result.stderr.splitlines()[-1]
    # Which weights: the best model, not the newest (said, as evaluate.py says it).
    step = torch.load(run_dir / "out" / "best_model.pt", weights_only=True)["step"]
    assert result.stderr.splitlines()[0] == f"model: {Path('out') / 'best_model.pt'} (step {step})", result.stderr


def test_model_dir_and_checkpoint_give_the_same_text(run_dir):
    common = ["--start", "Hello", "--temperature", "0", "--max_new_tokens", "15", *CPU]
    from_hf = run_sample("--model_dir", run_dir / "out" / "final_model", *common)
    from_ckpt = run_sample("--checkpoint", run_dir / "out" / "best_model.pt", *common)
    assert from_hf.returncode == from_ckpt.returncode == 0, from_hf.stderr + from_ckpt.stderr
    assert from_hf.stdout == from_ckpt.stdout == greedy_text(tiny_model(), "Hello", 15) + "\n"
    assert f"model: {run_dir / 'out' / 'final_model'}\n" in from_hf.stderr



@pytest.mark.slow
def test_compile_gives_the_same_greedy_text(run_dir, tmp_path):
    """--compile on a CPU: the one-token steps compiled (the device line says so, and inductor wrote its code to the
    cache folder given here), the eager greedy text."""
    cache = tmp_path / "inductor"
    result = run_sample("--out_dir", run_dir / "out", "--start", "Hello", "--temperature", "0", "--num_samples", "2",
                        "--max_new_tokens", "40", "--compile", *CPU, env={"TORCHINDUCTOR_CACHE_DIR": str(cache)})
    assert result.returncode == 0, result.stderr
    assert "| compile: on (set by compile" in result.stderr and "without torch.compile" not in result.stderr
    assert "compile: a first generation call, which compiles the steps, took" in result.stderr
    assert any(p.suffix == ".so" for p in cache.rglob("*"))
    text = greedy_text(tiny_model(), "Hello", 40)
    assert result.stdout == f"{text}\n{'-' * 40}\n{text}\n"


def test_compile_that_fails_warns_once_and_samples_uncompiled(run_dir, tmp_path):
    """Compiling fails for real (no C++ compiler, an empty inductor cache): one warning saying why, no claim that it
    compiled, and the same greedy text, uncompiled."""
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "CXX": str(tmp_path / "no-such-c++")}
    result = run_sample("--out_dir", run_dir / "out", "--start", "Hello", "--temperature", "0", "--num_samples", "2",
                        "--max_new_tokens", "20", "--compile", *CPU, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("generation runs without torch.compile") == 1 and "C++ compiler" in result.stderr
    assert "which compiles the steps, took" not in result.stderr
    text = greedy_text(tiny_model(), "Hello", 20)
    assert result.stdout == f"{text}\n{'-' * 40}\n{text}\n"


def test_compile_with_no_steps_to_compile_says_off(run_dir, main_in_process):
    """Fewer than 16 new tokens have no one-token steps: --compile compiles nothing, and the device line says so."""
    code, out, err = main_in_process(sample_main, ["--out_dir", str(run_dir / "out"), "--start", "Hello",
                                                   "--temperature", "0", "--max_new_tokens", "10", "--compile", *CPU],
                                     run_dir)
    assert code is None and out == greedy_text(tiny_model(), "Hello", 10) + "\n"
    assert ("| compile: off (--compile: no one-token steps to compile in a sample of fewer than 16 new tokens or "
            "one whose prompt fills the context)") in err, err
    assert "compiles the steps" not in err


def test_prompt_file_without_its_byte_order_mark_and_final_line_break(run_dir, tmp_path):
    (tmp_path / "prompt.txt").write_text("Hello\n", encoding="utf-8-sig")  # as Notepad saves it
    # (a hot temperature with --top_k 1 is greedy all the same: the option reaches the sampler)
    result = run_sample("--out_dir", run_dir / "out", "--start", f"FILE:{tmp_path / 'prompt.txt'}",
                        "--temperature", "3", "--top_k", "1", "--max_new_tokens", "15", *CPU)
    assert result.returncode == 0, result.stderr
    assert result.stdout == greedy_text(tiny_model(), "Hello", 15) + "\n"

def test_latest_rotated_checkpoint(tmp_path):
    save_checkpoint(tiny_model(seed=3), tmp_path / "out" / "checkpoints" / "checkpoint_epoch1_step10.pt")
    result = run_sample("--checkpoint", "latest", "--out_dir", tmp_path / "out", "--start", "Hi",  # top_p: greedy too
                        "--temperature", "3", "--top_p", "1e-6", "--max_new_tokens", "8", *CPU)
    assert result.returncode == 0, result.stderr
    assert result.stdout == greedy_text(tiny_model(seed=3), "Hi", 8) + "\n"


def test_seeded_sampling_is_reproducible_and_streaming_prints_the_same(run_dir):
    # A hot temperature on a random model: many byte tokens that are not whole UTF-8 characters.
    common = ["--out_dir", run_dir / "out", "--temperature", "2.0", "--top_k", "0", "--num_samples", "2",
              "--max_new_tokens", "30", *CPU]
    streamed = run_sample(*common, "--seed", "5")
    whole = run_sample(*common, "--seed", "5", "--no_stream")
    other_seed = run_sample(*common, "--seed", "6", "--no_stream")
    assert streamed.returncode == whole.returncode == other_seed.returncode == 0, streamed.stderr
    assert streamed.stdout == whole.stdout != other_seed.stdout
    assert streamed.stdout.count("-" * 40 + "\n") == 1


def test_stream_writes_token_by_token_without_breaking_characters():
    text = "naïve 🤖 日本語 ok"
    ids = get_tokenizer().encode(text)
    # Some tokens hold part of a character only: the case incremental decoding exists for.
    pieces = [get_tokenizer().decode_single_token_bytes(t) for t in ids]
    assert any(p.decode("utf-8", "replace") != p.decode("utf-8", "ignore") for p in pieces)

    class Replay:
        """Stands in for the model: yields a fixed token sequence, as generate_stream does."""

        def generate_stream(self, idx, **kwargs):
            for t in ids + [EOT_TOKEN, 11]:
                yield torch.tensor([t])

    events = []  # the text written, and None for each flush

    class Recorder(io.StringIO):
        def write(self, s):
            events.append(s)
            return super().write(s)

        def flush(self):
            events.append(None)

    out = Recorder()
    n = sample(Replay(), torch.tensor([[EOT_TOKEN]]), out, stream=True)
    assert out.getvalue() == text + "\n" and n == len(ids) + 1  # stopped at <|endoftext|>
    writes = [w for w in events if w]
    assert len(writes) > 3 and not any("\ufffd" in w for w in writes)
    # Each piece is flushed as it is written (a terminal or a pipe sees the text as it comes).
    assert all(after is None for w, after in zip(events, events[1:]) if w) and events[-1] is None


def test_stops_at_endoftext(tmp_path):
    model = tiny_model()
    with torch.no_grad():  # every position predicts <|endoftext|>: ln_f outputs a constant it matches
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.wte.weight[EOT_TOKEN] = 10.0
    save_checkpoint(model, tmp_path / "best_model.pt")
    result = run_sample("--checkpoint", tmp_path / "best_model.pt", "--start", "Hello", "--max_new_tokens", "50",
                        *CPU)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello\n"
    assert result.stderr.splitlines()[-1].startswith("1 token in")


def test_ids_beyond_the_tokenizer_are_never_drawn(tmp_path):
    """A model of a larger vocabulary (nanoGPT's 50304) has ids no tokenizer decodes: sample.py keeps to 50257."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**dict(TINY.to_dict(), vocab_size=50304))).eval()
    with torch.no_grad():  # id 50300 is every position's likeliest token: ln_f outputs a constant it matches
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.wte.weight[50300] = 10.0
    save_checkpoint(model, tmp_path / "best_model.pt")
    for args in (["--temperature", "0"], ["--top_k", "0", "--temperature", "5"]):
        result = run_sample("--checkpoint", tmp_path / "best_model.pt", "--start", "Hello", "--max_new_tokens", "20",
                            *args, *CPU)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("Hello") and result.stderr.splitlines()[-1].startswith("20 tokens in")


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused(tmp_path):
    # A HuggingFace folder of such a model (export_hf refuses to write one: transformers' save_pretrained would).
    export_hf(GPT(TINY), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "vocab_size": 1000}))
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    weights["transformer.wte.weight"] = weights["transformer.wte.weight"][:1000].contiguous()
    save_file(weights, tmp_path / "hf" / "model.safetensors")
    result = run_sample("--model_dir", tmp_path / "hf", *CPU)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "error: the model's vocabulary has 1000 ids, fewer than the GPT-2 tokenizer's 50257" in result.stderr


def test_prompt_from_file_longer_than_the_context(run_dir, tmp_path):
    text = "".join(f"word{i} " for i in range(40))  # well over 32 tokens
    (tmp_path / "prompt.txt").write_text(text, encoding="utf-8")
    result = run_sample("--out_dir", run_dir / "out", "--start", f"FILE:{tmp_path / 'prompt.txt'}",
                        "--temperature", "0", "--max_new_tokens", "5", *CPU)
    assert result.returncode == 0, result.stderr
    ids = get_tokenizer().encode(text)
    assert f"the prompt is {len(ids)} tokens" in result.stderr and "keeping its last 32 tokens" in result.stderr
    assert "note: up to 5 of the new tokens lie beyond the model's context (n_positions=32)" in result.stderr
    assert result.stdout.startswith(get_tokenizer().decode(ids[-32:]))
    assert not result.stdout.startswith(text)


@pytest.mark.parametrize("args, fragment", [
    ([], "no model at out/best_model.pt: train one with `python train.py`"),
    (["--checkpoint", "nowhere.pt"], "no checkpoint at nowhere.pt"),
    (["--checkpoint", "auto"], "no model at out or out/checkpoints: train one"),
    (["--checkpoint", "latest"], "no model at out or out/checkpoints: train one"),
    (["--model_dir", "nowhere"], "nowhere/config.json not found"),
    (["--start", "FILE:missing.txt", "--out_dir", "{run}/out"], "cannot read the prompt file missing.txt"),
    (["--start", "FILE:latin1.txt", "--out_dir", "{run}/out"], "the prompt file latin1.txt is not UTF-8 text (invalid "
                                                               "continuation byte at byte 3): save it as UTF-8"),
    (["--top_p", "0", "--out_dir", "{run}/out"], "--top_p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--max_new_tokens", "ten"], "argument --max_new_tokens: invalid int value"),
    (["--seed", str(10 ** 23)], "--seed must be a 64-bit integer"),
    (["--out_dir", "{run}/out/final_model"], "/out/final_model is a HuggingFace folder, not a run's folder: give it "
                                             "with --model_dir"),
    (["--out_dir", "{run}/out/best_model.pt"], "/out/best_model.pt is a file, not a run's folder: give a checkpoint "
                                               "file with --checkpoint"),
    (["--checkpoint", "{run}/out/final_model"], "is not a file; give the path of a .pt checkpoint (a HuggingFace "
                                                "folder: train.py takes it as --init_from, sample.py and evaluate.py "
                                                "as --model_dir)"),
])
def test_errors_are_one_line(tmp_path, run_dir, args, fragment, main_in_process):
    args = [a.format(run=run_dir) for a in args]
    (tmp_path / "latin1.txt").write_bytes("Caf\u00e9 au lait".encode("latin-1"))
    if not args:  # one case through a real process, as a user runs it
        result = run_sample(*CPU, cwd=tmp_path, process=True)
        code, out, err = result.returncode, result.stdout, result.stderr
    else:
        code, out, err = main_in_process(sample_main, [*args, *CPU], tmp_path)
    assert code == 2
    assert err.startswith("error: ") and fragment in err, err
    assert err.count("\n") == 1 and out == ""


@pytest.mark.parametrize("moment", ["torch", "model"])
def test_ctrl_c_while_it_starts_ends_it_in_one_line(run_dir, moment, interrupted_at):
    p = interrupted_at(REPO / "sample.py", moment, "--out_dir", run_dir / "out", *CPU, cwd=run_dir)
    assert (p.returncode, p.stderr, p.stdout) == (130, "\ninterrupted\n", "")


def test_ctrl_c_while_it_generates_keeps_the_text_so_far(run_dir):
    p = subprocess.Popen([sys.executable, str(REPO / "sample.py"), "--out_dir", run_dir / "out", *CPU,
                          "--num_samples", "100000"], cwd=run_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(200)  # (returns once 200 bytes of text have streamed out: it is generating)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.decode().endswith("\ninterrupted\n") and "Traceback" not in err.decode()
