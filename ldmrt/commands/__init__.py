"""The CLI's commands, one module each (registered by name in ldmrt/cli.py), and terminal.py, what
they share on the terminal. Heavy modules load inside each command."""
