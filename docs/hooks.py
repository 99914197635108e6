"""Build-time pages of the documentation site (an mkdocs hook, see ``hooks:`` in mkdocs.yml).

Everything here is generated from the project itself whenever the site is built, so it
cannot drift from the code:

- ``reference/spec.md``: the spec reference, from the JSON Schema of the built-in
  components (``diffkit.spec.json_schema`` over a registry with autoloading off);
- ``reference/cli.md``: the command-line reference, by walking the argparse parser of
  ``diffkit.cli.build_parser`` and its subcommands (including those discovered in
  ``diffkit/commands/``);
- ``benchmarks/``: ``benchmarks/README*.md``, included as they stand in the repository;
- ``src/…``: every repository file outside ``docs/`` that a page links to (an example
  spec, a plugin module, a benchmark script), so that the link works on the site as it
  does on GitHub. Links to files that do not exist are left alone, and
  ``mkdocs build --strict`` reports them.

``iter_links`` and ``heading_slugs`` are also what ``tests/test_docs.py`` uses to check
the links of README.md and docs/*.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import posixpath
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# Repository markdown shown as site pages: repository path -> page URI.
INCLUDED: dict[str, str] = {"benchmarks/README.md": "benchmarks/index.md"}
SOURCE_PREFIX = "src"


def included_pages() -> dict[str, str]:
    """``benchmarks/README.md`` and any ``benchmarks/README-NAME.md`` -> their page URIs."""
    pages = dict(INCLUDED)
    for path in sorted((ROOT / "benchmarks").glob("README-*.md")):
        pages[f"benchmarks/{path.name}"] = f"benchmarks/{path.stem.removeprefix('README-')}.md"
    return pages


# -- links ----------------------------------------------------------------------------------
LINK = re.compile(r"(!?)\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]*)>?(\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```+|~~~+)")
INLINE_CODE = re.compile(r"(`+)(?:.+?)\1")


def _prose(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of the markdown outside fenced code blocks, with inline code blanked."""
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        m = FENCE.match(line)
        if m:
            mark = m.group(1)[0] * 3
            if fence is None:
                fence = mark
            elif mark == fence:
                fence = None
            continue
        if fence is None:
            yield number, INLINE_CODE.sub(lambda c: " " * len(c.group(0)), line)


def iter_links(text: str) -> Iterator[tuple[int, str]]:
    """(line number, target) of every markdown link and image outside code."""
    for number, line in _prose(text):
        for m in LINK.finditer(line):
            yield number, m.group(3)


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


def heading_slugs(text: str, slugify: Callable[[str], str]) -> set[str]:
    """The anchors of a markdown file's headings (ATX headings outside code), by ``slugify``,
    with ``{#id}`` attributes taken as given and repeats numbered ``-1``, ``-2`` as both
    GitHub and mkdocs do."""
    seen: dict[str, int] = {}
    slugs: set[str] = set()
    for _, line in _prose(text.replace("`", "")):  # backticks count as text in a heading
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        title = m.group(2)
        explicit = re.search(r"\{\s*#([\w-]+)[^}]*\}\s*$", title)
        if explicit:
            slugs.add(explicit.group(1))
            continue
        plain = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link's text only
        slug = slugify(plain)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        slugs.add(slug if count == 0 else f"{slug}-{count}")
    return slugs


