"""Small cases computed by hand, for what the golden fixture lacks: sft, csft, bradley_terry, ppo,
the humanline clamp where the fixture never reaches it (upper bound; KTO; GRPO), KTO with empty
sides, GRPO's old-policy and precomputed-advantage options, and input conventions."""

from __future__ import annotations

import math

import pytest
import torch

from halos_core.config import Hyperparams
from halos_core.loss_registry import (
    BradleyTerryLoss,
    CSFTLoss,
    DPOLoss,
    GRPOLoss,
    KTOLoss,
    PPOLoss,
    SFTLoss,
)
from halos_core.losses import build_loss
from halos_core.losses.grpo import group_advantages
from halos_core.losses.ppo import gae, sequence_rewards_to_tokens

D = torch.float64
HL = Hyperparams(humanline=True)  # clamp to [-1.0, 1.5]


def t(x, **kw):
    return torch.tensor(x, dtype=D, **kw)


def close(a, b, tol=1e-9):
    torch.testing.assert_close(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), rtol=tol, atol=tol)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------- sft / csft


@pytest.mark.parametrize("cfg", [SFTLoss(), CSFTLoss()], ids=["sft", "csft"])
def test_sft_token_mean_nll(cfg):
    loss = build_loss(cfg, Hyperparams())
    assert loss.needs_reference is False
    logps = t([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]], requires_grad=True)
    mask = t([[1, 1, 0], [1, 0, 0]])
    out = loss.compute(policy_logps=logps, mask=mask)
    # (1 + 2 + 3) / 3 tokens: a token mean over the microbatch, not the mean of per-example means (2.25)
    close(out.loss, 2.0)
    close(out.values["losses"], [1.5, 3.0])
    close(out.values["tokens"], [2.0, 1.0])
    out.loss.backward()
    close(logps.grad, [[-1 / 3, -1 / 3, 0.0], [-1 / 3, 0.0, 0.0]])
    # the mask defaults to logps != 0
    close(loss.compute(policy_logps=logps.detach()).loss, 2.0)


def test_csft_control_tokens():
    loss = build_loss({"name": "csft", "chosen_control_token": "<g>", "rejected_control_token": "<b>"})
    assert loss.control_tokens == ("<g>", "<b>")
    assert loss.data_kind == "unpaired"
    assert build_loss(CSFTLoss()).control_tokens == ("<|good|>", "<|bad|>")


# --------------------------------------------------------------------------- bradley-terry


def test_bradley_terry():
    loss = build_loss(BradleyTerryLoss(), Hyperparams())
    assert (loss.data_kind, loss.needs_reference) == ("paired", False)
    chosen = t([2.0, 0.0], requires_grad=True)
    rejected = t([1.0, 1.0], requires_grad=True)
    out = loss.compute(chosen_scores=chosen, rejected_scores=rejected)
    l0, l1 = math.log(1 + math.exp(-1)), math.log(1 + math.exp(1))  # -log sigmoid(+1), -log sigmoid(-1)
    close(out.values["losses"], [l0, l1])
    close(out.loss, (l0 + l1) / 2)
    close(out.values["accuracy"], [1.0, 0.0])
    close(out.values["chosen_rewards"], [2.0, 0.0])
    close(out.values["rejected_rewards"], [1.0, 1.0])
    out.loss.backward()
    # d/dc -log sigmoid(c - r) = -(1 - sigmoid(c - r)), halved by the mean
    close(chosen.grad, [-(1 - sigmoid(1)) / 2, -(1 - sigmoid(-1)) / 2])
    close(rejected.grad, -chosen.grad)
    # a [B, 1] head output is accepted
    close(
        loss.compute(chosen_scores=chosen.detach()[:, None], rejected_scores=rejected.detach()[:, None]).loss, out.loss
    )


# --------------------------------------------------------------------------- ppo


