"""int8: unet-export --int8 (NNCF post-training quantisation of the OpenVINO IR), unet-predict /
unet-evaluate --int8, and the Dice cost they print.

A small network (32x32 slices, as in test_engines.py) is trained for nothing: its weights are
fixed random ones with a scaled head, so its segmentation is not empty and quantisation changes
some voxels. Two synthetic cases go through unet-convert (one for training, one for validation);
the int8 IR is calibrated on the training slices and its Dice cost measured on the validation case.
The recorded Dice must equal a hand computation on the NIfTI files unet-predict writes.
"""
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from test_engines import dice, without

pytestmark = [pytest.mark.needs_stack, pytest.mark.needs_engines]


def predict(*args):
    from unet.inference.predict import main
    return main([str(a) for a in args])


def export(*args):
    from unet.inference.export import main
    return main([str(a) for a in args])


def meta_of(folder):
    with open(os.path.join(folder, "model.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def quantised(tmp_path_factory):
    """model.keras + model.json as the trainer writes them (data.file: the HDF5 file), then
    ``unet-export --int8`` alone: it exports the fp32 IR it needs, quantises it, measures the cost."""
    import h5py
    import keras

    from unet.data.convert import main as convert
    from unet.data.synth import main as synth
    from unet.model import build_unet
    from unet.modelfolder import save_model as export_model
    root = tmp_path_factory.mktemp("int8")
    assert synth(["--out", str(root / "cases"), "--cases", "2", "--shape", "24,40,40", "--seed", "5",
                  "--anatomy", "sphere"]) == 0
    assert convert(["--input", str(root / "cases"), "--output", str(root / "d.h5"), "--size", "32",
                    "--slices", "all", "--val_fraction", "0.5", "--no_progress"]) == 0
    with h5py.File(root / "d.h5") as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()
                 if k in ("normalisation", "inplane")}
        val_case = sorted(set(f["val"]["case_id"].asstr()[:]))[0]
    keras.utils.set_random_seed(11)
    model = build_unet(32, 32, 4, 3, dropout=0.0)
    head = model.get_layer("mask")
    kernel, bias = head.get_weights()
    head.set_weights([kernel * 30.0, bias])
    meta = {"data": {"height": 32, "width": 32, "channels": 4, "regions": 3,
                     "modalities": ["FLAIR", "T1", "T1ce", "T2"], "region_names": ["WT", "TC", "ET"],
                     "attrs": attrs, "file": str(root / "d.h5")},
            "model": {"use_upsampling": False}}
    export_model(str(root / "model"), model, meta)
    assert export("--model", root / "model", "--int8", "--calibration_slices", 16, "--no_measure") == 0
    return root, val_case


def test_the_int8_ir_is_quantised_and_recorded_with_its_calibration(quantised):
    import openvino as ov

    from unet.inference.engines import default_engine
    root, val_case = quantised
    folder = root / "model"
    rec = meta_of(folder)["exports"]["openvino_int8"]
    assert (rec["file"], rec["weights"], rec["from"]) == ("model_int8.xml", "model_int8.bin", "model.xml")
    assert (folder / "model.xml").is_file() and (folder / "model_int8.bin").stat().st_size > 0
    types = [op.get_type_name() for op in ov.Core().read_model(str(folder / "model_int8.xml")).get_ordered_ops()]
    assert types.count("FakeQuantize") >= 20, "the convolutions' inputs are quantised"
    assert "FakeQuantize" not in [op.get_type_name() for op in
                                  ov.Core().read_model(str(folder / "model.xml")).get_ordered_ops()]
    from unet.inference.quantize import fp32_convolutions
    from unet.perf import flops
    layers = [n for n, _ in flops.unet_convs(32, 32, 4, 3)]
    # the detector of fp32 weights sees every convolution of the fp32 IR, and none in the default int8 one
    assert fp32_convolutions(ov.Core().read_model(str(folder / "model.xml")), layers) == layers
    assert rec["quantiser"]["kept_fp32"] == []          # every convolution quantised, unless asked otherwise
    cal = rec["calibration"]
    assert (cal["file"], cal["split"], cal["slices"]) == (str(root / "d.h5"), "train", 16)
    assert rec["validation"]["cases"] == [val_case]
    assert default_engine(str(folder), meta_of(folder)) != "openvino_int8"   # only when asked for
    assert not [n for n in os.listdir(folder) if n.startswith(".")], "no temporary file left"


def test_the_recorded_dice_cost_equals_a_hand_computation_on_the_written_segmentations(quantised, capsys):
    from unet.data import labels as L
    from unet.inference.engines import int8_cost_line
    root, val_case = quantised
    folder = root / "model"
    rec = meta_of(folder)["exports"]["openvino_int8"]["validation"]
    ref = L.regions_from_labels(sitk.GetArrayFromImage(sitk.ReadImage(
        str(root / "cases" / val_case / f"{val_case}_seg.nii.gz"))), "brats")
    assert ref[..., 0].sum() > 100
    got = {}
    for kind, flags in (("fp32", ["--engine", "openvino"]), ("int8", ["--int8"])):
        out = root / "pred" / kind / f"{val_case}.nii.gz"
        assert predict("--model", folder, *flags, "--case", root / "cases" / val_case, "--out", out) == 0
        printed = capsys.readouterr().out
        masks = L.regions_from_labels(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), "brats")
        got[kind] = {r: dice(masks[..., k].astype(bool), ref[..., k].astype(bool))
                     for k, r in enumerate(("WT", "TC", "ET"))}
        if kind == "int8":
            assert f"unet-predict: engine openvino int8 ({folder / 'model_int8.xml'})" in printed
            assert f"unet-predict: {int8_cost_line(meta_of(folder))}" in printed     # the cost, printed
    for r in ("WT", "TC", "ET"):
        # recorded rounded to 6 decimals; the same case, engines and post-processing
        assert rec["dice_fp32"][r] == pytest.approx(got["fp32"][r], abs=1e-6), r
        assert rec["dice_int8"][r] == pytest.approx(got["int8"][r], abs=1e-6), r
        assert rec["change"][r] == pytest.approx(got["int8"][r] - got["fp32"][r], abs=2e-6), r
    line = int8_cost_line(meta_of(folder))
    assert f"WT {rec['dice_fp32']['WT']:.4f} -> {rec['dice_int8']['WT']:.4f} ({rec['change']['WT']:+.4f})" in line


