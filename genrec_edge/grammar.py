"""The catalog as a GBNF grammar, and our own validator for the GBNF we hand to llama.cpp.

``catalog_grammar(titles)`` factors the titles into a character trie with single-child chains merged
into one literal, one rule per branching node (a flat alternation of 1,700 titles is ~60x slower for
llama.cpp to start). Its language is exactly the set of titles; the generation then ends (EOG).

``validate_grammar(text)`` exists because llama.cpp is unforgiving: llama-cpp-python segfaults on an
unparseable grammar, ``llama_sampler_init_grammar`` returns NULL without a message, and a grammar that
admits no next token aborts the process. We parse the subset of GBNF we emit (and a little more: rules,
literals, character classes, ``.``, alternation, groups, ``? * +``, comments) with llama.cpp's own
whitespace rules, check that every referenced rule is defined, ``root`` exists, no rule is left-recursive
and the language is non-empty, and raise :class:`~genrec_edge.errors.GrammarError` with one line.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from .errors import GrammarError

# ------------------------------------------------------------------------------------------ emitting

_NAMED_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_char(ch: str) -> str:
    """One code point as llama.cpp's ``parse_char`` reads it inside a ``"..."`` literal."""
    if ch in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[ch]
    code = ord(ch)
    if ch == " " or (ch.isprintable() and not 0xD800 <= code <= 0xDFFF):
        return ch
    # Control, format, separator and surrogate code points: never raw (a raw newline would end the rule).
    if code <= 0xFF:
        return f"\\x{code:02X}"
    if code <= 0xFFFF:
        return f"\\u{code:04X}"
    return f"\\U{code:08X}"


def literal(text: str) -> str:
    return '"' + "".join(escape_char(c) for c in text) + '"'


@dataclass
class _CharNode:
    children: dict
    terminal: bool = False


def catalog_grammar(titles: Iterable[str]) -> str:
    """A GBNF grammar whose language is exactly ``titles`` (duplicates merged).

    One rule per line (a top-level alternation must not continue on a new line). Rules are named
    ``root`` and ``n1, n2, ...`` in depth-first order, so the text is deterministic for a catalog.
    """
    unique = list(dict.fromkeys(titles))
    if not unique:
        raise GrammarError("cannot build a grammar for an empty catalog")
    for title in unique:
        if "\x00" in title:  # the grammar text is a C string; NUL can never be matched
            raise GrammarError(f"title contains a NUL character: {title!r}")
    root = _CharNode({})
    for title in unique:
        node = root
        for ch in title:
            node = node.children.setdefault(ch, _CharNode({}))
        node.terminal = True

    lines: list[str] = []
    counter = [0]

    def emit(node: _CharNode, name: str) -> None:
        # Reserve this rule's line first so rules appear parent before child.
        index = len(lines)
        lines.append("")
        alternatives = []
        for ch, child in sorted(node.children.items()):
            label = ch
            while not child.terminal and len(child.children) == 1:  # merge a single-child chain
                (next_ch, child), = child.children.items()
                label += next_ch
            if not child.children:
                alternatives.append(literal(label))
                continue
            counter[0] += 1
            child_name = f"n{counter[0]}"
            emit(child, child_name)
            alternatives.append(f"{literal(label)} {child_name}" + ("?" if child.terminal else ""))
        lines[index] = f"{name} ::= " + " | ".join(alternatives)

    if not root.children:  # the only title is the empty string
        return 'root ::= ""\n'
    if root.terminal:  # the empty title plus others: everything below the root is optional
        emit(root, "titles")
        lines.insert(0, "root ::= titles?")
    else:
        emit(root, "root")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ parsing
# AST: rule name -> alternatives; an alternative is a list of elements:
#   ("lit", str) | ("class", negated, ((lo, hi), ...)) | ("any",) | ("ref", name) | ("group", alts)
#   | ("rep", element, min, max or None)


