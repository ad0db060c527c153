"""``genrec-edge train`` and ``genrec-edge merge``: thin layers over genrec_edge.train / genrec_edge.merge."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from ..errors import UsageError
from ..prompts import DEFAULT_INSTRUCTION
from . import DB_HELP


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("merge")(merge)


def train(
    out: Path = typer.Option(
        ..., "--out", help="Run directory to create (a peft adapter dir + genrec_run.json)."
    ),
    db: Path | None = typer.Option(None, "--db", help=DB_HELP.removesuffix(".") + "; with --resume, the run's own."),
    config_file: Path | None = typer.Option(
        None, "--config", help="JSON file of options; flags override it."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --out from its last checkpoint, as it began: its options, base, "
        "database and histories (any other is refused)."
    ),
    stop_after: int = typer.Option(
        0, "--stop-after", help="Stop after N optimizer steps (checkpointed; --resume continues)."
    ),
    base: str | None = typer.Option(
        None, "--base", help="smollm2-135m (default), a HF LLaMA directory or a .gguf file."
    ),
    history_len: int | None = typer.Option(None, "--history-len", help="Titles of history per prompt [20]."),
    instruction: str | None = typer.Option(
        None, "--instruction",
        help=f"The prompt's first line: say what your items are \\[{DEFAULT_INSTRUCTION}]; it goes into the model, "
        "so serving uses it too.",
    ),
    epochs: int | None = typer.Option(None, "--epochs", help="Passes over the training windows [1]."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate [5e-4]."),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Windows per micro-batch (per process) [16]."
    ),
    max_batch_tokens: int | None = typer.Option(
        None,
        "--max-batch-tokens",
        help="Cap on padded tokens per micro-batch, bounds memory (0 = none) [16384].",
    ),
    grad_accum: int | None = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step [1]."),
    max_steps: int | None = typer.Option(
        None, "--max-steps", help="Stop after this many optimizer steps (0 = all epochs)."
    ),
    warmup: int | None = typer.Option(
        None, "--warmup", help="Linear warm-up steps before cosine decay [10]."
    ),
    weight_decay: float | None = typer.Option(None, "--weight-decay", help="AdamW weight decay [0]."),
    loss: str | None = typer.Option(
        None,
        "--loss",
        help="plain (softmax over the whole vocabulary) or trie (over the tokens the catalog trie allows) \\[plain].",
    ),
    lora_r: int | None = typer.Option(None, "--lora-r", help="LoRA rank [16]."),
    lora_alpha: int | None = typer.Option(None, "--lora-alpha", help="LoRA alpha [32]."),
    lora_dropout: float | None = typer.Option(None, "--lora-dropout", help="LoRA dropout [0.05]."),
    target_modules: str | None = typer.Option(
        None, "--target-modules", help="Comma-separated linear layers to adapt \\[q,k,v,o,gate,up,down _proj]."
    ),
    full: bool | None = typer.Option(None, "--full/--lora", help="Full fine-tuning instead of LoRA."),
    valid_every: int | None = typer.Option(
        None, "--valid-every", help="Validate every N steps (0 = each epoch end)."
    ),
    valid_users: int | None = typer.Option(
        None, "--valid-users", help="Seeded sample of validation users (0 = all) [200]."
    ),
    checkpoint_every: int | None = typer.Option(
        None, "--checkpoint-every", help="Checkpoint every N steps (0 = at validations)."
    ),
    beam: int | None = typer.Option(None, "--beam", help="Beam width of the validation search [10]."),
    eval_batch_users: int | None = typer.Option(
        None, "--eval-batch-users", help="Validation users per batch [32]."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed for init, data order and samples [0]."),
    bf16: bool | None = typer.Option(
        None, "--bf16/--no-bf16", help="bf16 autocast (default: on GPUs that support it)."
    ),
    max_train_users: int | None = typer.Option(
        None, "--max-train-users", help="Seeded sample of users to train on (0 = all)."
    ),
) -> None:
    """Fine-tune a LLaMA base on the database's histories (LoRA by default), keeping the best adapter by valid HR@10.

    Prints tokens/s and an ETA after the first steps. `--loss trie` trains what the constrained search ranks: at
    each title token the softmax runs only over the tokens the catalog trie allows there. Runs unchanged under
    `accelerate launch -m genrec_edge.train` (on CPUs: `accelerate launch --multi_gpu --num_processes 2
    -m genrec_edge.train ...`; accelerate's `--cpu` launcher starts a single process unless MPI is installed).

    Example: genrec-edge train --out runs/ml-small --epochs 2 --valid-users 200 --loss trie
    """
    from ..train import train as run_training

    if stop_after < 0:
        raise UsageError("--stop-after must be >= 0")
    result = run_training(
        db,  # None: the default database, or on --resume the run's own
        out,
        config_file=config_file,
        resume=resume,
        stop_after=stop_after,
        command_line=shlex.join(sys.argv),
        base=base,
        history_len=history_len,
        instruction=instruction,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
        grad_accum=grad_accum,
        max_steps=max_steps,
        warmup=warmup,
        weight_decay=weight_decay,
        loss=loss,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        full=full,
        valid_every=valid_every,
        valid_users=valid_users,
        checkpoint_every=checkpoint_every,
        beam=beam,
        eval_batch_users=eval_batch_users,
        seed=seed,
        bf16=bf16,
        max_train_users=max_train_users,
    )
    if not result.main_process:
        return
    best = result.best
    summary = f"{result.out}: {result.steps} steps, {result.tokens_per_s:,.0f} tokens/s"
    if best:
        summary += f", best step {best['step']} valid HR@10 {best['hr@10']:.4f} NDCG@10 {best['ndcg@10']:.4f}"
    if result.stopped_early:
        summary += " (stopped; continue with --resume)"
    typer.echo(summary)


def merge(
    run_dir: Path = typer.Argument(..., help="A `genrec-edge train` run directory."),
    out: Path = typer.Option(
        ..., "--out", help="Directory to write the merged HF model into (new, or an empty folder)."
    ),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16."),
) -> None:
    """Merge a run's adapter into its base: a plain HF LLaMA directory plus genrec_provenance.json.

    Example: genrec-edge merge runs/ml-small --out merged/ml-small --dtype float16
    """
    from ..merge import merge as run_merge

    path = run_merge(run_dir, out, dtype=dtype)
    typer.echo(str(path))
