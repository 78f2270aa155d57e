"""The equal-work rules and the chatrlhf commands of bench/trl_compare.py (the bench itself needs TRL and runs for
minutes; neither is needed here: nothing below imports trl)."""

from __future__ import annotations

import argparse

import pytest

from tests.conftest import load_bench

ACTOR, CRITIC = 1000, 900  # parameters of the actor and of the reward model / critic


@pytest.fixture(scope="module")
def tc():
    with load_bench("trl_compare") as module:
        yield module


def options(tc, algo="grpo", frameworks=None, group=None) -> argparse.Namespace:
    a = argparse.Namespace(algo=algo, frameworks=frameworks, group=group, prompts=8, new_tokens=64, warmup=1,
                           steps=2, beta=0.04, lr=1e-5)  # fmt: skip
    tc.settle_options(a)
    return a


def row_as_expected(tc, framework: str, a: argparse.Namespace) -> dict:
    want = tc.expected_work(framework, a, ACTOR, CRITIC)
    return {"framework": framework, "model": "llama-h64", "response_length_mean": [a.new_tokens] * 3, **want}


def test_options_default_per_algorithm(tc):
    grpo, ppo = options(tc, "grpo"), options(tc, "ppo")
    assert (grpo.frameworks, grpo.group) == (["chatrlhf", "trl", "floor"], 4)
    assert (ppo.frameworks, ppo.group) == (["chatrlhf", "chatrlhf-sampler", "trl", "trl-nogc", "floor"], 1)


@pytest.mark.parametrize(
    "algo, frameworks, group, words",
    [("grpo", ["trl-nogc"], None, "--algo ppo"),
     ("grpo", ["chatrlhf-sampler"], None, "PPO's"), ("ppo", None, 4, "--group must be 1")],
)  # fmt: skip
def test_options_refused(tc, algo, frameworks, group, words):
    with pytest.raises(SystemExit, match=words):
        options(tc, algo, frameworks, group)


def test_grpo_expects_one_actor_optimizer_step_and_one_generate_per_step(tc):
    a = options(tc, "grpo")
    for framework in ("chatrlhf", "trl", "floor"):
        want = tc.expected_work(framework, a, ACTOR)
        assert want == {"optimizer_steps": 3, "optimizers": [[3, ACTOR]], "generate_calls": [[32, 64]] * 3}


def test_ppo_expects_two_optimizers_in_chatrlhf_and_one_over_policy_and_value_in_trl(tc):
    a = options(tc, "ppo")
    chatrlhf = tc.expected_work("chatrlhf", a, ACTOR, CRITIC)
    assert chatrlhf["optimizer_steps"] == 6 and chatrlhf["optimizers"] == [[3, CRITIC], [3, ACTOR]]
    assert chatrlhf["generate_calls"] == [[8, 64]] * 3
    assert tc.expected_work("chatrlhf-sampler", a, ACTOR, CRITIC) == chatrlhf
    assert tc.expected_work("floor", a, ACTOR, CRITIC) == chatrlhf  # the floor steps actor and critic apart too
    for framework, skipped in (("trl", None), ("trl-nogc", 6)):
        trl = tc.expected_work(framework, a, ACTOR, CRITIC)
        assert trl["optimizer_steps"] == 3 and trl["optimizers"] == [[3, ACTOR + CRITIC]]
        assert trl["generate_calls"] == [[8, 64]] * 3
        assert trl["eos_tokens"] == [0, 0, 0] and trl["gc_collects_skipped"] == skipped


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_check_equal_work_passes_the_expected_rows(tc, algo):
    a = options(tc, algo)
    for framework in a.frameworks:
        tc.check_equal_work(row_as_expected(tc, framework, a), a, ACTOR, CRITIC)


@pytest.mark.parametrize(
    "framework, change, key",
    [
        # the right total of 6 steps, but from one optimizer stepping twice per RL step: not the actor and the critic
        ("chatrlhf", {"optimizers": [[6, ACTOR]]}, "optimizers"),
        ("chatrlhf", {"optimizer_steps": 3, "optimizers": [[3, ACTOR]]}, "optimizer_steps"),
        ("trl", {"optimizers": [[3, ACTOR]]}, "optimizers"),  # the value model not in TRL's optimizer
        ("trl", {"generate_calls": [[4, 64]] * 6}, "generate_calls"),  # two generate() calls per step
        ("trl", {"eos_tokens": [0, 1, 0]}, "eos_tokens"),
        ("trl", {"gc_collects_skipped": 6}, "gc_collects_skipped"),  # `trl` must run as shipped
        ("trl-nogc", {"gc_collects_skipped": None}, "gc_collects_skipped"),  # the gc stand-in was not installed
        ("trl-nogc", {"response_length_mean": [64, 63, 64]}, "response lengths"),
    ],
)
def test_check_equal_work_refuses_other_work(tc, framework, change, key):
    a = options(tc, "ppo")
    row = {**row_as_expected(tc, framework, a), **change}
    with pytest.raises(tc.UnequalWork, match=key):
        tc.check_equal_work(row, a, ACTOR, CRITIC)


