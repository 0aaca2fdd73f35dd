"""The training loop: Horovod's recipe, one screen.

set-up: init -> shard -> build -> start every rank from rank 0's state (restored or fresh);
loop: scale the LR -> average gradients with ring allreduce -> validate and keep each epoch;
finish: rank 0 writes the model, then the inference engines' files.
Each piece lives where its concern does: the compiled steps in ``steps``, validation in ``validation``,
restoring in ``checkpoint``, the elastic or fixed progress in ``unet.distributed.elastic``, what is
logged in ``reporting`` and what is kept on disk in ``keeper``.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
from dataclasses import dataclass, field, replace

from unet.cli import launcher_rank
from unet.distributed import elastic
from unet.distributed.ranks import (
    Watchdog,
    agree,
    check_replicas,
    collective_failure,
    init_horovod,
    is_elastic,
    prepare_rank,
)
from unet.errors import UsageError
from unet.training import config
from unet.training.schedule import learning_rate


def _parse(argv):
    """Parse flags; only rank 0 prints help or errors so N ranks do not print N copies."""
    quiet = launcher_rank() != 0
    sink = io.StringIO()
    with (contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext()), \
         (contextlib.redirect_stderr(sink) if quiet else contextlib.nullcontext()):
        return config.parse_args(argv)


def main(argv: list[str] | None = None, export=None) -> int:
    """Train; ``export(folder, model, meta, formats)``, if given, writes the engines' files at the end.
    A bad flag, file or checkpoint raises UsageError on every rank (the command line reports it once)."""
    opts = config.options(_parse(argv))   # past this line the flags are typed options, not a namespace
    setup = prepare_rank(opts.num_threads, opts.num_inter_threads, opts.blocktime)
    sys.stdout.write(setup.line() + "\n")  # one write: lines of several ranks do not interleave
    sys.stdout.flush()

    from unet.data.sources import open_sources  # h5py only; TensorFlow still not loaded
    error, sources = None, None
    try:
        sources = open_sources(opts.data)
        n_train, global_batch = len(sources[0]), opts.batch_size * setup.size
        if global_batch > n_train:  # each rank's shard would be smaller than its batch
            raise UsageError(
                f"--batch_size {opts.batch_size} x {setup.size} ranks = {global_batch} images per step, "
                f"more than the {n_train} training images in {opts.data_label}")
        if opts.resume and not os.path.isfile(opts.resume):
            raise UsageError(f"--resume {opts.resume}: no such checkpoint file")
    except UsageError as e:
        error = str(e)
    error = agree(setup.comm, error)  # every rank exits on any rank's error: none is left waiting
    if error:
        raise UsageError(error)
    hvd = init_horovod(setup)
    return run(opts, setup, hvd, *sources, export=export)


def run(opts: config.TrainOptions, setup, hvd, train_src, val_src, info, export=None) -> int:
    import keras

    from unet.data.sources import foreground_share
    from unet.model import build_unet, prior_bias
    from unet.training import checkpoint, convgrad
    from unet.training.losses import get_loss
    from unet.training.steps import compile_steps

    # -- set-up: the model, and every rank from the same state
    rank, elastic_run = hvd.rank(), is_elastic()
    keras.utils.set_random_seed(opts.seed + rank)  # dropout differs per rank; weights come from rank 0
    m = opts.model
    share = foreground_share(train_src) if m.head_bias == "prior" else None
    model = build_unet(info.height, info.width, info.channels, info.regions,
                       use_upsampling=m.use_upsampling, dropout=m.dropout, precision=m.precision,
                       norm=m.norm, activation=m.activation, head_bias=share and prior_bias(share))
    conv_grad = convgrad.resolve(opts.conv_grad)   # auto: by whether TensorFlow runs oneDNN here
    if conv_grad == "forward":
        convgrad.install(model)
    opts = replace(opts, log=replace(opts.log, conv_grad=f"{conv_grad} ({opts.conv_grad})"))
    optimizer = keras.optimizers.Adam(learning_rate=opts.schedule.learningrate)
    optimizer.build(model.trainable_variables)  # create Adam's slots now, so they can be broadcast
    loss_fn = get_loss(m.loss, m.bce_weight)
    path = None if opts.bench else checkpoint.resume_path(opts.logdir, opts.resume, opts.fresh)
    restored = checkpoint.restore_or_broadcast(hvd, model, optimizer, path, info.to_json(), opts.data_label,
                                               elastic_run)
    steps = compile_steps(hvd, model, optimizer, loss_fn, clipnorm=opts.clipnorm)
    if opts.bench:
        from unet.training import benchmark
        return benchmark.run(opts.bench, setup, hvd, model, optimizer, steps.train, loss_fn, train_src)
    state = elastic.start_state(hvd, model, optimizer, **checkpoint.position(restored))
    # Elastic runs leave hung and lost workers to Horovod's driver (its rendezvous may wait for hosts).
    watchdog = Watchdog(0 if elastic_run else opts.step_timeout, rank, setup.host)
    job = Job(opts, hvd, model, optimizer, steps, loss_fn, train_src, val_src, info, watchdog, restored, share)

    # -- the loop: epochs to the end, entered again after an elastic reset
    try:
        same, val, rank, meta = state.run(functools.partial(epochs, job))
        watchdog.stop()
    except Exception as e:
        if not collective_failure(e):
            raise
        reason = next((l.strip() for l in str(e).splitlines() if "Horovod" in l), str(e))[:300]
        print(f"train_hvd.py: error: rank {rank} on {setup.host}: a collective failed, another rank "
              f"died or stalled ({reason})", file=sys.stderr, flush=True)
        return 1

    # -- finish: rank 0 writes the model (the best validation epoch's weights), then the engines' files
    reporter, keeper = job.outputs[rank]
    kept = keeper.final_model(model, meta, val)
    if kept and opts.export_formats and export:   # the same weights for the inference engines
        export(kept.folder, model, kept.meta, list(opts.export_formats))
    reporter.finish(kept.val if kept else None)
    return 0 if same else 1


@dataclass
class Job:
    """What the epochs work with, on this rank."""
    opts: config.TrainOptions
    hvd: object
    model: object
    optimizer: object
    steps: object                # unet.training.steps.Steps: the compiled training step and forward pass
    loss_fn: object
    train_src: object
    val_src: object              # None: no validation split
    info: object                 # unet.data.sources.DataInfo
    watchdog: Watchdog
    restored: dict | None        # the checkpoint the run started from
    share: list | None = None    # each region's foreground share (--head_bias prior), for model.json
    outputs: dict = field(default_factory=dict)   # this process's (reporter, keeper) per rank it has held
    worlds: list = field(default_factory=list)    # the numbers of workers it has seen


def epochs(job: Job, state) -> tuple:
    """Epochs from the state's position to the end; (same weights on every rank, the last validation,
    this rank, the metadata of the run)."""
    a, hvd = job.opts, job.hvd
    rank, size = hvd.rank(), hvd.size()
    global_batch = a.batch_size * size
    reporter, keeper = outputs(job, rank, size, global_batch, state.step)
    meta = run_meta(a, job.info, size, global_batch, job.share)
    val = None
    while state.epoch < a.epochs:
        epoch = state.epoch
        one_epoch(job, state, reporter, keeper, meta, global_batch)
        refresh_statistics(job, epoch)
        val = validation(job)
        path, best = keeper.epoch_end(job.model, job.optimizer, meta, step=state.step, epoch=epoch + 1, val=val)
        reporter.epoch_end(epoch, state.step, job.model, val, path, best)
        job.watchdog.beat(f"epoch {epoch + 1}")
        state.epoch, state.step_in_epoch, state.sample = epoch + 1, 0, 0
        state.commit()
    same, digests, streams = check_replicas(hvd, job.model)
    reporter.replicas(same, digests, streams)
    return same, val, rank, meta


def one_epoch(job: Job, state, reporter, keeper, meta: dict, global_batch: int) -> None:
    """The optimizer steps of epoch ``state.epoch``, from the state's position in it."""
    from unet.data import pipeline
    a, epoch, size = job.opts, state.epoch, job.hvd.size()
    n = epoch_length(job)
    per_epoch = pipeline.steps_per_epoch(n, global_batch, a.steps_per_epoch)
    epoch_total = pipeline.epoch_samples(n, global_batch, a.steps_per_epoch)
    ds = epoch_batches(job, epoch, a.steps_per_epoch, start=state.step_in_epoch, start_sample=state.sample)
    reporter.epoch_start(epoch)
    for x, y in ds:
        lr = lr_at(a.schedule, state.step, size, per_epoch)
        job.optimizer.learning_rate.assign(lr)
        loss, dice = job.steps.train(x, y)
        job.watchdog.beat(f"step {state.step}")
        reporter.step(state.step, epoch, global_batch, float(loss), dice.numpy(), lr)
        if reporter.want_images(state.step):
            reporter.images(state.step, x.numpy()[:3], y.numpy()[:3], job.steps.predict(x[:3]).numpy())
        state.step, state.step_in_epoch = state.step + 1, state.step_in_epoch + 1
        state.sample += global_batch
        if a.checkpoint_every and state.step % a.checkpoint_every == 0 and state.sample < epoch_total:
            keeper.latest(job.model, job.optimizer, meta, step=state.step, epoch=epoch,
                          step_in_epoch=state.step_in_epoch, sample_in_epoch=state.sample)
        if state.step % a.commit_every == 0:
            state.commit()  # elastic: a point to roll back to, and to admit new workers


