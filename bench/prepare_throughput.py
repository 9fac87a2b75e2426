"""data.py's tokenization speed and memory against a single-threaded tiktoken encode_ordinary.

    python bench/prepare_throughput.py [--sizes 50 200] [--rounds 3] [--num_workers N] [--json]

Writes a WikiText-like text of each size (MB, deterministic) and, alternating for --rounds rounds, runs
`python data.py text` on it as a user would (a fresh process; its whole process tree's memory sampled;
its own reported tokenization MB/s, which leaves out its start-up) and times encode_ordinary over the
same text in this process, one thread, in 1 MB pieces cut at line ends. Reports medians, the median
of the paired ratios, and the load average (on a shared machine other sessions take cores too).
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from common import ROOT, at_least_one, emit_json, interleaved, paired_ratio

import data
import hardware


def make_text(path, mb, seed=0):
    """A WikiText-like file of `mb` MB: titles, sections, paragraphs of GPT-2-vocabulary words, numbers,
    punctuation and made-up words (which BPE must split), so encoding costs about what real prose costs."""
    rng = np.random.default_rng(seed)
    enc = data.get_tokenizer()
    words = [w for w in (enc.decode([i]) for i in range(256, 50000)) if w.startswith(" ") and w[1:].isalpha()]
    syllables = np.array(["ka", "lo", "mer", "ti", "vun", "sa", "dre", "qui", "ox", "bel", "ny", "fä", "ž"])
    invented = [" " + "".join(rng.choice(syllables, size=rng.integers(2, 5))) for _ in range(20000)]
    extra = [" ,", " .", " ;", " (", " )", " @-@", " @,@", " \"", " 's", " 1", " 19", " 2004", " 3 @.@ 5"]
    vocab = np.array(words[:20000] + invented + extra * 400, dtype=object)
    cdf = np.cumsum(1.0 / np.arange(1, len(vocab) + 1) ** 0.9)  # Zipf-like: common words far more often
    cdf /= cdf[-1]
    target = int(mb * 1e6)
    written, article = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            lengths = rng.integers(20, 200, size=2000)  # words per paragraph
            flat = vocab[np.searchsorted(cdf, rng.random(int(lengths.sum())))].tolist()
            lines, at = [], 0
            for i, n in enumerate(lengths):
                if i % 12 == 0:
                    lines += [f" = {flat[at][1:].title()} {article} = \n", " \n"]
                    article += 1
                if i % 3 == 0:
                    lines += [f" = = Section {i % 12 // 3} = = \n", " \n"]
                lines.append("".join(flat[at:at + n]) + " \n")
                at += n
            text = "".join(lines)
            if written + len(text.encode("utf-8")) > target:  # end on a line break near the target size
                text = text[:text.rfind("\n", 0, target - written) + 1]
            f.write(text)
            written += len(text.encode("utf-8"))
            if not text:
                break
    return path


def prefix_copy(src, dst, mb):
    """The first ~mb MB of src, up to a line end, as its own file."""
    with open(src, "rb") as f, open(dst, "wb") as out:
        out.write(f.read(int(mb * 1e6)) + f.readline())
    return dst


def single_thread_mb_s(path):
    """encode_ordinary's MB/s on the file, one thread, timing only the encoding (1 MB pieces at line ends)."""
    enc = data.get_tokenizer()
    seconds, n = 0.0, 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20) + f.readline():
            text = block.decode("utf-8")
            start = time.perf_counter()
            enc.encode_ordinary(text)
            seconds += time.perf_counter() - start
            n += len(block)
    return n / 1e6 / seconds


