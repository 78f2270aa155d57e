"""A multi-turn chat task on the letter-words demo (chatrlhf/demo/task.py), whose second user turn depends on the
policy's first answer: `chatrlhf rl --env chatrlhf.envs.letter_chain:LetterChainEnv` on `demo:prompts:N:SEED`.

    user:      Name 3 words that begin with m.
    assistant: mind meal music
    user:      Your last word was 'music'. Give me 2 words beginning with m.
    assistant: moon milk

The second request asks for words that start with the first letter of the last word the policy wrote, so the
conversation cannot be scripted in advance. Each answer is judged by the demo's judge (`chatrlhf.demo.task:judge`,
in [0, 1]) as its turn's reward; the episode's return is their sum, in [0, 2]. An answer with no words, or whose
last word starts with a letter the task has too few words for, ends the episode after the first turn.
"""

from __future__ import annotations

import random

from chatrlhf.demo.task import COUNTS, LETTERS, PHRASINGS, judge, response_words
from chatrlhf.envs.episode import Reply


class LetterChainEnv:
    """A letter-words request, then a second one built from the policy's answer; both judged."""

    def reset(self, record: dict) -> list[dict]:
        self.request, self.turn = record["prompt"], 0
        self.rng = random.Random(self.request)  # the follow-up's wording depends on the episode only
        return [{"role": "user", "content": self.request}]

    def step(self, turn: str) -> Reply:
        reward = judge(self.request, turn)
        self.turn += 1
        words = response_words(turn)
        if self.turn == 2 or not words or words[-1][0] not in LETTERS:
            return Reply(reward=reward, done=True)
        ask = self.rng.choice(PHRASINGS).format(n=self.rng.choice(COUNTS), letter=words[-1][0])
        self.request = f"Your last word was '{words[-1]}'. {ask}"
        return Reply([{"role": "user", "content": self.request}], reward=reward)
