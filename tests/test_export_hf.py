"""export_hf.py against the real transformers library: weights, generation, tokenizer, CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model, GPT2Tokenizer, GPT2TokenizerFast

import export_hf
from checkpoint import load_checkpoint
from data import EOT_TOKEN, get_tokenizer, gpt2_bpe_files
from export_hf import (ExportError, export_hf as export, from_hf_state_dict, load_checkpoint_model, load_hf,
                       to_hf_state_dict)
from model import GPT, GPTConfig

REPO = Path(__file__).resolve().parent.parent
SMALL = GPTConfig(n_positions=128, n_embd=64, n_layer=2, n_head=4, n_inner=160, dropout=0.1)

# "Using the Trained Model" from the original guide, verbatim; only the folder is ours.
GUIDE_SNIPPET = """\
from transformers import GPT2LMHeadModel, GPT2Tokenizer

# Load model
model = GPT2LMHeadModel.from_pretrained('/kaggle/working/final_model')
tokenizer = GPT2Tokenizer.from_pretrained('/kaggle/working/final_model')

# Generate text
input_ids = tokenizer.encode("The future of AI", return_tensors='pt')
output = model.generate(input_ids, max_length=100)
text = tokenizer.decode(output[0])
print(text)
"""

VARIED_TEXT = ("Hello world! Ünïcödé: naïve café, 日本語のテキスト, emoji 🤖🚀, Ελληνικά.\n"
               "Whitespace   runs\t\ttabs \n\n\n  and trailing spaces   \n"
               "Numbers 3.14159, 1,000,000 and 2024-11-17; it's they'll we've I'm.\n"
               "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # code\n"
               "    if (a && b) || c != d: x += 1;\r\n")


def randomized(config, seed=0):
    """A GPT with every parameter random, biases and LayerNorms included."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.05 * torch.randn_like(p))
        model.transformer.wte.weight[config.vocab_size:].zero_()
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = randomized(SMALL)
    folder = tmp_path_factory.mktemp("export") / "final_model"
    export(model, folder)
    return model, folder


def run_cli(*args):
    return subprocess.run([sys.executable, "export_hf.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def write_checkpoint(path, model, **extra):
    """A checkpoint as train.py writes it (model weights plus the full training config)."""
    config = dict(model.config.to_dict(), learning_rate=5e-4, batch_size=8, out_dir="out")
    torch.save({"format_version": 1, "model_state_dict": model.state_dict(), "config": config, "epoch": 1,
                "step": 10, "train_loss": 3.0, "val_loss": 3.1, **extra}, path)


# --- the folder

def test_folder_holds_config_weights_and_tokenizer(exported):
    model, folder = exported
    assert {p.name for p in folder.iterdir()} == {
        "config.json", "model.safetensors", "generation_config.json", "vocab.json", "merges.txt",
        "tokenizer_config.json", "special_tokens_map.json"}
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
    assert (config["n_embd"], config["n_layer"], config["n_head"], config["n_inner"]) == (64, 2, 4, 160)
    assert config["n_positions"] == config["n_ctx"] == 128 and config["vocab_size"] == 50257
    assert config["activation_function"] == "gelu_new" and config["tie_word_embeddings"] is True
    assert config["resid_pdrop"] == config["embd_pdrop"] == config["attn_pdrop"] == 0.1
    assert config["bos_token_id"] == config["eos_token_id"] == EOT_TOKEN
    from safetensors.torch import load_file
    weights = load_file(folder / "model.safetensors")
    hf_keys = set(GPT2LMHeadModel(GPT2Config(**{k: config[k] for k in ("n_embd", "n_layer", "n_head")}))
                  .state_dict())
    assert set(weights) == hf_keys - {"lm_head.weight"}  # tied: stored once
    assert weights["transformer.wte.weight"].shape == (50257, 64)  # no padded rows
    assert weights["transformer.h.0.mlp.c_fc.weight"].shape == (64, 160)  # Conv1D: (in, out)
    assert all(w.dtype == torch.float32 for w in weights.values())
    encoder_json, vocab_bpe = gpt2_bpe_files()
    assert (folder / "vocab.json").read_bytes() == encoder_json.read_bytes()
    assert (folder / "merges.txt").read_bytes() == vocab_bpe.read_bytes()
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == 128  # n_positions


def test_hf_greedy_generate_gives_our_tokens(exported):
    model, folder = exported
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    idx = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(0))
    ours = model.generate(idx, 60, temperature=0, eos_token_id=EOT_TOKEN)
    theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=60, do_sample=False)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("cls", [GPT2Tokenizer, GPT2TokenizerFast])
