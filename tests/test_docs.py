"""README.md and docs/*.md say only what the code accepts: their YAML blocks are valid configs, their
`--set` overrides name real fields with values those fields take, the configs they name exist and load,
their `mfr-sae` commands parse with the real command line, and their relative links and repository paths
exist. Nothing here trains or downloads anything."""

from __future__ import annotations

import argparse
import re
import shlex
from functools import cache
from pathlib import Path

import pytest
import yaml

from mfr_sae import offline
from mfr_sae.config import (
    ConfigError,
    RunConfig,
    from_dict,
    load_config,
    parse_override,
    sections,
    set_field,
    settable_fields,
)

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
# paths that a script creates when it runs, so they need not exist in a checkout
CREATED_BY_SCRIPTS = {"bench/.venvs"}


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def blocks(lang: str) -> list[tuple[Path, str]]:
    return [(page, body) for page in PAGES for kind, body in FENCE.findall(page.read_text()) if kind == lang]


def prose(page: Path) -> str:
    """The page without its fenced code blocks."""
    return FENCE.sub("", page.read_text())


def inline_code(page: Path) -> list[str]:
    return re.findall(r"`([^`]+)`", prose(page))


@cache
def parser() -> argparse.ArgumentParser:
    from mfr_sae.cli_parser import build_parser

    return build_parser()


def subcommands() -> set[str]:
    action = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(action.choices)


def shell_commands(script: str) -> list[list[str]]:
    """Each simple command of a bash block as its words: continuations joined, comments dropped, split at
    `&&`, `||`, `;` and `|`."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        words: list[str] = []
        for word in shlex.split(line, comments=True):
            if word in ("&&", "||", ";", "|"):
                commands.append(words)
                words = []
            else:
                words.append(word)
        commands.append(words)
    return [words for words in commands if words]


def mfr_sae_args(words: list[str]) -> list[str] | None:
    """The arguments given to `mfr-sae` (directly, `-m mfr_sae` or torchrun's `--no-python mfr-sae`), or None."""
    for i, word in enumerate(words):
        if word == "mfr-sae":
            return words[i + 1 :]
        if word == "mfr_sae" and i > 0 and words[i - 1] == "-m":
            return words[i + 1 :]
    return None


def all_commands() -> list[tuple[Path, list[str]]]:
    return [
        (page, args)
        for page, body in blocks("bash")
        for words in shell_commands(body)
        if (args := mfr_sae_args(words)) is not None
    ]


def test_the_docs_pages_exist_and_the_readme_links_every_one():
    readme = (ROOT / "README.md").read_text()
    for name in [
        "configuration",
        "data",
        "language-models",
        "eeg",
        "distributed",
        "reproductions",
        "speed",
        "design",
        "contributing",
    ]:
        assert (ROOT / "docs" / f"{name}.md").is_file()
        assert f"(docs/{name}.md)" in readme, f"README does not link docs/{name}.md"


def test_every_yaml_block_is_a_valid_config():
    found = blocks("yaml")
    assert found, "no ```yaml block in README.md or docs/"
    for page, body in found:
        try:
            from_dict(yaml.safe_load(body), page_id(page)).validate()
        except ConfigError as err:
            pytest.fail(f"{page_id(page)}: yaml block does not load: {err}\n{body}")


def test_every_set_override_in_a_bash_block_names_a_field_and_a_value_it_takes():
    found = [
        (page, text)
        for page, body in blocks("bash")
        for text in re.findall(r"--set[ \t]+(\S+)", body.replace("\\\n", " "))
    ]
    assert len(found) >= 10
    for page, text in found:
        try:
            set_field(RunConfig(), *parse_override(text))
        except ConfigError as err:
            pytest.fail(f"{page_id(page)}: --set {text}: {err}")


def test_every_mfr_sae_command_parses_and_every_train_command_gives_a_valid_config():
    commands = all_commands()
    assert len(commands) >= 20
    for page, args in commands:
        where = f"{page_id(page)}: mfr-sae {' '.join(args)}"
        assert args and args[0] in subcommands(), f"{where}: not a subcommand of mfr-sae"
        if "--help" in args:
            continue
        try:
            ns = parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"{where}: the mfr-sae command line refuses it (see the argparse message above)")
        if ns.command == "train" and ns.resume is None:
            config = ns.config if ns.config is not None and str(ns.config).startswith("configs/") else None
            try:  # every override of one command together: some only validate beside the others
                load_config(config and ROOT / config, ns.overrides)
            except ConfigError as err:
                pytest.fail(f"{where}: {err}")


