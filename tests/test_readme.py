"""The README tells the truth: its error table, flags, links and commands match the code."""

from __future__ import annotations

import re
from pathlib import Path

from deploy_agent import errors
from deploy_agent.api import HTTP_ERROR_CODES, INTERNAL_ERROR
from deploy_agent.config import build_parser

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def section(heading: str) -> str:
    start = README.index(heading)
    following = README.find("\n#", start + len(heading))
    return README[start:following if following != -1 else None]


def error_classes() -> set[tuple[int, str]]:
    found, pending = set(), list(errors.AgentError.__subclasses__())
    while pending:
        kind = pending.pop()
        found.add((kind.status, kind.code))
        pending.extend(kind.__subclasses__())
    return found


class TestReadme:
    """What a newcomer reads is what the agent does."""

    def test_error_table_is_every_error_the_agent_answers(self) -> None:
        table = set()
        for line in section("### Errors").splitlines():
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if len(cells) == 3 and cells[0].isdigit():
                table |= {(int(cells[0]), code) for code in re.findall(r"`([a-z_]+)`", cells[1])}
        expected = error_classes() | {(status, code) for status, code in HTTP_ERROR_CODES.items()}
        expected.add((500, str(INTERNAL_ERROR["error"])))
        assert table == expected

    def test_every_flag_is_in_the_flag_table(self) -> None:
        documented = set(re.findall(r"^\| `(--[a-z-]+)", section("## Flags"), re.MULTILINE))
        flags = {option for action in build_parser({})._actions for option in action.option_strings
                 if option.startswith("--") and option != "--help"}
        assert documented == flags

    def test_links_resolve_inside_the_repository(self) -> None:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
            if target.startswith(("http://", "https://")):
                continue
            assert (ROOT / target).exists(), target
            assert (ROOT / target).resolve().is_relative_to(ROOT.resolve()), target

    def test_ci_runs_the_readme_test_command(self) -> None:
        blocks = re.findall(r"```bash\n(.*?)\n```", section("## Set up"), re.DOTALL)
        assert len(blocks) >= 2  # one to install and run, one to test: exactly two set-up commands
        run, test = blocks[0].strip(), blocks[1].strip()
        assert "\n" not in run and "\n" not in test
        ci = (ROOT / ".ci" / "run").read_text().splitlines()
        for step in test.split(" && "):
            assert step.replace("pip install -e", "pip install -q -e") in ci, step