def test_benchmark_int8_adds_a_row_and_prints_the_cost(quantised, capsys):
    root, val_case = quantised
    assert predict("--model", root / "model", "--case", root / "cases" / val_case, "--benchmark", "--repeats", 1,
                   "--int8") == 0
    out = capsys.readouterr().out
    rows = {dict(f.split("=") for f in line.split()[1:])["engine"]: line for line in out.splitlines()
            if line.startswith("benchmark: engine=")}
    # --int8 alone exported the fp32 IR it quantises, not model.onnx: that engine is skipped, saying why
    assert sorted(rows) == ["openvino", "openvino-int8", "tensorflow"]
    assert "benchmark: skipped: --engine onnxruntime: " in out
    fields = dict(f.split("=") for f in rows["openvino-int8"].split()[1:])
    assert float(fields["slices_per_s"]) > 0 and fields["threads"] == rows_threads(rows["openvino"])
    assert "benchmark: int8: volume Dice fp32 -> int8 on 1 validation case(s)" in out
    assert "fp32 peak" in out and "measured: FMA chains" in out


def rows_threads(line):
    return dict(f.split("=") for f in line.split()[1:])["threads"]


def test_int8_errors_are_one_line_and_write_nothing(quantised, tmp_path, capsys):
    root, val_case = quantised
    case = root / "cases" / val_case
    assert predict("--model", root / "model", "--int8", "--engine", "onnxruntime", "--case", case,
                   "--out", tmp_path / "x.nii.gz") == 2
    assert capsys.readouterr().err == ("unet-predict: error: --int8 runs the quantised OpenVINO IR on the openvino "
                                       "engine, not --engine onnxruntime\n")
    m = tmp_path / "m"
    shutil.copytree(root / "model", m)
    for name in ("model_int8.xml", "model_int8.bin"):
        os.remove(m / name)
    assert predict("--model", m, "--int8", "--case", case, "--out", tmp_path / "x.nii.gz") == 2
    assert capsys.readouterr().err == (f"unet-predict: error: --int8: {m / 'model_int8.xml'}: no such file "
                                       f"(make it with: unet-export --model {m} --int8)\n")
    assert not (tmp_path / "x.nii.gz").exists()
    # no data file recorded and none given: said before anything is written
    meta = meta_of(m)
    del meta["data"]["file"]
    (m / "model.json").write_text(json.dumps(meta))
    assert export("--model", m, "--int8") == 2
    assert capsys.readouterr().err.startswith("unet-export: error: --int8 needs --data: the unet-convert HDF5 "
                                              "file the model was trained on")
    assert export("--model", m, "--int8", "--data", tmp_path / "nope.h5") == 2
    assert capsys.readouterr().err == f"unet-export: error: --data {tmp_path / 'nope.h5'}: no such file\n"
    assert not (m / "model_int8.xml").exists()
    p = without("nncf", "unet.inference.export", "--model", m, "--int8", "--data", root / "d.h5")
    assert (p.returncode, p.stderr) == (2, "unet-export: error: --int8: the openvino_int8 export needs the nncf "
                                           "package(s), not installed (scripts/setup.sh installs them, pinned in "
                                           "scripts/constraints.txt)\n")