def localize(text: str, source: Path, page_uri: str) -> tuple[str, set[str]]:
    """Rewrite the relative links of a page whose markdown lives at ``source`` in the
    repository and is served as ``page_uri``: targets inside docs/ and included pages
    resolve to their site pages, other existing repository files to their ``src/`` copy.
    Returns the new text and the repository paths (POSIX, relative) it links under src/."""
    pages = {ROOT / repo: uri for repo, uri in included_pages().items()}
    needed: set[str] = set()
    page_dir = posixpath.dirname(page_uri)

    def site_target(target: str) -> str | None:
        path, _, anchor = target.partition("#")
        if not path or is_external(target) or path.startswith("/"):
            return None
        resolved = Path(os.path.normpath(source.parent / path))
        if resolved in pages:
            uri = pages[resolved]
        elif resolved.is_relative_to(DOCS) and resolved.is_file():
            uri = resolved.relative_to(DOCS).as_posix()
        elif resolved.is_relative_to(DOCS) and (resolved / "index.md").is_file():  # a folder of the site
            uri = (resolved / "index.md").relative_to(DOCS).as_posix()
        elif resolved.is_file() and resolved.is_relative_to(ROOT) and ".git" not in resolved.parts:
            repo = resolved.relative_to(ROOT).as_posix()
            needed.add(repo)
            uri = f"{SOURCE_PREFIX}/{repo}"
        elif resolved.is_dir() and resolved.is_relative_to(ROOT) and resolved != ROOT and ".git" not in resolved.parts:
            # a folder: its README where it has one, else a generated listing of its files
            repo = resolved.relative_to(ROOT).as_posix()
            readme = resolved / "README.md"
            if readme in pages:
                return posixpath.relpath(pages[readme], page_dir or ".") + (f"#{anchor}" if anchor else "")
            if readme.is_file():
                needed.add(f"{repo}/README.md")
            else:
                needed.add(f"{repo}/")
            uri = f"{SOURCE_PREFIX}/{repo}/{'README.md' if readme.is_file() else 'index.md'}"
        else:
            return None  # missing: left for mkdocs --strict to report
        new = posixpath.relpath(uri, page_dir or ".")
        return new + (f"#{anchor}" if anchor else "")

    out: list[str] = []
    prose = dict(_prose(text))
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        if number in prose:
            masked = prose[number]

            def swap(m: re.Match[str], line: str = line) -> str:
                target = m.group(3)
                new = site_target(target)
                original = line[m.start() : m.end()]
                return original if new is None else original.replace(f"({target}", f"({new}", 1)

            # match on the masked line (inline code blanked), copy from the original
            pieces, last = [], 0
            for m in LINK.finditer(masked):
                pieces.append(line[last : m.start()])
                pieces.append(swap(m))
                last = m.end()
            pieces.append(line[last:])
            line = "".join(pieces)
        out.append(line)
    return "".join(out), needed


