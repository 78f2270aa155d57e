"""Multi-turn episodes token in, token out: the sampled ids are what the trainer scores, the mask covers only the
policy's tokens, templates that rewrite earlier turns are refused, tools are called and bounded.

Expected values never come from the runner itself: the sampled tokens are recorded by a wrapper around the
generator, the log-probs by a plain forward of the model, and the environment's tokens by the byte tokenizer's
decoding (id = byte value) compared with the template's own rendering of the conversation.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatrlhf.config import GenerationConfig
from chatrlhf.engine.generation import Generated, HFGenerator
from chatrlhf.envs.episode import LoadedEnvironment, Reply, load_environment
from chatrlhf.envs.runner import (
    ChatFormat,
    EpisodeLimits,
    EpisodeRunner,
    TemplateRewrite,
    check_template,
    collate_episodes,
)
from chatrlhf.envs.tools import Tool, parse_tool_calls
from chatrlhf.errors import UserError
from chatrlhf.models.tiny import CHAT_TEMPLATE, EOS_ID, TINY_ARCHS
from chatrlhf.train.forward import sequence_token_logprobs

# ------------------------------------------------------------------------------------------------ environments


class FollowUp:
    """Two questions, the second asked after the first answer; done after the second answer (reward 1)."""

    def reset(self, record):
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, turn):
        if not hasattr(self, "asked"):
            self.asked = True
            return Reply([{"role": "user", "content": "Now list 2 words starting with b."}], reward=0.25)
        return Reply(reward=1.0, done=True)


class Endless:
    """A user who always asks again."""

    def reset(self, record):
        return [{"role": "user", "content": "Hi."}]

    def step(self, turn):
        return Reply([{"role": "user", "content": "Again."}])


def add(a: float, b: float) -> float:
    """Add two numbers.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


def explode(x: int) -> int:
    """Always fails.

    Args:
        x: anything
    """
    raise ValueError("no luck")


def slow(x: int) -> int:
    """Takes too long.

    Args:
        x: anything
    """
    time.sleep(2)
    return x


class Calculator:
    """Tools to call; the answer 413 scores 1. (Byte tokens: the tools' description alone is ~1000 tokens.)"""

    tools = [add, explode, slow]

    def reset(self, record):
        return [{"role": "user", "content": "What is 408 + 5?"}]

    def step(self, turn):
        return Reply(reward=float(turn.strip() == "413"), done=True)


def env(cls) -> LoadedEnvironment:
    return LoadedEnvironment(f"{__name__}:{cls.__name__}", cls)


# ------------------------------------------------------------------------------------------------ generators


class Scripted:
    """A generator that answers every row of its n-th call with `replies[n]` + EOS (byte tokens)."""

    def __init__(self, replies: list[str]):
        self.replies, self.calls = replies, 0

    def generate(self, prompts, *, greedy=False, logprobs=False, width=None) -> Generated:
        reply = list(self.replies[self.calls].encode()) + [EOS_ID]
        self.calls += 1
        tokens = torch.tensor([reply] * len(prompts))
        return Generated(tokens, torch.ones(tokens.shape), torch.zeros(tokens.shape), ["stop"] * len(prompts))


class Recording:
    """A generator that records, per prompt, the tokens it returned (the prompt's ids identify the episode)."""

    def __init__(self, inner):
        self.inner, self.sampled = inner, []

    def generate(self, prompts, **kwargs) -> Generated:
        out = self.inner.generate(prompts, **kwargs)
        for row, prompt in enumerate(prompts):
            n = int(out.mask[row].sum())
            self.sampled.append((list(prompt), out.tokens[row, :n].tolist(), out.logprobs[row, :n].tolist()))
        return out


@pytest.fixture(scope="module")
def tok(tiny_dirs):
    return AutoTokenizer.from_pretrained(tiny_dirs["llama"])


