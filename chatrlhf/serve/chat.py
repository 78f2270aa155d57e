"""`chatrlhf chat MODEL_DIR`: a multi-turn conversation with a model in the terminal.

Each turn renders the whole conversation (system prompt, earlier turns, the new message) with the model's chat
template — or, for a model without one, the training template `Human: ...\\n\\nAssistant:` — exactly as training
renders prompts (`data/collate.py:render_prompt`), and the reply is streamed to the terminal as it is generated
(`Generator.complete` with `on_update`). Lines starting with `/` are commands (COMMANDS). Ctrl-C while a reply is
generated stops it (the turn is dropped); Ctrl-D or /quit leaves.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import unicodedata
from dataclasses import dataclass, field

from jinja2.exceptions import TemplateError

from chatrlhf.config import ChatConfig, ConfigError
from chatrlhf.config.rl import check_sampling
from chatrlhf.data.collate import prompt_ids, render_prompt
from chatrlhf.engine.backends import Opened, open_configured, start
from chatrlhf.engine.generation import Request, Sampling

COMMANDS = """commands:
  /clear               forget the conversation (the system prompt stays)
  /system TEXT         set the system prompt (/system alone removes it)
  /set NAME VALUE      temperature, top_p, top_k, max_new_tokens, or seed (an integer, or none)
  /show                the settings and the conversation as the model sees it
  /help                this list
  /quit                leave (also /exit or Ctrl-D)"""

SETTINGS = {"temperature": float, "top_p": float, "top_k": int, "max_new_tokens": int}
"""The `/set` names of `Sampling` fields and their types (`seed` is handled apart: it may be none)."""


@dataclass
class Conversation:
    """What the model is told: the system prompt and the turns so far."""

    system: str = ""
    turns: list[dict] = field(default_factory=list)
    """{"role": "user"/"assistant", "content": str}, alternating, starting with the user."""

    def messages(self, message: str | None = None) -> list[dict]:
        """The conversation as chat messages, with the new user `message` at the end if given."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        new = [{"role": "user", "content": message}] if message is not None else []
        return system + self.turns + new


class Chat:
    """One chat session: the conversation, the sampling settings, and the model they go to."""

    def __init__(self, opened: Opened, sampling: Sampling, system: str, out=sys.stdout):
        self.opened, self.sampling, self.out = opened, sampling, out
        self.conversation = Conversation(system)

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def command(self, line: str) -> bool:
        """Run a /command; False when it asks to leave."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("quit", "exit"):
            return False
        if name == "clear":
            self.conversation.turns.clear()
            self.say("(conversation cleared)")
        elif name == "system":
            self.conversation.system = arg
            self.say(f"(system prompt: {arg!r})" if arg else "(no system prompt)")
        elif name == "set":
            self.set(arg)
        elif name == "show":
            self.show()
        elif name == "help":
            self.say(COMMANDS)
        else:
            self.say(f"unknown command /{name}; /help lists the commands")
        return True

    def set(self, arg: str) -> None:
        name, _, value = arg.partition(" ")
        value = value.strip()
        if name != "seed" and name not in SETTINGS:
            self.say(f"/set: unknown setting {name!r}; one of {', '.join([*SETTINGS, 'seed'])}")
            return
        try:
            if name == "seed":
                new = dataclasses.replace(self.sampling, seed=None if value == "none" else int(value))
            else:
                new = dataclasses.replace(self.sampling, **{name: SETTINGS[name](value)})
            check_sampling(new.temperature, new.top_p, new.top_k, new.max_new_tokens, "")
        except ValueError:
            kind = "an integer or none" if name == "seed" else SETTINGS[name].__name__
            self.say(f"/set {name}: expected {kind}, got {value!r}")
            return
        except ConfigError as e:
            self.say(f"/set {name}: {e}")
            return
        self.sampling = new
        self.say(f"({name} = {getattr(new, name)})")

    def show(self) -> None:
        s = self.sampling
        self.say(
            f"temperature {s.temperature}, top_p {s.top_p}, top_k {s.top_k}, max_new_tokens {s.max_new_tokens}, "
            f"seed {s.seed if s.seed is not None else 'none'}; context {self.opened.context} tokens"
        )
        tok = self.opened.tokenizer
        text = render_prompt(tok, None, self.conversation.messages()) if self.conversation.messages() else ""
        n = len(prompt_ids(tok, text)) if text else 0
        self.say(f"the conversation as the model sees it ({n} tokens):\n{printable(text)}")

    def reply(self, message: str) -> None:
        """Send `message`, stream the reply; the turn is kept only when the reply completed."""
        tok, context = self.opened.tokenizer, self.opened.context
        try:
            ids = prompt_ids(tok, render_prompt(tok, None, self.conversation.messages(message)))
        except TemplateError as e:
            self.say(f"(the model's chat template cannot render this conversation: {e})")
            return
        room = context - len(ids)
        if room < 1:
            self.say(
                f"(the conversation is {len(ids)} tokens, the model's context is {context}: /clear to start again)"
            )
            return
        sampling = self.sampling
        if room < sampling.max_new_tokens:
            self.say(f"(the context leaves room for {room} of max_new_tokens={sampling.max_new_tokens})")
            sampling = dataclasses.replace(sampling, max_new_tokens=room)
        printer = _Printer(self.out)
        self.out.write("model> ")
        try:
            done = self.opened.generator.complete([Request(ids, sampling)], on_update=printer)[0]
        except KeyboardInterrupt:
            self.say("\n(interrupted; this turn is forgotten)")
            return
        self.say()
        if not done.text.strip():
            self.say("(an empty reply: the model ended its turn at once)")
        if done.finish_reason == "length":
            self.say(f"(cut at {len(done.tokens)} tokens: /set max_new_tokens for longer replies)")
        self.conversation.turns += [
            {"role": "user", "content": message},
            {"role": "assistant", "content": done.text.strip()},
        ]


def printable(text: str) -> str:
    """`text` safe for a terminal: control characters other than newline and tab (which could move the cursor or
    change the terminal's state) are shown as \\xHH."""
    return "".join(f"\\x{ord(c):02x}" if unicodedata.category(c) == "Cc" and c not in "\n\t" else c for c in text)


class _Printer:
    """`on_update` for one reply: writes each new piece at once (the reply's leading whitespace left out)."""

    def __init__(self, out):
        self.out, self.started = out, False

    def __call__(self, index: int, text: str, done) -> None:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        if text:
            self.out.write(printable(text))
            self.out.flush()


def run_chat(cfg: ChatConfig) -> None:
    cfg.validate()
    if cfg.backend == "vllm":
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's start-up log would bury the conversation
    device = start(cfg)
    opened = open_configured(cfg, cfg.model, device, cfg.max_model_len)
    sampling = Sampling(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k
    )
    chat = Chat(opened, sampling, cfg.system)
    # Ctrl-C stops a reply even when this process was started with SIGINT ignored (as a launcher's child, or from a
    # non-interactive shell's background job inherits it): Python then leaves it ignored rather than raising
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    chat.say(f"chatrlhf chat: {cfg.model} ({cfg.backend} on {device}, context {opened.context} tokens)")
    chat.say("Type a message and press Enter; /help lists the commands, /quit leaves.")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            chat.say()
            return
        except KeyboardInterrupt:
            chat.say("\n(/quit or Ctrl-D leaves)")
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not chat.command(line):
                return
        else:
            chat.reply(line)
