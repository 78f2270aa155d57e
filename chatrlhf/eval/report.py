"""The run report: `report.html` (self-contained, plots embedded as PNG) and the plots as files in `report/`, rebuilt
from a run directory's files at any time — finished, still running, or resumed.

A stage run directory (`sft/`, `reward/`, `rl/`, `dpo/`, or a stage run on its own) holds `metrics.jsonl`,
`summary.json` (once finished) and `config.yaml`; a pipeline run directory holds stage directories plus its own
`summary.json` and `config.yaml`. The report also reads the optional files the drivers write for it
(docs/report.md): `reward/eval_scores.jsonl`, `rl/samples.jsonl`, `rl/doctor.json`, the pipeline's
`samples.jsonl`, and the `env/*` keys of `summary.json`. What a run does not have, its section says was not recorded.

    write_report(run_dir)      # what the drivers call at the end of a stage or pipeline
    chatrlhf report RUN_DIR    # the same from the command line
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import fnmatch
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from chatrlhf import __version__
from chatrlhf.errors import UserError
from chatrlhf.eval import doctor as doc
from chatrlhf.eval.plots import Series, histogram_plot, interval_plot, line_plot

REPORT_HTML = "report.html"
PLOT_DIR = "report"
STAGE_DIRS = ("sft", "reward", "rl", "dpo")
EVAL_SCORES = "eval_scores.jsonl"
"""In a reward stage directory: one {"chosen": float, "rejected": float} per held-out pair."""
RL_SAMPLES = "samples.jsonl"
"""In an RL stage directory: {"iteration", "prompt", "response", "reward"[, "judge"]} for held-out prompts; in a
pipeline directory: {"prompt", "sample", "sft", "rlhf", "scores": {"sft": {...}, "rlhf": {...}}}."""
DOCTOR_JSON = "doctor.json"
"""In an RL stage directory: `Doctor.to_json()`."""


# ------------------------------------------------------------------------------------------- reading the files


def read_jsonl(path: Path) -> tuple[list[dict], bool]:
    """The JSON objects of a JSON Lines file, and whether an unterminated last line was skipped (a writer still
    appending to it). Any other line that is not a JSON object is a UserError naming the file and line."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    rows, partial = [], False
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):  # no newline after it: the line is still being written
                partial = True
                continue
            raise UserError(
                f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno}); the report cannot read it"
            ) from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{i}: expected a JSON object, found {type(row).__name__}")
        rows.append(row)
    return rows, partial


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _read_yaml(path: Path) -> tuple[str, dict] | None:
    """(the text, the parsed mapping) of a config.yaml."""
    import yaml

    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML: {e}") from None
    return text, data if isinstance(data, dict) else {}


@dataclass
class Metrics:
    """A stage's metrics.jsonl, one row per step."""

    rows: list[dict]
    """One dict per step, in step order; lines of the same step are merged, later values winning (the final
    evaluation line of SFT/reward/DPO, or lines a crash left behind before a resume rewrote them)."""
    merged: int = 0
    """Lines that repeated a training metric of an earlier line of the same step (left by a crash before a
    resume); the final-evaluation line (only `eval/*` keys, which may repeat a periodic evaluation of the last step)
    is not counted."""
    partial: bool = False
    """An unterminated last line was skipped: the run is writing it."""
    restarts: list[int] = field(default_factory=list)
    """Steps after which `time/elapsed_s` starts again: the run was resumed there."""

    def keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows:
            seen.update(dict.fromkeys(k for k, v in row.items() if _is_number(v) or v is None))
        return [k for k in seen if k not in ("step", "time/elapsed_s")]

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of the rows that have `key`; a null (non-finite) value is NaN."""
        xs, ys = [], []
        for row in self.rows:
            if key in row:
                v = row[key]
                xs.append(float(row["step"]))
                ys.append(float(v) if _is_number(v) else math.nan)
        return xs, ys

    @property
    def last_step(self) -> int | None:
        return int(self.rows[-1]["step"]) if self.rows else None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_metrics(path: Path) -> Metrics:
    lines, partial = read_jsonl(path)
    by_step: dict[int, dict] = {}
    merged = 0
    for i, line in enumerate(lines):
        step = line.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise UserError(f"{path}: metrics line {i + 1} has no integer 'step' (found {step!r})")
        if step in by_step:
            repeated = set(line) & set(by_step[step]) - {"stage", "step", "time/elapsed_s"}
            merged += any(not k.startswith("eval/") for k in repeated)
            by_step[step].update(line)
        else:
            by_step[step] = dict(line)
    rows = [by_step[s] for s in sorted(by_step)]
    restarts = []
    for prev, row in zip(rows, rows[1:]):
        a, b = prev.get("time/elapsed_s"), row.get("time/elapsed_s")
        if _is_number(a) and _is_number(b) and b < a:
            restarts.append(int(prev["step"]))
    return Metrics(rows, merged, partial, restarts)


@dataclass
class Stage:
    """One stage run directory's files (each None when absent)."""

    dir: Path
    kind: str
    """sft, reward, rl, dpo, or "stage" when nothing says which."""
    metrics: Metrics | None
    summary: dict | None
    config: tuple[str, dict] | None
    eval_scores: list[dict] | None = None
    samples: list[dict] | None = None
    doctor: dict | None = None
    """doctor.json, or a replay of the doctor over the files ("replayed": true)."""


