"""The rollout of one RL iteration (steps 1–4 of the iteration in docs/architecture.md, minus the models): prompts,
sampled responses, their scores and no-grad forwards, as typed containers, and the functions that make them; and
the sampling policies that decide how many rounds of them make an iteration's batch (one, or DAPO's dynamic
sampling).

Shapes: B = sequences (prompts × group_size), P = prompt width, R = response width.

With an environment (`env`, docs/episodes.md) each sequence is a multi-turn episode: the "prompt" is the
environment's first messages, the "response" everything after them — the policy's turns and, between them, the
environment's messages and tool results. The response mask is then 1 on the policy's tokens only (what the loss,
KL, entropy and advantages cover) and `response_attention` on every real token (what the forwards attend to).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from chatrlhf import distributed as dist
from chatrlhf.data.collate import encode_all, encode_prompt, pad
from chatrlhf.engine.hybrid import HybridEngine
from chatrlhf.envs.runner import END_REASONS, Episode, EpisodeRunner
from chatrlhf.errors import UserError
from chatrlhf.models.load import ValueModel
from chatrlhf.models.rewards import Scorer, Scores, ScoringBatch
from chatrlhf.rlhf import last_token_index, varied_groups
from chatrlhf.train import forward


@dataclass(frozen=True)
class Prompt:
    """An RL prompt: its tokens, the text reward functions see, and the record's other fields."""

    ids: list[int]
    text: str
    extra: dict


@dataclass
class Rollout:
    """Sampled responses. B = sequences (prompts × group_size), P = prompt width, R = response width."""

    prompts: list[Prompt]
    """(B) the prompt of each sequence (repeated within a group)."""
    prompt_ids: torch.Tensor
    """(B, P) long — left-padded prompts."""
    prompt_mask: torch.Tensor
    """(B, P) long — 1 for real prompt tokens."""
    response: torch.Tensor
    """(B, R) long — sampled tokens, pad after the first EOS."""
    response_mask: torch.Tensor
    """(B, R) float — 1 on the policy's sampled tokens: up to and including the first EOS of a single response;
    the policy's turns of an episode. What the loss, KL, entropy and advantages cover."""
    rollout_logprobs: torch.Tensor | None = None
    """(B, R) raw log-probs of the sampled tokens under the rollout engine (vLLM always; hf with truncated
    importance sampling or `update.old_logprobs: sampler`; episodes always): the freshness check and TIS compare
    them with the trainer's; with `sampler` they are π_old's."""
    rollout_entropy: torch.Tensor | None = None
    """(B, R) entropy of the raw distribution each token was drawn from, with the log-probs when the engine gives it
    (hf): π_old's entropy with `update.old_logprobs: sampler`."""
    response_attention: torch.Tensor | None = None
    """(B, R) long — 1 on every real token of an episode's response part, the environment's included: what the
    forwards attend to. None = the response mask (a single response has no other tokens)."""
    episodes: list[Episode] | None = None
    """(B) the played episodes (with an environment), for scoring and metrics; None for single responses."""

    @property
    def sequences(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response], dim=1)

    @property
    def response_attention_mask(self) -> torch.Tensor:
        """(B, R) long — the response positions attended to."""
        return self.response_attention if self.response_attention is not None else self.response_mask.long()

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_attention_mask], dim=1)

    @property
    def last_index(self) -> torch.Tensor:
        """(B,) position of the last real response token in `sequences`."""
        return self.prompt_ids.shape[1] + last_token_index(self.response_attention_mask)

    def select(self, idx: torch.Tensor) -> Rollout:
        """A sub-batch for training (tensors only; the texts stay with the full rollout)."""
        return Rollout(
            prompts=[],
            prompt_ids=self.prompt_ids[idx],
            prompt_mask=self.prompt_mask[idx],
            response=self.response[idx],
            response_mask=self.response_mask[idx],
            response_attention=self.response_attention[idx] if self.response_attention is not None else None,
        )


