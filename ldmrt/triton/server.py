"""Run the tritonserver that `nvidia-pytriton` ships, on localhost, from a Python environment.

Standard library only (the caller may be any Python). The environment is the folder that
scripts/triton_env.sh creates: a virtual environment of the system's python3 (Debian's), because
PyTriton's Python-backend stub links the system libpython; a stub running against another
interpreter's standard library fails to load models (seen: '_thread.RLock' object has no
attribute '_recursion_count' from a pyenv 3.11.7 environment against Debian's libpython 3.11.2).

`TritonServer` binds 127.0.0.1 on free ports, loads the named models (explicit model control),
waits for readiness with a deadline, and on stop ends its whole process group (the server and
its Python stubs), so nothing outlives it: not a normal exit (atexit), not SIGTERM or SIGINT to
its owner (handlers that stop every running server, then do what the signal did before), and not
its owner's death by SIGKILL when it was started from the main thread (the kernel's parent-death
signal, PR_SET_PDEATHSIG, sends the server SIGTERM).
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ldmrt.errors import LdmrtError

log = logging.getLogger(__name__)

ENV_VARIABLE = "LDMRT_TRITON_ENV"
SOURCE_ROOT = Path(__file__).resolve().parents[2]   # the folder holding the ldmrt package


class TritonServerError(LdmrtError):
    """The Triton environment is missing or broken, or tritonserver did not start or answer."""


# Triton's Python backend starts each stub with `bash -c` and the model's path unquoted, and the
# stub's Python decodes paths as ASCII: a space stalls the model in `loading` forever (the stub
# dies on `stol`), a quote or `;` is shell syntax, a non-ASCII letter is a UnicodeEncodeError
# (all three seen with tritonserver 2.51). Only these characters are known to work.
_SERVABLE_PATH = re.compile(r"[A-Za-z0-9_./+@,=:%-]*")


def check_serving_path(path: str | Path, field: str, what: str | None = None) -> None:
    """LdmrtError (with `field`; the message names `what`, default the field) unless Triton's
    Python backend can start a model under `path`."""
    path = Path(path)
    for text in dict.fromkeys((str(path.absolute()), str(path.resolve()))):
        if not _SERVABLE_PATH.fullmatch(text):
            bad = "".join(sorted({c for c in text if not _SERVABLE_PATH.fullmatch(c)}))
            raise LdmrtError(f"{what or field} {text!r}: Triton's Python backend cannot start a model under a "
                             f"path holding {bad!r} (it passes the path unquoted to bash and decodes "
                             f"it as ASCII); expected letters, digits and _ . / + @ , = : % - only; "
                             f"choose another path (or mount the repository at one, e.g. /models)",
                             field=field)


def default_environment() -> Path:
    """$LDMRT_TRITON_ENV, else ~/.cache/ldmrt/triton-env (where scripts/triton_env.sh puts it)."""
    configured = os.environ.get(ENV_VARIABLE)
    if configured:
        return Path(configured)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ldmrt" / "triton-env"


@dataclass(frozen=True)
class TritonEnvironment:
    """A virtual environment with nvidia-pytriton (tritonserver + Python backend) and tritonclient."""
    root: Path
    python_version: str        # "3.11"

    @classmethod
    def locate(cls, root: str | Path | None = None) -> "TritonEnvironment":
        """Check the folder; TritonServerError saying what is missing and how to make it."""
        root = Path(root) if root is not None else default_environment()
        fix = f"create it with: bash scripts/triton_env.sh {root}"
        config = root / "pyvenv.cfg"
        if not config.is_file():
            raise TritonServerError(f"no Triton environment at {root} (no pyvenv.cfg); {fix}")
        values = dict(line.split("=", 1) for line in config.read_text().splitlines() if "=" in line)
        values = {k.strip(): v.strip() for k, v in values.items()}
        home, version = values.get("home", ""), values.get("version", values.get("version_info", ""))
        if not home.startswith("/usr/bin"):
            raise TritonServerError(f"{root} was made from {home}/python3, not the system's /usr/bin "
                                    f"python: PyTriton's stub links the system libpython and fails "
                                    f"with another interpreter; remove it and {fix}")
        environment = cls(root, ".".join(version.split(".")[:2]))
        for path in (environment.python, environment.tritonserver, environment.stub,
                     environment.backend_dir / "libtriton_python.so"):
            if not path.exists():
                raise TritonServerError(f"Triton environment {root}: {path} is missing; {fix}")
        return environment

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def site_packages(self) -> Path:
        return self.root / "lib" / f"python{self.python_version}" / "site-packages"

    @property
    def dist(self) -> Path:
        return self.site_packages / "pytriton" / "tritonserver"

    @property
    def tritonserver(self) -> Path:
        return self.dist / "bin" / "tritonserver"

    @property
    def backend_dir(self) -> Path:
        return self.dist / "backends" / "python"

    @property
    def stub(self) -> Path:
        return self.dist / "python_backend_stubs" / self.python_version / "triton_python_backend_stub"

    @property
    def libs(self) -> Path:
        return self.site_packages / "nvidia_pytriton.libs"

    def environ(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Process environment: this environment's python first on PATH (the stub finds its
        site-packages through it), PyTriton's libraries on LD_LIBRARY_PATH."""
        env = dict(os.environ if base is None else base)
        for name in ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP"):
            env.pop(name, None)
        env["VIRTUAL_ENV"] = str(self.root)
        env["PATH"] = f"{self.root / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        libs = str(self.libs)
        env["LD_LIBRARY_PATH"] = f"{libs}:{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") else libs
        return env

    def run_module(self, module: str, args: Sequence[str], *, timeout: float,
                   **kwargs) -> subprocess.CompletedProcess:
        """`python -m module args` in this environment, with this checkout's ldmrt importable."""
        env = self.environ()
        env["PYTHONPATH"] = str(SOURCE_ROOT)
        return subprocess.run([str(self.python), "-m", module, *args], env=env, timeout=timeout,
                              capture_output=True, text=True, **kwargs)


