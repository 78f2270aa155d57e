"""Bad input: a clear message naming file, line and field (or the config fields), exit 2, no traceback, and no
half-written output directory."""

from __future__ import annotations

import json
import re

import pytest

from chatrlhf.cli import main


@pytest.fixture()
def sft_args(tmp_path, tiny_dirs):
    def make(data_path, *extra):
        return [
            "sft",
            "--model",
            str(tiny_dirs["llama"]),
            "--output_dir",
            str(tmp_path / "out"),
            "--data.paths",
            str(data_path),
            "--train.max_steps",
            "1",
            "--run.progress",
            "False",
            *extra,
        ]

    return make


def run_error(args, capsys) -> str:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


GOOD = json.dumps({"prompt": "p", "response": "r"})

CASES = {
    "missing file": (None, r"nope\.jsonl: no such file"),
    "malformed json": (GOOD + "\n{not json\n", r"data\.jsonl:line 2:.*JSON"),
    "missing field": (GOOD + "\n" + json.dumps({"prompt": "p"}) + "\n", r"data\.jsonl:line 2:.*'response'"),
    "wrong type": (json.dumps({"prompt": 3, "response": "r"}) + "\n", r"data\.jsonl:line 1:.*'prompt'.*str"),
    "empty response": (
        GOOD + "\n" + GOOD + "\n" + json.dumps({"prompt": "p", "response": "  "}) + "\n",
        r"data\.jsonl:line 3:.*'response'.*whitespace",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_records(case, tmp_path, sft_args, capsys):
    text, pattern = CASES[case]
    path = tmp_path / "nope.jsonl" if text is None else write(tmp_path, "data.jsonl", text)
    err = run_error(sft_args(path), capsys)
    assert re.search(pattern, err, re.S), err
    assert not (tmp_path / "out").exists(), "nothing may be left behind"


def test_record_over_max_len(tmp_path, sft_args, capsys):
    path = write(tmp_path, "data.jsonl", GOOD + "\n" + json.dumps({"prompt": "p" * 80, "response": "r"}) + "\n")
    err = run_error(sft_args(path, "--train.max_seq_len", "40"), capsys)
    assert "data.jsonl:line 2" in err and "max_seq_len=40" in err
    assert not (tmp_path / "out").exists()


def test_missing_model_directory(tmp_path, capsys, pairs_file):
    err = run_error(
        [
            "sft",
            "--model",
            str(tmp_path / "nomodel"),
            "--output_dir",
            str(tmp_path / "o"),
            "--data.paths",
            str(pairs_file),
        ],
        capsys,
    )
    assert "nomodel" in err and "no such directory" in err


def test_directory_that_is_not_a_model(tmp_path, capsys, pairs_file):
    (tmp_path / "empty").mkdir()
    err = run_error(
        [
            "sft",
            "--model",
            str(tmp_path / "empty"),
            "--output_dir",
            str(tmp_path / "o"),
            "--data.paths",
            str(pairs_file),
        ],
        capsys,
    )
    assert "not a Hugging Face model directory" in err


@pytest.mark.parametrize(
    "flags, fields",
    [
        (
            ["--train.rollout_batch_size", "8", "--train.ppo.mini_batch_size", "3"],
            ["mini_batch_size", "rollout_batch_size"],
        ),
        (["--train.ptx_coef", "1.0"], ["ptx_coef", "ptx_paths"]),
        (["--train.ppo.gamma", "1.5"], ["gamma"]),
    ],
)
def test_conflicting_config_values(flags, fields, tmp_path, capsys, pairs_file):
    err = run_error(
        [
            "rl",
            "--actor",
            "a",
            "--reward_model",
            "b",
            "--data.paths",
            str(pairs_file),
            "--output_dir",
            str(tmp_path / "o"),
            *flags,
        ],
        capsys,
    )
    for f in fields:
        assert f in err
    assert not (tmp_path / "o").exists()


def test_missing_required_field(capsys):
    assert "model is required" in run_error(["sft", "--data.paths", "x.jsonl"], capsys)


def test_unknown_recipe_key(tmp_path, capsys):
    recipe = write(tmp_path, "r.yaml", "model: x\ntrain:\n  optim:\n    lrr: 0.1\n")
    err = run_error(["sft", "--recipe", str(recipe)], capsys)
    assert "r.yaml" in err and "train.optim.lrr" in err


def test_unknown_cli_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sft", "--model", "x", "--no_such_option", "1"])
    assert e.value.code == 2


def test_output_directory_holding_another_run(tmp_path, sft_args, capsys, pairs_file):
    (tmp_path / "out" / "model").mkdir(parents=True)
    err = run_error(sft_args(pairs_file), capsys)
    assert "already holds a finished run" in err and "--run.overwrite" in err