@dataclass
class Evaluated:
    """Scores and no-grad forwards over a rollout; (B, R) over response positions."""

    scores: Scores
    """(B,) summed reward and its parts."""
    old_logprobs: torch.Tensor | None
    """log π_old(a_t | s_t) — the actor that sampled; None until the update takes them from its own forward
    (`train.update.old_logprobs`, train/update.py:reuses_update_forward)."""
    ref_logprobs: torch.Tensor
    """log π_ref(a_t | s_t) — the frozen reference."""
    values: torch.Tensor | None
    """V_old(s_t), the critic's value of the state before token t (PPO only)."""
    greedy_scores: torch.Tensor | None
    """(B,) reward of the greedy response (ReMax only)."""
    entropy: torch.Tensor | None = None
    """(B, R) entropy of π_old(· | s_t) in nats, from the same forward as `old_logprobs`."""


# ------------------------------------------------------------------------------------------------ the steps


def prompt_stream(prompts: list[Prompt], batch_size: int, seed: int):
    """1. Endless shuffled batches of prompts: each pass is a new permutation, cut into full batches (the last
    `len % batch_size` prompts of a pass wait for a later pass's shuffle)."""
    for epoch in itertools.count():
        order = np.random.default_rng(seed + epoch).permutation(len(prompts))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [prompts[j] for j in order[i : i + batch_size]]


class PromptStream:
    """`prompt_stream`, counting the batches it has handed out: a resumed run continues with the batch the
    uninterrupted run would have drawn next, however many rounds each iteration drew (dynamic sampling)."""

    def __init__(self, prompts: list[Prompt], batch_size: int, seed: int):
        self._batches = prompt_stream(prompts, batch_size, seed)
        self.drawn = 0

    def __next__(self) -> list[Prompt]:
        self.drawn += 1
        return next(self._batches)

    def skip_to(self, drawn: int) -> None:
        """Fast-forward to where a run that had drawn `drawn` batches stood."""
        while self.drawn < drawn:
            next(self)


def generate_rollout(
    actor: HybridEngine,
    batch: list[Prompt],
    group_size: int,
    tok,
    device,
    greedy: bool = False,
    logprobs: bool = False,
    width: int | None = None,
) -> Rollout:
    """2. Sample `group_size` responses per prompt (consecutive) in generation mode; pad after the first EOS.
    Prompts are left-padded to `width` (the global batch's longest, so every rank's shard has the same width);
    with `logprobs`, the rollout engine's raw log-probs of the sampled tokens are kept."""
    expanded = [p for p in batch for _ in range(group_size)]
    ids = [p.ids for p in expanded]
    prompt_ids, prompt_mask = (x.to(device) for x in pad(ids, tok.pad_token_id, left=True, width=width))
    with actor.generation_mode():
        out = actor.generate(ids, greedy=greedy, logprobs=logprobs, width=prompt_ids.shape[1])
    return Rollout(
        prompts=expanded,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response=out.tokens.to(device),
        response_mask=out.mask.to(device),
        rollout_logprobs=out.logprobs.to(device) if out.logprobs is not None else None,
        rollout_entropy=out.entropy.to(device) if out.entropy is not None else None,
    )


def play_rollout(
    runner: EpisodeRunner, actor: HybridEngine, batch: list[Prompt], group_size: int, tok, device, greedy: bool = False
) -> Rollout:
    """2, with an environment: play `group_size` episodes per prompt (consecutive) in generation mode. The
    environment's `reset` gets the record: its prompt text as `prompt` and its other fields."""
    expanded = [p for p in batch for _ in range(group_size)]
    with actor.generation_mode():
        episodes = runner.run(actor, [{"prompt": p.text, **p.extra} for p in expanded], greedy=greedy)
    return episode_rollout(episodes, expanded, tok.pad_token_id, device)


