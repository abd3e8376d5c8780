"""The `ldmrt` command line: the Typer app and its commands, each in ldmrt/commands/<name>.py.

The CLI owns the terminal (ldmrt/commands/terminal.py: consoles, one-line errors, flag names);
the commands import their heavy modules inside the command, so `ldmrt --help` stays fast.
"""
from __future__ import annotations

import logging
import signal
import sys

import typer

from ldmrt.commands import terminal
from ldmrt.commands.bench import bench
from ldmrt.commands.build import build
from ldmrt.commands.embed import embed
from ldmrt.commands.export import export
from ldmrt.commands.generate import generate
from ldmrt.commands.inspect import inspect
from ldmrt.commands.triton import triton

app = typer.Typer(help="Latent Diffusion Models: PyTorch -> ONNX -> TensorRT, a lean runtime, benchmarks.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None)

# Every command, by the name a user types, in pipeline order.
COMMANDS = (("export", export), ("build", build), ("generate", generate), ("bench", bench),
            ("inspect", inspect), ("triton", triton), ("embed", embed))
for _name, _command in COMMANDS:
    app.command(_name)(_command)


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
         verbose: bool = typer.Option(False, "--verbose", "-v", help="Show info logs.")) -> None:
    terminal.set_debug(debug)
    # `kill`, `timeout` and `docker stop` send SIGTERM: unwind like Ctrl-C so nothing half-written stays.
    signal.signal(signal.SIGTERM, _interrupt)
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not debug else logging.INFO)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run() -> None:  # pragma: no cover - console entry for `python -m ldmrt`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
