"""Docs that cannot drift: what README.md and docs/*.md name must exist in the repository.

Read from the code blocks and the inline code of every page (prose is read for links only):
- `make TARGET [VAR=value]`: the target is a rule of the Makefile, VAR a variable it sets or reads
  (`make TARGET NAME=value`, the syntax itself, is skipped);
- `lookalike SUB --flag [value]` (also `.venv/bin/lookalike`, `$(BIN)/lookalike`, a synopsis wrapped over
  lines that start with `[--`): SUB is a subcommand of the parser that `lookalike.cli.build_parser()`
  builds, --flag one of SUB's option strings, and values written as `a|b` are among the flag's choices.
  A flag hidden from --help (a deprecated spelling) exists, but it is reported as a warning;
- environment variables: `$NAME`, `${NAME}`, `NAME=value` before a command, `export NAME`, `docker run
  -e NAME`, and LOOKALIKE_* (or the prefix of any variable the code reads) named alone. One exists when
  the code, the Makefile, the Dockerfile, docker/, docker-compose.yml or the Helm chart names it, when
  it is on ALLOWED_ENV, or when the page's own code assigns it alone (HEADER=... then "$HEADER"). No
  code block assigns one of bash's read-only variables before a command (UID=... fails; env UID=... works);
- repository paths (tokens that start with a top-level entry of the checkout and a '/', or name a
  top-level file: `lookalike/cli.py`, `docs/x.md`, `deploy/helm/...`): git tracks it (or it is a new, not
  ignored file of this checkout), or a make target writes it (GENERATED, and what the Makefile's recipes
  write: --out, --html, >, ...). Placeholders (<name>, N, ...) match anything. An inline span that is
  the text of a link to a URL names something elsewhere and is not checked;
- Python modules (`lookalike.serving.search`, `python -m loadtest.benchmarks.bench`, `from lookalike.x
  import Y`): the module file exists, and the first name after it is defined there;
- markdown links and images to local files resolve, with their #anchors (GitHub's heading slugs).
Every failure lists each offender as file:line. The first tests check the extractors on small strings,
and test_the_docs_name_enough_... that they find something in the real pages.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import subprocess
import warnings
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAKEFILE = ROOT / "Makefile"

# Variables that nothing in the repository reads but that docs may name: each is read by the shell, the
# OS or a runtime below lookalike, and saying so in docs is correct.
ALLOWED_ENV = {
    "PATH",                  # the shell: where commands are found
    "HOME",                  # the login: tritonserver and Python caches go under it
    "PWD",                   # the shell: `-v "$PWD/model_repository:/models"`
    "LD_LIBRARY_PATH",       # the dynamic linker: libpython and the backends' libraries
    "PYTHONPATH",            # the Python interpreter
    "CUDA_VISIBLE_DEVICES",  # the CUDA runtime: which GPUs a process sees
}
# bash refuses to assign these (`UID=$(id -u) docker compose up` fails: "UID: readonly variable").
BASH_READONLY = {"UID", "EUID", "PPID", "BASHPID", "SHELLOPTS", "BASHOPTS"}

# Generated paths that no Makefile recipe names as an output (they are written by the tools a target
# runs), and the target that writes them. test_generated_paths_are_make_targets_outputs checks that each
# target exists and that git ignores each path. What recipes write (--out DIR, --html FILE, > FILE,
# mkdir -p DIR, python -m venv DIR, rule targets) is read from the Makefile itself (make_outputs).
GENERATED = {
    ".venv": "setup",
    ".venv-faiss-image": "setup",
    "node_modules": "setup",                                  # npm ci
    ".tools": "setup",                                        # scripts/install_helm.py: .tools/helm
    ".typecheck": "setup",
    "model_repository/embedder/1/model.onnx": "export",       # lookalike export
    "model_repository/embedder/*.json": "export",             # manifest.json, preprocessing.json, ...
    "model_repository/embedder/config.pbtxt": "export",
    "model_repository/embedder/configs": "export",
    "model_repository/embedder/1/model.plan": "engine",       # lookalike engine
    "model_repository/embedder/tensorrt-cache": "engine",
    "model_repository/product_search/[0-9]*": "demo",         # index versions: lookalike index
}

# Minimum counts over README.md + docs/: the extractors cannot silently find nothing.
MIN_FOUND = {"make targets": 10, "lookalike commands": 20, "lookalike flags": 30, "paths": 30,
             "environment variables": 3, "links": 10}


# --- the pages ----------------------------------------------------------------------------------

def doc_files() -> list[Path]:
    docs = ROOT / "docs"
    return [ROOT / "README.md", *(sorted(docs.rglob("*.md")) if docs.is_dir() else [])]


@dataclass
class Snippet:
    """One logical line of a code block, or one inline code span, or one prose line (links only)."""
    file: str
    line: int
    text: str
    kind: str  # "code" | "inline" | "prose"
    prefix: list[str] = field(default_factory=list)  # a synopsis' continuation: its command's words
    external: bool = False  # an inline span that is the text of a link to a URL: names something elsewhere

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


FENCE = re.compile(r"^\s*(`{3,}|~{3,})")  # any indent: fences inside list items
INLINE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
EXTERNAL_LINK = re.compile(r"\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?[a-zA-Z][a-zA-Z0-9+.-]*:")


def snippets(text: str, name: str) -> list[Snippet]:
    """The code of a markdown page: code blocks as logical lines (backslash continuations joined), inline
    code spans of the prose (a span may cross a line break, never a blank line), and prose lines."""
    out: list[Snippet] = []
    lines = text.split("\n")
    fence: str | None = None
    block: list[tuple[int, str]] = []
    para: list[tuple[int, str]] = []

    def flush_para() -> None:
        if not para:
            return
        joined = "\n".join(line for _, line in para)
        starts = []
        offset = 0
        for number, line in para:
            starts.append((offset, number))
            offset += len(line) + 1
        elsewhere = [m.span(1) for m in EXTERNAL_LINK.finditer(joined)]
        for match in INLINE.finditer(joined):
            number = max(n for o, n in starts if o <= match.start())
            external = any(a <= match.start() and match.end() <= b for a, b in elsewhere)
            out.append(Snippet(name, number, match.group(2).replace("\n", " ").strip(), "inline", external=external))
        for number, line in para:
            out.append(Snippet(name, number, INLINE.sub(" ", line), "prose"))
        para.clear()

    for number, line in enumerate(lines, 1):
        opened = FENCE.match(line)
        if fence is None:
            if opened:
                flush_para()
                fence = opened.group(1)
                block = []
            elif not line.strip():
                flush_para()
            else:
                para.append((number, line))
        elif opened and opened.group(1)[0] == fence[0] and len(opened.group(1)) >= len(fence) \
                and not line.strip()[len(opened.group(1)):].strip():
            out.extend(code_lines(block, name))
            fence = None
        else:
            block.append((number, line))
    if fence is not None:
        out.extend(code_lines(block, name))
    flush_para()
    return out


def code_lines(block: list[tuple[int, str]], name: str) -> list[Snippet]:
    """Logical lines: `\\` continuations joined. A synopsis line that starts with `[--` or `--` under a
    `lookalike SUB` line continues that command (the synopsis style `lookalike serve [--a] ...`, wrapped)."""
    out: list[Snippet] = []
    pending: tuple[int, str] | None = None
    for number, line in block:
        if pending is not None:
            number, line = pending[0], pending[1] + " " + line.strip()
            pending = None
        if line.rstrip().endswith("\\"):
            pending = (number, line.rstrip()[:-1])
            continue
        out.append(Snippet(name, number, line, "code"))
    if pending is not None:
        out.append(Snippet(name, pending[0], pending[1], "code"))
    previous: list[str] = []
    for snippet in out:
        stripped = snippet.text.strip()
        if previous and (stripped.startswith("--") or stripped.startswith("[-")):
            snippet.prefix = previous
        else:
            found = [c for c in commands(snippet.text) if c.program == "lookalike"]
            previous = ["lookalike", *subcommand_words(found[-1].args)] if found else []
    return out


def subcommand_words(args: list[str]) -> list[str]:
    """The subcommand path at the start of a lookalike command's arguments: `index` of `index CATALOG`."""
    words = []
    for arg in args[:2]:
        if not re.fullmatch(r"[a-z][a-z0-9-]*", arg):
            break
        words.append(arg)
    return words