def epoch_batches(job: Job, epoch: int, cap: int, start: int = 0, start_sample: int = 0, augment: bool = True):
    """This rank's batches of ``epoch`` (augmented as the flags say, unless ``augment`` is False), from ``start``,
    at most ``cap`` (0: all)."""
    from unet.data import pipeline
    a = job.opts
    ds, _ = pipeline.train_dataset(job.train_src, batch_size=a.batch_size, rank=job.hvd.rank(), size=job.hvd.size(),
                                   epoch=epoch, seed=a.seed, cap=cap, augment_on=a.augment and augment, start=start,
                                   start_sample=start_sample, foreground_fraction=a.data.foreground_fraction,
                                   background_fraction=a.data.background_fraction,
                                   aug_scale=a.aug_scale, aug_shift=a.aug_shift, aug_gamma=a.aug_gamma,
                                   aug_bias=a.aug_bias)
    return ds


def refresh_statistics(job: Job, epoch: int) -> None:
    """--norm batch: the moving statistics from the epoch's first --bn_batches batches at its final weights,
    unaugmented: the images inference will see (collective), so validation, the checkpoint and the exported
    model use them."""
    if job.steps.batch_stats is None or not job.opts.bn_batches:
        return
    from unet.training.steps import refresh_statistics as refresh
    cap = min(job.opts.bn_batches, job.opts.steps_per_epoch or job.opts.bn_batches)
    refresh(job.hvd, job.model, job.steps.batch_stats, epoch_batches(job, epoch, cap, augment=False))
    job.watchdog.beat("batch statistics")


