"""Run under mpirun: Horovod allreduce of known values and a broadcast from rank 0."""
import json

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

hvd.init()
r, n = hvd.rank(), hvd.size()
mine = tf.constant(np.arange(4, dtype=np.float32) + 10.0 * r)      # rank r holds [10r, 10r+1, ...]
total = hvd.allreduce(mine, op=hvd.Sum).numpy()
mean = hvd.allreduce(mine, op=hvd.Average).numpy()
seed = tf.Variable(np.full(3, 100.0 + r, dtype=np.float32))          # differs per rank until broadcast
hvd.broadcast_variables([seed], root_rank=0)
mine = {"rank": r, "size": n, "sum": total.tolist(), "mean": mean.tolist(), "bcast": seed.numpy().tolist()}
every = hvd.allgather_object(mine)          # one line from rank 0: ranks' stdout may interleave
if r == 0:
    print("RESULT " + json.dumps(every), flush=True)
