"""The engines' AdamW (`optim.fused`): torch's fused kernel by default, the same update as AdamW's formula.

The expected weights are computed here from the formula (Loshchilov & Hutter's decoupled weight decay, Adam's
bias-corrected moments) in float64, step by step, not by torch's optimizer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from chatrlhf.config import OptimConfig
from chatrlhf.engine.single import SingleEngine

STEPS = 3


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1))


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, generator=g), torch.randn(8, 1, generator=g)) for _ in range(STEPS)]


def train(engine: SingleEngine, data) -> list[dict[str, torch.Tensor]]:
    """The gradients each step applied (float64 copies), after running the steps."""
    grads = []
    for x, y in data:
        loss = ((engine.model(x) - y) ** 2).mean()
        engine.backward(loss)
        grads.append({n: p.grad.double().clone() for n, p in engine.model.named_parameters()})
        engine.step()
    return grads


def adamw_by_hand(start: dict[str, torch.Tensor], grads, o: OptimConfig) -> dict[str, torch.Tensor]:
    """AdamW's update from its formula; weight decay on matrices only, as `param_groups` decays."""
    b1, b2 = o.betas
    w = {n: t.double().clone() for n, t in start.items()}
    m = {n: torch.zeros_like(t) for n, t in w.items()}
    v = {n: torch.zeros_like(t) for n, t in w.items()}
    for t, g in enumerate(grads, start=1):
        for n in w:
            decay = o.weight_decay if w[n].dim() >= 2 else 0.0
            w[n] *= 1 - o.lr * decay
            m[n] = b1 * m[n] + (1 - b1) * g[n]
            v[n] = b2 * v[n] + (1 - b2) * g[n] ** 2
            m_hat, v_hat = m[n] / (1 - b1**t), v[n] / (1 - b2**t)
            w[n] -= o.lr * m_hat / (v_hat.sqrt() + o.eps)
    return w


@pytest.mark.parametrize("fused", [True, False])
def test_each_implementation_makes_adamws_update(fused):
    o = OptimConfig(lr=1e-2, weight_decay=0.1, grad_clip=0.0, schedule="constant", fused=fused)
    net = model()
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    engine = SingleEngine(net, o, total_steps=STEPS)
    assert bool(engine.optimizer.defaults["fused"]) is fused
    grads = train(engine, batches())
    expected = adamw_by_hand(start, grads, o)
    for n, p in net.named_parameters():
        assert not torch.equal(p.detach(), start[n]), n
        torch.testing.assert_close(p.detach().double(), expected[n], rtol=0, atol=1e-6)


def test_fused_is_the_default():
    assert OptimConfig().fused is True
    assert SingleEngine(model(), OptimConfig(), total_steps=1).optimizer.defaults["fused"] is True


def test_a_state_saved_unfused_resumes_fused(tmp_path):
    """A checkpoint written by the default implementation (as runs before `fused` were) loads into the fused
    optimizer, which continues with the same moments and step count."""
    o = OptimConfig(lr=1e-2, grad_clip=0.0, schedule="constant")
    data = batches()
    first = SingleEngine(model(), OptimConfig(**{**o.__dict__, "fused": False}), total_steps=STEPS, name="m")
    train(first, data[:1])
    first.save_state(tmp_path)

    resumed = SingleEngine(model(), o, total_steps=STEPS, name="m")
    resumed.load_state(tmp_path)
    continued = SingleEngine(model(), OptimConfig(**{**o.__dict__, "fused": False}), total_steps=STEPS, name="m")
    continued.load_state(tmp_path)
    train(resumed, data[1:])
    train(continued, data[1:])
    state = next(iter(resumed.optimizer.state.values()))
    assert math.isclose(float(state["step"]), STEPS)
    for (n, a), (_, b) in zip(resumed.model.named_parameters(), continued.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)