_RUNNING: "weakref.WeakSet[TritonServer]" = weakref.WeakSet()
_HOOKED: set[int] = set()          # signals whose handler stops the running servers


def _stop_running() -> None:
    for server in list(_RUNNING):
        server.stop()


def _hook_owner_exit() -> None:
    """Stop every running server at exit and on SIGTERM/SIGINT (main thread only: Python sets
    handlers there), chaining to the handler that was there before."""
    if not _HOOKED:
        atexit.register(_stop_running)
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        if signum in _HOOKED:
            continue
        previous = signal.getsignal(signum)

        def handler(number, frame, previous=previous):
            _stop_running()
            if callable(previous):
                previous(number, frame)
            elif previous != signal.SIG_IGN:        # SIG_DFL: die of the signal, as before
                signal.signal(number, signal.SIG_DFL)
                os.kill(os.getpid(), number)

        signal.signal(signum, handler)
        _HOOKED.add(signum)


def _die_with_owner() -> None:
    """In the child before exec: SIGTERM when the thread that started it exits (the main thread:
    when the owner process dies, SIGKILL included)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)    # PR_SET_PDEATHSIG = 1


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (the OS picks; a tiny race remains until bound)."""
    sockets, ports = [], []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
            ports.append(sock.getsockname()[1])
    finally:
        for sock in sockets:
            sock.close()
    return ports


