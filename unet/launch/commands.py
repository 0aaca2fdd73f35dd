"""Launchers: hostfile + hardware profile -> the exact mpirun / horovodrun command.

    scripts/launch_mpirun.sh     [--hostfile F] [--np N] [--profile local|knl|skylake|FILE] [--dry-run] [-- TRAIN_ARGS]
    scripts/launch_horovodrun.sh [--hostfile F] [--np N] [--profile ...] [--controller mpi|gloo]
                                 [--timeline-filename F] [--autotune] [--dry-run] [-- TRAIN_ARGS]
    scripts/launch_horovodrun.sh --elastic --min-np K [--max-np M] --hostfile F ...

(the scripts run ``python -m unet.launch.commands mpirun|horovodrun ...``). The hostfile is
checked first (missing, syntax, duplicate hosts, too few slots). The command is
executed directly (``execvp``), never through a shell, so paths from the hostfile or
flags are not interpreted. mpirun, and horovodrun with the MPI controller, bind each
rank to its socket (or to its share of the socket's cores); intra-op threads are left
to the trainer, which counts the physical cores of the CPUs each rank is bound to.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from unet.cli import USAGE, run_cli
from unet.errors import UsageError
from unet.launch.hostfile import check
from unet.malloc import MALLOC_ENV, launcher_preload

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROFILE_DIR = os.path.join(ROOT, "scripts", "profiles")
TRAINER = os.path.join(ROOT, "train_hvd.py")
DISCOVER = os.path.join(ROOT, "scripts", "discover_hosts.sh")
PROFILE_KEYS = {"cores_per_socket", "threads_per_core", "ranks_per_socket", "inter_threads", "KMP_BLOCKTIME",
                "KMP_AFFINITY", "numactl", "HOROVOD_CYCLE_TIME", "HOROVOD_FUSION_THRESHOLD",
                "OMPI_MCA_mpi_yield_when_idle"}


class LaunchError(UsageError):
    """Launcher flags or a hardware profile that cannot work (one line naming the flag or file)."""


def load_profile(name: str) -> dict:
    path = name if os.sep in name or name.endswith(".conf") else os.path.join(PROFILE_DIR, f"{name}.conf")
    if not os.path.isfile(path):
        choices = sorted(f[:-5] for f in os.listdir(PROFILE_DIR) if f.endswith(".conf"))
        raise LaunchError(f"--profile {name}: no such profile (have: {', '.join(choices)}, or a path)")
    prof = {}
    with open(path) as f:
        for no, raw in enumerate(f, start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            key, eq, val = line.partition("=")
            if not eq or key.strip() not in PROFILE_KEYS:
                raise LaunchError(f"{path}:{no}: expected one of {', '.join(sorted(PROFILE_KEYS))} as key=value")
            prof[key.strip()] = val.strip()
    for k in ("cores_per_socket", "ranks_per_socket", "inter_threads"):
        if not prof.get(k, "").isdigit() or int(prof[k]) < 1:
            raise LaunchError(f"{path}: {k} must be a positive integer")
    return prof


def runtime_env(prof: dict) -> dict:
    env = {k: prof[k] for k in ("KMP_BLOCKTIME", "KMP_AFFINITY", "HOROVOD_CYCLE_TIME",
                                "HOROVOD_FUSION_THRESHOLD", "OMPI_MCA_mpi_yield_when_idle") if prof.get(k)}
    return env


def allocator_env(env=os.environ) -> tuple[dict, list[str]]:
    """The ranks' allocator: ({LD_PRELOAD: tcmalloc} when the user set nothing and it is installed,
    else {}; names of the user's own settings to pass on: LD_PRELOAD, UNET_MALLOC)."""
    lib = launcher_preload(env)       # a bad UNET_MALLOC raises a UsageError
    mine = [k for k in ("LD_PRELOAD", MALLOC_ENV) if env.get(k, "").strip()]
    return ({"LD_PRELOAD": lib} if lib else {}), mine


def trainer_cmd(prof: dict, python: str, train_args: list[str]) -> list[str]:
    cmd = []
    if prof.get("numactl"):
        cmd += ["numactl", *shlex.split(prof["numactl"])]
    cmd += [python, TRAINER, "--num_inter_threads", prof["inter_threads"]]
    if prof.get("KMP_BLOCKTIME", "").isdigit():
        cmd += ["--blocktime", prof["KMP_BLOCKTIME"]]
    return cmd + train_args


