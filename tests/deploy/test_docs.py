"""Every Docker command the README and the docs quote names files, profiles, services and build arguments that exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from tests.deploy.helpers import BASE_COMPOSE, GPU_COMPOSE, ROOT

DOCKER_PAGE = ROOT / "docs" / "docker.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GLOBAL_OPTIONS_WITH_VALUE = {"-f", "--file", "--profile", "-p", "--project-name", "--env-file", "--project-directory"}
COMPOSE_SUBCOMMANDS_WITH_SERVICES = {"up", "logs", "exec", "run", "restart", "stop", "start", "ps", "build", "pull"}


def docker_commands(path: Path) -> list[list[str]]:
    """`docker ...` lines inside fenced shell blocks, comments and continuations handled."""
    commands = []
    for language, block in re.findall(r"```([a-z]*)\n(.*?)```", path.read_text() if path.is_file() else "", re.S):
        if language not in ("", "bash", "sh", "shell", "console"):
            continue
        for line in re.sub(r"\\\n", " ", block).splitlines():
            if line.startswith("docker "):  # other lines may be any shell (a heredoc's Python, say)
                commands.append(shlex.split(line, comments=True))
    return commands


def docker_page() -> str:
    return DOCKER_PAGE.read_text()


def compose_text() -> str:
    return BASE_COMPOSE.read_text() + GPU_COMPOSE.read_text()


def declared_services() -> set[str]:
    return set(re.findall(r"^  ([a-z][\w-]*):\s*$", compose_text(), re.M))


def declared_profiles() -> set[str]:
    return {p.strip() for group in re.findall(r"profiles: \[([^\]]*)\]", compose_text()) for p in group.split(",")}


def option_values(words: list[str], *names: str) -> list[str]:
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word in names]


def split_compose(words: list[str]) -> tuple[list[str], list[str]]:
    """`docker compose GLOBAL... SUBCOMMAND ARGS...` -> (global options, [subcommand, args...])."""
    index = 2
    while index < len(words) and words[index].startswith("-"):
        index += 1 if "=" in words[index] or words[index] not in GLOBAL_OPTIONS_WITH_VALUE else 2
    return words[2:index], words[index:]


def check_compose_command(words: list[str]) -> None:
    global_options, command = split_compose(words)
    for file in option_values(global_options, "-f", "--file"):
        assert (ROOT / file).is_file(), f"{shlex.join(words)}: no file {file}"
    for profile in option_values(global_options, "--profile"):
        assert profile in declared_profiles(), f"{shlex.join(words)}: no profile {profile}"
    if command[:1] and command[0] in COMPOSE_SUBCOMMANDS_WITH_SERVICES:
        services = [w for w in command[1:] if re.fullmatch(r"[a-z][\w-]*", w)]
        if command[0] in {"exec", "run"}:
            services = services[:1]  # the rest is the command run inside
        assert set(services) <= declared_services(), f"{shlex.join(words)}: unknown service in {services}"


def check_build_command(words: list[str]) -> None:
    arguments = re.findall(r"^ARG (\w+)", (ROOT / "Dockerfile").read_text(), re.M)
    for build_arg in option_values(words, "--build-arg"):
        assert build_arg.split("=")[0] in arguments, f"{shlex.join(words)}: the Dockerfile has no ARG {build_arg}"


def test_quoted_docker_commands_refer_to_what_exists() -> None:
    for words in (words for page in PAGES for words in docker_commands(page)):
        if words[1:2] == ["compose"]:
            check_compose_command(words)
        elif words[1:2] == ["build"]:
            check_build_command(words)


def test_the_docker_page_quotes_the_compose_variants() -> None:
    quoted = {shlex.join(words) for words in docker_commands(DOCKER_PAGE)}
    assert any("docker-compose.gpu.yml" in command for command in quoted)
    assert any("--profile monitoring" in command for command in quoted)


def test_every_documented_server_variable_reaches_the_container() -> None:
    documented = set(re.findall(r"`(PROMPTSERVE_[A-Z_]+)`", docker_page())) - {"PROMPTSERVE_PORT"}
    compose = BASE_COMPOSE.read_text()
    missing = {name for name in documented if f"{name}:" not in compose}
    assert not missing, f"documented but not passed to the container by docker-compose.yml: {sorted(missing)}"


def test_every_documented_server_variable_is_a_setting() -> None:
    from server.api.settings import setting_names

    documented = set(re.findall(r"`(PROMPTSERVE_[A-Z_]+)`", docker_page()))
    compose = BASE_COMPOSE.read_text() + (ROOT / "Dockerfile").read_text()
    documented |= set(re.findall(r"\b(PROMPTSERVE_[A-Z_]+):", compose))
    fields = {f"PROMPTSERVE_{name.upper()}" for name in setting_names()}
    assert documented <= fields | {"PROMPTSERVE_IMAGE"}, sorted(documented - fields)
