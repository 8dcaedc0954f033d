"""Epoch checkpoints for ``train --resume``: decoder, optimiser and progress in one safetensors file, written
atomically (no pickle), so a killed run continues where its last epoch ended.

The random generators' states (the CPU's, and each CUDA device's once CUDA is in use) travel with it:
dropout and self-critical sampling draw from them, so a resumed run trains the epochs after the
checkpoint exactly as the uninterrupted run did. A checkpoint without them (written before they were
stored) resumes as before, with the generators as the restart left them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from batchcap.fileio import atomic_save_safetensors


# -- checkpoints (safetensors + JSON; never pickle) ----------------------------------------
def save_checkpoint(
    path: Path, decoder: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Trained weights (decoder, and encoder when fine-tuned), AdamW moments and the loop state, atomically."""
    tensors = {f"model.{k}": v for k, v in decoder.state_dict().items()}
    names = {id(p): n for n, p in decoder.named_parameters()}
    steps = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            s = optimizer.state.get(p)
            if not s:
                continue
            name = names[id(p)]
            tensors[f"adam.exp_avg.{name}"] = s["exp_avg"]
            tensors[f"adam.exp_avg_sq.{name}"] = s["exp_avg_sq"]
            steps[name] = float(s["step"])
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, device_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = device_state
    meta = {"state": json.dumps(state), "adam_steps": json.dumps(steps)}
    atomic_save_safetensors(tensors, path, meta)


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (on the CPU) and metadata :func:`save_checkpoint` wrote."""
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as fh:
        return tensors, fh.metadata()


def restore_checkpoint(
    tensors: dict[str, torch.Tensor], meta: dict[str, str], decoder: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Put a checkpoint's weights, AdamW moments and random generator states back; returns the loop state.

    The moments go through ``optimizer.load_state_dict``, which moves each to its
    parameter's device and dtype (a CUDA run resumes with CUDA moments) and keeps
    ``step`` where AdamW wants it.
    """
    decoder.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    steps = json.loads(meta["adam_steps"])
    names = {id(p): n for n, p in decoder.named_parameters()}
    moments: dict[int, dict[str, torch.Tensor]] = {}
    index = 0  # optimizer.state_dict() numbers the parameters group by group, in order
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            if name in steps:
                moments[index] = {
                    "step": torch.tensor(steps[name], dtype=torch.float32),
                    "exp_avg": tensors[f"adam.exp_avg.{name}"],
                    "exp_avg_sq": tensors[f"adam.exp_avg_sq.{name}"],
                }
            index += 1
    optimizer.load_state_dict({"state": moments, "param_groups": optimizer.state_dict()["param_groups"]})
    if "rng.cpu" in tensors:
        torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda_states and torch.cuda.is_available():
        for key in cuda_states[: torch.cuda.device_count()]:
            torch.cuda.set_rng_state(tensors[key], device=int(key.rsplit(".", 1)[1]))
    return json.loads(meta["state"])


def load_checkpoint(path: Path, decoder: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns the loop state."""
    return restore_checkpoint(*read_checkpoint(path), decoder, optimizer)
