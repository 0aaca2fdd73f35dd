"""Hostfile checks and the commands the launchers build (no ranks started here)."""
import os
import subprocess

import pytest

from conftest import ROOT
from unet.hostfile import HostfileError, check, parse
from unet.launch import load_profile, mpirun_cmd


def launch(*args):
    return subprocess.run([os.path.join(ROOT, "scripts", "launch_mpirun.sh"), *args], capture_output=True,
                          text=True, timeout=60)


def test_parse_open_mpi_syntax():
    assert parse("# c\nnode1 slots=2\nnode2   # one slot\n\nnode3 slots=4 max_slots=8\n") == \
        [("node1", 2), ("node2", 1), ("node3", 4)]


@pytest.mark.parametrize("text,needle", [
    ("node1 slots=two\n", "hosts:1: cannot parse 'slots=two'"),
    ("node1 cpus=2\n", "hosts:1: cannot parse 'cpus=2'"),
    ("node1\nnode1 slots=2\n", "hosts:2: host node1 already listed on line 1"),
    ("bad/host\n", "hosts:1: bad host name"),
    ("# nothing\n", "hosts: no hosts"),
])
def test_syntax_errors_name_file_and_line(text, needle):
    with pytest.raises(HostfileError, match=needle.replace("(", r"\(")):
        parse(text, "hosts")


def test_missing_file_and_too_few_slots(tmp_path):
    with pytest.raises(HostfileError, match="no such hostfile"):
        check(str(tmp_path / "nope"), 2)
    (tmp_path / "h").write_text("a slots=2\nb slots=1\n")
    with pytest.raises(HostfileError, match="3 slots on 2 host\\(s\\), fewer than the 4 ranks"):
        check(str(tmp_path / "h"), 4)
    assert check(str(tmp_path / "h"), 3) == [("a", 2), ("b", 1)]


def test_shipped_hostfiles_and_profiles_parse():
    for name, slots in (("localhost", 4), ("knl-4node", 4), ("skylake-4node", 8)):
        assert sum(n for _, n in check(os.path.join(ROOT, "hostfiles", name), 1)) == slots
    for name in ("local", "knl", "skylake"):
        assert int(load_profile(name)["cores_per_socket"]) >= 2


def test_mpirun_command_binds_ranks_to_sockets():
    sky = mpirun_cmd("hf", 8, load_profile("skylake"), "py", ["--epochs", "1"])
    s = " ".join(sky)
    assert s.startswith("mpirun -hostfile hf -np 8 --map-by socket --bind-to socket --report-bindings")
    assert "-x OMP_NUM_THREADS=28" in s and "-x KMP_BLOCKTIME=1" in s and "-x HOROVOD_CYCLE_TIME=5" in s
    assert sky[-6:] == ["--num_inter_threads", "2", "--blocktime", "1", "--epochs", "1"]
    knl = " ".join(mpirun_cmd("hf", 4, load_profile("knl"), "py", []))
    assert "numactl -p 1 py " in knl and "OMP_NUM_THREADS=68" in knl
    two = " ".join(mpirun_cmd("hf", 4, load_profile("skylake"), "py", [], ranks_per_socket=2))
    assert "--map-by ppr:2:socket:pe=14 --bind-to core" in two and "OMP_NUM_THREADS=14" in two


def test_launcher_dry_run_and_one_line_errors(tmp_path):
    p = launch("--dry-run", "--np", "2", "--", "--synthetic")
    assert p.returncode == 0 and p.stdout.startswith("mpirun -hostfile ") and p.stdout.rstrip().endswith("--synthetic")
    for args, msg in ((["--hostfile", str(tmp_path / "x")], "no such hostfile"),
                      (["--np", "5"], "fewer than the 5 ranks"),
                      (["--profile", "cray"], "--profile cray: no such profile")):
        p = launch("--dry-run", *args)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and msg in p.stderr, p.stderr
    (tmp_path / "dup").write_text("n1 slots=1\nn1 slots=1\n")
    p = launch("--hostfile", str(tmp_path / "dup"))
    assert p.returncode == 2 and "already listed on line 1" in p.stderr


def test_sync_pushes_the_tree_and_data_to_every_host(tmp_path):
    # a remote shell that runs the command here, so rsync really copies
    rsh = tmp_path / "rsh"
    rsh.write_text('#!/bin/sh\nshift\nexec sh -c "$*"\n')
    rsh.chmod(0o755)
    (tmp_path / "hosts").write_text("nodeA slots=1\nnodeB slots=1\n")
    data = tmp_path / "d.h5"
    data.write_bytes(b"x" * 1000)
    dest = tmp_path / "dest"
    p = subprocess.run([os.path.join(ROOT, "scripts", "sync.sh"), "--hostfile", str(tmp_path / "hosts"),
                        "--dest", str(dest), "--data", str(data), "--data_dest", str(tmp_path / "ddest"),
                        "--rsh", str(rsh)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["sync.sh: nodeA done", "sync.sh: nodeB done"]
    assert (dest / "train_hvd.py").is_file() and (dest / "unet" / "train.py").is_file()
    assert not (dest / ".venv").exists() and not (dest / ".git").exists()
    assert (tmp_path / "ddest" / "d.h5").stat().st_size == 1000
    bad = subprocess.run([os.path.join(ROOT, "scripts", "sync.sh"), "--hostfile", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no such hostfile" in bad.stderr


def test_sync_help_prints_only_the_help_text():
    p = subprocess.run([os.path.join(ROOT, "scripts", "sync.sh"), "--help"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0
    lines = p.stdout.splitlines()
    assert lines[0].startswith("Push the code") and lines[-1].startswith("  --dry-run")
    assert any(l.startswith("Usage: scripts/sync.sh --hostfile F") for l in lines)
    assert not any(l.startswith(("#", "set -", "ROOT=")) for l in lines)
