"""Every command docs/fleet.md shows is spelled with the environment `make` installs
(`.venv/bin/celery`, `.venv/bin/labeler`: a new shell has neither on its PATH), and every
option it passes is one the real command lists in its `--help`."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "fleet.md"
BIN = Path(sys.executable).parent
PROGRAMS = {".venv/bin/celery": BIN / "celery", ".venv/bin/labeler": BIN / "labeler"}


def shown_commands(text: str) -> list[str]:
    """Command lines of the ```bash blocks and inline code spans that run a program."""
    commands = []
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith(("#", "export ", "source ")):
                commands.append(line)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    for span in re.findall(r"`([^`]+)`", prose):
        span = " ".join(span.split())
        if re.match(r"(\S*/)?(celery|labeler) ", span):
            commands.append(span)
    return commands


@cache
def help_text(*command: str) -> str:
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120,
                            check=False, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, (command, result.stderr)
    return result.stdout


def test_every_command_is_spelled_with_the_venv_and_takes_its_options() -> None:
    commands = shown_commands(DOC.read_text(encoding="utf-8"))
    assert len(commands) >= 8
    for command in commands:
        words = [w for w in shlex.split(command) if w != "..."]
        program = words[0]
        assert program in PROGRAMS, f"docs/fleet.md: {command!r} is not run as .venv/bin/..."
        executable = str(PROGRAMS[program])
        if program.endswith("celery"):
            assert words[1:3] == ["-A", "workers"], command
            options_help = help_text(executable, "-A", "workers", words[3])
        else:
            options_help = help_text(executable, words[1])
        for word in words[2:]:
            if word.startswith("-"):
                option = re.escape(word.split("=")[0])
                listed = re.search(rf"(^|[\s,]){option}([\s,=]|$)", options_help, re.MULTILINE)
                assert listed, f"{command!r}: no {word} in its --help"
