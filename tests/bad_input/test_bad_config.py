"""Bad configuration: flags, recipes and output directories. Each error names the config fields (and the recipe
file where the problem is in it) and what was expected."""

from __future__ import annotations

import re
import sys

import pytest

from chatrlhf.cli import main

from .conftest import QUIET, jsonl, write

GOOD = [{"prompt": "p", "response": "r"}] * 4
PAIRS = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(10)]


@pytest.fixture()
def data(tmp_path):
    return jsonl(tmp_path / "data.jsonl", GOOD)


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (
            ["--train.rollout_batch_size", "8", "--train.update.mini_batch_size", "3"],
            r"train\.update\.mini_batch_size \(3\) must divide the 8 sequences of an iteration "
            r"\(train\.rollout_batch_size × train\.group_size\)",
        ),
        (
            ["--train.ptx_coef", "1.0"],
            r"train\.ptx_coef is 1\.0 but train\.ptx_paths is empty: the PTX loss needs data",
        ),
        (
            ["--train.algo", "grpo"],
            r"train\.algo=grpo compares samples of a prompt: set train\.group_size >= 2",
        ),
        (
            ["--train.kl.placement", "loss"],
            r"train\.kl\.placement=loss with train\.kl\.estimator=k1: the gradient of k1 = log π − log π_ref does "
            r"not depend on the reference and is zero in expectation, so the penalty would do nothing\. Use "
            r"train\.kl\.estimator k3 \(or k2\)",
        ),
        (
            ["--train.algo", "dapo", "--train.group_size", "4", "--train.reward.overlong_buffer", "300"],
            r"train\.reward\.overlong_buffer \(300\) must be in \[0, train\.generation\.max_new_tokens = 256\]",
        ),
        (
            ["--train.algo", "gspo", "--train.group_size", "2", "--train.advantage.whiten", "True"],
            r"train\.advantage\.whiten applies to ppo only \(gspo has its own normalisation\)",
        ),
        (
            ["--train.algo", "remax", "--train.group_size", "2"],
            r"train\.algo=remax uses one sample and one greedy response per prompt: train\.group_size=1",
        ),
    ],
    ids=[
        "mini batch does not divide rollout",
        "ptx_coef without ptx_paths",
        "grpo with group_size 1",
        "k1 KL as a loss",
        "overlong buffer past the length",
        "whitening outside ppo",
        "remax with a group",
    ],
)
def test_conflicting_config_values(flags, pattern, tmp_path, out, fail, data):
    args = ["rl", "--actor", "a", "--reward_model", "b", "--data.paths", str(data), "--output_dir", str(out)]
    err = fail(args + flags)
    assert re.search(pattern, err), err


@pytest.mark.parametrize(
    "flag, pattern",
    [
        ("--train.ppo.kl_coef", r"'--train\.ppo\.kl_coef' was renamed: use '--train\.kl\.coef'"),
        (
            "--train.ppo.mini_batch_size",
            r"'--train\.ppo\.mini_batch_size' was renamed: use '--train\.update\.mini_batch",
        ),
        ("--train.ppo.clip_eps", r"use '--train\.loss\.clip_low' \(and loss\.clip_high, which follows clip_low"),
        ("--train.ppo.tis_cap", r"'--train\.ppo\.tis_cap' was renamed: use '--train\.rollout\.tis_cap'"),
        ("--train.grpo_scale_by_std", r"grpo_scale_by_std false is algo dr_grpo"),
        ("--rl.ppo.kl_in", r"'--rl\.ppo\.kl_in' was renamed: use '--rl\.kl\.placement'"),
    ],
)
def test_old_rl_flag_names_give_the_new_ones(flag, pattern, fail):
    stage = "pipeline" if flag.startswith("--rl.") else "rl"
    err = fail([stage, flag, "0.1"])
    assert re.search(pattern, err), err


def test_old_rl_recipe_section_gives_the_new_names(tmp_path, fail):
    recipe = write(tmp_path / "r.yaml", "rl:\n  ppo: {kl_coef: 0.05, mini_batch_size: 32}\n")
    err = fail(["pipeline", "--recipe", str(recipe)])
    assert re.search(
        r"recipe .*r\.yaml: 'rl\.ppo' is gone: its settings apply to every RL algorithm and moved by what they are "
        r"about: rl\.ppo\.kl_coef → rl\.kl\.coef; rl\.ppo\.mini_batch_size → rl\.update\.mini_batch_size",
        err,
    ), err


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--train.optim.lr", "-0.001"], r"train\.optim\.lr must be > 0, got -0\.001"),
        (["--data.weights", "1", "2"], r"data\.weights has 2 values but data\.paths has 1 source\(s\)"),
        (["--data.eval_fraction", "1.0"], r"data\.eval_fraction must be in \[0, 1\), got 1\.0"),
        (["--train.max_seq_len", "0"], r"train\.max_seq_len must be >= 1, got 0"),
        (["--lora.rank", "-1"], r"lora\.rank must be >= 0 \(0 = no LoRA\), got -1"),
        (
            ["--engine.offload_params", "True"],
            r"engine\.offload_params needs engine\.kind=deepspeed, but engine\.kind is single",
        ),
    ],
    ids=["negative lr", "weights count mismatch", "eval_fraction 1", "max_seq_len 0", "lora rank -1", "offload"],
)
def test_value_out_of_range(flags, pattern, sft, fail, data):
    err = fail(sft(data, *flags))
    assert re.search(pattern, err), err


def test_missing_required_field(fail, data):
    err = fail(["sft", "--data.paths", str(data)])
    assert re.search(r"model is required: give a model id, directory or tiny:ARCH preset \(--model", err), err


def test_unknown_cli_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sft", "--model", "x", "--no_such_option", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.search(r"Unrecognized options: --no_such_option", err), err


