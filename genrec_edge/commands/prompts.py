"""``genrec-edge prompts export``: the leave-one-out split of a database as train/valid/test JSONL."""

from __future__ import annotations

from pathlib import Path

import typer

from . import DB_HELP
from .history import open_db_for_reading

SPLITS = ("train", "valid", "test")


def register(app: typer.Typer) -> None:
    prompts_app = typer.Typer(help="Export training/evaluation prompts.", no_args_is_help=True)
    app.add_typer(prompts_app, name="prompts")

    @prompts_app.command("export")
    def export(
        out: Path = typer.Option(..., "--out", help="Folder for train.jsonl, valid.jsonl and test.jsonl."),
        db: Path = typer.Option(None, "--db", help=DB_HELP),
        history_len: int = typer.Option(None, "--history-len", min=0, help="Titles of history per prompt "
                                        "(default: the prompt template's)."),
        instruction: str = typer.Option(None, "--instruction", help="The prompt's first line (default: the "
                                        "prompt template's, about movies); as `train --instruction`."),
        min_history: int = typer.Option(1, "--min-history", min=1, help="Fewest history items an example needs."),
        force: bool = typer.Option(False, "--force", help="Overwrite existing JSONL files."),
    ) -> None:  # fmt: skip
        """Write the chronological leave-one-out split as JSONL ({prompt, completion, user, item} per line).

        Example: genrec-edge prompts export --db ml.db --out prompts/ --history-len 20
        """
        import os

        from ..errors import UsageError
        from ..paths import check_can_make_folder, make_folder
        from ..prompts import PromptTemplate, check_instruction, export_jsonl, leave_one_out
        from ..signals import held_signals

        targets = {split: out / f"{split}.jsonl" for split in SPLITS}
        existing = [str(p) for p in targets.values() if p.exists()]
        if existing and not force:
            raise UsageError(f"refusing to overwrite {', '.join(existing)} (use --force)")
        folders = [str(p) for p in targets.values() if p.is_dir()]
        if folders:
            raise UsageError(f"{', '.join(folders)}: a folder where the export writes a file")
        if instruction is not None:
            check_instruction(instruction)
        check_can_make_folder(out)
        given = {"history_len": history_len, "instruction": instruction}
        template = PromptTemplate(**{k: v for k, v in given.items() if v is not None})
        with open_db_for_reading(db) as database:
            catalog = database.catalog()
            split = leave_one_out(database.sequences(), min_history=min_history, train_history=template.history_len)
        if not split.test:
            raise UsageError(f"no user has {min_history} or more items of history before a held-out item: "
                             "nothing to export")
        # All three files or none: each is written aside and renamed once all are complete (Ctrl-C, a full
        # disk or --force over an older export never leave a half file, or a mix of two exports). A signal
        # that comes between two renames is acted on after the third.
        partial = {name: out / f".{name}.jsonl.partial-{os.getpid()}" for name in SPLITS}
        make_folder(out)
        try:
            counts = {name: export_jsonl(getattr(split, name), catalog.title_of, template, partial[name])
                      for name in SPLITS}
            with held_signals():
                for name in SPLITS:
                    os.replace(partial[name], targets[name])
        finally:
            for path in partial.values():
                path.unlink(missing_ok=True)
        summary = ", ".join(f"{counts[name]} {name}" for name in SPLITS)
        typer.echo(f"wrote {summary} examples to {out} (history_len {template.history_len})")
