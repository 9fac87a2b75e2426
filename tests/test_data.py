"""data.py: tokenizer, WikiText download + tokenization (over a local HTTP server), text/JSONL input, TokenBins."""

import contextlib
import gzip
import hashlib
import http.server
import io
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from data import EOT_TOKEN, DataError, TokenBins, get_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "data.py"), *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def tokens_of(path):
    return np.fromfile(path, dtype=np.uint16)


def text_of(tokens):
    """What the invariant compares: the bin decoded with every EOT removed."""
    return get_tokenizer().decode_bytes(tokens[tokens != EOT_TOKEN].tolist())


# --- tokenizer ---------------------------------------------------------------------------------------

VARIED = ["Hello world", "  leading and trailing  ", "tabs\tand\nnewlines\n\n\nand  runs   of spaces",
          "ünïcödé 日本語 emoji 🙂 and Ω≈ç√", "<|endoftext|> is plain text here", "it's we'll they've 1234567 3.14",
          " = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : 戦場のヴァルキュリア3 )"]


def test_tokenizer_known_ids_and_round_trip():
    enc = get_tokenizer()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == EOT_TOKEN
    for s in VARIED:
        assert enc.decode(enc.encode_ordinary(s)) == s
    assert EOT_TOKEN not in enc.encode_ordinary("<|endoftext|>")


def test_tokenizer_matches_hf_gpt2_tokenizer():
    """An independent implementation of GPT-2's BPE over the same original files gives the same ids."""
    transformers = pytest.importorskip("transformers")
    encoder_json, vocab_bpe = data.gpt2_bpe_files()
    hf = transformers.GPT2Tokenizer(vocab=str(encoder_json), merges=str(vocab_bpe))
    enc = get_tokenizer()
    for s in [s for s in VARIED if "<|endoftext|>" not in s]:  # HF reads that text as its special token
        assert enc.encode_ordinary(s) == hf.encode(s), s


# --- a WikiText-like zip and a local HTTP server -------------------------------------------------

WORDS = ("the of and in to a was is for on as with by he it at from his an were are which that 1945 "
         "Valkyria ünïcödé 日本 @-@ @,@ @.@ , . ; ( ) \" ' <unk>").split()


