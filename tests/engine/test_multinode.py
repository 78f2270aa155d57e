"""Two nodes simulated on one machine: a DeepSpeed run launched as two torchrun "nodes" on loopback, killed after a
checkpoint and resumed, ends where a single-node 2-rank run ends.

Each node is its own launcher process, as on a cluster: `torchrun --nnodes 2 --nproc_per_node 1 --node_rank 0|1
--master_addr 127.0.0.1 --master_port P -m chatrlhf sft ...`, both writing the same run directory (the shared
filesystem of docs/scale.md). The two-node run is SIGKILLed, both nodes at once (a lost job), once it holds a
checkpoint and before it finishes, then both nodes are started again with `--resume auto`. The reference is the
same stage on one node with 2 ranks (`--standalone --nproc_per_node 2`): the same world size, so the same math.
The resumed run must log every step once, in order, each within the equivalence tolerance of
tests/engine/test_deepspeed.py (EQUAL) of the reference, and save a model that loads in plain transformers with the
reference's logits.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 240
"""A run that takes longer has hung (each takes 20-40 s on 2 CPU cores; most of it is imports)."""
EQUAL = {"rel_tol": 1e-5, "abs_tol": 1e-6}
STEPS, EVERY = 8, 2
"""61 training records in global micro-batches of 8 (4 per rank): 8 optimizer steps; a checkpoint every 2."""


def stage_args(model: str, out: Path) -> list[str]:
    return [
        "sft", "--model", model, "--data.paths", "demo:pairs:64:0", "--train.batch_size", "4",
        "--train.max_seq_len", "128", "--train.eval_every", "2", "--train.optim.lr", "1e-3",
        "--engine.kind", "deepspeed", "--engine.zero_stage", "3", "--checkpoint.every", str(EVERY),
        "--run.progress", "False", "--run.log_every", "1", "--output_dir", str(out),
    ]  # fmt: skip


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(torchrun: list[str], args: list[str], log: Path) -> subprocess.Popen:
    """One launcher process: a node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun, "-m", "chatrlhf", *args]
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=environment())


def two_nodes(args: list[str], logs: Path, name: str) -> list[subprocess.Popen]:
    port = free_port()
    return [
        launch(
            [
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(node),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
            ],
            args,
            logs / f"{name}-node{node}.log",
        )  # fmt: skip
        for node in (0, 1)
    ]


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants. torchrun starts each rank in a session of its own, so killing the launcher's
    process group would leave the ranks running."""
    pids, i = [pid], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*"):
            try:
                pids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # the task ended meanwhile
                pass
        i += 1
    return pids


def kill(procs: list[subprocess.Popen]) -> None:
    """SIGKILL every node's launcher and ranks at once, as when a job is lost."""
    pids = [p for proc in procs if proc.poll() is None for p in tree(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in procs:
        proc.wait()


def finish(procs: list[subprocess.Popen], logs: list[Path]) -> list[str]:
    """Wait for every launcher; each must exit 0. Returns their output."""
    deadline = time.time() + DEADLINE_S
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
        kill(procs)
        pytest.fail("hung:\n" + "\n".join(log.read_text(errors="replace")[-4000:] for log in logs))
    texts = [log.read_text(errors="replace") for log in logs]
    for proc, log, text in zip(procs, logs, texts):
        assert proc.returncode == 0, f"{log.name}: exit {proc.returncode}\n{text[-8000:]}"
    return texts


def logged_steps(run: Path) -> list[int]:
    """Steps of the complete lines of metrics.jsonl (a kill may cut the last one short)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    return [json.loads(line)["step"] for line in text[: text.rfind("\n") + 1].splitlines()]


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in (run / "checkpoints").glob("step-*"))


def kill_after_checkpoint(model: str, run: Path, logs: Path) -> int:
    """Run on two nodes and SIGKILL both once the run holds a checkpoint; the newest checkpoint's step. A run that
    finishes before the kill lands is started again in a fresh directory."""
    for attempt in range(3):
        procs = two_nodes(stage_args(model, run), logs, f"killed-{attempt}")
        deadline = time.time() + DEADLINE_S
        while all(p.poll() is None for p in procs) and not checkpoint_steps(run) and time.time() < deadline:
            time.sleep(0.01)
        kill(procs)
        if time.time() >= deadline:
            pytest.fail(f"no checkpoint within {DEADLINE_S} s:\n" + (logs / f"killed-{attempt}-node0.log").read_text())
        if checkpoint_steps(run) and not (run / "model").exists():
            return checkpoint_steps(run)[-1]
        for proc in procs:
            assert proc.returncode in (0, -signal.SIGKILL), (logs / f"killed-{attempt}-node0.log").read_text()
        shutil.rmtree(run, ignore_errors=True)
    pytest.fail("the run finished before every kill")


def step_metrics(run: Path) -> dict[int, dict[str, float]]:
    """step → every logged value of that step (its lines merged), timings left out."""
    steps: dict[int, dict[str, float]] = {}
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        values = {
            k: v for k, v in record.items() if k not in ("stage", "step") and not k.startswith(("time/", "perf/"))
        }
        steps.setdefault(record["step"], {}).update(values)
    return steps


@torch.no_grad()
def test_two_nodes_killed_and_resumed_match_one_node(tmp_path, tiny_dirs):
    model = str(tiny_dirs["llama"])
    reference, run = tmp_path / "one-node", tmp_path / "two-nodes"
    one_node = [launch(["--standalone", "--nproc_per_node", "2"], stage_args(model, reference), tmp_path / "one.log")]

    newest = kill_after_checkpoint(model, run, tmp_path)
    assert newest < STEPS and not (run / "model").exists(), "killed before the end"
    resumed_logs = [tmp_path / f"resumed-node{node}.log" for node in (0, 1)]
    out = finish(two_nodes([*stage_args(model, run), "--resume", "auto"], tmp_path, "resumed"), resumed_logs)
    assert f"(step {newest})" in out[0], "node 0 did not resume from the newest checkpoint"
    # each rank restored its own shard: the checkpoint holds one ZeRO-3 shard per rank, written by the two nodes
    assert checkpoint_steps(run)[-1] == STEPS
    last = max((run / "checkpoints").glob("step-*"))
    shards = sorted(p.name for p in (last / "sft").glob("zero_pp_rank_*"))
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]
    finish(one_node, [tmp_path / "one.log"])

    # the same lines, step by step, as the uninterrupted run: nothing after the checkpoint logged twice
    assert logged_steps(run) == logged_steps(reference)
    got, want = step_metrics(run), step_metrics(reference)
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(want)
    bad = [
        f"step {step} {key}: {got[step].get(key)!r} vs {v!r}"
        for step, values in want.items()
        for key, v in values.items()
        if key not in got[step] or not math.isclose(got[step][key], v, **EQUAL)
    ]
    assert not bad, "\n".join(bad)
    assert sorted(got[STEPS]) == sorted(want[STEPS])

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run / "model")
    batch = tok(["User: name a colour\nAssistant:", "hi"], return_tensors="pt", padding=True)
    a = AutoModelForCausalLM.from_pretrained(run / "model").eval()(**batch).logits
    b = AutoModelForCausalLM.from_pretrained(reference / "model").eval()(**batch).logits
    assert (a - b).abs().max() <= 1e-5
