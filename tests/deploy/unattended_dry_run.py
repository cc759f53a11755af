"""unattended-upgrades' own dry run over a prepared root directory; run with Debian's python3.

Usage: /usr/bin/python3 unattended_dry_run.py ROOT. ROOT holds etc/apt (the rendered
apt.conf.d and preferences.d files, a sources.list naming a local repository) and
var/lib/dpkg/status. The script is Debian's /usr/bin/unattended-upgrade itself, loaded
as a module and entered through its ``main(options, rootdir)``, the alternative root
its own test suite uses: it reads the Origins-Pattern from ROOT's apt.conf.d, matches
it against the repository's Release fields and decides what it would upgrade. Prints
JSON: the packages it would upgrade and the candidate version apt's policy (the pin)
chooses for each installed package.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import re
import sys
from pathlib import Path

import apt  # python3-apt: Debian's python only
import apt_pkg

SCRIPT = "/usr/bin/unattended-upgrade"


def load_script():  # type: ignore[no-untyped-def]
    loader = importlib.machinery.SourceFileLoader("unattended_upgrade", SCRIPT)
    spec = importlib.util.spec_from_loader("unattended_upgrade", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def main() -> None:
    root = Path(sys.argv[1])
    apt_pkg.init()
    apt.Cache(rootdir=str(root)).update()  # the local repository's Release and Packages
    uu = load_script()
    options = uu.Options()  # what `unattended-upgrade --dry-run --debug` parses its command line into
    options.dry_run = True
    options.debug = True
    code = uu.main(options, rootdir=str(root))
    log = (root / "var/log/unattended-upgrades/unattended-upgrades.log").read_text()
    would = re.findall(r"Packages that will be upgraded: (.*)$", log, re.M)
    cache = apt.Cache(rootdir=str(root))
    candidates = {pkg.name: pkg.candidate.version for pkg in cache if pkg.is_installed and pkg.candidate}
    print(json.dumps({"code": code, "upgraded": " ".join(would).split(), "candidates": candidates, "log": log}))


if __name__ == "__main__":
    main()