# ------------------------------------------------------------------------------------------------ token in, token out


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_trainer_logprobs_are_on_the_sampled_ids_of_every_turn(sft_llama, greedy):
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(sft_llama)
    model = AutoModelForCausalLM.from_pretrained(sft_llama, dtype=torch.float32).eval()
    gen = Recording(HFGenerator(model, tok, GenerationConfig(max_new_tokens=40, temperature=0.9)))
    records = [{"prompt": f"List {n} words starting with the letter {c}."} for n, c in zip([2, 3, 4, 3], "sdpt")]
    episodes = EpisodeRunner(env(FollowUp), tok, EpisodeLimits(max_turns=3)).run(gen, records, greedy=greedy)
    assert sum(ep.turns >= 2 for ep in episodes) >= 2, [ep.end for ep in episodes]

    for ep in episodes:
        # every turn's sampled tokens sit at the policy positions, in order, right after the context they answered
        turns = [
            (p, t, lp) for p, t, lp in gen.sampled if ep.ids[: len(p)] == p and ep.ids[len(p) : len(p) + len(t)] == t
        ]
        assert len(turns) == ep.turns
        expected_mask = [0] * len(ep.ids)
        for prompt, tokens, _ in turns:
            expected_mask[len(prompt) : len(prompt) + len(tokens)] = [1] * len(tokens)
        assert ep.policy_mask == expected_mask

    batch = collate_episodes(episodes, tok.pad_token_id)
    with torch.no_grad():
        trainer = sequence_token_logprobs(model, batch.ids, batch.attention_mask)
    on_policy = batch.policy_mask.bool()
    assert int(on_policy.sum()) == sum(len(t) for _, t, _ in gen.sampled)
    assert torch.allclose(trainer[on_policy], batch.logprobs[on_policy], atol=1e-5)
    sampler = torch.tensor([lp for _, _, lps in gen.sampled for lp in lps])
    assert torch.allclose(batch.logprobs[on_policy].sort().values, sampler.sort().values, atol=0)


def test_environment_tokens_are_the_templates_rendering(tok):
    ep = EpisodeRunner(env(FollowUp), tok).run(Scripted([" sand ship", " bed bell"]), [{"prompt": "Two s words."}])[0]
    assert ep.end == "done" and ep.turns == 2 and ep.turn_rewards == [0.25, 1.0] and ep.reward == 1.25
    rendered = tok.apply_chat_template(ep.messages, tokenize=False)
    assert tok.decode(ep.ids, skip_special_tokens=False) + "\n" == rendered  # the template's "\n" after the last EOS
    policy = [t for t, m in zip(ep.ids, ep.policy_mask) if m]
    assert policy == list(b" sand ship") + [EOS_ID] + list(b" bed bell") + [EOS_ID]
    assert [m["role"] for m in ep.messages] == ["user", "assistant", "user", "assistant"]


# ------------------------------------------------------------------------------------------------ the rewrite check

# The tiny template, but an assistant turn that another message follows loses its <think>...</think> reasoning
# (as some reasoning models' templates do): the text of earlier turns changes when a turn is added.
DROPS_REASONING = CHAT_TEMPLATE.replace(
    "{{ message['content'] + eos_token }}",
    "{{ (message['content'].split('</think>')[-1] if not loop.last else message['content']) + eos_token }}",
)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_templates_pass_the_rewrite_check(tiny_dirs, arch):
    tok = AutoTokenizer.from_pretrained(tiny_dirs[arch])
    assert check_template(ChatFormat(tok)) == 6
    assert check_template(ChatFormat(tok, [Tool.of(add, "test")])) == 7


def test_a_template_that_drops_earlier_reasoning_is_refused(tok):
    rewriting = AutoTokenizer.from_pretrained(tok.name_or_path)
    rewriting.chat_template = DROPS_REASONING
    with pytest.raises(TemplateRewrite, match=r"rewrites earlier turns.*message 4 \(user\).*'<think>12"):
        check_template(ChatFormat(rewriting))
    with pytest.raises(TemplateRewrite, match="rewrites earlier turns"):
        EpisodeRunner(env(FollowUp), rewriting)


def test_a_tokenizer_without_a_chat_template_is_refused(tok):
    plain = AutoTokenizer.from_pretrained(tok.name_or_path)
    plain.chat_template = None
    with pytest.raises(UserError, match="need a tokenizer with a chat template"):
        EpisodeRunner(env(FollowUp), plain)


# ------------------------------------------------------------------------------------------------ tools