def rank_threads(prof: dict, ranks_per_socket: int | None = None) -> tuple[int, int]:
    """(ranks per socket, physical cores per rank): what the binding gives each rank, and
    so the intra-op threads the trainer will count from it (SMT siblings count once)."""
    k = ranks_per_socket or int(prof["ranks_per_socket"])
    return k, max(int(prof["cores_per_socket"]) // k, 1)


def binding_args(prof: dict, ranks_per_socket: int | None = None) -> list[str]:
    """Open MPI mapping and binding: a whole socket per rank, or K ranks per socket with
    cores_per_socket/K cores each (pe= counts cores, not hardware threads)."""
    k, cores = rank_threads(prof, ranks_per_socket)
    if k == 1:
        return ["--map-by", "socket", "--bind-to", "socket"]
    return ["--map-by", f"ppr:{k}:socket:pe={cores}", "--bind-to", "core"]


def mpirun_cmd(hostfile: str, np_: int, prof: dict, python: str, train_args: list[str],
               ranks_per_socket: int | None = None) -> list[str]:
    cmd = ["mpirun", "-hostfile", hostfile, "-np", str(np_), *binding_args(prof, ranks_per_socket),
           "--report-bindings"]
    if os.geteuid() == 0:
        cmd += ["--allow-run-as-root"]
    env = runtime_env(prof)
    yield_idle = env.pop("OMPI_MCA_mpi_yield_when_idle", None)
    if yield_idle is not None:
        cmd += ["--mca", "mpi_yield_when_idle", yield_idle]
    env["OMP_NUM_THREADS"] = str(rank_threads(prof, ranks_per_socket)[1])
    preload, users = allocator_env()
    env.update(preload)
    for key, val in env.items():
        cmd += ["-x", f"{key}={val}"]
    for key in users:                  # the user's allocator settings reach every rank, remote ones too
        cmd += ["-x", key]
    cmd += ["-x", "PATH", "-x", "PYTHONPATH"] if os.environ.get("PYTHONPATH") else ["-x", "PATH"]
    return cmd + trainer_cmd(prof, python, train_args)


def horovodrun_cmd(hostfile: str, np_: int, prof: dict, python: str, train_args: list[str], *,
                   controller: str, timeline: str | None, autotune: bool,
                   elastic: tuple[int, int, int, int] | None = None,
                   ranks_per_socket: int | None = None) -> list[str]:
    """``elastic`` = (min_np, max_np, cooldown_lo, cooldown_hi): Elastic Horovod over Gloo,
    hosts found by ``scripts/discover_hosts.sh`` re-reading the hostfile every second.
    With the MPI controller the ranks are mapped and bound as ``mpirun_cmd`` binds them
    (horovodrun itself binds nothing outside Spectrum MPI); Gloo cannot bind."""
    hvdrun = os.path.join(os.path.dirname(python), "horovodrun")
    if elastic:
        min_np, max_np, lo, hi = elastic
        check(hostfile, min_np)
        cmd = [hvdrun, "-np", str(np_), "--min-np", str(min_np), "--max-np", str(max_np),
               "--host-discovery-script", DISCOVER, "--blacklist-cooldown-range", str(lo), str(hi), "--gloo"]
    else:
        # horovodrun's -H form, trimmed to np slots: its Gloo launcher starts one worker per listed slot
        left, parts = np_, []
        for h, n in check(hostfile, np_):
            if left > 0:
                parts.append(f"{h}:{min(n, left)}")
                left -= min(n, left)
        cmd = [hvdrun, "-np", str(np_), "-H", ",".join(parts), f"--{controller}"]
        if controller == "mpi":
            # horovodrun pastes these strings into its mpirun line: one argument each, '=' form
            cmd += [f"--binding-args={' '.join(binding_args(prof, ranks_per_socket))}",
                    "--mpi-args=--report-bindings"]
    if prof.get("HOROVOD_CYCLE_TIME"):
        cmd += ["--cycle-time-ms", prof["HOROVOD_CYCLE_TIME"]]
    if prof.get("HOROVOD_FUSION_THRESHOLD") and not elastic:
        cmd += ["--fusion-threshold-mb", str(max(int(prof["HOROVOD_FUSION_THRESHOLD"]) // (1 << 20), 1))]
    if timeline:
        cmd += ["--timeline-filename", timeline]
    if autotune:
        cmd += ["--autotune"]
    return cmd + trainer_cmd(prof, python, train_args)


PASS_THROUGH = "Arguments after -- go to train_hvd.py (see: python train_hvd.py --help)."
HELP = {
    "mpirun": ("launch_mpirun.sh",
               "Launch train_hvd.py with mpirun from an Open MPI hostfile and a hardware profile.",
               PASS_THROUGH + """

  launch_mpirun.sh --hostfile hostfiles/knl-4node --np 4 --profile knl -- --data /shared/brats.h5

Binding: one rank per socket -> --map-by socket --bind-to socket; K ranks per socket ->
--map-by ppr:K:socket:pe=C --bind-to core (C = cores per socket / K); mpirun prints the
bindings (--report-bindings). Each rank runs one intra-op thread per physical core it is
bound to (OMP_NUM_THREADS = C)."""),
    "horovodrun": ("launch_horovodrun.sh",
                   "Launch train_hvd.py with horovodrun (MPI or Gloo controller) from an Open MPI\n"
                   "hostfile and a hardware profile.",
                   PASS_THROUGH + """

  launch_horovodrun.sh --hostfile hostfiles/skylake-4node --np 8 --profile skylake -- --data /shared/brats.h5

--controller mpi: ranks are mapped and bound as launch_mpirun.sh binds them (horovodrun
--binding-args, socket or ppr:K:socket:pe=C) and mpirun prints the bindings
(--mpi-args=--report-bindings).
--controller gloo, and --elastic (which runs over Gloo): Gloo cannot bind ranks to CPUs.
Each rank may run on every CPU of its host; the trainer still picks its intra-op threads
itself: the physical cores it may use, divided among the ranks on its host."""),
}


def build_parser(launcher: str) -> argparse.ArgumentParser:
    prog, description, epilog = HELP[launcher]
    ap = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                 usage="%(prog)s [options] [-- TRAIN_HVD_ARGS ...]",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hostfile", default=os.path.join(ROOT, "hostfiles", "localhost"),
                    help="Open MPI hostfile ('host slots=N' per line; default: %(default)s)")
    ap.add_argument("--np", type=int, default=2, help="number of ranks (default: %(default)s)")
    ap.add_argument("--profile", default="local",
                    help="hardware profile: local, knl, skylake or a .conf path (default: %(default)s)")
    ap.add_argument("--ranks_per_socket", type=int, default=0,
                    help="override the profile's ranks per socket (0: the profile's"
                    + ("; MPI controller only)" if launcher == "horovodrun" else ")"))
    if launcher == "horovodrun":
        ap.add_argument("--controller", choices=("mpi", "gloo"), default=None,
                        help="Horovod controller (default: mpi; gloo with --elastic)")
        ap.add_argument("--timeline-filename", dest="timeline", default=None, help="Horovod timeline file")
        ap.add_argument("--autotune", action="store_true", help="Horovod autotuning")
        ap.add_argument("--elastic", action="store_true",
                        help="Elastic Horovod (Gloo); workers come and go as the hostfile is edited")
        ap.add_argument("--min-np", dest="min_np", type=int, default=1,
                        help="--elastic: fewest workers to go on with (default: %(default)s)")
        ap.add_argument("--max-np", dest="max_np", type=int, default=0, help="--elastic: most workers (0: --np)")
        ap.add_argument("--blacklist-cooldown-range", dest="cooldown", type=int, nargs=2, default=(10, 300),
                        metavar=("LO", "HI"),
                        help="--elastic: seconds before a failed host may rejoin (default: 10 300)")
    ap.add_argument("--python", default=sys.executable,
                    help="Python that runs train_hvd.py on every host (default: %(default)s)")
    ap.add_argument("--dry-run", action="store_true", help="print the exact command, run nothing")
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in HELP:
        print("usage: python -m unet.launch.commands {mpirun,horovodrun} [options] [-- TRAIN_HVD_ARGS ...] "
              "(or scripts/launch_mpirun.sh, scripts/launch_horovodrun.sh)", file=sys.stderr)
        return USAGE
    return run_cli(HELP[argv[0]][0], launch, argv[0], argv[1:])


def launch(launcher: str, argv: list[str]) -> int:
    """Check the hostfile and profile, then run (or with --dry-run print) the launcher's command."""
    train_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1:]
    a = build_parser(launcher).parse_args(argv)
    if a.np < 1:
        raise LaunchError(f"--np must be >= 1 (got {a.np})")
    check(a.hostfile, a.np)
    prof = load_profile(a.profile)
    if launcher == "mpirun":
        cmd = mpirun_cmd(a.hostfile, a.np, prof, a.python, train_args, a.ranks_per_socket or None)
        env, controller = {}, None
    else:
        elastic = None
        if a.elastic and a.controller == "mpi":
            raise LaunchError("--elastic runs over Gloo: drop --controller mpi")
        controller = a.controller or ("gloo" if a.elastic else "mpi")
        if a.elastic:
            max_np = a.max_np or a.np
            if not 1 <= a.min_np <= a.np <= max_np:
                raise LaunchError(f"--elastic needs 1 <= --min-np ({a.min_np}) <= --np ({a.np}) "
                                  f"<= --max-np ({max_np})")
            if not 1 <= a.cooldown[0] <= a.cooldown[1] <= 3600:
                raise LaunchError("--blacklist-cooldown-range needs 1 <= LO <= HI <= 3600")
            elastic = (a.min_np, max_np, *a.cooldown)
        cmd = horovodrun_cmd(a.hostfile, a.np, prof, a.python, train_args, controller=controller,
                             timeline=a.timeline, autotune=a.autotune, elastic=elastic,
                             ranks_per_socket=a.ranks_per_socket or None)
        env = dict(runtime_env(prof), **allocator_env()[0])   # horovodrun passes its environment on
        if controller == "mpi":      # horovodrun passes its environment on with -x
            env["OMP_NUM_THREADS"] = str(rank_threads(prof, a.ranks_per_socket or None)[1])
        if elastic:
            env.pop("HOROVOD_FUSION_THRESHOLD", None)  # see ELASTIC_UNSAFE in unet/distributed/ranks.py
            env["UNET_DISCOVERY_HOSTFILE"] = os.path.abspath(a.hostfile)
    if a.dry_run:
        print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + (" " if env else "") + shlex.join(cmd))
        return 0
    os.environ.update(env)
    if os.geteuid() == 0:
        os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    sys.stdout.flush()
    if launcher == "horovodrun" and controller == "gloo" and not a.elastic:
        return run_naming_failures(cmd, rank_hosts(check(a.hostfile, a.np), a.np))
    os.execvp(cmd[0], cmd)
    return 127


def rank_hosts(hosts: list[tuple[str, int]], np_: int) -> list[str]:
    """Host of each rank as horovodrun's Gloo launcher assigns them: slots in -H order."""
    return [h for h, n in hosts for _ in range(n)][:np_]


def failed_rank(lines: list[str]) -> tuple[int, int] | None:
    """(rank, exit code) from horovodrun's 'Process name: R' / 'Exit code: C' report."""
    rank = code = None
    for line in lines:
        if line.startswith("Process name: ") and line.split(":", 1)[1].strip().isdigit():
            rank = int(line.split(":", 1)[1])
        elif line.startswith("Exit code: ") and rank is not None:
            code = int(line.split(":", 1)[1])
    return (rank, code) if rank is not None and code is not None else None


def run_naming_failures(cmd: list[str], hosts: list[str]) -> int:
    """Run horovodrun (Gloo), passing its output through; when a worker fails, add one line
    naming its rank and host (horovodrun itself names only the rank)."""
    import signal
    import subprocess
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, f: proc.send_signal(s))
    tail = []
    for line in proc.stderr:
        sys.stderr.write(line)
        tail = (tail + [line.strip()])[-20:]
    rc = proc.wait()
    found = failed_rank(tail) if rc else None
    if found and found[0] < len(hosts):
        r, code = found
        how = f"killed by signal {code - 128}" if code > 128 else f"exit code {code}"
        print(f"{HELP['horovodrun'][0]}: error: rank {r} on host {hosts[r]} failed ({how}); horovodrun ended the job",
              file=sys.stderr, flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
