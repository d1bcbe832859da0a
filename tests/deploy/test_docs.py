"""The documentation: docs/ builds with Sphinx without a warning, the README renders and its
links lead somewhere, the configuration reference says every option and environment variable
once in the groups of --help, and the examples users copy work."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from regproxy import option_help
from regproxy.routing.load import ROUTE_KEYS, check_config, load_routes
from regproxy.tap import Options
from tests.support.tools import require_module, require_program

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.rst"
# Pages other parts of issue 20 write, which these pages link to already. Until one is
# merged the build gets a stand-in, so the links are checked; the stand-in is an orphan, so
# the real page must also be put in a toctree (or the build warns).
PAGES_TO_COME: tuple[str, ...] = ()


def page(name: str) -> str:
    return (DOCS / f"{name}.rst").read_text(encoding="utf-8")


def literal_blocks(text: str) -> list[str]:
    """The literal blocks (after ``::``) of a reST text, dedented."""
    blocks, current, inside = [], [], False
    for line in text.splitlines():
        if inside and (not line.strip() or line.startswith(" ")):
            current.append(line)
            continue
        if current:
            blocks.append(textwrap.dedent("\n".join(current)).strip())
        current, inside = [], line.endswith("::")
    if current:
        blocks.append(textwrap.dedent("\n".join(current)).strip())
    return [block for block in blocks if block]


# --- the build -------------------------------------------------------------------------


def test_docs_build_without_warnings(tmp_path: Path) -> None:
    require_module("sphinx", "documentation build", "pip install sphinx")
    source = tmp_path / "docs"
    shutil.copytree(DOCS, source, ignore=shutil.ignore_patterns("_build"))
    # Pages include example files from the deployment artifacts beside docs/.
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    for name in PAGES_TO_COME:
        if not (source / f"{name}.rst").exists():
            (source / f"{name}.rst").write_text(f":orphan:\n\n{name}\n{'=' * len(name)}\n")
    outputs = [str(source), str(tmp_path / "html")]
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", *outputs],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert (tmp_path / "html" / "configuration.html").exists()


def test_every_page_is_in_a_toctree() -> None:
    """Sphinx only warns about a page outside every toctree; this names it."""
    index = page("index")
    listed = set(re.findall(r"^   ([\w-]+)$", index, re.MULTILINE))
    pages = {path.stem for path in DOCS.glob("*.rst")} - {"index"}
    assert pages - listed == set()


# --- the README ------------------------------------------------------------------------


def test_readme_renders_without_warnings() -> None:
    core = require_module("docutils.core", "documentation checks", "pip install docutils")
    # halt_level 2: any warning (a bad table, an unknown role, a broken title) fails.
    core.publish_doctree(
        README.read_text(encoding="utf-8"),
        source_path=str(README),
        settings_overrides={"halt_level": 2, "report_level": 2, "warning_stream": False},
    )


def test_readme_links_lead_to_pages() -> None:
    targets = re.findall(r"`[^`<]*<([^>]+)>`__?", README.read_text(encoding="utf-8"))
    local = [target for target in targets if "://" not in target]
    assert local, "the README links to no page"
    assert [target for target in local if not (ROOT / target).is_file()] == []
    # Every page is reachable from the README.
    linked = {Path(target).stem for target in local}
    pages = {path.stem for path in DOCS.glob("*.rst")} - {"index"}
    assert pages - linked == set()


def test_readme_is_short_with_the_commands_at_the_top() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    head = text.split("Documentation\n")[0]
    assert "twist regproxy --port tcp:8080" in head
    assert "interface=127.0.0.1" in head and "every interface" in head
    assert "python -m pytest tests/unit" in head
    assert "python -m twisted regproxy" in head


# --- the configuration reference -------------------------------------------------------


def _documented_options() -> list[str]:
    names = []
    for line in re.findall(r"^\.\. option:: (.+)$", page("configuration"), re.MULTILINE):
        names += re.findall(r"--([\w-]+)", line)
    return names


def _visible_options() -> list[str]:
    names = option_help.option_names(Options(environ={}))
    return [name for group in option_help.GROUPS for name, _ in group.entries() if name in names]


def test_configuration_describes_every_option_once() -> None:
    documented = _documented_options()
    assert sorted(documented) == sorted(_visible_options())
    assert len(documented) == len(set(documented))


def test_configuration_is_grouped_as_the_help_is() -> None:
    text = page("configuration")
    headings = re.findall(r"^(\w[^\n]*)\n-{3,}$", text, re.MULTILINE)
    names = option_help.option_names(Options(environ={}))
    groups = [
        group for group in option_help.GROUPS if any(name in names for name, _ in group.entries())
    ]
    assert headings == [group.heading for group in groups]
    # Each option under its group's heading, in the help's order.
    sections = re.split(r"^\w[^\n]*\n-{3,}$", text, flags=re.MULTILINE)[1:]
    for group, section in zip(groups, sections, strict=True):
        documented = re.findall(r"^\.\. option:: (?:-\w \S+, )?--([\w-]+)", section, re.M)
        assert documented == [name for name, _ in group.entries() if name in names]


def test_twist_help_shows_the_reference_s_groups() -> None:
    """End to end, through twist itself: regproxy's usage line and the page's headings."""
    result = subprocess.run(
        [sys.executable, "-m", "twisted", "regproxy", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "COLUMNS": "80"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Usage: twist regproxy [options]"
    shown = [line[:-1] for line in lines if re.fullmatch(r"\w[\w ]*:", line)]
    assert shown == re.findall(r"^(\w[^\n]*)\n-{3,}$", page("configuration"), re.MULTILINE)
    assert "--as-worker" not in result.stdout


def _environment_variables() -> set[str]:
    """Every variable name regproxy/environment.py mentions: the ones regproxy reads."""
    tree = ast.parse((ROOT / "regproxy" / "environment.py").read_text())
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*", node.value)
    }


def test_configuration_describes_every_environment_variable_once() -> None:
    variables = []
    column = None  # where a directive's further signatures (one per line) start
    for line in page("configuration").splitlines():
        if match := re.match(r"(\s*\.\. envvar:: )(\S+)$", line):
            column = len(match.group(1))
            variables.append(match.group(2))
        elif column and re.fullmatch(rf" {{{column}}}(\S+)", line):
            variables.append(line.strip())
        else:
            column = None
    assert len(variables) == len(set(variables))
    assert set(variables) == _environment_variables()
    assert {"PORT", "REGISTRY_HOST", "REGPROXY_WORKERS"} <= set(variables)


# --- routes and clients ----------------------------------------------------------------


def _with_files_in(tmp_path: Path, toml: str) -> str:
    """The example with its absolute file names moved into tmp_path, each file present."""
    for name in re.findall(r'"(/etc/[^"]+)"', toml):
        local = tmp_path / name.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text("secret")
        toml = toml.replace(f'"{name}"', f'"{local}"')
    return toml


def _routes_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "routes.toml"
    path.write_text(_with_files_in(tmp_path, text), encoding="utf-8")
    return path


def test_the_routes_page_documents_every_key() -> None:
    assert [key for key in ROUTE_KEYS if f"``{key}``" not in page("routes")] == []


def test_the_first_routes_example_is_short_and_valid(tmp_path: Path) -> None:
    """Three registries in eleven lines: the newcomer's copy-and-paste file."""
    first = literal_blocks(page("routes"))[0]
    assert len(first.splitlines()) <= 11
    assert check_config(_routes_file(tmp_path, first)) == []


