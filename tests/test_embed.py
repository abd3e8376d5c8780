"""The C ABI (ldmrt.h, libldmrt): built here, driven from C, C++ and ctypes, compared with
`ldmrt generate` byte for byte; threads, cancel, every error path, leaks (ASan, tracemalloc) and
a soak of 200 generations with flat RSS."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.embed_support import (EXAMPLES, LDMRT, PROBES, PROMPT, REPO, clean_environment, cli_png,
                                 compile_program, needs_compilers, run)

pytestmark = needs_compilers
HEADER = REPO / "ldmrt" / "embed" / "include" / "ldmrt.h"


def status_line(done: subprocess.CompletedProcess) -> dict[str, str]:
    """probe's "status=... field=... message=..." line as a dict; nothing may reach stderr."""
    assert "Traceback" not in done.stderr and done.stderr == "", done.stderr
    found = re.search(r"^status=(\S+) field=(\S*) message=(.*)$", done.stdout, re.MULTILINE)
    assert found, done.stdout
    return dict(zip(("status", "field", "message"), found.groups()))


@pytest.fixture(scope="module")
def probe(embed_library, tmp_path_factory):
    return compile_program(PROBES / "probe.c", tmp_path_factory.mktemp("probe") / "probe", embed_library,
                           extra=("-D_POSIX_C_SOURCE=200809L",))


def run_probe(probe: Path, *args, env=None, check: bool = True, timeout: float = 300):
    return run([probe, *args], env=env or clean_environment(), check=check, timeout=timeout)


# --- the header and the host agree --------------------------------------------------------

def test_header_status_codes_and_dtypes_are_the_hosts():
    from ldmrt.embed import host
    from ldmrt.embed.info import abi_version

    text = HEADER.read_text()
    statuses = {name: int(value) for name, value in re.findall(r"LDMRT_(?:ERR_)?(\w+) = (\d+)", text)
                if not name.startswith("DTYPE") and not name.startswith("TILE")}
    assert statuses == {s.name: s.value for s in host.Status}
    dtypes = {int(v): n for n, v in re.findall(r"LDMRT_DTYPE_(\w+) = (\d+)", text)}
    assert {k: v.__name__.upper() for k, v in host._DTYPES.items()} == dtypes
    assert abi_version() == int(re.search(r"#define LDMRT_ABI_VERSION (\d+)", text).group(1)) == 1


def test_describe_maps_each_typed_error_and_names_a_bug():
    from ldmrt.embed.host import Status, describe
    from ldmrt.errors import (BackendUnavailableError, BundleError, GenerationCancelled, GenerationError,
                              StaleEngineError)

    assert describe(GenerationError("steps 0: expected", field="steps")) == (Status.INVALID_ARGUMENT,
                                                                           "steps 0: expected", "steps")
    assert describe(BackendUnavailableError("no", field="backend"))[0] == Status.BACKEND_UNAVAILABLE
    assert describe(StaleEngineError("old"))[0] == Status.STALE_ENGINE
    assert describe(BundleError("gone"))[0] == Status.BUNDLE
    assert describe(GenerationCancelled("stop"))[0] == Status.CANCELLED
    assert describe(GenerationError("non-finite latents"))[0] == Status.GENERATION
    assert describe(GenerationError("layout bad", field="layout"))[2] == "layout_json"
    assert describe(MemoryError())[0] == Status.OUT_OF_MEMORY
    try:
        {}["missing"]
    except KeyError as exc:
        code, message, field = describe(exc)
    assert code == Status.INTERNAL and message.startswith("KeyError: 'missing' at test_embed.py:")
    assert "a bug in ldmrt" in message and field is None


# --- the examples, built three ways, write the CLI's PNG ----------------------------------

