"""`chatrlhf chat` through a real pseudo-terminal (pexpect): the command as a user runs it, typing into it and
reading what it prints — replies streamed as they are generated, the conversation rendered with the model's chat
template turn after turn, the commands (/system, /clear, /set, /show, /quit), Ctrl-C and Ctrl-D."""

from __future__ import annotations

import re
import signal
import sys
import time

import pexpect
import pytest
import torch

from chatrlhf.config import GenerationConfig
from chatrlhf.data.collate import prompt_ids, render_prompt
from chatrlhf.engine.generation import HFGenerator, Request, Sampling
from chatrlhf.models.load import load_causal_lm, load_tokenizer
from tests.serve.conftest import ROOT, env

PROMPT = "you> "
QUESTION = "Name 3 words that begin with m."


def spawn(model, *flags: str, preexec_fn=None) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "chatrlhf", "chat", str(model), *flags],
        cwd=str(ROOT),
        env=env(),
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 200),
        preexec_fn=preexec_fn,
    )
    child.expect("/quit leaves")
    child.expect_exact(PROMPT)
    return child


def send(child: pexpect.spawn, line: str) -> str:
    """Type `line` and Enter; what it printed before the next prompt (the echo of the line left out)."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    out = child.before.replace("\r\n", "\n")
    return out.split("\n", 1)[1] if "\n" in out else ""


def reply(out: str) -> str:
    """The reply's text (one line for these models; the chat's notes follow on their own lines)."""
    return out.split("model> ", 1)[1].split("\n", 1)[0]


@pytest.fixture(scope="module")
def greedy_answer(sft_llama):
    """`answer(messages)`: the greedy reply to a conversation, computed in this process with the hf backend."""
    tok = load_tokenizer(str(sft_llama))
    gen = HFGenerator(load_causal_lm(str(sft_llama), tok, "float32", torch.device("cpu")), tok, GenerationConfig())

    def answer(messages: list[dict]) -> str:
        ids = prompt_ids(tok, render_prompt(tok, None, messages))
        return gen.complete([Request(ids, Sampling(40, temperature=0))])[0].text.strip()

    return answer


def test_a_conversation_with_commands(sft_llama, greedy_answer):
    child = spawn(sft_llama, "--temperature", "0", "--max_new_tokens", "40")
    first = reply(send(child, QUESTION))
    user = {"role": "user", "content": QUESTION}
    assert first == greedy_answer([user]) and len(first.split()) >= 2

    # the second turn is rendered after the first, with the template's turns
    second = reply(send(child, "Give me 2 words starting with t."))
    turns = [
        user,
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Give me 2 words starting with t."},
    ]
    assert second == greedy_answer(turns)
    shown = send(child, "/show")
    assert "temperature 0.0" in shown and f"User: {QUESTION}\nAssistant: {first}<|eos|>\n" in shown

    assert "(system prompt: 'Answer briefly.')" in send(child, "/system Answer briefly.")
    third = reply(send(child, QUESTION))
    system = {"role": "system", "content": "Answer briefly."}
    assert third == greedy_answer([system, *turns, {"role": "assistant", "content": second}, user])

    assert "(conversation cleared)" in send(child, "/clear")
    shown = send(child, "/show")
    assert "System: Answer briefly." in shown and "User:" not in shown
    assert reply(send(child, QUESTION)) == greedy_answer([system, user])

    assert "top_p must be in (0, 1], got 3.0" in send(child, "/set top_p 3")
    assert "expected int" in send(child, "/set top_k many")
    assert "unknown setting 'foo'" in send(child, "/set foo 1")
    assert "unknown command /frobnicate" in send(child, "/frobnicate")
    assert "/system TEXT" in send(child, "/help")
    assert "(temperature = 1.0)" in send(child, "/set temperature 1.0")
    assert "(seed = 4)" in send(child, "/set seed 4")
    assert "(conversation cleared)" in send(child, "/clear")
    sampled = reply(send(child, QUESTION))
    assert "(conversation cleared)" in send(child, "/clear")
    assert reply(send(child, QUESTION)) == sampled  # the same seed and conversation, the same reply

    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_replies_are_streamed_as_they_are_generated(random_llama):
    """A 400-token reply (a random model repeats one character greedily) reaches the terminal in many pieces over
    the time it takes to generate, not in one piece at the end."""
    child = spawn(random_llama, "--temperature", "0", "--max_new_tokens", "400")
    child.sendline("hello")
    child.expect_exact("model> ")
    # what the expect read past "model> " stays in the child's buffer, which read_nonblocking does not return
    text, child.buffer = child.buffer, ""
    arrivals: list[tuple[float, int]] = [(time.monotonic(), text.count(":"))] if text else []
    while "cut at" not in text:
        piece = child.read_nonblocking(4096, timeout=60)
        arrivals.append((time.monotonic(), len(re.sub(r"[^:]", "", piece))))
        text += piece
    if PROMPT not in text.split("(cut at", 1)[1]:  # the next prompt may have come in the same read
        child.expect_exact(PROMPT)
    assert re.sub(r"[^:]", "", text.split("(cut at")[0]) == ":" * 400
    with_reply = [t for t, n in arrivals if n]
    assert len(with_reply) >= 5, arrivals
    assert with_reply[-1] - with_reply[0] > 0.2, arrivals
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_ctrl_c_stops_a_reply_and_forgets_the_turn(random_llama, inherited):
    """Also when the chat starts with SIGINT ignored (a launcher's child, a background job's): it takes Ctrl-C back."""
    preexec = ignore_sigint if inherited == "ignored" else None
    child = spawn(random_llama, "--temperature", "0", "--max_new_tokens", "5000", preexec_fn=preexec)
    child.sendline("hello")
    child.expect_exact("model> ")
    child.expect_exact("::::")  # it is generating
    child.sendintr()
    child.expect_exact("(interrupted; this turn is forgotten)")
    child.expect_exact(PROMPT)
    shown = send(child, "/show")
    assert "User:" not in shown
    child.sendline("/quit")
    child.expect(pexpect.EOF)
