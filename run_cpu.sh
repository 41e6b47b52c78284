#!/usr/bin/env sh
# FluxDeck on the CPU. Works from whatever the current directory is: the same start as run_gpu.sh, with the
# CPU build of torch and the TUI's --cpu.
FLUXDECK_DEVICE=cpu exec sh "$(dirname "$0")/run_gpu.sh" "$@"
