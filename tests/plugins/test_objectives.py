"""Policy objectives (docs/algorithms.md §7, §8): defaults, the clipped loss, the KL term, registration."""

import math

import attrs
import numpy as np
import pytest
import torch

from mixgrpo.core.advantages import group_advantages
from mixgrpo.core.config import parse_gin
from mixgrpo.core.hookspecs import hookimpl
from mixgrpo.core.interfaces import PolicyObjective, check_objective_factory
from mixgrpo.core.plugins import PluginManager
from mixgrpo.core.types import StepResult
from mixgrpo.plugins.objectives.base import ClippedGRPO, gaussian_kl
from mixgrpo.plugins.objectives.dancegrpo import DanceGRPO
from mixgrpo.plugins.objectives.flowgrpo import FlowGRPO
from mixgrpo.plugins.objectives.mixgrpo import MixGRPO
from mixgrpo.testing.objectives import ObjectiveContract

DEFAULTS = {
    # std, ddof, eps, aggregate, adv_clip, clip_range, kl_beta
    FlowGRPO: ("global", 0, 1e-4, "reward", 5.0, 1e-4, 0.04),
    DanceGRPO: ("group", 1, 1e-8, "advantage", 5.0, 1e-4, 0.0),
    MixGRPO: ("group", 1, 1e-8, "advantage", 5.0, 1e-4, 0.0),
}


@pytest.mark.parametrize("cls", list(DEFAULTS))
def test_method_defaults(cls):
    obj = cls()
    got = (obj.std, obj.ddof, obj.eps, obj.aggregate, obj.adv_clip, obj.clip_range, obj.kl_beta)
    assert got == DEFAULTS[cls]
    assert obj.weights is None and obj.kl_include_dt is False
    assert obj.uses_reference == (DEFAULTS[cls][-1] > 0)


def test_constructor_arguments_override_defaults():
    obj = FlowGRPO(kl_beta=0.01, clip_range=1e-5, weights={"pickscore": 1.0})
    assert (obj.kl_beta, obj.clip_range, obj.weights, obj.std) == (0.01, 1e-5, {"pickscore": 1.0}, "global")
    with pytest.raises(ValueError, match="unknown std mode"):
        MixGRPO(std="batch")
    with pytest.raises(ValueError, match="clip_range"):
        MixGRPO(clip_range=0.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(std="batch"), "unknown std mode 'batch'; valid: group, global"),
    (dict(aggregate="sum"), "unknown aggregate 'sum'; valid: advantage, reward"),
    (dict(clip_range=-1e-4), "clip_range must be > 0, got -0.0001"),
    (dict(kl_beta=-0.1), "kl_beta must be a finite number >= 0, got -0.1"),
    (dict(kl_beta=math.inf), "kl_beta must be a finite number >= 0, got inf"),
])
@pytest.mark.parametrize("cls", list(DEFAULTS))
def test_every_objective_checks_its_arguments(cls, kwargs, message):
    with pytest.raises(ValueError) as err:
        cls(**kwargs)
    assert str(err.value) == message


@pytest.mark.parametrize("cls", list(DEFAULTS))
def test_objectives_are_frozen_records_with_the_same_fields(cls):
    # FlowGRPO redefines every field with its defaults: the order (signature, repr) is ClippedGRPO's
    assert [f.name for f in attrs.fields(cls)] == [f.name for f in attrs.fields(ClippedGRPO)]
    obj = cls(weights={"a": 2})
    std, ddof, eps, aggregate, adv_clip, clip_range, kl_beta = DEFAULTS[cls]
    assert repr(obj) == (f"{cls.__name__}(std={std!r}, ddof={ddof}, eps={eps}, aggregate={aggregate!r}, "
                         f"weights={{'a': 2}}, adv_clip={adv_clip}, clip_range={clip_range}, kl_beta={kl_beta}, "
                         f"kl_include_dt=False)")
    assert obj == cls(weights={"a": 2}) and obj != cls(weights={"a": 3})
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        obj.kl_beta = 1.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(ddof=-1), "ddof must be a finite number >= 0, got -1"),
    (dict(ddof=math.nan), "ddof must be a finite number >= 0, got nan"),
    (dict(ddof="1"), "ddof must be a number, got '1'"),
    (dict(adv_clip=-1), "adv_clip must be > 0, or None for no clamp, got -1.0"),
    (dict(adv_clip=0), "adv_clip must be > 0, or None for no clamp, got 0.0"),
    (dict(eps=-1e-8), "eps must be a finite number >= 0, got -1e-08"),
])
@pytest.mark.parametrize("cls", list(DEFAULTS))
def test_ddof_adv_clip_and_eps_are_checked(cls, kwargs, message):
    with pytest.raises(ValueError) as err:
        cls(**kwargs)
    assert str(err.value) == message