def episode_rollout(episodes: list[Episode], prompts: list[Prompt], pad_id: int, device) -> Rollout:
    """Episodes as a `Rollout`: each is cut before its first policy token into a left-padded prompt (the
    environment's first messages) and a right-padded response (everything after); the response mask is the policy
    mask, the response attention every real token, the rollout log-probs the sampler's."""
    starts = [first_policy_token(e) for e in episodes]
    prompt_ids, prompt_mask = pad([e.ids[:s] for e, s in zip(episodes, starts)], pad_id, left=True)
    response, attention = pad([e.ids[s:] for e, s in zip(episodes, starts)], pad_id)
    policy, _ = pad([e.policy_mask[s:] for e, s in zip(episodes, starts)], 0)
    width = response.shape[1]

    def per_token(values: list[list[float]]) -> torch.Tensor:  # each episode's response part, right-padded with 0
        return torch.tensor([v[s:] + [0.0] * (width - len(e.ids) + s) for v, e, s in zip(values, episodes, starts)])

    logprobs = per_token([e.logprobs for e in episodes])
    entropy = per_token([e.entropy for e in episodes]) if all(e.entropy is not None for e in episodes) else None
    return Rollout(
        prompts=prompts,
        prompt_ids=prompt_ids.to(device),
        prompt_mask=prompt_mask.to(device),
        response=response.to(device),
        response_mask=policy.float().to(device),
        rollout_logprobs=logprobs.to(device),
        rollout_entropy=entropy.to(device) if entropy is not None else None,
        response_attention=attention.to(device),
        episodes=episodes,
    )


def turn_scores(rollout: Rollout, weight: float) -> torch.Tensor:
    """(B, R) `weight` × each episode's turn rewards, each at the response position of the last token of the policy
    turn it rewards (a turn is a run of the response mask), 0 elsewhere: `train.episode.credit: turn`."""
    mask = rollout.response_mask > 0
    ends = mask & ~torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)  # a run's last token
    out = torch.zeros_like(rollout.response_mask)
    for row, episode in enumerate(rollout.episodes):
        positions = ends[row].nonzero().flatten()
        if len(positions) != len(episode.turn_rewards):
            raise ValueError(f"episode {row}: {len(positions)} policy turns in the mask, {episode.turns} played")
        out[row, positions] = weight * torch.tensor(episode.turn_rewards, dtype=out.dtype, device=out.device)
    return out


def first_policy_token(episode: Episode) -> int:
    """Position of an episode's first policy token: the length of the environment's first messages."""
    if 1 not in episode.policy_mask:
        raise ValueError("an episode without policy tokens: every episode has at least one policy turn")
    return episode.policy_mask.index(1)


def response_texts(rollout: Rollout, tok) -> list[str]:
    """The decoded text of each response's policy tokens (EOS and padding left out), as reward functions and the
    doctor see it; an episode's policy turns are decoded together."""
    return [
        tok.decode(r[m > 0], skip_special_tokens=True).strip() for r, m in zip(rollout.response, rollout.response_mask)
    ]


def function_inputs(rollout: Rollout, tok) -> tuple[list[str], list[dict]]:
    """What a reward function or judge sees of each response: its text and the record's fields; on an episode the
    policy's last turn, and the conversation as `messages` among the fields."""
    if rollout.episodes is None:
        return response_texts(rollout, tok), [p.extra for p in rollout.prompts]
    texts = [[m for m in e.messages if m["role"] == "assistant"][-1]["content"] for e in rollout.episodes]
    return texts, [{**p.extra, "messages": e.messages} for p, e in zip(rollout.prompts, rollout.episodes)]


def score_rollout(scorer: Scorer, rollout: Rollout, tok) -> Scores:
    """3. The summed reward of each response (decoded text for functions, tokens for a shared-vocabulary RM). On
    episodes, reward functions get the policy's last turn as the response and the conversation as `messages`, and
    the environment's returns are the `env` source's scores."""
    texts, extras = function_inputs(rollout, tok)
    episode_rewards = None
    if rollout.episodes is not None:
        episode_rewards = torch.tensor([e.reward for e in rollout.episodes], dtype=torch.float32)
    return scorer(
        ScoringBatch(
            sequences=rollout.sequences,
            attention_mask=rollout.attention_mask,
            last_index=rollout.last_index,
            prompts=[p.text for p in rollout.prompts],
            responses=texts,
            extras=extras,
            episode_rewards=episode_rewards,
        )
    )


