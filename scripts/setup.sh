#!/usr/bin/env bash
# Set up everything unet-hvd needs on a fresh Debian machine, idempotently:
#   Debian packages (Open MPI, cmake) -> .venv -> TensorFlow -> Horovod built
#   against that TensorFlow (cached wheel) -> this package -> build checks.
# A second run (also from a fresh clone elsewhere) reuses the cached Horovod
# wheel and finishes in seconds.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/setup.sh [--help] [--dry-run] [--no-checks]

Installs, in order, skipping what is already there:
  1. apt packages openmpi-bin libopenmpi-dev cmake build-essential python3-dev
     python3-venv rsync openssh-client iproute2 slurm-wlm munge numactl
     libtcmalloc-minimal4 (Slurm, namespaces: for the launch tests; tcmalloc: the
     allocator every training rank preloads, docs/PERFORMANCE.md)
     (when root; otherwise prints the apt-get line to run)
  2. .venv in the repository root (Python 3.11)
  3. tensorflow-cpu and Horovod's build requirements, pinned by
     scripts/constraints.txt (the one place every version is fixed)
  4. Horovod (version from constraints.txt) from its PyPI sdist, patched by
     scripts/horovod_patch.py and built once; the wheel is cached under
     ${XDG_CACHE_HOME:-~/.cache}/unet-hvd/wheels/<key>/, key = Python, TF,
     Horovod, Open MPI versions, the build settings and the patch script's hash
  5. this package (pip install -e .[test]) and its pinned dependencies, among them
     the inference engines openvino and onnxruntime and Keras' exporters' onnx, tf2onnx
  6. checks: horovodrun --check-build and a 2-rank mpirun allreduce

Options:
  --dry-run    print the steps and the cache key, change nothing
  --no-checks  skip step 6
  --help       this text
Environment: UNET_HVD_CACHE overrides the wheel cache folder.
USAGE
}

DRY=0; CHECKS=1
for a in "$@"; do
  case "$a" in
    --help|-h) usage; exit 0 ;;
    --dry-run) DRY=1 ;;
    --no-checks) CHECKS=0 ;;
    *) echo "setup.sh: unknown option '$a' (see --help)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
CONSTRAINTS="$ROOT/scripts/constraints.txt"
PY_BASE="${PYTHON:-python3}"
pin() {  # the exact version scripts/constraints.txt gives a package
  local v; v=$(grep -iE "^$1==" "$CONSTRAINTS" | cut -d= -f3)
  [[ -n "$v" ]] || { echo "setup.sh: scripts/constraints.txt pins no version of $1" >&2; exit 1; }
  echo "$v"
}
TF_VER=$(pin 'tensorflow[-_]cpu')
HVD_VERSION=$(pin horovod)
TF_PKG="tensorflow-cpu==$TF_VER"
APT_PKGS=(openmpi-bin libopenmpi-dev cmake build-essential python3-dev python3-venv rsync openssh-client
          iproute2 slurm-wlm munge numactl libtcmalloc-minimal4)
# How Horovod is built (part of the cache key: other settings, another wheel).
# CMAKE_POLICY_VERSION_MINIMUM lets Horovod's bundled third-party CMake files
# configure under current CMake; MAKEFLAGS is speed only and stays out of the key.
BUILD_ENV=(HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
           HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 CMAKE_POLICY_VERSION_MINIMUM=3.5)
CACHE_ROOT="${UNET_HVD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/unet-hvd}"

STEP="start"
trap 'rc=$?; echo "setup.sh: FAILED at step: $STEP (exit $rc)" >&2; exit $rc' ERR
step() { STEP="$1"; echo "==> [$(date +%H:%M:%S)] $1"; }
t0=$(date +%s)

