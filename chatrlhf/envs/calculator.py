"""The calculator demo's environment (chatrlhf/demo/calculator.py has the task, the tool and the judge):
`chatrlhf rl --env chatrlhf.envs.calculator:CalculatorEnv` on `calculator:prompts:N:SEED` data."""

from __future__ import annotations

from chatrlhf.demo.calculator import calculator, judge
from chatrlhf.envs.episode import Reply


class CalculatorEnv:
    """One arithmetic question as the user turn; the calculator as a tool; the policy's first turn that calls no
    tool is its final answer, judged (reward 1 or 0), and ends the episode."""

    tools = [calculator]
    describe_tools = False  # the SFT transcripts (calculator:sft:...) teach the call; see chatrlhf/demo/calculator.py

    def reset(self, record: dict) -> list[dict]:
        self.record = record
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, turn: str) -> Reply:
        return Reply(reward=judge(self.record["prompt"], turn, self.record["answer"]), done=True)