def call(name: str, **arguments) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def test_a_calculator_tool_is_called_and_its_result_appended(tok):
    runner = EpisodeRunner(env(Calculator), tok, EpisodeLimits(max_tokens=4096))
    assert not runner.fmt.native_tools  # the tiny template has no tool support: the fallback format
    ep = runner.run(Scripted([" " + call("add", a=408, b=5), " 413"]), [{}])[0]
    assert ep.end == "done" and ep.reward == 1.0 and ep.tool_errors == 0
    assert [r.content for r in ep.tool_results] == ["413"]
    assert ep.messages[2] == {"role": "tool", "name": "add", "content": "413"}
    rendered = runner.fmt.render(ep.messages, add_generation_prompt=False)
    assert "<tool_response>\n413\n</tool_response>" in rendered and '"name": "add"' in rendered  # described tools
    assert tok.decode(ep.ids, skip_special_tokens=False) + "\n" == rendered


class KnownCalculator(Calculator):
    """The same tools, known to the policy: not described in the prompt."""

    describe_tools = False


def test_tools_left_undescribed_are_still_called(tok):
    """describe_tools = False: the prompt is the bare conversation, the calls are answered as with a description."""
    runner = EpisodeRunner(env(KnownCalculator), tok, EpisodeLimits(max_tokens=512))  # no ~1000-token description
    question = Calculator().reset({})
    bare = tok.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    assert runner.fmt.render(question, add_generation_prompt=True) == bare
    described = EpisodeRunner(env(Calculator), tok, EpisodeLimits(max_tokens=4096)).fmt
    assert len(runner.fmt.prompt_ids(question)) + 900 < len(described.prompt_ids(question))
    ep = runner.run(Scripted([" " + call("add", a=408, b=5), " 413"]), [{}])[0]
    assert ep.end == "done" and ep.reward == 1.0 and [r.content for r in ep.tool_results] == ["413"]
    rendered = runner.fmt.render(ep.messages, add_generation_prompt=False)
    assert "<tool_response>\n413\n</tool_response>" in rendered and "You may call" not in rendered
    assert tok.decode(ep.ids, skip_special_tokens=False) + "\n" == rendered


def test_describe_tools_must_be_a_bool():
    class Vague(Calculator):
        describe_tools = "no"

    with pytest.raises(UserError, match="describe_tools is 'no'; expected True or False"):
        env(Vague)


def test_failing_tools_become_error_messages_and_are_counted(tok):
    runner = EpisodeRunner(
        env(Calculator), tok, EpisodeLimits(tool_timeout_s=0.2, max_turns=6, max_tool_calls=8, max_tokens=4096)
    )
    turns = [call("explode", x=1), call("slow", x=1), "<tool_call>{not json</tool_call>", call("nope"),
             call("add", a=1), " 413"]  # fmt: skip
    started = time.perf_counter()
    ep = runner.run(Scripted(turns), [{}])[0]
    assert time.perf_counter() - started < 1.5  # the slow tool was not waited for
    assert ep.end == "done" and ep.reward == 1.0 and ep.turns == 6
    assert [r.error for r in ep.tool_results] == ["exception", "timeout", "parse", "unknown_tool", "arguments"]
    assert ep.tool_errors == 5
    told = [m["content"] for m in ep.messages if m["role"] == "tool"]
    assert told[0] == "error: ValueError: no luck" and "did not finish within 0.2 s" in told[1]
    assert "missing argument(s) ['b']" in told[4]


def test_max_turns_and_max_tool_calls_bound_an_episode(tok):
    ep = EpisodeRunner(env(Endless), tok, EpisodeLimits(max_turns=3)).run(Scripted([" a"] * 5), [{}])[0]
    assert ep.end == "max_turns" and ep.turns == 3
    runner = EpisodeRunner(env(Calculator), tok, EpisodeLimits(max_turns=4, max_tool_calls=2, max_tokens=4096))
    ep = runner.run(Scripted([call("add", a=1, b=2)] * 4), [{}])[0]
    assert ep.end == "max_turns" and ep.turns == 4
    assert [r.error for r in ep.tool_results] == [None, None, "limit", "limit"] and ep.tool_errors == 2
    ep = EpisodeRunner(env(Endless), tok, EpisodeLimits(max_turns=99, max_tokens=60)).run(Scripted([" a"] * 9), [{}])[0]
    assert ep.end == "max_tokens" and len(ep.ids) <= 60