step "1/6 Debian packages"
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  line="apt-get install -y --no-install-recommends ${missing[*]}"
  if ((DRY)); then echo "would run: apt-get update && $line"
  elif [[ $(id -u) -eq 0 ]]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $line >/dev/null
  else
    echo "setup.sh: not root; run as root:  apt-get update && $line" >&2; exit 1
  fi
else echo "    present: ${APT_PKGS[*]}"; fi
# tcmalloc: each training rank preloads it (unet/distributed/ranks.py); without it the ranks spend
# ~40 % of their CPU in the kernel and train ~1.5x slower. CI must have it: a run without it would
# measure another program.
if ((!DRY)) && ! ldconfig -p | grep 'libtcmalloc_minimal\.so\.4 ' >/dev/null; then
  if [[ "${CI:-}" == true ]]; then
    echo "setup.sh: CI=true and libtcmalloc_minimal.so.4 is missing (Debian package libtcmalloc-minimal4)" >&2; exit 1
  fi
  echo "setup.sh: warning: libtcmalloc_minimal.so.4 missing (apt-get install libtcmalloc-minimal4): ranks keep glibc's malloc" >&2
fi

step "2/6 virtual environment"
if [[ ! -x "$VENV/bin/python" ]]; then
  ((DRY)) && echo "would create $VENV" || "$PY_BASE" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS")
# uv installs the pinned wheels: from a warm cache it puts TensorFlow into a new
# venv in ~5 s where pip takes ~25 s. pip stays for bootstrapping and the Horovod build.
# --compile-bytecode as pip does: without .pyc files every process (and the test suite
# starts hundreds) compiles TensorFlow's Python from source on import.
# -b: the same file pins what builds a source-only dependency (panoptica's poetry backend).
UV=(env VIRTUAL_ENV="$VENV" "$VENV/bin/uv" pip install -q --compile-bytecode -c "$CONSTRAINTS" -b "$CONSTRAINTS")

