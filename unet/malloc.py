"""The memory allocator of the package's processes: tcmalloc, preloaded, unless the user chose.

With glibc's malloc a training rank spent ~42 % of its CPU time in the kernel on the project's AVX2
machines (~127,000 minor page faults a second: TensorFlow's large step buffers go back to the
kernel and fault in again, step after step); tcmalloc keeps them (docs/PERFORMANCE.md). A library
can only be preloaded before a process starts, so a process started without it re-executes itself
once, before MPI and TensorFlow load (same pid, same arguments, same environment plus LD_PRELOAD:
a launcher's rank variables stay). Only where the user set nothing: their own LD_PRELOAD is kept,
``UNET_MALLOC=system`` keeps glibc's malloc. The launchers (``unet.launch.commands``) pass the
ranks LD_PRELOAD themselves (``launcher_preload``); shell scripts ask
``python -m unet.malloc preload``. unet-convert, unet-evaluate and unet-predict keep glibc's malloc:
under tcmalloc the converter's peak memory grows with the number of cases (performance target 5), and
OpenVINO aborts when it loads before MPI ("free(): invalid pointer", OpenVINO 2026.4; docs/PERFORMANCE.md).

A leaf: imports nothing of the package but the errors.
"""
from __future__ import annotations

import os
import sys
import sysconfig

from unet.errors import UsageError

MALLOC_ENV = "UNET_MALLOC"             # tcmalloc (default) or system
MALLOC_CHOICES = ("tcmalloc", "system")
TCMALLOC = "libtcmalloc_minimal.so.4"  # Debian/Ubuntu libtcmalloc-minimal4 (scripts/setup.sh installs it)
REEXEC_MARK = "UNET_MALLOC_REEXEC"     # set across the one re-execution: never a second one
_reexecuted = False


def library_dirs() -> list[str]:
    """Where the dynamic linker finds system libraries without configuration (multiarch first)."""
    arch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = [f"/usr/lib/{arch}", f"/lib/{arch}"] if arch else []
    return dirs + ["/usr/lib64", "/lib64", "/usr/lib", "/usr/local/lib"]


def find_tcmalloc(dirs: list[str] | None = None) -> str | None:
    """Path of libtcmalloc_minimal.so.4 in the system's library folders, or None."""
    for d in library_dirs() if dirs is None else dirs:
        path = os.path.join(d, TCMALLOC)
        if os.path.isfile(path):
            return path
    return None


def malloc_choice(env=os.environ) -> str:
    """UNET_MALLOC, checked: 'tcmalloc' (also when unset or empty) or 'system'."""
    v = env.get(MALLOC_ENV, "").strip().lower() or "tcmalloc"
    if v not in MALLOC_CHOICES:
        raise UsageError(f"{MALLOC_ENV}={env[MALLOC_ENV]}: expected one of {', '.join(MALLOC_CHOICES)}")
    return v


def preload_for(env, found: str | None) -> tuple[str | None, str]:
    """(library to preload, or None; why) for a process about to start with ``env``. Pure.

    None when the user chose (UNET_MALLOC=system, any LD_PRELOAD of their own) or when
    tcmalloc is not installed (``found`` None)."""
    if malloc_choice(env) == "system":
        return None, f"{MALLOC_ENV}=system"
    if env.get("LD_PRELOAD", "").strip():
        return None, "LD_PRELOAD of the environment"
    if found is None:
        return None, f"{TCMALLOC} not found (scripts/setup.sh installs it)"
    return found, "preloaded by the trainer"


def launcher_preload(env=os.environ) -> str | None:
    """What a launcher passes its ranks as LD_PRELOAD (the library's soname, which each host's
    dynamic linker resolves), or None where the user chose otherwise or it is not installed here."""
    lib, _ = preload_for(env, find_tcmalloc())
    return TCMALLOC if lib else None


def reexec_with_allocator(env=os.environ) -> None:
    """Re-execute this process with tcmalloc preloaded when it lacks it and the user set nothing
    (see MALLOC_ENV). Returns when there is nothing to do; else does not return. Call before MPI,
    TensorFlow or any thread starts."""
    global _reexecuted
    if env.pop(REEXEC_MARK, None) is not None:
        _reexecuted = True                       # this is the re-executed process
        return
    lib, _ = preload_for(env, find_tcmalloc())
    if lib is None or not hasattr(sys, "orig_argv"):
        return
    env["LD_PRELOAD"], env[REEXEC_MARK] = lib, "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, dict(env))


def allocator_in_use(maps: str | None = None) -> str:
    """'tcmalloc', 'jemalloc' or 'glibc': which allocator this process has mapped (/proc/self/maps)."""
    if maps is None:
        try:
            with open("/proc/self/maps") as f:
                maps = f.read()
        except OSError:
            return "unknown"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    return "glibc"


def allocator_note(env=os.environ) -> str:
    """The set-up line's allocator field: what is mapped, and why when it is not tcmalloc."""
    used = allocator_in_use()
    if used == "tcmalloc":
        return "tcmalloc (re-executed with LD_PRELOAD)" if _reexecuted else "tcmalloc"
    try:
        _, why = preload_for(env, find_tcmalloc())
    except UsageError as e:
        why = str(e)
    return f"{used} ({why})"


def main(argv: list[str] | None = None) -> int:
    """``python -m unet.malloc preload``: the LD_PRELOAD value for the ranks a shell script starts
    (scripts/slurm/train_hvd.sbatch), or an empty line."""
    if (sys.argv[1:] if argv is None else argv) != ["preload"]:
        print("usage: python -m unet.malloc preload", file=sys.stderr)
        return 2
    try:
        print(launcher_preload() or "")
    except UsageError as e:
        print(f"unet.malloc: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
