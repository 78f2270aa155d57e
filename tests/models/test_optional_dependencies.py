"""Optional dependencies stay quiet in a run that does not use them: with DeepSpeed installed, a single-process run
imports it only because transformers' save_pretrained checks for a DeepSpeedEngine wrapper, and DeepSpeed's
accelerator report ("Setting accelerator to CPU ... we were unable to detect it") must not reach the output."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_single_process_run_prints_nothing_from_deepspeed(tiny_dirs, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": "p", "response": "r"}) + "\n" for _ in range(4)))
    args = ["sft", "--model", str(tiny_dirs["llama"]), "--data.paths", str(data), "--output_dir", str(tmp_path / "out")]
    args += ["--train.max_steps", "1", "--data.eval_fraction", "0", "--run.progress", "False"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("DS_ACCELERATOR", None)  # DeepSpeed detects, as it would on a user's machine
    run = subprocess.run(
        [sys.executable, "-m", "chatrlhf", *args], capture_output=True, text=True, env=env, timeout=300
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "accelerator" not in output.lower() and "[WARNING]" not in output, output
    assert (tmp_path / "out" / "model" / "config.json").is_file()


def test_deepspeed_messages_other_than_the_accelerator_report_pass():
    """The filter drops DeepSpeed's accelerator-detection messages only."""
    import logging

    from chatrlhf.cli import DeepSpeedAcceleratorReport

    def record(path: str) -> logging.LogRecord:
        return logging.LogRecord("DeepSpeed", logging.WARNING, path, 1, "message", None, None)

    report = DeepSpeedAcceleratorReport()
    assert not report.filter(record("/site-packages/deepspeed/accelerator/real_accelerator.py"))
    assert report.filter(record("/site-packages/deepspeed/runtime/engine.py"))
