"""examples/cpp/serve.cpp, the HTTP service over the C++ wrapper: its PNGs are `ldmrt generate`'s
bytes (alone and two requests at once), bad input is a 400 that names the field, and SIGTERM ends
it cleanly, cancelling a generation in flight."""
from __future__ import annotations

import http.client
import json
import signal
import subprocess
import threading
import time
import urllib.parse
from contextlib import contextmanager

import pytest

from tests.embed_support import EXAMPLES, PROMPT, clean_environment, cli_png, compile_program, needs_compilers

pytestmark = needs_compilers


@pytest.fixture(scope="module")
def serve(embed_library, tmp_path_factory):
    return compile_program(EXAMPLES / "cpp" / "serve.cpp", tmp_path_factory.mktemp("serve") / "serve", embed_library)


@contextmanager
def started(serve, bundle):
    """serve BUNDLE 0 running: (process, port); killed on the way out, whatever happened."""
    process = subprocess.Popen([str(serve), str(bundle), "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=clean_environment())
    try:
        lines = []
        reader = threading.Thread(target=lambda: lines.append(process.stdout.readline().decode()), daemon=True)
        reader.start()
        reader.join(timeout=60)
        assert lines and lines[0].startswith("listening on http://127.0.0.1:"), (
            lines, process.poll(), process.stderr.read().decode() if process.poll() is not None else "")
        yield process, int(lines[0].rsplit(":", 1)[1])
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def fetch(port: int, path: str, method: str = "GET", body: bytes | None = None):
    """(status, Content-Type, body bytes) of one request."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        connection.close()


def generate_path(**fields) -> str:
    return "/generate?" + urllib.parse.urlencode({"prompt": PROMPT, **fields})


@pytest.fixture(scope="module")
def server(serve, embed_digits):
    with started(serve, embed_digits) as (process, port):
        yield port
        assert process.poll() is None, "the server died while serving"


@pytest.fixture(scope="module")
def cli(embed_digits, tmp_path_factory):
    """`ldmrt generate`'s PNG for seeds 0 (the default) and 3."""
    folder = tmp_path_factory.mktemp("cli")
    return {0: cli_png(embed_digits, folder / "cli.png"),
            3: cli_png(embed_digits, folder / "cli-3.png", "--seed", "3")}


def test_health_and_a_generate_give_the_clis_png(server, cli):
    assert fetch(server, "/health") == (200, "text/plain", b"ok")
    status, kind, body = fetch(server, generate_path(seed=0))
    assert (status, kind) == (200, "image/png") and body == cli[0]
    # the request's defaults (seed 0, 20 steps) when the query leaves them out; %XX and '+' decode alike
    assert fetch(server, "/generate?prompt=a+red+7+on+a%20white%20background")[2] == cli[0]


def test_two_requests_at_once_each_give_their_seeds_png(server, cli):
    answers = {}

    def get(seed):
        answers[seed] = fetch(server, generate_path(seed=seed))

    threads = [threading.Thread(target=get, args=(seed,)) for seed in (0, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert answers[0] == (200, "image/png", cli[0]) and answers[3] == (200, "image/png", cli[3])
    assert cli[0] != cli[3]


def error(port: int, path: str, method: str = "GET", body: bytes | None = None):
    status, kind, text = fetch(port, path, method, body)
    return status, (json.loads(text) if kind == "application/json" else text.decode())


def test_bad_input_is_a_400_naming_the_field_and_the_rest_404_405_431(server):
    status, answer = error(server, generate_path(steps=0))
    assert status == 400 and answer["field"] == "steps" and answer["status"] == "LDMRT_ERR_INVALID_ARGUMENT"
    assert "steps 0" in answer["error"]
    status, answer = error(server, generate_path(seed="abc"))
    assert status == 400 and answer["field"] == "seed" and "seed 'abc'" in answer["error"]
    # messages reach the client as valid JSON: quotes, backslashes (the library's repr) and newlines escaped
    status, answer = error(server, generate_path(sampler='no "such"\nsampler'))
    assert status == 400 and answer["field"] == "sampler" and """'no "such"\\nsampler'""" in answer["error"]
    status, answer = error(server, generate_path(**{"col\nour": "red"}))    # an unknown parameter: refused
    assert status == 400 and answer["field"] == "col\nour" and "unknown query parameter" in answer["error"]
    assert error(server, "/nope")[0] == 404
    assert error(server, "/generate", "POST", b"prompt=x")[0] == 405
    assert error(server, "/health?" + "x" * 17000)[0] == 431
    assert fetch(server, "/health") == (200, "text/plain", b"ok")     # and it serves on


def test_sigterm_cancels_a_running_generate_and_exits_0(serve, embed_digits):
    with started(serve, embed_digits) as (process, port):
        answers = []
        # 999 steps would run for seconds: the server's shutdown must cancel it, not wait it out
        slow = threading.Thread(target=lambda: answers.append(error(port, generate_path(steps=999, sampler="ddim"))))
        slow.start()
        time.sleep(1.0)
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0 and time.monotonic() - began < 5
        slow.join(timeout=10)
        stderr = process.stderr.read().decode()
    assert "Traceback" not in stderr and stderr == "", stderr
    assert answers and answers[0][0] == 503 and answers[0][1]["status"] == "LDMRT_ERR_CANCELLED", answers
