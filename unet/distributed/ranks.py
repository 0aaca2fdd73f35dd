"""Per-rank set-up: threads and runtime knobs before TensorFlow starts, then Horovod.

Order matters. ``prepare_rank`` runs before TensorFlow is imported: it learns
where this rank sits (launcher environment, and the CPUs it is bound to, shared
with its peers over MPI), sets OMP_NUM_THREADS / KMP_* and Horovod/Open MPI
defaults in the environment, and only then may TensorFlow and Horovod load.
``init_horovod`` starts Horovod and fixes TensorFlow's thread pools.
"""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

from unet.cli import launcher_rank
from unet.malloc import allocator_note, reexec_with_allocator

# Defaults for a box where ranks get one or a few cores each: Horovod's
# background thread polls every 1 ms and Open MPI busy-waits, both stealing
# the core TensorFlow computes on. Measured on 2 ranks x 1 core (docs/PERFORMANCE.md):
# Horovod/Open MPI defaults 8.27 img/s; cycle 50 ms + yield 11.4-12.0; cycle 5 ms + yield
# 14.5; cycle 2 ms + yield: the same img/s within noise, and the allreduce of the gradients
# 1.2-1.6x a raw MPI_Allreduce of the same bytes against 2.0-2.2x at 5 ms.
# Set only where the user has not set them.
#
# A rank that dies ends the job through its launcher (mpirun, horovodrun, srun
# --kill-on-bad-exit). Ranks that submit different tensors are caught by Horovod's
# stall check: warning after 60 s, shutdown after 300 s (the collective fails, the
# trainer exits non-zero, the launcher ends the job). A rank that hangs outright
# stops Horovod's coordination itself, so the stall check never runs: the trainer's
# ``Watchdog`` (--step_timeout) ends a rank that makes no progress.
RUNTIME_DEFAULTS = {
    "HOROVOD_CYCLE_TIME": "2",            # ms between Horovod's coordination cycles
    "OMPI_MCA_mpi_yield_when_idle": "1",  # Open MPI yields the core while it waits
    "HOROVOD_STALL_CHECK_TIME_SECONDS": "60",
    "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "300",
}

# Horovod 0.28.1 with an explicit fusion threshold *and* cycle time segfaults in hvd.init()
# when an elastic job re-forms its ring after a worker died (3 of 3 tries here; either
# setting alone: 0 of 4). Its default threshold is the same 64 MB, so elastic runs drop it.
ELASTIC_UNSAFE = ("HOROVOD_FUSION_THRESHOLD",)
# Horovod's response cache (negotiation by cache bit instead of by tensor name) does not
# stay consistent over an elastic reset: a worker that joins a running job starts with an
# empty cache, the survivor's bits do not match it, and at the second step after the join the
# ranks run different fused allreduces (Gloo: "op.preamble.length <= op.nbytes"). The new
# worker aborts, is started again, and so on (a 2 -> 1 -> 2 run here: 15 joins, 14 ending at
# their second step; with the cache off, one join that stays). Elastic runs turn it off: the
# gradients go in one grouped allreduce, so that costs one negotiation per step.
ELASTIC_SETTINGS = {"HOROVOD_CACHE_CAPACITY": "0"}

LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "HOROVOD_SIZE")


def is_elastic(env=os.environ) -> bool:
    """Started by horovodrun in elastic mode (--min-np/--max-np): ranks come from its rendezvous."""
    return env.get("HOROVOD_ELASTIC") == "1"


def collective_failure(e: BaseException) -> bool:
    """Did a Horovod collective fail (a peer died or stalled), as opposed to any other error?"""
    import tensorflow as tf
    return isinstance(e, (tf.errors.UnknownError, tf.errors.AbortedError, tf.errors.FailedPreconditionError)) \
        and "Horovod" in str(e)


def under_mpirun(env=os.environ) -> bool:
    return "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env or "PMIX_RANK" in env


def physical_cores(cpus: frozenset, sysfs: str = "/sys/devices/system/cpu") -> int:
    """How many physical cores the logical CPUs ``cpus`` belong to (hyper-threads of one
    core count once), from the kernel's topology files; ``len(cpus)`` where those are
    unreadable."""
    cores = set()
    for c in cpus:
        topo = os.path.join(sysfs, f"cpu{c}", "topology")
        try:
            with open(os.path.join(topo, "physical_package_id")) as f:
                pkg = f.read().strip()
            with open(os.path.join(topo, "core_id")) as f:
                core = f.read().strip()
        except OSError:
            return len(cpus)
        cores.add((pkg, core))
    return len(cores)