def test_valid_ddof_and_adv_clip_keep_their_values():
    obj = MixGRPO(ddof=0, adv_clip=None)
    assert obj.ddof == 0 and type(obj.ddof) is int and obj.adv_clip is None
    assert FlowGRPO(ddof=0.5, adv_clip=3).adv_clip == 3.0 and type(FlowGRPO(adv_clip=3).adv_clip) is float


@pytest.mark.parametrize("binding, message", [
    ("MixGRPO.adv_clip = -1", "adv_clip must be > 0, or None for no clamp, got -1.0"),
    ("FlowGRPO.ddof = -1", "ddof must be a finite number >= 0, got -1"),
])
def test_bad_bindings_are_refused_naming_the_binding(binding, message):
    pm = parse_gin([], [binding])
    cls, name = binding.split(".")[0], binding.split(".")[0].lower()
    with pytest.raises(ValueError) as err:
        pm.create("objective", name)
    assert str(err.value).startswith(message) and f"configurable '{cls}'" in str(err.value)


def test_gin_bindings_are_converted_and_checked():
    pm = parse_gin([], ["FlowGRPO.clip_range = 1", "FlowGRPO.weights = {'x': 1.0}"])
    obj = pm.create("objective", "flowgrpo")
    assert obj.clip_range == 1.0 and type(obj.clip_range) is float and obj.weights == {"x": 1.0}
    assert pm.create("objective", "flowgrpo", weights={"y": 2.0}).weights == {"y": 2.0}  # the trainer's call
    pm = parse_gin([], ["MixGRPO.kl_beta = -1.0"])
    with pytest.raises(ValueError, match="kl_beta must be a finite number >= 0, got -1.0"):
        pm.create("objective", "mixgrpo")


def test_advantages_use_the_options():
    gen = torch.Generator().manual_seed(0)
    rewards = {"a": torch.randn(12, generator=gen), "b": 5 * torch.randn(12, generator=gen)}
    groups = torch.arange(3).repeat_interleave(4)
    weights = {"a": 1.0, "b": 2.0}
    flow = FlowGRPO(weights=weights).advantages(rewards, groups)
    total = (rewards["a"] + 2 * rewards["b"]).double().numpy()
    means = np.array([total[groups.numpy() == k].mean() for k in groups.numpy()])
    np.testing.assert_allclose(flow.numpy(), (total - means) / (np.std(total) + 1e-4), rtol=1e-5, atol=1e-6)
    mix = MixGRPO(weights=weights).advantages(rewards, groups)
    each = {k: group_advantages(v, groups) for k, v in rewards.items()}
    torch.testing.assert_close(mix, (each["a"] + 2 * each["b"]) / 3)


