"""Experiment trackers: every metric a stage logs, and the RL stage's held-out samples, also sent to TensorBoard,
Weights & Biases, MLflow or Trackio (`--run.report_to`, docs/metrics.md#trackers).

Each tracker is an optional dependency (`pip install 'chatrlhf[wandb]'`, ...), imported only when named. Each is
configured the way its users already configure it — W&B's `WANDB_MODE`, `WANDB_DIR`, `WANDB_ENTITY`, MLflow's
`MLFLOW_TRACKING_URI`, Trackio's `TRACKIO_DIR` — and given the project (`run.project`), the run's name
(`run.name`, by default the run directory's; a pipeline's stages are `NAME/sft`, `NAME/reward`, ...), the stage
and the resolved config. The ids of the tracker runs are kept in the stage directory (`trackers.json`), so a
resumed stage continues the same tracker runs.

Only the main rank logs. A tracker that is not installed, or that cannot start (no W&B login, an unreachable
MLflow server), stops the stage before it trains, with the tracker's own reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

from chatrlhf.errors import UserError

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
"""The names `run.report_to` accepts."""
SAMPLE_COLUMNS = ("iteration", "prompt", "response", "reward", "judge")
"""Columns of a samples table (`judge` only when the run has a judge)."""
IDS_FILE = "trackers.json"


class Tracker(Protocol):
    """One tracker run: a stage's scalars by step, and tables of sample responses."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def log_samples(self, rows: list[dict], step: int) -> None: ...

    def close(self) -> None: ...


def _import(name: str, module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise UserError(
            f"run.report_to includes {name} but the {module.split('.')[0]} package is not installed: "
            f"pip install 'chatrlhf[{name}]'"
        ) from None


def _columns(rows: list[dict]) -> list[str]:
    return [c for c in SAMPLE_COLUMNS if any(c in r for r in rows)]


def _cell(value) -> str:
    """A markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


class TensorBoardTracker:
    """Scalars as events in `<stage dir>/tensorboard/`; samples as a markdown table (the TEXT tab)."""

    def __init__(self, out: Path, **_):
        SummaryWriter = _import("tensorboard", "torch.utils.tensorboard").SummaryWriter
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def log_samples(self, rows: list[dict], step: int) -> None:
        cols = _columns(rows)
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |" for r in rows]
        self.writer.add_text("samples", "\n".join(lines), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run (project `run.project`, group = the run's name, job type = the stage); `WANDB_MODE=offline` keeps
    it on disk for `wandb sync`. Files go to `WANDB_DIR`, else the stage directory."""

    def __init__(self, out: Path, name: str, stage: str, project: str, config: dict, run_id: str | None):
        self.wandb = _import("wandb", "wandb")
        self.run = self.wandb.init(
            project=project,
            name=name,
            group=name.split("/")[0],
            job_type=stage,
            dir=os.environ.get("WANDB_DIR", str(out)),
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
        )
        self.id = self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_samples(self, rows: list[dict], step: int) -> None:
        cols = _columns(rows)
        table = self.wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])
        self.run.log({"samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflowTracker:
    """An MLflow run in experiment `run.project` at `MLFLOW_TRACKING_URI` (MLflow's default when unset); the config
    as the `config.json` artifact, samples as `samples/step-N.json` tables."""

    def __init__(self, out: Path, name: str, stage: str, project: str, config: dict, run_id: str | None):
        self.mlflow = _import("mlflow", "mlflow")
        self.mlflow.set_experiment(project)
        self.run = self.mlflow.start_run(run_id=run_id, run_name=None if run_id else name, tags={"stage": stage})
        if not run_id:
            self.mlflow.log_dict(config, "config.json")
        self.id = self.run.info.run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def log_samples(self, rows: list[dict], step: int) -> None:
        cols = _columns(rows)
        self.mlflow.log_table({c: [r.get(c) for r in rows] for c in cols}, artifact_file=f"samples/step-{step}.json")

    def close(self) -> None:
        self.mlflow.end_run()


class TrackioTracker:
    """A Trackio run (project `run.project`, stored under `TRACKIO_DIR`); samples as a `trackio.Table`."""

    def __init__(self, out: Path, name: str, stage: str, project: str, config: dict, run_id: str | None):
        self.trackio = _import("trackio", "trackio")
        self.run = self.trackio.init(
            project=project, name=run_id or name, group=name.split("/")[0], config=config,
            resume="allow" if run_id else "never",
        )  # fmt: skip
        self.id = self.run.name

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_samples(self, rows: list[dict], step: int) -> None:
        cols = _columns(rows)
        table = self.trackio.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])
        self.run.log({"samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()


OPENERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MLflowTracker, "trackio": TrackioTracker}


def open_trackers(
    names: list[str], out: Path, name: str, stage: str, project: str, config: dict, resumed: bool
) -> list[Tracker]:
    """Start the trackers `names` for the stage in `out`; a resumed stage continues the tracker runs whose ids
    `trackers.json` kept (a fresh one starts new runs and rewrites the file)."""
    ids_path = out / IDS_FILE
    ids = json.loads(ids_path.read_text()) if resumed and ids_path.exists() else {}
    trackers: list[Tracker] = []
    for tracker in names:
        opener = OPENERS[tracker]
        try:
            t = opener(out=out, name=name, stage=stage, project=project, config=config, run_id=ids.get(tracker))
        except UserError:
            raise
        except Exception as e:  # the tracker's own reason: no login, an unreachable server, a bad setting
            for started in trackers:
                started.close()
            raise UserError(f"run.report_to: {tracker} could not start: {type(e).__name__}: {e}") from None
        trackers.append(t)
        if getattr(t, "id", None) is not None:
            ids[tracker] = t.id
    if ids:
        ids_path.write_text(json.dumps(ids, indent=1) + "\n")
    return trackers
