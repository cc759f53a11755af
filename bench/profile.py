"""Optional sampling profiles of the servers during the closed loop, with py-spy.

py-spy is not a project dependency: install it anywhere (``pip install py-spy``
in a venv of your own) and pass its path with ``--py-spy``. Each server process
of each non-reference target is sampled during the closed-loop window and
during the first round of fan-outs
(``--nonblocking``: the process is not paused, so the figures stay honest), as
collapsed stacks (``*.txt``, one ``frame;frame;... count`` per line, for
flamegraph.pl or speedscope) and summarised as the functions with the most
samples, on their own (self) and with what they call (inclusive).
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

__all__ = ["Profiler", "summarise"]


class Profiler:
    def __init__(self, py_spy: Path, out_dir: Path) -> None:
        self.py_spy = py_spy
        self.out_dir = out_dir
        self._running: list[tuple[subprocess.Popen, Path]] = []

    def start(self, name: str, pid: int, seconds: float) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = self.out_dir / f"{name}.txt"
        proc = subprocess.Popen(
            [
                str(self.py_spy),
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(max(1, round(seconds))),
                "--rate",
                "250",
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._running.append((proc, out))

    def finish(self, timeout: float = 30.0) -> list[Path]:
        done = []
        for proc, out in self._running:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if out.exists():
                done.append(out)
        self._running.clear()
        return done


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match.group("file")
    for marker in ("site-packages/", "/appliance/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/appliance/":
                path = "appliance/" + path
            break
    return f"{match.group('func')} ({path})"


def summarise(collapsed: Path, top: int = 25) -> str:
    """Top functions by self and inclusive share of the samples."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short(f) for f in stack.split(";")]
        # py-spy's first frame is the process/thread label.
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        self_counts[frames[-1]] += count
        for frame in set(frames):
            incl_counts[frame] += count
    if not total:
        return f"{collapsed.name}: no samples"
    lines = [f"{collapsed.name}: {total} samples", "  self %  function"]
    lines += [f"  {100 * n / total:5.1f}  {f}" for f, n in self_counts.most_common(top)]
    lines += ["  incl %  function"]
    lines += [f"  {100 * n / total:5.1f}  {f}" for f, n in incl_counts.most_common(top)]
    return "\n".join(lines)
