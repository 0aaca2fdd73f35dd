"""Hostfile checks and the commands the launchers build (no ranks started here: every
script run below is --dry-run or --help)."""
import os
import shlex
import subprocess

import pytest
from conftest import ROOT
from test_distributed import fake_sysfs

from unet.distributed.ranks import physical_cores, threads_for_rank
from unet.launch.commands import DISCOVER, TRAINER, horovodrun_cmd, load_profile, mpirun_cmd
from unet.launch.hostfile import HostfileError, check, parse

LAUNCHERS = ("launch_mpirun.sh", "launch_horovodrun.sh")


def script(name, *args):
    return subprocess.run([os.path.join(ROOT, "scripts", name), *args], capture_output=True,
                          text=True, timeout=60)


def launch(*args):
    return script("launch_mpirun.sh", *args)


def dry_run(name, *args):
    """(environment the launcher sets, command) from a launcher's --dry-run line."""
    p = script(name, "--dry-run", *args)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    words = shlex.split(p.stdout)
    n = next(i for i, w in enumerate(words) if "=" not in w)
    return dict(w.split("=", 1) for w in words[:n]), words[n:]


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
    hosts = {name: check(os.path.join(ROOT, "hostfiles", name), 1)
             for name in ("localhost", "knl-4node", "skylake-4node")}
    assert hosts["localhost"] == [("localhost", 4)]
    assert hosts["knl-4node"] == [(f"knl0{i}", 1) for i in range(1, 5)]          # one rank per KNL node
    assert hosts["skylake-4node"] == [(f"skx0{i}", 2) for i in range(1, 5)]      # one rank per socket, 2 sockets
    knl, sky, local = load_profile("knl"), load_profile("skylake"), load_profile("local")
    assert (knl["cores_per_socket"], knl["threads_per_core"], knl["ranks_per_socket"], knl["numactl"],
            knl["inter_threads"], knl["KMP_BLOCKTIME"]) == ("68", "4", "1", "-p 1", "2", "0")
    assert (sky["cores_per_socket"], sky["threads_per_core"], sky["ranks_per_socket"], sky["numactl"],
            sky["inter_threads"], sky["KMP_BLOCKTIME"]) == ("28", "1", "1", "", "2", "1")
    assert (local["cores_per_socket"], local["threads_per_core"], local["ranks_per_socket"],
            local["inter_threads"], local["HOROVOD_CYCLE_TIME"], local["OMPI_MCA_mpi_yield_when_idle"]) == \
        ("2", "1", "2", "1", "2", "1")
    for prof in (knl, sky, local):
        assert prof["KMP_AFFINITY"] == "granularity=fine,compact,1,0"
        assert prof["HOROVOD_FUSION_THRESHOLD"] == "67108864"


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


def rank0_cpus(cmd, cores_per_socket, threads_per_core):
    """The logical CPUs Open MPI gives rank 0 for the binding in ``cmd`` (Linux numbering:
    hardware thread t of core c is CPU c + t * cores)."""
    mapping = cmd[cmd.index("--map-by") + 1]
    cores = cores_per_socket if mapping == "socket" else int(mapping.split("pe=")[1])
    return frozenset(c + t * cores_per_socket for c in range(cores) for t in range(threads_per_core))


@pytest.mark.parametrize("name,k", [("knl", 1), ("knl", 4), ("skylake", 1), ("skylake", 2), ("local", 2)])
def test_launcher_threads_match_what_the_trainer_counts_from_the_binding(tmp_path, name, k):
    """-x OMP_NUM_THREADS (cores per socket / ranks per socket) is what each rank's trainer
    derives from the CPUs it is bound to: physical cores, SMT siblings once."""
    prof = load_profile(name)
    cores, tpc = int(prof["cores_per_socket"]), int(prof["threads_per_core"])
    cmd = mpirun_cmd("hf", k, prof, "py", [], ranks_per_socket=k)
    omp = int(next(x.split("=")[1] for x in cmd if x.startswith("OMP_NUM_THREADS=")))
    cpus = rank0_cpus(cmd, cores, tpc)
    sysfs = fake_sysfs(tmp_path, cores, tpc)
    assert threads_for_rank("n", cpus, [("n", cpus)], physical_cores(cpus, sysfs)) == omp == cores // k


