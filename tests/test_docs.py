"""The docs stay true to the code: README.md and docs/*.md are read as text and checked against the
CLI's parser, the config dataclasses, the Makefile and the file tree. No model, no JAX.

    python tests/test_docs.py          # lists every problem instead of the first
"""

import dataclasses
import glob
import os
import re
import typing

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS_PAGE = os.path.join("docs", "configs.md")


def pages() -> list[str]:
    """README.md and every page under docs/, relative to the repository root."""
    return ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def text(page: str) -> str:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")


def code_blocks(md: str, lang: typing.Optional[str] = None) -> list[str]:
    return [body for kind, body in FENCE.findall(md) if lang is None or kind == lang]


def code_lines(md: str) -> list[str]:
    """Every line of code in a page: the lines of fenced blocks and each inline code span."""
    lines = [line for body in code_blocks(md) for line in body.splitlines()]
    prose = FENCE.sub("", md)
    return lines + INLINE.findall(prose)


# ----------------------------------------------------------------------------------------------
# links


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    s = re.sub(r"[`*_]", "", heading.strip().lower())
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors(page: str) -> set[str]:
    body = FENCE.sub("", text(page))
    return {slug(h) for h in re.findall(r"^#+ (.+)$", body, re.M)}


def link_problems(page: str) -> list[str]:
    out = []
    for a, b in LINK.findall(FENCE.sub("", text(page))):
        target = a or b
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, frag = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(ROOT, dest)):
            out.append(f"{page}: link to {target}: {dest} does not exist")
        elif frag and dest.endswith(".md") and frag not in anchors(dest):
            out.append(f"{page}: link to {target}: {dest} has no heading #{frag}")
    return out


# ----------------------------------------------------------------------------------------------
# commands and flags


def parser_flags() -> dict[str, set[str]]:
    from spin_jax.cli import build_parser

    def subparsers(parser):
        return next((a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"), None)

    out = {}
    for name, p in subparsers(build_parser()).choices.items():
        out[name] = {o for a in p._actions for o in a.option_strings}
        nested = subparsers(p)  # spin-jax mt-bench answer|judge|show
        for sub_name, sp in (nested.choices.items() if nested else ()):
            out[f"{name} {sub_name}"] = {o for a in sp._actions for o in a.option_strings}
    return out


COMMAND = re.compile(r"(?:spin-jax|python -m spin_jax)\s+([a-z][\w-]*)((?:\s+[^#|;&]*)?)")


def flag_problems(page: str, known: dict[str, set[str]]) -> list[str]:
    out = []
    for line in code_lines(text(page)):
        for cmd, rest in COMMAND.findall(line):
            if cmd not in known:
                out.append(f"{page}: `spin-jax {cmd}`: no such command (known: {', '.join(sorted(known))})")
                continue
            word = rest.split()[0] if rest.split() else ""
            if f"{cmd} {word}" in known:
                cmd = f"{cmd} {word}"
            elif word and any(k.startswith(cmd + " ") for k in known):
                out.append(f"{page}: `spin-jax {cmd} {word}`: no such subcommand")
                continue
            for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest):
                if flag not in known[cmd]:
                    out.append(f"{page}: `spin-jax {cmd} {flag}`: {cmd} has no flag {flag}")
    return out


# ----------------------------------------------------------------------------------------------
# config keys


def config_keys() -> set[str]:
    """Every dotted key of the config, sections included (model, model.lora, model.lora.rank, …)."""
    from spin_jax.config import Config

    out: set[str] = set()

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = prefix + f.name
            out.add(key)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], key + ".")

    walk(Config, "")
    return out


def leaf_keys() -> set[str]:
    keys = config_keys()
    return {k for k in keys if not any(o.startswith(k + ".") for o in keys)}


def dotted(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + str(k))
        if isinstance(v, dict):
            out += dotted(v, f"{prefix}{k}.")
    return out


def is_config_block(data) -> bool:
    """A YAML block that is (part of) a spin_jax config: its top-level keys are config keys."""
    top = {k.split(".")[0] for k in config_keys()}
    return isinstance(data, dict) and bool(data) and set(map(str, data)) <= top


# a lower-case key after --set (KEY=VALUE in capitals is a placeholder)
SET = re.compile(r"--set[ =]+['\"]?([a-z_][\w.]*)=")


def key_problems(page: str, keys: set[str]) -> list[str]:
    out = []
    md = text(page)
    for body in code_blocks(md, "yaml"):
        try:
            data = yaml.safe_load(body)
        except yaml.YAMLError as e:
            out.append(f"{page}: a YAML block does not parse: {str(e).splitlines()[0]}")
            continue
        if is_config_block(data):
            out += [f"{page}: YAML config key {k} does not exist" for k in dotted(data) if k not in keys]
    for line in code_lines(md):
        out += [f"{page}: --set {k}: no such config key" for k in SET.findall(line) if k not in keys]
    return out


def undocumented_keys() -> list[str]:
    """Config keys the configs page never names in backticks (`train.beta` or train.beta: in YAML)."""
    page = text(CONFIGS_PAGE)
    named = set(INLINE.findall(FENCE.sub("", page)))
    for body in code_blocks(page, "yaml"):
        data = yaml.safe_load(body)
        if is_config_block(data):
            named.update(dotted(data))
    return sorted(k for k in leaf_keys() if k not in named)


# ----------------------------------------------------------------------------------------------
# make targets


def make_targets() -> set[str]:
    with open(os.path.join(ROOT, "Makefile")) as f:
        return set(re.findall(r"^([a-z][\w-]*):", f.read(), re.M))


def make_problems(page: str, targets: set[str]) -> list[str]:
    out = []
    for line in code_lines(text(page)):
        for target in re.findall(r"(?<![\w-])make ([a-z][\w-]*)", line):
            if target not in targets:
                out.append(f"{page}: `make {target}`: the Makefile has no target {target}")
    return out


# ----------------------------------------------------------------------------------------------
# the tests


def test_docs_exist_and_the_readme_links_every_page():
    readme = text("README.md")
    assert len(pages()) > 1, "no pages under docs/"
    for page in pages()[1:]:
        assert f"]({page})" in readme, f"README.md does not link {page}"


@pytest.mark.parametrize("page", pages())
def test_relative_links_resolve(page):
    assert not link_problems(page)


@pytest.mark.parametrize("page", pages())
def test_commands_and_flags_exist_in_the_cli(page):
    assert not flag_problems(page, parser_flags())


@pytest.mark.parametrize("page", pages())
def test_yaml_blocks_parse_and_config_keys_exist(page):
    assert not key_problems(page, config_keys())


def test_every_config_key_is_documented_on_the_configs_page():
    assert not undocumented_keys()


@pytest.mark.parametrize("page", pages())
def test_make_targets_exist(page):
    assert not make_problems(page, make_targets())


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_shipped_configs_validate(path):
    from spin_jax.config import load_config

    load_config(path)  # raises ConfigError naming the file, line and key


def all_problems() -> list[str]:
    flags, keys, targets = parser_flags(), config_keys(), make_targets()
    out = []
    for page in pages():
        out += link_problems(page) + flag_problems(page, flags) + key_problems(page, keys)
        out += make_problems(page, targets)
    if os.path.exists(os.path.join(ROOT, CONFIGS_PAGE)):
        out += [f"{CONFIGS_PAGE}: config key {k} is not documented" for k in undocumented_keys()]
    return out


if __name__ == "__main__":
    problems = all_problems()
    print("\n".join(problems) or "the docs agree with the code")