@cache
def all_snippets() -> tuple[Snippet, ...]:
    found: list[Snippet] = []
    for path in doc_files():
        found.extend(snippets(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))))
    return tuple(found)


def code_snippets() -> list[Snippet]:
    return [s for s in all_snippets() if s.kind != "prose"]


# --- commands in a line -------------------------------------------------------------------------

@dataclass
class Command:
    program: str          # "lookalike", "make", or the command word as written
    args: list[str]       # the tokens after it, up to the end of the command
    env: list[str]        # NAME=value assignments before it
    via_env: bool = False  # `env NAME=value cmd`: set by env(1), not by the shell


SEPARATORS = {";", "&&", "||", "|", "&", "(", "$(", "`", "=", "$", "then", "do", "else", "or", "e.g.", "i.e.",
              "->", "→"}
TERMINATORS = {";", "&&", "||", "|", "&", ">", ">>", "2>", "2>&1", "&>", "<", ")", "`", "->", "→"}
PREFIX_WORDS = {"sudo", "exec", "nohup", "setsid", "time", "env", "command"}
ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=")


def program_of(token: str) -> str:
    word = token.lstrip("(`\"'")
    if word in ("$(MAKE)", "${MAKE}", "make", "gmake"):
        return "make"
    if word == "lookalike" or re.fullmatch(r"(?:\S*bin|\$\(BIN\)|\$\{BIN\})/lookalike", word):
        return "lookalike"
    return word


# A shell word: quoted strings (an unclosed quote runs to the end of the line) and $(...) do not split.
WORD = re.compile(r"""(?:\$\([^()]*\)|'[^']*(?:'|$)|"(?:[^"\\]|\\.)*(?:"|$)|[^\s'"])+""")


def commands(text: str) -> list[Command]:
    """The commands of one line of shell (or of an inline span), found where a command can start: at the
    start, after ; && || | ( $( `, after a word that ends with ':' ('Try:', 'or:'), after '= ' (the
    '# = lookalike eval ...' comments), after env assignments and sudo/exec/nohup. In a comment, only
    after those markers: '# make sure ...' is prose."""
    tokens = WORD.findall(text)
    found: list[Command] = []
    start, env, via_env = True, [], False

    def assignments_alone() -> None:  # NAME=value with no command after it: a shell variable of the page
        if env:
            found.append(Command("", [], list(env), via_env))

    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("#"):  # a comment: prose, until a marker ('=', 'Try:') starts a command
            assignments_alone()
            start, env, via_env = False, [], False
            i += 1
            continue
        if token in SEPARATORS or token.endswith((";", ":")):
            assignments_alone()
            start, env, via_env = True, [], False
            i += 1
            continue
        if start and ASSIGNMENT.match(token):
            env.append(token)
            i += 1
            continue
        if start and token in PREFIX_WORDS:
            via_env = via_env or token == "env"
            i += 1
            continue
        if not start:
            i += 1
            continue
        program = program_of(token)
        args: list[str] = []
        j = i + 1
        while j < len(tokens):
            arg = tokens[j]
            if arg in TERMINATORS or arg.startswith("#") or (arg.endswith(":") and not arg.endswith("::")):
                break  # a word that ends with ':' ends a phrase: (on a GPU: make engine)
            closing = arg.endswith((")", ";", "`")) and arg.count("(") < arg.count(")") + arg.endswith((";", "`"))
            if closing:
                args.append(arg.rstrip(");`"))
                j += 1
                break
            args.append(arg)
            j += 1
        found.append(Command(program, args, env, via_env))
        start, env, via_env = False, [], False
        i = j
    assignments_alone()
    return found


