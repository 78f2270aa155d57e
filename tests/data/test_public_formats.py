"""Every dataset format through every stage that uses its kind of data: the real CLI entry point, in-process, on
the tiny llama, one step (RL: one GRPO iteration of 2 prompts × 2 samples). The files are written in each public
dataset's exact schema (`public_sets.py`), as Parquet or JSON Lines, as a local repository read with `hf:DIR`, or as
a Hub dataset in the offline cache read by its id."""

from __future__ import annotations

import json

import pytest
from public_sets import (
    assistant,
    download_into_cache,
    hh_repo,
    oasst1,
    rm_static,
    shp,
    ultrafeedback_argilla,
    ultrafeedback_h4,
    user,
    webgpt,
    write_jsonl,
    write_parquet,
)

from chatrlhf.cli import main
from chatrlhf.data import load_source, to_pair, to_prompt, to_sft, validate_all

pytestmark = pytest.mark.usefixtures("hf_cache")

QUIET = ["--run.progress", "False"]
PAIR_STAGES = ("sft", "reward", "dpo", "rl")

REWARDS = """
def length(prompt, response, **fields):
    return len(response) / 10.0
"""


@pytest.fixture()
def reward_function(tmp_path, monkeypatch):
    """`format_rewards:length`, a reward function for RL on prompts of any kind."""
    (tmp_path / "format_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "format_rewards:length"


@pytest.fixture()
def stage(tiny_dirs, tmp_path, capsys, reward_function):
    """`stage(name, source, *flags)` runs one short stage on `source` and returns its stdout; the run must succeed
    and leave a model."""

    def run(name: str, source: str, *flags: str) -> str:
        out = tmp_path / f"run-{name}"
        where = ["--output_dir", str(out), "--data.paths", source]
        if name == "rl":
            args = ["rl", "--actor", str(tiny_dirs["llama"]), "--reward_functions", reward_function, *where]
            args += ["--train.algo", "grpo", "--train.group_size", "2", "--train.rollout_batch_size", "2"]
            args += ["--train.iterations", "1", "--train.generation.max_new_tokens", "4", "--data.eval_fraction", "0"]
        else:
            args = [name, "--model", str(tiny_dirs["llama"]), *where, "--train.max_steps", "1"]
        capsys.readouterr()
        code = main([*args, *QUIET, *flags])
        captured = capsys.readouterr()
        assert code == 0, f"{name} on {source}: exit {code}\n{captured.out}\n{captured.err}"
        assert (out / "model" / "config.json").is_file()
        return captured.out

    return run


def conversational_pairs(n: int) -> list[dict]:
    """TRL's conversational preference format with an explicit, multi-turn prompt."""
    return [
        {
            "prompt": [{"role": "system", "content": "be brief"}, user(f"hi {i}"), assistant("hello"), user("count?")],
            "chosen": [assistant(f"{i}")],
            "rejected": [assistant("no")],
        }
        for i in range(n)
    ]


def implicit_conversational_pairs(n: int) -> list[dict]:
    return [{"chosen": [user(f"q{i}"), assistant("y")], "rejected": [user(f"q{i}"), assistant("n")]} for i in range(n)]


def implicit_string_pairs(n: int) -> list[dict]:
    return [{"chosen": f"The sky {i} is blue.", "rejected": f"The sky {i} is green."} for i in range(n)]


def ultrafeedback_repository(d) -> str:
    """HuggingFaceH4/ultrafeedback_binarized's layout (data/SPLIT-00000-of-00001.parquet), read with hf:DIR:SPLIT."""
    write_parquet(ultrafeedback_h4(8), d / "uf" / "data" / "train_prefs-00000-of-00001.parquet")
    return f"hf:{d / 'uf'}:train_prefs"


def jsonl_of(rows: list[dict], name: str):
    return lambda d: str(write_jsonl(rows, d / name))


def parquet_of(rows: list[dict], name: str):
    return lambda d: str(write_parquet(rows, d / name))


SOURCES = {
    # name: (write the source under a directory → its spec, the stages to run)
    "rm-static (JSON Lines)": (jsonl_of(rm_static(8), "rm.jsonl"), PAIR_STAGES),
    "shp (Parquet)": (parquet_of(shp(8), "shp.parquet"), PAIR_STAGES),
    "webgpt (JSON Lines)": (jsonl_of(webgpt(8), "webgpt.jsonl"), PAIR_STAGES),
    "ultrafeedback H4 (local Hub repository)": (ultrafeedback_repository, PAIR_STAGES),
    "ultrafeedback Argilla (Parquet)": (parquet_of(ultrafeedback_argilla(8), "argilla.parquet"), PAIR_STAGES),
    "oasst1 (Parquet)": (parquet_of(oasst1(8), "oasst.parquet"), ("sft", "rl")),
    "trl conversational pairs": (jsonl_of(conversational_pairs(8), "conv.jsonl"), PAIR_STAGES),
    "trl implicit-prompt conversational pairs": (
        jsonl_of(implicit_conversational_pairs(8), "implicit-conv.jsonl"),
        PAIR_STAGES,
    ),
    "trl implicit-prompt string pairs": (jsonl_of(implicit_string_pairs(8), "implicit.jsonl"), PAIR_STAGES),
    "trl prompt-completion": (
        jsonl_of([{"prompt": f"p{i}", "completion": "c"} for i in range(8)], "pc.jsonl"),
        ("sft", "rl"),
    ),
    "trl conversational prompt-completion": (
        jsonl_of([{"prompt": [user(f"p{i}")], "completion": [assistant("c")]} for i in range(8)], "cpc.jsonl"),
        ("sft", "rl"),
    ),
    "trl language modelling text": (jsonl_of([{"text": f"some text {i}"} for i in range(8)], "text.jsonl"), ("sft",)),
    "trl conversational prompts": (
        jsonl_of([{"prompt": [user(f"p{i}"), assistant("a"), user("more")]} for i in range(4)], "cp.jsonl"),
        ("rl",),
    ),
}

CASES = [(name, kind) for name, (_, stages) in SOURCES.items() for kind in stages]


CONVERT = {"sft": to_sft, "reward": to_pair, "dpo": to_pair, "rl": to_prompt}


@pytest.mark.parametrize("name, kind", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_every_stage_on_every_format(name, kind, stage, tmp_path):
    write, _ = SOURCES[name]
    source = write(tmp_path / "data")
    # every record (an oasst tree; 4 for the prompts-only file, else 8) converts, none is left out
    valid, errors = validate_all(load_source(source), CONVERT[kind])
    assert errors == [] and len(valid) == (4 if name == "trl conversational prompts" else 8)
    stage(kind, source)


@pytest.mark.parametrize("kind", PAIR_STAGES)
def test_hh_rlhf_from_the_offline_cache(kind, stage, tmp_path, hf_cache):
    download_into_cache(hh_repo(tmp_path / "hh-rlhf"), "Anthropic/hh-rlhf", hf_cache)
    stage(kind, "hf:Anthropic/hh-rlhf:train")


def test_pipeline_splits_hh_rlhf_across_the_stages(tiny_dirs, tmp_path, hf_cache, capsys):
    """One pool of hh-rlhf transcripts: SFT on conversations, the reward model on pairs, RL on multi-turn
    prompts, and the final comparison on held-out prompts."""
    repo = tmp_path / "hh-rlhf"
    context = "\n\nHuman: hi {}\n\nAssistant: hey\n\nHuman: n?\n\nAssistant: "
    rows = [{"chosen": context.format(i) + str(i), "rejected": context.format(i) + "no"} for i in range(40)]
    write_jsonl(rows, repo / "helpful-base" / "train.jsonl")
    download_into_cache(repo, "Anthropic/hh-rlhf", hf_cache)
    run = tmp_path / "pipeline"
    code = main([
        "pipeline", "--model", str(tiny_dirs["llama"]), "--data.paths", "hf:Anthropic/hh-rlhf", "--run_dir", str(run),
        "--sft.max_steps", "1", "--reward.max_steps", "1", "--rl.iterations", "1", "--rl.rollout_batch_size", "2",
        "--rl.update.mini_batch_size", "2", "--rl.generation.max_new_tokens", "4", "--eval.num_prompts", "2",
        "--eval.samples_per_prompt", "1", "--reward_gate.action", "warn", *QUIET,
    ])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "pipeline: sft: 8 records" in captured.out and "pipeline: rl: 16 records" in captured.out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["comparison"]["prompts"] == 1  # RL's held-out 5% of its 16 records
    assert {"reward_model", "rl"} <= set(summary)


def test_skipped_unconvertible_records_are_counted(stage, tmp_path):
    rows = shp(8)
    rows[3].update(score_A=4, score_B=4)  # a tie
    out = stage("reward", str(write_parquet(rows, tmp_path / "shp.parquet")), "--data.skip_invalid", "True")
    assert "warning: skipped 1 invalid preference-pair records; first: " in out
    assert "shp.parquet:row 4: field 'labels': a tie: score_A and score_B are both 4" in out


def test_data_format_option_reaches_the_source(tiny_dirs, tmp_path, capsys):
    data = str(write_jsonl(rm_static(8), tmp_path / "rm.jsonl"))
    args = ["reward", "--model", str(tiny_dirs["llama"]), "--output_dir", str(tmp_path / "out"), "--data.paths", data]
    assert main([*args, "--train.max_steps", "1", "--data.format", "shp", *QUIET]) == 2
    assert "format 'shp' (stanfordnlp/SHP, stanfordnlp/SHP-2) needs the columns" in capsys.readouterr().err