def _is_word(ch: str) -> bool:
    return ch.isascii() and (ch.isalnum() or ch == "-")


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.rules: dict[str, list] = {}
        self.refs: list[tuple[str, int]] = []

    def fail(self, message: str) -> GrammarError:
        line = self.text.count("\n", 0, self.pos) + 1
        col = self.pos - (self.text.rfind("\n", 0, self.pos) + 1) + 1
        return GrammarError(f"invalid grammar at line {line}, column {col}: {message}")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def space(self, newline_ok: bool) -> None:
        text = self.text
        while self.pos < len(text):
            ch = text[self.pos]
            if ch in " \t" or (newline_ok and ch in "\r\n"):
                self.pos += 1
            elif ch == "#":
                while self.pos < len(text) and text[self.pos] not in "\r\n":
                    self.pos += 1
            else:
                break

    def name(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and _is_word(self.text[self.pos]):
            self.pos += 1
        if self.pos == start:
            found = self.peek() or "end of input"
            raise self.fail(f"expecting a rule name, found {found!r}")
        return self.text[start : self.pos]

    def char(self) -> int:
        text = self.text
        if self.pos >= len(text):
            raise self.fail("unexpected end of input")
        ch = text[self.pos]
        if ch != "\\":
            self.pos += 1
            return ord(ch)
        esc = text[self.pos + 1 : self.pos + 2]
        widths = {"x": 2, "u": 4, "U": 8}
        if esc in widths:
            digits = text[self.pos + 2 : self.pos + 2 + widths[esc]]
            if len(digits) != widths[esc] or any(c not in "0123456789abcdefABCDEF" for c in digits):
                raise self.fail(f"expecting {widths[esc]} hex digits after \\{esc}")
            self.pos += 2 + widths[esc]
            return int(digits, 16)
        simple = {"t": "\t", "r": "\r", "n": "\n", "\\": "\\", '"': '"', "[": "[", "]": "]", "-": "-"}
        if esc in simple:
            self.pos += 2
            return ord(simple[esc])
        raise self.fail(f"unknown escape \\{esc}")

    def parse(self) -> dict[str, list]:
        self.space(True)
        while self.pos < len(self.text):
            name = self.name()
            self.space(False)
            if not self.text.startswith("::=", self.pos):
                raise self.fail(f"expecting '::=' after rule name {name!r}")
            self.pos += 3
            self.space(True)
            if name in self.rules:
                raise self.fail(f"rule {name!r} defined twice")
            self.rules[name] = self.alternates(nested=False)
            ch = self.peek()
            if ch == "\r":
                self.pos += 2 if self.text[self.pos + 1 : self.pos + 2] == "\n" else 1
            elif ch == "\n":
                self.pos += 1
            elif ch:
                raise self.fail(f"expecting newline or end of rule, found {ch!r}")
            self.space(True)
        return self.rules

    def alternates(self, nested: bool) -> list:
        alts = [self.sequence(nested)]
        while self.peek() == "|":
            self.pos += 1
            self.space(True)
            alts.append(self.sequence(nested))
        return alts

    def sequence(self, nested: bool) -> list:
        seq: list = []
        while self.pos < len(self.text):
            ch = self.peek()
            if ch == '"':
                self.pos += 1
                chars = []
                while self.peek() != '"':
                    if not self.peek():
                        raise self.fail("unterminated literal")
                    chars.append(chr(self.char()))
                self.pos += 1
                seq.append(("lit", "".join(chars)))
            elif ch == "[":
                self.pos += 1
                negated = self.peek() == "^"
                if negated:
                    self.pos += 1
                ranges = []
                while self.peek() != "]":
                    if not self.peek():
                        raise self.fail("unterminated character class")
                    lo = self.char()
                    hi = lo
                    if self.peek() == "-" and self.text[self.pos + 1 : self.pos + 2] != "]":
                        self.pos += 1
                        hi = self.char()
                    ranges.append((lo, hi))
                self.pos += 1
                seq.append(("class", negated, tuple(ranges)))
            elif ch == ".":
                self.pos += 1
                seq.append(("any",))
            elif ch == "(":
                self.pos += 1
                self.space(True)
                alts = self.alternates(nested=True)
                if self.peek() != ")":
                    raise self.fail("expecting ')'")
                self.pos += 1
                seq.append(("group", alts))
            elif ch in "*+?":
                if not seq:
                    raise self.fail(f"expecting an item before {ch!r}")
                self.pos += 1
                low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[ch]
                seq[-1] = ("rep", seq[-1], low, high)
            elif _is_word(ch):
                start = self.pos
                seq.append(("ref", self.name()))
                self.refs.append((seq[-1][1], start))
            else:
                break
            self.space(nested)
        return seq


def parse_grammar(text: str) -> dict[str, list]:
    """Parse GBNF text into our AST; GrammarError with line and column on a syntax error."""
    if "\x00" in text:
        raise GrammarError("invalid grammar: contains a NUL character")
    parser = _Parser(text)
    rules = parser.parse()
    for name, position in parser.refs:
        if name not in rules:
            parser.pos = position
            raise parser.fail(f"undefined rule {name!r}")
    return rules


def _fixpoint(rules: dict[str, list], element_ok) -> set[str]:
    """Rules for which ``element_ok`` holds on every element of some alternative, to a fixpoint."""
    good: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, alts in rules.items():
            if name not in good and any(all(element_ok(e, good) for e in alt) for alt in alts):
                good.add(name)
                changed = True
    return good


def _productive(element, good: set[str]) -> bool:
    kind = element[0]
    if kind == "lit" or kind == "any":
        return True
    if kind == "class":
        return element[1] or any(lo <= hi for lo, hi in element[2])
    if kind == "ref":
        return element[1] in good
    if kind == "group":
        return any(all(_productive(e, good) for e in alt) for alt in element[1])
    return element[2] == 0 or _productive(element[1], good)  # rep


def _nullable(element, good: set[str]) -> bool:
    kind = element[0]
    if kind == "lit":
        return element[1] == ""
    if kind in ("class", "any"):
        return False
    if kind == "ref":
        return element[1] in good
    if kind == "group":
        return any(all(_nullable(e, good) for e in alt) for alt in element[1])
    return element[2] == 0 or _nullable(element[1], good)


def _left_refs(alts: list, nullable: set[str]) -> Iterator[str]:
    """Rules that can be reached without consuming a character (the left corner)."""
    for alt in alts:
        for element in alt:
            yield from _left_refs_element(element, nullable)
            if not _nullable(element, nullable):
                break


def _left_refs_element(element, nullable: set[str]) -> Iterator[str]:
    if element[0] == "ref":
        yield element[1]
    elif element[0] == "group":
        yield from _left_refs(element[1], nullable)
    elif element[0] == "rep":
        yield from _left_refs_element(element[1], nullable)


def validate_grammar(text: str) -> dict[str, list]:
    """Check a grammar before llama.cpp sees it; returns the parsed rules or raises GrammarError."""
    rules = parse_grammar(text)
    if "root" not in rules:
        raise GrammarError("invalid grammar: no 'root' rule")
    productive = _fixpoint(rules, _productive)
    if "root" not in productive:
        raise GrammarError("invalid grammar: the language is empty (root derives no string)")
    nullable = _fixpoint(rules, _nullable)
    # llama.cpp rejects left recursion; find a cycle in the "left corner" graph.
    edges = {name: set(_left_refs(alts, nullable)) for name, alts in rules.items()}
    state: dict[str, int] = {}
    for start in rules:
        if state.get(start):
            continue
        stack = [(start, iter(edges[start]))]
        state[start] = 1
        while stack:
            name, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[name] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                raise GrammarError(f"invalid grammar: rule {nxt!r} is left-recursive")
            elif not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(edges[nxt])))
    return rules