def test_launcher_dry_run_and_one_line_errors(tmp_path):
    p = launch("--dry-run", "--np", "2", "--", "--synthetic")
    assert p.returncode == 0 and p.stdout.startswith("mpirun -hostfile ") and p.stdout.rstrip().endswith("--synthetic")
    for args, msg in ((["--profile", "cray"], "--profile cray: no such profile"),
                      (["--np", "0"], "--np must be >= 1 (got 0)")):
        p = launch("--dry-run", *args)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and msg in p.stderr, p.stderr


HOSTFILE_ERRORS = [
    # (hostfile text or None for no file, ranks, message after "<path>")
    (None, 2, ": no such hostfile"),
    ("n1 slots=2\nn2 slots=two\n", 2, ":2: cannot parse 'slots=two' (expected slots=N)"),
    ("n1 slots=2\nn2 slots=1\n", 4, ": 3 slots on 2 host(s), fewer than the 4 ranks asked for"),
    ("n1 slots=1\n# second node\nn1 slots=1\n", 2, ":3: host n1 already listed on line 1"),
]


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("text,ranks,message", HOSTFILE_ERRORS, ids=["missing", "syntax", "slots", "duplicate"])
def test_bad_hostfile_is_one_line_naming_the_file_through_each_launcher(tmp_path, launcher, text, ranks, message):
    hostfile = tmp_path / "hosts"
    if text is not None:
        hostfile.write_text(text)
    # --dry-run: if a check ever let the file through, the launcher prints a command instead of starting ranks
    p = script(launcher, "--dry-run", "--hostfile", str(hostfile), "--np", str(ranks), "--", "--synthetic")
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr == f"{launcher}: error: {hostfile}{message}\n"


def test_horovodrun_command_carries_controller_timeline_and_autotune(tmp_path):
    (tmp_path / "h").write_text("a slots=2\nb slots=2\n")
    hf, local = str(tmp_path / "h"), load_profile("local")
    gloo = horovodrun_cmd(hf, 3, local, "/v/bin/python", ["--synthetic"], controller="gloo",
                          timeline="t.json", autotune=True)
    assert gloo[:6] == ["/v/bin/horovodrun", "-np", "3", "-H", "a:2,b:1", "--gloo"]   # -H trimmed to 3 slots
    head = gloo[:gloo.index(TRAINER)]
    assert head[-4:] == ["--timeline-filename", "t.json", "--autotune", "/v/bin/python"]
    assert not any(x.startswith(("--binding-args", "--mpi-args")) for x in head)      # Gloo cannot bind
    assert gloo[-1] == "--synthetic"
    mpi = horovodrun_cmd(hf, 2, local, "/v/bin/python", [], controller="mpi", timeline=None, autotune=False)
    assert mpi[5:8] == ["--mpi", "--binding-args=--map-by ppr:2:socket:pe=1 --bind-to core",
                        "--mpi-args=--report-bindings"]
    assert "--autotune" not in mpi and "--timeline-filename" not in mpi
    sky = horovodrun_cmd(hf, 2, load_profile("skylake"), "py", [], controller="mpi", timeline=None, autotune=False)
    assert "--binding-args=--map-by socket --bind-to socket" in sky
    sky2 = horovodrun_cmd(hf, 2, load_profile("skylake"), "py", [], controller="mpi", timeline=None,
                          autotune=False, ranks_per_socket=2)
    assert "--binding-args=--map-by ppr:2:socket:pe=14 --bind-to core" in sky2


def test_horovodrun_elastic_command(tmp_path):
    (tmp_path / "h").write_text("a slots=1\n")
    cmd = horovodrun_cmd(str(tmp_path / "h"), 2, load_profile("local"), "py", ["--epochs", "3"],
                         controller="gloo", timeline=None, autotune=False, elastic=(1, 4, 5, 60))
    assert cmd[:14] == ["horovodrun", "-np", "2", "--min-np", "1", "--max-np", "4", "--host-discovery-script",
                        DISCOVER, "--blacklist-cooldown-range", "5", "60", "--gloo", "--cycle-time-ms"]
    assert "-H" not in cmd and "--fusion-threshold-mb" not in cmd     # hosts come from discovery
    assert cmd[-2:] == ["--epochs", "3"]


