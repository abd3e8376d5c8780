"""What every command shares on the terminal: the two consoles, LdmrtError as one red line with
its field named as the flag, and small option parsers. The CLI owns the terminal; library code
logs and raises instead."""
from __future__ import annotations

import contextlib
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from ldmrt.errors import ConfigError, LdmrtError

console = Console(stderr=True)      # status lines, progress, warnings, errors
out = Console()                     # results: tables and reports
_state = {"debug": False}

# Library fields whose flag is not `--` + the field with dashes.
_FLAGS = {"class_labels": "--class-label", "out": "--out", "size": "--sizes", "profiles": "--profile",
          "optimization_level": "--opt-level", "compute_capabilities": "--compute-capability",
          "gpus": "--gpu", "preferred_batch_sizes": "--preferred-batch-size"}


def set_debug(debug: bool) -> None:
    """--debug: user_errors re-raises, so the traceback shows."""
    _state["debug"] = debug


def flag_for(field: str) -> str:
    """The command-line flag of a library field (`init_image` -> `--init-image`)."""
    return _FLAGS.get(field, "--" + field.replace("_", "-"))


def _message(exc: LdmrtError) -> str:
    """The error's message, its leading field name (see LdmrtError.field) swapped for the flag."""
    message = str(exc)
    field = exc.field
    if field and message.startswith(field) and message[len(field):len(field) + 1] in (" ", ":", ""):
        return flag_for(field) + message[len(field):]
    return message


@contextlib.contextmanager
def user_errors():
    """LdmrtError -> one red line and exit 2 (traceback only with --debug)."""
    try:
        yield
    except LdmrtError as exc:
        if _state["debug"]:
            raise
        # escaped: a path or prompt in the message may look like rich markup ("[red]")
        console.print(f"[bold red]error:[/] {type(exc).__name__}: {escape(_message(exc))}", highlight=False,
                      soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]; nothing half-written was left behind")
        raise typer.Exit(130) from None


def choice(kind, value: str, option: str):
    """`value` as a member of the enum `kind`; ConfigError naming `option` and the choices otherwise."""
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{option} {value!r}: expected one of {[k.value for k in kind]}") from None


def comma_list(value: Optional[str]) -> Optional[tuple[str, ...]]:
    """'unet, vae_decoder' -> ('unet', 'vae_decoder'); None (the option not given) -> None, and
    an empty list ('', ',') -> () so that it is refused rather than read as "all"."""
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


def size_text(n: float) -> str:
    """Bytes for a table: '512 B', '1.5 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
