"""Train: set a run up, then train it; ``train`` reads a history database, ``train_on_sequences`` item sequences.

The run directory (``genrec_edge.runs``) is a plain peft adapter directory (``adapter_model.safetensors``
in bf16: the best adapter by validation HR@10, then NDCG@10) plus ``genrec_run.json`` (the resolved
config and provenance), ``train_log.jsonl`` (one row per validation) and ``checkpoint/`` (what
``--resume`` continues from). A full fine-tune holds a whole HF model instead of the adapter.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from .. import runs
from ..catalog import Catalog
from ..errors import GenrecError, NotFoundError, UsageError
from ..prompts import PromptTemplate
from .checkpoints import load_checkpoint, save_model
from .config import TrainConfig, check_config, resolve_config
from .data import BucketBatchSampler, PadCollator, build_windows, sample_users, split_for_training
from .loop import LoopState, Run, TrainResult, lr_factor, train_epochs, write_run_json
from .search import Validator
from .trie_view import TrieTensors, build_catalog_trie


def _set_up(
    sequences, catalog: Catalog, out: Path, config: TrainConfig, dataset, command_line, console, extra_provenance
) -> Run:
    """Accelerator, tokenizer, data, model (+ LoRA), optimizer, schedule, validator and provenance."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from .. import models_hf

    use_bf16 = config.bf16
    if use_bf16 is None:
        use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    # cpu=True on a machine without an accelerator is what makes accelerate treat a multi-process launch
    # (torchrun, `accelerate launch --multi_gpu`) as MULTI_CPU with gloo instead of N lone processes.
    no_accelerator = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    accelerator = Accelerator(mixed_precision="bf16" if use_bf16 else "no", cpu=no_accelerator)
    main = accelerator.is_main_process
    if not main:
        console.quiet = True
    set_seed(config.seed)

    spec = models_hf.resolve_base(config.base)
    tokenizer = models_hf.load_tokenizer(spec)
    tokenize = models_hf.hf_tokenize(tokenizer)
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    template = PromptTemplate(instruction=config.instruction, history_len=config.history_len)

    train_titles, valid_examples = split_for_training(sequences, catalog)
    users = sample_users(train_titles, config.max_train_users, config.seed)
    if config.valid_users and config.valid_users < len(valid_examples):
        valid_examples = random.Random(config.seed + 1).sample(valid_examples, config.valid_users)
    need_validator = main and bool(valid_examples)
    trie = None
    if config.loss == "trie" or need_validator:
        trie = build_catalog_trie(catalog.unique_titles, tokenize, eos_id)
    windows = build_windows(
        (train_titles[u] for u in users), tokenize, eos_id, template, trie if config.loss == "trie" else None
    )
    if not windows:
        raise UsageError("no training data: every user needs at least 3 interactions (2 are held out)")

    with console.status("loading the base model"):
        model = models_hf.load_model(spec)
    if not config.full:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, lora)
        except ValueError as exc:
            raise UsageError(f"cannot apply LoRA to {spec.name}: {exc}") from None
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_params = sum(p.numel() for p in trainable)

    sampler = BucketBatchSampler(
        [len(w.input_ids) for w in windows], config.batch_size, config.seed, config.max_batch_tokens
    )
    loader = torch.utils.data.DataLoader(
        windows,
        batch_sampler=sampler,
        collate_fn=PadCollator(pad_id),
        generator=torch.Generator().manual_seed(config.seed),
    )
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    micro_counts = []
    for epoch in range(config.epochs):
        sampler.epoch = epoch
        micro_counts.append(len(loader))
    total_steps = sum(math.ceil(n / config.grad_accum) for n in micro_counts)
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config.warmup, total_steps))

    validator = None
    if need_validator:
        validator = Validator(
            valid_examples,
            catalog,
            tokenize,
            eos_id,
            pad_id,
            template,
            config.beam,
            config.eval_batch_users,
            trie,
        )
    provenance = {
        "config": config.to_dict(),
        "base_model": spec.to_dict(),
        "base_model_sha256": models_hf.base_sha256(spec) if main else None,
        "catalog_sha256": catalog.sha256,
        **extra_provenance,  # the training data's sha256, the database it came from
        "dataset": dataset,
        "prompt_template": template.to_dict(),
        "history_len": template.history_len,
        "versions": runs.package_versions(),
        "trainable_params": trainable_params,
        "train_users": len(users),
        "train_windows": len(windows),
        "train_tokens_per_epoch": sum(len(w.input_ids) for w in windows),
        "planned_steps": total_steps,  # before a time limit shortened the schedule (total_steps, below)
        "valid_users": len(valid_examples),
        "bf16": bool(use_bf16),
        "num_processes": accelerator.num_processes,
        "command_line": command_line,
    }
    return Run(
        config=config,
        out=out,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        sampler=sampler,
        micro_counts=micro_counts,
        total_steps=total_steps,
        tokenizer=tokenizer,
        trie_view=TrieTensors(trie, accelerator.device) if config.loss == "trie" else None,
        validator=validator,
        provenance=provenance,
        console=console,
        autocast=accelerator.autocast if use_bf16 else None,
        trainable_params=trainable_params,
    )