def test_horovodrun_dry_run_with_each_controller():
    env, cmd = dry_run("launch_horovodrun.sh", "--controller", "gloo", "--timeline-filename", "t.json",
                       "--autotune", "--", "--synthetic")
    head = cmd[:cmd.index(TRAINER)]
    assert cmd[0].endswith("/horovodrun") and "--gloo" in head and "--autotune" in head
    assert head[head.index("--timeline-filename") + 1] == "t.json" and cmd[-1] == "--synthetic"
    assert "OMP_NUM_THREADS" not in env and not any("binding" in x for x in head)
    env, cmd = dry_run("launch_horovodrun.sh", "--controller", "mpi", "--", "--synthetic")
    assert "--mpi" in cmd and "--mpi-args=--report-bindings" in cmd
    assert "--binding-args=--map-by ppr:2:socket:pe=1 --bind-to core" in cmd and env["OMP_NUM_THREADS"] == "1"
    env, cmd = dry_run("launch_horovodrun.sh", "--hostfile", os.path.join(ROOT, "hostfiles", "skylake-4node"),
                       "--np", "8", "--profile", "skylake")                   # MPI is the default controller
    assert "--mpi" in cmd and "--binding-args=--map-by socket --bind-to socket" in cmd
    assert env["OMP_NUM_THREADS"] == "28" and "-H" in cmd and cmd[cmd.index("-H") + 1].startswith("skx01:2,")


def test_horovodrun_dry_run_elastic(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=2\n")
    env, cmd = dry_run("launch_horovodrun.sh", "--elastic", "--hostfile", str(hosts), "--np", "2",
                       "--min-np", "1", "--max-np", "3", "--", "--synthetic")
    assert env["UNET_DISCOVERY_HOSTFILE"] == str(hosts) and "HOROVOD_FUSION_THRESHOLD" not in env
    assert cmd[cmd.index("--min-np") + 1] == "1" and cmd[cmd.index("--max-np") + 1] == "3"
    assert cmd[cmd.index("--host-discovery-script") + 1] == DISCOVER and "--gloo" in cmd
    for args, msg in ((["--min-np", "3"], "--elastic needs 1 <= --min-np (3) <= --np (2) <= --max-np (2)"),
                      (["--controller", "mpi"], "--elastic runs over Gloo: drop --controller mpi")):
        p = script("launch_horovodrun.sh", "--dry-run", "--elastic", "--hostfile", str(hosts), "--np", "2", *args)
        assert (p.returncode, p.stdout) == (2, "") and p.stderr == f"launch_horovodrun.sh: error: {msg}\n"


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launcher_help_names_the_script_and_its_own_options(launcher):
    p = script(launcher, "--help")
    assert p.returncode == 0 and p.stderr == ""
    assert p.stdout.startswith(f"usage: {launcher} [options] [-- TRAIN_HVD_ARGS ...]")
    assert "Arguments after -- go to train_hvd.py" in p.stdout
    assert "{mpirun,horovodrun}" not in p.stdout and "usage: launch " not in p.stdout
    own = ("--controller", "--timeline-filename", "--autotune", "--elastic", "--min-np")
    if launcher == "launch_mpirun.sh":
        assert not any(opt in p.stdout for opt in own) and "--report-bindings" in p.stdout
    else:
        assert all(opt in p.stdout for opt in own) and "Gloo cannot bind" in p.stdout
    assert p.stdout.count("--dry-run") == 1 and "--hostfile" in p.stdout


def test_sync_help_prints_only_the_help_text():
    p = script("sync.sh", "--help")
    assert p.returncode == 0
    lines = p.stdout.splitlines()
    assert lines[0].startswith("Push the code") and lines[-1].startswith("  --dry-run")
    assert any(l.startswith("Usage: scripts/sync.sh --hostfile F") for l in lines)
    assert not any(l.startswith(("#", "set -", "ROOT=")) for l in lines)


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
    assert (dest / "train_hvd.py").is_file() and (dest / "unet" / "training" / "train.py").is_file()
    assert not (dest / ".venv").exists() and not (dest / ".git").exists()
    assert (tmp_path / "ddest" / "d.h5").stat().st_size == 1000
    bad = subprocess.run([os.path.join(ROOT, "scripts", "sync.sh"), "--hostfile", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no such hostfile" in bad.stderr