def test_c_and_cpp_examples_write_the_same_png_as_ldmrt_generate(embed_library, embed_digits, tmp_path):
    generate = compile_program(EXAMPLES / "c" / "generate.c", tmp_path / "generate", embed_library)
    seven = compile_program(EXAMPLES / "cpp" / "seven.cpp", tmp_path / "seven", embed_library)
    expected = cli_png(embed_digits, tmp_path / "cli.png")
    done = run([seven, embed_digits, tmp_path / "cpp.png"], env=clean_environment())
    assert "Traceback" not in done.stderr and (tmp_path / "cpp.png").read_bytes() == expected
    run([generate, embed_digits, PROMPT, tmp_path / "c.png"], env=clean_environment())
    assert (tmp_path / "c.png").read_bytes() == expected
    # another seed and step count: still the CLI's bytes, and not the first image's
    other = cli_png(embed_digits, tmp_path / "cli-5.png", "--seed", "5", "--steps", "8")
    run([generate, embed_digits, PROMPT, tmp_path / "c-5.png", "5", "8"], env=clean_environment())
    assert (tmp_path / "c-5.png").read_bytes() == other != expected


def test_the_readme_shows_the_cpp_example_verbatim():
    """The README's ~20 lines are examples/cpp/seven.cpp, which the test above compiles and runs."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Embedding in C/C++", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```cpp\n(.*?)```", section, re.DOTALL)
    assert block and block[1] == (EXAMPLES / "cpp" / "seven.cpp").read_text()
    assert len(block[1].splitlines()) <= 25
    assert "examples/cpp/seven.cpp -o out/seven $(.venv/bin/ldmrt embed --cflags --libs) && out/seven" in section


def test_cmake_builds_the_library_and_the_examples(embed_digits, tmp_path):
    build = tmp_path / "build"
    run(["cmake", "-S", EXAMPLES, "-B", build, f"-DPython3_EXECUTABLE={sys.executable}"], timeout=300)
    run(["cmake", "--build", build, "-j", "2"], timeout=600)
    assert {"generate", "seven", "serve"} <= {p.name for p in build.iterdir()}
    run([build / "seven", embed_digits, tmp_path / "cmake.png"], env=clean_environment())
    assert (tmp_path / "cmake.png").read_bytes() == cli_png(embed_digits, tmp_path / "cli.png")


def test_embed_build_then_make_with_pkg_config(embed_digits, tmp_path):
    lib = tmp_path / "lib"
    run([LDMRT, "embed", "--build", "--lib-dir", lib])
    assert sorted(p.name for p in lib.iterdir()) == ["ldmrt-embed.json", "ldmrt.pc", "libldmrt.so"]
    flags = run([LDMRT, "embed", "--cflags", "--libs", "--lib-dir", lib]).stdout.split()
    assert f"-I{REPO / 'ldmrt' / 'embed' / 'include'}" in flags and "-lldmrt" in flags and f"-L{lib}" in flags
    out = tmp_path / "bin"
    run(["make", "-C", EXAMPLES, f"LDMRT={LDMRT}", f"LIB_DIR={lib}", f"OUT={out}", f"{out}/generate"])
    run([out / "generate", embed_digits, PROMPT, tmp_path / "make.png"], env=clean_environment())
    assert (tmp_path / "make.png").read_bytes() == cli_png(embed_digits, tmp_path / "cli.png")
    # a second build replaces its own files; a foreign libldmrt.so is refused, then --force
    run([LDMRT, "embed", "--build", "--lib-dir", lib])
    (lib / "libldmrt.so").write_bytes(b"someone else's")
    refused = run([LDMRT, "embed", "--build", "--lib-dir", lib], check=False)
    assert refused.returncode == 2 and "not written by ldmrt embed --build" in refused.stderr
    assert (lib / "libldmrt.so").read_bytes() == b"someone else's"
    run([LDMRT, "embed", "--build", "--lib-dir", lib, "--force"])
    assert (lib / "libldmrt.so").read_bytes()[:4] == b"\x7fELF"


def test_embed_build_keeps_a_folder_in_its_way_and_survives_a_killed_swap(tmp_path):
    from ldmrt.embed.info import RECORD_NAME, build_library
    from ldmrt.errors import EmbedError

    lib = tmp_path / "lib"
    (lib / "libldmrt.so").mkdir(parents=True)
    (lib / "libldmrt.so" / "mine.txt").write_text("the user's")
    with pytest.raises(EmbedError, match="libldmrt.so there is a folder"):
        build_library(lib, force=True)
    assert (lib / "libldmrt.so" / "mine.txt").read_text() == "the user's"
    assert sorted(p.name for p in lib.iterdir()) == ["libldmrt.so"]

    other = tmp_path / "other"
    build_library(other)
    old = (other / "libldmrt.so").read_bytes()
    # a build killed between its two renames: the record names old and new digests, the new library
    # is in place, the old ldmrt.pc not yet replaced; the next build takes both as its own
    record = json.loads((other / RECORD_NAME).read_text())
    record["files"]["libldmrt.so"].append("0" * 64)
    (other / RECORD_NAME).write_text(json.dumps(record))
    (other / "libldmrt.so").write_bytes(old + b"\0")        # a different library, not in the record
    with pytest.raises(EmbedError, match="not written by ldmrt embed --build"):
        build_library(other)
    (other / "libldmrt.so").write_bytes(old)
    build_library(other)
    assert [len(v) for v in json.loads((other / RECORD_NAME).read_text())["files"].values()] == [1, 1]


def test_embed_info_names_header_library_and_python(tmp_path):
    text = run([LDMRT, "embed", "--lib-dir", tmp_path]).stdout
    assert "C ABI 1" in text and "ldmrt.h" in text and "not built: ldmrt embed --build" in text
    assert run([LDMRT, "embed", "--cmake-dir"]).stdout.strip() == str(REPO / "ldmrt" / "embed")


# --- threads, cancel --------------------------------------------------------------------------

def test_four_c_threads_on_one_pipeline_give_the_sequential_results(probe, embed_digits):
    done = run_probe(probe, "threads", embed_digits, "4", "8")
    assert "threads 4 x 8: 0 differ from the sequential results; 31 of 31 neighbours distinct" in done.stdout


def test_cancel_from_another_thread_stops_mid_run_and_the_pipeline_goes_on(probe, embed_digits):
    done = run_probe(probe, "cancel", embed_digits)
    found = re.search(r"cancelled at step (\d+) of 50: LDMRT_ERR_CANCELLED: (.*)", done.stdout)
    assert found and 3 <= int(found.group(1)) < 50, done.stdout
    assert "cancelled" in found.group(2) and "no image" in found.group(2)
    assert "after the cancel: the same pipeline generates, identical results" in done.stdout
    assert "on_step returning nonzero stopped at step 5" in done.stdout
    assert done.stderr == ""


# --- every error path: its code, its field, its message, nothing on stderr -------------------

@pytest.mark.parametrize("field,value,status,named,words", [
    ("steps", "0", "INVALID_ARGUMENT", "steps", "steps 0: expected an integer >= 1"),
    ("guidance", "nan", "INVALID_ARGUMENT", "guidance", "expected a finite number"),
    ("seed", "-1", "INVALID_ARGUMENT", "seed", "seed -1"),
    ("height", "30", "INVALID_ARGUMENT", "height", "multiple of the latent factor"),
    ("sampler", "nope", "INVALID_ARGUMENT", "sampler", "expected one of"),
    ("tile", "5", "INVALID_ARGUMENT", "tile", "LDMRT_TILE_AUTO"),
    ("prompt", "bad-utf8", "INVALID_ARGUMENT", "prompt", "not valid UTF-8"),
    ("prompts", "2", "INVALID_ARGUMENT", "prompts", "prompts[1]: NULL"),
    ("latents_ndim", "9", "INVALID_ARGUMENT", "latents", "latents.ndim 9"),
    ("latents_shape", "3", "INVALID_ARGUMENT", "latents", "expected shape [1, 4, 8, 8], found [1, 3, 8, 8]"),
    ("init_image_dtype", "7", "INVALID_ARGUMENT", "init_image", "init_image.dtype 7"),
    ("init_image_nan", "1", "INVALID_ARGUMENT", "init_image", "expected finite values"),
    ("layout_json", "[", "INVALID_ARGUMENT", "layout_json", "not JSON"),
    ("class_labels", "2", "INVALID_ARGUMENT", "class_labels", "NULL with num_class_labels 2"),
    ("struct_size", "3", "ABI", "struct_size", "ldmrt_request.struct_size 3"),
])
def test_a_bad_request_field_returns_its_code_and_names_the_field(probe, embed_digits, field, value, status,
                                                                   named, words):
    line = status_line(run_probe(probe, "request", embed_digits, field, value))
    assert line["status"] == f"LDMRT_ERR_{status}" and line["field"] == named and words in line["message"]


@pytest.mark.parametrize("args,status,named,words", [
    (("/nonexistent/bundle",), "BUNDLE", "bundle", "does not exist"),
    (("{digits}", "bogus"), "INVALID_ARGUMENT", "backend", "expected one of onnxruntime"),
    (("{digits}", "tensorrt"), "BACKEND_UNAVAILABLE", "", "pip install tensorrt"),
    (("{digits}", "onnxruntime", '{"nope": 1}'), "INVALID_ARGUMENT", "backend_options", "'nope' is not an option"),
    (("{digits}", "onnxruntime", '{"threads": "x"}'), "INVALID_ARGUMENT", "threads", "expected an integer >= 1"),
    (("{digits}", "onnxruntime", "[1"), "INVALID_ARGUMENT", "backend_options", "not a JSON object"),
])
def test_open_errors_return_their_codes(probe, embed_digits, args, status, named, words):
    line = status_line(run_probe(probe, "open", *(a.replace("{digits}", str(embed_digits)) for a in args)))
    assert line["status"] == f"LDMRT_ERR_{status}" and line["field"] == named and words in line["message"]


def test_a_missing_manifest_and_a_stale_engine(probe, embed_digits, tmp_path):
    # without ONNX Runtime's graph cache, which serves a graph without reading it (ort_cache.py)
    broken = Path(shutil.copytree(embed_digits, tmp_path / "broken", ignore=shutil.ignore_patterns("ort_cache")))
    (broken / "unet.onnx").write_bytes(b"not the graph")
    line = status_line(run_probe(probe, "open", broken))
    assert line["status"] == "LDMRT_ERR_BUNDLE" and "unet.onnx" in line["message"] and "re-export" in line["message"]
    (broken / "manifest.json").unlink()
    assert status_line(run_probe(probe, "open", broken))["status"] == "LDMRT_ERR_BUNDLE"

    stale = Path(shutil.copytree(embed_digits, tmp_path / "stale"))
    run([LDMRT, "build", stale, "--backend", "tensorrt-rtx", "--components", "text_encoder"], timeout=600)
    manifest = json.loads((stale / "manifest.json").read_text())
    manifest["engines"] = [{**e, "builder_version": "1.6.0.1"} for e in manifest["engines"]]
    (stale / "manifest.json").write_text(json.dumps(manifest))
    line = status_line(run_probe(probe, "open", stale, "tensorrt-rtx"))
    assert line["status"] == "LDMRT_ERR_STALE_ENGINE"
    assert "builder version 1.6.0.1" in line["message"] and f"ldmrt build {stale}" in line["message"]


def test_a_missing_or_broken_installation_is_an_install_error(probe, tmp_path):
    line = status_line(run_probe(probe, "init", tmp_path / "no-venv"))
    assert line["status"] == "LDMRT_ERR_INSTALL" and line["field"] == "venv" and "no pyvenv.cfg" in line["message"]
    empty = tmp_path / "empty-venv"             # a venv without ldmrt in it
    run([sys.executable, "-m", "venv", "--without-pip", "--clear", empty])
    line = status_line(run_probe(probe, "init", empty))
    assert line["status"] == "LDMRT_ERR_INSTALL"
    assert "cannot import ldmrt from venv" in line["message"] and "No module named 'ldmrt'" in line["message"]
    # the environment variable is read the same way; the compiled-in venv works without either
    done = run_probe(probe, "open", "/nonexistent", env=clean_environment(LDMRT_VENV=str(empty)))
    assert status_line(done)["status"] == "LDMRT_ERR_INSTALL"
    assert status_line(run_probe(probe, "open", "/nonexistent"))["status"] == "LDMRT_ERR_BUNDLE"


def test_struct_sizes_and_null_pointers_are_refused(probe, embed_digits):
    done = run_probe(probe, "abi", embed_digits)
    assert "abi ok" in done.stdout and done.stderr == ""
    larger = re.search(r"ldmrt_request\.struct_size (\d+): expected (\d+)\.\.(\d+)", done.stdout)
    assert larger and int(larger[1]) == int(larger[3]) + 8, done.stdout     # the probe's sizeof + 8
    assert "ldmrt_callbacks.struct_size 4" in done.stdout


# --- the joined interpreter (ctypes), and leaks -----------------------------------------------

JOINED = r"""
import ctypes, sys, tracemalloc
import numpy as np
from ldmrt.runtime.pipeline import GenerationRequest, Pipeline