def test_cli_value_of_wrong_type(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sft", "--model", "x", "--train.optim.lr", "fast"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.search(r"Error parsing --train\.optim\.lr: .*'fast'", err), err


def test_unknown_command(capsys):
    assert main(["sftt", "--model", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chatrlhf: unknown command 'sftt'")
    assert "usage: chatrlhf {sft,reward,rl,dpo,pipeline,eval}" in err and "chatrlhf {chat,serve} MODEL_DIR" in err


def test_missing_recipe(tmp_path, fail):
    err = fail(["sft", "--recipe", str(tmp_path / "nope.yaml")])
    assert re.search(r"recipe .*nope\.yaml: file not found", err), err


def test_recipe_that_is_not_yaml(tmp_path, fail):
    recipe = write(tmp_path / "r.yaml", "model: x\ntrain:\n  optim: {lr: 0.1\n")
    err = fail(["sft", "--recipe", str(recipe)])
    assert re.search(r"recipe .*r\.yaml: invalid YAML: .*line \d+, column \d+", err, re.S), err


def test_unknown_recipe_key(tmp_path, fail):
    recipe = write(tmp_path / "r.yaml", "model: x\ntrain:\n  optim:\n    lrr: 0.1\n")
    err = fail(["sft", "--recipe", str(recipe)])
    assert re.search(r"recipe .*r\.yaml: unknown config key 'train\.optim\.lrr' \(known: .*\blr\b", err), err


@pytest.mark.parametrize(
    "yaml_text, pattern",
    [
        ("train:\n  optim:\n    lr: fast\n", r"train\.optim\.lr: expected a number, found string 'fast'$"),
        (
            "train:\n  optim:\n    lr: 1e-5\n",
            r"train\.optim\.lr: expected a number, found string '1e-5' \(YAML reads an exponent .*write 1\.0e-5",
        ),
        ("train:\n  max_steps: 1.5\n", r"train\.max_steps: expected an integer, found number 1\.5$"),
        ("run:\n  dtype: float64\n", r"run\.dtype: expected one of 'float32', 'bfloat16', 'float16', found string"),
        ("data:\n  paths: data.jsonl\n", r"data\.paths: expected a list of strings, found string 'data\.jsonl'$"),
        ("train: 5\n", r"recipe .*r\.yaml: train: expected a mapping, got int$"),
    ],
    ids=[
        "string for a number",
        "exponent without a decimal point",
        "float for an int",
        "not a choice",
        "scalar for a list",
        "scalar for a section",
    ],
)
def test_recipe_value_of_wrong_type(yaml_text, pattern, tmp_path, out, fail):
    recipe = write(tmp_path / "r.yaml", f"model: x\noutput_dir: {out}\n{yaml_text}")
    err = fail(["sft", "--recipe", str(recipe), *QUIET])
    assert re.search(pattern, err.strip()), err


@pytest.mark.parametrize("layout", ["finished run", "unfinished run"])
def test_output_directory_holding_another_run(layout, sft, out, fail, data):
    held = out / ("model" if layout == "finished run" else "checkpoints/step-3")
    held.mkdir(parents=True)
    (held / "marker").write_text("theirs")
    err = fail(sft(data))
    if layout == "finished run":
        assert re.search(r"output directory '.*out' already holds a finished run \(model/\).*--run\.overwrite", err)
    else:
        assert re.search(r"output directory '.*out' holds checkpoints of an unfinished run; pass --resume auto", err)
    assert (held / "marker").read_text() == "theirs"
    assert sorted(p.name for p in out.iterdir()) == [held.relative_to(out).parts[0]]


def test_output_directory_that_is_a_file(tmp_path, tiny_dirs, fail, data):
    taken = write(tmp_path / "taken", "a file")
    err = fail(["sft", "--model", str(tiny_dirs["llama"]), "--output_dir", str(taken), "--data.paths", str(data)])
    assert re.search(r"output directory '.*taken' is not writable: .*File exists", err), err
    assert taken.read_text() == "a file"


@pytest.fixture()
def pipeline(tiny_dirs, tmp_path, out):
    pairs = jsonl(tmp_path / "pairs.jsonl", PAIRS)
    return lambda *flags: (
        ["pipeline", "--model", str(tiny_dirs["llama"]), "--run_dir", str(out)]
        + [*["--data.paths", str(pairs), *QUIET, *flags]]
    )


def test_split_that_leaves_a_stage_no_data(pipeline, fail):
    err = fail(pipeline("--data.split", "10,0,0"))
    # 10 records at fractions (1, 0, 0): SFT gets round(10·1) = 10, the reward model (next in line) none.
    assert re.search(
        r"stage 'reward' has no data: data\.split='10,0,0' gives it no share of the 10 pooled records "
        r"and data\.reward_paths is empty",
        err,
    ), err


def test_malformed_split(pipeline, fail):
    err = fail(pipeline("--data.split", "1,2"))
    assert re.search(r"data\.split: expected three comma-separated weights for SFT, reward and RL .*got 2: '1,2'", err)


def test_launcher_without_the_deepspeed_engine(sft, fail, data, monkeypatch):
    # torchrun sets WORLD_SIZE; with engine.kind single every process would run the whole stage into one directory
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = fail(sft(data))
    assert re.search(r"launched as 2 processes \(WORLD_SIZE=2.*engine\.kind is single.*--engine\.kind deepspeed", err)


def test_deepspeed_engine_without_deepspeed_installed(sft, fail, data, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` now raises ImportError
    err = fail(sft(data, "--engine.kind", "deepspeed"))
    assert "engine.kind=deepspeed needs DeepSpeed: pip install 'chatrlhf[deepspeed]'" in err, err
