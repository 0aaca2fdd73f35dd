#!/usr/bin/env python3
"""Make Horovod 0.28.1's sdist build against TensorFlow 2.21 (CPU).

Usage: horovod_patch.py UNPACKED_SDIST_DIR

One change, checked rather than assumed:

* ``horovod/tensorflow/CMakeLists.txt`` compiles ``xla_mpi_ops.cc`` into the
  TensorFlow op library. That file registers Horovod's XLA custom calls, which
  only do work in GPU builds, and it includes XLA headers that need the
  highwayhash and farmhash headers; the TF 2.21 wheel ships neither, so the
  compile fails. We drop that one source from ``TF_SOURCES``. Nothing else
  references its symbols on CPU builds.

The other known obstacle, Gloo's ``cmake_minimum_required`` being older than
cmake 4 accepts, is handled in setup.sh with ``CMAKE_POLICY_VERSION_MINIMUM``
(and the Debian cmake 3.25), not by editing files.

The script is idempotent and exits non-zero, naming the file, when the text
it expects is not there (a different Horovod version, say).
"""
import pathlib
import sys


def patch_tf_cmakelists(text: str) -> tuple[str, int]:
    """Remove the line adding xla_mpi_ops.cc to TF_SOURCES; return (text, lines removed)."""
    kept, removed = [], 0
    for line in text.splitlines(keepends=True):
        if "TF_SOURCES" in line and "xla_mpi_ops.cc" in line:
            removed += 1
            continue
        kept.append(line)
    return "".join(kept), removed


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.splitlines()[2], file=sys.stderr)
        return 2
    path = pathlib.Path(argv[1]) / "horovod" / "tensorflow" / "CMakeLists.txt"
    if not path.is_file():
        print(f"horovod_patch: {path}: not found (is this an unpacked Horovod sdist?)", file=sys.stderr)
        return 1
    text = path.read_text()
    new, removed = patch_tf_cmakelists(text)
    if removed == 0:
        if "mpi_ops.cc" in text and "xla_mpi_ops.cc" not in text:
            print(f"horovod_patch: {path}: already patched")
            return 0
        print(f"horovod_patch: {path}: no TF_SOURCES line for xla_mpi_ops.cc; unexpected Horovod version",
              file=sys.stderr)
        return 1
    path.write_text(new)
    print(f"horovod_patch: {path}: removed xla_mpi_ops.cc from TF_SOURCES ({removed} line)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
