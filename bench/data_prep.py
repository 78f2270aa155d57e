"""Time and peak memory of preparing a reward model's data: 100k and 1M synthetic preference pairs.

    python bench/data_prep.py                              # 100k and 1M pairs (7.5 minutes on a shared 2-core CPU)
    python bench/data_prep.py --sizes 100000 --num-proc 2  # one size, two processes for validating and tokenizing

For each size N the script writes N synthetic pairs ({prompt, chosen, rejected}, seeded) as two JSON Lines files of
N/2 pairs each, then measures three child processes:

    raw     the list-based representation the preparation avoids: every record of both files held as a
            `RawRecord` (the dict `json.loads` gives, its file and line): its memory is the data's in-memory size
    cold    the reward stage's preparation (`train/data.py`, then `encode_all` as train/reward.py calls it), with
            an empty cache: read both files into Arrow, blend them (weights 1 1: a seeded shuffle of the two),
            validate every pair, hold out 5% for evaluation (the split), tokenize the train and held-out pairs
            with the tiny byte tokenizer and its chat template (max_seq_len 512); then read every item once
    warm    the same again, with the cache the cold run left

Each child reports its phase times and its memory, polled from /proc/self/status every 0.05 s: the peak of VmRSS
(all resident pages) and of RssAnon (the process's own heap; VmRSS also counts the pages of memory-mapped cache
files that were read, which the kernel can drop at any time). The tables give the peaks above the process's
memory after its imports (torch, transformers, datasets), so that the import floor does not hide the data, and the
ratio of the preparation's peak heap to the raw data's in-memory size. bench/_runner.py measures each child from
outside as well (VmHWM of its process tree, CPU used by other work meanwhile). The cache is a temporary directory,
deleted at the end (unless --keep).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _runner import fmt_table, machine_summary, run_measured

WORDS = (
    "the a of to and in is it you that he was for on are with as his they be at one have this from or had by hot "
    "word but what some we can out other were all there when up use your how said an each she which do their time "
    "if will way about many then them write would like so these her long make thing see him two has look more day "
    "could go come did number sound no most people my over know water than call first who may down side been now"
).split()
SEED = 11


# ---------------------------------------------------------------- the synthetic data


def write_pairs(path: Path, n: int, seed: int) -> int:
    """`n` pairs of random words as JSON Lines: prompt 8–40 words, answers 4–30 words, distinct. → bytes written."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    with path.open("w", encoding="utf-8") as f:
        for start in range(0, n, 10_000):
            m = min(10_000, n - start)
            lengths = rng.integers([8, 4, 4], [41, 31, 31], size=(m, 3))
            picks = rng.integers(0, len(words), size=(m, lengths.sum(1).max()))
            lines = []
            for i in range(m):
                p, c, r = lengths[i]
                row = words[picks[i]]
                record = {
                    "prompt": f"Question {start + i}: " + " ".join(row[:p]) + "?",
                    "chosen": " ".join(row[p : p + c]) + ".",
                    "rejected": "No, " + " ".join(row[p + c : p + c + r]) + "!",
                }
                lines.append(json.dumps(record))
            f.write("\n".join(lines) + "\n")
    return path.stat().st_size


# ---------------------------------------------------------------- children: measured in their own process


