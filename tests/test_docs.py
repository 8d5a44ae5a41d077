"""The docs tell the truth about the CLI and about themselves.

- Every complete `distcls ...` command line in README.md and docs/*.md (in ``` fenced blocks and in inline
  `code` spans; `.venv/bin/distcls`, `VAR=value distcls`, `\\` continuations) parses with the real parser
  from `distcls.cli.build_parser`, without running anything. Abbreviated, unknown or misspelt flags and
  commands fail. Fenced commands must also build their config (the checks a command makes before it
  starts, e.g. `tune --resume` without `--trust-tune-state`). Lines with a `...` or `<PLACEHOLDER>` are
  skipped and counted; a bare `distcls` (the program's name in prose) is not a command line.
- Every relative link resolves to an existing file, and every `#anchor` to a heading of its target.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from distcls.cli import COMMANDS, GROUPS, build_parser
from distcls.config import config_from_args

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

DISTCLS_WORD = re.compile(r"(?:^|[\s/`])distcls(?=\s|$)|\bjobs/\w+\.py\b")
JOB_SCRIPT = re.compile(r"^jobs/(\w+)\.py$")  # `python jobs/train.py ...` runs `distcls train ...`
JOB_COMMANDS = {p[0] for p, *_ in COMMANDS if len(p) == 1}
ENV_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PREFIXES = {"time", "exec", "nohup", "env", "sudo"}
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", "$("}
REDIRECT = re.compile(r"^\d*(>>?|<)")
PLACEHOLDER = re.compile(r"\.\.\.|<[^<>\s]+>")
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)", re.DOTALL)


@dataclass(frozen=True)
class Snippet:
    where: str  # file:line
    text: str
    fenced: bool


def snippets(path: Path) -> list[Snippet]:
    """Logical lines of fenced blocks (continuations joined) and inline code spans of the prose."""
    out: list[Snippet] = []
    lines = path.read_text().splitlines()
    in_fence, pending, start, para, para_start = False, "", 0, [], 0
    for n, line in enumerate(lines, 1):
        if FENCE.match(line):
            out += spans(path, para, para_start)
            para, in_fence = [], not in_fence
            continue
        if in_fence:
            start = start or n
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            out.append(Snippet(f"{path.name}:{start}", pending + line, True))
            pending, start = "", 0
        elif line.strip():
            para_start = para_start if para else n
            para.append(line)
        else:
            out += spans(path, para, para_start)
            para = []
    return out + spans(path, para, para_start)


def spans(path: Path, para: list[str], first: int) -> list[Snippet]:
    text = "\n".join(para)
    return [
        Snippet(f"{path.name}:{first + text.count(chr(10), 0, m.start())}", " ".join(m.group(2).split()), False)
        for m in SPAN.finditer(text)
    ]


def command_argv(text: str) -> list[str] | None:
    """The arguments after `distcls` where it stands in command position (for `python jobs/NAME.py ARGS`,
    the entrypoint of `distcls NAME ARGS`: NAME and ARGS), else None."""
    if not DISTCLS_WORD.search(text):
        return None
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError as exc:
        raise AssertionError(f"cannot split {text!r}: {exc}") from None
    at_start = True
    for i, tok in enumerate(tokens):
        if at_start and (ENV_ASSIGN.match(tok) or tok in PREFIXES):
            continue
        job = JOB_SCRIPT.match(tok)
        is_job = job and job[1] in JOB_COMMANDS and i > 0 and re.search(r"python3?$", tokens[i - 1])
        if is_job or (at_start and (tok == "distcls" or tok.endswith("/distcls"))):
            argv = [job[1]] if is_job else []
            for arg in tokens[i + 1 :]:
                if arg in SEPARATORS or REDIRECT.match(arg):
                    break
                argv.append(arg)
            return argv
        at_start = tok in SEPARATORS
    return None


def strict_parser() -> argparse.ArgumentParser:
    """The CLI's parser with abbreviations off everywhere: a doc must spell every flag in full."""
    parser = build_parser()
    todo = [parser]
    while todo:
        p = todo.pop()
        p.allow_abbrev = False
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += list(action.choices.values())
    return parser


