"""The training loop: optimizer steps epoch by epoch, validation, the best model kept, checkpoints.

The loop's mutable state is one :class:`LoopState` (what a checkpoint saves and ``--resume`` restores);
what it works with, set up once by ``trainer._set_up``, is one :class:`Run`. The same code runs under
``accelerate launch`` (each process trains on its share of every epoch's batches, gradients synchronised
on the last micro-batch of each accumulation group); only the main process validates and writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import runs
from .checkpoints import save_checkpoint, save_model, save_rng
from .config import TrainConfig
from .data import BucketBatchSampler
from .loss import batch_loss
from .search import Validator
from .trie_view import TrieTensors

THROUGHPUT_PROBE_STEPS = 3  # steps before the up-front tokens/s + ETA line (the first is warm-up)
FIT_AFTER_STEPS = 3  # timed steps before a time-limited run first fits its schedule to the time left


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint and restored by ``--resume``."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro: int = 0  # micro-batches of the current epoch done
    history: list[dict] = field(default_factory=list)  # one row per validation
    best: dict | None = None  # the best validation row (HR@10, then NDCG@10)
    tokens: int = 0  # non-padding tokens trained on, all processes
    train_seconds: float = 0.0
    first_loss: float | None = None
    last_loss: float | None = None
    fitted_steps: int | None = None  # the total after shortening the schedule to a time limit

    @classmethod
    def from_dict(cls, data: dict) -> LoopState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class TrainResult:
    out: Path
    steps: int
    trainable_params: int
    tokens_per_s: float
    best: dict | None
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    main_process: bool = True  # False in the other processes of a multi-process launch


@dataclass
class Run:
    """Everything one run's loop works with, set up once (``trainer._set_up``)."""

    config: TrainConfig
    out: Path
    accelerator: object
    model: object  # as prepared by accelerate (DDP-wrapped in a multi-process launch)
    optimizer: object
    scheduler: object
    loader: object
    sampler: BucketBatchSampler
    micro_counts: list[int]  # micro-batches per epoch (per process): the token cap makes it vary
    total_steps: int
    tokenizer: object
    trie_view: TrieTensors | None  # for the trie loss
    validator: Validator | None  # main process only
    provenance: dict
    console: object
    autocast: object
    trainable_params: int
    deadline: float | None = None  # time.monotonic() by which a time-limited run must have ended
    valid_seconds_hint: float = 0.0  # expected seconds per validation until one has been measured

    def set_total_steps(self, total: int) -> None:
        """End training (and the cosine schedule, which decays to 0 there) at ``total`` optimizer steps."""
        self.total_steps = total
        self.scheduler.lr_lambdas = [lr_factor(self.config.warmup, total)]

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)


