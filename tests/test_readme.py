"""The README stays true: its flag table is the schema's, its quick start is what CI runs."""

import re
from pathlib import Path

from shared.cli import format_flag_table

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def section(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\n(.*?)<!-- /{marker} -->", README, flags=re.S)
    assert match, f"README.md lacks the <!-- {marker} --> section"
    return match.group(1).strip()


def test_flag_table_matches_the_schema():
    # Regenerate with: python -m shared.cli, pasted between the flag-table markers.
    assert section("flag-table") == format_flag_table()


def test_quick_start_has_two_commands_pinning_cpu_torch():
    commands = re.findall(r"```bash\n(.*?)\n```", README.split("## Quick start")[1], flags=re.S)[:2]
    assert len(commands) == 2
    for command in commands:
        assert "-c tests/constraints.txt" in command  # never a CUDA torch on a CPU machine
    assert commands[0].endswith("twindiff demo")
    assert "pytest" in commands[1] and commands[1] in section("test-command")


def test_constraints_pin_cpu_torch():
    constraints = (Path(__file__).resolve().parents[1] / "tests" / "constraints.txt").read_text()
    assert re.search(r"^torch==2\.13\.0$", constraints, flags=re.M)
