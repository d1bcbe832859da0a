"""``twist`` finds the regproxy plugin, and ``--help`` works without leaking secrets."""

from __future__ import annotations

from pathlib import Path

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin, getPlugins

REPO_ROOT = Path(__file__).resolve().parents[2]


def _makers() -> dict[str, object]:
    import twisted.plugins

    return {maker.tapname: maker for maker in getPlugins(IServiceMaker, twisted.plugins)}


def test_plugin_file_is_on_the_plugin_path() -> None:
    import twisted.plugins

    plugin_dirs = [Path(path).resolve() for path in twisted.plugins.__path__]
    assert (REPO_ROOT / "twisted" / "plugins").resolve() in plugin_dirs or any(
        (path / "regproxy_plugin.py").exists() for path in plugin_dirs
    )
    # No __init__.py: twisted/plugins must stay a namespace extension of Twisted's own.
    assert not (REPO_ROOT / "twisted" / "__init__.py").exists()
    assert not (REPO_ROOT / "twisted" / "plugins" / "__init__.py").exists()


def test_service_maker_is_discovered() -> None:
    maker = _makers()["regproxy"]
    assert IPlugin.providedBy(maker)
    assert IServiceMaker.providedBy(maker)
    assert maker.module == "regproxy.tap"
    assert maker.description
    from regproxy import tap

    assert maker.options is tap.Options
    assert maker.makeService is tap.makeService


def test_every_package_is_installed() -> None:
    """setup.cfg lists packages one by one: a package missing there works from a checkout
    and is absent from the installed proxy (``import regproxy.server`` fails in the image)."""
    setup = (REPO_ROOT / "setup.cfg").read_text()
    listed = setup.split("packages =")[1].split("\ninstall_requires")[0].split()
    packages = {
        ".".join(path.parent.relative_to(REPO_ROOT).parts)
        for path in (REPO_ROOT / "regproxy").rglob("__init__.py")
    }
    assert packages <= set(listed), sorted(packages - set(listed))