# -- the clipped loss ------------------------------------------------------------------------------
def test_loss_equals_hand_computed_clipped_terms():
    obj = MixGRPO(clip_range=0.2)
    ratio = torch.tensor([0.5, 0.9, 1.1, 1.5, 0.5, 1.5, 1.0])
    adv = torch.tensor([1.0, 1.0, -2.0, 1.0, -1.0, -1.0, 0.0])
    old = torch.full((7,), -2.0)
    new = (old + ratio.log()).requires_grad_(True)
    terms, stats = obj.loss(new, old, adv)
    # by hand: max(−A·r, −A·clip(r, 0.8, 1.2))
    hand = torch.tensor([
        max(-0.5, -0.8),   # A > 0, r < 1−ε: unclipped −0.5 is the max
        max(-0.9, -0.9),   # inside
        max(2.2, 2.2),     # inside, A < 0
        max(-1.5, -1.2),   # A > 0, r > 1+ε: clipped −1.2
        max(0.5, 0.8),     # A < 0, r < 1−ε: clipped 0.8
        max(1.5, 1.2),     # A < 0, r > 1+ε: unclipped 1.5
        0.0,
    ])
    torch.testing.assert_close(terms.detach(), hand, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(stats["policy"], hand, atol=1e-6, rtol=1e-6)
    assert stats["clipped"].tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    torch.testing.assert_close(stats["ratio"], ratio)
    torch.testing.assert_close(stats["approx_kl"], 0.5 * ratio.log() ** 2)
    assert stats["kl"].tolist() == [0.0] * 7


def test_gradients_where_clipped_and_inside():
    eps = 1e-4
    obj = DanceGRPO()
    old = torch.tensor([-1.0, -1.0, -1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    log_r = torch.tensor([3 * eps, -3 * eps, 0.5 * eps, -0.5 * eps, -3 * eps, 3 * eps], dtype=torch.float64)
    adv = torch.tensor([2.0, -2.0, 1.5, -0.5, 2.0, -2.0], dtype=torch.float64)
    new = (old + log_r).requires_grad_(True)
    terms, _ = obj.loss(new, old, adv)
    terms.sum().backward()
    r = log_r.exp()
    assert new.grad[0] == 0.0  # A > 0, r > 1+ε: clipped, no gradient
    assert new.grad[1] == 0.0  # A < 0, r < 1−ε: clipped, no gradient
    torch.testing.assert_close(new.grad[2:4], -adv[2:4] * r[2:4])  # inside: −A·r
    # outside the range on the pessimistic side the unclipped term still pulls back
    torch.testing.assert_close(new.grad[4:], -adv[4:] * r[4:])


def test_kl_term_adds_beta_times_kl():
    obj = FlowGRPO()  # β = 0.04
    old = torch.tensor([-1.0, -2.0, -3.0])
    adv = torch.tensor([1.0, -1.0, 0.5])
    kl = torch.tensor([0.1, 2.0, 0.0], requires_grad=True)
    new = old.clone().requires_grad_(True)
    terms, stats = obj.loss(new, old, adv, kl)
    torch.testing.assert_close(terms.detach(), -adv + 0.04 * kl.detach())
    torch.testing.assert_close(stats["kl"], kl.detach())
    terms.sum().backward()
    torch.testing.assert_close(kl.grad, torch.full((3,), 0.04))
    with pytest.raises(ValueError, match="no kl was passed"):
        obj.loss(new, old, adv)


def test_loss_shape_errors():
    obj = MixGRPO()
    with pytest.raises(ValueError, match="same shape"):
        obj.loss(torch.zeros(3), torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="kl has shape"):
        obj.loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(2))


# -- KL ---------------------------------------------------------------------------------------------
def test_gaussian_kl_exact_matches_torch_normal_kl():
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 5, dtype=torch.float64, generator=gen)
    mean_ref = mean + 0.1 * torch.randn(3, 4, 5, dtype=torch.float64, generator=gen)
    g, dt = 0.7, -0.04
    step_std = g * math.sqrt(-dt)
    p = torch.distributions.Normal(mean, torch.full_like(mean, step_std))
    q = torch.distributions.Normal(mean_ref, torch.full_like(mean, step_std))
    reference = torch.distributions.kl_divergence(p, q).reshape(3, -1).mean(dim=1)
    got = gaussian_kl(mean, mean_ref, g, include_dt=True, dt=dt)
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-7)
    # the reference's form (no Δ) is the exact KL times Δ
    torch.testing.assert_close(gaussian_kl(mean, mean_ref, g).double(), reference * 0.04, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="needs dt"):
        gaussian_kl(mean, mean_ref, g, include_dt=True)
    with pytest.raises(ValueError, match="ODE step"):
        gaussian_kl(mean, mean_ref, 0.0)


def test_objective_kl_from_step_results():
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.0])
    gen = torch.Generator().manual_seed(1)
    mu, mu_ref = torch.randn(2, 6, generator=gen), torch.randn(2, 6, generator=gen)
    g = 0.7
    step_std = torch.tensor(g * math.sqrt(0.3))
    policy = StepResult(prev_sample=mu, mean=mu, std=step_std)
    ref = StepResult(prev_sample=mu, mean=mu_ref, std=step_std)
    expected = ((mu - mu_ref) ** 2).mean(dim=1) / (2 * g * g)
    torch.testing.assert_close(FlowGRPO().kl(policy, ref, sigmas, 1), expected, rtol=1e-5, atol=1e-7)
    exact = FlowGRPO(kl_include_dt=True).kl(policy, ref, sigmas, 1)
    torch.testing.assert_close(exact, expected / 0.3, rtol=1e-5, atol=1e-7)


# -- registration and the contract -----------------------------------------------------------------
def test_registration_through_the_plugin_manager():
    pm = PluginManager(load_entry_points=True)
    assert {"flowgrpo", "dancegrpo", "mixgrpo"} <= set(pm.names("objective"))
    for name, cls in [("flowgrpo", FlowGRPO), ("dancegrpo", DanceGRPO), ("mixgrpo", MixGRPO)]:
        obj = pm.create("objective", name)
        assert isinstance(obj, cls) and isinstance(obj, ClippedGRPO)
    assert pm.create("objective", "mixgrpo", weights={"x": 1.0}).weights == {"x": 1.0}


