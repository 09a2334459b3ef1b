"""Records tests/plugins/data/matching_flow_factory.json: runs Flow-Factory's own DiffusionNFT and AWM loss code
and TimeSampler.discrete (from a fetched checkout at REPO) on fixed float64 inputs. Not run by the tests.

Usage: python make_matching_reference.py OUT.json
"""
import ast
import json
import subprocess
import sys
import textwrap
import types
from typing import Literal

import torch

REPO = "/work/.mirror/X-GenGroup+Flow-Factory/repo"
commit = subprocess.check_output(["git", "-C", REPO, "rev-parse", "HEAD"], text=True).strip()


def show(path):
    return subprocess.check_output(["git", "-C", REPO, "show", f"HEAD:{path}"], text=True)



ns_src = show("src/flow_factory/utils/noise_schedule.py")
noise_schedule = types.ModuleType("noise_schedule")
exec(ns_src, noise_schedule.__dict__)

def block(src, start, end):
    """Lines of src from the one containing `start` to the one containing `end`, dedented."""
    lines = src.splitlines()
    i = next(k for k, line in enumerate(lines) if start in line)
    j = next(k for k in range(i, len(lines)) if end in lines[k])
    chunk = lines[i:j + 1]
    indent = min(len(line) - len(line.lstrip()) for line in chunk if line.strip())
    return "\n".join(line[indent:] for line in chunk)

gen = torch.Generator().manual_seed(20261206)
B, shape = 6, (2, 3, 3)
x0 = torch.randn(B, *shape, generator=gen, dtype=torch.float64)
noise = torch.randn(B, *shape, generator=gen, dtype=torch.float64)
v_old = torch.randn(B, *shape, generator=gen, dtype=torch.float64)
v_new = v_old + 0.05 * torch.randn(B, *shape, generator=gen, dtype=torch.float64)
sigma = torch.tensor([0.95, 0.8, 0.6, 0.45, 0.3, 0.12], dtype=torch.float64)
adv = torch.tensor([2.5, -1.2, 0.0, 7.0, -6.0, 0.4], dtype=torch.float64)
sb = sigma.view(-1, 1, 1, 1)
x_sigma = (1 - sb) * x0 + sb * noise
out = {}

nft = show("src/flow_factory/trainers/nft.py")
code = block(nft, "adv = batch['advantage']", "policy_loss = (ori_policy_loss")
for beta in (1.0, 0.5):
    self = types.SimpleNamespace(nft_beta=beta, training_args=types.SimpleNamespace(adv_clip_range=(-5.0, 5.0)))
    env = dict(torch=torch, self=self, batch={"advantage": adv}, new_v_pred=v_new, old_v_pred=v_old,
               noised_latents=x_sigma, sigma_broadcast=sb, clean_latents=x0)
    exec(code, env)
    out[f"nft_beta{beta}"] = {"per_sample": (env["ori_policy_loss"] * 5.0).tolist(),
                              "policy_loss": float(env["policy_loss"])}

awm = show("src/flow_factory/trainers/awm.py")
fn_src = next(ast.get_source_segment(awm, n) for n in ast.walk(ast.parse(awm))
              if isinstance(n, ast.FunctionDef) and n.name == "compute_weighted_log_prob")
env = dict(torch=torch, Literal=Literal, flow_match_sigma=noise_schedule.flow_match_sigma)
exec(textwrap.dedent(fn_src), env)
weighted = env["compute_weighted_log_prob"]
ppo = block(awm, "ratio = torch.exp(log_prob - old_log_prob)", "policy_loss = torch.mean(")
target = noise - x0
for weighting in ("Uniform", "t", "t**2", "huber", "ghuber"):
    for clip in (1e-4, 1.0):
        lp_new = weighted(v_new, target, sigma * 1000, weighting=weighting, ghuber_power=0.25).double()
        lp_old = weighted(v_old, target, sigma * 1000, weighting=weighting, ghuber_power=0.25).double()
        a = torch.clamp(adv, -1.0, 1.0)
        e = dict(torch=torch, log_prob=lp_new, old_log_prob=lp_old, adv=a, ratio_clip_range=(-clip, clip))
        exec(ppo, e)
        out[f"awm_{weighting}_clip{clip}"] = {
            "log_prob_new": lp_new.tolist(), "log_prob_old": lp_old.tolist(),
            "per_sample": torch.maximum(e["unclipped_loss"], e["clipped_loss"]).tolist(),
            "policy_loss": float(e["policy_loss"])}

# TimeSampler.discrete on a shifted 14-step grid (SD3's scheduler timesteps = 1000·σ)
t = torch.linspace(1, 0, 15, dtype=torch.float64)[:-1]
grid = 3 * t / (1 + 2 * t)
draws = {}
CASES = (("discrete_0.5_4", 0.5, 4, True, False), ("discrete_wo_init_0.9_6", 0.9, 6, False, False))
for name, rng, num, init, force in CASES:
    g = torch.Generator().manual_seed(7)
    ts = noise_schedule.TimeSampler.discrete(batch_size=3, num_train_timesteps=num, scheduler_timesteps=grid * 1000,
                                            timestep_range=rng, include_init=init, force_init=force, generator=g)
    draws[name] = (ts[:, 0] / 1000).tolist()
out["discrete"] = {"grid": grid.tolist(), "generator_seed": 7, "draws": draws}

json.dump({"source": {"repository": "X-GenGroup/Flow-Factory", "commit": commit,
                      "paths": ["src/flow_factory/trainers/nft.py (the loss block of NFTTrainer.optimize)",
                                "src/flow_factory/trainers/awm.py (compute_weighted_log_prob and the PPO block of "
                                "AWMTrainer.optimize)",
                                "src/flow_factory/utils/noise_schedule.py (TimeSampler.discrete)"],
                      "how": "their code executed on the inputs below in float64"},
           "inputs": {"x0": x0.tolist(), "noise": noise.tolist(), "v_old": v_old.tolist(), "v_new": v_new.tolist(),
                      "sigma": sigma.tolist(), "advantages": adv.tolist()},
           "outputs": out}, open(sys.argv[1], "w"), indent=1)
print("ok", commit)
