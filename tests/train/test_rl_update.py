"""The update step on a fixed, hand-built rollout: the algorithm's advantages, the loss terms, their aggregation,
the mini- and micro-batch walk and the PTX loss give the losses and gradients computed here by hand — one unpadded
sequence at a time, one token at a time, with each formula written out — on a tiny float64 Llama.

The engines are recorders: `backward` accumulates, `step` keeps the gradient and clears it without changing the
weights, so every optimizer step of an update is compared with the gradient of its own hand-computed loss."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import pytest
import torch
from transformers import AutoModelForCausalLM

from chatrlhf.config import (
    AdvantageConfig,
    GenerationConfig,
    KLConfig,
    LossConfig,
    RLTrainConfig,
    UpdateConfig,
)
from chatrlhf.data.collate import Encoded
from chatrlhf.engine.base import StepStats
from chatrlhf.models.load import load_value_model
from chatrlhf.models.rewards import Scores
from chatrlhf.models.tiny import byte_tokenizer
from chatrlhf.train.algorithms import ALGORITHMS, AdvantageInputs
from chatrlhf.train.rl import train_batch
from chatrlhf.train.rl_models import PTXBatches
from chatrlhf.train.rollout import Evaluated, Rollout, rollout_logprobs, rollout_values
from chatrlhf.train.update import Schedule, objective, update

PAD, EOS = 256, 258
PROMPTS = [[72, 101, 108], [65, 66]]
"""Two prompts, each sampled twice (group_size 2)."""
RESPONSES = [[120, 121, EOS], [122, EOS], [123, 124, 125, 126], [127, EOS]]
"""Sequence 2 has no EOS: it was cut at max_new_tokens = 4."""
SCORES = [1.0, 0.2, 0.5, 0.9]
OLD_OFFSET = [[0.3, -0.25, 0.1, 0.0], [-0.3, 0.05, 0.0, 0.0], [0.25, -0.1, 0.4, -0.3], [0.02, -0.28, 0.0, 0.0]]
"""log π_old − log π_θ of each response token: ratios exp(−offset) from 0.67 to 1.35, so some tokens clip."""
REF_OFFSET = [[0.2, 0.1, -0.3, 0.0], [0.5, -0.2, 0.0, 0.0], [-0.1, 0.3, 0.2, 0.1], [0.4, 0.0, 0.0, 0.0]]
"""log π_ref − log π_θ of each response token."""
VALUE_OFFSET = [[0.5, -0.1, 0.3, 0.0], [-0.4, 0.2, 0.0, 0.0], [0.1, 0.35, -0.3, 0.05], [0.0, -0.5, 0.0, 0.0]]
"""V_old − V_θ: the critic moved since the rollout, so some value errors clip."""
PTX = [Encoded([70, 71, 72, 73, EOS], [0, 0, 1, 1, 1]), Encoded([80, 81, EOS], [0, 1, 1])]


class Recorder:
    """A training engine that keeps each step's gradient and leaves the weights as they are."""

    def __init__(self, model: torch.nn.Module, name: str):
        self.model = self.module = model
        self.name, self.steps, self.bad_steps = name, 0, 0
        self.grads: list[dict[str, torch.Tensor]] = []

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> StepStats:
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})
        self.model.zero_grad(set_to_none=True)
        self.steps += 1
        return StepStats(grad_norm=0.0, lr=0.0)


@dataclass
class Case:
    algo: str = "grpo"
    aggregation: str = "token_mean"
    mini: int = 0
    micro: int = 0
    kl: KLConfig = field(default_factory=lambda: KLConfig(coef=0.05))
    entropy_coef: float = 0.0
    clip_low: float = 0.2
    clip_high: float | None = None
    ptx_coef: float = 0.0
    mask_truncated: bool = False
    whiten: bool = False
    trim_padding: bool = True

    def train(self) -> RLTrainConfig:
        return RLTrainConfig(
            algo=self.algo, group_size=2, rollout_batch_size=2, generation=GenerationConfig(max_new_tokens=4),
            kl=self.kl, advantage=AdvantageConfig(gamma=0.9, lam=0.8, whiten=self.whiten),
            loss=LossConfig(clip_low=self.clip_low, clip_high=self.clip_high, aggregation=self.aggregation,
                            entropy_coef=self.entropy_coef, mask_truncated=self.mask_truncated),
            update=UpdateConfig(mini_batch_size=self.mini, micro_batch_size=self.micro, trim_padding=self.trim_padding),
        )  # fmt: skip


@pytest.fixture(scope="module")
def models(tiny_dirs):
    actor = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).double().eval()
    torch.manual_seed(0)
    critic = load_value_model(str(tiny_dirs["llama"]), byte_tokenizer(), "float32", torch.device("cpu"),
                              require_head=False).double().eval()  # fmt: skip
    return actor, critic