@dataclass
class Run:
    dir: Path
    pipeline: bool
    stages: list[Stage]
    summary: dict | None
    config: tuple[str, dict] | None
    samples: list[dict] | None = None
    """The pipeline's SFT-vs-tuned samples.jsonl."""


def _has_run_files(d: Path) -> bool:
    return any((d / f).is_file() for f in ("metrics.jsonl", "summary.json", "config.yaml"))


def _stage_kind(d: Path, metrics: Metrics | None, summary: dict | None, config: tuple[str, dict] | None) -> str:
    if metrics and metrics.rows and metrics.rows[0].get("stage") in STAGE_DIRS:
        return metrics.rows[0]["stage"]
    if summary and summary.get("stage") in STAGE_DIRS:
        return summary["stage"]
    if d.name in STAGE_DIRS:
        return d.name
    if config and "actor" in config[1]:
        return "rl"
    return "stage"


def load_stage(d: Path) -> Stage:
    path = d / "metrics.jsonl"
    metrics = read_metrics(path) if path.is_file() else None
    summary, config = _read_json(d / "summary.json"), _read_yaml(d / "config.yaml")
    stage = Stage(d, _stage_kind(d, metrics, summary, config), metrics, summary, config)
    if stage.kind == "reward" and (d / EVAL_SCORES).is_file():
        stage.eval_scores = read_jsonl(d / EVAL_SCORES)[0]
    if stage.kind == "rl":
        if (d / RL_SAMPLES).is_file():
            stage.samples = read_jsonl(d / RL_SAMPLES)[0]
        stage.doctor = _read_json(d / DOCTOR_JSON) if (d / DOCTOR_JSON).is_file() else _replay_doctor(stage)
    return stage


def _replay_doctor(stage: Stage) -> dict | None:
    """The doctor recomputed from metrics.jsonl and samples.jsonl, when the run wrote no doctor.json."""
    if stage.metrics is None or not stage.metrics.rows:
        return None
    cfg = doc.DoctorConfig()
    given = ((stage.config or ("", {}))[1].get("train") or {}).get("doctor")
    if isinstance(given, dict):
        known = {f.name for f in dataclasses.fields(doc.DoctorConfig)}
        cfg = doc.DoctorConfig(**{k: v for k, v in given.items() if k in known})
    samples: dict[int, list[tuple[str, str]]] = {}
    for s in stage.samples or []:
        if isinstance(s.get("iteration"), int) and isinstance(s.get("response"), str):
            samples.setdefault(s["iteration"], []).append((str(s.get("prompt", "")), s["response"]))
    replayed = doc.replay(stage.metrics.rows, samples, cfg).to_json()
    replayed["replayed"] = True
    return replayed