def test_a_turn_cut_at_max_new_tokens_ends_the_episode(tok):
    class Cut(Scripted):
        def generate(self, prompts, **kwargs):
            out = super().generate(prompts, **kwargs)
            return Generated(out.tokens[:, :-1], out.mask[:, :-1], out.logprobs[:, :-1], ["length"] * len(prompts))

    ep = EpisodeRunner(env(Endless), tok).run(Cut([" abc"]), [{}])[0]
    assert ep.end == "length" and ep.turns == 1 and ep.policy_mask[-3:] == [1, 1, 1]


# ------------------------------------------------------------------------------------------------ the context


def test_limits_past_the_models_context_are_refused(tok):
    EpisodeRunner(env(Endless), tok, EpisodeLimits(max_tokens=472, max_new_tokens=40, context=512))  # 512: fits
    with pytest.raises(UserError, match="past the model's context of 512 tokens") as e:
        EpisodeRunner(env(Endless), tok, EpisodeLimits(max_tokens=473, max_new_tokens=40, context=512))
    for named in ("max_tokens=473 (train.episode.max_tokens)", "max_new_tokens=40 (train.generation.max_new_tokens)",
                  "is 513 tokens"):  # fmt: skip
        assert named in str(e.value)


def test_first_messages_that_cannot_fit_are_refused(tok):
    """The fallback tool description alone is longer than the tiny models' 512 positions (byte tokens)."""
    described = sum(len(json.dumps(t.schema)) for t in env(Calculator).tools)  # one byte token per character
    assert described > 512
    with pytest.raises(UserError, match=r"first messages take at least (\d+) tokens \(the tools' description") as e:
        EpisodeRunner(env(Calculator), tok, EpisodeLimits(max_tokens=512))
    assert int(str(e.value).split("at least ")[1].split()[0]) > described
    EpisodeRunner(env(Endless), tok, EpisodeLimits(max_tokens=512))  # without tools the same bound is fine

    class LongReset(Endless):
        def reset(self, record):
            return [{"role": "user", "content": "x" * 600}]

    # "User: " + 600 bytes + "\n" + the generation prompt "Assistant:" = 617 tokens
    with pytest.raises(UserError, match="first messages of the episode of record .* are 617 tokens, over max_tokens"):
        EpisodeRunner(env(LongReset), tok, EpisodeLimits(max_tokens=512)).run(Scripted([" a"]), [{}])


def test_episodes_on_learned_positions_stay_within_the_context(tmp_path):
    """GPT-2's position embeddings are a table of `positions` rows: one position more is an index error. An episode
    that keeps going stops at max_tokens before a turn, and its last turn of at most max_new_tokens still fits."""
    from chatrlhf.models.tiny import build_tiny_model

    path = build_tiny_model(tmp_path / "gpt2", arch="gpt2", hidden=32, layers=2, heads=4, positions=128)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.config.n_positions == 128
    with pytest.raises(UserError, match="context of 128 tokens"):
        EpisodeRunner(env(Endless), tok, EpisodeLimits(max_turns=99, max_tokens=109, max_new_tokens=20, context=128))
    runner = EpisodeRunner(env(Endless), tok, EpisodeLimits(max_turns=99, max_tokens=108, max_new_tokens=20,
                                                            context=128))  # fmt: skip
    ep = runner.run(Scripted(["x" * 19] * 20), [{}])[0]  # 19 bytes + EOS = 20 tokens a turn
    # "User: Hi.\nAssistant:" is 20 tokens, each answer "\nUser: Again.\nAssistant:" 24: the third turn starts at
    # 20 + 2·(20 + 24) = 108 = max_tokens and ends at 128, the whole context; the next answer does not fit
    assert ep.end == "max_tokens" and ep.turns == 3 and len(ep.ids) == 128
    with torch.no_grad():  # the whole episode goes through the model: no position past its table
        ids = torch.tensor([ep.ids])
        assert sequence_token_logprobs(model, ids, torch.ones_like(ids)).shape == (1, len(ep.ids))
        with pytest.raises(IndexError):  # what an unchecked episode one token longer would do
            long = torch.tensor([ep.ids + [0] * (129 - len(ep.ids))])
            sequence_token_logprobs(model, long, torch.ones_like(long))