class TritonServer:
    """tritonserver on 127.0.0.1 serving `models` of `repository`; a context manager."""

    def __init__(self, environment: TritonEnvironment, repository: str | Path, workdir: str | Path,
                 models: Sequence[str] = ("pipeline",), startup_timeout: float = 120.0,
                 exit_timeout: int = 10):
        self.environment, self.repository = environment, Path(repository)
        self.workdir, self.models = Path(workdir), tuple(models)
        self.startup_timeout, self.exit_timeout = startup_timeout, exit_timeout
        self.process: subprocess.Popen | None = None
        self.process_group: int | None = None    # the last server's group, kept after stop
        self.http_port = self.grpc_port = self.metrics_port = 0
        self.log_path = self.workdir / "tritonserver.log"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def __enter__(self) -> "TritonServer":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self, attempts: int = 3) -> None:
        """Start and wait until every model is ready; retries with new ports if one was taken."""
        for path, what in ((self.repository, "repository"), (self.workdir, "workdir")):
            try:
                check_serving_path(path, what)
            except LdmrtError as exc:
                raise TritonServerError(str(exc), field=what) from None
        _hook_owner_exit()
        self.workdir.mkdir(parents=True, exist_ok=True)
        backends = self._backend_directory()
        for attempt in range(1, attempts + 1):
            self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
            self._launch(backends)
            try:
                self._wait_ready()
                return
            except TritonServerError:
                self.stop()
                taken = "address already in use" in self.log_tail(4000).lower()
                if not taken or attempt == attempts:
                    raise

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL what is left after the exit timeout."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=self.exit_timeout + 5)
        except subprocess.TimeoutExpired:
            log.warning("tritonserver did not stop in %s s; killing it", self.exit_timeout + 5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)   # stubs that outlived the server
        process.wait()

    def group_members(self) -> list[int]:
        """Processes still in the (last) server's process group: empty after a clean stop."""
        if self.process_group is None:
            return []
        members = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == self.process_group and fields[0] != "Z":
                    members.append(int(stat.parent.name))
        return members

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # --- internals ------------------------------------------------------------------------------

    def _backend_directory(self) -> Path:
        """backends/python with the stub for this environment's Python (as PyTriton lays it out)."""
        target = self.workdir / "backends" / "python"
        target.mkdir(parents=True, exist_ok=True)
        source = self.environment.backend_dir
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copyfile(source / name, target / name)
        stub = target / "triton_python_backend_stub"
        shutil.copyfile(self.environment.stub, stub)
        stub.chmod(0o755)
        return target.parent

    def _launch(self, backends: Path) -> None:
        command = [str(self.environment.tritonserver),
                   f"--model-repository={self.repository}",
                   "--model-control-mode=explicit",
                   *(f"--load-model={model}" for model in self.models),
                   f"--backend-directory={backends}",
                   "--http-address=127.0.0.1", f"--http-port={self.http_port}",
                   "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
                   "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
                   # Python-backend shared memory regions named per server: two servers may run at once.
                   f"--backend-config=python,shm-region-prefix-name=ldmrt{os.getpid()}p{self.http_port}_",
                   f"--exit-timeout-secs={self.exit_timeout}",
                   "--strict-readiness=true", "--log-verbose=0"]
        log.info("starting %s", " ".join(command))
        # The parent-death signal fires when the starting *thread* ends: only the main thread
        # lives as long as the process.
        main = threading.current_thread() is threading.main_thread() and sys.platform.startswith("linux")
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(command, env=self.environment.environ(), cwd=self.workdir,
                                            stdin=subprocess.DEVNULL, stdout=log_file,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=_die_with_owner if main else None)
        self.process_group = self.process.pid
        _RUNNING.add(self)

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout
        urls = [f"http://{self.http_url}/v2/models/{model}/ready" for model in self.models]
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise TritonServerError(f"tritonserver exited with status {code} before it was "
                                        f"ready; its log ({self.log_path}) ends with:\n{self.log_tail()}")
            if all(_http_ok(url) for url in urls):
                return
            time.sleep(0.25)
        raise TritonServerError(f"tritonserver: models {list(self.models)} not ready after "
                                f"{self.startup_timeout:.0f} s; its log ({self.log_path}) ends "
                                f"with:\n{self.log_tail()}")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
