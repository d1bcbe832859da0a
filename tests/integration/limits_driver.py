"""A process with one rate limiter (``build_limiter`` on the real reactor), driven over
stdin/stdout by the limits tests; and ``Driver``, the tests' side of it.

Run: ``python limits_driver.py [--redis URL] [--shared DIRECTORY]``. Each stdin line is a JSON
command, answered by one JSON line:
  {"take": KEY, "limit": "250/1h", "n": 300, "at": WALL_TIME}
      n takes at once (after ``at``, so that processes start together): allowed count,
      remaining and retry_after per take, the slowest take and the mean time per take, in s
  {"logs": true}     log lines since the last answer
Every answer carries ``logs``: the limiter's log lines (formatted) since the last answer.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WORKTREE = Path(__file__).resolve().parents[2]


def main() -> None:
    from twisted.internet import reactor, stdio
    from twisted.internet.defer import gatherResults
    from twisted.logger import LogLevel, formatEvent, globalLogBeginner
    from twisted.protocols.basic import LineReceiver

    from regproxy.access.limits import Verdict, build_limiter
    from regproxy.config import LimitsConfig, RateLimit

    args = sys.argv[1:]
    redis = args[args.index("--redis") + 1] if "--redis" in args else None
    shared = args[args.index("--shared") + 1] if "--shared" in args else None
    logs: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level", LogLevel.debug) >= LogLevel.info and "rate limits" in str(
            event.get("log_format", "")
        ):
            logs.append(f"{event['log_level'].name}: {formatEvent(event)}")

    globalLogBeginner.beginLoggingTo([observe], redirectStandardIO=False)
    limiter = build_limiter(LimitsConfig(redis=redis), reactor, shared)

    class Commands(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            command = json.loads(line)
            if "take" in command:
                delay = max(0.0, command.get("at", 0) - time.time())
                reactor.callLater(delay, self.take, command)  # type: ignore[attr-defined]
            else:
                self.answer({})

        def take(self, command: dict[str, Any]) -> None:
            limit = RateLimit.parse(command["limit"])
            started = time.monotonic()
            slowest = [0.0]

            def timed(verdict: Verdict) -> Verdict:
                slowest[0] = max(slowest[0], time.monotonic() - started)
                return verdict

            takes = [
                limiter.take(command["take"], limit).addCallback(timed)
                for _ in range(command["n"])
            ]
            elapsed = time.monotonic() - started  # the synchronous part (the workers' file)

            def report(verdicts: list[Verdict]) -> None:
                self.answer(
                    {
                        "allowed": sum(v.allowed for v in verdicts),
                        "remaining": [v.remaining for v in verdicts],
                        "retry_after": [v.retry_after for v in verdicts],
                        "slowest": slowest[0],
                        "per_take": max(elapsed, time.monotonic() - started) / command["n"],
                    }
                )

            gatherResults(takes).addCallback(report)

        def answer(self, result: dict[str, Any]) -> None:
            result["logs"] = logs[:]
            logs.clear()
            self.sendLine(json.dumps(result).encode())

        def connectionLost(self, reason: object = None) -> None:
            if reactor.running:  # type: ignore[attr-defined]
                reactor.stop()  # type: ignore[attr-defined]

    stdio.StandardIO(Commands())
    reactor.run()  # type: ignore[attr-defined]


class Driver:
    """The tests' side: one driver process, stopped by ``stop`` (tests call it in a finally)."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, *args],
            cwd=WORKTREE,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(WORKTREE)},
        )
        self._buffer = b""

    def send(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        self.process.stdin.flush()

    def receive(self, timeout: float = 30.0) -> dict[str, Any]:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                assert remaining > 0, "the limits driver did not answer in time"
                if selector.select(remaining):
                    chunk = os.read(fd, 65536)
                    assert chunk, "the limits driver exited"
                    self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        return answer

    def take(self, key: str, limit: str, n: int = 1, at: float = 0.0) -> dict[str, Any]:
        self.send({"take": key, "limit": limit, "n": n, "at": at})
        return self.receive()

    def logs(self) -> list[str]:
        self.send({"logs": True})
        logs: list[str] = self.receive()["logs"]
        return logs

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


if __name__ == "__main__":
    main()