def strip_token(token: str) -> str:
    return token.strip("[](){}\"'`,;").rstrip(".:")


def is_placeholder(word: str) -> bool:
    """COMMAND, SUB, <command>, ...: a stand-in, not a name."""
    return bool(re.fullmatch(r"[A-Z][A-Z0-9_]*|<[^>]*>|\.\.\.|…", word))


FLAG = re.compile(r"^(--?[A-Za-z0-9][A-Za-z0-9-]*)")


def flags_in(args: list[str]) -> list[str]:
    out = []
    for arg in args:
        for piece in arg.split("|"):
            piece = piece.lstrip("[({\"'")
            if piece == "--" or not piece.startswith("-"):
                continue
            match = FLAG.match(piece)
            if match and (match.group(1).startswith("--") or len(match.group(1)) == 2) and not match.group(1)[1:].isdigit():
                out.append(match.group(1))
    return out


# --- the Makefile -------------------------------------------------------------------------------

@dataclass
class Makefile:
    targets: set[str]
    phony: set[str]
    variables: set[str]
    rules: dict[str, tuple[list[str], list[str]]]  # target -> (prerequisites, recipe lines), expanded
    values: dict[str, str]


def logical_lines(text: str) -> list[str]:
    out: list[str] = []
    pending = ""
    for line in text.split("\n"):
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        out.append(pending)
    return out


VARIABLE = re.compile(r"^\s*(?:override\s+|export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*(?::{1,3}|\?|\+|!)?=")
RULE = re.compile(r"^([^\s:=#][^:=#]*?)\s*::?(?!=)(.*)$")


def expand(text: str, values: dict[str, str], depth: int = 0) -> str:
    if depth > 8:
        return text
    expanded = re.sub(r"\$[({]([A-Za-z_][A-Za-z0-9_]*)[)}]", lambda m: values.get(m.group(1), m.group(0)), text)
    return expanded if expanded == text else expand(expanded, values, depth + 1)


def parse_makefile(text: str) -> Makefile:
    values: dict[str, str] = {}
    variables: set[str] = set()
    raw_rules: list[tuple[str, str, list[str]]] = []
    current: list[str] | None = None
    for line in logical_lines(text):
        if line.startswith("\t"):
            if current is not None:
                current.append(line.strip())
            continue
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        assigned = VARIABLE.match(line)
        if assigned:
            variables.add(assigned.group(1))
            values.setdefault(assigned.group(1), line.split("=", 1)[1].split("#")[0].strip())
            current = None
            continue
        rule = RULE.match(line)
        if rule:
            current = []
            raw_rules.append((rule.group(1), rule.group(2).split("#")[0], current))
        else:
            current = None
    variables |= set(re.findall(r"\$[({]([A-Za-z_][A-Za-z0-9_]*)[)}]", text))
    rules: dict[str, tuple[list[str], list[str]]] = {}
    phony: set[str] = set()
    targets: set[str] = set()
    for names, prerequisites, recipe in raw_rules:
        deps = expand(prerequisites, values).split()
        for name in expand(names, values).split():
            if name == ".PHONY":
                phony.update(deps)
                continue
            targets.add(name)
            old = rules.get(name, ([], []))
            rules[name] = (old[0] + deps, old[1] + [expand(r, values) for r in recipe])
    return Makefile(targets | phony, phony, variables, rules, values)


@cache
def makefile() -> Makefile:
    return parse_makefile(MAKEFILE.read_text(encoding="utf-8"))


OUTPUT = re.compile(r"(?:--out|--html|--csv|--target|-m venv|mkdir -p|>)\s+([^\s;|&]+)")


def make_outputs(mk: Makefile) -> dict[str, str]:
    """What each target's recipes write, as path -> the (phony) target that runs them: the file targets
    of rules, and --out/--html/--csv/--target DIR, `python -m venv DIR`, `mkdir -p DIR`, `> FILE`. A file
    rule's outputs belong to the phony target that depends on it (.venv/.setup-done -> setup)."""
    outputs: dict[str, str] = {}
    for name, (_, recipe) in mk.rules.items():
        if name == "clean":
            continue
        # the alias that only depends on it (setup, export, catalog) before targets that also use it
        owners = [name] if name in mk.phony else sorted(
            (p for p in mk.phony if name in mk.rules.get(p, ([], []))[0]),
            key=lambda p: (bool(mk.rules[p][1]), len(mk.rules[p][0]), p))
        owner = owners[0] if owners else name
        paths = [] if name in mk.phony else [name]
        for line in recipe:
            if not line.lstrip("@-+ ").startswith(("#", "echo")):  # comments and messages write nothing
                paths += [m.group(1) for m in OUTPUT.finditer(line)]
        for path in paths:
            path = path.strip("\"'").rstrip("/")
            if path.startswith("./"):
                path = path[2:]
            if path and not path.startswith(("/", "$", "-")) and "$(" not in path:
                outputs.setdefault(path, owner)
    return outputs


# --- the checkout -------------------------------------------------------------------------------