def test_skipped_collect_counts_and_collects_nothing(tc):
    gc = tc.SkippedCollect()
    assert gc.collect() == 0 and gc.collect(2) == 0 and gc.calls == 2


def test_chatrlhf_ppo_command_is_the_documented_workload(tc, tmp_path):
    from chatrlhf.cli import parse
    from chatrlhf.train.update import reuses_update_forward

    a = options(tc, "ppo")
    args = tc.chatrlhf_args(tmp_path / "actor", tmp_path / "p.jsonl", tmp_path / "out", a, tmp_path / "rm")
    cfg = parse(args[0], args[1:])
    cfg.validate()
    t = cfg.train
    assert (t.algo, t.group_size, t.iterations, t.rollout_batch_size) == ("ppo", 1, 3, 8)
    assert cfg.reward_model == str(tmp_path / "rm") and cfg.critic is None and not cfg.reward_functions
    assert (t.kl.placement, t.kl.estimator, t.kl.coef) == ("reward", "k1", 0.04)
    assert (t.update.epochs, t.update.mini_batch_size, t.update.micro_batch_size) == (1, 0, 0)
    assert t.advantage.whiten and (t.advantage.gamma, t.advantage.lam) == (1.0, 0.95)
    for o in (t.actor_optim, t.critic_optim):
        assert (o.lr, tuple(o.betas), o.weight_decay, o.grad_clip, o.schedule) == (1e-5, (0.9, 0.999), 0, 0, "constant")
    # the docs' account of the unequal work: with the KL in the reward, chatrlhf runs its own no-grad forward of
    # the actor for log π_old (TRL takes them from generate()'s scores)
    assert not reuses_update_forward(t, "hf")
    # chatrlhf-sampler: the same command taking π_old from the generator instead
    sampler = parse(args[0], args[1:] + tc.SAMPLER_ARGS)
    sampler.validate()
    assert sampler.train.update.old_logprobs == "sampler" and sampler.train.algo == "ppo"


def test_chatrlhf_grpo_command_is_unchanged_by_the_ppo_mode(tc, tmp_path):
    from chatrlhf.cli import parse

    a = options(tc, "grpo")
    args = tc.chatrlhf_args(tmp_path / "actor", tmp_path / "p.jsonl", tmp_path / "out", a)
    assert args[args.index("--reward_functions") + 1] == "trl_compare:letter_share"
    t = parse(args[0], args[1:]).train
    assert (t.algo, t.group_size, t.kl.placement, t.kl.estimator) == ("grpo", 4, "loss", "k3")


def test_ppo_floor_worker_does_the_workload(tc, tmp_path):
    """The PPO floor on a tiny pair of models, as the bench starts it: one generate() of the prompts per step at
    full length (the generate() record), the actor's and the critic's optimizers one step each per step, and the
    phases it reports."""
    import json
    import subprocess
    import sys

    a = options(tc, "ppo")
    a.prompts, a.new_tokens, a.warmup, a.steps = 2, 6, 1, 1
    model = tc.build_model(tmp_path, 32, layers=1)
    rm = tc.build_reward_model(tmp_path, model)
    prompts = tmp_path / "prompts.jsonl"
    texts = tc.prompt_texts(model, a.prompts * (a.warmup + a.steps))
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    out = tmp_path / "floor"
    out.mkdir()
    spec, counts = out / "spec.json", tmp_path / "counts.json"
    spec.write_text(json.dumps(tc.trl_spec(model, prompts, out, a, "floor", rm)))
    subprocess.run([sys.executable, str(tc.BENCH / "trl_compare.py"), "--worker", "floor", "--counts", str(counts),
                    "--spec", str(spec)], check=True, timeout=300)  # fmt: skip
    seen = json.loads(counts.read_text())
    row = {"framework": "floor", "model": model.name, "response_length_mean": [a.new_tokens] * 2,  # as run_one
           "optimizer_steps": seen["optimizer_steps"], "generate_calls": seen["generate_calls"],
           "optimizers": sorted([o["steps"], o["params"]] for o in seen["optimizers"].values())}  # fmt: skip
    tc.check_equal_work(row, a, tc.param_count(model), tc.param_count(rm, reward_model=True))
    phases = json.loads((out / "floor_result.json").read_text())
    assert [sorted(p) for p in phases] == [["end_s", "forwards_s", "generate_s", "train_s"]] * 2