lib = ctypes.CDLL(sys.argv[1])
bundle = sys.argv[2].encode()

class Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int32), ("ndim", ctypes.c_int32),
                ("shape", ctypes.c_int64 * 4)]

class Result(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("batch", ctypes.c_int32), ("height", ctypes.c_int32),
                ("width", ctypes.c_int32), ("channels", ctypes.c_int32),
                ("pixels", ctypes.POINTER(ctypes.c_uint8)), ("images", ctypes.POINTER(ctypes.c_float))]

request = (ctypes.c_char * 1024)()          # room for ldmrt_request; filled by ldmrt_request_init
lib.ldmrt_request_init(request)
pipeline = ctypes.c_void_p()
assert lib.ldmrt_open(bundle, None, ctypes.byref(pipeline)) == 0
lib.ldmrt_last_error.restype = ctypes.c_char_p

def generate():
    result = ctypes.POINTER(Result)()
    status = lib.ldmrt_generate(pipeline, request, None, ctypes.byref(result))
    assert status == 0, lib.ldmrt_last_error()
    r = result.contents
    n = r.batch * r.height * r.width * r.channels
    images = np.ctypeslib.as_array(r.images, shape=(n,)).copy().reshape(r.batch, r.height, r.width, r.channels)
    lib.ldmrt_result_free(result)
    return images

