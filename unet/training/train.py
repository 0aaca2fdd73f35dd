"""The training loop: Horovod's recipe, one screen.

init -> shard -> scale the LR -> average gradients with ring allreduce ->
start all ranks from rank 0's state -> rank 0 logs, checkpoints and exports.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys

import numpy as np

from unet.distributed import elastic
from unet.training import config
from unet.distributed.ranks import (Watchdog, agree, broadcast_from_root, check_replicas, collective_failure,
                                    init_horovod, is_elastic, launcher_rank, prepare_rank)


def _parse(argv):
    """Parse flags; only rank 0 prints help or errors so N ranks do not print N copies."""
    quiet = launcher_rank() != 0
    sink = io.StringIO()
    with (contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext()), \
         (contextlib.redirect_stderr(sink) if quiet else contextlib.nullcontext()):
        return config.parse_args(argv)


def main(argv: list[str] | None = None, export=None) -> int:
    """Train; ``export(folder, model, meta, formats)``, if given, writes the engines' files at the end."""
    try:
        args = _parse(argv)
    except config.UsageError as e:
        if launcher_rank() == 0:
            print(f"train_hvd.py: error: {e}", file=sys.stderr)
        return 2
    setup = prepare_rank(args.num_threads, args.num_inter_threads, args.blocktime)
    sys.stdout.write(setup.line() + "\n")  # one write: lines of several ranks do not interleave
    sys.stdout.flush()

    from unet.data.sources import open_sources  # h5py only; TensorFlow still not loaded
    error, sources = None, None
    try:
        sources = open_sources(args)
        n_train, global_batch = len(sources[0]), args.batch_size * setup.size
        if global_batch > n_train:  # each rank's shard would be smaller than its batch
            raise config.UsageError(
                f"--batch_size {args.batch_size} x {setup.size} ranks = {global_batch} images per step, "
                f"more than the {n_train} training images in {args.data or '--synthetic data'}")
        if args.resume and not os.path.isfile(args.resume):
            raise config.UsageError(f"--resume {args.resume}: no such checkpoint file")
    except config.UsageError as e:
        error = str(e)
    error = agree(setup.comm, error)  # every rank exits on any rank's error: none is left waiting
    if error:
        if setup.rank == 0:
            print(f"train_hvd.py: error: {error}", file=sys.stderr)
        return 2
    hvd = init_horovod(setup)
    return run(args, setup, hvd, *sources, export=export)