def threads_for_rank(host: str, cpus: frozenset, peers: list[tuple[str, frozenset]],
                     cores: int | None = None) -> int:
    """Intra-op threads for a rank bound to ``cpus`` (``cores`` physical cores, default one
    per CPU): its cores divided among the ranks on the same host whose bindings overlap
    (``peers`` includes itself). One thread per core: a KNL rank bound to its socket's
    272 hardware threads gets 68.

    ``--map-by socket`` with one rank per socket -> the socket's cores;
    two unbound ranks on a 2-core box -> 1 each.
    """
    sharing = sum(1 for h, c in peers if h == host and c & cpus) or 1
    return max(1, (len(cpus) if cores is None else cores) // sharing)


def inference_threads(comm=None) -> int:
    """Intra-op threads for an inference process (unet-predict, a rank of unet-evaluate): the
    physical cores it is bound to, divided among the ranks of ``comm`` on its host that share
    them, as the trainer does. Collective when ``comm`` is given."""
    host, cpus = socket.gethostname(), frozenset(os.sched_getaffinity(0))
    peers = comm.allgather((host, cpus)) if comm is not None else [(host, cpus)]
    return threads_for_rank(host, cpus, peers, physical_cores(cpus))


@dataclass
class RankSetup:
    rank: int
    size: int
    host: str
    cpus: frozenset
    cores: int
    intra: int
    inter: int
    blocktime: str
    comm: object = None  # mpi4py communicator when launched by mpirun
    malloc: str = ""     # allocator_note()

    def line(self) -> str:
        c = sorted(self.cpus)
        cpus = f"{c[0]}-{c[-1]}" if c and c == list(range(c[0], c[-1] + 1)) else ",".join(map(str, c))
        return (f"rank {self.rank}/{self.size} host {self.host} cpus [{cpus}] ({len(c)}) cores {self.cores} "
                f"intra {self.intra} inter {self.inter} KMP_BLOCKTIME {self.blocktime}"
                + (f" malloc {self.malloc}" if self.malloc else ""))


def world():
    """COMM_WORLD from mpi4py when launched by mpirun (every command's ranks: the trainer's, unet-convert's,
    unet-evaluate's), else None."""
    if not under_mpirun():
        return None
    import mpi4py
    mpi4py.rc.thread_level = "multiple"  # Horovod needs MPI_THREAD_MULTIPLE
    from mpi4py import MPI
    return MPI.COMM_WORLD


def prepare_rank(num_threads: int, num_inter_threads: int, blocktime: int) -> RankSetup:
    """Decide and export this rank's thread settings; call before importing TensorFlow."""
    if "tensorflow" in sys.modules:
        raise RuntimeError("prepare_rank must run before TensorFlow is imported")
    reexec_with_allocator()              # a bad UNET_MALLOC raises a UsageError before MPI starts: every rank exits
    for k, v in RUNTIME_DEFAULTS.items():
        os.environ.setdefault(k, v)
    if is_elastic():
        for k in ELASTIC_UNSAFE:
            if os.environ.pop(k, None) is not None:
                print(f"note: {k} ignored in an elastic run (Horovod 0.28.1 crashes re-forming the ring with it)",
                      file=sys.stderr)
        for k, v in ELASTIC_SETTINGS.items():
            if os.environ.get(k, v) != v:
                print(f"note: {k}={os.environ[k]} replaced by {v} in an elastic run (a joining worker "
                      f"crashes at its second step otherwise)", file=sys.stderr)
            os.environ[k] = v
    host = socket.gethostname()
    cpus = frozenset(os.sched_getaffinity(0))
    comm = world()
    if comm is not None:
        rank, size = comm.Get_rank(), comm.Get_size()
        peers = comm.allgather((host, cpus))
    else:
        rank = launcher_rank()
        size = int(next((os.environ[k] for k in LAUNCHER_SIZE_VARS if k in os.environ), 1))
        local = int(os.environ.get("HOROVOD_LOCAL_SIZE", "1"))
        peers = [(host, cpus)] * local  # no channel yet: assume local ranks share the CPUs
    cores = physical_cores(cpus)
    intra = num_threads or threads_for_rank(host, cpus, peers, cores)
    bt = "infinite" if blocktime > 1000 else str(blocktime)
    os.environ["OMP_NUM_THREADS"] = str(intra)
    os.environ["KMP_BLOCKTIME"] = bt
    os.environ.setdefault("KMP_AFFINITY", "granularity=fine,compact,1,0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return RankSetup(rank, size, host, cpus, cores, intra, num_inter_threads, bt, comm, malloc=allocator_note())


def agree(comm, error: str | None) -> str | None:
    """All ranks learn the first error any rank found (rank order), so all exit together."""
    if comm is None:
        return error
    errors = comm.allgather(error)
    return next((e for e in errors if e), None)


def init_horovod(setup: RankSetup):
    """Start Horovod and size TensorFlow's thread pools; returns the ``hvd`` module."""
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(setup.intra)
    tf.config.threading.set_inter_op_parallelism_threads(setup.inter)
    import horovod.tensorflow as hvd
    hvd.init()
    if not is_elastic() and (hvd.rank() != setup.rank or hvd.size() != setup.size):
        raise RuntimeError(f"Horovod sees rank {hvd.rank()}/{hvd.size()}, launcher said "
                           f"{setup.rank}/{setup.size}")
    return hvd


def dropout_states(model) -> list:
    """The state variables of the model's dropout random streams (Keras seed generators:
    ``[seed, draws]``). They sit in ``model.variables`` but are not weights."""
    return [layer.seed_generator.state for layer in model.layers if hasattr(layer, "seed_generator")]


def broadcast_from_root(hvd, model, optimizer) -> None:
    """Every rank takes rank 0's weights and optimizer state (fresh, restored, or after an
    elastic reset). Dropout streams keep this rank's own seed and take rank 0's draw count:
    ranks drop different units, and a resumed run draws what an uninterrupted one would."""
    import numpy as np
    own = [np.array(v.numpy()) for v in dropout_states(model)]
    # Keras 3 variables wrap a tf.Variable in .value, which is what Horovod broadcasts.
    hvd.broadcast_variables([v.value for v in model.variables] + [v.value for v in optimizer.variables],
                            root_rank=0)
    for v, mine in zip(dropout_states(model), own):
        v.assign(np.array([mine[0], v.numpy()[1]], dtype=mine.dtype))


def weights_digest(variables) -> str:
    """sha256 over the bytes of ``variables`` (order-sensitive)."""
    import hashlib
    h = hashlib.sha256()
    for v in variables:
        h.update(v.numpy().tobytes())
    return h.hexdigest()


def check_replicas(hvd, model) -> tuple[bool, list[str], int | None]:
    """Do all ranks hold bit-identical weights, and how many distinct dropout seeds do they
    use (None without dropout)? Collective: every rank calls it."""
    states = dropout_states(model)
    gathered = hvd.allgather_object((weights_digest(model.weights), tuple(int(v.numpy()[0]) for v in states)))
    digests = [d for d, _ in gathered]
    return len(set(digests)) == 1, digests, (len({s for _, s in gathered}) if states else None)


class Watchdog:
    """Ends this rank (exit 3, one line naming rank and host) when ``beat`` has not been
    called for ``timeout`` seconds: a rank waiting on a hung peer would otherwise wait
    forever; its exit makes the launcher end the whole job. ``timeout`` 0 disables it."""

    def __init__(self, timeout: float, rank: int, host: str):
        import threading
        import time
        self.timeout, self.rank, self.host, self._time = timeout, rank, host, time.monotonic
        self.last, self.what = self._time(), "start-up"
        self._stop = threading.Event()
        if timeout > 0:
            threading.Thread(target=self._watch, daemon=True, name="unet-watchdog").start()

    def beat(self, what: str) -> None:
        self.last, self.what = self._time(), what

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(self.timeout / 4, 5.0)):
            idle = self._time() - self.last
            if idle > self.timeout:
                sys.stderr.write(f"train_hvd.py: error: rank {self.rank} on {self.host}: no progress for "
                                 f"{idle:.0f} s after {self.what} (--step_timeout {self.timeout:g}); "
                                 f"a rank is hung, ending the job\n")
                sys.stderr.flush()
                os._exit(3)

