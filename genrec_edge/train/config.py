"""Every training option in one dataclass, and how a run's options are resolved.

Precedence: :class:`TrainConfig` defaults < a JSON config file < explicit options (the CLI's flags, which
have the fields' names). Unknown keys and values of the wrong type are refused with one clear line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..errors import NotFoundError, UsageError
from ..jsonlog import read_json_object
from ..models_hf import DEFAULT_BASE
from ..prompts import DEFAULT_HISTORY_LEN, DEFAULT_INSTRUCTION, check_instruction

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LOSSES = ("plain", "trie")


@dataclass
class TrainConfig:
    """Every training option; the CLI's flags and the ``--config`` JSON keys have these names."""

    base: str = DEFAULT_BASE
    history_len: int = DEFAULT_HISTORY_LEN
    # The prompt's first line, before the titles: say what the items are ("books", "songs"). It travels with the
    # adapter into the GGUF (genrec.prompt_template), so serving uses the same words.
    instruction: str = DEFAULT_INSTRUCTION
    epochs: int = 1
    lr: float = 5e-4
    batch_size: int = 16
    max_batch_tokens: int = 16384  # cap on padded tokens per micro-batch (0 = none): bounds GPU memory
    grad_accum: int = 1
    max_steps: int = 0  # optimizer steps; 0 = run all epochs
    warmup: int = 10  # optimizer steps of linear warm-up, then cosine decay to 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # "plain": softmax over the whole vocabulary at every title token; "trie": only over the tokens the
    # catalog trie allows after the title's prefix (what the constrained search ranks; loss.py)
    loss: str = "plain"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    full: bool = False
    valid_every: int = 0  # validate every N optimizer steps and at the end; 0 = at the end of each epoch
    valid_users: int = 200  # seeded sample of validation users; 0 = all
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = at each validation
    beam: int = 10
    eval_batch_users: int = 32
    seed: int = 0
    bf16: bool | None = None  # None = bf16 autocast where the GPU supports it, fp32 on CPU
    max_train_users: int = 0  # seeded sample of users to train on; 0 = all

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data


def resolve_config(config_file: str | Path | None = None, **overrides) -> TrainConfig:
    """Dataclass defaults < the JSON ``config_file`` < ``overrides`` (None = not given); unknown keys refused."""
    values: dict = {}
    if config_file is not None:
        values.update(_read_config_file(Path(config_file)))
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UsageError(f"unknown training option(s): {', '.join(unknown)}")
    if isinstance(values.get("target_modules"), str):
        values["target_modules"] = [m.strip() for m in values["target_modules"].split(",") if m.strip()]
    if "target_modules" in values:
        values["target_modules"] = tuple(values["target_modules"])
    for name, value in values.items():
        expected = known[name].type
        if expected in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UsageError(f"option {name} must be a number, got {value!r}")
        if expected == "int" and isinstance(value, float):
            if value != int(value):
                raise UsageError(f"option {name} must be an integer, got {value!r}")
            values[name] = int(value)
        if expected == "str" and not isinstance(value, str):
            raise UsageError(f"option {name} must be a string, got {value!r}")
    config = TrainConfig(**values)
    check_config(config)
    return config


def _read_config_file(path: Path) -> dict:
    if path.is_dir():
        raise UsageError(f"--config {path} is a folder: give the JSON file of options")
    if not path.is_file():
        raise NotFoundError(f"no config file {path}")
    return read_json_object(path, UsageError, "config file")


def check_config(c: TrainConfig) -> None:
    """Refuse values no run could use, with the option's name."""
    positive = ("history_len", "epochs", "batch_size", "grad_accum", "lora_r", "beam", "eval_batch_users")
    for name in positive:
        if getattr(c, name) < 1:
            raise UsageError(f"{name} must be at least 1, got {getattr(c, name)}")
    non_negative = (
        "max_batch_tokens",
        "max_steps",
        "warmup",
        "valid_every",
        "valid_users",
        "checkpoint_every",
        "max_train_users",
    )
    for name in non_negative:
        if getattr(c, name) < 0:
            raise UsageError(f"{name} must be >= 0, got {getattr(c, name)}")
    if not c.lr > 0:
        raise UsageError(f"lr must be > 0, got {c.lr}")
    if not 0 <= c.lora_dropout < 1:
        raise UsageError(f"lora_dropout must be in [0, 1), got {c.lora_dropout}")
    check_instruction(c.instruction)
    if c.loss not in LOSSES:
        raise UsageError(f"loss must be one of {', '.join(LOSSES)}, got {c.loss!r}")
    if not c.full and not c.target_modules:
        raise UsageError("target_modules is empty (name the linear layers to adapt, or use --full)")