def run(args, setup, hvd, train_src, val_src, info, export=None) -> int:
    import keras
    import tensorflow as tf

    from unet.training import checkpoint
    from unet.data import pipeline
    from unet.training.losses import dice_from_sums, dice_sums, get_loss
    from unet.model import build_unet
    from unet.training.reporting import make_reporter
    from unet.training.schedule import learning_rate

    rank, size = hvd.rank(), hvd.size()
    keras.utils.set_random_seed(args.seed + rank)  # dropout differs per rank; weights come from rank 0
    model = build_unet(info.height, info.width, info.channels, info.regions,
                       use_upsampling=args.use_upsampling, dropout=args.dropout, precision=args.precision,
                       norm=args.norm)
    optimizer = keras.optimizers.Adam(learning_rate=args.learningrate)
    optimizer.build(model.trainable_variables)  # create Adam's slots now, so they can be broadcast
    loss_fn = get_loss(args.loss)

    elastic_run = is_elastic()
    # Rank 0 restores the checkpoint to resume from (if any); every rank learns the outcome.
    # Elastic: no collective may run before the elastic loop (a worker joining later would
    # wait in it forever), so every worker restores for itself and the loop's first sync
    # gives all of them rank 0's state.
    restored = None
    if (rank == 0 or elastic_run) and not args.benchmark:
        path = checkpoint.resume_path(args.logdir, args.resume, args.fresh)
        try:
            restored = path and dict(checkpoint.load_checkpoint(path, model=model, optimizer=optimizer), path=path)
            if restored:
                checkpoint.check_data(restored, info.to_json(), args.data or "--synthetic data")
        except ValueError as e:
            restored = {"error": str(e)}
    if not elastic_run:
        restored = hvd.broadcast_object(restored, root_rank=0)
    if restored and "error" in restored:
        if rank == 0 or elastic_run:
            print(f"train_hvd.py: error: {restored['error']}", file=sys.stderr)
        return 2

    if not elastic_run:
        # Horovod: every rank starts from rank 0's weights and optimizer state, fresh or restored.
        broadcast_from_root(hvd, model, optimizer)

    def lr_at(step: int, size: int, steps: int) -> float:
        # Horovod: the rate grows with the workers (the global batch does), after a warmup.
        return learning_rate(step, base_lr=args.learningrate, num_workers=size,
                             scaling=args.lr_scaling, warmup_steps=int(round(args.warmup_epochs * steps)),
                             decay_steps=args.decay_steps, lr_fraction=args.lr_fraction,
                             constant=args.const_learningrate)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            pred = model(x, training=True)
            loss = loss_fn(y, pred)
        grads = tape.gradient(loss, model.trainable_variables)
        # Horovod: average gradients over all ranks with one fused ring allreduce;
        # the loss and Dice sums ride along so rank 0 logs global figures.
        reduced = hvd.grouped_allreduce(grads + [loss, dice_sums(y, pred)], op=hvd.Average)
        optimizer.apply_gradients(zip(reduced[:-2], model.trainable_variables))
        return reduced[-2], dice_from_sums(reduced[-1])

    if args.benchmark:
        from unet.training import benchmark
        return benchmark.run(args, setup, hvd, model, optimizer, train_step, loss_fn, train_src)

    spec = tf.TensorSpec((None, info.height, info.width, info.channels), tf.float32)

    @tf.function(input_signature=[spec])
    def predict(x):
        return model(x, training=False)

    def validate(rank: int, size: int) -> dict | None:
        if val_src is None or args.no_validation:
            return None
        sums, loss_sum, count = np.zeros((2, info.regions)), 0.0, 0
        for x, y in pipeline.val_batches(val_src, batch_size=args.batch_size, rank=rank, size=size):
            p = predict(x)
            watchdog.beat("a validation batch")
            sums += dice_sums(y, tf.cast(p > 0.5, tf.float32)).numpy()
            loss_sum += float(loss_fn(y, p)) * len(x)
            count += len(x)
        # Horovod: add every rank's share; Dice from pooled sums equals the 1-process value.
        total = hvd.allreduce(np.concatenate([sums.ravel(), [loss_sum, count]]), op=hvd.Sum).numpy()
        return {"dice": dice_from_sums(total[:-2].reshape(2, -1)), "loss": total[-2] / max(total[-1], 1)}

    data = dict(info.to_json(), **({"file": os.path.abspath(args.data)} if args.data else {}))   # unet-export --int8's
    meta = {"data": data, "model": {"use_upsampling": args.use_upsampling,
            "dropout": args.dropout, "norm": args.norm, "loss": args.loss}, "seed": args.seed}
    counters = {}
    if restored:
        counters = {"epoch": restored["epoch"], "step": restored["step"],
                    "step_in_epoch": restored.get("step_in_epoch", 0),
                    "sample": restored.get("sample_in_epoch",
                                           restored.get("step_in_epoch", 0) * restored.get("global_batch", 0))}
    state = (elastic.elastic_state(hvd, model, optimizer, **counters) if elastic_run
             else elastic.FixedState(**counters))
    # Elastic runs leave hung and lost workers to Horovod's driver (its rendezvous may wait for hosts).
    watchdog = Watchdog(0 if elastic_run else args.step_timeout, rank, setup.host)
    reporters, world = {}, []  # this process's reporter per rank it held; world sizes it saw

    def train(state):
        """Epochs from the state's position to the end; re-entered after an elastic reset."""
        rank, size = hvd.rank(), hvd.size()
        global_batch = args.batch_size * size
        steps = pipeline.steps_per_epoch(len(train_src), global_batch, args.steps_per_epoch)
        if rank not in reporters:  # rank 0 of the current world logs (after a reset too)
            reporters[rank] = make_reporter(rank == 0, args, info, size, global_batch, steps)
            if restored or world:
                reporters[rank].keep_best_on_disk()
            if restored and not world:
                reporters[rank].resumed(restored["step"], restored["path"])
        reporter = reporters[rank]
        reporter.world(world[-1] if world else None, size, global_batch, state.step)
        world.append(size)
        run_meta = dict(meta, ranks=size, global_batch=global_batch)
        val = None
        while state.epoch < args.epochs:
            epoch = state.epoch
            ds, _ = pipeline.train_dataset(train_src, batch_size=args.batch_size, rank=rank, size=size,
                                           epoch=epoch, seed=args.seed, cap=args.steps_per_epoch,
                                           augment_on=not args.no_augment, start=state.step_in_epoch,
                                           start_sample=state.sample)
            reporter.epoch_start(epoch)
            epoch_total = pipeline.epoch_samples(len(train_src), global_batch, args.steps_per_epoch)
            for x, y in ds:
                lr = lr_at(state.step, size, steps)
                optimizer.learning_rate.assign(lr)
                loss, dice = train_step(x, y)
                watchdog.beat(f"step {state.step}")
                reporter.step(state.step, epoch, global_batch, float(loss), dice.numpy(), lr)
                if reporter.want_images(state.step):
                    reporter.images(state.step, x.numpy()[:3], y.numpy()[:3], predict(x[:3]).numpy())
                state.step, state.step_in_epoch = state.step + 1, state.step_in_epoch + 1
                state.sample += global_batch
                if args.checkpoint_every and state.step % args.checkpoint_every == 0 \
                        and state.sample < epoch_total:
                    reporter.checkpoint(model, optimizer, run_meta, step=state.step, epoch=epoch,
                                        step_in_epoch=state.step_in_epoch, sample_in_epoch=state.sample)
                if state.step % args.commit_every == 0:
                    state.commit()  # elastic: a point to roll back to, and to admit new workers
            val = validate(rank, size)
            reporter.epoch_end(epoch, state.step, model, optimizer, val, run_meta)
            watchdog.beat(f"epoch {epoch + 1}")
            state.epoch, state.step_in_epoch, state.sample = epoch + 1, 0, 0
            state.commit()
        same, digests, streams = check_replicas(hvd, model)
        reporter.replicas(same, digests, streams)
        return same, val, rank, run_meta

    try:
        same, val, rank, run_meta = state.run(train)
        watchdog.stop()
    except Exception as e:
        if not collective_failure(e):
            raise
        reason = next((l.strip() for l in str(e).splitlines() if "Horovod" in l), str(e))[:300]
        print(f"train_hvd.py: error: rank {rank} on {setup.host}: a collective failed, another rank "
              f"died or stalled ({reason})", file=sys.stderr, flush=True)
        return 1
    reporters[rank].finish(model, run_meta, val, export)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