def load_run(run_dir: Path) -> Run:
    """Read a stage or pipeline run directory; a UserError if it is neither."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UserError(f"run directory '{run_dir}' does not exist")
    if not run_dir.is_dir():
        raise UserError(f"'{run_dir}' is not a directory")
    subdirs = [run_dir / s for s in STAGE_DIRS if (run_dir / s).is_dir() and _has_run_files(run_dir / s)]
    if subdirs:
        samples = read_jsonl(run_dir / RL_SAMPLES)[0] if (run_dir / RL_SAMPLES).is_file() else None
        return Run(
            run_dir,
            True,
            [load_stage(d) for d in subdirs],
            _read_json(run_dir / "summary.json"),
            _read_yaml(run_dir / "config.yaml"),
            samples,
        )
    if _has_run_files(run_dir):
        return Run(run_dir, False, [load_stage(run_dir)], None, None)
    raise UserError(
        f"'{run_dir}' is not a run directory: it has no metrics.jsonl, summary.json or config.yaml, and no stage "
        f"directory ({', '.join(s + '/' for s in STAGE_DIRS)}) that has one"
    )


# ------------------------------------------------------------------------------------------- what is plotted


class Plot(NamedTuple):
    name: str
    """File name stem (prefixed with the stage)."""
    title: str
    keys: tuple[str, ...]
    """Metric keys, or fnmatch patterns ("reward/*_mean"), in legend order."""
    ylabel: str = ""
    missing: str = ""
    """What the report says when none of the keys was logged (empty: the plot is left out silently)."""
    logy: bool = False
    zero: bool = False
    """Start the y axis at 0 (sizes and fractions: a flat series should look flat)."""


RL_PLOTS = (
    Plot("reward", "Reward (each component)", ("reward/score_mean", "reward/total_mean", "reward/*_mean"), "reward",
         "not recorded: no reward/* metric"),
    Plot("judge", "Held-out judge over training", ("eval/judge_mean",), "judge score",
         "not recorded: this run ran no held-out judge evaluation during training (eval/judge_mean)"),
    Plot("heldout_reward", "Held-out reward over training", ("eval/score_mean",), "reward"),
    Plot("kl", "KL to the reference", ("kl/mean", "loss/kl"), "nats per response", "not recorded: no kl/mean"),
    Plot("entropy", "Policy entropy", ("policy/entropy",), "nats per token",
         "not recorded: this run logged no policy/entropy"),
    Plot("length", "Response length", ("response/length_mean",), "tokens", "not recorded: no response/length_mean",
         zero=True),
    Plot("text", "Truncation, repetition and diversity", ("response/truncated_frac", "response/repeat_*gram_frac",
         "response/distinct_*"), "fraction", zero=True),
    Plot("clip", "Clip fractions", ("policy/clipfrac", "value/clipfrac", "tis/capped_frac"), "fraction",
         "not recorded: no policy/clipfrac", zero=True),
    Plot("approx_kl", "Approximate KL within the update", ("policy/approx_kl",), "nats per token", zero=True),
    Plot("grad_norm", "Gradient norms (before clipping)", ("optim/actor_grad_norm", "optim/critic_grad_norm"),
         "L2 norm", "not recorded: no optim/*_grad_norm", logy=True),
    Plot("loss", "Losses", ("loss/policy", "loss/value", "loss/ptx"), "loss", "not recorded: no loss/*"),
    Plot("time", "Seconds per iteration", ("time/generate_s", "time/score_s", "time/train_s"), "seconds", zero=True),
)  # fmt: skip
SFT_PLOTS = (
    Plot("loss", "Training loss", ("loss/train",), "NLL per token", "not recorded: no loss/train"),
    Plot("perplexity", "Held-out perplexity", ("eval/perplexity",), "perplexity",
         "not recorded: no held-out records (eval/perplexity)"),
    Plot("grad_norm", "Gradient norm (before clipping)", ("optim/grad_norm",), "L2 norm", logy=True),
    Plot("lr", "Learning rate", ("optim/lr",), "lr"),
)  # fmt: skip
REWARD_PLOTS = (
    Plot("loss", "Pairwise loss", ("loss/train", "eval/loss"), "−log σ(r_c − r_r)", "not recorded: no loss/train"),
    Plot("accuracy", "Accuracy (r_c > r_r)", ("train/accuracy", "eval/accuracy"), "fraction"),
    Plot("scores", "Held-out mean scores", ("eval/chosen_score", "eval/rejected_score", "eval/score_gap"), "score",
         "not recorded: no held-out pairs (eval/chosen_score)"),
    Plot("grad_norm", "Gradient norm (before clipping)", ("optim/grad_norm",), "L2 norm", logy=True),
)  # fmt: skip
DPO_PLOTS = (
    Plot("loss", "DPO loss", ("loss/train", "eval/loss"), "loss", "not recorded: no loss/train"),
    Plot("rewards", "Implicit rewards", ("rewards/chosen", "rewards/rejected", "rewards/margin",
         "eval/rewards/margin"), "β·log-ratio"),
    Plot("accuracy", "Implicit-reward accuracy", ("rewards/accuracy", "eval/rewards/accuracy"), "fraction"),
    Plot("logps", "Sequence log-probs", ("logps/chosen", "logps/rejected"), "nats"),
    Plot("grad_norm", "Gradient norm (before clipping)", ("optim/grad_norm",), "L2 norm", logy=True),
)  # fmt: skip
PLOTS = {"sft": SFT_PLOTS, "reward": REWARD_PLOTS, "rl": RL_PLOTS, "dpo": DPO_PLOTS,
         "stage": (Plot("loss", "Losses", ("loss/*",), "loss", "not recorded: no loss/*"),)}  # fmt: skip
TITLES = {"sft": "Step 1 — SFT", "reward": "Step 2 — reward model", "rl": "Step 3 — RL", "dpo": "DPO", "stage": "Stage"}


def expand(patterns: tuple[str, ...], keys: list[str]) -> list[str]:
    """The logged keys matching each pattern, in pattern order, each once; `*_sem` keys are error bars, not lines."""
    out: list[str] = []
    for p in patterns:
        out += [k for k in keys if fnmatch.fnmatchcase(k, p) and k not in out and not k.endswith("_sem")]
    return out


# ------------------------------------------------------------------------------------------- HTML pieces


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return esc(v)


def table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _resp(text) -> str:
    """A response as monospaced text that keeps its spaces and line breaks."""
    return f'<span class="resp">{esc(text)}</span>'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


class Figures:
    """Writes each plot to `report/<name>.png` and returns the HTML that embeds the same bytes."""

    def __init__(self, out_dir: Path):
        self.dir = out_dir
        self.written: list[Path] = []

    def img(self, name: str, png: bytes, caption: str = "") -> str:
        path = self.dir / f"{name}.png"
        path.write_bytes(png)
        self.written.append(path)
        data = base64.b64encode(png).decode("ascii")
        cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
        return f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{data}">{cap}</figure>'


def _series(m: Metrics, key: str) -> Series:
    xs, ys = m.series(key)
    err = None
    if key.endswith("_mean") and key[: -len("_mean")] + "_sem" in m.keys():
        ex, ey = m.series(key[: -len("_mean")] + "_sem")
        by_step = dict(zip(ex, ey))
        err = [by_step.get(x, math.nan) for x in xs]
    return Series(key, xs, ys, err)


def stage_plots(stage: Stage, figs: Figures, prefix: str) -> str:
    m = stage.metrics
    if m is None or not m.rows:
        return note("not recorded: no metrics.jsonl lines yet")
    keys = m.keys()
    xlabel = "iteration" if stage.kind == "rl" else "optimizer step"
    xlim = (float(m.rows[0]["step"]), float(m.rows[-1]["step"]))
    parts, missing = [], []
    for p in PLOTS[stage.kind]:
        shown = expand(p.keys, keys)
        if not shown:
            if p.missing:
                missing.append(f"{p.title}: {p.missing}")
            continue
        png = line_plot(p.title, [_series(m, k) for k in shown], xlabel, p.ylabel, logy=p.logy, xlim=xlim, zero=p.zero)
        parts.append(figs.img(f"{prefix}{p.name}", png))
    out = f'<div class="grid">{"".join(parts)}</div>'
    if missing:
        out += '<ul class="missing">' + "".join(f"<li>{esc(x)}</li>" for x in missing) + "</ul>"
    return out


def reward_histogram(stage: Stage, figs: Figures, prefix: str) -> str:
    if not stage.eval_scores:
        return note(
            f"Chosen vs rejected score distributions: not recorded (no {EVAL_SCORES}); the held-out means over "
            "training are in the plot above"
        )
    c = [float(r["chosen"]) for r in stage.eval_scores if _is_number(r.get("chosen"))]
    r = [float(x["rejected"]) for x in stage.eval_scores if _is_number(x.get("rejected"))]
    if not c or not r:
        return note(f"{EVAL_SCORES} has no numeric chosen/rejected scores")
    acc = sum(a > b for a, b in zip(c, r)) / min(len(c), len(r))
    png = histogram_plot("Held-out reward-model scores", [("chosen", c), ("rejected", r)], "score r")
    return figs.img(f"{prefix}score_hist", png, f"{len(c)} held-out pairs; r_c > r_r for {acc:.1%} of them")


def rl_samples(stage: Stage, max_prompts: int = 4, max_points: int = 6) -> str:
    """The same held-out prompts' responses at several points of training."""
    if not stage.samples:
        return note(f"Samples over training: not recorded (no {RL_SAMPLES} in {stage.dir.name}/)")
    by_prompt: dict[str, list[dict]] = {}
    for s in stage.samples:
        by_prompt.setdefault(str(s.get("prompt", "")), []).append(s)
    parts = []
    for prompt, rows in list(by_prompt.items())[:max_prompts]:
        rows = sorted(rows, key=lambda s: s["iteration"] if _is_number(s.get("iteration")) else -1)
        if len(rows) > max_points:
            rows = [rows[round(i * (len(rows) - 1) / (max_points - 1))] for i in range(max_points)]
        body = [
            [fmt(s.get("iteration")), _resp(s.get("response", "")), fmt(s.get("reward")), fmt(s.get("judge"))]
            for s in rows
        ]
        parts.append(f'<p class="prompt">{esc(prompt)}</p>' + table(["iteration", "response", "reward", "judge"], body))
    return "".join(parts)


