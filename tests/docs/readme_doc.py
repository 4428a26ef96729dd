"""README.md as a test: its fenced blocks, the annotations that say how to run them, and output matching.

The conventions (README.md follows them; tests/docs/test_readme.py runs them):

- ```console blocks hold `$ command` lines, each followed by the output it claims (a trailing backslash
  continues a command, and a here-document's lines are part of it). A command is run with
  bash (`set -o pipefail`) from the repository root, with the venv's `bin` first on PATH and
  LOGBROKER_BOOTSTRAP naming the test's cluster. It must exit 0 (or as annotated). Its stdout is compared with the lines
  shown; stderr (the CLI's progress and summary lines) is not compared. A command shown with no output
  lines claims nothing about its output, only that it succeeds.
- Comparison is line by line, after collapsing runs of spaces (table columns widen with their content)
  and dropping trailing spaces. A line `...` matches any number of lines; `...` inside a line matches any
  text on that line (doctest's ELLIPSIS).
- ```python blocks are programs, run with the venv's interpreter; they must exit 0.
- Other blocks (```sh, ```toml, indented blocks) are reference material and are not run.
- Addresses: the README names a `make run` cluster (gRPC 9092-9094, Kafka 9192-9194, metrics
  9292-9294 on 127.0.0.1). Every `127.0.0.1:PORT` / `localhost:PORT` in a command, program or expected
  output is rewritten to the same broker's port in the test's cluster.
- Annotations: HTML comments right before a block (GitHub does not render them), one per line:

      <!-- readme-test: skip: WHY -->          not run (a server that runs until stopped, a tool not here)
      <!-- readme-test: skip command N: WHY -->  the block's Nth command is not run (a server)
      <!-- readme-test: command N exits S: WHY --> the block's Nth command must exit with status S
      <!-- readme-test: needs TOOL ... -->      run only where each TOOL is on PATH, else skipped saying so
      <!-- readme-test: vary: REGEX -->         where REGEX matches in the shown output, any text matches
                                               (ids, times, offsets that differ from run to run)
      <!-- readme-test: any order: WHY -->      output lines may come in any order (several partitions)
      <!-- readme-test: retry SECONDS: WHY -->  commands showing output are run again until it matches
                                               or the deadline passes (state that settles: commits, lag)
      <!-- readme-test: background N: WHY -->   each command starts N times in the background and keeps
                                               running (a command the README runs in terminals of its own)
      <!-- readme-test: stop background after N lines: WHY -->
                                               before this block: wait until the background commands
                                               printed N lines together, stop them with SIGINT (Ctrl-C),
                                               require a clean exit and exactly N lines (each record once)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ANNOTATION = re.compile(r"^<!--\s*readme-test:\s*(?P<body>.*?)\s*-->\s*$")
FENCE = re.compile(r"^```(?P<lang>[\w.+-]*)\s*$")
ELLIPSIS = "..."
HEREDOC = re.compile(r"<<-?\s*(['\"]?)(?P<word>\w+)\1")
# The ports of `make run`'s cluster (base port 9092): gRPC, Kafka (+100) and metrics (+200).
README_BASE_PORT = 9092
README_PORT = re.compile(r"(?P<host>127\.0\.0\.1|localhost):(?P<port>9[0-2]9[2-4])\b")
# What ran and what was skipped, and why: printed at the end of the pytest run (tests/docs/conftest.py).
REPORT: list[str] = []


@dataclass
class Directives:
    skip: str | None = None
    needs: list[str] = field(default_factory=list)
    vary: list[str] = field(default_factory=list)
    any_order: bool = False
    retry_s: float = 0.0
    background: int = 0
    stop_background_after: int | None = None
    skip_commands: dict[int, str] = field(default_factory=dict)  # 1-based index in the block -> why
    exits: dict[int, int] = field(default_factory=dict)  # 1-based index in the block -> its exit status
    notes: list[str] = field(default_factory=list)  # every annotation as written, for the report


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # of the opening fence, 1-based
    body: str
    directives: Directives

    @property
    def name(self) -> str:
        return f"README.md:{self.line} ```{self.lang}"


@dataclass(frozen=True)
class Command:
    line: int
    text: str
    expected: list[str]


def parse_directive(body: str, into: Directives, where: str) -> None:
    """One annotation: `NAME [ARG]: TEXT` or `NAME [ARG]`."""
    head, _, text = body.partition(":")
    words = head.split()
    name = " ".join(w for w in words if not w.isdigit())
    numbers = [int(w) for w in words if w.isdigit()]
    number = numbers[0] if numbers else None
    into.notes.append(body)
    if name == "skip":
        into.skip = text.strip() or "no reason given"
    elif words[:1] == ["needs"] and words[1:]:
        into.needs.extend(words[1:])
    elif name == "vary":
        re.compile(text.strip())  # a bad pattern fails here, naming nothing else
        into.vary.append(text.strip())
    elif name == "any order":
        into.any_order = True
    elif name == "retry" and number:
        into.retry_s = float(number)
    elif name == "background" and number:
        into.background = number
    elif name == "command exits" and len(numbers) == 2:
        into.exits[numbers[0]] = numbers[1]
    elif name == "skip command" and number:
        into.skip_commands[number] = text.strip() or "no reason given"
    elif name == "stop background after lines" and number is not None:
        into.stop_background_after = number
    else:
        raise ValueError(f"{where}: unknown readme-test annotation {body!r} (see tests/docs/readme_doc.py)")


def parse_blocks(text: str) -> list[Block]:
    """Fenced blocks in order, each with the annotations written on the lines just before it."""
    lines = text.splitlines()
    blocks: list[Block] = []
    pending = Directives()
    i = 0
    while i < len(lines):
        annotation = ANNOTATION.match(lines[i])
        fence = FENCE.match(lines[i])
        if annotation:
            parse_directive(annotation.group("body"), pending, f"README.md:{i + 1}")
        elif fence:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is None:
                raise ValueError(f"README.md:{i + 1}: a fenced block that never closes")
            blocks.append(Block(fence.group("lang") or "text", i + 1, "\n".join(lines[i + 1:end]) + "\n", pending))
            pending = Directives()
            i = end
        elif lines[i].strip() and pending.notes:
            raise ValueError(f"README.md:{i + 1}: readme-test annotations must come right before a fenced block")
        i += 1
    return blocks


def parse_console(block: Block) -> list[Command]:
    """`$ command` lines (a trailing backslash continues one), each with the output lines after it."""
    commands: list[Command] = []
    lines = block.body.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("$ "):
            if not commands:
                raise ValueError(f"README.md:{block.line + 1 + i}: output before any `$ ` command")
            commands[-1].expected.append(line)
            i += 1
            continue
        text, start = line[2:], i
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text[:-1] + "\n" + lines[i]
        heredoc = HEREDOC.search(text)
        while heredoc and i + 1 < len(lines):  # a here-document's lines belong to the command
            i += 1
            text += "\n" + lines[i]
            if lines[i].strip() == heredoc.group("word"):
                break
        commands.append(Command(block.line + 1 + start, text, []))
        i += 1
    return commands


def rewrite_ports(text: str, base_port: int) -> str:
    """The README's `make run` addresses, moved to the same broker's ports of a cluster at base_port."""
    return README_PORT.sub(lambda m: f"{m['host']}:{int(m['port']) - README_BASE_PORT + base_port}", text)


def _squeeze(line: str) -> str:
    return " ".join(line.split())


def line_pattern(expected: str, vary: list[str]) -> re.Pattern[str]:
    """A regex for one shown line: literal text, `...` and the vary patterns' spans as wildcards."""
    expected = _squeeze(expected)
    wild = [(m.start(), m.end()) for m in re.finditer(re.escape(ELLIPSIS), expected)]
    for pattern in vary:
        wild += [(m.start(), m.end()) for m in re.finditer(pattern, expected) if m.end() > m.start()]
    parts, pos = [], 0
    for start, end in sorted(wild):
        if start < pos:
            continue  # overlaps a wildcard already taken
        parts.append(re.escape(expected[pos:start]) + ".*?")
        pos = end
    parts.append(re.escape(expected[pos:]))
    return re.compile("".join(parts))


