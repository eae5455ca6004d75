"""Every command in the code blocks of README.md and docs/*.md still works as written (issue 25 item 6).

Each fenced `bash` block is split into commands (`\\` continuations joined, `NAME=value` lines substituted into
the lines after them, `# ...` comments dropped) and each command is checked without running it:
- `python train.py ...` parses with `train.parse_config` (types, class paths, every flag: a renamed flag fails);
- any other `python X.py ...` / `python -m M ...` runs in-process until its argument parser has parsed the
  documented arguments, and stops there (argparse and jsonargparse alike; `--help` must exit 0);
- `make T [VAR=value]`: T is a Makefile target and VAR a Makefile variable; `python -m pytest FILES`: the files exist;
- every repository path a command names (configs, scripts, results, assets, tests) exists. Paths under
  outputs/ or data/ are what the commands write, and paths outside the repository are the user's.
Commands that need what CI does not have — a GPU, several of them, a diffusers pipeline or the official weights
on disk — must say so with a trailing `# needs: ...` comment; like every command they are checked by parsing
only. `python` blocks are parsed and their imports of this project's modules resolved. The last tests prove the
check itself: a copy of a doc with a renamed config file, a renamed flag or an unmarked GPU command fails it.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import io
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import jsonargparse
import pytest

from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOC_PAGES = ["stages", "scale", "your_model", "evaluation", "reliability", "reproduction", "architecture"]
SHELL = {"bash", "sh", "shell", "console"}
PRODUCED = {"outputs", "data"}               # written by the documented commands, not shipped
EXTERNAL = {"tensorboard", "git", "cd", "pip", "nvidia-smi"}   # not this project's programs: nothing to check
NEEDS = re.compile(r"#\s*needs:\s*(?P<what>[^#]+)$")


@dataclass(frozen=True)
class Command:
    doc: str        # path relative to ROOT
    line: int       # 1-based line of the command's first line
    text: str       # the command as written (continuations joined, comment dropped)
    argv: tuple[str, ...]
    needs: str | None

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, line of the first content line, lines) of every fenced code block."""
    blocks, lang, start, body = [], None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            if lang is None:
                lang, start, body = line.strip()[3:].strip(), number + 1, []
            else:
                blocks.append((lang, start, body))
                lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def commands_of(doc: Path, text: str | None = None) -> list[Command]:
    text = doc.read_text() if text is None else text
    rel = str(doc.relative_to(ROOT)) if doc.is_relative_to(ROOT) else doc.name
    found = []
    for lang, start, body in fenced_blocks(text):
        if lang not in SHELL:
            continue
        env: dict[str, str] = {}
        logical, first = "", None
        for offset, raw in enumerate(body):
            first = start + offset if first is None else first
            stripped = raw.rstrip()
            if stripped.endswith("\\"):
                logical += stripped[:-1] + " "
                continue
            logical += stripped
            command = _command(rel, first, logical, env)
            if command is not None:
                found.append(command)
            logical, first = "", None
    return found


def _command(doc: str, line: int, logical: str, env: dict[str, str]) -> Command | None:
    needs = None
    for part in logical.split("\n"):
        match = NEEDS.search(part)
        if match:
            needs = match["what"].strip()
    for name, value in env.items():
        logical = re.sub(rf"\$\{{?{name}\b\}}?", value, logical)
    argv = shlex.split(logical, comments=True)
    if not argv:
        return None
    if len(argv) == 1 and re.fullmatch(r"[A-Za-z_]\w*=.*", argv[0]):
        name, value = argv[0].split("=", 1)
        env[name] = value
        return None
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):   # OMP_NUM_THREADS=1 python ...
        argv = argv[1:]
    text = logical.split(" #")[0].strip()
    return Command(doc, line, text, tuple(argv), needs)


def all_commands(docs: list[Path] = DOCS) -> list[Command]:
    seen, unique = set(), []
    for doc in docs:
        for command in commands_of(doc):
            if (command.argv, command.needs) not in seen:
                seen.add((command.argv, command.needs))
                unique.append(command)
    return unique


# --- parse without running --------------------------------------------------------------------------------


class Parsed(Exception):
    """Raised by the patched parsers once the documented arguments have parsed."""


