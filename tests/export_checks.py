"""Checks shared by the export tests of every backbone: ``mixgrpo export`` run as the CLI, the LoRA file it
writes in diffusers' format (the keys ``load_lora_weights`` reads, one per trained adapter matrix, the
alpha in its metadata), and the largest difference between two image batches."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from mixgrpo.commands.cli import main
from mixgrpo.plugins.backbones.diffusers_export import LORA_WEIGHTS


def export(capsys, run: Path, out: Path, *extra: str) -> str:
    """``mixgrpo export RUN --to OUT [extra]``, checked to succeed; what it printed."""
    capsys.readouterr()
    rc = main(["export", str(run), "--to", str(out), *extra])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


def exported_lora_keys(folder: Path, backbone, alpha: float) -> list[str]:
    """The keys of ``folder``'s LoRA file, checked: every key a ``transformer.`` adapter matrix, as many
    as ``backbone`` trains, and ``alpha`` in diffusers' adapter metadata."""
    with safe_open(str(Path(folder) / LORA_WEIGHTS), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                        for k in keys), keys[:4]
    trained = [n for n, _ in backbone.unwrapped().named_parameters() if "lora_" in n]
    assert len(keys) == len(trained), (len(keys), len(trained))
    assert json.loads(metadata["lora_adapter_metadata"])["transformer.lora_alpha"] == alpha
    return keys


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())