def test_ppo_reward_placement_and_gae():
    mask = t([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    token_rewards = sequence_rewards_to_tokens(t([1.0, -1.0, 5.0]), mask)
    close(token_rewards, [[0, 0, 1.0], [0, -1.0, 0], [0, 0, 0]])  # last unmasked token; empty row gets none
    values = t([[0.5, 0.25, 0.0], [0.0, 0.0, 9.0], [0, 0, 0]])  # 9.0 is padding: masked out
    adv, future = gae(values, token_rewards, mask, gamma=0.5, lam=0.5)
    # row 0: t2 delta=1 -> A=1; t1 delta=0+.5*0-.25=-.25 -> A=-.25+.25*1=0; t0 delta=.5*.25-.5=-.375 -> A=-.375
    # row 1: t1 delta=-1 -> A=-1; t0 delta=0 -> A=0+.25*(-1)=-.25
    close(adv, [[-0.375, 0.0, 1.0], [-0.25, -1.0, 0.0], [0, 0, 0]])
    # discounted future reward G_t = r_t + gamma G_{t+1}
    close(future, [[0.25, 0.5, 1.0], [-0.5, -1.0, 0.0], [0, 0, 0]])


def test_ppo_loss_by_hand():
    cfg = PPOLoss(cliprange=0.2, critic_coef=0.1, gamma=0.5, lam=0.5)
    loss = build_loss(cfg, Hyperparams())
    assert (loss.data_kind, loss.needs_reference) == ("unpaired", True)
    old = t([[-1.0, -1.0, -1.0]])
    policy = (old + t([[0.0, math.log(0.5), math.log(2.0)]])).requires_grad_(True)  # ratios 1, 0.5, 2
    values = t([[0.5, 0.25, 0.0]], requires_grad=True)
    mask = t([[1, 1, 1]])
    out = loss.compute(policy_logps=policy, old_policy_logps=old, values=values, rewards=t([1.0]), mask=mask)

    # raw GAE advantages [-3/8, 0, 1] (see test above), whitened with the population variance
    raw = [-3 / 8, 0.0, 1.0]
    mean = sum(raw) / 3  # 5/24
    var = sum((a - mean) ** 2 for a in raw) / 3  # 97/288
    a0, a1, a2 = [(a - mean) / math.sqrt(var + 1e-8) for a in raw]
    assert a0 < 0 and a1 < 0 and a2 > 0
    close(out.values["advantages"], [[a0, a1, a2]])
    # token 0: ratio 1 -> -a0; token 1: a1<0, ratio .5 clipped to .8 binds -> -.8 a1;
    # token 2: a2>0, ratio 2 clipped to 1.2 binds -> -1.2 a2
    policy_loss = (-a0 - 0.8 * a1 - 1.2 * a2) / 3
    close(out.values["policy_loss"], policy_loss)
    close(out.values["clip_fraction"], 2 / 3)
    # critic: targets G = [.25, .5, 1]; 0.5 * mean((V - G)^2) = 0.5 * (.0625 + .0625 + 1) / 3
    critic = 0.5 * (0.0625 + 0.0625 + 1.0) / 3
    close(out.values["critic_loss"], critic)
    close(out.loss, policy_loss + 0.1 * critic)
    close(out.values["value_targets"], [[0.25, 0.5, 1.0]])
    out.loss.backward()
    # dL/dV = critic_coef * 0.5 * 2 (V - G) / 3
    close(values.grad, [[0.1 * (0.5 - 0.25) / 3, 0.1 * (0.25 - 0.5) / 3, 0.1 * (0.0 - 1.0) / 3]])
    # clipped tokens carry no policy gradient; token 0: d(-a0 * ratio)/dlogp = -a0 / 3
    close(policy.grad, [[-a0 / 3, 0.0, 0.0]])


def test_ppo_old_values_drive_gae_not_current_values():
    cfg = PPOLoss(cliprange=0.2, critic_coef=1.0, gamma=1.0, lam=1.0)
    loss = build_loss(cfg, Hyperparams())
    logps = t([[-1.0, -1.0], [-2.0, 0.0]])
    mask = t([[1, 1], [1, 0]])
    kw = dict(policy_logps=logps, old_policy_logps=logps, rewards=t([1.0, -1.0]), mask=mask)
    a = loss.compute(values=t([[0.3, 0.1], [0.2, 0.0]]), old_values=t([[0.0, 0.0], [0.0, 0.0]]), **kw)
    b = loss.compute(values=t([[0.0, 0.0], [0.0, 0.0]]), **kw)
    close(a.values["advantages"], b.values["advantages"])
    # targets with gamma=1: row 0 [1, 1], row 1 [-1]
    close(b.values["critic_loss"], 0.5 * (1 + 1 + 1) / 3)
    close(a.values["critic_loss"], 0.5 * ((0.3 - 1) ** 2 + (0.1 - 1) ** 2 + (0.2 + 1) ** 2) / 3)


# --------------------------------------------------------------------------- humanline


def test_dpo_humanline_clamps_both_bounds():
    pc, rc = t([[0.0, -1.0]]), t([[-2.0, -0.5]])  # log-ratios [2.0, -0.5] -> clamped [1.5, -0.5]
    pr, rr = t([[-4.0, -1.0]]), t([[-1.0, -1.25]])  # log-ratios [-3.0, 0.25] -> clamped [-1.0, 0.25]
    mask = t([[1, 1]])
    kw = dict(
        policy_chosen_logps=pc,
        policy_rejected_logps=pr,
        reference_chosen_logps=rc,
        reference_rejected_logps=rr,
        chosen_mask=mask,
        rejected_mask=mask,
    )
    plain = build_loss(DPOLoss(beta=0.1), Hyperparams()).compute(**kw)
    close(plain.values["chosen_rewards"], [0.1 * 1.5])
    close(plain.values["rejected_rewards"], [0.1 * -2.75])
    hl = build_loss(DPOLoss(beta=0.1), HL).compute(**kw)
    close(hl.values["chosen_rewards"], [0.1 * 1.0])
    close(hl.values["rejected_rewards"], [0.1 * -0.75])
    close(hl.loss, math.log(1 + math.exp(-0.175)))
    # custom band
    hp = Hyperparams(humanline=True, log_epsilon_p=-0.25, log_epsilon_r=0.5)
    out = build_loss(DPOLoss(beta=1.0), hp).compute(**kw)
    close(out.values["chosen_rewards"], [0.5 - 0.25])
    close(out.values["rejected_rewards"], [-0.25 + 0.25])


def test_humanline_clamped_tokens_get_no_gradient():
    pc = t([[0.0, -1.0]], requires_grad=True)
    kw = dict(
        policy_chosen_logps=pc,
        policy_rejected_logps=t([[-1.0, -1.0]]),
        reference_chosen_logps=t([[-2.0, -0.5]]),
        reference_rejected_logps=t([[-1.0, -1.0]]),
        chosen_mask=t([[1, 1]]),
        rejected_mask=t([[1, 1]]),
    )
    build_loss(DPOLoss(beta=0.1), HL).compute(**kw).loss.backward()
    assert pc.grad[0, 0] == 0 and pc.grad[0, 1] != 0


def test_kto_humanline_by_hand():
    beta = 0.1
    kw = dict(
        policy_chosen_logps=t([[0.0, -1.0]]),
        reference_chosen_logps=t([[-2.0, -1.5]]),  # [2.0, 0.5] -> [1.5, 0.5]
        policy_rejected_logps=t([[-3.0, 0.0]]),
        reference_rejected_logps=t([[0.0, 0.0]]),  # [-3.0] -> [-1.0]
        policy_kl_logps=t([[0.0, 0.0], [-1.5, 0.0]]),
        reference_kl_logps=t([[-3.0, 0.0], [-1.0, 0.0]]),
        chosen_mask=t([[1, 1]]),
        rejected_mask=t([[1, 0]]),
        kl_mask=t([[1, 0], [1, 0]]),
    )
    out = build_loss(KTOLoss(beta=beta), HL).compute(**kw)
    # KL rows: [3.0] -> 1.5 and [-0.5] -> -0.5: mean 0.5
    close(out.values["kl"], [0.5])
    close(out.values["chosen_rewards"], [2.0])
    close(out.values["rejected_rewards"], [-1.0])
    close(out.values["losses"], [1 - sigmoid(beta * (2.0 - 0.5)), 1 - sigmoid(beta * (0.5 + 1.0))])
    plain = build_loss(KTOLoss(beta=beta), Hyperparams()).compute(**kw)
    close(plain.values["kl"], [(3.0 - 0.5) / 2])
    close(plain.values["chosen_rewards"], [2.5])


def test_kto_empty_sides_and_kl_floor():
    loss = build_loss(KTOLoss(beta=0.5, desirable_weight=2.0, undesirable_weight=1.0), Hyperparams())
    empty = torch.zeros(0, 3, dtype=D)
    kl = dict(
        policy_kl_logps=t([[-2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]),
        reference_kl_logps=t([[-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]),
        kl_mask=t([[1, 0, 0], [0, 0, 0]]),
    )
    pc = t([[-1.0, -1.0, 0.0]], requires_grad=True)
    out = loss.compute(
        policy_chosen_logps=pc,
        reference_chosen_logps=t([[-1.0, -2.0, 0.0]]),
        policy_rejected_logps=empty,
        reference_rejected_logps=empty,
        chosen_mask=t([[1, 1, 0]]),
        rejected_mask=empty,
        **kl,
    )
    # the only non-empty KL row has log-ratio -1: mean -1, clamped to 0 (the empty row is not counted)
    close(out.values["kl"], [0.0])
    close(out.values["losses"], [2.0 * (1 - sigmoid(0.5 * 1.0))])
    assert out.values["rejected_rewards"].shape == (0,)
    out.loss.backward()
    assert torch.isfinite(pc.grad).all()
    # only undesirable rows, given as 1-D empty tensors
    none = torch.zeros(0, dtype=D)
    out = loss.compute(
        policy_chosen_logps=none,
        reference_chosen_logps=none,
        chosen_mask=none,
        policy_rejected_logps=t([[-1.0, 0.0, 0.0]]),
        reference_rejected_logps=t([[-1.5, 0.0, 0.0]]),
        rejected_mask=t([[1, 0, 0]]),
        **kl,
    )
    close(out.values["losses"], [1 - sigmoid(0.5 * (0.0 - 0.5))])
    assert out.values["chosen_rewards"].shape == (0,)


def test_grpo_humanline_by_hand():
    beta, eps = 0.1, 0.2
    pol, ref = t([[0.0], [-3.0]]), t([[-2.0], [-1.0]])  # log-ratios 2.0 -> 1.5, -2.0 -> -1.0
    kw = dict(
        policy_logps=pol, reference_logps=ref, mask=t([[1], [1]]), prompt_ids=torch.tensor([7, 7]), scores=t([1.0, 0.0])
    )
    out = build_loss(GRPOLoss(beta=beta, epsilon=eps), HL).compute(**kw)
    a = 0.5 / (0.5 + 0.01)  # mean .5, population std .5
    close(out.values["advantages"], [a, -a])
    kl0 = math.exp(-1.5) + 1.5 - 1
    kl1 = math.exp(1.0) - 1.0 - 1
    # row 0: A>0, ratio e^1.5 clipped to 1.2; row 1: A<0, ratio e^-1 clipped to 0.8 (the min picks it)
    close(out.loss, ((-1.2 * a + beta * kl0) + (0.8 * a + beta * kl1)) / 2)
    close(out.values["kl"], (kl0 + kl1) / 2)
    close(out.values["weighted_advantage"], (a * math.exp(1.5) + a * math.exp(-1.0)) / 2)
    close(out.values["clip_fraction"], 1.0)


def test_grpo_old_policy_and_precomputed_advantages():
    beta = 0.5
    loss = build_loss(GRPOLoss(beta=beta, epsilon=0.2), Hyperparams())
    pol = t([[-1.0, -2.0], [-1.0, 0.0]], requires_grad=True)
    ref = t([[-1.5, -2.0], [-0.5, 0.0]])
    mask = t([[1, 1], [1, 0]])
    adv = t([1.0, -2.0])
    out = loss.compute(policy_logps=pol, reference_logps=ref, mask=mask, advantages=adv, old_policy_logps=pol.detach())
    # ratio == 1 everywhere: token loss = -A + beta * KL(ref)
    kl = lambda x: math.exp(-x) + x - 1  # x = pol - ref
    tokens = [-1.0 + beta * kl(0.5), -1.0 + beta * kl(0.0), 2.0 + beta * kl(-0.5)]
    close(out.loss, sum(tokens) / 3)
    out.loss.backward()
    # d/dlogp of -A * exp(logp - old) at ratio 1 is -A; KL part: beta * (1 - exp(ref - pol))
    close(
        pol.grad, [[(-1.0 + beta * (1 - math.exp(-0.5))) / 3, -1.0 / 3], [(2.0 + beta * (1 - math.exp(0.5))) / 3, 0.0]]
    )


def test_group_advantages():
    adv = group_advantages(torch.tensor([3, 1, 3, 3]), t([1.0, 5.0, 2.0, 3.0]))
    std = math.sqrt(2 / 3)  # group 3: scores 1, 2, 3
    close(adv, [-1 / (std + 0.01), 0.0, 0.0, 1 / (std + 0.01)])


# --------------------------------------------------------------------------- conventions


def test_reference_free_paired_losses_accept_none():
    pc, pr = t([[-1.0, -1.0, 0.0]]), t([[-2.0, -4.0, -3.0]])
    out = build_loss({"name": "simpo", "beta": 2.0, "gamma_beta_ratio": 0.5}).compute(
        policy_chosen_logps=pc, policy_rejected_logps=pr
    )
    close(out.values["chosen_rewards"], [-1.0])
    close(out.values["rejected_rewards"], [-3.0])
    close(out.loss, math.log(1 + math.exp(-2.0 * (2.0 - 0.5))))
    out = build_loss({"name": "slic", "beta": 1.0, "lambda_coef": 0.1}).compute(
        policy_chosen_logps=pc, policy_rejected_logps=pr
    )
    close(out.loss, max(0.0, 1.0 + 2.0 - 9.0) + 0.1 * 2.0)
    with pytest.raises(ValueError):
        build_loss(DPOLoss()).compute(policy_chosen_logps=pc, policy_rejected_logps=pr)


def test_ipo_empty_row_is_finite():
    z = torch.zeros(1, 3, dtype=D)
    out = build_loss({"name": "ipo", "tau": 0.5}).compute(
        policy_chosen_logps=z,
        policy_rejected_logps=z,
        reference_chosen_logps=z,
        reference_rejected_logps=z,
        chosen_mask=z,
        rejected_mask=z,
    )
    close(out.loss, 1.0)  # (0 - 0 - 1/(2 tau))^2


def test_bf16_inputs_are_upcast():
    pc = torch.tensor([[-1.0, -2.0]], dtype=torch.bfloat16, requires_grad=True)
    r = torch.tensor([[-1.5, -2.0]], dtype=torch.bfloat16)
    m = torch.ones(1, 2, dtype=torch.bool)
    out = build_loss(DPOLoss(beta=1.0)).compute(
        policy_chosen_logps=pc,
        policy_rejected_logps=r.clone(),
        reference_chosen_logps=r,
        reference_rejected_logps=r,
        chosen_mask=m,
        rejected_mask=m,
    )
    assert out.loss.dtype == torch.float32
    close(out.loss.double(), math.log(1 + math.exp(-0.5)), tol=1e-6)
    out.loss.backward()
    assert pc.grad is not None and pc.grad.dtype == torch.bfloat16