def train_on_sequences(
    sequences: Iterable[tuple[int, Sequence[int]]],
    catalog: Catalog,
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    dataset: str | None = None,
    resume: bool = False,
    stop_after: int = 0,
    time_limit_s: float = 0.0,
    valid_seconds_hint: float = 0.0,
    command_line: str | None = None,
    quiet: bool = False,
    db_path: str | Path | None = None,
) -> TrainResult:
    """Train on ``(user, item ids oldest first)`` sequences; write the run directory ``out``.

    ``stop_after`` > 0 stops after that many optimizer steps with a checkpoint, as an interruption
    would (a rented GPU's time limit): ``resume=True`` later continues to exactly the same result.
    ``time_limit_s`` > 0 (single-process runs only: processes would disagree on the clock) ends the run
    within that many seconds of the call: once the first steps are timed, the schedule is shortened if
    the remaining steps and validations (``valid_seconds_hint`` each until one is measured) would not
    fit, so the cosine decay still completes; a run that runs out of time anyway stops, validated.
    A resumed run must have the options, base weights, catalog and sequences it began with.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    started = time.monotonic()
    config = config or TrainConfig()
    check_config(config)
    out = Path(out)
    console = Console(stderr=True, quiet=quiet)
    checkpoint = out / runs.CHECKPOINT_DIR
    sequences = [(user, list(items)) for user, items in sequences]
    data_sha256 = hashlib.sha256(json.dumps(sequences, separators=(",", ":")).encode()).hexdigest()
    if resume:
        if not (checkpoint / "state.pt").is_file():
            hint = (": it stopped before its first checkpoint; run it again without --resume to start over"
                    if _stopped_empty(out) else "")
            raise NotFoundError(f"nothing to resume in {out} (no {runs.CHECKPOINT_DIR}/state.pt){hint}")
        _check_resume(runs.read_run_config(out), config, catalog, data_sha256)
    elif _stopped_empty(out):  # nothing in it to keep: start over
        for name in (runs.RUN_CONFIG, runs.MODEL_CARD, runs.TRAIN_LOG):
            (out / name).unlink(missing_ok=True)
    elif (out / runs.RUN_CONFIG).exists() or checkpoint.exists():
        raise UsageError(f"{out} already holds a run: choose another --out, or pass --resume to continue it")

    extra = {"train_data_sha256": data_sha256}
    if db_path is not None:
        extra["db"] = str(Path(db_path).resolve())
    run = _set_up(sequences, catalog, out, config, dataset, command_line, console, extra)
    if time_limit_s:
        if run.accelerator.num_processes > 1:
            raise UsageError(
                "a time limit needs a single-process run (processes would disagree on the clock)"
            )
        run.deadline = started + time_limit_s
        run.valid_seconds_hint = valid_seconds_hint
    state, pending_rng = LoopState(), None
    if resume:
        saved, pending_rng = load_checkpoint(
            checkpoint, run.unwrapped, run.optimizer, run.scheduler, run.accelerator
        )
        state = LoopState.from_dict(saved)
        if state.fitted_steps:  # the schedule was shortened to fit a time limit before the interruption
            run.set_total_steps(state.fitted_steps)
    if run.main:
        out.mkdir(parents=True, exist_ok=True)
        write_run_json(run, state, status="running")
        what = "full fine-tuning" if config.full else f"LoRA r={config.lora_r}"
        console.print(
            f"training {run.provenance['base_model']['name']}: {what}, {config.loss} loss, "
            f"{run.trainable_params:,} trainable params; {run.provenance['train_windows']:,} windows from "
            f"{run.provenance['train_users']:,} users, {run.total_steps} optimizer steps; validating on "
            f"{run.provenance['valid_users']} users"
        )

    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not run.main or quiet,
    )

    with progress:
        task = progress.add_task("train", total=run.total_steps, completed=state.step, loss="-", tps="-")

        def on_step(state: LoopState, loss: float) -> None:
            tps = state.tokens / max(state.train_seconds, 1e-9)
            progress.update(task, completed=state.step, loss=f"{loss:.4f}", tps=f"{tps:,.0f}")

        try:
            stopped_early = train_epochs(run, state, pending_rng, stop_after, on_step)
        except BaseException as exc:  # the record says so: not "running" forever (a Ctrl-C, a crash)
            if run.main:
                write_run_json(run, state, "failed" if isinstance(exc, Exception) else "interrupted")
            raise

    tokens_per_s = state.tokens / max(state.train_seconds, 1e-9)
    if run.main:
        if (
            run.validator is None and not stopped_early
        ):  # nothing to select on: the final weights are the result
            save_model(run.unwrapped, out, config.full, run.tokenizer)
        write_run_json(run, state, "stopped" if stopped_early else "done", tokens_per_s=tokens_per_s)
        if state.best:
            console.print(
                f"best step {state.best['step']}: valid HR@10 {state.best['hr@10']:.4f}, "
                f"NDCG@10 {state.best['ndcg@10']:.4f}; {tokens_per_s:,.0f} tokens/s; run in {out}"
            )
    run.accelerator.wait_for_everyone()
    return TrainResult(
        out,
        state.step,
        run.trainable_params,
        tokens_per_s,
        state.best,
        state.history,
        stopped_early,
        run.main,
    )


def _stopped_empty(out: Path) -> bool:
    """A run directory that a Ctrl-C or a crash stopped before its first checkpoint: no weights, nothing to
    resume, nothing to keep."""
    if (out / runs.CHECKPOINT_DIR).exists() or not (out / runs.RUN_CONFIG).is_file():
        return False
    if any(out.glob("*.safetensors")) or any(out.glob("*.bin")):
        return False
    try:
        status = runs.read_run_config(out).get("status")
    except GenrecError:
        return False
    return status in ("interrupted", "failed")


def _check_resume(saved: dict, config: TrainConfig, catalog: Catalog, data_sha256: str) -> None:
    """``--resume`` continues a run exactly as it began: refuse other options, base weights, catalog or
    histories (the run would be half one model, half another, and its record would say only the second)."""
    from .. import models_hf

    before = saved.get("config", {})
    now = json.loads(json.dumps(config.to_dict()))
    changed = [key for key in now if key != "base" and key in before and before[key] != now[key]]
    if changed:
        described = ", ".join(f"--{key.replace('_', '-')} {now[key]!r} (it began with {before[key]!r})"
                              for key in changed)
        raise UsageError(f"--resume continues a run as it began: {described}; "
                         "start a new run in another --out to change it")
    recorded = saved.get("base_model_sha256")
    if recorded and models_hf.base_sha256(models_hf.resolve_base(config.base)) != recorded:
        raise UsageError(f"the base {config.base} is not the model this run began with (sha256 {recorded[:12]}…): "
                         "give the run's --base")
    if saved.get("catalog_sha256") != catalog.sha256:
        raise UsageError(f"the database's catalog ({catalog.sha256[:12]}…) is not the one this run began with "
                         f"({str(saved.get('catalog_sha256'))[:12]}…): give the run's --db")
    if saved.get("train_data_sha256", data_sha256) != data_sha256:
        raise UsageError("the database's histories changed since this run began (interactions added or removed): "
                         "resume on a copy of the database as it was, or start a new run")


def train(
    db: str | Path | None,
    out: str | Path,
    *,
    config_file: str | Path | None = None,
    resume: bool = False,
    stop_after: int = 0,
    time_limit_s: float = 0.0,
    command_line: str | None = None,
    quiet: bool = False,
    **options,
) -> TrainResult:
    """Train on the histories in the database ``db``; ``options`` are :class:`TrainConfig` fields.

    On ``resume`` the run's saved config applies, and its database when ``db`` is None; an option given
    must equal the saved one (a run resumes as it began). Otherwise ``db`` None is the default database.
    """
    from .. import paths
    from ..history import HistoryDB

    if resume:
        if config_file is not None:
            raise UsageError("--config does not apply to --resume: a run resumes with the options it began with")
        saved_run = runs.read_run_config(out)
        saved = saved_run["config"]
        config = resolve_config(None, **{**saved, **{k: v for k, v in options.items() if v is not None}})
        if db is None:
            db = saved_run.get("db") or paths.default_db()
    else:
        config = resolve_config(config_file, **options)
        if db is None:
            db = paths.default_db()
    with HistoryDB.open(db, readonly=True) as history:
        catalog = history.catalog()
        dataset = history.dataset()
        sequences = list(history.sequences())
    if not sequences:
        raise UsageError(f"the database {db} holds no interactions")
    return train_on_sequences(
        sequences,
        catalog,
        out,
        config,
        dataset=dataset.name if dataset else None,
        resume=resume,
        stop_after=stop_after,
        time_limit_s=time_limit_s,
        command_line=command_line,
        quiet=quiet,
        db_path=db,
    )