@contextlib.contextmanager
def stop_after_parsing():
    depth = [0]
    originals = {cls: cls.parse_args for cls in (argparse.ArgumentParser, jsonargparse.ArgumentParser)}

    def wrap(original):
        def parse_args(self, *args, **kwargs):
            self.allow_abbrev = False   # a flag renamed to a longer name must not parse as its abbreviation
            depth[0] += 1
            try:
                result = original(self, *args, **kwargs)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                raise Parsed(result)
            return result
        return parse_args

    known = argparse.ArgumentParser.parse_known_args

    def parse_known_args(self, *args, **kwargs):   # subcommands' parsers come through here
        self.allow_abbrev = False
        return known(self, *args, **kwargs)

    for cls, original in originals.items():
        cls.parse_args = wrap(original)
    argparse.ArgumentParser.parse_known_args = parse_known_args
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.parse_args = original
        argparse.ArgumentParser.parse_known_args = known


_PARSED: dict[tuple[str, ...], str | None] = {}   # argv -> None (parses) or the error; shared by the proofs


def parse_error(argv: tuple[str, ...]) -> str | None:
    """None when the command's arguments parse (or its --help exits 0), else what its parser said."""
    if argv not in _PARSED:
        _PARSED[argv] = _parse_error(argv)
    return _PARSED[argv]


def _parse_error(argv: tuple[str, ...]) -> str | None:
    if argv[0] != "python" or len(argv) < 2:
        return f"not a python command: {argv}"
    if argv[1] == "-m":
        target, rest, run = argv[2], list(argv[3:]), lambda: runpy.run_module(argv[2], run_name="__main__",
                                                                                alter_sys=True)
    else:
        script = ROOT / argv[1]
        if not script.is_file():
            return f"no such script: {argv[1]}"
        target, rest, run = argv[1], list(argv[2:]), lambda: runpy.run_path(str(script), run_name="__main__")
    out, err = io.StringIO(), io.StringIO()
    saved_argv = sys.argv
    sys.argv = [target] if target == "train.py" else [target, *rest]   # train.parse_config takes its args
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            with stop_after_parsing():
                if target == "train.py":
                    import train
                    train.parse_config(rest)
                else:
                    run()
            return f"{target} ran to the end without parsing its arguments"
    except Parsed:
        return None
    except SystemExit as exit:
        if exit.code in (0, None):
            return None
        return f"exit {exit.code}: {(err.getvalue() or out.getvalue()).strip()[-1500:]}"
    finally:
        sys.argv = saved_argv
    return None


# --- paths, make, markers -----------------------------------------------------------------------------------


def named_paths(argv: tuple[str, ...]) -> list[str]:
    """Repository paths a command names: tokens (or `--flag=value` values) whose first component is a file or
    directory at the repository root, outputs/ and data/ excepted."""
    paths = []
    for token in argv[1:]:
        value = token.split("=", 1)[1] if token.startswith("-") and "=" in token else token
        if value.startswith("-") or value.startswith("/") or "://" in value or "{" in value:
            continue
        head = value.split("/", 1)[0]
        if head in PRODUCED or not head or head.startswith("$"):
            continue
        if ("/" in value or "." in head) and (ROOT / head).exists():
            paths.append(value)
    return paths


def make_error(argv: tuple[str, ...]) -> str | None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", makefile, flags=re.M))
    for token in argv[1:]:
        if "=" in token:
            name = token.split("=", 1)[0]
            if not re.search(rf"\$\({name}\)|^{name}\s*\??=", makefile, flags=re.M):
                return f"make variable {name} is not used by the Makefile"
        elif token not in targets:
            return f"make target {token!r} is not in the Makefile ({sorted(targets)})"
    return None


def needs_gpu_or_pipeline(argv: tuple[str, ...]) -> str | None:
    """What a command needs that CI does not have, from its arguments; None when a CPU suffices."""
    text = " ".join(argv)
    if "--pipeline" in argv or "--source videos" in text:
        return "a diffusers pipeline on disk"
    if any(k in text for k in ("convert-official", "export-diffusers")):
        return "weights of a real model on disk"
    if "DEVICE=cuda" in argv or "--device cuda" in text or "gpu_scale.py" in text or "accelerator gpu" in text:
        return "a GPU"
    devices = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--trainer.devices"]
    if devices and "accelerator cpu" not in text and int(devices[0]) > 1:
        return "GPUs"
    return None