def test_tool_calls_in_the_fallback_format_parse():
    calls = parse_tool_calls(
        'x <tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call> <tool_call>[1]</tool_call>'
    )
    assert calls[0].name == "add" and calls[0].arguments == {"a": 1} and calls[0].problem is None
    assert calls[1].problem is not None


# ------------------------------------------------------------------------------------------------ bad environments


def test_bad_environments_are_user_errors(tmp_path, monkeypatch):
    (tmp_path / "my_envs.py").write_text(
        textwrap.dedent(
            """
            from chatrlhf.envs.episode import Reply

            class NoStep:
                def reset(self, record):
                    return [{"role": "user", "content": "hi"}]

            class Raises:
                def __init__(self):
                    raise RuntimeError("boom")
                def reset(self, record): ...
                def step(self, turn): ...

            class BadReset:
                def reset(self, record):
                    return "hi"
                def step(self, turn):
                    return Reply(done=True)

            def untyped(x):
                return x

            class BadTool:
                tools = [untyped]
                def reset(self, record): ...
                def step(self, turn): ...
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = {
        "no_such_module:Env": "cannot import: ModuleNotFoundError",
        "my_envs:Missing": "cannot import: AttributeError",
        "my_envs": "expected module:Class",
        "my_envs:NoStep": "'NoStep' lacks step",
        "my_envs:BadTool": "tool 'untyped'",
    }
    for spec, message in cases.items():
        with pytest.raises(UserError, match=message):
            load_environment(spec)
    with pytest.raises(UserError, match=r"Raises\(\) raised RuntimeError: boom"):
        load_environment("my_envs:Raises").new()
    bad = load_environment("my_envs:BadReset")
    with pytest.raises(UserError, match="reset\\(\\) returned str; expected a list of messages"):
        bad.reset(bad.new(), {})
    sys.modules.pop("my_envs", None)


# A template with tool support (as Qwen2.5's has): the schemas given as `tools=` are listed in a system turn, and
# messages of role `tool` are rendered as tool turns.
WITH_TOOLS = (
    "{%- if tools -%}{{ 'System: tools ' }}{%- for t in tools -%}{{ t | tojson }}{%- endfor -%}{{ '\\n' }}{%- endif -%}"
    + CHAT_TEMPLATE.replace(
        "{%- else -%}", "{%- elif message['role'] == 'tool' -%}{{ 'Tool: ' + message['content'] + '\\n' }}{%- else -%}"
    )
)


def test_a_template_with_tool_support_renders_tools_natively(tok):
    native = AutoTokenizer.from_pretrained(tok.name_or_path)
    native.chat_template = WITH_TOOLS
    runner = EpisodeRunner(env(Calculator), native, EpisodeLimits(max_tokens=4096))
    assert runner.fmt.native_tools and check_template(runner.fmt) == 7
    ep = runner.run(Scripted([" " + call("add", a=408, b=5), " 413"]), [{}])[0]
    assert ep.end == "done" and ep.reward == 1.0
    rendered = native.apply_chat_template(ep.messages, tools=runner.fmt.schemas, tokenize=False)
    assert "Tool: 413\n" in rendered and "<tool_response>" not in rendered
    assert native.decode(ep.ids, skip_special_tokens=False) + "\n" == rendered


# transformers' response parsing (`tokenizer.response_template`) for the tiny template with Hermes-style calls.
RESPONSE_TEMPLATE = {
    "start_anchor": "Assistant:",
    "fields": {
        "content": {"content": "text"},
        "tool_calls": {"open": "<tool_call>", "close": "</tool_call>", "content": "json", "repeats": True,
                       "optional": True},
    },
}  # fmt: skip


def test_a_tokenizer_with_a_response_template_parses_calls_with_it(tok):
    parsing = AutoTokenizer.from_pretrained(tok.name_or_path)
    parsing.response_template = RESPONSE_TEMPLATE
    runner = EpisodeRunner(env(Calculator), parsing, EpisodeLimits(max_tokens=4096))
    turns = [" " + call("add", a=408, b=5), " <tool_call>{bad</tool_call>", " 413"]
    ep = runner.run(Scripted(turns), [{}])[0]
    assert ep.end == "done" and ep.reward == 1.0
    assert [(r.content, r.error) for r in ep.tool_results][0] == ("413", None)
    assert ep.tool_results[1].error == "parse" and "do not parse" in ep.tool_results[1].content
