"""CLI commands too large for cli.py, one module each; they import heavy modules lazily."""