def stage_section(stage: Stage, figs: Figures, prefix: str) -> str:
    title = TITLES[stage.kind]
    status = stage_status(stage)
    body = stage_plots(stage, figs, prefix)
    if stage.kind == "reward":
        body += reward_histogram(stage, figs, prefix)
    if stage.kind == "rl":
        body += "<h3>Held-out prompts during training</h3>" + rl_samples(stage)
    if stage.summary:
        body += "<details><summary>summary.json</summary>" + kv_table(stage.summary) + "</details>"
    if stage.metrics and stage.metrics.rows:
        body += "<details><summary>every metric: first, last, min, max</summary>" + metrics_table(stage.metrics)
        body += "</details>"
    return f'<section id="{esc(prefix or stage.kind)}"><h2>{esc(title)}</h2>{status}{body}</section>'


def stage_status(stage: Stage) -> str:
    m = stage.metrics
    bits = []
    if stage.summary is not None:
        bits.append("finished (summary.json written)")
    else:
        bits.append("running, or stopped before the end: no summary.json yet")
    if m is not None and m.rows:
        total = ((stage.config or ("", {}))[1].get("train") or {}).get("iterations") if stage.kind == "rl" else None
        bits.append(f"last logged step {m.last_step}" + (f" of {total}" if total else ""))
        if m.restarts:
            bits.append("resumed after step " + ", ".join(map(str, m.restarts)))
        if m.merged:
            bits.append(f"{m.merged} line(s) of an already logged step merged, later values kept")
        if m.partial:
            bits.append("an unfinished last line was skipped")
    else:
        bits.append("no metrics logged yet")
    return f'<p class="status">{esc(str(stage.dir))}: {esc("; ".join(bits))}</p>'