def episode_metrics(episodes: list[Episode], rollout: Rollout) -> dict[str, float]:
    """8. What the episodes looked like (docs/metrics.md, `episode/*`)."""
    n = len(episodes)
    env_tokens = rollout.response_attention_mask.sum(1) - rollout.response_mask.sum(1)
    metrics = {
        "episode/turns_mean": sum(e.turns for e in episodes) / n,
        "episode/tool_calls_mean": sum(len(e.tool_results) for e in episodes) / n,
        "episode/tool_errors_mean": sum(e.tool_errors for e in episodes) / n,
        "episode/tokens_mean": sum(len(e.ids) for e in episodes) / n,
        "episode/env_tokens_mean": float(env_tokens.float().mean()),
    }
    for reason in END_REASONS:
        metrics[f"episode/end_{reason}_frac"] = sum(e.end == reason for e in episodes) / n
    return metrics


def rollout_logprobs(model, rollout: Rollout) -> torch.Tensor:
    """(B, R) log π(a_t | s_t) of the response tokens under `model`."""
    return forward.response_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.response.shape[1])


def rollout_logprobs_and_entropy(
    model, rollout: Rollout, entropy_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R) log π(a_t | s_t) and the entropy of π(· | s_t) at each response position, from one forward (the
    entropy detached without `entropy_grad`)."""
    return forward.response_logprobs_and_entropy(
        model, rollout.sequences, rollout.attention_mask, rollout.response.shape[1], entropy_grad
    )


def rollout_values(critic: ValueModel, rollout: Rollout) -> torch.Tensor:
    """(B, R) V(s_t): the critic's value at the token before each response token."""
    return forward.response_values(critic, rollout.sequences, rollout.attention_mask, rollout.response.shape[1])


def gather_rollout(rollout: Rollout, ev: Evaluated, prompts: list[Prompt], group_size: int, pad_id: int):
    """Every rank's shard of the rollout and its evaluation, concatenated in rank order: the advantages (whitening
    included) are then computed over the whole batch, the same on every rank, as in one process."""
    if dist.world_size() == 1:
        return rollout, ev
    g = dist.gather_padded
    full = Rollout(
        prompts=[p for p in prompts for _ in range(group_size)],
        prompt_ids=g(rollout.prompt_ids, pad_id, left=True),  # episodes' first messages differ in width by rank
        prompt_mask=g(rollout.prompt_mask, 0, left=True),
        response=g(rollout.response, pad_id),
        response_mask=g(rollout.response_mask, 0.0),
        rollout_logprobs=g(rollout.rollout_logprobs, 0.0) if rollout.rollout_logprobs is not None else None,
        rollout_entropy=g(rollout.rollout_entropy, 0.0) if rollout.rollout_entropy is not None else None,
        response_attention=g(rollout.response_attention, 0) if rollout.response_attention is not None else None,
        episodes=dist.gather_objects(rollout.episodes) if rollout.episodes is not None else None,
    )
    scores = Scores(total=g(ev.scores.total, 0.0), parts={k: g(v, 0.0) for k, v in ev.scores.parts.items()})
    return full, Evaluated(
        scores=scores,
        old_logprobs=g(ev.old_logprobs, 0.0) if ev.old_logprobs is not None else None,
        ref_logprobs=g(ev.ref_logprobs, 0.0),
        values=g(ev.values, 0.0) if ev.values is not None else None,
        greedy_scores=g(ev.greedy_scores, 0.0) if ev.greedy_scores is not None else None,
        entropy=g(ev.entropy, 0.0) if ev.entropy is not None else None,
    )


