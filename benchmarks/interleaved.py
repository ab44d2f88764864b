"""Solvers measured in turn, each in a warm process of its own.

A machine shared with other work drifts by tens of percent over minutes. A benchmark that
measures one solver after another lets that drift fall between the solvers, and so into their
ratio. Here every solver keeps a worker process (no solver beside another's threads, compiled
code or heap), and the measurements are taken in rounds: in each round every worker measures
every setting briefly, one worker at a time, in an order that changes from round to round
(``round_orders``), so that each solver samples the same stretch of the machine's time. A
waiting worker blocks on its pipe.

The protocol is one JSON object per line: the parent writes a request to a worker's stdin, the
worker answers with one line on its stdout (anything else it prints goes to stderr).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence


def round_orders(names: Sequence[str], rounds: int) -> Iterator[tuple[int, list[str]]]:
    """(round, the names in that round's order), the rounds following a Williams design: over a
    cycle of len(names) rounds (twice that for an odd count; later rounds repeat the cycle) each
    name takes each place equally often and follows each other name directly equally often, so
    that no solver always runs after the same one (whose heap, threads or cache it would inherit
    every round, as a cyclic rotation makes it do)."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    cycle = _williams(len(names))
    for r in range(rounds):
        yield r, [names[i] for i in cycle[r % len(cycle)]] if names else []


def _williams(k: int) -> list[list[int]]:
    """A Williams design of k treatments: rows that are orders of range(k), each index in each
    column equally often and each ordered pair of distinct indices adjacent equally often (k rows
    for even k; 2k, the rows and their reverses, for odd k)."""
    if k == 0:
        return [[]]
    first = [0]  # 0, 1, k−1, 2, k−2, ...: consecutive differences 1, −2, 3, −4, ... are distinct mod k
    low, high = 1, k - 1
    while len(first) < k:
        first.append(low)
        low += 1
        if len(first) < k:
            first.append(high)
            high -= 1
    rows = [[(i + r) % k for i in first] for r in range(k)]
    return rows if k % 2 == 0 else rows + [row[::-1] for row in rows]


class Worker:
    """A child process that answers one JSON line for each JSON line it is sent."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self._process = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True, bufsize=1)

    def ask(self, request: dict) -> dict:
        """Send ``request`` and wait for the answer; a worker that dies or answers garbage fails loudly."""
        assert self._process.stdin is not None and self._process.stdout is not None
        try:
            self._process.stdin.write(json.dumps(request) + "\n")
            self._process.stdin.flush()
        except BrokenPipeError:  # it has already exited: said below
            pass
        line = self._process.stdout.readline()
        if not line:
            code = self._process.wait()
            raise RuntimeError(f"benchmark worker {self.name!r} exited (status {code}) before answering {request}")
        return json.loads(line)

    def close(self) -> None:
        """End the worker (end of its input) and wait for it."""
        if self._process.stdin is not None:
            self._process.stdin.close()
        code = self._process.wait()
        if code != 0:
            raise RuntimeError(f"benchmark worker {self.name!r} ended with status {code}")


def serve(answer: Callable[[dict], dict], stdin=None, stdout=None) -> None:
    """The worker's side: answer each JSON line of ``stdin`` (default sys.stdin) with ``answer``'s
    JSON line on ``stdout`` (default: the process's standard output). Everything else the worker
    prints goes to stderr, so that the protocol's stream carries answers only; with the default
    stream that holds for libraries writing to file descriptor 1 from C as well."""
    stdin = sys.stdin if stdin is None else stdin
    printed = sys.stdout
    if stdout is None:
        sys.stdout.flush()
        protocol = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
    else:
        protocol = stdout
    sys.stdout = sys.stderr
    try:
        for line in stdin:
            if line.strip():
                protocol.write(json.dumps(answer(json.loads(line))) + "\n")
                protocol.flush()
    finally:
        sys.stdout = printed
