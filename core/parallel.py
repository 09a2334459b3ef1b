"""How the trainable network is spread over processes: DDP (replicas) or FSDP (sharded parameters).

* DDP, through accelerate: every process holds the whole network and its optimizer state; gradients
  are averaged. The default, and what LoRA uses (the adapters are small).
* FSDP (PyTorch's FSDP2, ``torch.distributed.fsdp.fully_shard``): each transformer block and the
  root are sharded over all processes, so a process holds 1/N of the fp32 master weights, their
  gradients and the AdamW state; a block's full weights are gathered in the compute dtype
  (``MixedPrecisionPolicy(param_dtype=<compute dtype>)``) only while it runs, and gradients are
  reduced in fp32. This is what full fine-tuning of a 12B FLUX needs: replicated, its fp32 weights
  and AdamW state alone exceed any single GPU.

mixgrpo shards the network itself rather than through ``accelerator.prepare``: accelerate ignores an
FSDP plugin on CPU (it runs DDP under FSDP's name there), while ``fully_shard`` runs the same code on
CPU (gloo) and on GPUs (NCCL), so the tests exercise the code path GPU runs take. Which one a run
uses is ``TrainConfig.parallelism``: ``"auto"`` picks FSDP when accelerate was launched with an FSDP
config (``experiments/accelerate/fsdp.yaml``), so no experiment file changes between the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

PARALLELISMS = ("auto", "ddp", "fsdp")


def resolve_parallelism(requested: str, accelerate_fsdp: bool) -> str:
    """``"ddp"`` or ``"fsdp"`` for a run: ``"auto"`` follows the accelerate launch config.

    ``"ddp"`` with one process is plain single-process training.
    """
    if requested not in PARALLELISMS:
        raise ValueError(f"TrainConfig.parallelism must be one of {', '.join(PARALLELISMS)}, got {requested!r}")
    if requested == "auto":
        return "fsdp" if accelerate_fsdp else "ddp"
    return requested


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The blocks FSDP shards one by one: every element of an ``nn.ModuleList`` in ``module`` that is
    not itself inside such a block (FLUX's double and single transformer blocks, SD3's joint blocks).
    The root is sharded last and holds what remains (embedders, norms, the output projection)."""
    units: list[nn.Module] = []
    inside: set[int] = set()
    for sub in module.modules():
        if id(sub) in inside or not isinstance(sub, nn.ModuleList):
            continue
        for block in sub:
            units.append(block)
            inside.update(id(m) for m in block.modules())
    return units


def shard(module: nn.Module, compute_dtype: torch.dtype, device: torch.device,
          reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``module`` in place over all processes with FSDP2; returns it.

    Parameters stay fp32 (the master weights); each unit is gathered in ``compute_dtype`` for its
    forward and backward, and gradients are reduce-scattered in fp32.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("FSDP needs a process group: launch with `accelerate launch` or torchrun")
    if any(p.dtype != torch.float32 for p in module.parameters() if p.requires_grad):
        raise ValueError("FSDP shards fp32 master weights; the trainable parameters are not all fp32")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    param_dtype = None if compute_dtype == torch.float32 else compute_dtype
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for unit in shard_units(module):
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return module


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter; every process must call it."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def clip_grad_norm(parameters: Sequence[torch.Tensor], max_norm: float) -> float:
    """Clip the global gradient norm of sharded parameters to ``max_norm``; returns the norm before
    clipping (every process gets the same value)."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return float(full_tensor(norm))