class MemoryPoll(threading.Thread):
    """The peaks of VmRSS and RssAnon of this process, polled every 0.05 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = {"VmRSS": 0, "RssAnon": 0}
        self.stop = threading.Event()

    @staticmethod
    def now() -> dict[str, int]:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(line.split()[1]) * 1024
        return out

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.sample()

    def sample(self) -> None:
        now = self.now()
        for key in self.peak:
            self.peak[key] = max(self.peak[key], now[key])


def child_raw(files: list[Path], out: Path) -> None:
    """Hold every record of `files` as the list-based reader did: a list of `RawRecord`s."""
    from chatrlhf.data.raw import RawRecord

    gc.collect()
    before = MemoryPoll.now()
    t0 = time.time()
    records = []
    for path in files:
        spec = str(path)
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                records.append(RawRecord(json.loads(line), spec, f"line {number}"))
    gc.collect()
    after = MemoryPoll.now()
    result = {
        "records": len(records),
        "read_s": time.time() - t0,
        "in_memory_bytes": after["RssAnon"] - before["RssAnon"],
    }
    out.write_text(json.dumps(result))


def child_prepare(files: list[Path], cache: Path, num_proc: int, out: Path) -> None:
    """The reward stage's preparation of `files` (train/reward.py's data lines), timed phase by phase."""
    t0 = time.time()
    import datasets  # noqa: F401  (imported by the preparation when it first needs it: part of the floor)

    from chatrlhf.data import to_pair
    from chatrlhf.data.cache import Prep
    from chatrlhf.data.collate import encode_all, encode_pair
    from chatrlhf.models.tiny import byte_tokenizer
    from chatrlhf.train.data import convert, load_raw, train_eval_split

    tok = byte_tokenizer()
    gc.collect()
    floor = MemoryPoll.now()
    poll = MemoryPoll()
    poll.start()
    times = {"imports": time.time() - t0}
    prep = Prep(num_proc=num_proc, cache_dir=str(cache))

    def phase(name, f):
        start = time.time()
        value = f()
        times[name] = time.time() - start
        return value

    rows = phase("read + blend", lambda: load_raw([str(p) for p in files], [1.0, 1.0], SEED, cache, prep=prep))
    recs = phase("validate", lambda: convert(rows, to_pair, False, "preference-pair"))
    train, held = phase("split", lambda: train_eval_split(recs, [], 0.05, SEED))
    items = phase("tokenize", lambda: encode_all(train, encode_pair, tok, max_len=512))
    held_items = phase("tokenize held-out", lambda: encode_all(held, encode_pair, tok, max_len=512))
    tokens = phase("read every item", lambda: sum(len(c) + len(r) for c, r in items))
    poll.stop.set()
    poll.join()
    poll.sample()
    result = {
        "times": times,
        "prepare_s": sum(v for k, v in times.items() if k not in ("imports", "read every item")),
        "train_pairs": len(items),
        "held_out_pairs": len(held_items),
        "train_tokens": tokens,
        "floor": floor,
        "peak": poll.peak,
        "cache_bytes": sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()),
    }
    out.write_text(json.dumps(result))


# ---------------------------------------------------------------- the parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="pairs per run")
    p.add_argument("--num-proc", type=int, default=1, help="data.num_proc: processes that validate and tokenize")
    p.add_argument("--workdir", type=Path, default=None, help="data files and cache (default: a new temp directory)")
    p.add_argument("--json", type=Path, default=None, help="also write all results here (default: WORKDIR)")
    p.add_argument("--keep", action="store_true", help="keep the data files and the cache")
    p.add_argument("--child", choices=["raw", "prepare"], help=argparse.SUPPRESS)
    p.add_argument("--files", type=Path, nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def measured(kind: str, files: list[Path], cache: Path, num_proc: int, work: Path, name: str) -> dict:
    out = work / f"{name}.json"
    cmd = [sys.executable, __file__, "--child", kind, "--files", *map(str, files), "--cache", str(cache)]
    cmd += ["--num-proc", str(num_proc), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = run_measured(cmd, work / f"{name}.log", env=env, timeout_s=3600)
    if run.returncode != 0:
        raise SystemExit(f"{name} failed (exit {run.returncode}); see {work / f'{name}.log'}")
    result = json.loads(out.read_text())
    result["outside"] = {
        "cmd": cmd,
        "wall_s": run.wall_s,
        "tree_peaks_bytes": {p.role: p.peak_bytes for p in run.procs},
        "tree_maxrss_bytes": run.tree_maxrss_bytes,
        "cpu_s": run.cpu_s,
        "other_cores": run.other_cores,
        "load_before": run.load_before,
        "load_after": run.load_after,
    }
    return result


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def report(results: list[dict]) -> str:
    rows = []
    for r in results:
        raw = r["raw"]["in_memory_bytes"]
        for run in ("cold", "warm"):
            x = r[run]
            anon = x["peak"]["RssAnon"] - x["floor"]["RssAnon"]
            rss = x["peak"]["VmRSS"] - x["floor"]["VmRSS"]
            children = {k: v for k, v in x["outside"]["tree_peaks_bytes"].items() if k != "main"}
            rows.append([
                f"{r['pairs']:,} {run}", f"{x['prepare_s']:.1f}", f"{x['prepare_s'] / r['pairs'] * 1e6:.0f}",
                mib(anon), mib(rss), f"{anon / raw:.2f}", mib(max(children.values())) if children else "-",
                f"{x['outside']['other_cores']:.2f}",
            ])  # fmt: skip
    header = ["pairs, run", "prepare s", "µs/pair", "peak heap MiB", "peak RSS MiB", "heap / raw", "worker MiB",
              "other cores"]  # fmt: skip
    sizes = [
        [f"{r['pairs']:,}", mib(r["file_bytes"]), mib(r["raw"]["in_memory_bytes"]), mib(r["cold"]["cache_bytes"]),
         f"{r['cold']['train_pairs']:,} / {r['cold']['held_out_pairs']:,}"]
        for r in results
    ]  # fmt: skip
    phases = [
        [f"{r['pairs']:,} {run}", *(f"{r[run]['times'][k]:.1f}" for k in PHASES)]
        for r in results
        for run in ("cold", "warm")
    ]
    return "\n\n".join([
        fmt_table(["pairs", "JSONL MiB", "raw in memory MiB", "cache MiB", "train / held-out"], sizes),
        fmt_table(header, rows),
        fmt_table(["pairs, run", *PHASES], phases),
    ])  # fmt: skip


PHASES = ("read + blend", "validate", "split", "tokenize", "tokenize held-out", "read every item")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child == "raw":
        return child_raw(args.files, args.out)
    if args.child == "prepare":
        return child_prepare(args.files, args.cache, args.num_proc, args.out)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="chatrlhf-data-prep-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in args.sizes:
        files = [work / f"pairs-{n}-a.jsonl", work / f"pairs-{n}-b.jsonl"]
        size = write_pairs(files[0], n // 2, SEED) + write_pairs(files[1], n - n // 2, SEED + 1)
        cache = work / f"cache-{n}"
        shutil.rmtree(cache, ignore_errors=True)
        result = {"pairs": n, "file_bytes": size, "num_proc": args.num_proc}
        result["raw"] = measured("raw", files, cache, args.num_proc, work, f"raw-{n}")
        result["cold"] = measured("prepare", files, cache, args.num_proc, work, f"cold-{n}")
        result["warm"] = measured("prepare", files, cache, args.num_proc, work, f"warm-{n}")
        results.append(result)
        print(f"{n:,} pairs: cold {result['cold']['prepare_s']:.1f}s, warm {result['warm']['prepare_s']:.1f}s",
              flush=True)  # fmt: skip
        if not args.keep:
            shutil.rmtree(cache)
            for f in files:
                f.unlink()
    print()
    print(report(results))
    path = args.json or work / "data_prep.json"
    path.write_text(json.dumps({"machine": machine_summary(), "args": sys.argv[1:], "results": results}, indent=1))
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