def wikitext_split(n_articles, rng):
    """Raw WikiText layout: ' = Title = ' opens an article, ' = = Section = = ' does not."""
    lines = [" \n"]
    for a in range(n_articles):
        lines += [f" = Article {a} {rng.choice(WORDS)} = \n", " \n"]
        for s in range(rng.randint(1, 3)):
            lines += [f" = = Section {s} = = \n", " \n"]
            if s == 1:
                lines += [" = = = Sub = section = = = \n", " \n"]
            for _ in range(rng.randint(1, 3)):
                lines.append(" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 90))) + " \n")
            lines.append(" \n")
    return "".join(lines)


@pytest.fixture(scope="module")
def wikitext_zip(tmp_path_factory):
    """(zip path, {split: raw bytes}, {split: number of articles}) laid out like the real release."""
    rng = random.Random(0)
    articles = {"train": 60, "val": 6, "test": 5}
    raw = {s: wikitext_split(n, rng).encode() for s, n in articles.items()}
    path = tmp_path_factory.mktemp("zip") / "wikitext-103-raw-v1.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for member, split in data.WIKITEXT_SPLITS.items():
            z.writestr(f"wikitext-103-raw/{member}", raw[split])
    return path, raw, articles


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves server.files; honours Range; can corrupt, or drop the first response halfway."""

    def do_GET(self):
        srv = self.server
        srv.requests.append({"path": self.path, "range": self.headers.get("Range"),
                             "agent": self.headers.get("User-Agent")})
        if self.headers.get("User-Agent", "").startswith("Python-urllib"):  # like the real mirror
            return self.send_error(403)
        body = srv.files.get(self.path)
        if body is None:
            return self.send_error(404)
        if srv.corrupt:
            body = body[:len(body) // 2] + bytes([body[len(body) // 2] ^ 0xFF]) + body[len(body) // 2 + 1:]
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        if not srv.no_length:
            self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if srv.drop_first:  # promise everything (or nothing: no length), send half, hang up
            srv.drop_first = False
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.requests, srv.corrupt, srv.drop_first, srv.no_length = {}, [], False, False, False
    srv.url = lambda path: f"http://127.0.0.1:{srv.server_address[1]}{path}"
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)  # shutdown() waits a poll
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- WikiText preparation --------------------------------------------------------------------------

def test_wikitext103_cli_over_http(tmp_path, server, wikitext_zip):
    zip_path, raw, articles = wikitext_zip
    server.files["/wikitext-103-raw-v1.zip"] = zip_path.read_bytes()
    out = tmp_path / "out"
    url = server.url("/wikitext-103-raw-v1.zip")
    proc = run_cli("wikitext103", "--url", url, "--out_dir", out, "--num_workers", 2)
    assert proc.returncode == 0, proc.stderr
    assert server.requests[0]["agent"] == data.USER_AGENT

    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    assert meta["source"] == {"url": url, "sha256": hashlib.sha256(zip_path.read_bytes()).hexdigest(),
                              "verified": False}
    enc = get_tokenizer()
    for split in ("train", "val", "test"):
        tokens = tokens_of(out / f"{split}.bin")
        assert text_of(tokens) == raw[split]  # the invariant, byte for byte
        assert meta["splits"][split]["tokens"] == len(tokens)
        assert meta["splits"][split]["documents"] == articles[split]
        assert meta["splits"][split]["text_bytes"] == len(raw[split])
        eots = np.flatnonzero(tokens == EOT_TOKEN)
        assert len(eots) == articles[split] - 1  # separators between articles, not sections
        for i in eots:  # each EOT sits right before an article title
            assert enc.decode(tokens[i + 1:i + 4].tolist()).startswith(" = Article")
    assert meta["max_token_id"] == max(int(tokens_of(out / f"{s}.bin").max()) for s in ("train", "val", "test"))
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.part"))

    mtime = (out / "train.bin").stat().st_mtime_ns
    again = run_cli("wikitext103", "--url", url, "--out_dir", out)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert (out / "train.bin").stat().st_mtime_ns == mtime
    forced = run_cli("wikitext103", "--url", url, "--out_dir", out, "--force", "--num_workers", 1)
    assert forced.returncode == 0 and "wrote" in forced.stdout
    assert len(server.requests) == 1  # --force re-tokenizes the zip already there, it does not download again
    assert text_of(tokens_of(out / "train.bin")) == raw["train"]
    # Another --url's file is another dataset: prepared again, downloaded again (the zip there is not known to be it).
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as z:
        for member, split in data.WIKITEXT_SPLITS.items():
            z.writestr(f"wikitext-103-raw/{member}", raw["test" if split == "train" else "train"])
    server.files["/other.zip"] = other.read_bytes()
    p = run_cli("wikitext103", "--url", server.url("/other.zip"), "--out_dir", out, "--num_workers", 1)
    assert p.returncode == 0 and "prepared from other inputs" in p.stdout and "downloading it again" in p.stdout
    assert text_of(tokens_of(out / "train.bin")) == raw["test"] and len(server.requests) == 2
    # The plain command means the published zip: neither these bins nor that zip are it (no download tried: the zip
    # there is checked first).
    # With --sha256, the same file from another address is the same dataset: nothing to do.
    server.files["/mirror/other.zip"] = other.read_bytes()
    p = run_cli("wikitext103", "--url", server.url("/mirror/other.zip"), "--sha256",
                hashlib.sha256(other.read_bytes()).hexdigest(), "--out_dir", out)
    assert p.returncode == 0 and "nothing to do" in p.stdout and len(server.requests) == 2, p.stdout
    p = run_cli("wikitext103", "--out_dir", out)
    assert_one_line_error(p, "wikitext-103-raw-v1.zip has sha256", "expected", "delete it and run again")


def test_tokens_do_not_depend_on_chunking(tmp_path, monkeypatch):
    """Chunks are cut only where GPT-2 splits anyway: the bin equals encode_ordinary of the whole text."""
    rng = random.Random(1)
    pieces = ["  two leading spaces", "\ttab", "", "   ", "x" * 300, "ünï 日本", "\r\nwindows", " one space",
              "word", "'s contraction", "123 456", "<|endoftext|>"]
    ends = ["\n", "\n\n", " \n", "\n\n\n", "\r\n"]
    # Random lines offer few safe cuts; "a\nB" after every 4 of them is one, so no cut is ever forced.
    text = "".join(rng.choice(pieces) + rng.choice(ends) + ("a\nB\n" if i % 4 == 3 else "") for i in range(3000))
    (tmp_path / "a.txt").write_text(text, encoding="utf-8", newline="")
    monkeypatch.setattr(data, "CHUNK_BYTES", 512)  # ~200 cuts; a forced one needs 4 x 512 bytes without a safe one
    data.prepare_text([tmp_path / "a.txt"], tmp_path / "out", val_fraction=0.3, num_workers=2)
    enc = get_tokenizer()
    train, val = tokens_of(tmp_path / "out/train.bin"), tokens_of(tmp_path / "out/val.bin")
    assert EOT_TOKEN not in train and EOT_TOKEN not in val
    val_text = text_of(val).decode()
    assert text[len(text) - len(val_text):] == val_text and len(val_text) > 0.25 * len(text)
    assert train.tolist() == enc.encode_ordinary(text[:len(text) - len(val_text)])
    assert val.tolist() == enc.encode_ordinary(val_text)


def test_wikitext_bins_do_not_depend_on_block_size(tmp_path, wikitext_zip, monkeypatch):
    """Hundreds of blocks (titles at block starts included) give the bins of one block per split."""
    zip_path = wikitext_zip[0]
    data.prepare_wikitext("wikitext103", tmp_path / "one", source=zip_path, num_workers=1)
    monkeypatch.setattr(data, "CHUNK_BYTES", 256)
    data.prepare_wikitext("wikitext103", tmp_path / "many", source=zip_path, num_workers=2)
    for split in ("train", "val", "test"):
        many, one = (tokens_of(tmp_path / d / f"{split}.bin") for d in ("many", "one"))
        assert many.tolist() == one.tolist()


@pytest.mark.parametrize("text", [("  " + "y" * 50 + "\n") * 1000, "日本語" * 5000],
                         ids=["indented", "no-newline"])
def test_blocks_stay_bounded_without_safe_cuts(text):
    """No safe cut anywhere (indented lines; no line break at all): blocks are cut anyway, whole characters."""
    raw = text.encode("utf-8")
    blocks = list(data._blocks(io.BytesIO(raw), chunk_bytes=1000))
    assert b"".join(b for _, b in blocks) == raw and len(blocks) > 5
    assert [o for o, _ in blocks] == np.cumsum([0] + [len(b) for _, b in blocks[:-1]]).tolist()
    assert all(len(b) <= 4 * 1000 for _, b in blocks)
    assert "".join(b.decode("utf-8") for _, b in blocks) == text


def test_an_input_file_that_cannot_be_read_is_named_in_one_line(tmp_path):
    """An input gone since it was listed (or unreadable) is the input's problem, not the output's: the error used to
    advise freeing disk space."""
    gone = tmp_path / "gone.txt"
    with pytest.raises(DataError, match=f"^cannot read {re.escape(str(gone))}: No such file or directory; check "
                                        "that it is there and readable, then run the same command again$"):
        list(data._text_segments([gone], 10, 0.1, "text", hashlib.sha256()))


def test_a_long_line_is_cut_between_words_with_the_tokens_of_the_uncut_text():
    """Text without line breaks (a one-line file of megabytes): blocks are cut before a space between words, where
    the pre-tokenizer splits too (cut at a fixed offset, 'alpha' came out as ' al', 'p', 'ha')."""
    text = " ".join(("alpha", "beta", "(x)", "it's", "42")[i % 5] for i in range(6000))
    blocks = list(data._blocks(io.BytesIO(text.encode()), chunk_bytes=1000))
    assert len(blocks) > 5 and all(len(b) <= 4 * 1000 for _, b in blocks)
    enc = get_tokenizer()
    assert [t for _, b in blocks for t in enc.encode_ordinary(b.decode())] == enc.encode_ordinary(text)


def test_resume_partial_download(tmp_path, server, wikitext_zip):
    body = wikitext_zip[0].read_bytes()
    server.files["/w.zip"] = body
    dest = tmp_path / "w.zip"
    Path(f"{dest}.part").write_bytes(body[:len(body) * 2 // 5])  # what a killed run left behind
    sha = data.download(server.url("/w.zip"), dest, size=len(body), sha256=hashlib.sha256(body).hexdigest())
    assert dest.read_bytes() == body and sha == hashlib.sha256(body).hexdigest()
    assert [r["range"] for r in server.requests] == [f"bytes={len(body) * 2 // 5}-"]
    assert not Path(f"{dest}.part").exists()


def test_dropped_connection_is_retried_and_resumed(tmp_path, server, wikitext_zip):
    body = wikitext_zip[0].read_bytes()
    server.files["/w.zip"], server.drop_first = body, True
    dest = tmp_path / "w.zip"
    data.download(server.url("/w.zip"), dest, backoff=0.01)
    assert dest.read_bytes() == body
    assert [r["range"] for r in server.requests] == [None, f"bytes={len(body) // 2}-"]


def test_a_zip_cut_short_by_a_server_that_sends_no_length_is_resumed_not_taken(tmp_path, server, wikitext_zip):
    """Without a length or a sha256 to check, a connection dropped halfway looks like the end of the file: a zip cut
    short has no directory at its end, so it stays .part, and the next run resumes it."""
    body = wikitext_zip[0].read_bytes()
    server.files["/w.zip"], server.drop_first, server.no_length = body, True, True
    dest = tmp_path / "w.zip"
    with pytest.raises(data.DataError, match="is not a whole zip .*run the same command again to resume it.*delete "):
        data.download(server.url("/w.zip"), dest)
    assert not dest.exists() and Path(f"{dest}.part").stat().st_size == len(body) // 2
    data.download(server.url("/w.zip"), dest)
    assert dest.read_bytes() == body and [r["range"] for r in server.requests] == [None, f"bytes={len(body) // 2}-"]


def test_a_full_disk_while_writing_the_bins_names_the_file_and_keeps_the_old_ones(tmp_path):
    """A real failed write (a file-size limit: EFBIG, as a full disk's ENOSPC) in the middle of the bins: one line
    naming the file (numpy's tofile said '... requested and ... written' and nothing else), and the folder's
    earlier bins stay as they were."""
    import resource

    text = tmp_path / "a.txt"
    text.write_text("".join(f"line {i} of some text to tokenize\n" for i in range(12000)))
    out = tmp_path / "out"
    assert run_cli("text", "--input", text, "--out_dir", out, "--num_workers", 1).returncode == 0
    before = {f: (out / f).read_bytes() for f in ("train.bin", "val.bin", "meta.json")}
    text.write_text(text.read_text() * 2)

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (inherited across exec: the write fails instead)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    p = subprocess.run([sys.executable, str(ROOT / "data.py"), "text", "--input", str(text), "--out_dir", str(out),
                        "--num_workers", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       preexec_fn=limited)
    assert p.returncode == 1 and p.stderr.splitlines()[-1].startswith(
        f"error: [Errno 27] File too large: '{out / 'train.bin.tmp'}'; free disk space"), p.stderr
    assert {f: (out / f).read_bytes() for f in before} == before and not list(out.glob("*.tmp"))


def test_complete_part_file_is_not_downloaded_again(tmp_path, server, wikitext_zip):
    body = wikitext_zip[0].read_bytes()
    server.files["/w.zip"] = body
    dest = tmp_path / "w.zip"
    Path(f"{dest}.part").write_bytes(body)  # killed after the last byte, before the rename
    data.download(server.url("/w.zip"), dest)
    assert dest.read_bytes() == body and [r["range"] for r in server.requests] == [f"bytes={len(body)}-"]


def test_corrupted_download_is_detected_and_deleted(tmp_path, server, wikitext_zip):
    zip_path = wikitext_zip[0]
    server.files["/wikitext-103-raw-v1.zip"], server.corrupt = zip_path.read_bytes(), True
    out = tmp_path / "out"
    proc = run_cli("wikitext103", "--url", server.url("/wikitext-103-raw-v1.zip"), "--out_dir", out,
                   "--sha256", hashlib.sha256(zip_path.read_bytes()).hexdigest())
    assert_one_line_error(proc, "sha256", "corrupt")
    assert not out.exists()  # no zip, no .part, no bins, no meta.json: not even the folder it made


def test_wrong_size_is_detected(tmp_path, server, wikitext_zip):
    body = wikitext_zip[0].read_bytes()
    server.files["/w.zip"] = body
    with pytest.raises(DataError, match=f"serves {len(body)} bytes, not the {len(body) + 1}"):
        data.download(server.url("/w.zip"), tmp_path / "w.zip", size=len(body) + 1)
    assert not list(tmp_path.glob("w.zip*"))


def test_unreachable_url_names_url_and_source(tmp_path):
    proc = run_cli("wikitext2", "--url", f"http://127.0.0.1:{free_port()}/wikitext-2-raw-v1.zip",
                   "--out_dir", tmp_path / "out", "--retries", 1)
    assert_one_line_error(proc, "after 2 tries", "--url", "--source")


def test_http_error_is_not_retried(tmp_path, server):
    proc = run_cli("wikitext2", "--url", server.url("/missing.zip"), "--out_dir", tmp_path / "out")
    assert_one_line_error(proc, "HTTP 404", "--url", "--source")
    assert len(server.requests) == 1


def test_mirror_list_falls_over_and_checks_known_hashes(tmp_path, server, wikitext_zip, monkeypatch):
    zip_path, raw, _ = wikitext_zip
    body = zip_path.read_bytes()
    server.files["/good.zip"] = body
    spec = {"zip": "wikitext-2-raw-v1.zip", "urls": [server.url("/gone.zip"), server.url("/good.zip")],
            "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    monkeypatch.setitem(data.DATASETS, "wikitext2", spec)
    meta = data.prepare_wikitext("wikitext2", tmp_path / "out", num_workers=1)
    assert meta["source"] == {"url": server.url("/good.zip"), "sha256": spec["sha256"], "verified": True}
    assert text_of(tokens_of(tmp_path / "out/test.bin")) == raw["test"]
    monkeypatch.setitem(data.DATASETS, "wikitext2", dict(spec, sha256="0" * 64))
    with pytest.raises(DataError, match="every mirror failed .* --url URL or --source PATH"):
        data.prepare_wikitext("wikitext2", tmp_path / "other", num_workers=1)
    assert not (tmp_path / "other" / "wikitext-2-raw-v1.zip").exists()


def test_source_zip_and_file_url(tmp_path, wikitext_zip, capsys):
    zip_path, raw, _ = wikitext_zip
    meta = data.prepare_wikitext("wikitext2", tmp_path / "a", source=zip_path, num_workers=1)
    assert meta["source"]["path"] == str(zip_path) and not (tmp_path / "a" / zip_path.name).exists()
    # The same dataset again is already there; another one in the same folder is prepared, not taken for it.
    capsys.readouterr()
    data.prepare_wikitext("wikitext2", tmp_path / "a", source=zip_path, num_workers=1)
    assert "is already prepared" in capsys.readouterr().out
    meta = data.prepare_wikitext("wikitext103", tmp_path / "a", source=zip_path, num_workers=1)
    assert meta["dataset"] == "wikitext103"
    assert "was prepared from other inputs or settings; preparing it again" in capsys.readouterr().out
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["dataset"] == "wikitext103"
    data.prepare_wikitext("wikitext2", tmp_path / "b", url=zip_path.as_uri(), num_workers=1)
    for d in ("a", "b"):
        assert text_of(tokens_of(tmp_path / d / "val.bin")) == raw["val"]
    with pytest.raises(DataError, match="--source .*nope.zip does not exist"):
        data.prepare_wikitext("wikitext2", tmp_path / "c", source=tmp_path / "nope.zip")
    with pytest.raises(DataError, match="expected 0{64}: it is not that file, or it is damaged"):
        data.prepare_wikitext("wikitext2", tmp_path / "c", source=zip_path, sha256="0" * 64)


def test_source_folder_as_kaggle_unzips_it_and_sha256_in_capitals(tmp_path, wikitext_zip, capsys):
    zip_path, raw, _ = wikitext_zip
    unzipped = tmp_path / "input" / "wikitext103"  # what Kaggle makes of an uploaded zip
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(unzipped)
    meta = data.prepare_wikitext("wikitext103", tmp_path / "a", source=unzipped, num_workers=1)
    assert meta["source"]["path"] == str(unzipped) and meta["source"]["files"]["wikitext-103-raw/wiki.test.raw"] > 0
    for split in raw:
        assert text_of(tokens_of(tmp_path / "a" / f"{split}.bin")) == raw[split]
    from_zip = tmp_path / "b"
    digest = hashlib.sha256(zip_path.read_bytes()).hexdigest().upper()  # as PowerShell's Get-FileHash prints it
    proc = run_cli("wikitext103", "--source", zip_path, "--sha256", f" {digest}", "--out_dir", from_zip)
    assert proc.returncode == 0, proc.stderr
    for split in raw:
        assert (from_zip / f"{split}.bin").read_bytes() == (tmp_path / "a" / f"{split}.bin").read_bytes()
    capsys.readouterr()
    data.prepare_wikitext("wikitext103", tmp_path / "a", source=unzipped, num_workers=1)
    assert "is already prepared" in capsys.readouterr().out
    # Another --source than the folder was prepared from is prepared again, not taken for it.
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as z:
        for member, split in data.WIKITEXT_SPLITS.items():
            z.writestr(f"wikitext-103-raw/{member}", " = Other = \n other words \n" * 50)
    data.prepare_wikitext("wikitext103", tmp_path / "a", source=other, num_workers=1)
    assert "preparing it again" in capsys.readouterr().out
    assert text_of(tokens_of(tmp_path / "a" / "test.bin")) == b" = Other = \n other words \n" * 50
    with pytest.raises(DataError, match="--sha256 checks a zip, and --source .* is a folder"):
        data.prepare_wikitext("wikitext103", tmp_path / "c", source=unzipped, sha256="0" * 64)
    elsewhere = tmp_path / "mounted" / "elsewhere"  # the same files under another path: still prepared
    shutil.copytree(unzipped, elsewhere)
    capsys.readouterr()
    data.prepare_wikitext("wikitext103", tmp_path / "d", source=elsewhere, num_workers=1)
    data.prepare_wikitext("wikitext103", tmp_path / "d", source=unzipped, num_workers=1)
    assert "is already prepared" in capsys.readouterr().out
    raw_file = unzipped / "wikitext-103-raw" / "wiki.train.raw"
    with pytest.raises(DataError, match="wiki.train.raw is not a readable zip .*: download the zip again, or give the "
                                        "folder it unzips to"):
        data.prepare_wikitext("wikitext103", tmp_path / "c", source=raw_file)
    (tmp_path / "input" / "copy").mkdir()
    (tmp_path / "input" / "copy" / "wiki.test.raw").write_bytes(raw["test"])
    with pytest.raises(DataError, match="holds more than one wiki.test.raw"):
        data.prepare_wikitext("wikitext103", tmp_path / "c", source=tmp_path / "input")


def test_bad_zips_leave_nothing_that_looks_complete(tmp_path):
    missing = tmp_path / "missing.zip"
    with zipfile.ZipFile(missing, "w") as z:
        z.writestr("wikitext-2-raw/wiki.train.raw", " = A = \n")
    with pytest.raises(DataError, match="has no wiki.valid.raw, wiki.test.raw"):
        data.prepare_wikitext("wikitext2", tmp_path / "out", source=missing)
    not_utf8 = tmp_path / "bad.zip"
    with zipfile.ZipFile(not_utf8, "w") as z:
        for member in data.WIKITEXT_SPLITS:
            bad = b"\xff\n" if "test" in member else b""
            z.writestr(f"wikitext-2-raw/{member}", b" = A = \n fine \n" * 2000 + bad)
    with pytest.raises(DataError, match=r"wiki.test.raw is not UTF-8 text \(bad byte at offset 30000\)"):
        data.prepare_wikitext("wikitext2", tmp_path / "out", source=not_utf8, num_workers=2)
    assert not (tmp_path / "out").exists()  # train/val were done, yet no bin, .tmp or meta.json (nor folder) remains
    damaged = tmp_path / "damaged.zip"  # a readable directory, but compressed bytes that do not inflate
    with zipfile.ZipFile(damaged, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for member in data.WIKITEXT_SPLITS:
            z.writestr(f"wikitext-2-raw/{member}", "".join(f" = T{i} = \n words {i * i} here \n" for i in range(3000)))
    raw = bytearray(damaged.read_bytes())
    raw[200:260] = bytes(60)
    damaged.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"damaged.zip is corrupt \(.*\): download the zip again, or give the folder "
                                        r"it unzips to"):  # the user's own file: never "delete it"
        data.prepare_wikitext("wikitext2", tmp_path / "out2", source=damaged, num_workers=1)
    downloaded = tmp_path / "out3" / data.DATASETS["wikitext2"]["zip"]  # as a download into out_dir left it
    downloaded.parent.mkdir()
    downloaded.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"wikitext-2-raw-v1.zip is corrupt \(.*\): delete it and run again, or pass "
                                        r"--source"):
        data.prepare_wikitext("wikitext2", tmp_path / "out3", url=damaged.as_uri(), num_workers=1)


# --- your own text -----------------------------------------------------------------------------------

def test_a_lone_surrogate_in_jsonl_becomes_the_replacement_character(tmp_path):
    # A scraped emoji cut in half: JSON may spell it (\ud83d), UTF-8 cannot hold it.
    (tmp_path / "s.jsonl").write_text('{"text": "broken \\ud83d emoji"}\n{"text": "whole \\ud83d\\ude00 one"}\n'
                                      + '{"text": "filler line"}\n' * 40)
    proc = run_cli("text", "--input", tmp_path / "s.jsonl", "--out_dir", tmp_path / "o")
    assert proc.returncode == 0, proc.stderr
    assert "s.jsonl: 1 record (line 1) held a lone UTF-16 surrogate" in proc.stderr and "U+FFFD" in proc.stderr
    assert text_of(tokens_of(tmp_path / "o" / "train.bin")).decode().startswith("broken \ufffd emojiwhole 😀 one")


def test_a_console_that_cannot_show_a_path_does_not_stop_the_preparation(tmp_path):
    # Windows writes a redirected stdout in its ANSI code page (here cp1252, which has no 日本).
    (tmp_path / "a.txt").write_text("alpha beta gamma\n" * 300)
    out = tmp_path / "データ"
    proc = subprocess.run([sys.executable, str(ROOT / "data.py"), "text", "--input", str(tmp_path / "a.txt"),
                           "--out_dir", str(out)], cwd=ROOT, capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONIOENCODING": "cp1252"})
    assert proc.returncode == 0, proc.stderr.decode("cp1252")
    assert b"\\u30c7\\u30fc\\u30bf/train.bin" in proc.stdout and (out / "meta.json").is_file()


def test_an_input_given_twice_is_read_once(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("alpha beta gamma\n" * 300)
    data.prepare_text([tmp_path / "in", tmp_path / "in" / "a.txt"], tmp_path / "o", num_workers=1)
    assert "note: 1 file given more than once (by --input and a folder, or twice): each is read once" in \
        capsys.readouterr().out
    assert (text_of(tokens_of(tmp_path / "o" / "train.bin")) + text_of(tokens_of(tmp_path / "o" / "val.bin"))) == \
        b"alpha beta gamma\n" * 300


def test_text_folders_and_jsonl(tmp_path):
    docs = ["First file.\nIt has two lines.\n", "Second file ünï 日本\n\nwith a blank line.",
            "JSONL record one.\n", "record two has no newline", "Last text file.\n" * 40]
    (tmp_path / "in/sub").mkdir(parents=True)
    (tmp_path / "in/a.txt").write_text(docs[0])
    (tmp_path / "in/b.txt").write_text(docs[1])
    (tmp_path / "in/sub/c.JSONL").write_text(  # extensions in any case (Windows tools write .TXT); BOMs of cat-ed files
        json.dumps({"body": docs[2], "id": 1}) + "\n\n\ufeff" + json.dumps({"body": docs[3]}) + "\n")
    (tmp_path / "in/.hidden.txt").write_text("ignored")
    (tmp_path / "in/notes.md").write_text("ignored")
    (tmp_path / "last.txt").write_text(docs[4])
    out = tmp_path / "out"
    proc = run_cli("text", "--input", tmp_path / "in", tmp_path / "last.txt", "--text_field", "body",
                   "--val_fraction", 0.2, "--out_dir", out)
    assert proc.returncode == 0, proc.stderr
    train, val = tokens_of(out / "train.bin"), tokens_of(out / "val.bin")
    assert text_of(train) + text_of(val) == "".join(docs).encode()
    # Every EOT sits on a document boundary.
    boundaries = set(np.cumsum([len(d.encode()) for d in docs]).tolist())
    offset = 0
    for part in np.split(train, np.flatnonzero(train == EOT_TOKEN)):
        offset += len(text_of(part))
        assert offset in boundaries or offset == len(text_of(train))
    assert (train == EOT_TOKEN).sum() == 4 - (val == EOT_TOKEN).sum() - (docs[4].encode() in text_of(val))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"]["files"] == 4 and meta["source"]["sha256"] == hashlib.sha256(b"".join(
        p.read_bytes() for p in (tmp_path / "in/a.txt", tmp_path / "in/b.txt", tmp_path / "in/sub/c.JSONL",
                                 tmp_path / "last.txt"))).hexdigest()


@pytest.mark.parametrize("content, needles", [
    ('{"text": "ok"}\n{"txt": "no field"}\n', ["bad.jsonl:2", "'text'", "--text_field"]),
    ('{"text": "ok"}\nnot json\n', ["bad.jsonl:2 is not valid JSON"]),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, needles):
    (tmp_path / "bad.jsonl").write_text(content)
    proc = run_cli("text", "--input", tmp_path / "bad.jsonl", "--out_dir", tmp_path / "o")
    assert_one_line_error(proc, *needles)


def test_text_input_errors(tmp_path):
    assert_one_line_error(run_cli("text", "--input", tmp_path / "nope.txt", "--out_dir", tmp_path / "o"),
                          "nope.txt does not exist")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt is not UTF-8 text"):
        data.prepare_text([tmp_path / "latin1.txt"], tmp_path / "o", num_workers=1)
    with pytest.raises(DataError, match="--val_fraction 1.5"):
        data.prepare_text([tmp_path / "latin1.txt"], tmp_path / "o", val_fraction=1.5)
    with pytest.raises(DataError, match="--out_dir .*latin1.txt is a file, not a folder: name a folder"):
        data.prepare_text([tmp_path / "latin1.txt"], tmp_path / "latin1.txt", num_workers=1)
    (tmp_path / "tiny.txt").write_text("one line only\n")
    with pytest.raises(DataError, match="val split came out empty"):
        data.prepare_text([tmp_path / "tiny.txt"], tmp_path / "o", num_workers=1)
    assert not (tmp_path / "o").exists()  # no empty folder of its making is left behind
    (tmp_path / "mine").mkdir()  # ...but a folder that was there stays
    with pytest.raises(DataError, match="val split came out empty"):
        data.prepare_text([tmp_path / "tiny.txt"], tmp_path / "mine", num_workers=1)
    assert (tmp_path / "mine").is_dir() and not list((tmp_path / "mine").iterdir())
    (tmp_path / "u16.txt").write_text("what Windows PowerShell 5 writes\n", encoding="utf-16")
    with pytest.raises(DataError, match=r"u16.txt is UTF-16 text \(bad byte at offset 0\): convert it, e.g. "
                                        r"`iconv -f utf-16 -t utf-8`"):
        data.prepare_text([tmp_path / "u16.txt"], tmp_path / "o", num_workers=1)
    # JSON Lines get the same advice, with the line; a binary file is not text (no iconv advice).
    (tmp_path / "u16.jsonl").write_text('{"text": "a record"}\n', encoding="utf-16")
    with pytest.raises(DataError, match=r"u16.jsonl is UTF-16 text \(bad byte at offset 0\): convert it"):
        data.prepare_text([tmp_path / "u16.jsonl"], tmp_path / "o", num_workers=1)
    (tmp_path / "l1.jsonl").write_bytes('{"text": "ok"}\n{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"l1.jsonl:2 is not UTF-8 text \(bad byte at offset 28\): convert it, e.g. "
                                        r"`iconv -f latin1"):
        data.prepare_text([tmp_path / "l1.jsonl"], tmp_path / "o", num_workers=1)
    torch.save({"weights": torch.arange(1000)}, tmp_path / "model.txt")  # a .pt saved under the wrong name
    with pytest.raises(DataError, match=r"model.txt is a zip archive \(or a file torch.save wrote\), not text"):
        data.prepare_text([tmp_path / "model.txt"], tmp_path / "o", num_workers=1)
    np.save(tmp_path / "weights.npy", np.arange(1000))
    with pytest.raises(DataError, match=r"weights.npy is not text: it holds NUL bytes"):
        data.prepare_text([tmp_path / "weights.npy"], tmp_path / "o", num_workers=1)
    (tmp_path / "corpus.txt.gz").write_bytes(gzip.compress(b"compressed text\n" * 100))
    with pytest.raises(DataError, match=r"corpus.txt.gz is gzip-compressed, not text: `gunzip` it and give the text"):
        data.prepare_text([tmp_path / "corpus.txt.gz"], tmp_path / "o", num_workers=1)
    with pytest.raises(DataError, match=r"--input /dev/null is not a regular file \(a pipe or a device\): save the "
                                        r"text to a file"):
        data.prepare_text(["/dev/null"], tmp_path / "o", num_workers=1)
    # UTF-16 without a byte-order mark: ASCII text in it is valid UTF-8, with a NUL after each letter.
    (tmp_path / "u16le.txt").write_text("no byte-order mark\n" * 50, encoding="utf-16-le")
    with pytest.raises(DataError, match=r"u16le.txt is not text: it holds NUL bytes \(NUL byte at offset 1\), as "
                                        r"binary files and UTF-16 without a byte-order mark do"):
        data.prepare_text([tmp_path / "u16le.txt"], tmp_path / "o", num_workers=1)


def test_a_utf8_byte_order_mark_is_not_tokenized(tmp_path):
    text = "Saved by Notepad, with a byte-order mark.\n" * 200
    (tmp_path / "bom.txt").write_text(text, encoding="utf-8-sig")
    meta = data.prepare_text([tmp_path / "bom.txt"], tmp_path / "o", num_workers=1)
    assert (text_of(tokens_of(tmp_path / "o" / "train.bin")) + text_of(tokens_of(tmp_path / "o" / "val.bin"))).decode() == text
    assert sum(meta["splits"][s]["text_bytes"] for s in ("train", "val")) == len(text.encode())  # (nor counted)


def test_preparing_a_folder_again_removes_splits_it_does_not_write(tmp_path, wikitext_zip):
    out = tmp_path / "out"
    data.prepare_wikitext("wikitext103", out, source=wikitext_zip[0], num_workers=1)  # with a test split
    (tmp_path / "a.txt").write_text("alpha beta gamma\n" * 300)
    data.prepare_text([tmp_path / "a.txt"], out, num_workers=1)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_files_data_py_did_not_write_are_not_replaced_without_force(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta gamma\n" * 300)
    theirs = tmp_path / "theirs"
    write_bin(theirs, "test", [1, 2, 3])
    (theirs / "meta.json").write_text('{"license": "mine"}')
    before = {p.name: p.read_bytes() for p in theirs.iterdir()}
    proc = run_cli("text", "--input", tmp_path / "a.txt", "--out_dir", theirs)
    assert_one_line_error(proc, f"--out_dir {theirs} holds meta.json, test.bin, which no meta.json of data.py's "
                                "vouches for (another tool's files, or an older data.py's stopped preparation)",
                          "pass --force to replace them")
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == before
    bare = tmp_path / "bare"  # bins without a meta.json (another tool's, as nanoGPT's prepare.py writes them)
    write_bin(bare, "train", [1, 2, 3])
    with pytest.raises(DataError, match="holds train.bin, which no meta.json of data.py's vouches for"):
        data.prepare_text([tmp_path / "a.txt"], bare, num_workers=1)
    assert tokens_of(bare / "train.bin").tolist() == [1, 2, 3]
    data.prepare_text([tmp_path / "a.txt"], theirs, num_workers=1, force=True)
    assert sorted(p.name for p in theirs.iterdir()) == ["meta.json", "train.bin", "val.bin"]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stopped_preparation_leaves_the_folders_earlier_dataset_whole(tmp_path, sig):
    """Stopped while it tokenizes (Ctrl-C, a `kill`, each sent three times, as a notebook kernel's shutdown repeats
    them), with worker processes: the folder still holds its earlier dataset, bins and meta.json as they were, so
    train.py cannot read the old bins as new ones; nothing else is left behind, and no worker says anything."""
    (tmp_path / "small.txt").write_text("alpha beta gamma\n" * 300)
    out = tmp_path / "out"
    data.prepare_text([tmp_path / "small.txt"], out, num_workers=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "big.txt").write_text("".join(f"line {i} of a much larger text to tokenize\n" for i in range(400_000)))
    proc = subprocess.Popen([sys.executable, str(ROOT / "data.py"), "text", "--input", str(tmp_path / "big.txt"),
                             "--out_dir", str(out), "--num_workers", "2"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    tmp = out / "train.bin.tmp"
    while not (tmp.exists() and tmp.stat().st_size):  # tokenizing (its first tokens are written)
        assert proc.poll() is None, proc.communicate()
    for _ in range(3):
        proc.send_signal(getattr(signal, sig))
        time.sleep(0.002)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (130 if sig == "SIGINT" else 143), err
    assert "Traceback" not in err and "interrupted: no partial file was left under a final name" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_ctrl_c_while_it_starts_ends_it_in_one_line(tmp_path, interrupted_at):
    """While Python loads its modules (numpy, tiktoken: before the preparation's own handlers), Ctrl-C gave a
    traceback."""
    (tmp_path / "a.txt").write_text("alpha beta\n")
    p = interrupted_at(ROOT / "data.py", "numpy", "text", "--input", tmp_path / "a.txt", "--out_dir", tmp_path / "out",
                       cwd=tmp_path)
    assert (p.returncode, p.stdout, p.stderr) == (130, "", "\ninterrupted\n") and not (tmp_path / "out").exists()


def test_preparing_data_never_loads_pytorch(tmp_path, audit_hooked):
    """data.py's start-up is numpy and tiktoken: meta.json's atomic write (checkpoint.py) imports no torch, which
    would add seconds and ~150 MB to every preparation."""
    (tmp_path / "a.txt").write_text("alpha beta gamma\n" * 300)
    note_torch = """
        def hook(event, args):
            if event == "import" and args[0] == "torch":
                os.write(2, b"imported torch\\n")"""
    p = subprocess.run([*audit_hooked(note_torch), str(ROOT / "data.py"), "text", "--input", tmp_path / "a.txt",
                        "--out_dir", tmp_path / "out", "--num_workers", "1"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and (tmp_path / "out" / "meta.json").is_file(), p.stderr
    assert "imported torch" not in p.stderr


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_a_kill_of_the_whole_process_group_ends_the_preparation_too(tmp_path, start, audit_hooked):
    """`timeout`, systemd and a container's stop send SIGTERM to every process of the group: the workers too. Here
    it comes while they wait for work and the preparation writes its placeholder meta.json: the worker that a
    SIGTERM ended while it held the task queue's lock left the pool's clean-up waiting on it forever (seen with
    `timeout 2 python data.py text ...`). It ends as a SIGTERM to data.py alone does: one line, exit code 143,
    nothing left in the folder, and no process of the group left. Also where workers are spawned (macOS, Windows),
    whose resource tracker added a two-line warning about the pool's semaphores."""
    (tmp_path / "a.txt").write_text("".join(f"line {i} of a text to tokenize\n" for i in range(200_000)))
    out = tmp_path / "out"
    kill_group_at_meta = f"""
        import multiprocessing
        multiprocessing.set_start_method({start!r}, force=True)
        main, sent = os.getpid(), []
        def hook(event, args):
            if (event == "open" and os.path.basename(str(args[0])).startswith(".meta.json.") and os.getpid() == main
                    and not sent):
                sent.append(True)
                os.killpg(0, signal.SIGTERM)"""
    proc = subprocess.Popen([*audit_hooked(kill_group_at_meta), str(ROOT / "data.py"), "text", "--input",
                             str(tmp_path / "a.txt"), "--out_dir", str(out), "--num_workers", "2"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=60)
        # No worker runs on (one that has ended may wait as a zombie for init, which no container's need reap).
        group = subprocess.run(["ps", "-o", "stat=,pid=,args=", "-g", str(proc.pid)], capture_output=True, text=True)
        assert not [line for line in group.stdout.splitlines() if not line.startswith("Z")], group.stdout
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left of the group (nothing, if it ended)
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143 and "interrupted: no partial file was left under a final name" in err, err
    assert "Traceback" not in err and "Warning" not in err and not out.exists()


def test_a_preparation_stopped_after_its_bins_are_in_place_is_prepared_again(tmp_path, monkeypatch):
    """Between the bins' renames and the final meta.json (here: that write fails, as on a full disk), the folder
    holds a placeholder meta.json: the next run takes the folder as data.py's and prepares it again."""
    (tmp_path / "a.txt").write_text("alpha beta gamma\n" * 300)
    out = tmp_path / "out"
    import checkpoint
    real, writes = data.atomic_write_json, []

    def second_write_fails(path, obj):
        writes.append(obj)
        if len(writes) == 2:
            raise checkpoint.CheckpointError("no room") from OSError(28, "No space left on device")
        real(path, obj)
    monkeypatch.setattr(data, "atomic_write_json", second_write_fails)
    with pytest.raises(DataError, match="could not write .*meta.json .*No space left on device.*: check the disk"):
        data.prepare_text([tmp_path / "a.txt"], out, num_workers=1)
    assert writes[0]["preparing"] and json.loads((out / "meta.json").read_text())["splits"] == {}
    monkeypatch.setattr(data, "atomic_write_json", real)
    meta = data.prepare_text([tmp_path / "a.txt"], out, num_workers=1)
    assert json.loads((out / "meta.json").read_text()) == meta and meta["splits"]["train"]["tokens"] > 0



@pytest.mark.parametrize("args, message", [
    ((), "say what to prepare: python data.py wikitext103"),
    (("wikitext101",), "invalid choice: 'wikitext101'"),
    (("text",), "arguments are required: --input"),
    (("wikitext2", "--retries", "many"), "--retries: invalid int value: 'many'"),
    (("wikitext2", "--retries", "-1"), "--retries: invalid int value: '-1' (give 0 or more)"),
    (("wikitext2", "--sha256", "abc123"), "--sha256: 'abc123' is not a sha256: give its 64 hex digits"),
])
def test_usage_mistakes_are_one_line(args, message):
    proc = run_cli(*args)
    assert_one_line_error(proc, message)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # no usage block either

def test_rerun_prepares_again_only_when_inputs_or_settings_change(tmp_path, capsys):
    text_a, text_b = "alpha beta gamma\n" * 300, "delta epsilon\n" * 400
    (tmp_path / "a.txt").write_text(text_a)
    (tmp_path / "b.txt").write_text(text_b)
    out = tmp_path / "out"

    def prepare(path, **kw):
        data.prepare_text([path], out, num_workers=1, **kw)
        said = capsys.readouterr().out
        text = text_of(tokens_of(out / "train.bin")) + text_of(tokens_of(out / "val.bin"))
        return said, text.decode()

    said, text = prepare(tmp_path / "a.txt")
    assert "wrote" in said and text == text_a
    said, text = prepare(tmp_path / "a.txt")
    assert "already prepared" in said and "wrote" not in said and text == text_a
    for path, kw, expected in ((tmp_path / "b.txt", {}, text_b),  # another file
                               (tmp_path / "b.txt", {"val_fraction": 0.2}, text_b)):  # another setting
        said, text = prepare(path, **kw)
        assert "prepared from other inputs or settings; preparing it again" in said and "wrote" in said
        assert text == expected
    (tmp_path / "b.txt").write_text(text_b.replace("delta", "DELTA"))  # same name, same size, other bytes
    said, text = prepare(tmp_path / "b.txt", val_fraction=0.2)
    assert "preparing it again" in said and text == text_b.replace("delta", "DELTA")
    whole = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(whole[:-2])  # a copy cut short is no prepared folder
    said, text = prepare(tmp_path / "b.txt", val_fraction=0.2)
    assert "already prepared" not in said and (out / "train.bin").read_bytes() == whole


def test_val_split_of_text_without_line_breaks(tmp_path):
    text = "日本語のテキスト, one long line " * 5000  # no line break at all: val starts mid-line
    (tmp_path / "one_line.txt").write_text(text)
    data.prepare_text([tmp_path / "one_line.txt"], tmp_path / "out", val_fraction=0.2, num_workers=1)
    train, val = (text_of(tokens_of(tmp_path / "out" / f"{s}.bin")).decode() for s in ("train", "val"))
    assert train + val == text and 0.19 < len(val.encode()) / len(text.encode()) < 0.21


def test_hf_without_datasets_says_how_to_get_it(tmp_path):
    code = ("import sys; sys.modules['datasets'] = None  # as if it were not installed\n"
            f"import data; sys.exit(data.main(['hf', '--name', 'wikitext', '--out_dir', {str(tmp_path / 'o')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc, "pip install datasets")


def write_hf_records(folder, splits):
    """A local dataset as `datasets.load_dataset(folder)` reads it: one JSON Lines file per split."""
    folder.mkdir(parents=True)
    records = {}
    for split, n in splits.items():
        records[split] = [f"Record {i} of {split}: the cat sat on the mat.\nIt was {i} degrees." for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"content": t, "id": i}) + "\n"
                                                       for i, t in enumerate(records[split])))
    return records


def run_hf(tmp_path, *args):
    # Offline, with a cache of its own: nothing may touch the network or the user's HF cache.
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    return subprocess.run([sys.executable, str(ROOT / "data.py"), "hf", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)


needs_datasets = pytest.mark.skipif(importlib.util.find_spec("datasets") is None,
                                    reason="the optional `datasets` package is not installed")


@needs_datasets
def test_hf_local_dataset_becomes_the_same_bins_and_meta(tmp_path):
    records = write_hf_records(tmp_path / "mydata", {"train": 120, "validation": 12, "test": 7})
    proc = run_hf(tmp_path, "--name", tmp_path / "mydata", "--text_field", "content", "--out_dir", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    enc = get_tokenizer()
    for split, name in (("train", "train"), ("validation", "val"), ("test", "test")):
        tokens = tokens_of(tmp_path / "out" / f"{name}.bin")
        # Each record is a document; documents are separated by <|endoftext|>, as data.py text does it.
        expected = []
        for i, text in enumerate(records[split]):
            expected += ([EOT_TOKEN] if i else []) + enc.encode_ordinary(text)
        assert tokens.tolist() == expected, split
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert {s: m["documents"] for s, m in meta["splits"].items()} == {"train": 120, "val": 12, "test": 7}
    assert meta["source"] == {"hf": str(tmp_path / "mydata"), "config": None} and meta["text_field"] == "content"


@needs_datasets
def test_hf_dataset_without_validation_holds_out_the_end_of_train(tmp_path):
    records = write_hf_records(tmp_path / "mydata", {"train": 100})
    proc = run_hf(tmp_path, "--name", tmp_path / "mydata", "--text_field", "content", "--val_fraction", "0.1",
                  "--out_dir", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    val = text_of(tokens_of(tmp_path / "out" / "val.bin")).decode()
    assert val == "".join(records["train"][90:])
    assert text_of(tokens_of(tmp_path / "out" / "train.bin")).decode() == "".join(records["train"][:90])  # not both
    assert not (tmp_path / "out" / "test.bin").exists()


@needs_datasets
@pytest.mark.parametrize("case, needles", [
    ("no_such_column", ["has no column 'body'", "content", "--text_field"]),
    ("no_such_dataset", ["could not load dataset", "check --name"]),
    ("not_text", ["column 'id' holds int values, not text", "--text_field"]),
])
def test_hf_errors_are_one_line(tmp_path, case, needles):
    write_hf_records(tmp_path / "mydata", {"train": 5})
    args = {"no_such_column": ["--name", tmp_path / "mydata", "--text_field", "body"],
            "no_such_dataset": ["--name", tmp_path / "missing"],
            "not_text": ["--name", tmp_path / "mydata", "--text_field", "id"]}[case]
    assert_one_line_error(run_hf(tmp_path, *args, "--out_dir", tmp_path / "out"), *needles)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --- TokenBins -----------------------------------------------------------------------------------------

def write_bin(folder, split, tokens):
    folder.mkdir(parents=True, exist_ok=True)
    np.asarray(tokens, dtype=np.uint16).tofile(folder / f"{split}.bin")
    return folder


@pytest.fixture
def bins(tmp_path):
    """train.bin of 24 windows of block_size 8 + 3 spare tokens; token i is i % 50257."""
    return write_bin(tmp_path, "train", np.arange(24 * 9 + 3) % 50257)


def windows_of(batches):
    return [tuple(row) for x, y in batches for row in torch.cat([x, y[:, -1:]], 1).tolist()]


def test_bins_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"train.bin not found: prepare it first \(`python data.py wikitext103`, or "
                                         r"`python data.py text --input FILES --out_dir .*`\), or point data_dir at"):
        TokenBins(tmp_path, "train", 8)
    with pytest.raises(DataError, match=r"wikitext2/train.bin not found: prepare it first \(`python data.py wikitext2`\)"):
        TokenBins(tmp_path / "data" / "wikitext2", "train", 8)  # the dataset its folder is named after
    (tmp_path / "odd.bin").write_bytes(b"\x00" * 21)
    with pytest.raises(DataError, match="odd.bin has 21 bytes"):
        TokenBins(tmp_path, "odd", 8)
    write_bin(tmp_path, "big", [1, 2, 50300, 4] * 10)
    with pytest.raises(DataError, match=r"big.bin holds token ids up to 50300 \(the first too large: 50300, at token "
                                        r"2\).*vocab_size is 50257"):
        TokenBins(tmp_path, "big", 8, vocab_size=50257)
    assert TokenBins(tmp_path, "big", 8, vocab_size=50304).n_windows == 4
    write_bin(tmp_path, "edge", [1, 2, 50257, 4] * 10)  # the first id past GPT-2's vocabulary
    with pytest.raises(DataError, match="edge.bin holds token ids up to 50257"):
        TokenBins(tmp_path, "edge", 8, vocab_size=50257)
    assert TokenBins(tmp_path, "edge", 8, vocab_size=50258).n_windows == 4
    with pytest.raises(DataError, match="big.bin has 40 tokens, less than one window"):
        TokenBins(tmp_path, "big", 40)


def test_batches_are_shifted_windows_of_the_file(bins):
    tb = TokenBins(bins, "train", 8, vocab_size=50257)
    assert (tb.n_tokens, tb.n_windows) == (219, 24)
    x, y = tb.next_batch(4)
    assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert all(x[r, 0] % 9 == 0 for r in range(4))  # every row starts on a window boundary
    assert torch.equal(x[:, :1] + torch.arange(8), x)
    assert tb.state_dict() == {"epoch": 0, "position": 4, "seed": 1337, "n_windows": 24,
                               "fingerprint": tb.fingerprint()}


def test_a_resume_on_as_many_windows_of_other_tokens_is_refused(bins, tmp_path):
    """The window count alone would let a resume go on with other data of the same size (another dataset, text
    added at the end): the fingerprint (samples spread over the file, the first and last tokens among them) is
    the split's, and the same whatever the window length or the number of ranks."""
    tb = TokenBins(bins, "train", 8)
    tb.next_batch(4)
    state = tb.state_dict()
    assert TokenBins(bins, "train", 16, rank=1, world_size=2).fingerprint() == state["fingerprint"]
    tokens = np.fromfile(bins / "train.bin", dtype=np.uint16)
    for where in (0, len(tokens) - 1):  # (the last tokens are in no window here, but text added at the end is new data)
        other = tmp_path / f"other{where}"
        other.mkdir()
        changed = tokens.copy()
        changed[where] += 1
        changed.tofile(other / "train.bin")
        with pytest.raises(DataError, match=rf"^{other / 'train.bin'} holds other tokens than the checkpoint was "
                                            r"saved with \(as many windows, other contents\): the data changed since"):
            TokenBins(other, "train", 8).load_state_dict(state)
    same = TokenBins(bins, "train", 8)
    same.load_state_dict({k: v for k, v in state.items() if k != "fingerprint"})  # a checkpoint from before it
    assert same.position == 4


def test_epochs_shuffle_differently_and_deterministically(bins):
    def epoch_windows(seed, epoch):
        tb = TokenBins(bins, "train", 8, seed=seed)
        tb.start_epoch(epoch)
        return windows_of(tb.next_batch(4) for _ in range(6))  # 24 windows, 4 per batch

    e0, e1 = epoch_windows(1337, 0), epoch_windows(1337, 1)
    assert sorted(e0) == sorted(e1) and len(set(e0)) == 24  # each window exactly once per epoch
    assert e0 != e1 and e0 == epoch_windows(1337, 0) and e0 != epoch_windows(7, 0)
    tb = TokenBins(bins, "train", 8)
    for _ in range(6):
        tb.next_batch(4)
    with pytest.raises(DataError, match="has 0 windows left, fewer than a batch of 4: call start_epoch"):
        tb.next_batch(4)


def test_ranks_together_give_the_single_process_batches(bins):
    single = TokenBins(bins, "train", 8)
    ranks = [TokenBins(bins, "train", 8, rank=r, world_size=3) for r in range(3)]
    for _ in range(4):
        x, y = single.next_batch(6)
        parts = [tb.next_batch(2) for tb in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    assert all(tb.state_dict() == single.state_dict() for tb in ranks)


def test_state_dict_resumes_with_exactly_the_next_batch(bins):
    tb = TokenBins(bins, "train", 8, seed=5)
    tb.start_epoch(2)
    tb.next_batch(3)
    state = tb.state_dict()
    expected = tb.next_batch(3)
    resumed = TokenBins(bins, "train", 8)  # default seed: the state brings its own
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(resumed.next_batch(3), expected))
    # Position is global, so two ranks resuming the same state continue the same stream.
    halves = [TokenBins(bins, "train", 8, rank=r, world_size=2) for r in range(2)]
    for h in halves:
        h.load_state_dict(state)
    batches = [h.next_batch(1) for h in halves] + [h.next_batch(1) for h in halves]
    assert windows_of(batches[:2]) + windows_of(batches[2:])[:1] == windows_of([expected])
    with pytest.raises(DataError, match="past the 24 windows"):
        resumed.load_state_dict({"epoch": 0, "position": 25, "seed": 1})
    # Other data (a bin of 30 windows) is refused, not read from the same position in another order.
    other = TokenBins(write_bin(bins / "other", "train", np.arange(30 * 9) % 50257), "train", 8)
    with pytest.raises(DataError, match=r"has 30 windows of 9 tokens, but the checkpoint was saved while training "
                                        r"on 24: the data changed since.*--init_from="):
        other.load_state_dict(state)
    assert (other.epoch, other.position) == (0, 0)


def test_eval_batches_cover_the_split_in_order(bins):
    tb = TokenBins(bins, "train", 8)
    all_windows = [tuple(range(9 * i, 9 * i + 9)) for i in range(24)]
    batches = list(tb.eval_batches(5))
    assert [len(x) for x, _ in batches] == [5, 5, 5, 5, 4] and windows_of(batches) == all_windows
    assert windows_of(tb.eval_batches(5, max_windows=10)) == all_windows[:10]
    shares = [windows_of(TokenBins(bins, "train", 8, rank=r, world_size=2).eval_batches(3, 10)) for r in range(2)]
    assert sorted(sum(shares, [])) == all_windows[:10]  # the same windows on 2 ranks as on 1
    assert windows_of(tb.eval_batches(5, device="cpu")) == all_windows
    shares = [windows_of(TokenBins(bins, "train", 8, rank=r, world_size=3).eval_batches(5)) for r in range(3)]
    assert sorted(sum(shares, [])) == all_windows and sum(map(len, shares)) == 24
    assert tb.state_dict()["position"] == 0  # evaluation does not move the training stream


def test_val_starts_with_the_next_file_when_the_cut_falls_in_a_files_last_line(tmp_path):
    """The cut falls in b.txt's one line, whose line break is its last byte: the first line (and document) after
    it is c.txt's, not the middle of b.txt's line."""
    for name, text in (("a.txt", "Hello world. This is doc one.\n"), ("b.txt", "Second doc here.\n"), ("c.txt", "x\n")):
        (tmp_path / "in" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_text(text)
    data.prepare_text([tmp_path / "in"], tmp_path / "out", val_fraction=0.1, num_workers=1)
    val = text_of(tokens_of(tmp_path / "out" / "val.bin")).decode()
    assert val == "x\n", val
    # The last file's last line holds the cut: nothing follows, so val starts mid-line (never empty).
    data.prepare_text([tmp_path / "in" / "a.txt"], tmp_path / "one", val_fraction=0.1, num_workers=1)
    assert text_of(tokens_of(tmp_path / "one" / "val.bin")).decode() == "e.\n"  # its last 10%


def test_a_folder_or_a_file_where_the_other_belongs_is_named(tmp_path):
    """--split x where x.bin is a folder; --data_dir pointing at a file (a checkpoint, say)."""
    (tmp_path / "train.bin").write_bytes(bytes(4))
    (tmp_path / "x.bin").mkdir()
    with pytest.raises(DataError, match=r"x\.bin is a folder, not a token bin: point data_dir at a folder data\.py "
                                        r"wrote"):
        data.read_bin(tmp_path / "x.bin")
    with pytest.raises(DataError, match=r"val\.bin not found \(.* has train\): pick another split"):  # (not x)
        data.read_bin(tmp_path / "val.bin")
    with pytest.raises(DataError, match=r"train\.bin is a file, not a data folder: point data_dir at the folder "
                                        r"data\.py wrote \(it holds train\.bin and val\.bin\)$"):
        data.read_bin(tmp_path / "train.bin" / "test.bin")


@pytest.mark.parametrize("content, message", [
    (b"", "is empty (no tokens): it is truncated, or its split got no text; prepare it again with data.py"),
    (b"\x01\x02\x03", "has 3 bytes, an odd number, not whole uint16 tokens: it is truncated or not a token bin"),
])
def test_a_bin_that_holds_no_whole_tokens_is_named(tmp_path, content, message):
    (tmp_path / "val.bin").write_bytes(content)
    with pytest.raises(DataError) as e:
        data.read_bin(tmp_path / "val.bin")
    assert str(e.value).startswith(f"{tmp_path / 'val.bin'} {message}")


def test_a_url_download_stopped_while_tokenizing_is_not_downloaded_again(tmp_path, server, wikitext_zip,
                                                                            audit_hooked):
    """A first --url run killed (kill -9: a Kaggle session's end) once its download is done, while it tokenizes: no
    meta.json says where the zip came from, but the note beside the zip does, and the same command uses it."""
    zip_path, raw, _ = wikitext_zip
    server.files["/w.zip"] = zip_path.read_bytes()
    out, url = tmp_path / "out", server.url("/w.zip")
    kill_at_the_bins = """
        def hook(event, args):
            if event == "open" and str(args[0]).endswith(".bin.tmp"):
                os.kill(os.getpid(), signal.SIGKILL)"""
    killed = subprocess.run([*audit_hooked(kill_at_the_bins), str(ROOT / "data.py"), "wikitext103", "--url", url,
                             "--out_dir", str(out), "--num_workers", "1"], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL and not (out / "meta.json").exists(), killed.stderr
    assert len(server.requests) == 1
    again = run_cli("wikitext103", "--url", url, "--out_dir", out, "--num_workers", 1)
    assert again.returncode == 0 and "using the zip already downloaded" in again.stdout, again.stdout + again.stderr
    assert len(server.requests) == 1 and text_of(tokens_of(out / "train.bin")) == raw["train"]
