"""Records tests/plugins/data/tempflow_reference.json: runs TempFlow-GRPO's own SDE step
(``sde_step_with_logprob`` of flow_grpo/diffusers_patch/sd3_sde_with_logprob.py, the one its training
scripts call to recompute log-probs) with diffusers' FlowMatchEulerDiscreteScheduler on fixed float64
inputs: every step of a T = 10 grid (shift 3), a rollout's next latents drawn by the step itself, then
the log-probs of those next latents under a second velocity (the "current" policy). Not run by the tests.

The reference repository's stored snapshot holds no code, so its file is read from the code index at
the commit below and saved outside this repository (REF_FILE). Its noise level is hard-coded: 0.7.

Usage: python make_tempflow_reference.py REF_FILE OUT.json
"""
import importlib.util
import json
import sys

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

COMMIT = "e66824eca96d2b41cfd70fd1879650ae1ea5892e"
ref_file, out = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("tempflow_sde", ref_file)
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)

T = 10
scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / T, T))
scheduler.sigmas = scheduler.sigmas.double()
gen = torch.Generator().manual_seed(20261207)
B, shape = 3, (4, 2, 2)
steps = []
for i, t in enumerate(scheduler.timesteps):
    x = torch.randn(B, *shape, generator=gen, dtype=torch.float64)
    v_old = torch.randn(B, *shape, generator=gen, dtype=torch.float64)
    v_new = v_old + 0.05 * torch.randn(B, *shape, generator=gen, dtype=torch.float64)
    ts = t.repeat(B)
    x_next, logp_old, mean_old, std = ref.sde_step_with_logprob(scheduler, v_old, ts, x, generator=gen)
    _, logp_new, mean_new, std_new = ref.sde_step_with_logprob(scheduler, v_new, ts, x, prev_sample=x_next)
    steps.append({"index": i, "x": x.tolist(), "v_old": v_old.tolist(), "v_new": v_new.tolist(),
                  "x_next": x_next.tolist(), "log_prob_old": logp_old.tolist(), "log_prob_new": logp_new.tolist(),
                  "mean_old": mean_old.tolist(), "mean_new": mean_new.tolist(),
                  "std": std.flatten().tolist()})
json.dump({"source": {"repo": "Shredded-Pork/TempFlow-GRPO", "commit": COMMIT,
                      "file": "flow_grpo/diffusers_patch/sd3_sde_with_logprob.py",
                      "function": "sde_step_with_logprob (noise level 0.7 hard-coded)",
                      "scheduler": "diffusers FlowMatchEulerDiscreteScheduler(shift=3.0), "
                                   "set_timesteps(sigmas=linspace(1, 1/10, 10)), float64"},
           "sigmas": scheduler.sigmas.tolist(), "steps": steps}, open(out, "w"))
print("wrote", out, len(steps), "steps")