@cache
def repo_files() -> frozenset[str]:
    """Files git tracks, and new files of this checkout that git does not ignore (a rewrite in progress
    names them before they are committed); only those on disk."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout, or no git: {exc}")
    return frozenset(p for p in listed.decode().split("\0") if p and (ROOT / p).exists())


@cache
def repo_dirs() -> frozenset[str]:
    dirs = set()
    for path in repo_files():
        parts = path.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return frozenset(dirs)


def git_ignored(paths: list[str]) -> set[str]:
    if not paths:
        return set()
    run = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=ROOT, input="\n".join(paths) + "\n",
                         capture_output=True, text=True, timeout=60)
    return set(run.stdout.split())


# --- extractors ---------------------------------------------------------------------------------

def lookalike_commands(snips: list[Snippet]) -> list[tuple[Snippet, Command]]:
    out = []
    for s in snips:
        if s.kind == "prose":
            continue
        text = " ".join([*s.prefix, s.text.strip()]) if s.prefix else s.text
        out.extend((s, c) for c in commands(text) if c.program == "lookalike")
    return out


def make_commands(snips: list[Snippet]) -> list[tuple[Snippet, Command]]:
    return [(s, c) for s in snips if s.kind != "prose" for c in commands(s.text) if c.program == "make"]


def make_names(command: Command) -> tuple[list[str], list[str]]:
    """(targets, variables) of one `make ...` command."""
    targets, variables = [], []
    skip = False
    for raw in command.args:
        if skip:
            skip = False
            continue
        token = strip_token(raw)
        if raw in ("-C", "-f", "-I", "-o", "-W") or token in ("-C", "-f", "-I", "-o", "-W"):
            skip = True
            continue
        if not token or token.startswith("-") or token.isdigit():  # options, and -j's N
            continue
        assigned = ASSIGNMENT.match(token)
        if assigned:
            variables.append(assigned.group(1))
        elif re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-/]*", token) and not is_placeholder(token):
            targets.append(token)
    return targets, variables


NAME = r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*"
DOLLAR = re.compile(r"(?<![$\\])\$\{?(" + NAME + r")(?![A-Za-z0-9_(])")
DOCKER_ENV = re.compile(r"(?:^|\s)(?:-e|--env)[\s=]+(" + NAME + r")(?:=|\s|$)")
BARE = re.compile(r"(?<![\w$./-])(" + NAME + r")(?![\w-])")


def env_names(snippet: Snippet, prefixes: frozenset[str]) -> list[str]:
    """$NAME, ${NAME}, NAME=value before a command (not make's VAR=value), `export NAME[=value]`,
    `docker run -e NAME`, and names alone with the prefix of a variable that the code reads."""
    text = snippet.text
    names = DOLLAR.findall(text)
    for command in commands(text):
        if command.program:  # NAME=value before a command: its environment (alone, a shell variable)
            names += [ASSIGNMENT.match(e).group(1) for e in command.env]  # type: ignore[union-attr]
        if command.program in ("export", "unset"):
            names += [strip_token(a).split("=")[0] for a in command.args]
    names += DOCKER_ENV.findall(text)
    names += [n for n in BARE.findall(text) if any(n.startswith(p) for p in prefixes)]
    return [n for n in dict.fromkeys(names) if re.fullmatch(NAME, n)]


PATH_TOKEN = re.compile(r"(?:[^\s`'\"()\[\]<>{},;]|\{[^\s{}]*\}|<[^\s<>]*>)+")


@cache
def top_level() -> tuple[frozenset[str], frozenset[str]]:
    """(top-level files, top-level directories) of the checkout and of what make targets write."""
    files = {p for p in repo_files() if "/" not in p}
    dirs = {p.split("/")[0] for p in repo_files() if "/" in p}
    generated = {p.split("/")[0] for p in [*GENERATED, *make_outputs(makefile())]}
    return frozenset(files), frozenset(dirs | generated)


def path_candidates(text: str) -> list[str]:
    """Tokens that name a path of the checkout: they start with one of its top-level directories and a
    '/', or are one of its top-level files. URLs, absolute paths (container paths: /models) and words
    without a slash are not paths."""
    files, dirs = top_level()
    out = []
    for match in PATH_TOKEN.finditer(text):
        token = match.group(0)
        if "://" in token or token.startswith(("/", "~", "$", "@", "http")):
            continue
        if match.start() > 0 and text[match.start() - 1] in "/.:$@=-~\\":
            continue
        token = token[2:] if token.startswith("./") else token
        token = token.split("::")[0]                      # tests/unit/test_x.py::test_y
        token = re.sub(r":\d+(?::\d+)?$", "", token)      # lookalike/cli.py:42
        token = token.split(":")[0] if token.count(":") == 1 and "/" in token.split(":")[0] else token
        token = token.rstrip(".,;:!?'")
        token = re.sub(r"'s$", "", token)
        first = token.split("/")[0]
        if ("/" in token and first in dirs) or token in files:
            out.append(token)
    return out


def brace_expand(path: str) -> list[str]:
    match = re.search(r"\{([^{}]*,[^{}]*)\}", path)
    if not match:
        return [path]
    return [e for option in match.group(1).split(",") for e in brace_expand(path[:match.start()] + option + path[match.end():])]


def as_pattern(path: str) -> str:
    """Placeholders become wildcards: <name>, NAME and N components, '...'."""
    parts = []
    for part in path.rstrip("/").split("/"):
        part = re.sub(r"<[^>]*>", "*", part).replace("...", "*").replace("…", "*")
        stem = part.split(".")[0]
        if re.fullmatch(r"[A-Z][A-Z0-9_]*", stem) and part not in top_level()[0] and stem not in ("README", "LICENSE", "NOTICE"):
            part = "*" + part[len(stem):]
        parts.append(part)
    return "/".join(parts)


def path_exists(path: str) -> bool:
    files, dirs = repo_files(), repo_dirs()
    for candidate in brace_expand(path):
        pattern = as_pattern(candidate)
        if any(ch in pattern for ch in "*?["):
            if any(fnmatch.fnmatchcase(p, pattern) or fnmatch.fnmatchcase(p, pattern + "/*") for p in files):
                continue
            if any(fnmatch.fnmatchcase(d, pattern) for d in dirs):
                continue
        elif pattern in files or pattern in dirs:
            continue
        if generated_by(pattern) is None:
            return False
    return True


def generated_by(path: str) -> str | None:
    """The make target that writes `path`, or writes into the folder `path` (results/ holds results/eval)."""
    parts = path.rstrip("/").split("/")
    for written, target in {**make_outputs(makefile()), **GENERATED}.items():
        wparts = written.split("/")
        if len(parts) >= len(wparts):  # at or under what the target writes
            if all(fnmatch.fnmatchcase(parts[i], wparts[i]) for i in range(len(wparts))):
                return target
        elif all(fnmatch.fnmatchcase(wparts[i], parts[i]) or fnmatch.fnmatchcase(parts[i], wparts[i])
                 for i in range(len(parts))):  # a folder above it
            return target
    return None


# (?=(...))\1: the dotted name taken whole (no backtracking to a shorter one: lookalike.example.com/x is none)
MODULE = re.compile(r"(?<![\w./@-])(?=((?:lookalike|lookalike_client|lookalike_export|loadtest)(?:\.[A-Za-z_][A-Za-z0-9_]*)+))\1"
                    r"(?![\w/:-])")
FROM_IMPORT = re.compile(r"from\s+((?:lookalike|lookalike_client|lookalike_export|loadtest)[\w.]*)\s+import\s+\(?([\w\s,]+)")
PACKAGE_DIRS = {"lookalike": "lookalike", "lookalike_client": "client/lookalike_client", "lookalike_export": "export",
                "loadtest": "loadtest"}


def module_names(text: str) -> list[str]:
    names = [m for m in MODULE.findall(text) if not m.endswith((".py", ".md", ".json", ".txt", ".yaml", ".yml"))]
    for module, imported in FROM_IMPORT.findall(text):
        names += [f"{module}.{n.strip()}" for n in imported.split(",") if n.strip().isidentifier()]
    return names


def defines(source: str, name: str) -> bool:
    if "import *" in source:
        return True
    patterns = [rf"(?m)^\s*(?:async\s+)?(?:def|class)\s+{name}\b", rf"(?m)^\s*{name}\s*(?::[^=\n]*)?=",
                rf"(?m)^\s*(?:from\s+\S+\s+)?import\s+[^\n(]*\b{name}\b", rf"\bimport\s*\([^)]*\b{name}\b[^)]*\)",
                rf"""["']{name}["']"""]
    return any(re.search(p, source) for p in patterns)


def module_problem(dotted: str) -> str | None:
    """None when the module exists (and its first attribute after the module, if any, is defined)."""
    parts = dotted.split(".")
    base = ROOT / PACKAGE_DIRS[parts[0]]
    if not base.is_dir():
        return f"no {PACKAGE_DIRS[parts[0]]}/"
    for i, part in enumerate(parts[1:], 1):
        if (base / part).is_dir() and ((base / part / "__init__.py").exists() or parts[0] == "loadtest"):
            base = base / part
            continue
        if (base / f"{part}.py").is_file():  # a module: its first attribute, if any, is defined there
            module, rest = base / f"{part}.py", parts[i + 1:]
            if rest and not defines(module.read_text(encoding="utf-8"), rest[0]):
                return f"{module.relative_to(ROOT)} defines no {rest[0]}"
            return None
        init = base / "__init__.py"  # a name of the package, else a module that is not there
        if not init.is_file() or not defines(init.read_text(encoding="utf-8"), part):
            return f"no module {'.'.join(parts[:i + 1])} (nor a name {part} in {init.relative_to(ROOT)})"
        return None
    return None


@cache
def entry_point_groups() -> frozenset[str]:
    """pyproject.toml's entry-point groups (`lookalike.commands` is a group, not a module)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    return frozenset(re.findall(r"""(?m)^\[project\.entry-points\.["']?([^"'\]]+)["']?\]""", text))


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^\"']*[\"'])?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
HTML_LINK = re.compile(r"<(?:a|img)\s[^>]*?(?:href|src)=[\"']([^\"']+)[\"']", re.I)


def link_targets(line: str) -> list[str]:
    return LINK.findall(line) + REFERENCE.findall(line) + HTML_LINK.findall(line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (markdown and HTML removed) lower-cased, punctuation
    dropped except '-' and '_', each space a '-'."""
    text = re.sub(r"<[^>]+>", "", heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    text = path.read_text(encoding="utf-8")
    seen: dict[str, int] = {}
    found = set(re.findall(r"""<a\s+(?:name|id)=["']([^"']+)["']""", text))
    fence = None
    previous = ""
    for line in text.split("\n"):
        opened = FENCE.match(line)
        if opened:
            fence = None if fence else opened.group(1)
            continue
        if fence:
            continue
        heading = None
        atx = re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if atx:
            heading = atx.group(1)
        elif re.fullmatch(r"\s{0,3}(=+|-+)\s*", line) and previous.strip() and not previous.lstrip().startswith(("-", "*", "|")):
            heading = previous.strip()
        previous = line
        if heading is None:
            continue
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


# --- the parser ---------------------------------------------------------------------------------

@cache
def cli_parser() -> argparse.ArgumentParser:
    """`lookalike.cli.build_parser()`'s parser: every subcommand, the entry points' (export, engine) included."""
    from lookalike import cli

    build = getattr(cli, "build_parser", None)
    if build is None:
        pytest.fail("lookalike.cli has no build_parser(): the docs test needs the real parser, with every "
                    "subcommand (export and engine included), without running a command")
    built = build()
    parser, missing = built if isinstance(built, tuple) else (built, {})
    if missing:
        pytest.fail("lookalike subcommands that could not be registered here, so their flags cannot be checked "
                    f"(a stale install? pip install -e . again): {missing}")
    return parser


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def hidden(parser: argparse.ArgumentParser, flag: str) -> bool:
    action = parser._option_string_actions[flag]
    return action.help == argparse.SUPPRESS or bool(getattr(action, "deprecated", False))


@dataclass
class CliCheck:
    commands: int = 0
    flags: int = 0
    missing: list[str] = field(default_factory=list)
    deprecated: list[str] = field(default_factory=list)


def check_cli(pairs: list[tuple[Snippet, Command]], top: argparse.ArgumentParser) -> CliCheck:
    result = CliCheck()
    for snippet, command in pairs:
        result.commands += 1
        parser: argparse.ArgumentParser | None = top
        path = ["lookalike"]
        chose = False
        action: argparse.Action | None = None  # the flag before this token, whose value it may be
        for raw in command.args:
            if parser is None:
                break
            flags = flags_in([raw])
            if not flags and action is not None and action.choices:
                values = [v for v in strip_token(raw).split("|") if v and not is_placeholder(v)]
                wrong = [v for v in values if v not in [str(c) for c in action.choices]]
                if wrong:
                    result.missing.append(f"{snippet.where}: `{' '.join(path)} {action.option_strings[0]} {raw}`: "
                                          f"{', '.join(wrong)} not among its choices ({', '.join(map(str, action.choices))})")
            action = None
            for flag in flags:
                result.flags += 1
                if flag not in parser._option_string_actions:
                    result.missing.append(f"{snippet.where}: `{' '.join(path)} {flag}`: no such option")
                    continue
                taken = parser._option_string_actions[flag]
                action = None if "=" in raw or taken.nargs == 0 else taken  # the next token is its value
                if hidden(parser, flag):
                    result.deprecated.append(f"{snippet.where}: `{' '.join(path)} {flag}` is hidden from --help "
                                             "(a deprecated spelling): name the current one")
            word = strip_token(raw)
            if not word or raw.lstrip("[({\"'").startswith("-") or action is not None:
                continue
            choices = subcommands(parser)
            if choices and not chose:
                if is_placeholder(word) or not re.fullmatch(r"[a-z][a-z0-9_-]*", word):
                    parser = None
                elif word in choices:
                    parser, path = choices[word], [*path, word]
                    chose = not subcommands(parser)
                else:
                    result.missing.append(f"{snippet.where}: `lookalike {' '.join([*path[1:], word])}`: no such "
                                          f"subcommand (there are: {', '.join(sorted(choices))})")
                    parser = None
    return result


# --- unit tests of the extractors ---------------------------------------------------------------

SAMPLE = """# Title

Run `make demo`, then `lookalike query photo.jpg --top-k 5` (see [the docs](docs/x.md#the-flags)).
A span across lines: `lookalike index
data/catalog.csv --full`.

```bash
make setup export catalog     # = lookalike eval data/c.csv --simulate 1
LOOKALIKE_URL=localhost:8001 .venv/bin/uvicorn app:app
make loadtest [USERS=16 PROTOCOL=both|grpc|http]
export LOOKALIKE_ADMIN_KEY=$(openssl rand -hex 16)
docker run -e LOOKALIKE_ADMIN_KEY -v "$PWD/model_repository:/models" lookalike:24.10
helm install lookalike deploy/helm/lookalike --set image.tag=1   # not a lookalike command
.venv/bin/lookalike serve --model-repository model_repository \\
  --http-port 8000 | tee .run/log
```

```
lookalike index  CATALOG [--url localhost:8001]... [--hnsw-m 32]
                 [--full] [--keep-versions 2]
(on a GPU: make engine) token in ${LOOKALIKE_MILVUS_TOKEN}
```
"""


def test_snippets_split_code_blocks_inline_spans_and_prose():
    snips = snippets(SAMPLE, "X.md")
    inline = [(s.line, s.text) for s in snips if s.kind == "inline"]
    assert inline == [(3, "make demo"), (3, "lookalike query photo.jpg --top-k 5"), (4, "lookalike index data/catalog.csv --full")]
    code = [s for s in snips if s.kind == "code"]
    assert [s.line for s in code][:2] == [8, 9]
    joined = next(s for s in code if "serve" in s.text)
    assert joined.line == 14 and "--http-port 8000" in joined.text  # the backslash continuation
    synopsis = next(s for s in code if s.text.strip().startswith("[--full]"))
    assert synopsis.prefix == ["lookalike", "index"] and synopsis.line == 20
    assert [s.line for s in snips if s.kind == "prose" and "docs/x.md" in s.text] == [3]


def test_commands_find_make_and_lookalike_where_a_command_starts():
    found = [(c.program, c.args) for c in commands("make setup export catalog     # = lookalike eval data/c.csv --simulate 1")]
    assert found == [("make", ["setup", "export", "catalog"]), ("lookalike", ["eval", "data/c.csv", "--simulate", "1"])]
    assert [c.program for c in commands("helm install lookalike deploy/helm/lookalike   # not a lookalike command")] == ["helm"]
    assert [c.program for c in commands("# make sure it runs")] == []
    assert [(c.program, c.args) for c in commands("(on a GPU: make engine) token") if c.program == "make"] == [("make", ["engine"])]
    assert [(c.program, c.env) for c in commands("A=1 B=2 $(BIN)/lookalike serve")] == [("lookalike", ["A=1", "B=2"])]
    assert [c.program for c in commands("cd x && sudo .venv/bin/lookalike index | tee y")] == ["cd", "lookalike", "tee"]
    assert flags_in(["[--url", "localhost:8001]...", "[--index", "auto|flat]", "--m=4", "-h", "-1", "--"]) == \
        ["--url", "--index", "--m", "-h"]


def test_make_names_are_targets_and_variables():
    (command,) = commands("make loadtest [USERS=16 PROTOCOL=both|grpc|http] -j 2 bench-gpu")
    assert make_names(command) == (["loadtest", "bench-gpu"], ["USERS", "PROTOCOL"])
    mk = parse_makefile("A ?= 1\nB := $(A)/x\n.PHONY: one two\none: $(B)/file\n\trun $(C) --out $(B)/res\n"
                        "\t@echo try: x --html not-written.html\n$(B)/file:\n\ttouch $@\n")
    assert mk.targets == {"one", "two", "1/x/file"} and mk.phony == {"one", "two"} and mk.variables == {"A", "B", "C"}
    assert make_outputs(mk) == {"1/x/res": "one", "1/x/file": "one"}


def test_env_names_and_path_candidates():
    snips = [s for s in snippets(SAMPLE, "X.md") if s.kind == "code"]
    names = [n for s in snips for n in env_names(s, frozenset({"LOOKALIKE_"}))]
    assert names == ["LOOKALIKE_URL", "LOOKALIKE_ADMIN_KEY", "PWD", "LOOKALIKE_ADMIN_KEY", "LOOKALIKE_MILVUS_TOKEN"]
    assert "USERS" not in names and "PROTOCOL" not in names  # make's variables
    text = ("see lookalike/cli.py:42, tests/unit/test_x.py::test_y and docs/a.md. Not: /models, https://x/lookalike/y, "
            "registry.example.com/lookalike, lookalike:24.10, lookalike, $PWD/model_repository:/models")
    assert path_candidates(text) == ["lookalike/cli.py", "tests/unit/test_x.py", "docs/a.md"]
    assert path_candidates("`Makefile`, `model_repository/embedder/` and `results/bench/bench.{json,md}`") == \
        ["Makefile", "model_repository/embedder/", "results/bench/bench.{json,md}"]
    assert brace_expand("r/b.{json,md}") == ["r/b.json", "r/b.md"]
    assert as_pattern("model_repository/product_search/N/index.faiss") == "model_repository/product_search/*/index.faiss"
    assert as_pattern("configs/<name>.pbtxt") == "configs/*.pbtxt"


def test_path_existence_counts_tracked_and_generated_paths():
    assert path_exists("lookalike/cli.py") and path_exists("deploy/helm/") and path_exists("Makefile")
    assert path_exists("tests/unit/test_*.py")
    assert not path_exists("lookalike/no_such_module.py")
    assert not path_exists("tests/unit/no_such_test.py")
    assert generated_by(".venv/bin/lookalike") == "setup"
    assert generated_by("model_repository/embedder/preprocessing.json") == "export"
    assert generated_by("model_repository/product_search/3/index.faiss") == "demo"
    assert generated_by("data/sample_catalog/catalog.csv") == "catalog"
    assert generated_by("results/") is not None
    assert generated_by("model_repository/embedder/1/model.py") is None


def test_modules_links_and_anchors():
    assert module_names("python -m lookalike_export.gpu_check; lookalike.cli.main, lookalike/cli.py, "
                        "x.lookalike.y, lookalike.example.com/a") == ["lookalike_export.gpu_check", "lookalike.cli.main"]
    assert module_names("from lookalike_client import LookalikeClient, RetryPolicy") == \
        ["lookalike_client.LookalikeClient", "lookalike_client.RetryPolicy"]
    assert module_problem("lookalike.cli.main") is None
    assert module_problem("lookalike.cli.no_such_function") is not None
    assert module_problem("lookalike.no_such_module") is not None
    assert module_problem("lookalike_client.LookalikeClient") is None
    assert link_targets("![pic](docs/bench.png) and [x](https://a/b) [y](#z \"title\")") == ["docs/bench.png", "https://a/b", "#z"]
    assert slug("Your own catalog, in `3` commands!") == "your-own-catalog-in-3-commands"
    assert slug("`--hnsw-m` & friends") == "--hnsw-m--friends"


def test_the_cli_check_finds_subcommands_flags_and_hidden_spellings():
    top = argparse.ArgumentParser(prog="lookalike")
    sub = top.add_subparsers(dest="command")
    index = sub.add_parser("index")
    index.add_argument("--hnsw-m")
    index.add_argument("--m", help=argparse.SUPPRESS)
    index.add_argument("--index", choices=("flat", "hnsw"))
    snips = snippets("```\nlookalike index CAT --hnsw-m 3 --m 4 --nope\nlookalike COMMAND --x\nlookalike bogus\n"
                     "lookalike index [--index flat|hnsw] [--index KIND] --index ivf\n```\n", "X.md")
    result = check_cli(lookalike_commands(snips), top)
    assert result.commands == 4 and result.flags == 6
    assert [m.split(": ", 1)[1] for m in result.missing] == [
        "`lookalike index --nope`: no such option", "`lookalike bogus`: no such subcommand (there are: index)",
        "`lookalike index --index ivf`: ivf not among its choices (flat, hnsw)"]
    assert len(result.deprecated) == 1 and "--m" in result.deprecated[0]


# --- the docs -----------------------------------------------------------------------------------

def report(title: str, offenders: list[str]) -> str:
    return f"{title} ({len(offenders)}):\n  " + "\n  ".join(offenders)


def test_the_docs_name_enough_for_these_checks_to_mean_something():
    snips = code_snippets()
    counts = {
        "make targets": sum(len(make_names(c)[0]) for _, c in make_commands(snips)),
        "lookalike commands": len(lookalike_commands(snips)),
        "lookalike flags": sum(len(flags_in(c.args)) for _, c in lookalike_commands(snips)),
        "paths": sum(len(path_candidates(s.text)) for s in snips),
        "environment variables": sum(len(env_names(s, env_prefixes())) for s in snips),
        "links": sum(len(link_targets(s.text)) for s in all_snippets() if s.kind == "prose"),
    }
    low = {k: v for k, v in counts.items() if v < MIN_FOUND[k]}
    assert not low, f"the extractors found too little in {[str(p.relative_to(ROOT)) for p in doc_files()]}: {low} (minimum {MIN_FOUND})"


def test_make_targets_and_variables_named_in_the_docs_exist():
    mk = makefile()
    offenders = []
    for snippet, command in make_commands(code_snippets()):
        targets, variables = make_names(command)
        if any(is_placeholder(strip_token(a)) for a in command.args if "=" not in a):
            continue  # `make TARGET NAME=value`: the syntax, not a target
        offenders += [f"{snippet.where}: `make {t}`: no such target in the Makefile" for t in targets if t not in mk.targets]
        offenders += [f"{snippet.where}: `make ... {v}=`: the Makefile neither sets nor reads {v}" for v in variables
                      if v not in mk.variables]
    assert not offenders, report("make targets and variables that the Makefile lacks", offenders)


def test_lookalike_subcommands_and_flags_named_in_the_docs_exist():
    result = check_cli(lookalike_commands(code_snippets()), cli_parser())
    if result.deprecated:
        warnings.warn(report("deprecated spellings named in the docs", result.deprecated), stacklevel=1)
    message = report("lookalike subcommands and flags that `lookalike.cli.build_parser()` lacks", result.missing)
    if result.deprecated:
        message += "\n" + report("(and, accepted but hidden from --help: deprecated spellings)", result.deprecated)
    assert not result.missing, message


@cache
def env_corpus() -> str:
    """What reads the environment: the code (the packages, client/, export/, loadtest/, scripts/, examples/,
    the model stubs), the Makefile, the Dockerfile and docker/, docker-compose.yml, the Helm chart."""
    roots = ("lookalike/", "client/", "export/", "loadtest/", "scripts/", "examples/", "model_repository/",
             "docker/", "deploy/")
    tops = ("Makefile", "Dockerfile", "docker-compose.yml")
    texts = []
    for path in sorted(repo_files()):
        if (path.startswith(roots) or path in tops) and not path.endswith((".md", ".png", ".jpg", ".onnx", ".plan")):
            try:
                texts.append((ROOT / path).read_text(encoding="utf-8"))
            except (UnicodeDecodeError, IsADirectoryError):
                continue
    return "\n".join(texts)


READS = [r"environ(?:\.get)?\s*[(\[]\s*[\"'](" + NAME + r")[\"']", r"getenv\(\s*[\"'](" + NAME + r")[\"']",
         r"_ENV\s*=\s*[\"'](" + NAME + r")[\"']", r"\$\{(" + NAME + r")", r"(?m)^\s*-?\s*name:\s*[\"']?(" + NAME + r")\b",
         r"(?m)^ENV\s+(" + NAME + r")"]


@cache
def env_prefixes() -> frozenset[str]:
    """LOOKALIKE_, and the prefix (up to the first '_') of every variable the code reads."""
    read = {n for pattern in READS for n in re.findall(pattern, env_corpus())}
    return frozenset({"LOOKALIKE_"} | {n.split("_")[0] + "_" for n in read if "_" in n})


def shell_variables(snips: list[Snippet]) -> dict[str, set[str]]:
    """Per page, the variables its own code assigns alone (HEADER='...' then "$HEADER"): not the environment."""
    local: dict[str, set[str]] = {}
    for snippet in snips:
        for command in commands(snippet.text):
            if not command.program:
                local.setdefault(snippet.file, set()).update(e.split("=")[0] for e in command.env)
    return local


def test_environment_variables_named_in_the_docs_exist():
    corpus = env_corpus()
    local = shell_variables(code_snippets())
    offenders, readonly = [], []
    for snippet in code_snippets():
        for name in env_names(snippet, env_prefixes()):
            if name in ALLOWED_ENV or name in local.get(snippet.file, ()):
                continue
            if not re.search(rf"(?<![A-Za-z0-9_]){name}(?![A-Za-z0-9_])", corpus):
                offenders.append(f"{snippet.where}: {name}: read by no code, Makefile, Dockerfile, compose file or chart")
        if snippet.kind != "code":
            continue  # prose may quote the command that fails, to say so
        for command in commands(snippet.text):
            readonly += [f"{snippet.where}: `{e}`: {e.split('=')[0]} is read-only in bash (the assignment fails; "
                         "`env NAME=value command` works)" for e in command.env
                         if e.split("=")[0] in BASH_READONLY and not command.via_env]
    assert not offenders + readonly, report("environment variables", offenders + readonly)


def test_repository_paths_named_in_the_docs_exist():
    offenders = []
    for snippet in code_snippets():
        if snippet.external:
            continue
        for path in path_candidates(snippet.text):
            if not path_exists(path):
                offenders.append(f"{snippet.where}: {path}: neither in git nor written by a make target")
    assert not offenders, report("paths", offenders)


def test_python_modules_named_in_the_docs_exist():
    groups = entry_point_groups()
    offenders = []
    for snippet in code_snippets():
        if snippet.external:
            continue
        for dotted in module_names(snippet.text):
            if dotted in groups or any(dotted.startswith(g + ".") for g in groups):
                continue
            problem = module_problem(dotted)
            if problem:
                offenders.append(f"{snippet.where}: {dotted}: {problem}")
    assert not offenders, report("modules", offenders)


def test_local_links_and_images_resolve():
    offenders = []
    tracked = repo_files() | repo_dirs()
    for snippet in all_snippets():
        if snippet.kind != "prose":
            continue
        page = ROOT / snippet.file
        for target in link_targets(snippet.text):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
                continue  # https:, mailto:
            file_part, _, anchor = target.partition("#")
            resolved = (page.parent / file_part).resolve() if file_part else page
            try:
                relative = resolved.relative_to(ROOT).as_posix()
            except ValueError:
                offenders.append(f"{snippet.where}: ({target}): outside the repository")
                continue
            if file_part and relative not in tracked:
                offenders.append(f"{snippet.where}: ({target}): {relative} is not in the repository")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                offenders.append(f"{snippet.where}: ({target}): no heading #{anchor} in {relative}")
    assert not offenders, report("local links", offenders)


def test_generated_paths_are_make_targets_outputs():
    """GENERATED's targets exist, and git ignores what it says targets write (else it would be tracked)."""
    mk = makefile()
    missing = [f"{path}: no make target {target}" for path, target in GENERATED.items() if target not in mk.targets]
    concrete = {path: path.replace("*", "x").replace("[0-9]", "7") + ("" if "." in path.split("/")[-1].lstrip(".") else "/x")
                for path in GENERATED}
    ignored = git_ignored(list(concrete.values()))
    missing += [f"{path}: git does not ignore it" for path, probe in concrete.items() if probe not in ignored]
    assert not missing, report("GENERATED", missing)
