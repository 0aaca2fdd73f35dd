"""The ranks' allocator: tcmalloc preloaded by re-execution under a plain mpirun, the user's choice kept."""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, mpi_env, run_mpi

from unet import malloc
from unet.errors import UsageError

SCRIPT = os.path.join(ROOT, "tests", "mpi_scripts", "allocator.py")


def test_preload_only_where_the_user_set_nothing():
    lib = "/usr/lib/x/libtcmalloc_minimal.so.4"
    assert malloc.preload_for({}, lib) == (lib, "preloaded by the trainer")
    assert malloc.preload_for({"UNET_MALLOC": "tcmalloc"}, lib)[0] == lib
    assert malloc.preload_for({"UNET_MALLOC": "system"}, lib) == (None, "UNET_MALLOC=system")
    assert malloc.preload_for({"LD_PRELOAD": "/opt/libasan.so"}, lib) == (None, "LD_PRELOAD of the environment")
    assert malloc.preload_for({}, None)[0] is None               # not installed: glibc's malloc, said why
    with pytest.raises(UsageError, match="UNET_MALLOC=jemalloc: expected one of tcmalloc, system"):
        malloc.preload_for({"UNET_MALLOC": "jemalloc"}, lib)
    assert malloc.allocator_in_use("7f0-7f1 r-xp 0 08:01 12 /usr/lib/libtcmalloc_minimal.so.4.5.10\n") == "tcmalloc"
    assert malloc.allocator_in_use("7f0-7f1 r-xp 0 08:01 12 /usr/lib/libc.so.6\n") == "glibc"


def _run(trace, **env):
    p = run_mpi(2, [SCRIPT, "--flag", "a b"], env=mpi_env(ALLOC_TRACE=str(trace), **env))
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(l for l in p.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), trace.read_text().splitlines()


@pytest.mark.mpi
def test_plain_mpirun_ranks_reexecute_once_with_tcmalloc_and_keep_their_mpi_env(tmp_path):
    assert malloc.find_tcmalloc(), "libtcmalloc_minimal.so.4 is not installed (scripts/setup.sh installs it)"
    every, trace = _run(tmp_path / "trace")
    assert [r["rank"] for r in every] == [0, 1] and all(r["size"] == 2 and r["sum"] == 3 for r in every)
    assert [r["launcher_rank"] for r in every] == ["0", "1"]      # Open MPI's variables survived the exec
    assert all(r["tcmalloc_mapped"] and r["LD_PRELOAD"] == malloc.find_tcmalloc() for r in every)
    assert all(r["note"] == "tcmalloc (re-executed with LD_PRELOAD)" and not r["marker_left"] for r in every)
    assert all(r["argv"] == ["--flag", "a b"] for r in every)      # the same arguments, quoting intact
    # two starts per rank, in the same process (same pid): the original and one re-execution
    pids = sorted(int(l.split()[0]) for l in trace)
    assert len(trace) == 4 and pids[0] == pids[1] and pids[2] == pids[3] and pids[1] != pids[2]
    assert sorted(r["pid"] for r in every) == [pids[0], pids[2]]


@pytest.mark.mpi
def test_the_users_ld_preload_and_opt_out_win(tmp_path):
    user_lib = next(os.path.join(d, "libz.so.1") for d in malloc.library_dirs()
                    if os.path.isfile(os.path.join(d, "libz.so.1")))
    every, trace = _run(tmp_path / "user", LD_PRELOAD=user_lib, USER_LIB=user_lib)
    assert all(r["LD_PRELOAD"] == user_lib and r["user_lib_mapped"] and not r["tcmalloc_mapped"] for r in every)
    assert len(trace) == 2                                        # nobody re-executed
    every, trace = _run(tmp_path / "system", UNET_MALLOC="system")
    assert all(r["LD_PRELOAD"] is None and not r["tcmalloc_mapped"] for r in every)
    assert all(r["note"] == "glibc (UNET_MALLOC=system)" for r in every) and len(trace) == 2


def test_the_commands_keep_glibc_malloc(tmp_path):
    """unet-convert, unet-evaluate and unet-predict do not re-execute themselves with tcmalloc, so they never
    read UNET_MALLOC: under tcmalloc the converter's peak memory grows with the cases (performance target 5)
    and OpenVINO aborts when it loads before MPI (docs/PERFORMANCE.md). A bad UNET_MALLOC leaves each
    command's own first error in place: one line, status 2, nothing written."""
    env = {**os.environ, "UNET_MALLOC": "jemalloc"}
    env.pop("LD_PRELOAD", None)
    runs = (("unet.data.convert", "unet-convert", ["--input", "x", "--output", str(tmp_path / "o.h5")]),
            ("unet.evaluation.evaluate", "unet-evaluate", ["--model", str(tmp_path / "none")]),
            ("unet.inference.predict", "unet-predict", ["--model", str(tmp_path / "none")]))
    for module, prog, argv in runs:
        p = subprocess.run([sys.executable, "-m", module, *argv], env=env,
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
        last = p.stderr.strip().splitlines()[-1]                  # argparse's: the usage, then the error
        assert p.returncode == 2 and last.startswith(f"{prog}: error: ") and "UNET_MALLOC" not in p.stderr, p.stderr
        assert os.listdir(tmp_path) == []