joined = generate()
direct_pipeline = Pipeline.load(sys.argv[2])
direct = lambda: direct_pipeline.generate(GenerationRequest()).images
assert np.array_equal(joined, direct()), "the C ABI in a running interpreter differs from Pipeline.generate"

def growth(call, times=10):
    # Python heap growth over `times` calls, after as many to warm up (numpy's and ONNX Runtime's
    # own caches and free lists move a little either way: compared side by side below)
    for _ in range(times):
        call()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(times):
        call()
    return tracemalloc.get_traced_memory()[0] - before

tracemalloc.start()
rounds = [(growth(generate), growth(direct)) for _ in range(3)]    # the first fills caches: measured, not judged
through_c, in_python = (sum(r[i] for r in rounds[1:]) for i in (0, 1))
print(f"joined ok; python heap grew {through_c} bytes through the C ABI, {in_python} calling the pipeline "
      f"directly, over 20 generations each ({rounds})")
# one leaked 32x32 image (12 KiB of float32 bytes, 3 KiB of pixels) per call would add 300 KiB
assert through_c < in_python + 64 * 1024, rounds
lib.ldmrt_close(pipeline)
"""


def test_the_abi_joins_a_running_interpreter_and_leaks_no_python_objects(embed_library, embed_digits, tmp_path):
    script = tmp_path / "joined.py"
    script.write_text(JOINED)
    done = run([sys.executable, script, embed_library / "libldmrt.so", embed_digits])
    assert "joined ok" in done.stdout, done.stdout + done.stderr


def _our_leaks(report: str) -> list[str]:
    """LeakSanitizer's blocks allocated by libldmrt's or the probe's own code: the frame right above
    the allocator is in their sources. (Python's and the libraries' process-lifetime allocations,
    imports reached through ldmrt_init included, are theirs; Python objects are tracemalloc's.)"""
    blocks = re.split(r"\n(?=(?:Direct|Indirect) leak of)", report)
    ours = []
    for block in blocks:
        caller = re.search(r"^\s*#1 .*$", block, re.MULTILINE)
        if block.lstrip().startswith(("Direct", "Indirect")) and caller and \
                re.search(r"/embed/src/|probe\.c", caller.group(0)):
            ours.append(block)
    return ours


@pytest.fixture(scope="module")
def asan_probe(tmp_path_factory):
    from tests.embed_support import build_library
    folder = tmp_path_factory.mktemp("asan")
    flags = ("-fsanitize=address", "-fno-omit-frame-pointer")
    library = build_library(folder / "lib", extra=flags).parent
    return compile_program(PROBES / "probe.c", folder / "probe", library,
                           extra=("-D_POSIX_C_SOURCE=200809L", *flags))


@pytest.mark.parametrize("args", [("abi",), ("cancel",),
                                  pytest.param(("soak", "20"), marks=pytest.mark.slow),
                                  pytest.param(("threads", "2", "2"), marks=pytest.mark.slow)])
def test_address_sanitizer_finds_no_error_and_no_leak_of_ours(asan_probe, embed_digits, args):
    env = clean_environment(ASAN_OPTIONS="detect_leaks=1:exitcode=0")
    done = run([asan_probe, args[0], embed_digits, *args[1:]], env=env, timeout=600)
    assert "ERROR: AddressSanitizer" not in done.stderr, done.stderr[-4000:]
    assert _our_leaks(done.stderr) == [], "\n".join(_our_leaks(done.stderr))


def test_the_leak_check_sees_a_forgotten_result(asan_probe, embed_digits):
    env = clean_environment(ASAN_OPTIONS="detect_leaks=1:exitcode=0")
    done = run([asan_probe, "forget", embed_digits], env=env, timeout=600)
    assert "forgot a 32x32 result" in done.stdout
    leaks = _our_leaks(done.stderr)
    assert leaks and any("to_result" in b or "ldmrt_generate" in b for b in leaks), done.stderr[-4000:]


def test_a_soak_of_200_generations_keeps_rss_flat(probe, embed_digits):
    """RSS after the first 20 generations vs after 200 (benchmarks/embed_soak.py records the run)."""
    done = run_probe(probe, "soak", embed_digits, "200", timeout=900)
    rss = {int(i): int(kib) for i, kib in re.findall(r"^rss (\d+) (\d+)", done.stdout, re.MULTILINE)}
    assert len(rss) == 21 and max(rss) == 200
    growth = rss[200] - rss[20]
    assert growth < 8 * 1024, f"RSS grew {growth} KiB from generation 20 to 200: {rss}"


def test_the_cpp_wrapper_owns_copies_moves_and_rethrows(embed_library, embed_digits, tmp_path):
    wrapper = compile_program(PROBES / "wrapper.cpp", tmp_path / "wrapper", embed_library)
    done = run([wrapper, embed_digits, tmp_path / "wrapper.png"], env=clean_environment())
    assert "wrapper ok" in done.stdout and done.stderr == ""
    assert (tmp_path / "wrapper.png").read_bytes() == cli_png(embed_digits, tmp_path / "cli.png")
