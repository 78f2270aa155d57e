"""The DPO and IPO losses against closed forms computed with `math`."""

from __future__ import annotations

import math

import pytest
import torch

from chatrlhf.rlhf import DPO_LOSS_TYPES, dpo_loss

F64 = torch.float64

# four pairs of sequence log-probs: policy chosen, policy rejected, reference chosen, reference rejected
PC = [-10.0, -3.5, -20.0, -7.25]
PR = [-12.0, -3.0, -19.0, -9.0]
RC = [-11.0, -3.5, -18.5, -8.0]
RR = [-11.5, -2.0, -20.0, -8.5]


def _t(xs, requires_grad=False):
    return torch.tensor(xs, dtype=F64, requires_grad=requires_grad)


def _margins():
    # h = (π_c − ref_c) − (π_r − ref_r)
    return [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_sigmoid_loss_and_rewards_by_hand(beta):
    loss, chosen, rejected = dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta)
    expected = sum(-_log_sigmoid(beta * h) for h in _margins()) / len(PC)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    torch.testing.assert_close(chosen, _t([beta * (pc - rc) for pc, rc in zip(PC, RC)]), atol=1e-12, rtol=0)
    torch.testing.assert_close(rejected, _t([beta * (pr - rr) for pr, rr in zip(PR, RR)]), atol=1e-12, rtol=0)


def test_conservative_dpo_by_hand():
    beta, eps = 0.3, 0.2
    loss, _, _ = dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta, label_smoothing=eps)
    per_pair = [-(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h) for h in _margins()]
    assert loss.item() == pytest.approx(sum(per_pair) / len(per_pair), abs=1e-12)


def test_ipo_loss_by_hand():
    beta = 0.25
    loss, chosen, _ = dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta, loss_type="ipo")
    expected = sum((h - 1 / (2 * beta)) ** 2 for h in _margins()) / len(PC)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    torch.testing.assert_close(chosen, _t([beta * (pc - rc) for pc, rc in zip(PC, RC)]), atol=1e-12, rtol=0)


def test_sigmoid_loss_is_log2_when_policy_equals_reference():
    logps = torch.tensor([-4.0, -17.5, -1.25])
    loss, chosen, rejected = dpo_loss(logps, logps - 3, logps, logps - 3, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert chosen.abs().max().item() == 0.0 and rejected.abs().max().item() == 0.0


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_minimum_is_at_half_inverse_beta(beta):
    """The IPO loss is 0 exactly at h = 1/(2β) and larger on either side."""
    target = 1 / (2 * beta)

    def loss_at(h):
        # policy chosen log-prob moved by h, everything else equal: the margin is h
        return dpo_loss(_t([-5.0 + h]), _t([-6.0]), _t([-5.0]), _t([-6.0]), beta, loss_type="ipo")[0].item()

    assert loss_at(target) == pytest.approx(0.0, abs=1e-12)
    assert loss_at(target - 0.5) == pytest.approx(0.25, abs=1e-12)
    assert loss_at(target + 0.5) == pytest.approx(0.25, abs=1e-12)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_raising_the_chosen_logprob_lowers_the_loss(loss_type):
    """∂L/∂log π_θ(y_c) < 0 and ∂L/∂log π_θ(y_r) > 0 while h is below the loss's target (always, for sigmoid)."""
    beta = 0.1
    pc, pr = _t([-10.0], requires_grad=True), _t([-10.0], requires_grad=True)
    loss, _, _ = dpo_loss(pc, pr, _t([-10.0]), _t([-10.0]), beta, loss_type=loss_type)
    loss.backward()
    assert pc.grad.item() < 0 < pr.grad.item()
    # closed forms at h = 0: sigmoid −β·σ(−βh)/B = −β/2; ipo 2·(h − 1/(2β)) = −1/β
    expected = -beta / 2 if loss_type == "sigmoid" else -1 / beta
    assert pc.grad.item() == pytest.approx(expected, abs=1e-12)
    assert pr.grad.item() == pytest.approx(-expected, abs=1e-12)
    higher, _, _ = dpo_loss(pc.detach() + 0.5, pr.detach(), _t([-10.0]), _t([-10.0]), beta, loss_type=loss_type)
    assert higher.item() < loss.item()


def test_rewards_carry_no_gradient():
    pc = _t(PC, requires_grad=True)
    _, chosen, rejected = dpo_loss(pc, _t(PR), _t(RC), _t(RR), 0.1)
    assert not chosen.requires_grad and not rejected.requires_grad


def test_bad_arguments_raise():
    args = (_t(PC), _t(PR), _t(RC), _t(RR))
    with pytest.raises(ValueError, match="unknown DPO loss_type 'hinge'"):
        dpo_loss(*args, beta=0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(*args, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        dpo_loss(*args, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="sigmoid loss only"):
        dpo_loss(*args, beta=0.1, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="share one"):
        dpo_loss(_t(PC), _t(PR[:3]), _t(RC), _t(RR), beta=0.1)
