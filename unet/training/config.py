"""Command-line flags of the trainer: names and meanings kept from the seed.

Pure: parsing and validation only, no TensorFlow, no MPI. Validation that needs
the file system (does --data exist?) lives in ``unet.data.sources``. The flags stop
here: ``options(args)`` turns the parsed namespace into a frozen ``TrainOptions`` (model, schedule,
data, logging, benchmark: one typed group each), and nothing past the command line sees the namespace.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from unet.cli import add_threads_flag, threads_error
from unet.data.pipeline import AUG_SCALE, AUG_SHIFT, foreground_per_batch
from unet.data.sources import DEFAULT_DATA, DataOptions
from unet.errors import UsageError
from unet.model import precision_error
from unet.modelfolder import EXPORT_FORMATS, export_missing
from unet.training.benchmark import BenchOptions
from unet.training.reporting import LogOptions

# Seed defaults (Intel's distributed U-Net, settings.py / settings_dist.py).
SEED_LEARNINGRATE = 0.0005
SEED_DECAY_STEPS = 150
SEED_LR_FRACTION = 0.25
SEED_BATCH_SIZE = 128
SEED_EPOCHS = 10
SEED_BLOCKTIME = 0
SEED_INTER_THREADS = 2
BN_BATCHES = 32   # --bn_batches: batches per rank whose statistics --norm batch takes at each epoch's end
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_hvd.py",
        description="Train the 2D U-Net on BraTS slices with Horovod ring-allreduce "
                    "(launch with mpirun or horovodrun; one process per rank).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--use_upsampling", action="store_true",
                   help="decoder uses UpSampling2D instead of 2x2 stride-2 Conv2DTranspose")
    g.add_argument("--norm", choices=("none", "group", "instance", "batch"), default="none",
                   help="normalisation after each 3x3 convolution, before its ReLU: group (8 groups) or "
                        "instance normalisation (statistics of each slice), batch normalisation (of each "
                        "rank's batch in training, their moving averages, equal on every rank, at inference); "
                        "none is the seed's network")
    g.add_argument("--bn_batches", type=int, default=BN_BATCHES,
                   help="--norm batch: at each epoch's end, set the moving statistics to the mean of the batch "
                        "statistics of the epoch's first N batches per rank, unaugmented, taken at the epoch's "
                        "final weights and averaged over the ranks, before validation and the checkpoint (the moving "
                        "averages follow the last ~10 batches at changing weights, and validation Dice swung with "
                        "them, see docs/TRAINING.md); 0 = keep the moving averages")
    g.add_argument("--dropout", type=float, default=0.0,
                   help="dropout rate after the first convolution of levels 3 and 4 (fraction; the seed's "
                        "0.2 made the inference-mode network disagree with the trained one and validation "
                        "Dice fall between epochs, see docs/TRAINING.md)")
    g.add_argument("--activation", choices=("relu", "leaky_relu"), default="relu",
                   help="after each 3x3 convolution: relu (the seed's) or leaky_relu (slope 0.01: a unit "
                        "never stops passing gradient)")
    g.add_argument("--head_bias", choices=("zero", "prior"), default="prior",
                   help="initial bias of the sigmoid head: prior: log(p/(1-p)) of each region's foreground "
                        "share p in the training masks, so the untrained network predicts that share and "
                        "does not fall into all-background at a high rate or a small batch (docs/TRAINING.md, "
                        "robustness); zero: the seed's, 0.5 everywhere at the start")
    g.add_argument("--loss", choices=("region_dice_bce", "dice", "dice_bce", "bce"), default="region_dice_bce",
                   help="region_dice_bce: mean over the regions present in the batch of -log(soft Dice) "
                        "(each region pooled over batch and pixels) plus binary cross-entropy, so every "
                        "region learns; dice: -log((2*sum(y*p)+1)/(sum(y)+sum(p)+1)) pooled over the batch "
                        "and all regions (the seed's; the whole tumour dominates it, and at the seed's rate "
                        "it can collapse to all-background); dice_bce: that plus binary cross-entropy; "
                        "bce: cross-entropy only. See docs/TRAINING.md")
    g.add_argument("--bce_weight", type=float, default=1.0,
                   help="weight of the binary cross-entropy term in dice_bce and region_dice_bce (the Dice "
                        "term has weight 1)")
    g.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32, or bf16: Keras mixed_bfloat16 (float32 variables, bfloat16 compute, "
                        "float32 sigmoid output, so losses and metrics stay float32)")

    g = p.add_argument_group("threads (per rank, set before TensorFlow starts)")
    add_threads_flag(g, "intra-op threads and OMP_NUM_THREADS per rank")
    g.add_argument("--num_inter_threads", type=int, default=SEED_INTER_THREADS,
                   help="inter-op threads per rank")
    g.add_argument("--blocktime", type=int, default=SEED_BLOCKTIME,
                   help="KMP_BLOCKTIME in ms (over 1000 means 'infinite')")

    g = p.add_argument_group("training")
    g.add_argument("--batch_size", type=int, default=SEED_BATCH_SIZE,
                   help="images per rank per step (global batch = batch_size x ranks)")
    g.add_argument("--epochs", type=int, default=SEED_EPOCHS, help="passes over the training split")
    g.add_argument("--steps_per_epoch", type=int, default=0,
                   help="cap on optimizer steps per epoch; 0 = ceil(train images / global batch)")
    g.add_argument("--learningrate", type=float, default=SEED_LEARNINGRATE,
                   help="base Adam learning rate for one worker (scaled by --lr_scaling)")
    g.add_argument("--clipnorm", type=float, default=0.0,
                   help="clip the averaged gradients to this global L2 norm before each update; 0 = no clipping")
    g.add_argument("--conv_grad", choices=("auto", "tf", "forward"), default="auto",
                   help="how the 3x3 convolutions' gradients are computed: tf (TensorFlow's gradient ops), "
                        "forward (both gradients as forward convolutions: the same sums in another order), or "
                        "auto: forward where TensorFlow leaves oneDNN off (AVX2 CPUs), tf where it runs oneDNN "
                        "(docs/PERFORMANCE.md gives the figures per CPU kind)")
    g.add_argument("--const_learningrate", action="store_true",
                   help="no decay: keep the (scaled) learning rate constant after warmup")
    g.add_argument("--decay_steps", type=int, default=SEED_DECAY_STEPS,
                   help="global optimizer steps over which the rate falls to lr_fraction of itself")
    g.add_argument("--lr_fraction", type=float, default=SEED_LR_FRACTION,
                   help="fraction of the rate left after decay_steps (continuous exponential decay)")
    g.add_argument("--lr_scaling", choices=("linear", "sqrt", "none"), default="linear",
                   help="scale the base rate by workers (linear), sqrt(workers), or not at all")
    g.add_argument("--warmup_epochs", type=float, default=1.0,
                   help="epochs over which the rate ramps from the 1-worker rate to the scaled "
                        "rate (Goyal et al. 2017); 0 = no warmup")
    g.add_argument("--seed", type=int, default=816, help="seed for weights, data order, augmentation")
    g.add_argument("--no_augment", action="store_true",
                   help="no flips/rotations/intensity jitter on training images")
    g.add_argument("--aug_scale", type=float, default=AUG_SCALE,
                   help="intensity augmentation: each channel of a training image times a factor drawn "
                        "from [1 - S, 1 + S] (default: %(default)s)")
    g.add_argument("--aug_shift", type=float, default=AUG_SHIFT,
                   help="intensity augmentation: plus an offset drawn from [-T, T] per channel, in the "
                        "z-scored units of unet-convert (default: %(default)s)")
    g.add_argument("--aug_gamma", type=float, default=0.0,
                   help="intensity augmentation: probability that a channel of a training image goes through a "
                        "gamma curve over its head's range (gamma in [0.7, 1.5], mean and spread kept; "
                        "nnU-Net's); 0 = none (default: %(default)s)")
    g.add_argument("--aug_bias", type=float, default=0.0,
                   help="intensity augmentation: each channel of a training image as if met by a smooth bias "
                        "field (the exp of a quadratic in x, y with coefficients in [-B, B]) before the "
                        "z-scoring; 0 = none (default: %(default)s)")
    g.add_argument("--foreground_fraction", type=float, default=0.0,
                   help="share of each rank's batch drawn from the training slices that hold tumour "
                        "(round(F x batch_size) of them; nnU-Net's oversampling), the rest from all slices "
                        "in the epoch's order; 0 = off, every batch in that order (docs/TRAINING.md)")
    g.add_argument("--background_fraction", type=float, default=1.0,
                   help="share of the training slices without tumour that each epoch covers, drawn anew each "
                        "epoch (every tumour slice is in every epoch); 1 = all of them, the whole file each "
                        "epoch; 0.1 on a unet-convert --slices brain file: the tumour-slice file's mix, with "
                        "other tumour-free slices each epoch (docs/TRAINING.md)")

    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="HDF5 file written by unet-convert, or a folder holding the seed's "
                        f"imgs_train.npy, msks_train.npy, imgs_test.npy, msks_test.npy [{DEFAULT_DATA} "
                        "unless --synthetic]")
    g.add_argument("--fold", type=int, default=None,
                   help="cross-validation, with --data converted by unet-convert --folds K: train on the "
                        "other folds, validate on every slice of fold k's cases (k in 0..K-1); default: the "
                        "file's train/val split")
    g.add_argument("--synthetic", action="store_true",
                   help="in-memory synthetic images (bright blobs to segment); no file needed")
    g.add_argument("--synthetic_size", type=int, default=DataOptions.synthetic_size,
                   help="--synthetic: image side (pixels)")
    g.add_argument("--synthetic_channels", type=int, default=DataOptions.synthetic_channels,
                   help="--synthetic: input channels")
    g.add_argument("--synthetic_regions", type=int, default=DataOptions.synthetic_regions,
                   help="--synthetic: output regions")
    g.add_argument("--synthetic_train", type=int, default=DataOptions.synthetic_train,
                   help="--synthetic: training images")
    g.add_argument("--synthetic_val", type=int, default=DataOptions.synthetic_val,
                   help="--synthetic: validation images")

    g = p.add_argument_group("benchmark")
    g.add_argument("--benchmark", action="store_true",
                   help="time training steps on in-memory synthetic data and print one 'benchmark:' line")
    g.add_argument("--warmup_steps", type=int, default=5, help="--benchmark: untimed steps first")
    g.add_argument("--bench_steps", type=int, default=20, help="--benchmark: timed steps")

    g = p.add_argument_group("logging and output (rank 0 only)")
    g.add_argument("--logdir", default="./logs",
                   help="TensorBoard events, training.log, checkpoints and the exported model")
    g.add_argument("--log_every", type=int, default=10,
                   help="steps between scalar summaries / training.log lines")
    g.add_argument("--image_every", type=int, default=100,
                   help="steps between image summaries (input, ground truth, prediction)")
    g.add_argument("--no_validation", action="store_true", help="skip validation at epoch ends")
    g.add_argument("--checkpoint_every", type=int, default=0,
                   help="steps between checkpoints (besides every epoch end); 0 = epoch ends only")
    g.add_argument("--commit_every", type=int, default=10,
                   help="elastic runs (horovodrun --min-np/--max-np): keep the training state in "
                        "memory every N steps and at epoch ends; a lost worker costs at most N steps")
    g.add_argument("--step_timeout", type=float, default=600,
                   help="seconds a rank may go without finishing a step (or validation batch) before it "
                        "ends the job: a hung peer must not leave the others waiting forever; 0 = off")
    g.add_argument("--keep_checkpoints", type=int, default=3, help="latest checkpoints kept (plus best.npz)")
    g.add_argument("--resume", default=None,
                   help="checkpoint to resume from; default: the latest under --logdir, if any")
    g.add_argument("--fresh", action="store_true", help="ignore checkpoints under --logdir, start from scratch")
    g.add_argument("--export", default="openvino,onnx",
                   help="formats written beside model.keras at the end, comma-separated: openvino (model.xml + "
                        "model.bin), onnx (model.onnx), saved_model; 'none' for model.keras only "
                        "(unet-export writes them later)")
    return p


def validate(a: argparse.Namespace) -> argparse.Namespace:
    """Reject impossible flag values with a message naming the flag."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise UsageError(msg)

    need(a.batch_size >= 1, f"--batch_size must be >= 1 (got {a.batch_size})")
    need(a.epochs >= 1, f"--epochs must be >= 1 (got {a.epochs})")
    need(a.steps_per_epoch >= 0, f"--steps_per_epoch must be >= 0 (got {a.steps_per_epoch})")
    need(a.learningrate > 0, f"--learningrate must be > 0 (got {a.learningrate})")
    need(a.decay_steps >= 1, f"--decay_steps must be >= 1 (got {a.decay_steps})")
    need(0 < a.lr_fraction <= 1, f"--lr_fraction must be in (0, 1] (got {a.lr_fraction})")
    need(a.warmup_epochs >= 0, f"--warmup_epochs must be >= 0 (got {a.warmup_epochs})")
    need(a.bce_weight >= 0, f"--bce_weight must be >= 0 (got {a.bce_weight})")
    need(a.bn_batches >= 0, f"--bn_batches must be >= 0 (got {a.bn_batches})")
    need(a.clipnorm >= 0, f"--clipnorm must be >= 0 (got {a.clipnorm})")
    need(0 <= a.aug_scale < 1, f"--aug_scale must be in [0, 1) (got {a.aug_scale})")
    need(a.aug_shift >= 0, f"--aug_shift must be >= 0 (got {a.aug_shift})")
    need(0 <= a.aug_gamma <= 1, f"--aug_gamma must be a probability in [0, 1] (got {a.aug_gamma})")
    need(0 <= a.aug_bias <= 1, f"--aug_bias must be in [0, 1] (got {a.aug_bias})")
    need(0 <= a.dropout < 1, f"--dropout must be in [0, 1) (got {a.dropout})")
    need(0 <= a.foreground_fraction <= 1, f"--foreground_fraction must be in [0, 1] (got {a.foreground_fraction})")
    need(a.foreground_fraction == 0 or foreground_per_batch(a.foreground_fraction, a.batch_size) >= 1,
         f"--foreground_fraction {a.foreground_fraction} x --batch_size {a.batch_size} rounds to no tumour "
         f"slice per batch (round(F x B) must be >= 1)")
    need(0 <= a.background_fraction <= 1, f"--background_fraction must be in [0, 1] (got {a.background_fraction})")
    need(not precision_error(a.precision), precision_error(a.precision))
    need(not threads_error(a.num_threads), threads_error(a.num_threads))
    need(a.num_inter_threads >= 1, f"--num_inter_threads must be >= 1 (got {a.num_inter_threads})")
    need(a.blocktime >= 0, f"--blocktime must be >= 0 (got {a.blocktime})")
    need(a.checkpoint_every >= 0, f"--checkpoint_every must be >= 0 (got {a.checkpoint_every})")
    need(a.keep_checkpoints >= 1, f"--keep_checkpoints must be >= 1 (got {a.keep_checkpoints})")
    need(a.step_timeout >= 0, f"--step_timeout must be >= 0 (got {a.step_timeout})")
    need(a.commit_every >= 1, f"--commit_every must be >= 1 (got {a.commit_every})")
    need(not (a.resume and a.fresh), "give at most one of --resume and --fresh")
    need(a.log_every >= 1, f"--log_every must be >= 1 (got {a.log_every})")
    need(a.image_every >= 1, f"--image_every must be >= 1 (got {a.image_every})")
    a.export_formats = [] if a.export == "none" else [f for f in a.export.split(",") if f]
    for f in a.export_formats:
        need(f in EXPORT_FORMATS, f"--export {a.export}: unknown format {f!r} "
                                  f"(known: {', '.join(EXPORT_FORMATS)}, or none)")
        need(not export_missing(f), f"--export {a.export}: {export_missing(f)}; or --export none")
    if a.benchmark:
        need(not a.data, "--benchmark uses in-memory synthetic data; drop --data")
        need(a.bench_steps >= 3, f"--bench_steps must be >= 3 (got {a.bench_steps})")
        need(a.warmup_steps >= 1, f"--warmup_steps must be >= 1 (got {a.warmup_steps})")
        a.synthetic = True
    need(not (a.synthetic and a.data), "give at most one of --data PATH and --synthetic")
    need(a.fold is None or not a.synthetic, "--fold selects cases of a --data file converted with --folds, "
                                            "not of --synthetic data")
    if not a.synthetic and not a.data:
        a.data = DEFAULT_DATA
    if a.synthetic:
        need(a.synthetic_size >= 16 and a.synthetic_size % 16 == 0,
             f"--synthetic_size must be a multiple of 16 (4 poolings), got {a.synthetic_size}")
        need(a.synthetic_channels >= 1, "--synthetic_channels must be >= 1")
        need(a.synthetic_regions >= 1, "--synthetic_regions must be >= 1")
        need(a.synthetic_train >= 1, "--synthetic_train must be >= 1")
        need(a.synthetic_val >= 0, "--synthetic_val must be >= 0")
    return a


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate; raises UsageError (not SystemExit) for bad values."""
    return validate(build_parser().parse_args(argv))


@dataclass(frozen=True)
class ModelOptions:
    """The network and its loss (recorded in model.json); every field from its flag (the defaults are the parser's)."""
    use_upsampling: bool
    norm: str
    dropout: float
    activation: str
    head_bias: str
    loss: str
    bce_weight: float
    precision: str


@dataclass(frozen=True)
class ScheduleOptions:
    """The learning rate: the base rate for one worker, its scaling by workers, warmup and decay."""
    learningrate: float
    lr_scaling: str
    warmup_epochs: float
    decay_steps: int
    lr_fraction: float
    const_learningrate: bool


@dataclass(frozen=True)
class TrainOptions:
    """Everything the trainer was asked, typed; built once by ``options`` from the validated flags."""
    model: ModelOptions
    schedule: ScheduleOptions
    data: DataOptions
    log: LogOptions
    bench: BenchOptions | None           # --benchmark: time steps instead of training
    num_threads: int                     # the rank's threads, set before TensorFlow loads
    num_inter_threads: int
    blocktime: int
    batch_size: int                      # images per rank per step
    epochs: int
    steps_per_epoch: int                 # 0: the whole training split
    seed: int
    augment: bool                        # the foreground share of a batch is data.foreground_fraction
    aug_scale: float                     # intensity augmentation (unet.data.pipeline.augment)
    aug_shift: float
    aug_gamma: float                     # probability per channel of a gamma curve
    aug_bias: float                      # bias field coefficients' range
    clipnorm: float
    bn_batches: int                      # --norm batch: batches per rank recomputing the statistics (0: off)
    conv_grad: str                       # "auto", "tf" or "forward" (unet/training/convgrad.py)
    validation: bool
    checkpoint_every: int
    commit_every: int
    step_timeout: float
    keep_checkpoints: int
    resume: str | None
    fresh: bool
    export_formats: tuple[str, ...]

    @property
    def logdir(self) -> str:
        return self.log.logdir

    @property
    def data_label(self) -> str:
        """The data as a message names it."""
        return self.data.data or "--synthetic data"


def _pick(cls, a: argparse.Namespace):
    return cls(**{k: getattr(a, k) for k in cls.__dataclass_fields__})


def options(a: argparse.Namespace) -> TrainOptions:
    """The validated flags (``parse_args``) as frozen options: every field from its flag of the same name."""
    return TrainOptions(
        model=_pick(ModelOptions, a), schedule=_pick(ScheduleOptions, a), data=DataOptions.from_flags(a),
        log=LogOptions(logdir=a.logdir, epochs=a.epochs, batch_size=a.batch_size, data=a.data,
                       log_every=a.log_every, image_every=a.image_every),
        bench=BenchOptions(batch_size=a.batch_size, warmup_steps=a.warmup_steps, bench_steps=a.bench_steps,
                           precision=a.precision) if a.benchmark else None,
        num_threads=a.num_threads, num_inter_threads=a.num_inter_threads, blocktime=a.blocktime,
        batch_size=a.batch_size, epochs=a.epochs, steps_per_epoch=a.steps_per_epoch, seed=a.seed,
        augment=not a.no_augment, aug_scale=a.aug_scale, aug_shift=a.aug_shift,
        aug_gamma=a.aug_gamma, aug_bias=a.aug_bias, clipnorm=a.clipnorm, bn_batches=a.bn_batches,
        conv_grad=a.conv_grad,
        validation=not a.no_validation, checkpoint_every=a.checkpoint_every, commit_every=a.commit_every,
        step_timeout=a.step_timeout, keep_checkpoints=a.keep_checkpoints, resume=a.resume, fresh=a.fresh,
        export_formats=tuple(a.export_formats))