def kv_table(d: dict) -> str:
    rows = [
        [esc(k), fmt(v) if not isinstance(v, (dict, list)) else f"<code>{esc(json.dumps(v))}</code>"]
        for k, v in d.items()
    ]
    return table(["key", "value"], rows, "kv")


def metrics_table(m: Metrics) -> str:
    rows = []
    for k in m.keys():
        _, ys = m.series(k)
        fin = [y for y in ys if math.isfinite(y)]
        rows.append(
            [
                esc(k),
                str(len(ys)),
                fmt(ys[0]),
                fmt(ys[-1]),
                fmt(min(fin) if fin else None),
                fmt(max(fin) if fin else None),
            ]
        )
    return table(["key", "lines", "first", "last", "min", "max"], rows, "kv")


def _doctor_series(state: dict, m: Metrics | None, key: str) -> Series | None:
    """A finding's metric per observed iteration from the doctor's state, else per logged line."""
    if key.startswith("response/repeat_") and key.endswith("gram_frac"):
        rows = state.get("repeat_counts", {}).get(key[len("response/repeat_") : -len("gram_frac")])
        if rows:
            return Series(key, [float(r[0]) for r in rows], [r[1] / r[2] for r in rows])
    points = state.get("series", {}).get(key)
    if points:
        return Series(key, [float(p[0]) for p in points], [float(p[1]) for p in points])
    if m is not None and key in m.keys():
        return _series(m, key)
    return None