def test_hf_tokenizers_encode_like_ours(exported, cls):
    _, folder = exported
    tok = cls.from_pretrained(folder)
    ids = get_tokenizer().encode(VARIED_TEXT)
    assert tok.encode(VARIED_TEXT) == ids
    assert tok.decode(ids) == VARIED_TEXT
    assert tok.encode("a<|endoftext|>b") == get_tokenizer().encode("a<|endoftext|>b", allowed_special="all")
    assert tok.eos_token_id == tok.bos_token_id == EOT_TOKEN
    assert tok.decode([15496, EOT_TOKEN, 995], skip_special_tokens=True) == "Hello world"


def test_guide_snippet_runs_unchanged(exported, tmp_path):
    model, folder = exported
    script = tmp_path / "guide.py"
    script.write_text(GUIDE_SNIPPET.replace("/kaggle/working/final_model", str(folder)))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    prompt = get_tokenizer().encode("The future of AI")
    ours = model.generate(torch.tensor([prompt]), 100 - len(prompt), temperature=0, eos_token_id=EOT_TOKEN)
    assert result.stdout == get_tokenizer().decode(ours[0].tolist()) + "\n"


# --- HF -> ours -> HF

def random_hf_model(**overrides):
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_positions=32, n_embd=48, n_layer=2, n_head=3, **overrides))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return hf.eval()


def test_round_trip_hf_ours_hf_is_exact(tmp_path):
    hf = random_hf_model()  # n_inner=None: HF means 4 * n_embd
    hf.save_pretrained(tmp_path / "a")
    ours = load_hf(tmp_path / "a")
    assert not ours.training  # as from_pretrained: dropout (0.1 here) off
    assert ours.config == GPTConfig(vocab_size=50257, n_positions=32, n_embd=48, n_layer=2, n_head=3,
                                    n_inner=192, dropout=0.1)
    export(ours, tmp_path / "b")
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "b").eval()
    original, returned = hf.state_dict(), back.state_dict()
    assert original.keys() == returned.keys()
    assert all(torch.equal(original[k], returned[k]) for k in original)
    in_memory = to_hf_state_dict(from_hf_state_dict(original))
    assert all(torch.equal(original[k], in_memory[k]) for k in original)
    idx = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        assert (ours(idx, all_logits=True)[0] - hf(idx).logits).abs().max() < 1e-5


