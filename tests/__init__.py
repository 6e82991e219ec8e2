"""Tests of sphere-edit: ``unit`` mirrors the package's layout; ``integration`` runs the
embedded real models."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES_DIR = REPO_ROOT / "tests" / "fixtures"