def all_empty(rollout: Rollout, eos_id: int) -> bool:
    """Whether every response of the batch is empty: EOS as its first token. Such a batch is not trained on (its
    only lesson, "do not stop at once", is what the KL and the reward already teach); it is counted in
    `faults/skipped_rollouts` and the next iteration draws new prompts — an earlier batch is never reused."""
    return bool(((rollout.response_mask.sum(1) == 1) & (rollout.response[:, 0] == eos_id)).all())


def truncated(rollout: Rollout, eos_id: int) -> torch.Tensor:
    """(B,) True where the response has no EOS: it filled max_new_tokens and was cut."""
    last = last_token_index(rollout.response_mask)
    return rollout.response.gather(1, last.unsqueeze(1)).squeeze(1) != eos_id


def prompt_item(tok, rec, max_len: int) -> Prompt:
    """An RL prompt record encoded; reward functions see the prompt text (the last user turn for conversations)."""
    text = rec.prompt if rec.prompt is not None else rec.messages[-1]["content"]
    return Prompt(ids=encode_prompt(tok, rec, max_len), text=text, extra=rec.extra)


def to_prompts(tok, recs, max_len: int) -> Sequence[Prompt]:
    """Encode prompt records (a stage's `Records`: read from the cache on access)."""
    return encode_all(recs, prompt_item, tok, max_len=max_len)


# ------------------------------------------------------------------------------------------------ sampling policies


@dataclass
class Sampled:
    """An iteration's rollout batch and how it was drawn."""

    rollout: Rollout
    evaluated: Evaluated
    metrics: dict[str, float]
    """What the sampling policy logs (`sampling/*` of dynamic sampling, docs/metrics.md; none for one round)."""


Round = Callable[[], tuple[Rollout, Evaluated]]
"""One round of steps 1–4 on the next prompt batch: generated, scored, evaluated and gathered."""
Sampler = Callable[[Round, int, int, int], Sampled]
"""(draw a round, group_size, max_rounds, pad token id) → the iteration's batch."""


def sample_once(draw: Round, group_size: int, max_rounds: int, pad_id: int) -> Sampled:
    """One round is the batch (every algorithm but DAPO)."""
    rollout, ev = draw()
    return Sampled(rollout, ev, metrics={})


def sample_dynamic(draw: Round, group_size: int, max_rounds: int, pad_id: int) -> Sampled:
    """DAPO's dynamic sampling (arXiv 2503.14476, §3.2): groups whose rewards are all equal (so every advantage is
    0) are dropped, and rounds are drawn until the batch holds as many groups with unequal rewards as one round has
    prompts; the surplus of the last round is dropped too. After `max_rounds` rounds without a full batch the run
    stops: the reward no longer tells this policy's samples apart."""
    kept: list[tuple[Rollout, Evaluated]] = []
    n_kept = drawn = equal = 0
    target = None
    for rounds in range(1, max_rounds + 1):
        rollout, ev = draw()
        groups = len(rollout.prompts) // group_size
        target = groups if target is None else target
        varied = varied_groups(ev.scores.total, group_size)
        drawn, equal = drawn + groups, equal + int((~varied).sum())
        take = varied.repeat_interleave(group_size).nonzero().flatten()[: (target - n_kept) * group_size]
        if len(take):
            kept.append(select(rollout, ev, take))
            n_kept += len(take) // group_size
        if n_kept == target:
            rollout, ev = concat(kept, pad_id)
            metrics = {"sampling/rounds": float(rounds), "sampling/groups_drawn": float(drawn)}
            metrics["sampling/equal_frac"] = equal / drawn
            return Sampled(rollout, ev, metrics)
    raise UserError(
        f"dynamic sampling: after train.sampling.max_rounds={max_rounds} rounds only {n_kept} of the {target} "
        f"prompt groups a batch needs had rewards that were not all equal ({drawn} drawn). Every sample of the other "
        "prompts got the same reward, so they teach nothing; raise train.sampling.max_rounds, raise group_size, or "
        "use a reward that tells the samples apart"
    )