def lr_factor(warmup: int, total: int):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at step ``total`` (a ``LambdaLR`` factor)."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def fit_to_deadline(
    run: Run, state: LoopState, seconds_per_step: float, valid_seconds: float, seconds_left: float
) -> None:
    """Shorten the run so its remaining steps and validations end within ``seconds_left``.

    A time-limited run (a trial's share of a GPU budget) then still ends its cosine schedule at a small
    learning rate and validates at the end, instead of being cut mid-schedule. Only ever shortens.
    """
    config = run.config
    steps_left = run.total_steps - state.step
    if steps_left <= 0 or seconds_per_step <= 0:
        return
    if config.valid_every:
        validations = -(-steps_left // config.valid_every)
    else:
        validations = max(1, config.epochs - state.epoch)
    fits = int((seconds_left - validations * valid_seconds) / seconds_per_step)
    if fits < steps_left:
        state.fitted_steps = state.step + max(1, fits)
        run.set_total_steps(state.fitted_steps)
        run.console.print(
            f"time limit: {steps_left} steps and {validations} validations do not fit in {seconds_left:.0f} s; "
            f"ending the schedule at step {state.fitted_steps}"
        )


def _fit(run: Run, state: LoopState, seconds_per_step: float) -> None:
    if run.validator is None:
        valid_seconds = 0.0
    else:
        valid_seconds = state.history[-1]["seconds"] if state.history else run.valid_seconds_hint
    fit_to_deadline(run, state, seconds_per_step, valid_seconds, run.deadline - time.monotonic())


def write_run_json(run: Run, state: LoopState, status: str, **extra) -> None:
    data = dict(run.provenance, **extra)
    data.update(
        status=status,
        total_steps=run.total_steps,
        steps=state.step,
        best=state.best,
        history=state.history,
        first_loss=state.first_loss,
        last_loss=state.last_loss,
    )
    runs.write_run_config(run.out, data)
    runs.write_model_card(run.out, data)


def _validate(run: Run, state: LoopState, losses: list[float]) -> None:
    """Main process: validate, log the row, keep the model if it is the best so far."""
    if run.validator is not None:
        metrics = run.validator(run.unwrapped, run.autocast)
        row = {
            "step": state.step,
            "epoch": state.epoch,
            "loss": sum(losses) / len(losses) if losses else None,
            **metrics,
        }
        losses.clear()
        state.history.append(row)
        runs.append_train_log(run.out, row)
        if state.best is None or (row["hr@10"], row["ndcg@10"]) > (
            state.best["hr@10"],
            state.best["ndcg@10"],
        ):
            state.best = row
            save_model(run.unwrapped, run.out, run.config.full, run.tokenizer)
            write_run_json(run, state, "running")  # the best so far, and our model card over peft's blank one
        loss = "None" if row["loss"] is None else round(row["loss"], 4)
        run.console.print(
            f"step {row['step']}: loss {loss}, valid HR@10 {row['hr@10']:.4f}, "
            f"NDCG@10 {row['ndcg@10']:.4f} ({row['seconds']:.1f} s)"
        )


@dataclass
class _Probe:
    """Tokens/s and an ETA printed once, after the first few steps, so a user knows before waiting."""

    steps: int | None = None  # None until the first (warm-up) step of this process has passed
    tokens: int = 0
    seconds: float = 0.0
    printed: bool = False

    def update(self, run: Run, state: LoopState, tokens: int, seconds: float) -> None:
        if self.printed:
            return
        if self.steps is None:
            self.steps = 0
            return
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds
        if self.steps >= THROUGHPUT_PROBE_STEPS - 1 or state.step >= run.total_steps:
            self.printed = True
            per_step = self.seconds / self.steps
            left = run.total_steps - state.step
            run.console.print(
                f"throughput: {self.tokens / max(self.seconds, 1e-9):,.0f} tokens/s, {per_step:.2f} s/step; "
                f"ETA {_format_seconds(left * per_step)} for the remaining {left} steps (plus validation)"
            )


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def train_epochs(run: Run, state: LoopState, pending_rng, stop_after: int, on_step) -> bool:
    """Optimizer steps until the end, ``stop_after`` steps or ``run.deadline``; True if stopped early.

    A run with a deadline fits its schedule to the time left (:func:`fit_to_deadline`) after its first
    timed steps and after every validation, and stops (validated and checkpointed) if it still runs out.
    """
    import torch

    config, accelerator, model, deadline = run.config, run.accelerator, run.model, run.deadline
    losses_since_valid: list[float] = []
    probe = _Probe()
    timed_steps, timed_seconds = 0, 0.0  # every step of this process but its first (warm-up)
    model.train()
    step_started = time.perf_counter()
    while state.step < run.total_steps and state.epoch < config.epochs:
        run.sampler.epoch = state.epoch
        micro_per_epoch = run.micro_counts[state.epoch]
        skip, micro = state.micro, 0
        group_losses: list[float] = []
        group_tokens = 0
        for batch in run.loader:
            if micro < skip:  # resuming mid-epoch: these batches were trained on before the checkpoint
                micro += 1
                continue
            if pending_rng is not None:  # after the loader drew its seeds, as it had before the checkpoint
                torch.set_rng_state(pending_rng)
                pending_rng = None
            group_start = micro - micro % config.grad_accum
            group_size = min(config.grad_accum, micro_per_epoch - group_start)
            last_of_group = micro + 1 == group_start + group_size
            with contextlib.nullcontext() if last_of_group else accelerator.no_sync(model):
                loss = batch_loss(model, batch, config.loss, run.trie_view)
                accelerator.backward(loss / group_size)
            group_losses.append(loss.item())
            group_tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
            micro += 1
            if not last_of_group:
                continue
            if config.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.micro = micro
            step_loss = sum(group_losses) / len(group_losses)
            group_losses = []
            losses_since_valid.append(step_loss)
            state.first_loss = step_loss if state.first_loss is None else state.first_loss
            state.last_loss = step_loss
            now = time.perf_counter()
            if probe.steps is not None:
                timed_steps, timed_seconds = timed_steps + 1, timed_seconds + now - step_started
            state.train_seconds += now - step_started
            state.tokens += group_tokens
            probe.update(run, state, group_tokens, now - step_started)
            on_step(state, step_loss)
            group_tokens = 0

            end_of_epoch = micro == micro_per_epoch
            at_end = state.step >= run.total_steps
            out_of_time = deadline is not None and time.monotonic() >= deadline
            stopping = ((bool(stop_after) and state.step >= stop_after) or out_of_time) and not at_end
            if config.valid_every:
                due_valid = at_end or state.step % config.valid_every == 0
            else:
                due_valid = at_end or end_of_epoch
            due_valid = due_valid or out_of_time
            every = config.checkpoint_every
            due_checkpoint = due_valid or stopping or (every and state.step % every == 0)
            if end_of_epoch:
                state.epoch += 1
                state.micro = 0
            if due_checkpoint:
                if run.main:
                    if due_valid:
                        _validate(run, state, losses_since_valid)
                    if due_valid and deadline is not None and timed_steps and not (at_end or stopping):
                        _fit(run, state, timed_seconds / timed_steps)
                    checkpoint = run.out / runs.CHECKPOINT_DIR
                    save_checkpoint(checkpoint, run.unwrapped, run.optimizer, run.scheduler, state)
                save_rng(run.out / runs.CHECKPOINT_DIR, accelerator)
                accelerator.wait_for_everyone()
            if at_end or stopping:
                return stopping
            if deadline is not None and timed_steps == FIT_AFTER_STEPS and not due_valid:
                _fit(run, state, timed_seconds / timed_steps)
            step_started = time.perf_counter()
    return False
