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
    (["--synthetic", "--foreground_fraction", "1.5"], "--foreground_fraction"),
    (["--synthetic", "--foreground_fraction", "-0.1"], "--foreground_fraction"),
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
