import pytest

from unet.training.config import UsageError, build_parser, parse_args

SEED_FLAGS = ["--use_upsampling", "--num_threads", "--num_inter_threads", "--batch_size", "--blocktime",
              "--epochs", "--learningrate", "--const_learningrate", "--decay_steps", "--lr_fraction"]


def test_seed_flag_names_and_defaults_are_kept():
    text = build_parser().format_help()
    for flag in SEED_FLAGS + ["--data", "--logdir", "--seed", "--steps_per_epoch", "--synthetic",
                              "--lr_scaling", "--warmup_epochs"]:
        assert flag in text
    a = parse_args(["--synthetic"])
    assert (a.learningrate, a.decay_steps, a.lr_fraction, a.blocktime) == (0.0005, 150, 0.25, 0)
    assert (a.batch_size, a.epochs, a.num_inter_threads, a.num_threads) == (128, 10, 2, 0)
    assert a.lr_scaling == "linear" and not a.use_upsampling and not a.const_learningrate
    assert a.data is None


def test_data_defaults_to_data_brats_h5_unless_synthetic():
    assert parse_args([]).data == "data/brats.h5"
    assert parse_args(["--data", "x.h5"]).data == "x.h5"
    assert "data/brats.h5" in build_parser().format_help()


@pytest.mark.parametrize("argv,flag", [
    (["--synthetic", "--batch_size", "0"], "--batch_size"),
    (["--synthetic", "--lr_fraction", "1.5"], "--lr_fraction"),
    (["--synthetic", "--learningrate", "-1"], "--learningrate"),
    (["--synthetic", "--synthetic_size", "100"], "--synthetic_size"),
    (["--synthetic", "--data", "x.h5"], "--data"),
    (["--synthetic", "--export", "openvino,tflite"], "--export"),
    (["--synthetic", "--bce_weight", "-1"], "--bce_weight"),
    (["--synthetic", "--clipnorm", "-0.5"], "--clipnorm"),
    (["--synthetic", "--bn_batches", "-1"], "--bn_batches"),
    (["--synthetic", "--aug_scale", "1"], "--aug_scale"),
    (["--synthetic", "--aug_scale", "-0.1"], "--aug_scale"),
    (["--synthetic", "--aug_shift", "-0.1"], "--aug_shift"),
    (["--synthetic", "--aug_gamma", "1.5"], "--aug_gamma"),
    (["--synthetic", "--aug_bias", "-0.1"], "--aug_bias"),
    (["--synthetic", "--foreground_fraction", "1.5"], "--foreground_fraction"),
    (["--synthetic", "--foreground_fraction", "-0.1"], "--foreground_fraction"),
    (["--synthetic", "--background_fraction", "1.1"], "--background_fraction"),
    (["--synthetic", "--background_fraction", "-0.5"], "--background_fraction"),
    (["--synthetic", "--foreground_fraction", "0.1", "--batch_size", "4"],
     "--foreground_fraction 0.1 x --batch_size 4"),
])
def test_bad_values_name_the_flag(argv, flag):
    with pytest.raises(UsageError, match=flag):
        parse_args(argv)


def test_export_formats_default_to_openvino_and_onnx_and_none_means_model_keras_only():
    assert parse_args(["--synthetic"]).export_formats == ["openvino", "onnx"]
    assert parse_args(["--synthetic", "--export", "none"]).export_formats == []
    assert parse_args(["--synthetic", "--export", "saved_model"]).export_formats == ["saved_model"]


def test_foreground_fraction_is_off_by_default():
    assert parse_args(["--synthetic"]).foreground_fraction == 0.0
    assert parse_args(["--synthetic", "--foreground_fraction", "0.33", "--batch_size", "2"]).foreground_fraction == 0.33


def _fields(obj, prefix=""):
    """Every leaf field of the (nested) frozen options, by dotted name."""
    import dataclasses
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out.update(_fields(v, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = v
    return out


# flags whose value reaches TrainOptions under another name or shape
RENAMED = {"no_augment": "augment", "no_validation": "validation", "export": "export_formats",
           "benchmark": "bench", "warmup_steps": "bench.warmup_steps", "bench_steps": "bench.bench_steps"}


def test_every_flag_reaches_the_typed_options_and_they_are_frozen():
    import dataclasses

    from unet.training.config import options
    argv = ["--data", "x.h5", "--batch_size", "3", "--learningrate", "0.002", "--norm", "group", "--no_augment",
            "--no_validation", "--fold", "1", "--export", "none", "--logdir", "/tmp/L", "--log_every", "7",
            "--decay_steps", "40", "--seed", "5"]
    opts = options(parse_args(argv))
    bench_run = options(parse_args(["--benchmark", "--batch_size", "2", "--bench_steps", "4"]))
    leaves = {**_fields(opts), **_fields(bench_run)}
    names = {k.rsplit(".", 1)[-1] for k in leaves} | {k.split(".", 1)[0] for k in leaves}
    dests = {a.dest for a in build_parser()._actions if a.dest != "help"}
    missing = {d for d in dests if d not in names and RENAMED.get(d, "").split(".")[-1] not in names}
    assert not missing, f"flags that no option carries: {sorted(missing)}"
    assert (opts.batch_size, opts.schedule.learningrate, opts.model.norm, opts.seed) == (3, 0.002, "group", 5)
    assert (opts.augment, opts.validation, opts.export_formats, opts.bench) == (False, False, (), None)
    assert (opts.data.data, opts.data.fold, opts.logdir, opts.log.log_every) == ("x.h5", 1, "/tmp/L", 7)
    assert opts.schedule.decay_steps == 40 and opts.data_label == "x.h5"
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.batch_size = 4
    assert (bench_run.bench.batch_size, bench_run.bench.bench_steps) == (2, 4)
    assert options(parse_args(["--synthetic"])).data_label == "--synthetic data"


def test_bf16_is_refused_only_where_onednn_has_no_bf16_convolution(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    with pytest.raises(UsageError, match="--precision bf16: ONEDNN_MAX_CPU_ISA=AVX2 holds oneDNN"):
        parse_args(["--synthetic", "--precision", "bf16"])
    assert parse_args(["--synthetic"]).precision == "fp32"
    for isa in ("AVX512_CORE", "AVX512_CORE_AMX", "AVX2_VNNI_2"):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
        assert parse_args(["--synthetic", "--precision", "bf16"]).precision == "bf16"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert parse_args(["--synthetic", "--precision", "bf16"]).precision == "bf16"