# -- the spec reference -----------------------------------------------------------------------
def _esc(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace("*", "\\*").replace("\n", " ")


def _kind_of(definition: dict[str, Any]) -> str | None:
    desc = definition.get("properties", {}).get("type", {}).get("description", "")
    return desc.removesuffix(" component") if desc.endswith(" component") else None


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _constraints(prop: dict[str, Any]) -> list[str]:
    marks = {"minimum": "≥", "exclusiveMinimum": ">", "maximum": "≤", "exclusiveMaximum": "<"}
    out = [f"{sign} {prop[key]}" for key, sign in marks.items() if key in prop]
    if "minItems" in prop or "maxItems" in prop:
        out.append(f"{prop.get('minItems', 0)}–{prop.get('maxItems', '∞')} items")
    return out


class _SchemaText:
    def __init__(self, schema: dict[str, Any]) -> None:
        self.defs: dict[str, Any] = schema.get("$defs", {})

    def kind_link(self, kind: str) -> str:
        return f"[{kind} section](#{kind})"

    def type_of(self, prop: dict[str, Any]) -> str:
        if "$ref" in prop:
            name = _ref_name(prop["$ref"])
            kind = _kind_of(self.defs.get(name, {}))
            return self.kind_link(kind) if kind else f"[{name}](#{name.lower()})"
        if "anyOf" in prop or "oneOf" in prop:
            branches = prop.get("anyOf") or prop.get("oneOf")
            for branch in branches:
                if "discriminator" in branch:
                    first = _ref_name(branch["oneOf"][0]["$ref"])
                    return self.kind_link(_kind_of(self.defs[first]) or "component")
            return " or ".join(dict.fromkeys(self.type_of(b) for b in branches))
        if "enum" in prop:
            return " \\| ".join(f"`{json.dumps(v)}`" for v in prop["enum"])
        if "const" in prop:
            return f"`{json.dumps(prop['const'])}`"
        kind = prop.get("type", "any")
        if kind == "array":
            return f"list of {self.type_of(prop.get('items', {}))}"
        names = {"integer": "integer", "number": "number", "string": "string", "boolean": "boolean", "null": "null"}
        return names.get(kind, "mapping" if kind == "object" else str(kind))

    def constraints_of(self, prop: dict[str, Any]) -> list[str]:
        found = _constraints(prop)
        for branch in prop.get("anyOf", []):
            found += _constraints(branch)
            if branch.get("type") == "array":
                found += [f"each {c}" for c in _constraints(branch.get("items", {}))]
        if prop.get("type") == "array":
            found += [f"each {c}" for c in _constraints(prop.get("items", {}))]
        return found

    def table(self, definition: dict[str, Any], skip: tuple[str, ...] = ("type",)) -> list[str]:
        props = {k: v for k, v in definition.get("properties", {}).items() if k not in skip}
        if not props:
            return ["No parameters."]
        required = set(definition.get("required", []))
        rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
        for key, prop in props.items():
            if key in required:
                default = "*required*"
            elif "default" in prop:
                default = _esc(f"`{json.dumps(prop['default'], ensure_ascii=False)}`")
            else:
                default = "optional"
            kind = self.type_of(prop)
            limits = self.constraints_of(prop)
            if limits:
                kind += " (" + ", ".join(limits) + ")"
            rows.append(f"| `{key}` | {kind} | {default} | {_esc(prop.get('description', ''))} |")
        return rows


def spec_reference() -> str:
    """The spec reference page, from the JSON Schema of the built-in components."""
    from diffkit.plugins import load_plugins
    from diffkit.spec import json_schema

    schema = json_schema(load_plugins(autoload=False, include=(), block=(), block_builtins=(), strict=True))
    text = _SchemaText(schema)
    by_kind: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for name, definition in text.defs.items():
        kind = _kind_of(definition)
        if kind:
            by_kind.setdefault(kind, []).append((name, definition))
    top = schema["properties"]
    order = [k for k in top if k in by_kind] + sorted(k for k in by_kind if k not in top)

    lines = [
        "# Spec reference",
        "",
        "Every key a spec may hold, for the components built into diffkit. This page is generated",
        "from the JSON Schema of the built-in components each time the site is built (`docs/hooks.py`);",
        "`diffkit schema` prints the same schema for the components installed on your machine,",
        "third-party plugins included. How specs are written and checked is in [The spec](../spec.md).",
        "",
        "## Top-level keys",
        "",
        *text.table(schema),
        "",
        "A component section is `{type: NAME, ...parameters}`, or just `NAME` for all-default",
        "parameters. Where two plugins register the same name, qualify it as `plugin:NAME`",
        "(every built-in also answers to its qualified name, shown with each component below).",
        "",
    ]
    for name, definition in text.defs.items():
        if not _kind_of(definition) and name != schema.get("title"):
            lines += [f"## `{name}` {{#{name.lower()}}}", "", definition.get("description", ""), ""]
            lines += [*text.table(definition), ""]
    for kind in order:
        where = "top-level section" if kind in top else "section nested in another component (see below)"
        lines += [f"## {kind} {{#{kind}}}", "", f"`{kind}` is a {where}. Built-in choices:", ""]
        for _, definition in sorted(by_kind[kind], key=lambda item: item[1]["properties"]["type"]["enum"][0]):
            tags = definition["properties"]["type"]["enum"]
            plain = [t for t in tags if ":" not in t]
            qualified = [t for t in tags if ":" in t]
            shown = plain[0] if plain else tags[0]
            lines += [f"### `{shown}` {{#{kind}-{shown}}}", "", _esc(definition.get("description", "")).strip(), ""]
            if qualified:
                plugin = qualified[0].split(":", 1)[0]
                lines += [f"Plugin `{plugin}`; qualified name `{qualified[0]}`.", ""]
            lines += [*text.table(definition), ""]
    return "\n".join(lines)


# -- the CLI reference ------------------------------------------------------------------------
def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return []


def _argument(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    takes_value = action.nargs != 0
    shown = action.metavar or (
        "{" + ",".join(map(str, action.choices)) + "}" if action.choices else action.dest.upper()
    )
    return ", ".join(f"`{o} {shown}`" if takes_value else f"`{o}`" for o in action.option_strings)


def _arguments(parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser._get_formatter()
    lines: list[str] = []
    for group in parser._action_groups:
        actions = [
            a
            for a in group._group_actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and a.help != argparse.SUPPRESS
        ]
        if not actions:
            continue
        title = (group.title or "arguments").capitalize()
        lines += [f"**{title}**", "", "| argument | meaning |", "|---|---|"]
        for action in actions:
            helped = formatter._expand_help(action) if action.help else ""
            extra = []
            if action.required and action.option_strings:
                extra.append("required")
            shows_default = action.option_strings and action.nargs != 0
            if shows_default and action.default not in (None, argparse.SUPPRESS) and f"{action.default}" not in helped:
                extra.append(f"default `{action.default}`")
            if isinstance(action, argparse._AppendAction) and "repeatable" not in helped:
                extra.append("repeatable")
            suffix = f" ({'; '.join(extra)})" if extra else ""
            lines.append(f"| {_argument(action)} | {_esc(helped)}{_esc(suffix)} |")
        lines.append("")
    return lines


def _usage(parser: argparse.ArgumentParser) -> str:
    parser.formatter_class = functools.partial(argparse.HelpFormatter, width=88)  # type: ignore[assignment]
    return parser.format_usage().strip()


def cli_reference() -> str:
    """The CLI reference page, from ``diffkit.cli.build_parser``."""
    from diffkit.cli import build_parser

    parser = build_parser()
    lines = [
        "# Command-line reference",
        "",
        "Generated from the `diffkit` command's own parser each time the site is built",
        "(`docs/hooks.py`), so it lists every subcommand, including those that modules in",
        "`diffkit/commands/` add. `diffkit COMMAND --help` prints the same on your machine.",
        "",
        "```text",
        _usage(parser),
        "```",
        "",
        parser.description or "",
        "",
        "Exit status: 0 on success, 1 for a problem with the input (spec, run directory,",
        "files; one message on stderr), 2 for wrong usage.",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    subs = _subparsers(parser)
    lines += [f"| [`diffkit {name}`](#diffkit-{name}) | {_esc(helped)} |" for name, helped, _ in subs]
    lines.append("")
    for name, helped, sub in subs:
        lines += [f"## `diffkit {name}` {{#diffkit-{name}}}", ""]
        lines += [_esc(sub.description or helped), "", "```text", _usage(sub), "```", ""]
        lines += _arguments(sub)
    return "\n".join(lines)


# -- mkdocs events --------------------------------------------------------------------------
GENERATED: dict[str, Callable[[], str]] = {"reference/spec.md": spec_reference, "reference/cli.md": cli_reference}
_sources: dict[str, Path] = {}  # page URI -> the repository file its markdown comes from
_listings: dict[str, str] = {}  # page URI -> the markdown of a generated folder listing


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for uri, make in GENERATED.items():
        files.append(File.generated(config, uri, content=make()))
    for repo, uri in included_pages().items():
        files.append(File.generated(config, uri, abs_src_path=str(ROOT / repo)))
        _sources[uri] = ROOT / repo
    pending = [f.src_uri for f in files.documentation_pages()]
    while pending:  # a linked markdown file becomes a page, whose own links count too
        uri = pending.pop()
        source = _sources.get(uri, DOCS / uri)
        if uri in _listings:
            text = _listings[uri]
        elif source.is_file():
            text = source.read_text(encoding="utf-8")
        else:
            continue
        for repo in sorted(localize(text, source, uri)[1]):
            if repo.endswith("/"):
                listing = f"{SOURCE_PREFIX}/{repo}index.md"
                if files.get_file_from_path(listing) is None:
                    _listings[listing] = folder_listing(repo.rstrip("/"))
                    files.append(File.generated(config, listing, content=_listings[listing]))
                    _sources[listing] = ROOT / repo / "index.md"  # where its relative links start
                    pending.append(listing)
                continue
            copy = f"{SOURCE_PREFIX}/{repo}"
            if files.get_file_from_path(copy) is None:
                files.append(File.generated(config, copy, abs_src_path=str(ROOT / repo)))
                _sources[copy] = ROOT / repo
                if repo.endswith(".md"):
                    pending.append(copy)
    return files


SKIPPED_PARTS = {"__pycache__", ".pytest_cache", ".hypothesis", "node_modules"}


def folder_listing(repo: str) -> str:
    """A page listing the files of a repository folder, each linked to its copy."""
    folder = ROOT / repo
    lines = [f"# `{repo}/`", "", "The files of this folder of the repository:", ""]
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        hidden = bool(SKIPPED_PARTS & set(rel.parts)) or any(p.startswith(".") for p in rel.parts)
        if path.is_file() and not hidden and path.suffix not in (".pyc", ".pyo"):
            lines.append(f"- [`{rel.as_posix()}`]({rel.as_posix()})")
    return "\n".join(lines) + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    uri = page.file.src_uri
    if uri in GENERATED:
        return markdown
    source = _sources.get(uri, DOCS / uri)
    return localize(markdown, source, uri)[0]


SPHINX_ROLE = re.compile(r":(?:meth|func|class|attr|mod|data|exc|obj):<code>(~?)([^<]*)</code>")


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    """Docstrings cite other objects as Sphinx roles (:meth:`save`); show them as code,
    ``~a.b.C`` as just ``C``, as Sphinx does."""
    return SPHINX_ROLE.sub(
        lambda m: f"<code>{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}</code>", html
    )