def finding_card(f: doc.Finding, state: dict, m: Metrics | None, figs: Figures, name: str) -> str:
    series = [s for s in (_doctor_series(state, m, k) for k in f.metrics) if s is not None]
    plot = ""
    if series:
        png = line_plot(
            f"{f.name}: {', '.join(s.label for s in series)}",
            series,
            "iteration",
            shades=[(a, b) for a, b in f.windows] or [(f.first, f.last)],
            mark=f.iteration,
        )
        plot = figs.img(name, png)
    evidence = table(["evidence", "value"], [[esc(k), fmt(v)] for k, v in f.evidence.items()], "kv")
    examples = ""
    if f.examples:
        rows = [[esc(e.get("prompt", "")), _resp(e.get("response", ""))] for e in f.examples]
        examples = f"<p>Responses at iteration {f.iteration}:</p>" + table(["prompt", "response"], rows)
    stop = ' <span class="badge">stopped the run</span>' if f.stop else ""
    return (
        f'<div class="finding"><h3>{esc(f.name)}{stop}</h3><p>{esc(f.message.removeprefix(f.name + ": "))}</p>'
        f'<p class="status">evidence: iterations {f.first}–{f.last}; fired at iteration {f.iteration}</p>'
        f'<div class="grid">{plot}<div>{evidence}</div></div>{examples}</div>'
    )


def doctor_section(stage: Stage, figs: Figures, prefix: str) -> str:
    d = stage.doctor
    head = f'<section id="{esc(prefix)}doctor"><h2>The RL doctor ({esc(stage.dir.name)}/)</h2>'
    if d is None:
        missing = note("not recorded: no doctor.json, and no metrics to recompute the diagnostics from")
        return head + missing + "</section>"
    findings = [doc.Finding.from_dict(f) for f in d.get("findings", [])]
    if d.get("replayed"):
        source = (
            f"Recomputed by the report ({DOCTOR_JSON} is absent) from metrics.jsonl, one point per logged line, and "
            f"the held-out responses of {RL_SAMPLES}: an approximation of what the driver's doctor sees every "
            "iteration."
        )
    else:
        source = f"From {DOCTOR_JSON}, as of iteration {d.get('iteration')}."
    checked = ", ".join(d.get("diagnostics", []))
    if not findings:
        body = f'<p class="ok">No diagnostic fired up to iteration {esc(d.get("iteration"))}.</p>'
    else:
        state = d.get("state", {})
        body = "".join(finding_card(f, state, stage.metrics, figs, f"{prefix}doctor-{f.name}") for f in findings)
    return head + note(source) + body + note(f"Diagnostics checked: {checked}. Rules: docs/report.md.") + "</section>"


def _ci(d: dict | None) -> str:
    if not isinstance(d, dict) or not _is_number(d.get("mean")):
        return "—"
    ci = d.get("ci95")
    sign = "+" if d.get("signed") else ""
    if not ci:
        return f"{d['mean']:{sign}.3f} (n={d.get('n')})"
    return f"{d['mean']:{sign}.3f} [{ci[0]:{sign}.3f}, {ci[1]:{sign}.3f}]"


def reward_gate_note(gate: dict | None) -> str:
    """What the pipeline's reward-model gate found before RL (train/pipeline.py:reward_gate), or nothing."""
    if not isinstance(gate, dict) or not _is_number(gate.get("p_value")):
        return ""
    bar = gate.get("min_accuracy")
    said = (
        f"Before RL the reward model ranked {gate.get('correct')} of {gate.get('pairs')} held-out pairs right "
        f"(p = {gate['p_value']:.2g} against accuracy {bar}, one-sided exact binomial test): "
    )
    if gate.get("passed"):
        return note(said + f"above {bar}.")
    return note(
        said + f"NOT shown above {bar}; RL ran anyway (reward_gate.action warn), on a reward that may be noise."
    )