def load_average():
    """The 1-minute load average, rounded (None where there is none: Windows)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _tree_rss(root):
    """Sum of VmRSS (bytes) over `root` and its descendants: an upper bound, shared pages count in each (Linux's
    /proc; 0 elsewhere: not measured)."""
    parent, rss = {}, {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                status = f.read()
        except OSError:  # gone meanwhile
            continue
        pid = int(entry)
        parent[pid] = int(re.search(r"^PPid:\s+(\d+)", status, re.M).group(1))
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        rss[pid] = int(m.group(1)) * 1024 if m else 0
    tree, grew = {root}, True
    while grew:
        new = {p for p, pp in parent.items() if pp in tree} - tree
        tree |= new
        grew = bool(new)
    return sum(rss.get(p, 0) for p in tree)


def run_data_py(path, out_dir, num_workers):
    """`python data.py text` on the file: (its own tokenization MB/s, wall seconds, peak tree RSS bytes)."""
    cmd = [sys.executable, str(ROOT / "data.py"), "text", "--input", str(path), "--out_dir", str(out_dir),
           "--num_workers", str(num_workers), "--force"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = [0]

    def sample():  # every 50 ms until the process ends
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out = proc.communicate()[0]
    wall = time.perf_counter() - start
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"data.py failed (exit {proc.returncode}):\n{out}")
    rate = float(re.search(r"tokenized .* \(([\d.]+) MB/s", out).group(1))
    return rate, wall, peak[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[50, 200], help="input sizes in MB")
    p.add_argument("--rounds", type=at_least_one, default=3, help="alternating rounds of ours and the peer per size")
    p.add_argument("--num_workers", type=int, default=data.default_num_workers())
    p.add_argument("--work_dir", default=None, help="where the generated text goes (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="prepare_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    rows = []
    try:
        sizes = sorted(args.sizes)
        biggest = make_text(work / f"text_{sizes[-1]:g}MB.txt", sizes[-1])
        for mb in sizes:
            path = biggest if mb == sizes[-1] else prefix_copy(biggest, work / f"text_{mb:g}MB.txt", mb)
            rate, walls, peaks = {"ours": [], "peer": []}, [], []

            def ours():
                r, wall, peak = run_data_py(path, work / "out", args.num_workers)
                rate["ours"].append(r)
                walls.append(wall)
                peaks.append(peak)

            interleaved({"ours": ours, "peer": lambda: rate["peer"].append(single_thread_mb_s(path))},
                        args.rounds)
            real_mb = path.stat().st_size / 1e6
            # paired_ratio(fast, slow) takes times; rates are inverse times
            ratio = paired_ratio([1 / r for r in rate["ours"]], [1 / r for r in rate["peer"]])
            rows.append({"mb": round(real_mb, 1), "ours": round(statistics.median(rate["ours"]), 2),
                         "peer": round(statistics.median(rate["peer"]), 2), "ratio": round(ratio, 2),
                         "cli_wall_s": round(statistics.median(walls), 2),
                         "peak_rss_mb": round(max(peaks) / 1e6)})
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    load = [load_before, load_average()]

    device = f"cpu: {hardware.probe_facts('cpu').name}, {data.default_num_workers()} cores usable"
    print(f"data.py tokenization vs single-thread encode_ordinary ({args.num_workers} workers; {device}; "
          f"load average {load[0]} before, {load[1]} after)")
    print(f"{'input MB':>9} {'ours MB/s':>10} {'peer MB/s':>10} {'ratio':>6} {'CLI wall s':>11} "
          f"{'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['mb']:>9} {r['ours']:>10} {r['peer']:>10} {r['ratio']:>6} {r['cli_wall_s']:>11} "
              f"{r['peak_rss_mb']:>12}")
    if args.json:
        last = rows[-1]
        emit_json({"bench": "prepare_throughput", "unit": "MB/s", "ours": last["ours"], "peer": last["peer"],
                   "ratio": last["ratio"], "device": device, "num_workers": args.num_workers,
                   "peak_rss_mb": {f"{r['mb']:g}": r["peak_rss_mb"] for r in rows},
                   "load_average": load, "rows": rows})


if __name__ == "__main__":
    main()
