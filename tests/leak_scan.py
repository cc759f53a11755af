"""Everything the test run captured, scanned for secret values (SECURITY.md: secrets never go there).

The helpers in ``support.py`` register what they see: each appliance's log file and its
final ``/metrics``, every HTTP body, error frame and close reason. The session fixture in
``conftest.py`` calls :meth:`LeakScan.leaks` at the end and fails the run on any hit.
Reports name the secret and the source, never the value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

__all__ = ["SCAN", "LeakScan", "secrets_in_env"]

#: Shorter values are not secrets we can find without false hits (the appliance refuses them anyway).
MIN_SECRET_LENGTH = 8
_SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET", re.IGNORECASE)


def secrets_in_env(env: dict[str, str]) -> dict[str, str]:
    """The secret values in an appliance's environment, by name (passwords inside Redis URLs too)."""
    found = {name: value for name, value in env.items() if _SECRET_NAME.search(name)}
    for name, value in env.items():
        if name.endswith("_URL") and "://" in value:
            try:
                password = urlsplit(value).password
            except ValueError:
                continue
            if password:
                found[f"{name} password"] = unquote(password)
    return {name: value for name, value in found.items() if len(value) >= MIN_SECRET_LENGTH}


@dataclass
class LeakScan:
    secrets: dict[str, str] = field(default_factory=dict)
    log_files: dict[Path, str] = field(default_factory=dict)
    captured: list[tuple[str, str]] = field(default_factory=list)
    #: Bounds the memory of a long run; each capture is short (frames, reasons, small bodies).
    max_captured: int = 200_000

    def add_secrets(self, named: dict[str, str]) -> None:
        self.secrets.update({name: value for name, value in named.items() if len(value) >= MIN_SECRET_LENGTH})

    def add_log(self, path: Path, source: str) -> None:
        self.log_files[path] = source

    def capture(self, source: str, text: object) -> None:
        if len(self.captured) < self.max_captured:
            self.captured.append((source, text.decode(errors="replace") if isinstance(text, bytes) else str(text)))

    def _texts(self):
        for path, source in self.log_files.items():
            try:
                yield f"log of {source} ({path.name})", path.read_text(errors="replace")
            except OSError:
                continue  # A test removed it; nothing to scan.
        yield from self.captured

    def leaks(self) -> list[str]:
        """``"<secret name> in <source>"`` for every secret found; empty when nothing leaked."""
        values = {value: name for name, value in self.secrets.items()}
        # One pass per text with one alternation: cheap even over many megabytes of logs.
        pattern = re.compile("|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))) if values else None
        found: list[str] = []
        for source, text in self._texts():
            if pattern is None:
                break
            for match in set(pattern.findall(text)):
                found.append(f"{values[match]} in {source}")
        return sorted(set(found))

    def summary(self) -> str:
        return f"{len(self.log_files)} logs, {len(self.captured)} captures, {len(self.secrets)} secrets"


#: The session's scan, filled by ``support.py``.
SCAN = LeakScan()
