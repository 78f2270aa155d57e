"""`--run.report_to`: one RL run sends its metrics and held-out samples to TensorBoard, W&B (offline), MLflow (a local
file store) and Trackio (a local directory) at once, with no network; each tracker's own reader must give back
what metrics.jsonl and samples.jsonl hold. Plus a resumed stage continuing its tracker run, and bad settings."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRACKERS = ["tensorboard", "wandb", "mlflow", "trackio"]
for module in ("tensorboard", "wandb", "mlflow", "trackio"):
    pytest.importorskip(module)


def tracker_env(root: Path) -> dict[str, str]:
    """Every tracker local and offline, as a user without a server would set them."""
    return {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(root / "wandb"),
        "WANDB_SILENT": "true",
        "MLFLOW_TRACKING_URI": (root / "mlruns").as_uri(),
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "TRACKIO_DIR": str(root / "trackio"),
    }


@contextlib.contextmanager
def environment(env: dict[str, str]):
    """`env` set in this process too (the trackers' readers take their settings from it)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def rl(out: Path, actor: Path, data: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    args = [
        sys.executable, "-m", "chatrlhf", "rl", "--actor", str(actor), "--output_dir", str(out),
        "--data.paths", str(data), "--data.eval_fraction", "0.1", "--train.algo", "grpo", "--train.group_size", "2",
        "--reward_functions", "chatrlhf.demo.task:judge", "--judge", "chatrlhf.demo.task:judge",
        "--train.rollout_batch_size", "4", "--train.generation.max_new_tokens", "6", "--train.eval_every", "2",
        "--train.eval_prompts", "3", "--run.progress", "False", "--run.log_every", "1",
        "--run.report_to", *TRACKERS, "--run.project", "trackers-test", *extra,
    ]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env})


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dirs, pairs_file):
    root = tmp_path_factory.mktemp("trackers")
    env = tracker_env(root)
    proc = rl(root / "rl", tiny_dirs["llama"], pairs_file, env, "--train.iterations", "4")
    assert proc.returncode == 0, proc.stderr
    out = root / "rl"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    return root, env, out, lines, samples


def series(lines: list[dict], key: str) -> list[tuple[int, float]]:
    return [(m["step"], m[key]) for m in lines if m.get(key) is not None]


def test_tensorboard_has_every_scalar_and_the_samples(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, out, lines, samples = run
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for key in ("reward/score_mean", "loss/policy", "eval/judge_mean", "time/elapsed_s"):
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in series(lines, key)]
        assert [v for _, v in got] == pytest.approx([v for _, v in series(lines, key)], rel=1e-6)
    texts = events.Tensors("samples/text_summary")
    assert [t.step for t in texts] == sorted({r["iteration"] for r in samples})
    table = texts[-1].tensor_proto.string_val[0].decode()
    assert samples[-1]["response"].replace("|", "\\|").replace("\n", " ") in table


