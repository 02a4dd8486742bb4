#!/usr/bin/env bash
# Installs what kiln needs on a Debian 12 machine, and nothing when it is already there (then it
# prints nothing). Idempotent; safe to run before every build.
#
#   - LLVM/MLIR 22 from Debian (bookworm-security carries llvm-toolchain-22): the -sys crates of
#     melior and inkwell link it statically; .cargo/config.toml points them at /usr/lib/llvm-22.
#   - ptxas, from NVIDIA's PyPI wheel nvidia-cuda-nvcc-cu12, into tools/local/ (git-ignored): it
#     validates the PTX kiln emits and reports registers and spills. No GPU or CUDA install needed.
#   - OpenMPI from Debian (openmpi-bin, libopenmpi-dev): the `mpi` crate links libmpi, and data-
#     parallel training runs its processes under `mpirun` (tests/it/dist.rs).
#   - OpenAI's Python client in a venv of its own, tools/local/openai-venv (a few MB, no torch):
#     tests/it/serve.rs runs tests/serve/openai_client.py with it against `kiln serve`.
#
# Environment: KILN_SETUP_VERBOSE=1 shows what is checked.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools="$root/tools/local"
nvcc_version="12.9.86"
openai_version="3.51.0"
apt_packages=(llvm-22-dev libmlir-22-dev mlir-22-tools libclang-22-dev libpolly-22-dev libzstd-dev
              python3-pip python3-venv openmpi-bin libopenmpi-dev)

say() { if [ "${KILN_SETUP_VERBOSE:-0}" = 1 ]; then echo "setup: $*"; fi; }
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else echo "setup: need root (or sudo) to run: $*" >&2; exit 1
    fi
}

# 1. Debian packages.
missing=()
for p in "${apt_packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]} (once)"
    log=$(mktemp)
    if ! { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
           as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
               "${missing[@]}"; } >"$log" 2>&1; then
        cat "$log" >&2
        echo "setup: apt-get failed (log above)" >&2
        exit 1
    fi
    rm -f "$log"
fi
say "LLVM: $(/usr/lib/llvm-22/bin/llvm-config --version)"
if [ ! -e /usr/lib/llvm-22/lib/libMLIRCAPIIR.a ]; then
    echo "setup: /usr/lib/llvm-22/lib/libMLIRCAPIIR.a is missing; is libmlir-22-dev installed?" >&2
    exit 1
fi

# 2. ptxas from the PyPI wheel, into the project's tools folder.
ptxas="$tools/nvcc/nvidia/cuda_nvcc/bin/ptxas"
if [ ! -x "$ptxas" ] || ! grep -qx "$nvcc_version" "$tools/nvcc/.version" 2>/dev/null; then
    echo "setup: installing ptxas (nvidia-cuda-nvcc-cu12==$nvcc_version) into tools/local (once)"
    rm -rf "$tools/nvcc.tmp"
    mkdir -p "$tools"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
        --no-deps --no-compile \
        --target "$tools/nvcc.tmp" "nvidia-cuda-nvcc-cu12==$nvcc_version"
    echo "$nvcc_version" > "$tools/nvcc.tmp/.version"
    rm -rf "$tools/nvcc"
    mv "$tools/nvcc.tmp" "$tools/nvcc"
fi
mkdir -p "$tools/bin"
ln -sf "$ptxas" "$tools/bin/ptxas"
say "ptxas: $("$tools/bin/ptxas" --version | tail -1)"

# 3. OpenAI's Python client for the `kiln serve` test. The venv is made in place and marked done by
#    .version last, so an interrupted install is redone from scratch.
venv="$tools/openai-venv"
if ! grep -qx "$openai_version" "$venv/.version" 2>/dev/null; then
    echo "setup: installing openai==$openai_version into tools/local/openai-venv (once)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "openai==$openai_version"
    echo "$openai_version" > "$venv/.version"
fi
say "openai: $("$venv/bin/python" -c 'import openai; print(openai.__version__)')"

# 4. The Rust toolchain is the machine's (rustup); only check it is there.
if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found; install Rust with rustup (https://rustup.rs)" >&2
    exit 1
fi
