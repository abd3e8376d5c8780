#!/usr/bin/env bash
# The Python environment that serves ldmrt's Triton model repositories on this machine (CPU):
# nvidia-pytriton (a tritonserver with the Python backend), tritonclient, numpy, onnxruntime.
#
# It must be a virtual environment of the SYSTEM python3 (Debian's /usr/bin/python3): PyTriton's
# Python-backend stub links the system libpython3.X, and run against another interpreter's
# standard library (e.g. pyenv 3.11.7 against Debian's 3.11.2) models fail to load with
# "'_thread.RLock' object has no attribute '_recursion_count'".
#
# ldmrt itself is not installed: a generated repository carries its own torch-free copy of the
# runtime, and the test runs ldmrt.triton.check / ldmrt.triton.client from the checkout.
#
# Idempotent: an environment whose stamp matches these requirements is reused as it is.
#
#   bash scripts/triton_env.sh [DIR]     DIR default: $LDMRT_TRITON_ENV or ~/.cache/ldmrt/triton-env
set -euo pipefail

DIR="${1:-${LDMRT_TRITON_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/ldmrt/triton-env}}"
PYTHON="${LDMRT_TRITON_PYTHON:-/usr/bin/python3}"
# tokenizers: the pipeline's runtime tokenizes with it (ldmrt/tokenizer.py).
REQUIREMENTS=("numpy>=1.26" "onnxruntime>=1.18" "tokenizers>=0.15" "nvidia-pytriton==0.7.0" "tritonclient[grpc,http]>=2.50")

say() { echo "triton_env: $*" >&2; }

apt_install() {
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        say "missing system packages: $*; install them (apt-get install -y $*) and re-run"
        exit 1
    fi
    say "apt-get install -y $*"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if [ ! -x "$PYTHON" ]; then
    apt_install python3 python3-venv
fi
VERSION="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    apt_install "python$VERSION-venv"
fi
if ! ldconfig -p | grep -q "libpython$VERSION.so.1.0"; then
    apt_install "libpython$VERSION"
fi

STAMP="$("$PYTHON" -c 'import platform, sys; print(sys.executable, platform.python_version())') ${REQUIREMENTS[*]}"
if [ -f "$DIR/.ldmrt-triton-env" ] && [ "$(cat "$DIR/.ldmrt-triton-env")" = "$STAMP" ] \
        && "$DIR/bin/python" -c 'import pytriton, tritonclient.grpc, onnxruntime, tokenizers' 2>/dev/null; then
    say "$DIR is up to date ($STAMP)"
    exit 0
fi

START=$SECONDS
INTERPRETER="$("$PYTHON" -c 'import platform, sys; print(sys.executable, platform.python_version())')"
if [ -f "$DIR/.ldmrt-triton-env" ] && [ "$(cut -d' ' -f1-2 "$DIR/.ldmrt-triton-env")" = "$INTERPRETER" ] \
        && "$DIR/bin/python" -c 'import pytriton' 2>/dev/null; then
    # Same interpreter, other requirements: install what changed into it (pip keeps what fits).
    say "updating $DIR to: ${REQUIREMENTS[*]}"
    rm -f "$DIR/.ldmrt-triton-env"
else
    say "creating $DIR from $PYTHON ($("$PYTHON" --version 2>&1))"
    # The stamp is written last: an interrupted run leaves no stamp, and the next run starts over.
    rm -rf "$DIR"
    mkdir -p "$(dirname "$DIR")"
    "$PYTHON" -m venv "$DIR"
    "$DIR/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
fi
"$DIR/bin/python" -m pip install -q --disable-pip-version-check "${REQUIREMENTS[@]}"
STUB="$DIR/lib/python$VERSION/site-packages/pytriton/tritonserver/python_backend_stubs/$VERSION/triton_python_backend_stub"
if [ ! -x "$STUB" ]; then
    say "nvidia-pytriton has no Python-backend stub for Python $VERSION ($STUB)"
    exit 1
fi
"$DIR/bin/python" -c 'import numpy, onnxruntime, tokenizers, pytriton, tritonclient.http, tritonclient.grpc.model_config_pb2'
echo "$STAMP" > "$DIR/.ldmrt-triton-env"
say "ready in $((SECONDS - START)) s: $DIR"