def check(command: Command) -> list[str]:
    problems = []
    program = command.argv[0]
    if command.argv[:3] == ("python", "-m", "pytest"):
        pass   # pytest inside pytest: its test files are checked as paths below
    elif program == "python":
        error = parse_error(command.argv)
        if error:
            problems.append(error)
    elif program == "make":
        error = make_error(command.argv)
        if error:
            problems.append(error)
    elif program not in EXTERNAL:
        problems.append(f"unknown program {program!r}: teach tests/test_documented_commands.py to check it")
    for path in named_paths(command.argv):
        if not (ROOT / path).exists():
            problems.append(f"names {path}, which does not exist")
    needed = needs_gpu_or_pipeline(command.argv)
    if needed and not command.needs:
        problems.append(f"needs {needed} but carries no '# needs: ...' marker")
    return problems


def check_doc(doc: Path) -> list[str]:
    return [f"{c.id}: {p}" for c in commands_of(doc) for p in check(c)]


# --- the tests ----------------------------------------------------------------------------------------------

COMMANDS = all_commands()


def test_the_front_door_and_the_pages_exist():
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(readme) <= 250, f"README.md has {len(readme)} lines (at most 250)"
    head = "\n".join(readme[:40])
    assert "make demo" in head and "make test" in head, "both set-up commands belong in README.md's first 40 lines"
    for page in DOC_PAGES:
        assert (ROOT / "docs" / f"{page}.md").is_file(), f"docs/{page}.md is missing"
    assert len(COMMANDS) > 40, "the extraction found too few commands: is the block parsing broken?"


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_code_block_declares_its_language_and_every_link_resolves(doc):
    text = doc.read_text()
    untagged = [start - 1 for lang, start, _ in fenced_blocks(text) if not lang]
    assert not untagged, f"{doc.name}: code blocks without a language (```bash, ```text, ...) at lines {untagged}"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.id)
def test_documented_command(command):
    problems = check(command)
    assert not problems, f"{command.id}: `{command.text}`\n" + "\n".join(problems)


def python_snippets() -> list[tuple[str, int, str]]:
    return [(str(doc.relative_to(ROOT)), start, "\n".join(body))
            for doc in DOCS for lang, start, body in fenced_blocks(doc.read_text()) if lang == "python"]


@pytest.mark.parametrize("snippet", python_snippets(), ids=lambda s: f"{s[0]}:{s[1]}")
def test_python_snippets_parse_and_import_what_exists(snippet):
    doc, line, source = snippet
    tree = ast.parse(source, filename=f"{doc}:{line}")
    project = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in project:
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{doc}:{line}: {node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in project:
                    importlib.import_module(alias.name)


# --- the check proves itself on a copy of a doc -----------------------------------------------------------


@pytest.fixture
def stages_copy(tmp_path):
    doc = ROOT / "docs" / "stages.md"
    assert not check_doc(doc), "docs/stages.md must pass before its copies are broken"
    return doc.read_text(), tmp_path / "stages.md"


def test_a_renamed_config_file_fails_the_check(stages_copy):
    text, copy = stages_copy
    assert "configs/cfg_distill.yaml" in text
    copy.write_text(text.replace("configs/cfg_distill.yaml", "configs/cfg_distillation.yaml"))
    problems = check_doc(copy)
    assert problems and all("cfg_distillation.yaml" in p for p in problems), problems


def test_a_renamed_flag_fails_the_check(stages_copy):
    text, copy = stages_copy
    assert "--trainer.max_steps 500" in text and "--num_steps 50" in text
    copy.write_text(text.replace("--trainer.max_steps 500", "--trainer.max_step 500")
                        .replace("--num_steps 50", "--num_step 50"))
    problems = check_doc(copy)
    assert any("max_step" in p for p in problems), problems
    assert any("calibrate_teacache.py" in p or "num_step" in p for p in problems), problems


def test_an_unmarked_gpu_command_and_an_unknown_make_target_fail_the_check(tmp_path):
    copy = tmp_path / "scale.md"
    copy.write_text("```bash\n"
                    "python train.py --config configs/cfg_distill.yaml --config configs/strategy/ddp.yaml"
                    " --trainer.devices 8\n"
                    "make demos\n"
                    "```\n")
    problems = check_doc(copy)
    assert any("needs GPUs" in p for p in problems), problems
    assert any("make target 'demos'" in p for p in problems), problems
