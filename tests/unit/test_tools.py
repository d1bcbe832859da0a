"""The one way tests skip for a missing tool, and that no test has another."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support import tools

TESTS = Path(__file__).resolve().parents[1]
# Ways to skip that would not turn into a failure under REGPROXY_REQUIRE_INTEGRATION=1.
OTHER_SKIPS = re.compile(r"pytest\.skip\(|\.skipif\(|importorskip\(|mark\.skip\b|unittest\.skip")


def test_no_test_skips_except_through_require_tools() -> None:
    found = [
        f"{path.relative_to(TESTS)}:{number}: {line.strip()}"
        for path in sorted(TESTS.rglob("*.py"))
        if path != Path(tools.__file__) and path != Path(__file__)
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if OTHER_SKIPS.search(line)
    ]
    assert found == []


def test_missing_tools_skip_and_fail_where_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REGPROXY_REQUIRE_INTEGRATION", raising=False)
    tools.require_tools([], "nothing")
    with pytest.raises(pytest.skip.Exception, match=r"^gadgets not installed: a, b$"):
        tools.require_tools(["a", "b"], "gadgets")
    with pytest.raises(pytest.skip.Exception, match=r"no-such-program-here \(how\)"):
        tools.require_programs("no-such-program-here (how)", "sh", what="gadgets")
    with pytest.raises(pytest.skip.Exception, match="no_such_module_here"):
        tools.require_module("no_such_module_here", "gadgets")
    with pytest.raises(pytest.skip.Exception, match=r"^gadgets not available: a flag$"):
        tools.require_capability(False, "gadgets", "a flag")
    tools.require_capability(True, "gadgets", "a flag")
    assert tools.require_program("sh", "a shell").endswith("/sh")
    assert tools.require_module("json", "json").__name__ == "json"
    monkeypatch.setenv("REGPROXY_REQUIRE_INTEGRATION", "1")
    for missing in (
        lambda: tools.require_tools(["a"], "gadgets"),
        lambda: tools.require_program("no-such-program-here", "gadgets"),
        lambda: tools.require_module("no_such_module_here", "gadgets"),
        lambda: tools.require_capability(False, "gadgets", "a flag"),
    ):
        with pytest.raises(pytest.fail.Exception):
            missing()
