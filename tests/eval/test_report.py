"""The run report on hand-written run directories: every section and image, a running and a resumed run, missing
and damaged files, and `chatrlhf report` in-process."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from run_dirs import dpo_pipeline_run, reward_run, rl_run, sft_run, write_jsonl

from chatrlhf.cli import main
from chatrlhf.errors import UserError
from chatrlhf.eval.report import read_metrics, write_report

ROOT = Path(__file__).resolve().parents[2]


def embedded(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_pipeline_report_has_every_section_and_image(pipeline_dir):
    path = write_report(pipeline_dir)
    page = path.read_text(encoding="utf-8")
    assert path == pipeline_dir / "report.html"
    for section in (
        'id="rl-doctor"',
        'id="comparison"',
        'id="sft-"',
        'id="reward-"',
        'id="rl-"',
        'id="config"',
        'id="environment"',
        'id="timings"',
    ):
        assert section in page, section
    assert page.index('id="rl-doctor"') < page.index('id="comparison"') < page.index('id="sft-"')  # findings first
    # the reward-model gate's result, in the comparison section: p = (1 + 64 + 2016 + 41664 + 635376 + 7624512 +
    # 74974368) / 2⁶⁴ = 83,278,001 / 2⁶⁴ ≈ 4.5e-12
    gate = "ranked 58 of 64 held-out pairs right (p = 4.5e-12 against accuracy 0.5, one-sided exact binomial test)"
    assert gate + ": above 0.5." in page
    pngs = sorted((pipeline_dir / "report").glob("*.png"))
    names = {p.stem for p in pngs}
    assert names >= {
        "comparison",
        "sft-loss",
        "sft-perplexity",
        "reward-loss",
        "reward-accuracy",
        "reward-scores",
        "reward-score_hist",
        "rl-reward",
        "rl-judge",
        "rl-kl",
        "rl-length",
        "rl-text",
        "rl-clip",
        "rl-grad_norm",
        "rl-loss",
        "rl-doctor-repetition",
    }
    # self-contained: every plot file is embedded, nothing is fetched
    assert sorted(embedded(page)) == sorted(p.read_bytes() for p in pngs)
    assert all(b.startswith(b"\x89PNG") for b in embedded(page))
    assert not re.search(r'(src|href)="(https?:|/)', page)
    assert "the RL doctor raised 1 finding(s): repetition" in page and "responses that repeat a word rose" in page
    assert "Policy entropy: not recorded: this run logged no policy/entropy" in page
    assert "hope hope" in page and "reward_model 1.5" in page  # side by side, with the scores of samples.jsonl
    assert "Name 2 words that begin with h." in page and "200 held-out pairs" in page
    assert "Test CPU @ 2.0GHz" in page and "env/transformers" in page and "sft 16 s" in page
    assert "rl: config.yaml" in page and "rollout_batch_size" in page
    assert "+0.180 [+0.160, +0.200]" in page  # the paired difference with its interval


def test_dpo_pipeline_report(tmp_path):
    root = dpo_pipeline_run(tmp_path / "dpo-demo")
    page = write_report(root).read_text(encoding="utf-8")
    assert {"dpo-loss", "dpo-rewards", "dpo-accuracy", "comparison"} <= {
        p.stem for p in (root / "report").glob("*.png")
    }
    assert "DPO − SFT (paired)" in page and "moon map" in page and "comparison.examples" in page
    assert 'id="rl-doctor"' not in page and "RL doctor raised" not in page  # no RL stage, no doctor
    assert "dpo: config.yaml" not in page and "sft: config.yaml" in page


def test_running_rl_run_without_summary_or_doctor_json(tmp_path):
    d = rl_run(tmp_path / "rl", iterations=40, last=25, log_every=5, doctor_json=False)
    with open(d / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"stage": "rl", "step": 30, "reward/sc')  # the driver is writing this line right now
    page = write_report(d).read_text(encoding="utf-8")
    assert "running, or stopped before the end: no summary.json yet; last logged step 25 of 40" in page
    assert "an unfinished last line was skipped" in page
    assert "Recomputed by the report (doctor.json is absent)" in page
    assert "Versions and machine" in page and "not recorded: no summary.json with env/* keys" in page
    assert "Held-out prompts during training" in page and "sand ship star" in page


def test_resumed_run_merges_rewritten_steps(tmp_path):
    d = sft_run(tmp_path / "sft", steps=20, finished=False)
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    # the run died after step 20 and resumed from its checkpoint at step 10; a crash left steps 11-20 in the file
    again = [dict(r, **{"time/elapsed_s": 0.5 * (r["step"] - 10), "loss/train": 1.0}) for r in rows[10:]]
    write_jsonl(d / "metrics.jsonl", rows + again + [dict(rows[-1], step=21, **{"time/elapsed_s": 6.0})])
    m = read_metrics(d / "metrics.jsonl")
    assert [r["step"] for r in m.rows] == list(range(1, 22))
    assert m.merged == 10 and m.restarts == [10]
    assert m.rows[10]["loss/train"] == 1.0 and m.rows[9]["loss/train"] != 1.0  # the later line of a step wins
    page = write_report(d).read_text(encoding="utf-8")
    assert "resumed after step 10" in page and "10 line(s) of an already logged step merged" in page


def test_final_evaluation_line_is_not_a_duplicate(tmp_path):
    m = read_metrics(sft_run(tmp_path / "sft", steps=10) / "metrics.jsonl")
    assert m.merged == 0 and m.rows[-1]["eval/perplexity"] == 2.7 and "loss/train" in m.rows[-1]


def test_missing_files_say_not_recorded(tmp_path):
    d = reward_run(tmp_path / "reward", scores=False)
    (d / "summary.json").unlink()
    (d / "config.yaml").unlink()
    (tmp_path / "reward" / "report").mkdir()
    (tmp_path / "reward" / "report" / "old-plot.png").write_bytes(b"stale")
    page = write_report(d).read_text(encoding="utf-8")
    assert "Chosen vs rejected score distributions: not recorded (no eval_scores.jsonl)" in page
    assert "not recorded: no config.yaml" in page and "no summary.json yet" in page
    assert not (d / "report" / "old-plot.png").exists()  # plots an earlier report made and this one did not


def test_damaged_metrics_line_names_file_and_line(tmp_path):
    d = sft_run(tmp_path / "sft", steps=5)
    lines = (d / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:20]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"metrics\.jsonl:3: not valid JSON"):
        write_report(d)


def test_cli_report(tmp_path, capsys):
    d = sft_run(tmp_path / "sft", steps=5)
    assert main(["report", str(d)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {d / 'report.html'}"
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"chatrlhf report: error: run directory '{tmp_path / 'nowhere'}' does not exist"]
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert main(["report"]) == 2 and "expected one run directory" in capsys.readouterr().err


def test_report_and_doctor_import_without_torch():
    """`chatrlhf report` runs beside a training job and on machines without a GPU stack loaded; the RL config can
    embed DoctorConfig without pulling in plotting."""
    code = (
        "import sys, chatrlhf.cli, chatrlhf.eval.report, chatrlhf.eval.doctor; "
        "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
