#!/usr/bin/env sh
# FluxDeck on the GPU (NVIDIA CUDA; falls back to the CPU). Works from whatever the current directory is.
# run_cpu.sh runs this with FLUXDECK_DEVICE=cpu: the CPU build of torch and the TUI's --cpu.
# First run: builds the Python environment (python3 -m bootstrap env --gpu) and opens the download wizard
# when no model is installed. Later runs open the TUI at once. Extra arguments go to the TUI.
cd "$(dirname "$0")" || exit 1
DEVICE=${FLUXDECK_DEVICE:-gpu}
if [ "$DEVICE" = cpu ]; then set -- --cpu "$@"; fi

fail() {
    echo "FluxDeck stopped: $1" >&2
    exit 1
}

env_python() {
    for candidate in python_embeded/bin/python3 python_embeded/python .venv/bin/python; do
        if [ -x "$candidate" ]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

if ! PY=$(env_python); then
    SYS=$(command -v python3 || command -v python) || fail "no python3 found: install Python 3.10 or newer."
    echo "First run: building FluxDeck's Python environment, this takes a few minutes..."
    "$SYS" -m bootstrap env "--$DEVICE" || fail "building the environment failed (see above)."
    PY=$(env_python) || fail "the Python environment was not created (see above)."
fi
if ! "$PY" -m launcher --check-models; then
    "$PY" -m bootstrap wizard || fail "the download wizard did not finish."
fi
exec "$PY" -m launcher "$@"