def hand_built_rollout() -> Rollout:
    seqs = [PROMPTS[i // 2] for i in range(4)]
    width = max(map(len, seqs))
    prompt_ids = torch.tensor([[PAD] * (width - len(p)) + p for p in seqs])
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in seqs])
    response = torch.tensor([r + [PAD] * (4 - len(r)) for r in RESPONSES])
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (4 - len(r)) for r in RESPONSES], dtype=torch.float64)
    return Rollout([], prompt_ids, prompt_mask, response, mask)


# ------------------------------------------------------------------------------------------------ by hand


def slow_forward(actor, critic, i):
    """Sequence i alone, unpadded: per response token log π_θ, the entropy H_t (with gradients) and V_θ(s_t)."""
    prompt, response = PROMPTS[i // 2], RESPONSES[i]
    ids = torch.tensor([prompt + response])
    logits = actor(input_ids=ids).logits[0]
    values = critic(ids, torch.ones_like(ids), torch.arange(ids.shape[1]).unsqueeze(0))[0]
    logp, entropy, value = [], [], []
    for t, token in enumerate(response):
        row = logits[len(prompt) + t - 1]
        log_probs = row - torch.logsumexp(row, 0)
        logp.append(log_probs[token])
        entropy.append(-(log_probs.exp() * log_probs).sum())
        value.append(values[len(prompt) + t - 1])
    return logp, entropy, value


def slow_advantages(case: Case, old, ref, old_values):
    """A per token and the critic's targets G, from the scores and the rollout's log-probs, by the formulas."""
    beta = case.kl.coef if case.kl.placement == "reward" else 0.0
    kl = [[o - r for o, r in zip(old[i], ref[i])] for i in range(4)]  # k1 of π_old against π_ref
    if case.algo == "ppo":
        advantages, returns = [], []
        for i in range(4):
            n = len(RESPONSES[i])
            rewards = [-beta * kl[i][t] + (min(max(SCORES[i], -5), 5) if t == n - 1 else 0.0) for t in range(n)]
            a, running = [0.0] * n, 0.0
            for t in reversed(range(n)):
                next_value = old_values[i][t + 1] if t + 1 < n else 0.0
                running = rewards[t] + 0.9 * next_value - old_values[i][t] + 0.9 * 0.8 * running
                a[t] = running
            advantages.append(a)
            returns.append([a[t] + old_values[i][t] for t in range(n)])
        if case.whiten:
            flat = [x for a in advantages for x in a]
            mean, var = statistics.fmean(flat), statistics.pvariance(flat)
            advantages = [[(x - mean) / math.sqrt(var + 1e-8) for x in a] for a in advantages]
        return advantages, returns
    total = [min(max(SCORES[i], -5), 5) - beta * sum(kl[i]) for i in range(4)]
    seq = []
    for g in (total[:2], total[2:]):
        mean = statistics.fmean(g)
        if case.algo == "rloo":
            seq += [x - (sum(g) - x) / (len(g) - 1) for x in g]
        elif case.algo == "dr_grpo":
            seq += [x - mean for x in g]
        else:  # grpo, dapo, gspo, cispo
            seq += [(x - mean) / (statistics.stdev(g) + 1e-6) for x in g]
    return [[seq[i]] * len(RESPONSES[i]) for i in range(4)], None


def token_policy_loss(case: Case, logp, old, adv):
    """ℓ of each token of one sequence (lists over its tokens)."""
    lo, hi = 1 - case.clip_low, 1 + (case.clip_low if case.clip_high is None else case.clip_high)
    if case.algo == "gspo":
        # s = exp(mean_t (log π_θ − log π_old)); ℓ = max(−A·s, −A·clip(s)), the same for every token
        s = torch.exp(sum(lp - o for lp, o in zip(logp, old)) / len(logp))
        return [torch.maximum(-a * s, -a * s.clamp(lo, hi)) for a in adv]
    if case.algo == "cispo":
        # ℓ = −sg[clip(ρ)]·A·log π_θ
        return [-torch.exp(lp - o).clamp(lo, hi).detach() * a * lp for lp, o, a in zip(logp, old, adv)]
    out = []
    for lp, o, a in zip(logp, old, adv):
        ratio = torch.exp(lp - o)
        out.append(torch.maximum(-a * ratio, -a * ratio.clamp(lo, hi)))
    return out


def aggregate(mode: str, rows: list[list[torch.Tensor]]) -> torch.Tensor:
    """Sum the per-token values of the sequences that count, as `mode` reduces them."""
    rows = [r for r in rows if r]
    if mode == "token_mean":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    if mode == "seq_mean_token_mean":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    return sum(sum(r) for r in rows) / len(rows)


def slow_ptx_loss(actor) -> torch.Tensor:
    nll, count = 0.0, 0
    for e in PTX:
        logits = actor(input_ids=torch.tensor([e.input_ids])).logits[0]
        for t in range(1, len(e.input_ids)):
            if e.loss_mask[t]:
                row = logits[t - 1]
                nll = nll - (row[e.input_ids[t]] - torch.logsumexp(row, 0))
                count += 1
    return nll / count


def expected_steps(case: Case, actor, critic, inputs, order: list[int]):
    """Each optimizer step's hand-computed policy loss and gradients (actor, critic)."""
    old, ref, old_values, rollout = inputs
    advantages, returns = slow_advantages(case, old, ref, old_values)
    mini = case.mini or 4
    steps = []
    for m0 in range(0, 4, mini):
        seqs = order[m0 : m0 + mini]
        policy, kl, entropy, value = [], [], [], []
        for i in seqs:
            cut = case.mask_truncated and RESPONSES[i][-1] != EOS
            logp, ent, v = slow_forward(actor, critic, i)
            n = 0 if cut else len(logp)
            policy.append(token_policy_loss(case, logp, old[i], advantages[i])[:n])
            # k3 = exp(log π_ref − log π_θ) − 1 − (log π_ref − log π_θ)
            kl.append([torch.exp(ref[i][t] - logp[t]) - 1 - (ref[i][t] - logp[t]) for t in range(n)])
            entropy.append(ent[:n])
            if returns is not None:
                # V̂ = V_old + clip(V − V_old, ±0.2); ℓ = ½·max((V − G)², (V̂ − G)²)
                errors = []
                for t in range(n):
                    clipped = old_values[i][t] + (v[t] - old_values[i][t]).clamp(-0.2, 0.2)
                    errors.append(0.5 * torch.maximum((v[t] - returns[i][t]) ** 2, (clipped - returns[i][t]) ** 2))
                value.append(errors)
        policy_loss = aggregate(case.aggregation, policy)
        loss = policy_loss
        if case.kl.placement == "loss":
            loss = loss + case.kl.coef * aggregate(case.aggregation, kl)
        if case.entropy_coef:
            loss = loss - case.entropy_coef * aggregate(case.aggregation, entropy)
        if case.ptx_coef:
            loss = loss + case.ptx_coef * slow_ptx_loss(actor)
        params = list(actor.parameters())
        actor_grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
        critic_grads = None
        if returns is not None:
            value_loss = aggregate(case.aggregation, value)
            critic_grads = torch.autograd.grad(value_loss, list(critic.parameters()), allow_unused=True,
                                               materialize_grads=True)  # fmt: skip
        steps.append((policy_loss.item(), actor_grads, critic_grads))
    return steps


# ------------------------------------------------------------------------------------------------ the update


def run_update(case: Case, actor, critic):
    train = case.train()
    algo = ALGORITHMS[case.algo]
    rollout = hand_built_rollout()
    with torch.no_grad():
        logp = rollout_logprobs(actor, rollout)
        values = rollout_values(critic, rollout)
    mask = rollout.response_mask
    old_logprobs = (logp + torch.tensor(OLD_OFFSET, dtype=torch.float64)) * mask
    ref_logprobs = (logp + torch.tensor(REF_OFFSET, dtype=torch.float64)) * mask
    old_values = (values + torch.tensor(VALUE_OFFSET, dtype=torch.float64)) * mask
    scores = torch.tensor(SCORES, dtype=torch.float64)
    uses_critic = algo.uses_critic
    ev = Evaluated(Scores(scores, {}), old_logprobs, ref_logprobs, old_values if uses_critic else None, None)
    x = AdvantageInputs(scores, old_logprobs, ref_logprobs, mask, train.kl.coef if train.kl.placement == "reward"
                        else 0.0, values=ev.values)  # fmt: skip
    adv = algo.advantages(x, train)
    batch = train_batch(rollout, ev, adv, None, train, EOS)
    actor_engine = Recorder(actor, "actor")
    critic_engine = Recorder(critic, "critic") if uses_critic else None
    ptx = PTXBatches(PTX, batch_size=2, seed=0, pad_id=PAD, device="cpu") if case.ptx_coef else None
    schedule = Schedule(
        epochs=1, mini_batch_size=case.mini, micro_batch_size=case.micro, order_seed=7, trim_padding=case.trim_padding
    )
    metrics = update(actor_engine, critic_engine, batch, objective(algo.policy_loss, train), schedule,
                     train.kl.coef, ptx, case.ptx_coef).metrics  # fmt: skip
    order = torch.randperm(4, generator=torch.Generator().manual_seed(7)).tolist()  # the update's shuffle
    rows = [[float(t[i, j]) for j in range(len(RESPONSES[i]))] for t in (old_logprobs, ref_logprobs, old_values)
            for i in range(4)]  # fmt: skip
    inputs = (rows[0:4], rows[4:8], rows[8:12], rollout)
    return metrics, actor_engine, critic_engine, inputs, order


CASES = {
    "grpo token_mean": Case(),
    "grpo micro-batches of 1": Case(micro=1),
    "grpo micro-batches of 2": Case(micro=2),
    "grpo seq_mean_token_mean": Case(aggregation="seq_mean_token_mean", micro=1),
    "grpo seq_mean_token_sum": Case(aggregation="seq_mean_token_sum", micro=3),
    "grpo two mini-batches": Case(mini=2, micro=1),
    "dr_grpo KL loss and entropy bonus": Case(
        algo="dr_grpo", kl=KLConfig(coef=0.3, placement="loss", estimator="k3"), entropy_coef=0.01, micro=2
    ),  # fmt: skip
    "rloo PTX": Case(algo="rloo", ptx_coef=0.5, mini=2),
    "dapo clip-higher, overlong filtering": Case(algo="dapo", clip_high=0.28, mask_truncated=True, micro=1),
    "gspo": Case(algo="gspo", aggregation="seq_mean_token_mean", clip_low=0.05, clip_high=0.08, micro=1),
    "cispo": Case(algo="cispo", clip_low=1.0, clip_high=0.1, micro=2),
    "ppo whitened, critic": Case(algo="ppo", whiten=True, micro=1),
    "ppo two mini-batches": Case(algo="ppo", mini=2, micro=1),
    "ppo micro-batches of 2, untrimmed": Case(algo="ppo", micro=2, trim_padding=False),
    "grpo micro-batches of 1, untrimmed": Case(micro=1, trim_padding=False),
}


@pytest.mark.parametrize("name", CASES)
def test_update_gives_the_hand_computed_losses_and_gradients(name, models):
    case = CASES[name]
    actor, critic = models
    metrics, actor_engine, critic_engine, inputs, order = run_update(case, actor, critic)
    expected = expected_steps(case, actor, critic, inputs, order)
    assert len(actor_engine.grads) == len(expected) == 4 // (case.mini or 4)
    for step, (_, actor_grads, critic_grads) in enumerate(expected):
        for (name_, got), want in zip(actor.named_parameters(), actor_grads):
            torch.testing.assert_close(actor_engine.grads[step].get(name_, torch.zeros_like(got)), want, atol=1e-9,
                                       rtol=0)  # fmt: skip
        if critic_grads is not None:
            for (name_, got), want in zip(critic.named_parameters(), critic_grads):
                # ValueModel returns float32 values, so the critic's loss is float32 math
                torch.testing.assert_close(critic_engine.grads[step].get(name_, torch.zeros_like(got)), want,
                                           atol=1e-6, rtol=0)  # fmt: skip
    assert metrics["loss/policy"] == pytest.approx(sum(e[0] for e in expected) / len(expected), abs=1e-9)
    assert any(g.abs().sum() > 0 for g in actor_engine.grads[0].values())


@pytest.mark.parametrize("trim", [True, False])
def test_micro_batches_by_length_without_the_columns_they_do_not_use(models, trim):
    """`train.update.trim_padding`: each micro-batch's forwards (actor and critic) cover only the prompt and
    response columns its rows use, longest responses first; untrimmed, every forward has the rollout's full width
    (3 prompt + 4 response columns) in the shuffled order. Micro-batches of 2 over the 4 hand-built sequences,
    whose responses are 3, 2, 4 and 2 tokens long after prompts of 3, 3, 2 and 2."""
    actor, critic = models
    widths = []

    def record(module, args, kwargs):
        widths.append((type(module).__name__, tuple(kwargs["input_ids"].shape)))

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in (actor, critic.backbone)]
    try:
        run_update(Case(algo="ppo", micro=2, trim_padding=trim), actor, critic)
    finally:
        for h in hooks:
            h.remove()
    # the first forward of each model is the set-up's no-grad one over the whole rollout (run_update)
    forwards = [shape for name, shape in widths if name == type(actor).__name__][1:]
    if trim:
        # longest first: sequences 2 (prompt 2, response 4) and 0 (prompt 3, response 3) → 3 + 4 columns;
        # then 1 and 3 (responses of 2; prompts 3 and 2) → 3 + 2
        assert forwards == [(2, 7), (2, 5)]
    else:
        assert forwards == [(2, 7), (2, 7)]
    assert [shape for name, shape in widths if name != type(actor).__name__][1:] == forwards  # the critic's alike