def epoch_length(job: Job) -> int:
    """Samples an epoch covers before ``--steps_per_epoch``: the training split, or with
    ``--background_fraction`` < 1 its tumour slices and that share of the others."""
    from unet.data.pipeline import epoch_length as length
    src, fraction = job.train_src, job.opts.data.background_fraction
    return len(src) if fraction >= 1 else length(len(src), len(src.tumour_slices()), fraction)


def lr_at(a: config.ScheduleOptions, step: int, size: int, steps: int) -> float:
    # Horovod: the rate grows with the workers (the global batch does), after a warmup.
    return learning_rate(step, base_lr=a.learningrate, num_workers=size, scaling=a.lr_scaling,
                         warmup_steps=int(round(a.warmup_epochs * steps)), decay_steps=a.decay_steps,
                         lr_fraction=a.lr_fraction, constant=a.const_learningrate)


def validation(job: Job) -> dict | None:
    """The epoch's validation over all ranks (collective), or None without a validation split."""
    if job.val_src is None or not job.opts.validation:
        return None
    from unet.training.validation import validate
    return validate(job.hvd, job.steps.predict, job.loss_fn, job.val_src, batch_size=job.opts.batch_size,
                    regions=job.info.regions, beat=job.watchdog.beat)


def outputs(job: Job, rank: int, size: int, global_batch: int, step: int) -> tuple:
    """This rank's reporter and keeper: made the first time this process holds ``rank`` (rank 0 of the
    current world logs and keeps, after an elastic reset too), told where the run stands."""
    from unet.data.pipeline import steps_per_epoch
    from unet.training.keeper import make_keeper
    from unet.training.reporting import make_reporter
    a = job.opts
    if rank not in job.outputs:
        steps = steps_per_epoch(epoch_length(job), global_batch, a.steps_per_epoch)
        reporter = make_reporter(rank == 0, a.log, job.info, size, global_batch, steps)
        keeper = make_keeper(rank == 0, a.logdir, a.keep_checkpoints, a.epochs)
        if job.restored or job.worlds:
            keeper.continue_run()        # the best validation so far is the one on disk
        if job.restored and not job.worlds:
            reporter.resumed(job.restored["step"], job.restored["path"])
        job.outputs[rank] = reporter, keeper
    reporter, keeper = job.outputs[rank]
    reporter.world(job.worlds[-1] if job.worlds else None, size, global_batch, step)
    job.worlds.append(size)
    return reporter, keeper


def run_meta(a: config.TrainOptions, info, size: int, global_batch: int, share: list | None = None) -> dict:
    """What model.json and each checkpoint record of the run: the data (and its file, which unet-export
    --int8 calibrates on), the model's flags, the seed, the ranks."""
    data = dict(info.to_json(), **({"file": os.path.abspath(a.data.data)} if a.data.data else {}))
    m = a.model
    model = {"use_upsampling": m.use_upsampling, "dropout": m.dropout, "norm": m.norm, "activation": m.activation,
             "loss": m.loss, "head_bias": m.head_bias, **({"foreground_share": share} if share else {}),
             **({"bn_batches": a.bn_batches} if m.norm == "batch" else {})}
    return {"data": data, "model": model, "seed": a.seed, "ranks": size, "global_batch": global_batch}