SAMPLERS: dict[str, Sampler] = {"once": sample_once, "dynamic": sample_dynamic}
"""`AlgorithmRules.sampling` → its sampler."""


def select(rollout: Rollout, ev: Evaluated, idx: torch.Tensor) -> tuple[Rollout, Evaluated]:
    """The sequences `idx` of a rollout and its evaluation (prompts and texts included)."""

    def rows(t):
        return t[idx] if t is not None else None

    part = Rollout(
        prompts=[rollout.prompts[i] for i in idx.tolist()],
        prompt_ids=rollout.prompt_ids[idx],
        prompt_mask=rollout.prompt_mask[idx],
        response=rollout.response[idx],
        response_mask=rollout.response_mask[idx],
        rollout_logprobs=rows(rollout.rollout_logprobs),
        rollout_entropy=rows(rollout.rollout_entropy),
        response_attention=rows(rollout.response_attention),
        episodes=[rollout.episodes[i] for i in idx.tolist()] if rollout.episodes is not None else None,
    )
    scores = Scores(total=ev.scores.total[idx], parts={k: v[idx] for k, v in ev.scores.parts.items()})
    return part, Evaluated(
        scores=scores,
        old_logprobs=rows(ev.old_logprobs),
        ref_logprobs=ev.ref_logprobs[idx],
        values=rows(ev.values),
        greedy_scores=rows(ev.greedy_scores),
        entropy=rows(ev.entropy),
    )


def concat(parts: list[tuple[Rollout, Evaluated]], pad_id: int) -> tuple[Rollout, Evaluated]:
    """Rollouts of several rounds as one batch: prompts left-padded and responses (and every per-token tensor)
    right-padded to the widest part."""
    if len(parts) == 1:
        return parts[0]
    prompt_w = max(r.prompt_ids.shape[1] for r, _ in parts)
    resp_w = max(r.response.shape[1] for r, _ in parts)

    def cat(tensors, width, value, left=False):
        if tensors[0] is None:
            return None
        out = []
        for t in tensors:
            fill = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype, device=t.device)
            out.append(torch.cat([fill, t] if left else [t, fill], dim=1))
        return torch.cat(out)

    rs, evs = [r for r, _ in parts], [e for _, e in parts]
    rollout = Rollout(
        prompts=[p for r in rs for p in r.prompts],
        prompt_ids=cat([r.prompt_ids for r in rs], prompt_w, pad_id, left=True),
        prompt_mask=cat([r.prompt_mask for r in rs], prompt_w, 0, left=True),
        response=cat([r.response for r in rs], resp_w, pad_id),
        response_mask=cat([r.response_mask for r in rs], resp_w, 0.0),
        rollout_logprobs=cat([r.rollout_logprobs for r in rs], resp_w, 0.0),
        rollout_entropy=cat([r.rollout_entropy for r in rs], resp_w, 0.0),
        response_attention=cat([r.response_attention for r in rs], resp_w, 0),
        episodes=[e for r in rs for e in r.episodes] if rs[0].episodes is not None else None,
    )
    names = evs[0].scores.parts
    scores = Scores(
        total=torch.cat([e.scores.total for e in evs]),
        parts={k: torch.cat([e.scores.parts[k] for e in evs]) for k in names},
    )
    return rollout, Evaluated(
        scores=scores,
        old_logprobs=cat([e.old_logprobs for e in evs], resp_w, 0.0),
        ref_logprobs=cat([e.ref_logprobs for e in evs], resp_w, 0.0),
        values=cat([e.values for e in evs], resp_w, 0.0),
        greedy_scores=torch.cat([e.greedy_scores for e in evs]) if evs[0].greedy_scores is not None else None,
        entropy=cat([e.entropy for e in evs], resp_w, 0.0),
    )