def config_class(args: argparse.Namespace):
    path = (args.command,)
    if args.command in GROUPS:
        path += (getattr(args, GROUPS[args.command][0]),)
    return next(cfg for p, cfg, *_ in COMMANDS if p == path)


def check(parser: argparse.ArgumentParser, snippet: Snippet, argv: list[str]) -> str | None:
    """None when the line parses (and, fenced, builds its config); else why not."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0:  # --help, --version
            return None
        return err.getvalue().strip().splitlines()[-1]
    cfg_cls = config_class(args)
    if snippet.fenced and cfg_cls is not None:
        try:
            config_from_args(cfg_cls, args)
        except Exception as exc:  # the config's own refusal, one line
            return f"config refused: {exc}"
    return None


def test_every_distcls_command_in_the_docs_parses(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # --config jobs/configs/*.yaml, as the docs run it
    parser = strict_parser()
    checked, jobs, skipped, failures = 0, 0, 0, []
    for path in DOCS:
        for snippet in snippets(path):
            argv = command_argv(snippet.text)
            if not argv:  # not a command, or the bare name
                continue
            if any(PLACEHOLDER.search(a) for a in argv):
                skipped += 1
                continue
            checked += 1
            jobs += bool(re.search(r"python3?\s+jobs/\w+\.py", snippet.text))
            why = check(parser, snippet, argv)
            if why:
                failures.append(f"{snippet.where}: distcls {shlex.join(argv)}\n    {why}")
    with capsys.disabled():
        print(f"\ndocs: {checked} distcls command lines checked ({jobs} of them jobs/*.py), {skipped} skipped (placeholders)")
    assert not failures, "doc commands the CLI does not accept:\n" + "\n".join(failures)
    assert checked >= 20, f"only {checked} commands found: is the extraction broken?"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found, in_fence = set(), False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and (m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link outside code; link text may run over a line break."""
    kept, in_fence = [], False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        kept.append("" if in_fence or FENCE.match(line) else line)
    text = SPAN.sub(lambda m: "\n" * m.group(0).count("\n"), "\n".join(kept))
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in LINK.finditer(text)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(doc: Path):
    broken = []
    for n, target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{doc.name}:{n}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{doc.name}:{n}: {target} (no heading #{anchor} in {dest.name})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_extraction_finds_what_it_should(tmp_path: Path):
    """The extractor on the cases the docs use: prefixes, continuations, spans, placeholders."""
    assert command_argv(".venv/bin/distcls train --epochs 1   # a comment --bogus") == ["train", "--epochs", "1"]
    assert command_argv("RAY_ADDRESS=http://h:8265 AWS_REGION=x distcls label --status") == ["label", "--status"]
    assert command_argv("time .venv/bin/distcls demo > log.txt") == ["demo"]
    assert command_argv("import distcls") is None
    assert command_argv("distcls: error: serve: --host") is None
    assert command_argv("the distcls command") is None
    assert command_argv("ray job submit --working-dir . -- python jobs/label.py --config c.yaml") == [
        "label",
        "--config",
        "c.yaml",
    ]
    assert command_argv("python jobs/bench_gpu.py --out bench-gpu.json") is None
    doc = (
        "```bash\n.venv/bin/distcls train --data d \\\n    --epochs 2\n```\nRun `distcls models` now,\nor `distcls\nbench all`.\n"
    )
    path = tmp_path / "sample.md"
    path.write_text(doc)
    found = [(s.text, s.fenced) for s in snippets(path) if command_argv(s.text)]
    assert found == [
        (".venv/bin/distcls train --data d      --epochs 2", True),
        ("distcls models", False),
        ("distcls bench all", False),
    ]
    parser = strict_parser()
    fenced = Snippet("x", "", True)
    assert check(parser, fenced, ["train", "--epoch", "1"])  # abbreviations are refused
    assert check(parser, fenced, ["trian"])
    assert check(parser, fenced, ["models"]) is None
