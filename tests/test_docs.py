"""The documentation: the site builds with ``mkdocs build --strict``, its generated
references cover every built-in component and command, no internal link or anchor of
README.md, docs/ or the benchmarks is broken, and every picture is drawn by the project.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from markdown.extensions.toc import slugify as mkdocs_slugify

from diffkit.cli import build_parser
from diffkit.plugins import load_plugins
from diffkit.registry import KINDS
from diffkit.spec import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _load("diffkit_docs_hooks", DOCS / "hooks.py")
make_images = _load("diffkit_docs_make_images", DOCS / "make_images.py")


# -- the site --------------------------------------------------------------------------------
def test_site_builds_in_strict_mode(tmp_path):
    site = tmp_path / "site"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFKIT_")}
    env.update(OMP_NUM_THREADS="1", NO_MKDOCS_2_WARNING="1")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for page in (
        "index",
        "getting-started/index",
        "concepts/index",
        "examples/index",
        "plugins/index",
        "reference/spec/index",
        "reference/cli/index",
        "reference/api/index",
        "benchmarks/index",
    ):
        assert (site / f"{page}.html").is_file(), f"the site has no {page}.html"
    api = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    for name in (
        "diffkit.pipeline.Pipeline.sample",
        "diffkit.interfaces.Schedule",
        "diffkit.diffusion.q_sample",
        "diffkit.likelihood.variational_bound",
        "diffkit.applications.inpaint",
        "diffkit.registry.Registry",
    ):
        assert f'id="{name}"' in api, f"the API reference does not document {name}"
    assert not dead_site_links(site), "links to nothing in the built site:\n" + "\n".join(dead_site_links(site))
    # the benchmarks page is benchmarks/README.md as it stands
    title = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8").splitlines()[0].lstrip("# ").strip()
    assert title in (site / "benchmarks" / "index.html").read_text(encoding="utf-8")


def dead_site_links(site: Path) -> list[str]:
    """Relative href and src attributes of the built HTML that point to no file of the site."""
    dead = []
    for page in site.rglob("*.html"):
        for target in re.findall(r'(?:href|src)="([^"#?]*)[^"]*"', page.read_text(encoding="utf-8")):
            if not target or hooks.is_external(target) or target.startswith("/"):
                continue
            path = (page.parent / target).resolve()
            if target.endswith("/") or path.is_dir():
                path = path / "index.html"
            if not path.exists():
                dead.append(f"{page.relative_to(site)}: {target}")
    return dead


# -- generated references --------------------------------------------------------------------
def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    nxt = text.find("\n### ", start + len(heading))
    ends = [e for e in (end, nxt) if e != -1]
    return text[start : min(ends)] if ends else text[start:]


def test_spec_reference_lists_every_builtin_component_and_parameter():
    text = hooks.spec_reference()
    registry = load_plugins(autoload=False)
    for kind in KINDS:
        for entry in registry.all(kind):
            heading = f"### `{entry.name}` {{#{kind}-{entry.name}}}"
            assert heading in text, f"no entry for {kind} {entry.name}"
            body = _section(text, heading)
            assert f"`{entry.qualified}`" in body
            for field in entry.component.params.model_fields:
                assert f"| `{field}` |" in body, f"{kind} {entry.name}: parameter {field} missing"
    train = _section(text, "## `TrainConfig`")
    for field in TrainConfig.model_fields:
        assert f"| `{field}` |" in train


def test_cli_reference_lists_every_command_and_option():
    text = hooks.cli_reference()
    parser = build_parser()
    subs = hooks._subparsers(parser)
    assert {"train", "sample", "validate", "schema", "plugins", "inpaint", "denoise"} <= {n for n, _, _ in subs}
    for name, _, sub in subs:
        body = text[text.index(f"## `diffkit {name}`") :]
        body = body[: body.find("\n## ", 5)] if "\n## " in body[5:] else body
        for action in sub._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}" in body, f"diffkit {name}: {option} is missing from the CLI reference"
            if not action.option_strings:
                assert f"`{action.metavar or action.dest}`" in body


# -- links -----------------------------------------------------------------------------------
def github_slug(title: str) -> str:
    """GitHub's heading anchors: lower case, punctuation dropped (letters of any script
    kept), each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def site_slug(title: str) -> str:
    return mkdocs_slugify(title, "-")


def _target_text(path: Path) -> str | None:
    """The markdown of a link target: a file, or a page the site generates."""
    if path.is_file():
        return path.read_text(encoding="utf-8") if path.suffix == ".md" else ""
    if path.is_relative_to(DOCS):
        uri = path.relative_to(DOCS).as_posix()
        if uri in hooks.GENERATED:
            return hooks.GENERATED[uri]()
        included = {page: repo for repo, page in hooks.included_pages().items()}
        if uri in included:
            return (ROOT / included[uri]).read_text(encoding="utf-8")
    if path.is_dir():
        return ""
    return None