# Stamp of everything that decides the environment: when it matches, steps 3-5
# have nothing to do.
stamp_now() {
  cat "$ROOT/setup.cfg" "$CONSTRAINTS" "$ROOT/scripts/horovod_patch.py" "$ROOT/scripts/setup.sh" | sha256sum | cut -c1-16
}
STAMP_FILE="$VENV/.unet-hvd-stamp"
# The wheel cache key: everything that decides the Horovod binary. numpy is not in it: Horovod's
# compiled ops use TensorFlow's C++ API only (no numpy symbol in its libraries), so a numpy change
# needs no rebuild.
if [[ -x "$PY" ]]; then KEY_PY="$PY"; else KEY_PY="$PY_BASE"; fi
PY_VER=$("$KEY_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
MPI_VER=$( (mpirun --version 2>/dev/null || echo none) | head -1 | tr -dc '0-9.')
KEY=$(printf '%s|%s|%s|%s|%s|%s' "$PY_VER" "$TF_VER" "$HVD_VERSION" "$MPI_VER" "${BUILD_ENV[*]}" \
      "$(sha256sum "$ROOT/scripts/horovod_patch.py" | cut -c1-64)" | sha256sum | cut -c1-16)
WHEEL_DIR="$CACHE_ROOT/wheels/$KEY"
if ((DRY)); then
  echo "stamp $(stamp_now)"
  echo "wheel cache key $KEY (py $PY_VER, tf $TF_VER, horovod $HVD_VERSION, openmpi ${MPI_VER:-none}): $WHEEL_DIR"
  echo "dry run: nothing changed"; exit 0
fi
if [[ -f "$STAMP_FILE" && "$(cat "$STAMP_FILE")" == "$(stamp_now)" ]]; then
  echo "    environment up to date (stamp $(cat "$STAMP_FILE")), skipping steps 3-5"
else
  step "3/6 TensorFlow and Horovod build requirements"
  "${PIP[@]}" pip setuptools wheel uv
  "${UV[@]}" "$TF_PKG" cloudpickle psutil pyyaml packaging cffi

  step "4/6 Horovod $HVD_VERSION (cached wheel or build)"
  if ! ls "$WHEEL_DIR"/horovod-"$HVD_VERSION"-*.whl >/dev/null 2>&1; then
    echo "    no cached wheel for key $KEY (py $PY_VER, tf $TF_VER, openmpi $MPI_VER): building (~5 min on 2 cores)"
    BUILD=$(mktemp -d)
    "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HVD_VERSION" -d "$BUILD"
    tar -xzf "$BUILD"/horovod-"$HVD_VERSION".tar.gz -C "$BUILD"
    "$PY" "$ROOT/scripts/horovod_patch.py" "$BUILD/horovod-$HVD_VERSION"
    mkdir -p "$WHEEL_DIR.tmp"
    ( cd "$BUILD/horovod-$HVD_VERSION" &&
      env "${BUILD_ENV[@]}" MAKEFLAGS=-j"$(nproc)" \
      "$PY" -m pip wheel -q --no-build-isolation --no-deps . -w "$WHEEL_DIR.tmp" \
        > "$BUILD/build.log" 2>&1 ) || { tail -40 "$BUILD/build.log" >&2; false; }
    rm -rf "$WHEEL_DIR"; mv "$WHEEL_DIR.tmp" "$WHEEL_DIR"   # publish whole or not at all
    rm -rf "$BUILD"
  else
    echo "    cached wheel: $(ls "$WHEEL_DIR"/horovod-*.whl)"
  fi
  "${UV[@]}" --no-deps --reinstall "$WHEEL_DIR"/horovod-"$HVD_VERSION"-*.whl

  step "5/6 unet-hvd and its pinned dependencies"
  "${UV[@]}" -e "$ROOT[test]"
  stamp_now > "$STAMP_FILE"
fi

if ((CHECKS)); then
  step "6/6 checks"
  export PATH="$VENV/bin:$PATH" TF_CPP_MIN_LOG_LEVEL=3
  [[ $(id -u) -eq 0 ]] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  # both checks import TensorFlow (~10 s each here): run them side by side
  CHECK_BUILD=$(mktemp)
  "$VENV/bin/horovodrun" --check-build > "$CHECK_BUILD" 2>&1 & cb_pid=$!
  out=$(mpirun -np 2 --oversubscribe "$PY" -c '
import os; os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf, horovod.tensorflow as hvd
hvd.init()
s = hvd.allreduce(tf.constant([float(hvd.rank() + 1)]), op=hvd.Sum)  # 1 + 2
every = hvd.allgather(s).numpy().tolist()                             # the result on every rank
if hvd.rank() == 0:
    print("allreduce-smoke ranks=%d sums=%s" % (hvd.size(), ",".join("%g" % v for v in every)))
' 2>&1) || { echo "$out" >&2; false; }
  wait "$cb_pid" || { cat "$CHECK_BUILD" >&2; rm -f "$CHECK_BUILD"; echo "setup.sh: horovodrun --check-build failed" >&2; false; }
  sed -n '/Horovod v/,$p' "$CHECK_BUILD" | sed 's/^/    /'   # its table, without TensorFlow's start-up log
  for want in '\[X\] TensorFlow' '\[X\] MPI' '\[X\] Gloo'; do
    grep -q "$want" "$CHECK_BUILD" || { rm -f "$CHECK_BUILD"; echo "setup.sh: horovodrun --check-build lacks ${want//\\/}" >&2; false; }
  done
  rm -f "$CHECK_BUILD"
  echo "$out" | grep '^allreduce-smoke' | sed 's/^/    /'
  echo "$out" | grep -qx 'allreduce-smoke ranks=2 sums=3,3' || { echo "$out" >&2; echo "setup.sh: 2-rank allreduce did not give 3 on both ranks" >&2; false; }
fi
echo "==> setup done in $(( $(date +%s) - t0 )) s; activate with: source .venv/bin/activate"
