"""The docs promise what the code does: every command's --help has an example, and the README's exit-code
list names every code the CLI can return."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import typer.main

from genrec_edge import errors
from genrec_edge.cli import app, main

README = Path(__file__).resolve().parents[1] / "README.md"


def _command_tree(command, path=()):
    """(path, command) for the root, every group and every command below it."""
    yield path, command
    if hasattr(command, "list_commands"):  # a group
        for name in command.list_commands(None):
            yield from _command_tree(command.get_command(None, name), (*path, name))


def test_every_command_and_subcommand_has_help_with_an_example(capsys):
    tree = dict(_command_tree(typer.main.get_command(app)))
    groups = {path: command for path, command in tree.items() if hasattr(command, "list_commands")}
    leaves = [path for path in tree if path not in groups]
    # The walk reaches the nested commands, not only the top level (a few named here as a check).
    assert {("recommend",), ("data", "ingest"), ("history", "add"), ("prior", "tune"), ("baseline", "sasrec")} <= set(leaves)
    assert len(leaves) >= 20 and ("data",) in groups
    for path in leaves:
        assert main([*path, "--help"]) == 0, path
        out = capsys.readouterr().out
        assert "Example:" in out and f"genrec-edge {' '.join(path)}" in out, path
    for path, group in groups.items():
        assert main([*path, "--help"]) == 0, path
        out = capsys.readouterr().out
        assert all(name in out for name in group.list_commands(None)), path  # the group lists its commands


def test_version_alone_and_before_a_command(capsys):
    from genrec_edge import __version__

    for argv in (["--version"], ["--version", "recommend", "--user", "1"]):  # the command never runs
        assert main(argv) == 0, argv
        assert capsys.readouterr().out.strip() == __version__


def _readme_exit_codes() -> dict[int, str]:
    text = " ".join(README.read_text(encoding="utf-8").split())
    listed = re.search(r"non-zero exit code \(([^()]*(?:\([^()]*\)[^()]*)*)\)", text)  # one level of (...) inside
    assert listed, "README: the exit-code list after 'non-zero exit code (' is missing"
    return {int(code): words.strip() for code, words in re.findall(r"(\d+) ([^,;]+)", listed.group(1))}


def test_readme_lists_every_exit_code():
    codes = {
        cls.exit_code
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.GenrecError) and cls is not errors.GenrecError
    }
    codes |= {1, 70, 130, 143}  # GenrecError itself; cli.main: an internal error, Ctrl-C, SIGTERM
    assert {11, 12} <= codes  # EngineError and UnsupportedCPUError are in errors.py
    assert set(_readme_exit_codes()) == codes


ARCHITECTURE = README.parent / "docs" / "ARCHITECTURE.md"
MODULE_FOLDERS = ("genrec_edge", "genrec_edge/train", "genrec_edge/commands", "convert", "bench")


def _documented_modules(folder: str) -> set[str]:
    """The module names in the table under ARCHITECTURE.md's heading for ``folder``."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    heading = re.search(rf"^### `{re.escape(folder)}/`.*$", text, re.M)
    assert heading, f"docs/ARCHITECTURE.md has no section for {folder}/"
    section = re.split(r"^##", text[heading.end():], flags=re.M)[0]
    return set(re.findall(r"^\| `([^`]+\.py)` \|", section, re.M))


def test_architecture_names_every_module():
    root = README.parent
    for folder in MODULE_FOLDERS:
        modules = {p.name for p in (root / folder).glob("*.py")} - {"__init__.py"}
        assert modules, folder
        missing = modules - _documented_modules(folder)
        assert not missing, f"docs/ARCHITECTURE.md: add a line for {sorted(missing)} under {folder}/"
    assert "scripts/llama_wheel.py" in ARCHITECTURE.read_text(encoding="utf-8")


def test_square_brackets_in_help_are_shown(capsys):
    # typer's rich help reads "[plain]" or "[cluster]" as markup and dropped it: defaults and the extra's name.
    from genrec_edge.cli import main

    for argv, shown in ((["train", "--help"], ("[plain]", "[q,k,v,o,gate,up,down _proj]")),
                        (["recommend", "--help"], ("'genrec-edge[cluster]'", "[default: 0]")),
                        (["evaluate", "--help"], ("[cluster] extra", "[default: 4]"))):
        assert main(argv) == 0
        out = capsys.readouterr().out
        for text in shown:
            assert text in out, (argv, text)


def test_cluster_doc_quotes_the_header_batch_writes(tiny_model, tiny_db, tmp_path, monkeypatch):
    """docs/CLUSTER.md's header line is the one a real batch run writes (it said version 1 after v2)."""
    import json

    from genrec_edge.batch import recommend_users

    monkeypatch.setenv("GENREC_EDGE_HOME", str(tmp_path / "home"))
    out = tmp_path / "recs.jsonl"
    recommend_users(tiny_db, out, users=[1], model=tiny_model, k=2, progress=False, warn=lambda m: None)
    header = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    text = (README.parent / "docs" / "CLUSTER.md").read_text(encoding="utf-8")
    quoted = re.search(r'`(\{"format": "genrec-edge-recommendations", "version": \d+), "config": \{\.\.\.\}\}`', text)
    assert quoted, "docs/CLUSTER.md no longer quotes the header line"
    assert json.loads(quoted.group(1) + "}") == {"format": header["format"], "version": header["version"]}
