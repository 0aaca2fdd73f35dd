"""Training progress that survives workers coming and going (Elastic Horovod).

The training loop keeps its position (epoch, global step, samples done in the
epoch) in a state object and calls ``state.commit()`` at known points: every
``--commit_every`` steps and after each epoch.

- Fixed world (``mpirun``, ``horovodrun`` without ``--min-np``): ``FixedState``;
  commit does nothing and the loop runs once.
- Elastic world (``horovodrun --min-np/--max-np --host-discovery-script``, which
  sets ``HOROVOD_ELASTIC=1``): ``ElasticState`` copies the model, the optimizer
  and the counters to host memory at each commit. When a worker dies, the
  collective in flight fails on the survivors: they roll back to the last
  commit, Horovod re-forms the ring with the workers left and training goes
  on. When the discovery script lists a new slot, Horovod starts a worker
  there; at the next commit every worker stops, the ring re-forms, and the new
  worker receives rank 0's state (``sync``) before the loop continues.

Keras 3 variables wrap a ``tf.Variable`` in ``.value``: that is what is
broadcast and assigned (Horovod's own ``TensorFlowKerasState`` predates Keras 3).
"""
from __future__ import annotations

from unet.distributed.ranks import broadcast_from_root, collective_failure, is_elastic

COUNTERS = ("epoch", "step", "sample", "step_in_epoch")


class FixedState:
    """Progress of a run whose workers never change: commit is free, run calls once."""

    def __init__(self, **counters):
        for k in COUNTERS:
            setattr(self, k, counters.get(k, 0))

    def commit(self) -> None:
        pass

    def run(self, fn):
        return fn(self)


def start_state(hvd, model, optimizer, **counters):
    """The run's progress from ``counters`` (``COUNTERS``; missing ones 0): an elastic state when an
    elastic launcher started this worker, else a fixed one."""
    return elastic_state(hvd, model, optimizer, **counters) if is_elastic() else FixedState(**counters)


def elastic_state(hvd, model, optimizer, **counters):
    """An Elastic Horovod state for a Keras 3 model + optimizer and the loop's counters."""
    import numpy as np
    from horovod.common.elastic import ObjectState, run_fn
    from horovod.common.exceptions import HorovodInternalError

    def variables():
        return [v.value for v in model.variables] + [v.value for v in optimizer.variables]

    def as_internal_error(fn):
        """A collective that failed because a peer went away -> HorovodInternalError
        (which makes Horovod roll back to the last commit and re-form the ring)."""
        def call(*a, **k):
            try:
                return fn(*a, **k)
            except Exception as e:
                if not collective_failure(e):
                    raise
                raise HorovodInternalError(e) from e
        return call

    class ElasticState(ObjectState):
        def __init__(self):
            super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank,
                             **{k: counters.get(k, 0) for k in COUNTERS})
            self._save_vars()

        def _save_vars(self):
            self._saved = [np.array(v.numpy()) for v in variables()]

        def save(self):
            self._save_vars()
            super().save()

        def restore(self):
            for v, saved in zip(variables(), self._saved):
                v.assign(saved)
            super().restore()

        @as_internal_error
        def sync(self):
            broadcast_from_root(hvd, model, optimizer)
            self._save_vars()
            super().sync()

        def run(self, fn):
            def reset():
                hvd.shutdown()
                hvd.init()
            return run_fn(as_internal_error(fn), reset)(self)

    return ElasticState()
