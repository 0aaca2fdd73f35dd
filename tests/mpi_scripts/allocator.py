"""Run under mpirun: the allocator re-execution (unet/malloc.py), then MPI.

Every start of this script appends ``pid argv`` to $ALLOC_TRACE; after the (possible)
re-execution the rank starts MPI and rank 0 prints one line with what every rank saw."""
import json
import os
import sys

with open(os.environ["ALLOC_TRACE"], "a") as f:
    f.write(f"{os.getpid()} {' '.join(sys.argv[1:])}\n")

from unet import malloc  # noqa: E402

malloc.reexec_with_allocator()

from mpi4py import MPI  # noqa: E402

comm = MPI.COMM_WORLD
with open("/proc/self/maps") as f:
    maps = f.read()
mine = {"rank": comm.Get_rank(), "size": comm.Get_size(), "pid": os.getpid(),
        "launcher_rank": os.environ.get("OMPI_COMM_WORLD_RANK"), "sum": comm.allreduce(comm.Get_rank() + 1),
        "tcmalloc_mapped": "libtcmalloc_minimal" in maps, "user_lib_mapped": os.environ.get("USER_LIB", "?") in maps,
        "LD_PRELOAD": os.environ.get("LD_PRELOAD"), "marker_left": malloc.REEXEC_MARK in os.environ,
        "note": malloc.allocator_note(), "argv": sys.argv[1:]}
every = comm.gather(mine)
if comm.Get_rank() == 0:
    print("RESULT " + json.dumps(every), flush=True)