def lines_match(expected: list[str], actual: list[str], vary: list[str], any_order: bool = False) -> bool:
    actual = [_squeeze(line) for line in actual]
    while actual and not actual[-1]:
        actual.pop()
    if any_order:
        return _match_any_order(expected, actual, vary)
    return _match_in_order([None if _squeeze(e) == ELLIPSIS else line_pattern(e, vary) for e in expected], actual)


def _match_in_order(patterns: list[re.Pattern[str] | None], actual: list[str]) -> bool:
    """None stands for `...` on a line of its own: any number of lines."""
    if not patterns:
        return not actual
    head, rest = patterns[0], patterns[1:]
    if head is None:
        return any(_match_in_order(rest, actual[k:]) for k in range(len(actual) + 1))
    return bool(actual) and head.fullmatch(actual[0]) is not None and _match_in_order(rest, actual[1:])


def _match_any_order(expected: list[str], actual: list[str], vary: list[str]) -> bool:
    """Each shown line matches a line of its own (a small bipartite matching: outputs are short)."""
    if len(expected) != len(actual):
        return False
    patterns = [line_pattern(e, vary) for e in expected]
    owner: dict[int, int] = {}  # actual line -> the pattern it is matched to

    def place(p: int, seen: set[int]) -> bool:
        for a, line in enumerate(actual):
            if a not in seen and patterns[p].fullmatch(line):
                seen.add(a)
                if a not in owner or place(owner[a], seen):
                    owner[a] = p
                    return True
        return False

    return all(place(p, set()) for p in range(len(patterns)))


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every relative Markdown link or image in a file, anchors and URLs left out.
    A target is relative to the file's own directory, as GitHub resolves it."""
    found = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        for match in re.finditer(r"!?\[[^\]]*\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)", line):
            target = match.group(1).split("#", 1)[0]
            if target and not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                found.append((number, target))
    return found


def repository_paths(path: Path, top_level: set[str]) -> list[tuple[int, str]]:
    """(line, path) of every `code span` that names a path under one of the repository's top-level
    directories (`docs/replica-moves.md`, `logbroker/raft/`): the prose's links, relative to the root."""
    found = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        for match in re.finditer(r"`([\w.-]+/[\w./-]*)`", line):
            if match.group(1).split("/", 1)[0] in top_level:
                found.append((number, match.group(1)))
    return found