def broken_links(files: list[Path], slug_for: Callable[[Path], Callable[[str], str]]) -> list[str]:
    """Every relative link of ``files`` whose file, or whose heading anchor, does not exist."""
    problems: list[str] = []
    cache: dict[Path, str | None] = {}
    for source in files:
        text = source.read_text(encoding="utf-8")
        for line, target in hooks.iter_links(text):
            if hooks.is_external(target) or target.startswith("/"):
                continue
            path_part, _, anchor = target.partition("#")
            where = f"{source.relative_to(source.parents[1]) if len(source.parents) > 1 else source}:{line}"
            path = source if not path_part else Path(os.path.normpath(source.parent / path_part))
            if path not in cache:
                cache[path] = _target_text(path)
            content = cache[path]
            if content is None:
                problems.append(f"{where}: {target} does not exist")
                continue
            if anchor and path.suffix == ".md" and anchor not in hooks.heading_slugs(content, slug_for(source)):
                problems.append(f"{where}: {target}: no heading with the anchor #{anchor}")
    return problems


def _slug_for(source: Path) -> Callable[[str], str]:
    """Pages under docs/ are read on the site, the rest on GitHub."""
    return site_slug if source.is_relative_to(DOCS) else github_slug


def test_no_broken_internal_links():
    files = [ROOT / "README.md", *sorted(DOCS.rglob("*.md")), *sorted((ROOT / "benchmarks").glob("README*.md"))]
    problems = broken_links(files, _slug_for)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_link_checker_finds_what_is_broken(tmp_path):
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## Some `code` heading\n\n## Again\n\n## Again\n")
    page.write_text(
        "# Page\n\n"
        "[ok](other.md) [ok](other.md#some-code-heading) [ok](other.md#again-1) [ok](#page)\n"
        "[gone](missing.md) ![gone](img/none.png) [bad anchor](other.md#nowhere) [bad](#nope)\n"
        "[web](https://example.org/x.md) `[in code](missing2.md)`\n\n"
        "```\n[in a block](missing3.md)\n```\n"
    )
    problems = broken_links([page], lambda _: site_slug)
    assert len(problems) == 4, problems
    for what in ("missing.md", "img/none.png", "#nowhere", "#nope"):
        assert any(what in p for p in problems)


def test_slugs_follow_github_and_mkdocs():
    assert github_slug("Quality per network evaluation, and the applications (`bench_steps.py`)".replace("`", "")) == (
        "quality-per-network-evaluation-and-the-applications-bench_stepspy"
    )
    assert site_slug("Posterior q(x_{t−1} | x_t, x_0)") == "posterior-qx_t1-x_t-x_0"


# -- pictures --------------------------------------------------------------------------------
def test_every_picture_is_drawn_by_the_project_and_every_shown_picture_exists():
    images = {p.name for p in (DOCS / "images").glob("*.png")}
    assert images <= set(make_images.PICTURES), (
        f"not drawn by docs/make_images.py: {images - set(make_images.PICTURES)}"
    )
    files = [ROOT / "README.md", *sorted(DOCS.rglob("*.md")), *sorted((ROOT / "benchmarks").glob("README*.md"))]
    for source in files:
        for _, target in hooks.iter_links(source.read_text(encoding="utf-8")):
            if target.endswith(".png") and not hooks.is_external(target):
                shown = Path(os.path.normpath(source.parent / target))
                assert shown.is_file(), f"{source.name} shows {target}, which does not exist"
                assert shown.parent == DOCS / "images", f"{source.name}: pictures live in docs/images ({target})"


@pytest.mark.parametrize("command", ["make demo", "make test", "mkdocs serve", "mkdocs build"])
def test_the_readme_says_how_to_start_and_where_the_docs_are(command):
    assert command in (ROOT / "README.md").read_text(encoding="utf-8")


def test_dead_site_links_are_found(tmp_path):
    (tmp_path / "page").mkdir()
    (tmp_path / "there.py").write_text("")
    (tmp_path / "page" / "index.html").write_text(
        '<a href="../there.py">ok</a> <a href="../page/">ok</a> <a href="#x">ok</a> <a href="https://x.org/y">ok</a>'
        ' <a href="../gone.py#L1">dead</a> <img src="../images/none.png">'
    )
    assert sorted(dead_site_links(tmp_path)) == ["page/index.html: ../gone.py", "page/index.html: ../images/none.png"]


def test_links_are_rewritten_for_the_site():
    text = (
        "[a](spec.md#validation) [b](../examples/moons.yaml) [c](../benchmarks/README.md#results) [d](../plugins)\n"
        "[e](nothing/here.md) `[f](../examples/moons.yaml)` [g](https://x.org)\n"
    )
    new, needed = hooks.localize(text, DOCS / "page.md", "page.md")
    assert new.splitlines() == [
        (
            "[a](spec.md#validation) [b](src/examples/moons.yaml) [c](benchmarks/index.md#results)"
            " [d](src/plugins/index.md)"
        ),
        "[e](nothing/here.md) `[f](../examples/moons.yaml)` [g](https://x.org)",
    ]
    assert needed == {"examples/moons.yaml", "plugins/"}
    # a repository page served elsewhere: links start from where its file is
    new, needed = hooks.localize(
        "![p](../docs/images/moons.png) [s](bench_steps.py)", ROOT / "benchmarks" / "README.md", "benchmarks/index.md"
    )
    assert new == "![p](../images/moons.png) [s](../src/benchmarks/bench_steps.py)"
    assert needed == {"benchmarks/bench_steps.py"}


def test_sphinx_roles_in_docstrings_show_as_code():
    html = "see :meth:<code>save</code> and :class:<code>~diffkit.interfaces.BuildContext</code>"
    assert hooks.on_page_content(html, None, None, None) == "see <code>save</code> and <code>BuildContext</code>"
