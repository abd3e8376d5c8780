"""The lean runtime: numpy + one backend, no torch (see design.md, "Lean-runtime rule")."""
