"""Fixtures of the deployment tests; the helpers live in deploy_support.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploy_support import moto, terraform, terraform_names  # noqa: F401  (fixtures)