def comparison_section(run: Run, figs: Figures) -> str:
    head = '<section id="comparison"><h2>SFT vs the trained model on held-out prompts</h2>'
    s = run.summary
    if s is None or "comparison" not in s:
        return (
            head
            + note("not recorded yet: the pipeline writes its summary.json after the final comparison")
            + "</section>"
        )
    c = s["comparison"]
    tuned = "DPO" if s.get("method") == "dpo" else "RLHF"
    rows, intervals = [], []
    for name in ("judge", "reward_model"):
        r = c.get(name)
        if not isinstance(r, dict):
            continue
        diff = dict(r.get("rlhf_minus_sft") or {}, signed=True)
        rows.append([esc(name), _ci(r.get("sft")), _ci(r.get("rlhf")), _ci(diff), fmt(r.get("rlhf_better"))])
        intervals.append(
            (
                f"{name} score",
                [
                    (m, r[k]["mean"], *(r[k].get("ci95") or (None, None)))
                    for m, k in (("SFT", "sft"), (tuned, "rlhf"))
                    if isinstance(r.get(k), dict) and _is_number(r[k].get("mean"))
                ],
            )
        )
    body = note(f"{c.get('prompts')} held-out prompts × {c.get('samples_per_prompt')} samples; mean [95% CI]")
    body += reward_gate_note((s.get("reward_model") or {}).get("gate"))
    if rows:
        body += table(["score", "SFT", tuned, f"{tuned} − SFT (paired)", f"{tuned} better"], rows)
        body += figs.img("comparison", interval_plot("Held-out scores, mean and 95% CI", intervals))
    else:
        body += note("nothing scored the samples (no judge, and the DPO pipeline has no reward model)")
    body += "<h3>Side by side</h3>" + side_by_side(run, tuned)
    return head + body + "</section>"


def side_by_side(run: Run, tuned: str, max_rows: int = 8) -> str:
    def answer(s: dict, model: str) -> str:
        scores = (s.get("scores") or {}).get(model) or {}
        shown = " ".join(f"{esc(k)} {fmt(v)}" for k, v in scores.items())
        return f"{_resp(s.get(model, ''))}<br><small>{shown}</small>"

    if run.samples:
        first = [s for s in run.samples if s.get("sample", 0) == 0][:max_rows]
        rows = [[esc(s.get("prompt", "")), answer(s, "sft"), answer(s, "rlhf")] for s in first]
        return table(["prompt", "SFT", tuned], rows, "sbs")
    examples = ((run.summary or {}).get("comparison") or {}).get("examples") or []
    if not examples:
        return note(f"not recorded: no {RL_SAMPLES} and no comparison.examples in summary.json")
    rows = [[esc(e.get("prompt", "")), _resp(e.get("sft", "")), _resp(e.get("rlhf", ""))] for e in examples[:max_rows]]
    return note(f"From summary.json's comparison.examples (no {RL_SAMPLES}, so no per-sample scores).") + table(
        ["prompt", "SFT", tuned], rows, "sbs"
    )


def config_section(run: Run) -> str:
    parts = []
    configs = [("run", run.config)] if run.config else []
    configs += [(s.dir.name, s.config) for s in run.stages if s.config]
    for name, cfg in configs:
        parts.append(f"<details><summary>{esc(name)}: config.yaml</summary><pre>{esc(cfg[0])}</pre></details>")
    body = "".join(parts) or note("not recorded: no config.yaml")
    return f'<section id="config"><h2>Config</h2>{body}</section>'


def environment_section(run: Run) -> str:
    env: dict = {}
    for s in [run.summary, *(st.summary for st in run.stages)]:
        if s:
            env = {k: v for k, v in s.items() if k.startswith("env/")}
            if env:
                break
    body = kv_table(env) if env else note("not recorded: no summary.json with env/* keys (versions and machine)")
    return f'<section id="environment"><h2>Versions and machine</h2>{body}</section>'


def timings_section(run: Run) -> str:
    rows = []
    for st in run.stages:
        m, s = st.metrics, st.summary or {}
        elapsed = m.rows[-1].get("time/elapsed_s") if m and m.rows else None
        per_it = ""
        if st.kind == "rl" and m:
            means = []
            for k in ("time/generate_s", "time/score_s", "time/train_s", "perf/tokens_per_s"):
                ys = [y for y in m.series(k)[1] if math.isfinite(y)]
                if ys:
                    means.append(f"{k.split('/')[1]} {sum(ys) / len(ys):.3g}")
            per_it = "mean over logged iterations: " + ", ".join(means) if means else ""
        steps = m.last_step if m else None
        rows.append([esc(st.dir.name), fmt(s.get("time/total_s")), fmt(elapsed), fmt(steps), esc(per_it)])
    header = ["stage", "total s (summary)", "elapsed s at last line", "last step", "per iteration"]
    body = table(header, rows) if rows else ""
    times = (run.summary or {}).get("time_s")
    if isinstance(times, dict):
        body += note("pipeline wall time per step: " + ", ".join(f"{k} {fmt(v)} s" for k, v in times.items()))
    return f'<section id="timings"><h2>Timings</h2>{body or note("not recorded")}</section>'