def wandb_history(path: Path) -> dict[int, dict]:
    """step → logged values, read from an offline run's transaction log: a 7-byte header, then LevelDB-log blocks
    of 32 KiB whose records (4-byte checksum, 2-byte length, 1-byte type: full, first, middle, last) carry
    W&B's protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending, records = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind in (2, 3):
            pending = (pending if kind == 3 else b"") + chunk
        elif kind == 4:
            records.append(pending + chunk)
    history = {}
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row["_step"]] = row
    return history


def test_wandb_offline_run_holds_every_value_and_the_samples(run):
    root, _, out, lines, samples = run
    ids = json.loads((out / "trackers.json").read_text())
    (run_dir,) = (root / "wandb" / "wandb").glob(f"offline-run-*-{ids['wandb']}")
    history = wandb_history(next(run_dir.glob("run-*.wandb")))
    for line in lines:
        logged = {k: v for k, v in line.items() if k not in ("stage", "step") and v is not None}
        got = history[line["step"]]
        assert {k: got[k] for k in logged} == pytest.approx(logged, rel=1e-6)
    steps = sorted({r["iteration"] for r in samples})
    assert [s for s, row in sorted(history.items()) if row.get("samples/_type") == "table-file"] == steps
    assert [history[s]["samples/nrows"] for s in steps] == [sum(r["iteration"] == s for r in samples) for s in steps]
    tables = sorted((run_dir / "files" / "media" / "table").glob("samples_*.table.json"))
    assert len(tables) == len(steps)
    last = json.loads(max(tables, key=lambda p: int(p.name.split("_")[1])).read_text())
    assert last["columns"] == ["iteration", "prompt", "response", "reward", "judge"]
    assert [row[2] for row in last["data"]] == [r["response"] for r in samples if r["iteration"] == steps[-1]]


def test_mlflow_file_store_has_every_metric_series_and_the_sample_tables(run):
    import mlflow

    root, env, out, lines, samples = run
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    with environment(env):
        client = mlflow.tracking.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        got = client.get_run(run_id)
        assert got.info.run_name == "rl" and got.data.tags["stage"] == "rl"
        assert client.get_experiment(got.info.experiment_id).name == "trackers-test"
        for key in ("reward/score_mean", "loss/policy", "eval/judge_mean"):
            history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            assert [s for s, _ in history] == [s for s, _ in series(lines, key)]
            assert [v for _, v in history] == pytest.approx([v for _, v in series(lines, key)], rel=1e-6)
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        artifacts |= {a.path for a in client.list_artifacts(run_id, "samples")}
    steps = sorted({r["iteration"] for r in samples})
    assert {"config.json", *(f"samples/step-{s}.json" for s in steps)} <= artifacts


def trackio_logs(env: dict, project: str, run: str) -> list[dict]:
    """Every row Trackio stored for `run`, read from its SQLite file (one database per project)."""
    with sqlite3.connect(Path(env["TRACKIO_DIR"]) / f"{project}.db") as db:
        rows = db.execute("SELECT step, metrics FROM metrics WHERE run_name = ? ORDER BY id", (run,)).fetchall()
    return [{"step": step, **json.loads(metrics)} for step, metrics in rows]


def test_trackio_has_every_value_and_the_samples(run):
    _, env, _, lines, samples = run
    logs = trackio_logs(env, "trackers-test", "rl")
    by_step: dict[int, dict] = {}
    for row in logs:
        by_step.setdefault(row["step"], {}).update(row)
    for line in lines:
        logged = {k: v for k, v in line.items() if k not in ("stage", "step") and v is not None}
        assert {k: by_step[line["step"]][k] for k in logged} == pytest.approx(logged, rel=1e-6)
    tables = [(row["step"], row["samples"]) for row in logs if "samples" in row]
    assert [step for step, _ in tables] == sorted({r["iteration"] for r in samples})
    assert all(t["_type"] == "trackio.table" for _, t in tables)


def test_bad_tracker_settings_are_refused(tmp_path, tiny_dirs, pairs_file):
    proc = rl(tmp_path / "rl", tiny_dirs["llama"], pairs_file, tracker_env(tmp_path), "--run.report_to", "wandbb")
    assert proc.returncode == 2 and "run.report_to" in proc.stderr and "wandb" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "rl").exists()


def test_a_tracker_that_cannot_start_stops_the_stage_with_its_reason(tmp_path, tiny_dirs, pairs_file):
    env = {**tracker_env(tmp_path), "MLFLOW_TRACKING_URI": "no-such-scheme://x", "MLFLOW_ALLOW_FILE_STORE": ""}
    proc = rl(tmp_path / "rl", tiny_dirs["llama"], pairs_file, env, "--run.report_to", "mlflow")
    assert proc.returncode == 2, proc.stderr
    assert "run.report_to: mlflow could not start" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "rl").exists()


RESUMED = """
import json, sys
from pathlib import Path
from chatrlhf.trackers import open_trackers
out, resumed, first, last = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
trackers = open_trackers(["mlflow", "trackio"], out, "run-a", "rl", "p", {"a": 1}, resumed)
for step in range(first, last + 1):
    for t in trackers:
        t.log({"loss/x": float(step)}, step)
for t in trackers:
    t.close()
"""


def test_a_resumed_stage_continues_its_tracker_runs(tmp_path):
    """A fresh stage keeps its tracker run ids in trackers.json; a resumed one logs into the same runs."""
    import mlflow

    env = tracker_env(tmp_path)
    out = tmp_path / "stage"
    out.mkdir()

    def session(resumed: bool, first: int, last: int) -> dict:
        args = [sys.executable, "-c", RESUMED, str(out), str(int(resumed)), str(first), str(last)]
        proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **env})
        assert proc.returncode == 0, proc.stderr
        return json.loads((out / "trackers.json").read_text())

    first = session(False, 1, 2)
    again = session(True, 3, 4)
    assert again == first
    with environment(env):
        history = mlflow.tracking.MlflowClient().get_metric_history(first["mlflow"], "loss/x")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(1, 5)]
    assert [(r["step"], r["loss/x"]) for r in trackio_logs(env, "p", first["trackio"])] == [
        (s, float(s)) for s in range(1, 5)
    ]
    fresh = session(False, 1, 1)  # not resumed: new runs
    assert fresh["mlflow"] != first["mlflow"]


def test_pipeline_stages_are_tracker_runs_named_after_the_run(tmp_path):
    """The GRPO demo recipe on a budget of seconds: one MLflow run per stage, `NAME/sft`, `NAME/reward`, `NAME/rl`."""
    import mlflow

    env = tracker_env(tmp_path)
    args = [
        sys.executable, "-m", "chatrlhf", "pipeline", "--recipe", "recipes/demo-grpo.yaml",
        "--run_dir", str(tmp_path / "demo-run"), "--data.paths", "demo:pairs:400:0",
        "--model", "tiny:llama:hidden=32,layers=2,heads=4", "--sft.epochs", "1", "--rl.iterations", "2",
        "--rl.rollout_batch_size", "8", "--rl.generation.max_new_tokens", "8", "--eval.num_prompts", "4",
        "--eval.samples_per_prompt", "1", "--run.progress", "False", "--run.report_to", "mlflow",
        "--reward_gate.action", "warn",
    ]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    with environment(env):
        runs = mlflow.search_runs(experiment_names=["chatrlhf"], output_format="list")
    assert sorted(r.info.run_name for r in runs) == ["demo-run/reward", "demo-run/rl", "demo-run/sft"]
    assert {r.data.tags["stage"] for r in runs} == {"sft", "reward", "rl"}
