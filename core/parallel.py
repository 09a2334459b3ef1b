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

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from accelerate import Accelerator

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



class Parallel:
    """The run's layout over processes, chosen once: ``kind`` is ``"ddp"`` (replicas through
    accelerate; one process is its special case) or ``"fsdp"`` (sharded with ``shard``). Everything
    the trainer does differently between the two goes through here."""

    def __init__(self, accelerator: Accelerator, requested: str = "auto") -> None:
        from accelerate.utils import DistributedType

        self.accelerator = accelerator
        self.kind = resolve_parallelism(requested, accelerator.distributed_type == DistributedType.FSDP)

    @property
    def sharded(self) -> bool:
        return self.kind == "fsdp"

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def shard(self, backbone: Any) -> None:
        """Before the optimizer exists: shard the backbone's network in place under FSDP (full
        fine-tuning only; a LoRA run is refused with the fix)."""
        if not self.sharded:
            return
        if backbone.lora_rank > 0:
            raise ValueError("FSDP is for full fine-tuning; LoRA runs train with DDP (the adapters are small): "
                             "launch with experiments/accelerate/ddp.yaml or set TrainConfig.parallelism = 'ddp'")
        backbone.module = shard(backbone.module, backbone.dtype, backbone.device)

    def prepare(self, backbone: Any, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """After the optimizer exists: under DDP, accelerate wraps the network and the optimizer."""
        if self.sharded:
            return optimizer
        backbone.module, optimizer = self.accelerator.prepare(backbone.module, optimizer)
        return optimizer

    def no_sync(self, module: nn.Module) -> contextlib.AbstractContextManager:
        """Accumulate gradients locally (DDP); FSDP reduce-scatters every micro-batch, which keeps
        the gradients sharded."""
        return contextlib.nullcontext() if self.sharded else self.accelerator.no_sync(module)

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """The global gradient norm before clipping (the same on every process)."""
        if self.sharded:
            return clip_grad_norm(params, max_norm)
        return float(self.accelerator.clip_grad_norm_(params, max_norm))

    def all_processes(self, flag: bool) -> bool:
        """True when ``flag`` holds on every process (so all take the same decision; a collective)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return flag
        failed = acc.reduce(torch.tensor([0.0 if flag else 1.0], device=acc.device), reduction="sum")
        return float(failed) == 0.0

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's rows of ``tensor`` (process order), on the CPU."""
        acc = self.accelerator
        return acc.gather(tensor.to(acc.device)).cpu()


def make_accelerator(out: Any, trackers: Sequence[str] = ()) -> Accelerator:
    """One process on CPU or GPU by default (``accelerate launch`` for more), logging to ``trackers``
    (names as ``mixgrpo.core.trackers.TRACKERS`` spells them; checked by the preflight): TensorBoard
    writes under ``out/tensorboard``."""
    from pathlib import Path

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    project = ProjectConfiguration(project_dir=str(out), logging_dir=str(Path(out) / "tensorboard"))
    return Accelerator(cpu=not torch.cuda.is_available(), log_with=list(trackers) or None, project_config=project)


def peak_mem_gb() -> float:
    """Peak memory of this process in GiB: allocated on the GPU, else the resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except ImportError:  # pragma: no cover
        return float("nan")
