"""The commands README.md and docs/*.md show: every `fastalex ...` (and `python tools/...`) command
in a bash block parses against the real CLI (click's make_context: command, options, choices,
types), every inline `fastalex ...` names a real command and real options, and the ones that run
offline in a moment (model-info, verify on a stand-in pack) run. Pages added later are globbed."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from fastalex.cli import main

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = ("model-info", "verify")  # offline, seconds; run on the stand-in below


def block_commands(text: str) -> list[list[str]]:
    """argv of each fastalex / tools command in the page's bash blocks (after `&&`, `-m`)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s+#", line)[0]
            for part in line.split("&&"):
                part = part.split(" > ")[0].strip()
                words = shlex.split(part) if part else []
                if "-m" in words and "fastalex" in words:  # torchrun ... -m fastalex train ...
                    words = words[words.index("fastalex") :]
                tool = words[:1] == ["python"] and words[1:2] and words[1].startswith("tools/")
                if words[:1] == ["fastalex"] or tool:
                    commands.append(words)
    return commands


def inline_commands(text: str) -> list[list[str]]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return [shlex.split(span) for span in re.findall(r"`(fastalex [^`]*)`", text)]


def command_of(argv: list[str]) -> tuple[click.Command, list[str]]:
    if argv[0] == "fastalex":
        assert argv[1] in main.commands, f"no command fastalex {argv[1]}"
        return main.commands[argv[1]], argv[2:]
    if str(ROOT / "tools") not in sys.path:  # as `python tools/x.py` runs: _common importable
        sys.path.insert(0, str(ROOT / "tools"))
    spec = importlib.util.spec_from_file_location(Path(argv[1]).stem, ROOT / argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main, argv[2:]


def shown() -> list[tuple[str, list[str]]]:
    return [(page.name, argv) for page in PAGES for argv in block_commands(page.read_text())]


def test_the_pages_show_commands():
    commands = shown()
    assert any(argv[:2] == ["fastalex", "train"] for _, argv in commands)
    assert any(argv[:2] == ["fastalex", "pack"] for _, argv in commands)


@pytest.mark.parametrize(("page", "argv"), shown(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_command_shown_parses(page, argv):
    command, args = command_of(argv)
    if "--help" in args:
        return
    try:
        command.make_context(argv[1], list(args))
    except click.ClickException as e:
        pytest.fail(f"{page}: {shlex.join(argv)}: {e.format_message()}")


def test_every_inline_command_names_real_options():
    for page in PAGES:
        for argv in inline_commands(page.read_text()):
            if len(argv) < 2:
                continue
            assert argv[1] in main.commands, f"{page.name}: {shlex.join(argv)}"
            known = {o for p in main.commands[argv[1]].params for o in [*p.opts, *p.secondary_opts]}
            known.add("--help")
            for word in argv[2:]:
                if word.startswith("--"):
                    assert word.split("=")[0] in known, f"{page.name}: {shlex.join(argv)}"


def test_the_offline_commands_run_on_a_stand_in(synth_pack, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    for name in ("shards", "photos-shards"):
        (tmp_path / "data" / name).symlink_to(synth_pack)
    monkeypatch.chdir(tmp_path)
    ran = 0
    for page, argv in shown():
        if argv[0] == "fastalex" and argv[1] in RUNNABLE:
            result = CliRunner().invoke(main, argv[1:])
            assert result.exit_code == 0, (page, argv, result.output)
            ran += 1
    assert ran >= 2


def read_more() -> list[tuple[str, list[str]]]:
    """Each README "Read more" line: the page it points to and what it says the page covers
    (its `backticked` words: flags, commands, names)."""
    section = (ROOT / "README.md").read_text().split("## Read more", 1)[1].split("\n## ", 1)[0]
    lines = []
    for item in re.split(r"\n- ", section):
        link = re.search(r"\]\((docs/[\w.-]+\.md)\)", item)
        if link:
            lines.append((link.group(1), re.findall(r"`([^`]+)`", item.split(":", 1)[1])))
    return lines


def test_every_page_the_readme_points_to_covers_what_the_readme_says():
    assert len(read_more()) >= 8  # every docs page is listed
    for page, words in read_more():
        text = (ROOT / page).read_text()
        missing = [word for word in words if word not in text]
        assert not missing, f"README says {page} covers {missing}; it does not mention them"
