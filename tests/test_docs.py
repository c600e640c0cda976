"""The documentation people follow: every relative link and anchor in README.md and docs/ resolves, and the README's
Quick start training loop runs as written against a real server."""

from __future__ import annotations

import dataclasses
import pathlib
import re
import subprocess
import sys
from collections.abc import Mapping

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose(text: str, *, code_text: bool = False) -> str:
    """`text` without fenced code blocks, and without inline code (links there are examples, not links) or, with
    `code_text`, with inline code's text kept (a heading's code spans are part of its anchor)."""
    kept, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(re.sub(r"`([^`]*)`", r"\1" if code_text else "", line))
    return "\n".join(kept)


def anchors(path: pathlib.Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file (lower case, punctuation dropped, spaces to hyphens,
    repeats numbered) plus explicit `<a id=...>` / `<a name=...>` targets."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    text = path.read_text(encoding="utf-8")
    for line in prose(text, code_text=True).splitlines():
        heading = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if heading is None:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(2))  # a link in a heading: its text
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    found.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))
    return found


def relative_links(path: pathlib.Path) -> list[str]:
    return [
        target
        for target in LINK.findall(prose(path.read_text(encoding="utf-8")))
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto: ...: not ours to check
    ]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_relative_links_and_anchors_resolve(document: pathlib.Path) -> None:
    broken = []
    for target in relative_links(document):
        file_part, _, fragment = target.partition("#")
        resolved = (document.parent / file_part).resolve() if file_part else document
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target}: no heading #{fragment} in {resolved.relative_to(ROOT)}")
    assert broken == [], f"{document.relative_to(ROOT)}: " + "; ".join(broken)


def test_docs_anchor_rules_match_github(tmp_path: pathlib.Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Scale-out: several `central` replicas\n## A b\n## A b\n```\n# not a heading\n```\n")
    assert anchors(page) == {"scale-out-several-central-replicas", "a-b", "a-b-1"}


def test_readme_quick_start_loop_runs_as_written_against_a_real_server() -> None:
    pytest.importorskip("torch")
    from gradwatch.server.app import ServerApp
    from gradwatch.server.config import ServerConfig
    from server_support import get_json

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = readme[readme.index("## Quick start") :]
    code = re.search(r"```python\n(.*?)```", quick, re.S)
    assert code is not None and 'server="localhost:50051"' in code.group(1)
    app = ServerApp(ServerConfig.local()).start()
    try:
        # The only change: the address of this test's server instead of the documented default port.
        script = code.group(1).replace("localhost:50051", app.grpc_target)
        subprocess.run([sys.executable, "-c", script], check=True, timeout=300, cwd=ROOT)
        run = get_json(f"{app.http_url}/api/v1/runs/quickstart-mlp")["run"]
        assert run["state"] == "finished" and run["step"] == 300
    finally:
        app.stop()


@pytest.mark.parametrize("package", ["agent", "server"])
def test_package_module_map_names_every_module(package: str) -> None:
    """The module map in agent/__init__.py and server/__init__.py lists every module of the folder."""
    folder = ROOT / package
    docstring = (folder / "__init__.py").read_text().split('"""')[1]
    modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"} | {
        f"{p.name}/" for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").exists()
    }
    # A module is named as `name.py` anywhere, or as `name` opening a line of the map or after "; ".
    missing = [m for m in sorted(modules)
               if f"{m}.py" not in docstring and not re.search(rf"(^\s+|; ){re.escape(m)}[\s:]", docstring, re.M)]
    assert not missing, f"{package}/__init__.py's module map misses {missing}"


def _dotted(value: object, prefix: str = "") -> set[str]:
    """Dotted keys of a settings tree (dataclasses and mappings of them) or of a parsed YAML mapping."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    elif isinstance(value, Mapping):
        items = list(value.items())
    else:
        return {prefix}
    return {key for name, item in items for key in _dotted(item, f"{prefix}{name}.")} if items else {prefix}


def test_configuration_md_server_block_is_the_server_schema() -> None:
    """The YAML block under "Server" in docs/configuration.md names every setting of ServerConfig and gives each its
    default: loading it gives exactly the defaults."""
    from gradwatch.server.config import load_config

    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S)]
    documented = next(b for b in blocks if isinstance(b, dict) and "limits" in b and "detectors" in b)
    defaults = load_config({}, source="defaults")
    assert load_config(documented, source="docs/configuration.md") == defaults
    missing = _dotted(defaults) - _dotted(documented)
    assert not missing, f"settings missing from docs/configuration.md: {sorted(missing)}"


def test_configuration_md_agent_table_is_the_agent_schema() -> None:
    """Every attach() option has a row in docs/configuration.md's agent table naming its environment variable,
    and each numeric default of AgentConfig is the one the row states."""
    pytest.importorskip("torch")
    from gradwatch.agent import config as agent_config

    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    section = text.split("## Agent", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    options = agent_config._OPTIONS
    defaults = agent_config.AgentConfig()
    for name in (*options, *agent_config.ATTACH_OBJECTS):
        [row] = [r for r in rows if f"`{name}`" in r.split("|")[1]]
        env = options[name].env if name in options else None
        assert env is None or f"`{env}`" in row, (name, env, row)
        field = {"run": "run_id", "detectors": "detector_settings"}.get(name, name)
        default = getattr(defaults, field, None)
        if isinstance(default, int | float) and not isinstance(default, bool) and name not in ("rank", "world_size",
                                                                                               "local_rank"):
            cell = row.split("|")[3]
            assert re.search(rf"(?<![\d.]){re.escape(repr(default))}(?![\d])", cell), (name, default, cell)
        alone = len(re.findall(r"`[a-z_]+`", row.split("|")[1])) == 1  # a row of its own, not a group's
        if isinstance(default, bool) and alone:  # a switch's row starts with its default: on or off
            assert row.split("|")[3].strip().startswith("on" if default else "off"), (name, default, row)
    # The other way round: every row names options the schema has, and every schema field has its doc line.
    named = {n for r in rows for n in re.findall(r"`([a-z_]+)`", r.split("|")[1])}
    assert named <= {*options, *agent_config.ATTACH_OBJECTS}, named - {*options, *agent_config.ATTACH_OBJECTS}
    for spec in dataclasses.fields(agent_config.AgentConfig):
        assert spec.metadata.get("doc"), f"AgentConfig.{spec.name} has no doc line"
