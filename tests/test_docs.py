"""The user guide in ``docs/`` runs: every ``python`` block executes, every command line parses, every link resolves.

The README's command lines and links are checked the same way (its python tour reads a trained run, so it is not
executed).

* Each fenced ``python`` block of ``docs/*.md`` is executed as written, in its own namespace, with a temporary
  directory as the working directory (the blocks use only the bundled ``digits`` data and temporary files).
  Their assertions state properties (a bound is above the exact value, a certificate survives an attack), not
  random draws, so they hold for any seed and any ``PYTHONHASHSEED``.
* Each ``stablenet ...`` line of a ``bash`` block (also after ``torchrun ... -m stablenet.cli --``) is parsed by
  the command's own parser, so a renamed or removed flag fails here; ``train``'s extra ``--key value`` pairs must
  be config keys. Scripts (``python benchmarks/x.py``, ``bash benchmarks/x.sh``) and ``-c`` config files must exist.
* Relative links point to files that exist, and ``#anchors`` to headings of the linked page.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md"))
#: Pages whose command lines and links are checked (the user guide, the README and the benchmarks' page).
CHECKED = [*PAGES, ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def _blocks(language: str, pages: list[Path] = PAGES) -> list[tuple[str, int, str]]:
    """``(page, first line, code)`` of every fenced block in ``language``."""
    found = []
    for page in pages:
        text = page.read_text()
        for match in FENCE.finditer(text):
            if match.group(1) == language:
                line = text.count("\n", 0, match.start(2)) + 1
                found.append((page.name, line, match.group(2)))
    return found


PYTHON = _blocks("python")
BASH = _blocks("bash", CHECKED)


def test_pages_exist():
    names = {page.name for page in PAGES}
    assert {"spectral.md", "layers.md", "certificates.md", "smoothing.md", "curvature.md", "training.md"} <= names
    assert len(PYTHON) >= len(names)


#: ``(module, attribute)`` of every registry a page's example may add to: restored after each block, so an
#: example's registration does not leak into the rest of the test session.
REGISTRIES = [
    ("stablenet.train.optimizers", "_OPTIMIZERS"),
    ("stablenet.train.losses.registry", "_LOSSES"),
    ("stablenet.train.schedules", "_SCHEDULES"),
    ("stablenet.workflows.certifiers", "_CERTIFIERS"),
    ("stablenet.nn.families", "_FAMILIES"),
    ("stablenet.spectral.network", "_RULES"),
    ("stablenet.certify.rounding", "_RULES"),
    ("stablenet.data.datasets", "_REGISTRY"),
    ("stablenet.models.registry", "_REGISTRY"),
    ("stablenet.curvature.regularizers.registry", "REGULARIZERS"),
]


@pytest.fixture
def private_registries():
    """Each registry's content before the block, put back in the same dict afterwards (aliases see it too)."""
    import importlib

    saved = []
    for module_name, attribute in REGISTRIES:
        mapping = getattr(importlib.import_module(module_name), attribute)
        saved.append((mapping, dict(mapping)))
    yield
    for mapping, content in saved:
        mapping.clear()
        mapping.update(content)


@pytest.mark.usefixtures("one_thread", "private_registries")  # tiny problems: threads would only contend
@pytest.mark.parametrize(("page", "line", "code"), PYTHON, ids=[f"{p}:{n}" for p, n, _ in PYTHON])
def test_python_block_runs(page, line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Line numbers in a traceback are those of the page.
    compiled = compile("\n" * (line - 1) + code, str(ROOT / "docs" / page), "exec")
    exec(compiled, {"__name__": f"docs.{page}"})


# ------------------------------------------------------------------------------------------- command lines


def _command_lines(code: str) -> list[list[str]]:
    """The argument vectors of a bash block, continuations joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    lines = []
    for raw in joined.splitlines():
        words = shlex.split(raw, comments=True)
        if words:
            lines.append(words)
    return lines


def _parser() -> argparse.ArgumentParser:
    from stablenet.cli import COMMANDS
    from stablenet.cli.command import add_command

    parser = argparse.ArgumentParser(prog="stablenet", allow_abbrev=False, exit_on_error=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        add_command(sub, command)
    return parser


def _check_stablenet(argv: list[str]) -> None:
    from stablenet.cli import COMMANDS
    from stablenet.train import TrainConfig, parse_override_args

    try:
        args, extra = _parser().parse_known_args(argv)
    except (SystemExit, argparse.ArgumentError) as exit_:  # argparse reports a bad subcommand or flag
        raise AssertionError(f"stablenet {' '.join(argv)}: does not parse") from exit_
    if args.command == "train":
        keys = {f.name for f in dataclasses.fields(TrainConfig)}
        for key in parse_override_args(extra):
            assert key.split(".")[0] in keys, f"stablenet train: --{key} is not a config key"
        if args.config is not None:
            assert (ROOT / args.config).is_file(), f"config file {args.config} does not exist"
    else:
        assert not extra or COMMANDS[args.command].extra is not None, f"unknown arguments {extra}"


def _check_line(words: list[str]) -> None:
    if words[0] == "stablenet":
        _check_stablenet(words[1:])
    elif words[0] == "torchrun":
        assert "stablenet.cli" in words and "--" in words, "torchrun runs `-m stablenet.cli -- COMMAND ...`"
        _check_stablenet(words[words.index("--") + 1 :])
    elif words[0] in ("python", "bash") and len(words) > 1 and words[1].startswith("benchmarks/"):
        assert (ROOT / words[1]).is_file(), f"{words[1]} does not exist"


@pytest.mark.parametrize(("page", "line", "code"), BASH, ids=[f"{p}:{n}" for p, n, _ in BASH])
def test_command_lines_parse(page, line, code):
    for words in _command_lines(code):
        # Environment assignments (`STABLENET_DATA=... stablenet ...`) precede the command.
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            words = words[1:]
        if words:
            _check_line(words)


# ------------------------------------------------------------------------------------------------- links

LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of ``page``."""
    text = FENCE.sub("", page.read_text())
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
        anchors.add(slug.replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", CHECKED, ids=[str(p.relative_to(ROOT)) for p in CHECKED])
def test_links_resolve(page):
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: link to {target} points to no file"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{page.name}: no heading for #{anchor} in {linked.name}"