def grammar_language(text: str, limit: int = 100_000) -> set[str]:
    """Every string a finite grammar derives (literals, refs, groups and ``?`` only).

    For tests: a catalog grammar's language must equal its catalog. Raises ValueError on classes,
    ``.``, ``*``/``+`` or more than ``limit`` strings.
    """
    rules = validate_grammar(text)
    memo: dict[str, set[str]] = {}

    def of_alts(alts: list) -> set[str]:
        out: set[str] = set()
        for alt in alts:
            acc = {""}
            for element in alt:
                acc = {a + b for a in acc for b in of_element(element)}
                if len(acc) > limit:
                    raise ValueError("language too large")
            out |= acc
        return out

    def of_element(element) -> set[str]:
        kind = element[0]
        if kind == "lit":
            return {element[1]}
        if kind == "ref":
            if element[1] not in memo:
                memo[element[1]] = of_alts(rules[element[1]])
            return memo[element[1]]
        if kind == "group":
            return of_alts(element[1])
        if kind == "rep" and (element[2], element[3]) == (0, 1):
            return {""} | of_element(element[1])
        raise ValueError(f"not a finite grammar element: {element[0]}")

    return of_element(("ref", "root"))


def grammar_for_titles(titles: Sequence[str]) -> str:
    """``catalog_grammar`` followed by ``validate_grammar``: the grammar the sampler and export use."""
    text = catalog_grammar(titles)
    validate_grammar(text)
    return text