class TestFlowGRPOContract(ObjectiveContract):
    zero_mean_groups = True  # per-prompt mean, global std: still zero mean within each group

    def make_objective(self):
        return FlowGRPO(weights={"geneval": 1.0, "ocr": 0.5})


class TestDanceGRPOContract(ObjectiveContract):
    def make_objective(self):
        return DanceGRPO()


class TestMixGRPOContract(ObjectiveContract):
    def make_objective(self):
        return MixGRPO(weights={"hps": 1.0, "pickscore": 1.0, "imagereward": 1.0})


class TestMixGRPOWithKLContract(ObjectiveContract):
    def make_objective(self):
        return MixGRPO(kl_beta=0.1, clip_range=1e-3)


# -- the constructor contract, for an objective written outside mixgrpo ------------------------------
class RankObjective(PolicyObjective):
    """As a third party writes one: no attrs, no ClippedGRPO. Advantages: the weighted sum of each
    reward's within-group rank, centred; loss: the clipped GRPO terms."""

    def __init__(self, weights=None, clip_range=1e-3):
        self.weights = None if weights is None else dict(weights)
        self.clip_range = clip_range

    def advantages(self, rewards, group_ids):
        weights = self.weights or dict.fromkeys(rewards, 1.0)
        total = sum(weights[name] * r.double() for name, r in rewards.items())
        adv = torch.zeros_like(total)
        for g in group_ids.unique():
            rows = group_ids == g
            ranks = total[rows].argsort().argsort().double()
            adv[rows] = ranks - ranks.mean()
        return adv.float()

    def loss(self, log_prob_new, log_prob_old, advantages, kl=None):
        ratio = torch.exp(log_prob_new - log_prob_old.detach())
        eps = self.clip_range
        policy = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - eps, 1 + eps))
        log_ratio = (log_prob_new - log_prob_old).detach()
        stats = {"ratio": ratio.detach(), "clipped": ((ratio.detach() - 1).abs() > eps).float(),
                 "approx_kl": 0.5 * log_ratio**2, "policy": policy.detach(), "kl": torch.zeros_like(policy.detach())}
        return policy, stats


class UnweightedObjective(RankObjective):
    """Breaks the contract: its constructor does not take ``weights``."""

    def __init__(self, clip_range=1e-3):
        super().__init__(None, clip_range)


class TestThirdPartyObjectiveContract(ObjectiveContract):
    zero_mean_groups = True

    def make_objective(self):
        return RankObjective(weights={"aesthetic": 1.0, "text": 2.0})


class _UnweightedContract(ObjectiveContract):  # not collected: run by the test below
    def make_objective(self):
        return UnweightedObjective()


def test_an_objective_without_weights_fails_naming_the_contract():
    with pytest.raises(ValueError, match=r"UnweightedObjective breaks the objectives' constructor contract "
                                         r"\(Objective\): it must take the keyword argument weights"):
        _UnweightedContract().test_constructor_takes_reward_weights()
    # as registered by a plugin, gin-configurable: refused by name before anything is built
    class Plugin:
        @hookimpl
        def register_objectives(self, register):
            register("unweighted", UnweightedObjective)
            register("ranks", RankObjective)

    pm = PluginManager(load_entry_points=False, plugins=[Plugin()])
    with pytest.raises(ValueError, match=r"objective 'unweighted' \(UnweightedObjective\) breaks the objectives' "
                                         r"constructor contract.*weights=dict\(TrainConfig.rewards\)"):
        check_objective_factory(pm.get("objective", "unweighted").factory, "unweighted")
    with pytest.raises(TypeError, match="weights"):  # what the trainer's call would raise without the check
        pm.create("objective", "unweighted", weights={"x": 1.0})
    check_objective_factory(pm.get("objective", "ranks").factory, "ranks")  # the contract kept: no error
    assert pm.create("objective", "ranks", weights={"x": 1.0}).weights == {"x": 1.0}
    for cls in DEFAULTS:
        check_objective_factory(cls)


def test_an_objective_that_ignores_its_weights_fails_the_contract():
    class Ignoring(RankObjective):  # takes and keeps its weights, but weighs the rewards equally
        def advantages(self, rewards, group_ids):
            return RankObjective().advantages(rewards, group_ids)

    class Contract(ObjectiveContract):
        def make_objective(self):
            return Ignoring()

    with pytest.raises(AssertionError, match="ignore the reward weights"):
        Contract().test_constructor_takes_reward_weights()