def test_load_hf_reads_bare_gpt2model_weights_from_pytorch_model_bin(tmp_path):
    """The layout of the original gpt2 on the Hub: no `transformer.` prefix, mask buffers, no lm_head."""
    hf = random_hf_model(n_inner=100)
    bare = GPT2Model(hf.config)
    bare.load_state_dict(hf.transformer.state_dict())
    weights = dict(bare.state_dict())
    weights["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    weights["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    (tmp_path / "gpt2").mkdir()
    torch.save(weights, tmp_path / "gpt2" / "pytorch_model.bin")
    hf.config.to_json_file(tmp_path / "gpt2" / "config.json")
    ours = load_hf(tmp_path / "gpt2")
    idx = torch.randint(0, 50257, (1, 32))
    with torch.no_grad():
        assert (ours(idx, all_logits=True)[0] - hf(idx).logits).abs().max() < 1e-5


def test_config_json_may_name_sizes_by_transformers_aliases(tmp_path):
    """transformers reads num_attention_heads, hidden_size, num_hidden_layers and max_position_embeddings in a
    config.json as n_head, n_embd, n_layer and n_positions (GPT2Config.attribute_map): so must we. The head
    count shapes no weight, so a default read in its place would load and give wrong logits."""
    hf = random_hf_model()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    aliased = {alias: config.pop(name) for alias, name in export_hf.HF_ALIASES.items()}
    (tmp_path / "config.json").write_text(json.dumps({**config, **aliased}))
    assert GPT2LMHeadModel.from_pretrained(tmp_path).config.n_head == 3  # what transformers reads
    ours = load_hf(tmp_path)
    assert (ours.config.n_head, ours.config.n_embd, ours.config.n_layer, ours.config.n_positions) == (3, 48, 2, 32)
    idx = torch.randint(0, 50257, (1, 32))
    with torch.no_grad():
        assert (ours(idx, all_logits=True)[0] - hf(idx).logits).abs().max() < 1e-5
    (tmp_path / "config.json").write_text(json.dumps({**config, **aliased, "n_head": 12}))
    with pytest.raises(ExportError, match=r"n_head=12 and num_attention_heads=3 name the same setting"):
        load_hf(tmp_path)


def test_a_hand_written_config_may_name_its_architecture_as_a_string(tmp_path):
    hf = random_hf_model()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": "GPT2LMHeadModel"}))
    assert load_hf(tmp_path).config.n_head == hf.config.n_head


@pytest.mark.parametrize("change, fragment", [
    ({"architectures": ["GPT2ForSequenceClassification"]}, "architectures is 'GPT2ForSequenceClassification', "
                                                            "not a language model"),
    ({"architectures": "GPT2ForSequenceClassification"}, "architectures is 'GPT2ForSequenceClassification', "
                                                          "not a language model"),  # (a hand-written one: a string)
    ({"activation_function": "relu"}, "activation_function 'relu' is not supported"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True is not supported"),
    ({"model_type": "llama"}, "only GPT-2 models"),
])
def test_load_hf_refuses_variants_we_do_not_implement(tmp_path, change, fragment):
    hf = random_hf_model()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ExportError, match=fragment):
        load_hf(tmp_path)


def test_untied_head_is_refused():
    sd = GPT2LMHeadModel(GPT2Config(n_positions=8, n_embd=16, n_layer=1, n_head=2)).state_dict()
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    with pytest.raises(ExportError, match="untied"):
        from_hf_state_dict(sd)


# --- writing the folder

def test_existing_model_folder_is_replaced_and_no_temp_is_left(tmp_path):
    export(randomized(SMALL, seed=1), tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_text("what save_pretrained of the export's tokenizer adds")
    (tmp_path / "m" / ".DS_Store").write_text("what macOS's Finder leaves")
    (tmp_path / "m" / ".ipynb_checkpoints").mkdir()  # what Jupyter leaves where it opened config.json
    (tmp_path / "m" / ".ipynb_checkpoints" / "config-checkpoint.json").write_text("{}")
    model = randomized(SMALL, seed=2)
    export(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted(export_hf.EXPORT_FILES)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert torch.equal(load_hf(tmp_path / "m").transformer.wpe.weight, model.transformer.wpe.weight)


def test_a_compiled_model_exports_its_plain_weights(tmp_path):
    model = randomized(SMALL)
    export(torch.compile(model), tmp_path / "m")  # compiles lazily: nothing runs here
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "m")
    assert torch.equal(hf.transformer.wpe.weight, model.transformer.wpe.weight)


EXPORT_FSIZE_CHILD = """
import resource, signal, sys
from export_hf import ExportError, export_hf
from model import GPT, GPTConfig
model = GPT(GPTConfig(n_positions=128, n_embd=64, n_layer=2, n_head=4, n_inner=160))
# A real failed write: past 1 MiB a write fails with EFBIG (the 13 MB of weights do), as on a full disk.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    export_hf(model, sys.argv[1])
except ExportError as e:
    print(e)
"""


def test_a_failed_export_leaves_the_old_folder_intact(tmp_path):
    """...and a killed export's temp folder (as large as the model) is gone first: the message says free disk space."""
    export(randomized(SMALL, seed=1), tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    ended = subprocess.Popen(["true"])
    ended.wait()
    (tmp_path / f".m.tmp-{ended.pid}-0123abcd").mkdir()
    (tmp_path / f".m.tmp-{ended.pid}-0123abcd" / "model.safetensors").write_bytes(bytes(1000))
    p = subprocess.run([sys.executable, "-c", EXPORT_FSIZE_CHILD, str(tmp_path / "m")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout == f"could not write the export to {tmp_path / 'm'}: File too large; " \
                                             f"{tmp_path / 'm'} is as it was; free disk space\n", (p.stdout, p.stderr)
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_an_export_killed_mid_way_leaves_nothing_behind_after_the_next(tmp_path):
    """kill -9 while the temp folder is being written, then export again: the dead process's temp folder is
    removed (a live writer's is not), and a folder moved aside at a swap goes once the target is back."""
    import signal
    import time
    export(randomized(SMALL, seed=1), tmp_path / "m")
    script = ("import time, export_hf, model\n"
              "real = export_hf.atomic_write_bytes\n"
              "def slow(path, data):\n"
              "    real(path, data)\n"
              "    time.sleep(60)\n"
              "export_hf.atomic_write_bytes = slow\n"
              f"export_hf.export_hf(model.GPT(model.GPTConfig(**{SMALL.to_dict()!r})), {str(tmp_path / 'm')!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 60
    while not list(tmp_path.glob(".m.tmp-*/model.safetensors")):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = list(tmp_path.glob(".m.tmp-*"))
    assert len(killed) == 1
    live = tmp_path / f".m.tmp-{os.getppid()}-0123abcd"  # a writer still running (this test's parent)
    live.mkdir()
    (tmp_path / ".m.old-x1y2z3").mkdir()  # a swap's moved-aside folder
    model = randomized(SMALL, seed=2)
    export(model, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m", live.name])
    assert torch.equal(load_hf(tmp_path / "m").transformer.wpe.weight, model.transformer.wpe.weight)
    # Killed at the swap itself: m moved aside, the new one not yet in place. The next export keeps the moved-aside
    # copy until its own is in place (till then it is the only one), then removes it.
    (tmp_path / ".m.old-a1b2c3").mkdir()
    (tmp_path / "m").rename(tmp_path / ".m.old-a1b2c3" / "m")
    export(model, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m", live.name])


def test_a_folder_that_is_not_a_model_is_never_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "best_model.pt").write_text("precious")
    with pytest.raises(ExportError, match="out holds best_model.pt, which an export does not write: pick a new OUT_DIR"):
        export(randomized(SMALL), tmp_path / "out")
    assert (tmp_path / "out" / "best_model.pt").read_text() == "precious"
    # A clone of a Hub model repository: its config.json does not make .git and the README an export's.
    hub = export(randomized(SMALL, seed=1), tmp_path / "hub")
    (hub / ".git").mkdir()
    (hub / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (hub / "README.md").write_text("# my model")
    with pytest.raises(ExportError, match=r"hub holds \.git, README\.md, which an export does not write"):
        export(randomized(SMALL, seed=2), hub)
    assert (hub / ".git" / "HEAD").exists() and (hub / "README.md").exists()
    # Another model (an older save_pretrained's weights file, which no export writes); a notebook's only copy.
    older, notes = (export(randomized(SMALL, seed=1), tmp_path / name) for name in ("older", "notes"))
    (older / "pytorch_model.bin").write_bytes(b"someone else's weights")
    (notes / ".ipynb_checkpoints").mkdir()
    (notes / ".ipynb_checkpoints" / "analysis-checkpoint.ipynb").write_text("{}")
    for folder, held in ((older, "pytorch_model.bin"), (notes, ".ipynb_checkpoints")):
        with pytest.raises(ExportError, match=rf"{folder.name} holds {held}, which an export does not write"):
            export(randomized(SMALL, seed=2), folder)
    assert (older / "pytorch_model.bin").read_bytes() == b"someone else's weights"
    assert (notes / ".ipynb_checkpoints" / "analysis-checkpoint.ipynb").is_file()
    # Jupyter's copy of an export's file beside a notebook's, or a folder under such a name: kept all the same.
    (notes / ".ipynb_checkpoints" / "config-checkpoint.json").write_text("{}")
    mixed = export(randomized(SMALL, seed=1), tmp_path / "mixed")
    (mixed / ".ipynb_checkpoints" / "config-checkpoint.json").mkdir(parents=True)
    (mixed / ".ipynb_checkpoints" / "config-checkpoint.json" / "draft.ipynb").write_text("{}")
    for folder in (notes, mixed):
        with pytest.raises(ExportError, match=rf"{folder.name} holds \.ipynb_checkpoints, which an export does not"):
            export(randomized(SMALL, seed=2), folder)
    assert (notes / ".ipynb_checkpoints" / "analysis-checkpoint.ipynb").is_file()
    assert (mixed / ".ipynb_checkpoints" / "config-checkpoint.json" / "draft.ipynb").is_file()
    # A folder name that is a glob pattern ("model[v2]" matches "modelv"): another folder's moved-aside copy, its
    # only one, is not taken for this one's.
    (tmp_path / ".modelv.old-a1b2c3" / "modelv").mkdir(parents=True)
    (tmp_path / ".modelv.old-a1b2c3" / "modelv" / "config.json").write_text("{}")
    for seed in (1, 2):  # (the second export finds the first in place, and cleans up beside it)
        export(randomized(SMALL, seed=seed), tmp_path / "model[v2]")
    assert (tmp_path / ".modelv.old-a1b2c3" / "modelv" / "config.json").is_file()
    # The checkpoint to export inside the folder (renamed to a name an export writes): never deleted by its export.
    write_checkpoint(hub / "tokenizer.json", randomized(SMALL, seed=3))
    with pytest.raises(ExportError, match=r"tokenizer.json is in .*hub, which an export replaces whole: pick another "
                                          r"OUT_DIR"):
        export(hub / "tokenizer.json", hub)
    assert load_checkpoint(hub / "tokenizer.json")["step"] == 10
    with pytest.raises(ExportError, match="exists and is not a folder"):
        export(randomized(SMALL), tmp_path / "out" / "best_model.pt")
    with pytest.raises(ExportError, match=r"cannot create .*best_model.pt: .*best_model.pt is a file; pick another OUT_DIR"):
        export(randomized(SMALL), tmp_path / "out" / "best_model.pt" / "hf")


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs sysfs (Linux): a folder that takes no files")
def test_an_export_into_a_read_only_folder_names_that_folder():
    with pytest.raises(ExportError, match=r"^cannot write in /sys: .*; pick another OUT_DIR \(on Kaggle: under "
                                          r"/kaggle/working\)$"):
        export(randomized(SMALL), "/sys/final_model")


def test_an_export_onto_a_full_disk_says_free_disk_space(full_disk):
    """Not "pick another OUT_DIR": on Kaggle /kaggle/working is the right one, and it is full."""
    with pytest.raises(ExportError, match=rf"^cannot write in {full_disk}: No space left on device; free disk space$"):
        export(randomized(SMALL), full_disk / "final_model")


@pytest.mark.parametrize("moment", ["torch", "swap", "swap-twice", "moved", "swapped"])
def test_ctrl_c_ends_an_export_in_one_line_with_a_whole_folder_in_place(tmp_path, moment, interrupted_at):
    """Ctrl-C while PyTorch loads, or between an export's two moves (the old folder moved aside, the new one not yet
    in), also with a second Ctrl-C as the old one is moved back: `interrupted`, the old folder where it was. As the
    new one's move returns, or just after: that one. Nothing is left beside it."""
    old = export(randomized(SMALL, seed=1), tmp_path / "m")
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    model = randomized(SMALL, seed=2)
    write_checkpoint(tmp_path / "best_model.pt", model)
    p = interrupted_at(REPO / "export_hf.py", moment, tmp_path / "best_model.pt", old, cwd=tmp_path)
    assert (p.returncode, p.stderr, p.stdout) == (130, "\ninterrupted\n", "")
    if moment in ("moved", "swapped"):
        assert torch.equal(load_hf(old).transformer.wpe.weight, model.transformer.wpe.weight)
    else:
        assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model.pt", "m"]


FAILING_MOVES_CHILD = """
import sys
import export_hf
from model import GPT, GPTConfig
target = sys.argv[1]
def moves_into_target_fail(event, args):  # the new folder's move, then the old one's move back: a failing disk
    if event == "os.rename" and str(args[1]) == target:
        raise OSError(5, "Input/output error")
sys.addaudithook(moves_into_target_fail)
try:
    export_hf.export_hf(GPT(GPTConfig(n_positions=128, n_embd=64, n_layer=2, n_head=4, n_inner=160)), target)
except export_hf.ExportError as e:
    print(e)
"""


def test_an_old_folder_that_cannot_be_moved_back_is_kept_and_named(tmp_path):
    """Both moves into place fail (the new folder's, then the old one's back): the old export stays whole where it
    was moved aside, and the line says where; nothing deletes it."""
    old = export(randomized(SMALL, seed=1), tmp_path / "m")
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    p = subprocess.run([sys.executable, "-c", FAILING_MOVES_CHILD, str(old)], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    aside = list(tmp_path.glob(".m.old-*/m"))
    assert len(aside) == 1 and not old.exists(), (p.stdout, p.stderr)
    assert p.stdout == (f"could not move {old} back after OSError: [Errno 5] Input/output error (Input/output "
                        f"error): it is whole in {aside[0]}; move that folder back\n"), p.stderr
    assert {p.name: p.read_bytes() for p in aside[0].iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [aside[0].parent.name]  # (no temp folder left)


def test_a_folder_an_export_left_aside_is_named_where_it_is_missing(tmp_path):
    """Killed between its two moves (no clean-up runs), an export leaves the old folder in .NAME.old-*: a load of
    the missing folder says where it is."""
    old = export(randomized(SMALL), tmp_path / "m")
    (tmp_path / ".m.old-a1b2c3").mkdir()
    old.rename(tmp_path / ".m.old-a1b2c3" / "m")
    (tmp_path / ".m.old-zzzzzz").mkdir()  # killed before its move: it holds nothing, and is not named
    with pytest.raises(ExportError, match=rf"^{old} is missing, but an interrupted export left the one before in "
                                          rf"{tmp_path / '.m.old-a1b2c3' / 'm'}: move that folder back to {old}, or "
                                          rf"export again$"):
        load_hf(old)
    old.mkdir()  # a folder there, not an export's: not "missing"
    with pytest.raises(ExportError, match=rf"^{old / 'config.json'} not found: point at a folder written by"):
        load_hf(old)


@pytest.mark.skipif(sys.platform == "win32", reason="Windows moves a read-only folder")
def test_a_read_only_export_folder_is_named_and_left_as_it_was(tmp_path, without_root):
    """Moving a folder changes its '..' entry: a read-only one cannot be moved aside, so it cannot be replaced."""
    old = export(randomized(SMALL, seed=1), tmp_path / "m")
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    write_checkpoint(tmp_path / "best_model.pt", randomized(SMALL, seed=2))
    old.chmod(0o555)
    try:
        p = subprocess.run([*without_root, sys.executable, "export_hf.py", tmp_path / "best_model.pt", old], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    finally:
        old.chmod(0o755)
    assert (p.returncode, p.stderr) == (2, f"error: cannot replace {old}: Permission denied; make it writable, or "
                                           f"pick another OUT_DIR\n")
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model.pt", "m"]


def test_export_into_the_current_folder(tmp_path, monkeypatch):
    export(randomized(SMALL, seed=1), tmp_path / "m")
    monkeypatch.chdir(tmp_path / "m")
    model = randomized(SMALL, seed=2)
    export(model, ".")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert torch.equal(load_hf(tmp_path / "m").transformer.wpe.weight, model.transformer.wpe.weight)


def test_the_cli_does_not_replace_the_folder_it_runs_in(tmp_path, main_in_process):
    """`cd out/final_model && python export_hf.py ../best_model.pt .`: the folder is replaced whole, which would
    leave the shell in the deleted one (empty to `ls`, and from_pretrained('.') failing there)."""
    folder = export(randomized(SMALL, seed=1), tmp_path / "m")
    write_checkpoint(tmp_path / "best_model.pt", randomized(SMALL, seed=2))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for cwd, dst in ((folder, "."), (folder / "sub", "..")):
        cwd.mkdir(exist_ok=True)
        code, out, err = main_in_process(export_hf.main, [str(tmp_path / "best_model.pt"), dst], cwd)
        assert code == 2 and err == (f"error: OUT_DIR {dst} is the folder this command runs in, or holds it, and an "
                                     f"export replaces that folder whole: run it from outside, e.g. from {tmp_path}\n")
    (folder / "sub").rmdir()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_model_smaller_than_the_gpt2_vocabulary_is_not_exported(tmp_path):
    with pytest.raises(ExportError, match="vocabulary has 1000 ids, fewer than the GPT-2 tokenizer's 50257, which the "
                                          r"export ships with it: such a model is not exported \(in train.py: "
                                          r"export_final_model=False\)"):
        export(GPT(GPTConfig(**dict(SMALL.to_dict(), vocab_size=1000))), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_import_never_overwrites_a_file_it_did_not_write(tmp_path, main_in_process):
    """Through export_hf.main in this process (test_cli_export_then_import_round_trip runs --import as a real one)."""
    hf = export(randomized(SMALL), tmp_path / "hf")
    trained = tmp_path / "best_model.pt"
    write_checkpoint(trained, randomized(SMALL, seed=3), optimizer_state_dict={})
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for dst, fragment in ((trained, "is not a checkpoint an import wrote"), (notes, "is not a checkpoint an import"),
                          (hf / "config.json", "is not a checkpoint an import"), (tmp_path, "is a folder")):
        before = dst.read_bytes() if dst.is_file() else None
        code, out, err = main_in_process(export_hf.main, ["--import", str(hf), str(dst)], REPO)  # (no warning)
        assert code == 2 and fragment in err and err.count("\n") == 1, err
        assert before is None or dst.read_bytes() == before
    (tmp_path / "a_file").write_text("")
    code, out, err = main_in_process(export_hf.main, ["--import", str(hf), str(tmp_path / "a_file" / "x.pt")], REPO)
    assert code == 2 and err == (f"error: cannot create {tmp_path / 'a_file'}: {tmp_path / 'a_file'} is a file; "
                                 f"pick another CHECKPOINT path\n")
    # An earlier import's file is replaced (running the same command twice works).
    for _ in range(2):
        code, out, err = main_in_process(export_hf.main, ["--import", str(hf), str(tmp_path / "gpt2.pt")], REPO)
        assert code is None and out.startswith(f"wrote {tmp_path / 'gpt2.pt'} ("), err
    assert load_checkpoint(tmp_path / "gpt2.pt")["step"] == 0


@pytest.mark.parametrize("damage, fragment", [
    ("truncate_safetensors", "model.safetensors is truncated or not a model file"),
    ("empty_safetensors", "model.safetensors is truncated or not a model file"),
    ("truncate_bin", "pytorch_model.bin is truncated or not a model file"),
    ("checkpoint_as_bin", "pytorch_model.bin does not hold a dict of weight tensors (is it one of our checkpoints?"),
    ("config_list", "config.json holds a JSON list, not a GPT-2 config object"),
    ("config_not_utf8", "config.json is not a readable JSON file"),
    ("config_bad_heads", "config.json holds an invalid GPT-2 config: GPTConfig.n_embd (64) must be divisible"),
    ("config_other_width", "model.safetensors disagree (transformer.wte.weight is [50257, 64] there, [50257, 128] in "
                           "the model and 26 more of other shapes): export or download the model again"),
    ("config_fewer_layers", "model.safetensors disagree (12 unexpected (transformer.h.1."),
    ("a_file", "is a file, not a HuggingFace model folder (a .pt checkpoint of train.py goes to sample.py and "
               "evaluate.py as --checkpoint)"),
    # Bytes overwritten in the weights (safetensors has no checksum): a NaN.
    ("nan_safetensors", "are not all finite (NaN or inf in 1 tensor, transformer.wpe.weight first): the file is "
                        "damaged or its run diverged; export or download it again, or use an earlier checkpoint"),
])
def test_a_damaged_hf_folder_is_one_line_everywhere(tmp_path, capsys, damage, fragment):
    hf = export(randomized(SMALL), tmp_path / "hf")
    weights = hf / "model.safetensors"
    if damage == "truncate_safetensors":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "empty_safetensors":
        weights.write_bytes(b"")
    elif damage == "truncate_bin":
        from safetensors.torch import load_file
        torch.save(load_file(weights), hf / "pytorch_model.bin")
        weights.unlink()
        data = (hf / "pytorch_model.bin").read_bytes()
        (hf / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    elif damage == "checkpoint_as_bin":  # best_model.pt copied in as the weights
        weights.unlink()
        torch.save({"model_state_dict": {}, "step": 10, "config": {}}, hf / "pytorch_model.bin")
    elif damage == "config_list":
        (hf / "config.json").write_text("[1, 2]")
    elif damage == "config_not_utf8":
        (hf / "config.json").write_bytes(b"\xff\xfe{}")
    elif damage in ("config_other_width", "config_fewer_layers"):
        config = json.loads((hf / "config.json").read_text())
        edit = {"n_embd": 128} if damage == "config_other_width" else {"n_layer": 1}
        (hf / "config.json").write_text(json.dumps({**config, **edit}))
    elif damage == "a_file":
        hf = weights
    elif damage == "nan_safetensors":
        from safetensors.torch import load_file, save_file
        tensors = load_file(weights)
        tensors["transformer.wpe.weight"][0, 0] = float("nan")
        save_file(tensors, weights)
    else:
        config = json.loads((hf / "config.json").read_text())
        (hf / "config.json").write_text(json.dumps({**config, "n_head": 3}))
    # Each reader's own main(), in this process (a subprocess each would cost ~2 s of imports).
    import evaluate
    import sample
    for main, argv in ((export_hf.main, ["--import", str(hf), str(tmp_path / "x.pt")]),
                       (sample.main, ["--model_dir", str(hf), "--device", "cpu"]),
                       (evaluate.main, ["--model_dir", str(hf), "--device", "cpu"])):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and fragment in err and err.count("\n") == 1, (main.__module__, err)
    assert not (tmp_path / "x.pt").exists()


# --- CLI

def test_cli_export_then_import_round_trip(tmp_path):
    model = randomized(SMALL)
    write_checkpoint(tmp_path / "best_model.pt", model)
    result = run_cli(tmp_path / "best_model.pt", tmp_path / "final_model")
    assert result.returncode == 0, result.stderr
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "final_model")
    assert torch.equal(hf.transformer.wte.weight, model.transformer.wte.weight[:50257])

    result = run_cli("--import", tmp_path / "final_model", tmp_path / "imported" / "gpt2.pt")
    assert result.returncode == 0, result.stderr
    ckpt = load_checkpoint(tmp_path / "imported" / "gpt2.pt")
    assert GPTConfig.from_dict(ckpt["config"]) == model.config
    sd = model.state_dict()
    assert all(torch.equal(sd[k], ckpt["model_state_dict"][k]) for k in sd)


def test_a_diverged_model_is_refused_in_one_line(tmp_path):
    model = randomized(SMALL)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[3, 5] = float("nan")
    write_checkpoint(tmp_path / "diverged.pt", model)
    with pytest.raises(ExportError, match=r"^the weights in .*diverged.pt are not all finite \(NaN or inf in 1 tensor, "
                                          r"transformer.h.1.mlp.c_fc.weight first\): its run diverged; use an earlier "
                                          r"checkpoint$"):
        load_checkpoint_model(tmp_path / "diverged.pt")
    result = subprocess.run([sys.executable, "sample.py", "--checkpoint", tmp_path / "diverged.pt"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"the weights in {tmp_path / 'diverged.pt'} are not all finite" in result.stderr, result.stderr
    with torch.no_grad():  # the head, tied to the embedding, is not counted again
        model.transformer.h[1].mlp.c_fc.weight[3, 5] = 0.0
        model.transformer.wte.weight[7, 1] = float("inf")
    with pytest.raises(ExportError, match=r"\(NaN or inf in 1 tensor, transformer.wte.weight first\)"):
        load_checkpoint_model({"model_state_dict": model.state_dict(), "config": model.config.to_dict()})


def test_cli_bias_false_is_a_one_line_error(tmp_path):
    write_checkpoint(tmp_path / "nobias.pt", GPT(GPTConfig(**dict(SMALL.to_dict(), bias=False))))
    result = run_cli(tmp_path / "nobias.pt", tmp_path / "final_model")
    assert result.returncode == 2
    assert result.stderr.startswith("error: a model trained with bias=False cannot be exported")
    assert result.stderr.count("\n") == 1 and not (tmp_path / "final_model").exists()


@pytest.mark.parametrize("args, fragment", [
    (["{tmp}/missing.pt", "{tmp}/final_model"], "missing.pt"),
    (["--import", "{tmp}/no_such_dir", "{tmp}/x.pt"], "no_such_dir/config.json not found"),
    (["{tmp}/best_model.pt"], "the following arguments are required: dst"),
])
def test_cli_errors_are_one_line(tmp_path, args, fragment):
    result = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and fragment in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