def test_a_new_model_or_fp32_ir_removes_the_int8_ir_made_from_the_old_one(quantised, tmp_path):
    import keras

    from unet.modelfolder import save_model as export_model
    root, _ = quantised
    m = tmp_path / "m"
    shutil.copytree(root / "model", m)
    assert export("--model", m, "--format", "openvino", "--no_measure") == 0
    assert "openvino_int8" not in meta_of(m)["exports"]
    assert not (m / "model_int8.xml").exists() and not (m / "model_int8.bin").exists()
    # the trainer writing a new model.keras (with --export none) leaves no file of the old one
    shutil.rmtree(m)
    shutil.copytree(root / "model", m)
    meta = {k: v for k, v in meta_of(m).items() if k != "exports"}
    export_model(str(m), keras.saving.load_model(str(m / "model.keras"), compile=False), meta)
    assert sorted(os.listdir(m)) == ["model.json", "model.keras"]


def test_an_int8_ir_without_its_record_or_named_directly(quantised, tmp_path, capsys):
    root, val_case = quantised
    case = root / "cases" / val_case
    # --model naming the int8 IR is --int8: the cost line is printed
    assert predict("--model", root / "model" / "model_int8.xml", "--case", case, "--out", tmp_path / "a.nii.gz") == 0
    assert "unet-predict: engine openvino int8" in capsys.readouterr().out
    m = tmp_path / "m"
    shutil.copytree(root / "model", m)
    meta = meta_of(m)
    del meta["exports"]["openvino_int8"]
    (m / "model.json").write_text(json.dumps(meta))
    assert predict("--model", m, "--int8", "--case", case, "--out", tmp_path / "x.nii.gz") == 2
    assert capsys.readouterr().err == (f"unet-predict: error: --int8: {m / 'model_int8.xml'}: model.json has no "
                                       f"record of it (no measured Dice cost); make it again with: unet-export "
                                       f"--model {m} --int8\n")


def test_data_without_validation_cases_is_refused_before_anything_is_written(quantised, tmp_path, capsys):
    from unet.data.convert import main as convert
    root, _ = quantised
    assert convert(["--input", str(root / "cases"), "--output", str(tmp_path / "noval.h5"), "--size", "32",
                    "--val_fraction", "0", "--no_progress"]) == 0
    m = tmp_path / "m"
    shutil.copytree(root / "model", m)
    before = (m / "model.json").read_text()
    os.remove(m / "model_int8.xml")
    assert export("--model", m, "--int8", "--data", tmp_path / "noval.h5") == 2
    assert capsys.readouterr().err == (f"unet-export: error: --data {tmp_path / 'noval.h5'}: no validation cases "
                                       f"(int8 calibrates on training slices and measures its Dice on validation "
                                       f"cases)\n")
    assert not (m / "model_int8.xml").exists() and (m / "model.json").read_text() == before


def test_max_dice_drop_records_its_budget_and_the_fp32_convolutions_the_file_holds(quantised, tmp_path):
    """Which convolutions NNCF's accuracy control puts back is its business (on the demo's model:
    conv2a, conv3a, conv8a, conv9a at 0.01, docs/PERFORMANCE.md); here: it runs with our metric and
    the record says what the written file holds."""
    import openvino as ov

    from unet.inference.quantize import fp32_convolutions
    from unet.perf import flops
    root, _ = quantised
    m = tmp_path / "m"
    shutil.copytree(root / "model", m)
    assert export("--model", m, "--int8", "--calibration_slices", 16, "--max_dice_drop", 0.001) == 0
    rec = meta_of(m)["exports"]["openvino_int8"]
    assert rec["quantiser"]["accuracy_control"]["max_drop"] == 0.001
    kept = rec["quantiser"]["kept_fp32"]
    layers = [n for n, _ in flops.unet_convs(32, 32, 4, 3)]
    assert set(kept) <= set(layers)
    # what is recorded is what the file holds
    assert fp32_convolutions(ov.Core().read_model(str(m / "model_int8.xml")), layers) == kept


def test_the_accuracy_control_metric_by_hand():
    from unet.inference.quantize import mean_dice
    probs = np.zeros((2, 2, 2, 3), np.float32)
    masks = np.zeros_like(probs)
    probs[0, 0, :, 0] = 0.9          # WT: 2 predicted, 3 true, 1 shared -> 2*1/5
    masks[0, 0, 0, 0] = masks[1, 1, :, 0] = 1
    probs[1, :, :, 1] = 0.7          # TC: 4 predicted, 2 true, both shared -> 2*2/6
    masks[1, 0, :, 1] = 1
    # ET: absent from both -> 1
    assert mean_dice(probs, masks) == pytest.approx((2 / 5 + 4 / 6 + 1) / 3)
