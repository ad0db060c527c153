"""What a run writes as it goes: the best model (the run's result) and the checkpoint ``--resume`` reads.

``checkpoint/`` holds the fp32 trainable weights (``trainable.safetensors``), the optimizer, scheduler and
loop state (``state.pt``) and each process's torch RNG (``rng_<process>.pt``, for LoRA dropout). It is
written to a temporary directory and renamed into place, so a run killed mid-write still has the previous
checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import UsageError


def save_model(model, out: Path, full: bool, tokenizer) -> None:
    """The run's result: a peft adapter in bf16 (small), or for a full fine-tune the whole model in fp32.

    Full fine-tuning keeps fp32: its updates are often below bf16's resolution of the weight itself.
    """
    import torch
    from safetensors.torch import load_file, save_file

    if full:
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        return
    model.save_pretrained(out, safe_serialization=True)
    path = out / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})


def trainable_state(model) -> dict:
    return {
        name: p.detach().float().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad
    }


def save_checkpoint(directory: Path, model, optimizer, scheduler, state) -> None:
    """fp32 trainable weights + optimizer + scheduler + loop state (a dataclass), written then renamed."""
    import shutil

    import torch
    from safetensors.torch import save_file

    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": dataclasses.asdict(state),
        },
        tmp / "state.pt",
    )
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def save_rng(directory: Path, accelerator) -> None:
    """Each process's torch RNG, written after the main process has replaced the directory."""
    import torch

    accelerator.wait_for_everyone()
    torch.save(torch.get_rng_state(), directory / f"rng_{accelerator.process_index}.pt")


def load_checkpoint(directory: Path, model, optimizer, scheduler, accelerator) -> tuple[dict, object]:
    """Restore weights, optimizer and scheduler in place; returns (the saved loop state as a dict, RNG state or None)."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(directory / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in saved]
    if missing or set(saved) - set(params):
        example = (missing or sorted(set(saved) - set(params)))[0]
        raise UsageError(f"the checkpoint in {directory} does not match this model/config (e.g. {example})")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)
    blob = torch.load(directory / "state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    rng_path = directory / f"rng_{accelerator.process_index}.pt"
    rng = torch.load(rng_path, weights_only=False) if rng_path.is_file() else None
    return blob["state"], rng