# ------------------------------------------------------------------------------------------- the page

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1b1f24;margin:0;background:#f6f7f9}
main{max-width:1320px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:18px;margin:0 0 8px;border-bottom:1px solid #dde1e6;padding-bottom:4px}
h3{font-size:15px;margin:14px 0 6px}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:14px 18px;margin:14px 0}
nav a{margin-right:12px;color:#0b5cad;text-decoration:none}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(540px,1fr));gap:10px;align-items:start}
figure{margin:0}figure img{max-width:100%;height:auto;border:1px solid #eef0f3}
figcaption{font-size:12px;color:#555}
table{border-collapse:collapse;margin:6px 0;font-size:13px}
th,td{border:1px solid #dde1e6;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f5}
table.kv td:first-child{font-family:ui-monospace,monospace;font-size:12px}
table.sbs td{max-width:420px}
.resp{font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap;word-break:break-word}
.prompt{font-weight:600;margin:10px 0 2px}
.note{color:#555;font-size:13px}.status{color:#444;font-size:13px}
.missing{color:#555;font-size:13px;margin:4px 0}
.ok{color:#176f2c;font-weight:600}
.finding{border-left:4px solid #c0392b;padding:4px 12px;margin:10px 0;background:#fff8f7}
.badge{background:#c0392b;color:#fff;border-radius:3px;padding:1px 6px;font-size:12px}
.summary-line{font-size:15px}
pre{background:#f6f8fa;padding:8px;overflow:auto;font-size:12px;max-height:600px}
details{margin:6px 0}summary{cursor:pointer;color:#0b5cad}
"""


def _headline(run: Run) -> str:
    """One line at the top: what kind of run, and the doctor's count of findings."""
    kinds = ", ".join(s.dir.name + "/" for s in run.stages)
    what = (
        f"pipeline ({(run.summary or {}).get('method', 'method not recorded yet')}): {kinds}"
        if run.pipeline
        else f"{run.stages[0].kind} stage"
    )
    findings = [f for s in run.stages if s.doctor for f in s.doctor.get("findings", [])]
    rl = any(s.kind == "rl" for s in run.stages)
    doctor = ""
    if rl:
        doctor = (
            f" — the RL doctor raised {len(findings)} finding(s): " + ", ".join(f["name"] for f in findings)
            if findings
            else " — the RL doctor raised no finding"
        )
    return f'<p class="summary-line">{esc(what)}{esc(doctor)}</p>'


def render(run: Run, figs: Figures) -> str:
    sections = []
    for st in run.stages:  # the doctor's findings come first
        if st.kind == "rl":
            sections.append(doctor_section(st, figs, f"{st.dir.name}-" if run.pipeline else "rl-"))
    if run.pipeline:
        sections.append(comparison_section(run, figs))
    for st in run.stages:
        sections.append(stage_section(st, figs, f"{st.dir.name}-" if run.pipeline else f"{st.kind}-"))
    sections += [config_section(run), environment_section(run), timings_section(run)]
    nav_ids = [("comparison", "comparison")] if run.pipeline else []
    nav_ids += [
        (f"{st.dir.name}-" if run.pipeline else f"{st.kind}-", st.dir.name if run.pipeline else st.kind)
        for st in run.stages
    ]
    nav_ids += [("config", "config"), ("environment", "versions"), ("timings", "timings")]
    nav = "<nav>" + "".join(f'<a href="#{esc(i)}">{esc(t)}</a>' for i, t in nav_ids) + "</nav>"
    made = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    title = f"chatrlhf report — {run.dir.resolve().name}"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{CSS}</style></head><body><main><h1>{esc(title)}</h1>{_headline(run)}"
        f'<p class="note">{esc(str(run.dir))} · made {esc(made)} by chatrlhf {esc(__version__)}</p>{nav}'
        + "".join(sections)
        + "</main></body></html>\n"
    )


def write_report(run_dir: Path) -> Path:
    """Rebuild `run_dir/report.html` and the plots in `run_dir/report/` from the run's files; returns the HTML's
    path. A stage or a pipeline run directory, finished or not. Plots of an earlier report that this one no longer
    makes are removed."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    out = run_dir / PLOT_DIR
    out.mkdir(exist_ok=True)
    figs = Figures(out)
    page = render(run, figs)
    for stale in out.glob("*.png"):
        if stale not in figs.written:
            stale.unlink()
    path = run_dir / REPORT_HTML
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