def test_the_client_settings_match_the_routes(tmp_path: Path) -> None:
    """The routes file is valid, and the containerd and podman loops, run as shown, write
    one valid entry per route: containerd's by the route's namespace, podman's by its path."""
    bash = require_program("bash", "the client examples")
    blocks = literal_blocks(page("clients"))
    (routes_toml,) = [block for block in blocks if "[[routes]]" in block]
    routes = load_routes(_routes_file(tmp_path, routes_toml)).routes
    assert len(routes) == 6
    loops = [block for block in blocks if block.startswith("for ")]
    assert len(loops) == 2
    etc = tmp_path / "etc"
    (etc / "containers").mkdir(parents=True)
    for loop in loops:
        script = loop.replace("/etc/", f"{etc}/")
        subprocess.run([bash, "-euc", script], check=True, timeout=30)
    hosts = {
        path.parent.name: tomllib.loads(path.read_text())
        for path in (etc / "containerd" / "certs.d").glob("*/hosts.toml")
    }
    assert set(hosts) == {route.namespace for route in routes}
    for registry, parsed in hosts.items():
        assert parsed["host"] == {
            "https://r.example.com": {"capabilities": ["pull", "resolve"]}
        }, registry
        expected = "registry-1.docker.io" if registry == "docker.io" else registry
        assert parsed["server"] == f"https://{expected}"
    mirrors = tomllib.loads((etc / "containers" / "registries.conf").read_text())["registry"]
    by_namespace = {route.namespace: route.path for route in routes}
    assert {entry["prefix"]: entry["mirror"][0]["location"] for entry in mirrors} == {
        namespace: f"r.example.com/{path}" for namespace, path in by_namespace.items()
    }
    assert all(entry["location"] == entry["prefix"] for entry in mirrors)
    # The single-registry examples shown above each loop are what the loop writes.
    assert tomllib.loads(blocks[blocks.index(loops[0]) - 1]) == hosts["docker.io"]
    (hub,) = tomllib.loads(blocks[blocks.index(loops[1]) - 1])["registry"]
    assert hub == next(entry for entry in mirrors if entry["prefix"] == "docker.io")


@pytest.mark.parametrize("name", ["upstream", "deployment"])
def test_shown_secret_files_are_private(name: str) -> None:
    """An example that installs a file under /etc/regproxy gives it mode 0600."""
    found = re.findall(r"install (?:-D )?-m (\d+) (?:\S+ )?(/etc/regproxy/\S+)", page(name))
    assert found
    assert {mode for mode, _ in found} == {"0600"}