def test_every_config_file_named_exists_and_loads():
    named = {(page, name) for page in PAGES for name in re.findall(r"\bconfigs/[\w.-]+\.yaml\b", page.read_text())}
    assert any(name == "configs/synthetic-mfr.yaml" for _, name in named)
    for page, name in named:
        assert (ROOT / name).is_file(), f"{page_id(page)} names {name}, which does not exist"
        load_config(ROOT / name)


def test_every_relative_link_points_at_a_file_that_exists():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(page)):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#")[0]
            assert (page.parent / path).exists(), f"{page_id(page)} links {target}, which does not exist"


def test_every_repository_path_in_inline_code_exists():
    pattern = re.compile(r"(?<![\w./~-])((?:src|tests|bench|configs|docs|\.ci)/[\w./-]*)")
    for page in PAGES:
        for code in inline_code(page):
            for path in pattern.findall(code):
                path = path.rstrip(".")
                if path in CREATED_BY_SCRIPTS:
                    continue
                assert (ROOT / path).exists(), f"{page_id(page)} names {path}, which does not exist"


def test_every_mfr_sae_subcommand_named_in_the_text_exists():
    known = subcommands()
    for page in PAGES:
        for name in re.findall(r"\bmfr-sae ([a-z][\w-]*)", page.read_text()):
            assert name in known, f"{page_id(page)} names `mfr-sae {name}`; subcommands: {sorted(known)}"
        for group in re.findall(r"\bmfr-sae reproduce ([a-z0-9|]+)", page.read_text()):
            for experiment in group.split("|"):
                assert experiment in {"synthetic", "gpt2", "eeg"}, f"{page_id(page)}: reproduce {experiment}"


def test_every_offline_source_named_exists():
    names = {name for page in PAGES for name in re.findall(r"python -m mfr_sae\.offline (\w+)", page.read_text())}
    assert names
    for name in names:
        assert name in offline.SOURCES and callable(getattr(offline, name, None)), f"no offline source {name}"


def test_every_config_field_named_in_inline_code_exists_and_takes_the_value_given():
    pattern = re.compile(r"(?<![\w./-])(" + "|".join(sections()) + r")\.([a-z_]+)(?:=(\S+)|: ([^\s,;)]+))?")
    checked = 0
    for page in PAGES:
        for code in inline_code(page):
            for section, name, set_value, yaml_value in pattern.findall(code):
                value = set_value or yaml_value
                if name in ("py", "yaml", "json", "md"):  # a file name, not a field
                    continue
                key = f"{section}.{name}"
                assert name in settable_fields(sections()[section]), f"{page_id(page)}: `{code}`: no field {key}"
                if value:
                    try:
                        set_field(RunConfig(), *parse_override(f"{key}={value}"), source=page_id(page))
                    except ConfigError as err:
                        pytest.fail(f"`{code}`: {err}")
                checked += 1
    assert checked >= 30


def test_design_sections_cited_by_the_code_and_help_exist_and_nothing_cites_a_document_outside_the_repo():
    """`--help`, reports and docstrings cite docs/design.md's numbered sections; the specification the project
    was built from is not in the repository, so nothing may send a reader to it."""
    from mfr_sae.config import help_text

    headings = set(re.findall(r"^##+ (\d+(?:\.\d+)?)\.? ", (ROOT / "docs" / "design.md").read_text(), re.M))
    texts = [help_text()] + [p.read_text() for p in [*ROOT.glob("src/**/*.py"), *ROOT.glob("configs/*.yaml"), *PAGES]]
    cited = set()
    for text in texts:
        assert not re.search(r"\bSPEC\b", text)
        for first, last in re.findall(r"design\.md sections? (\d+)(?:-(\d+))?", text):
            cited |= {str(n) for n in range(int(first), int(last or first) + 1)}
    assert cited and cited <= headings, cited - headings
