"""unet-predict and unet-evaluate on synthetic cases: geometry kept, scores right, errors named.

The module's model is trained on 80x80 cases converted to 64x64 (the default --inplane resize),
so every prediction has to be brought back to the 80x80 input grid.
"""
import csv
import json
import os
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import HANG, ROOT, run_mpi

pytestmark = pytest.mark.mpi

MODS = ("flair", "t1", "t1ce", "t2")
ONE = "BraTS20_Training_001"
BGR = {"WT": (0, 200, 0), "TC": (0, 200, 255), "ET": (0, 0, 255)}   # write_png's colours


def py(module, *args, timeout=HANG):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


def predict(*args):
    from unet.inference.predict import main
    return main([str(a) for a in args])


def evaluate(*args):
    from unet.evaluation.evaluate import main
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    from unet.data.synth import main as synth
    assert synth(["--out", str(root / "cases"), "--cases", "3", "--shape", "40,80,80", "--seed", "4",
                  "--anatomy", "sphere"]) == 0
    p = py("unet.data.convert", "--input", root / "cases", "--output", root / "d.h5", "--size", 64,
           "--val_fraction", 0.5, "--no_progress")
    assert p.returncode == 0, p.stderr
    t = run_mpi(1, [os.path.join(ROOT, "train_hvd.py"), "--data", str(root / "d.h5"), "--logdir", str(root / "logs"),
                    "--batch_size", "4", "--epochs", "1", "--steps_per_epoch", "2",
                    "--export", "openvino"])   # the ONNX export (~6 s more) is tested in test_engines.py
    assert t.returncode == 0, t.stderr[-2000:]
    return root


@pytest.fixture(scope="module")
def predicted(trained):
    """unet-predict (the trained model) in batch mode over the dataset root."""
    p = py("unet.inference.predict", "--model", trained / "logs", "--case", trained / "cases",
           "--out", trained / "pred")
    assert p.returncode == 0, p.stderr
    return trained / "pred"


class OracleNetwork:
    """Stands in for the network where the test must know what is predicted: for each input slice it
    returns the masks the training file stores for that slice (found by the slice's exact values), so
    the prediction is the reference carried to the network grid and back. A 2-step model predicts
    nothing, which would leave label values and colours unseen."""

    def __init__(self, h5):
        self.masks = {}
        with h5py.File(h5) as f:
            for g in (f["train"], f["val"]):
                for img, msk in zip(g["images"][:], g["masks"][:]):
                    self.masks[img.tobytes()] = msk.astype(np.float32)

    def __call__(self, batch, training=False):
        out = []
        for s in np.asarray(batch):
            if s.tobytes() not in self.masks:
                assert not s.any(), "an input slice that is not in the training file"
                out.append(np.zeros(s.shape[:2] + (3,), np.float32))   # outside the head (not stored)
            else:
                out.append(self.masks[s.tobytes()])
        return np.stack(out)


@pytest.fixture(scope="module")
def oracle(trained):
    return OracleNetwork(trained / "d.h5")


# the oracle's prediction is the reference carried through: no clean-up may change it
RAW = ("--wt_components", "all", "--et_min_mm3", "0")


def predict_with(oracle_net, *args):
    from unet.inference.predictor import Predictor
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Predictor, "model", property(lambda self: oracle_net))
        return predict(*args, *RAW)


@pytest.fixture(scope="module")
def oracle_predicted(trained, oracle):
    """Batch mode over the dataset root with the oracle network, with pictures."""
    assert predict_with(oracle, "--model", trained / "logs", "--case", trained / "cases", "--out",
                        trained / "oracle", "--png", trained / "oracle_png") == 0
    return trained / "oracle"


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def array(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def val_ids(h5):
    with h5py.File(h5) as f:
        return sorted(set(f["val"]["case_id"].asstr()[:]))


def test_predict_writes_labels_on_the_input_grid_and_scores_round_trip(trained, predicted, tmp_path):
    ref = sitk.ReadImage(str(trained / "cases" / ONE / f"{ONE}_flair.nii.gz"))
    pred = sitk.ReadImage(str(predicted / f"{ONE}.nii.gz"))
    assert pred.GetSize() == ref.GetSize() == (80, 80, 40)          # the model saw 64x64 slices
    assert pred.GetSpacing() == ref.GetSpacing() and pred.GetOrigin() == ref.GetOrigin()
    assert pred.GetDirection() == ref.GetDirection()
    assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2, 4}
    e = py("unet.evaluation.evaluate", "--pred_dir", predicted, "--ref_dir", trained / "cases",
           "--csv", tmp_path / "s.csv")
    assert e.returncode == 0, e.stderr
    rows = read_csv(tmp_path / "s.csv")
    assert [r["case"] for r in rows] == [f"BraTS20_Training_00{i}" for i in (1, 2, 3)]
    from unet.evaluation.lesionwise import columns as lesionwise_columns
    assert list(rows[0]) == ["case", "dice_WT", "dice_TC", "dice_ET", "hd95_WT", "hd95_TC", "hd95_ET",
                             "sens_WT", "sens_TC", "sens_ET", "spec_WT", "spec_TC", "spec_ET",
                             *lesionwise_columns()]       # --metrics all, the default: both kinds
    assert all(0 <= float(r["dice_WT"]) <= 1 for r in rows)
    assert "dice_WT" in e.stdout and "median" in e.stdout and "lesionwise_dsc_mean" in e.stdout


@pytest.mark.needs_engines
def test_training_writes_the_engines_files_beside_model_keras(trained):
    logs = trained / "logs"
    with open(logs / "model.json") as f:
        ex = json.load(f)["exports"]
    for fmt, name in (("keras", "model.keras"), ("openvino", "model.xml")):
        assert ex[fmt]["file"] == name and (logs / name).stat().st_size > 0, fmt
    assert (logs / "model.bin").stat().st_size > 0
    assert ex["input"]["shape"] == [None, 64, 64, 4] and ex["input"]["preprocessing"]["inplane"] == "resize"
    assert sorted(ex["benchmark"]["slices_per_s"]) == ["openvino", "tensorflow"]


def test_predictor_feeds_the_network_the_slices_it_was_trained_on(trained):
    from unet.data.layouts import find_cases
    from unet.inference.predictor import Predictor
    pred = Predictor(str(trained / "logs"))
    assert (pred.size, pred.inplane) == (64, "resize")
    cases = {c.case_id: c for c in find_cases(str(trained / "cases"))}
    with h5py.File(trained / "d.h5") as f:
        g = f["val"]
        ids, zs = g["case_id"].asstr()[:], g["slice_index"][:]
        for cid in sorted(set(ids)):
            rows = np.flatnonzero(ids == cid)
            chans, _, _ = pred.read(cases[cid])
            slices = pred.network_input(chans).slices
            assert zs[rows].tolist() == list(range(len(slices))) == list(range(40))
            assert np.allclose(slices, g["images"][rows], rtol=0, atol=0)   # slice for slice, bit for bit


@pytest.mark.parametrize("edit,field", [
    (lambda a: a.update(inplane="pad"), "inplane"),
    (lambda a: a.pop("inplane"), "inplane"),
    (lambda a: a.update(normalisation="minmax"), "normalisation"),
    (lambda a: a.pop("normalisation"), "normalisation"),
])
def test_predictor_refuses_preprocessing_it_does_not_implement(trained, tmp_path, capsys, edit, field):
    with open(trained / "logs" / "model.json") as f:
        meta = json.load(f)
    edit(meta["data"]["attrs"])
    (tmp_path / "model.json").write_text(json.dumps(meta))
    os.symlink(trained / "logs" / "model.keras", tmp_path / "model.keras")
    assert predict("--model", tmp_path, "--case", trained / "cases" / ONE, "--out", tmp_path / "x.nii.gz") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"unet-predict: error: {tmp_path / 'model.json'}: data.attrs.{field} ")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.nii.gz").exists()


GEOMETRY = dict(spacing=(0.9, 1.2, 2.5), origin=(12.5, -30.0, 7.0),
                direction=(np.cos(0.5), -np.sin(0.5), 0.0, np.sin(0.5), np.cos(0.5), 0.0, 0.0, 0.0, 1.0))


def test_predict_copies_non_default_spacing_origin_and_direction(trained, oracle, oracle_predicted, tmp_path):
    case = tmp_path / "cases" / ONE
    shutil.copytree(trained / "cases" / ONE, case)
    for f in case.iterdir():
        img = sitk.ReadImage(str(f))
        img.SetSpacing(GEOMETRY["spacing"]); img.SetOrigin(GEOMETRY["origin"])
        img.SetDirection(GEOMETRY["direction"])
        sitk.WriteImage(img, str(f), True)
    assert predict_with(oracle, "--model", trained / "logs", "--case", case,
                        "--out", tmp_path / "pred" / f"{ONE}.nii.gz") == 0
    out = sitk.ReadImage(str(tmp_path / "pred" / f"{ONE}.nii.gz"))
    assert out.GetSize() == (80, 80, 40)
    for name, want in GEOMETRY.items():
        assert np.allclose(getattr(out, f"Get{name.title()}")(), want, atol=1e-5), name
    # the same voxels as on the default geometry: the header is copied, nothing is resampled
    assert np.array_equal(sitk.GetArrayFromImage(out), array(oracle_predicted / f"{ONE}.nii.gz"))
    assert evaluate("--pred_dir", tmp_path / "pred", "--ref_dir", tmp_path / "cases") == 0


def test_reference_against_itself_scores_perfectly_and_missing_cases_are_reported(trained, tmp_path):
    pred = tmp_path / "pred"; pred.mkdir()
    for i in (1, 2):
        cid = f"BraTS20_Training_00{i}"
        shutil.copy(trained / "cases" / cid / f"{cid}_seg.nii.gz", pred / f"{cid}.nii.gz")
    shutil.copy(pred / "BraTS20_Training_001.nii.gz", pred / "extra_case.nii.gz")
    e = py("unet.evaluation.evaluate", "--pred_dir", pred, "--ref_dir", trained / "cases", "--csv", tmp_path / "s.csv")
    assert e.returncode == 0, e.stderr
    for r in read_csv(tmp_path / "s.csv"):
        for reg in ("WT", "TC", "ET"):
            assert float(r[f"dice_{reg}"]) == 1.0 and float(r[f"hd95_{reg}"]) == 0.0
    assert "not scored, in predictions only: extra_case" in e.stdout
    assert "not scored, in reference only: BraTS20_Training_003" in e.stdout


@pytest.mark.parametrize("what,change", [
    ("size", lambda img: img[:, :, :-1]),
    ("spacing", lambda img: (img.SetSpacing((1.0, 1.0, 3.0)), img)[1]),
    ("origin", lambda img: (img.SetOrigin((0.0, -239.0, 5.0)), img)[1]),
    ("direction", lambda img: (img.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1)), img)[1]),
])
def test_geometry_mismatch_names_the_case(trained, tmp_path, capsys, what, change):
    pred = tmp_path / "pred"; pred.mkdir()
    cid = "BraTS20_Training_002"
    img = change(sitk.ReadImage(str(trained / "cases" / cid / f"{cid}_seg.nii.gz")))
    sitk.WriteImage(img, str(pred / f"{cid}.nii.gz"))
    assert evaluate("--pred_dir", pred, "--ref_dir", trained / "cases") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"unet-evaluate: error: case {cid}: ") and f"differ in {what} " in err
    assert len(err.strip().splitlines()) == 1


def write_labels(path, arr, spacing=(1.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path), True)


def test_flat_folders_with_anisotropic_voxels(tmp_path, capsys):
    # <case>.nii.gz in both folders. Case A: one-voxel planes of label 4 (all three regions)
    # 3 slices apart with 3 mm slices -> every surface distance, so HD95, is 9 mm (3 if the
    # spacing were applied to the wrong axis); case B: identical. Case C has no prediction.
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir(); ref.mkdir()
    plane = lambda z: np.pad(np.full((1, 10, 10), 4), ((z, 11 - z), (0, 0), (0, 0)))
    write_labels(ref / "A.nii.gz", plane(5), (1.0, 1.0, 3.0))
    write_labels(pred / "A.nii.gz", plane(8), (1.0, 1.0, 3.0))
    for d in (pred, ref):
        write_labels(d / "B.nii.gz", plane(2), (1.0, 1.0, 3.0))
    write_labels(ref / "C.nii.gz", plane(2))
    assert evaluate("--pred_dir", pred, "--ref_dir", ref, "--csv", tmp_path / "s.csv", "--metrics", "legacy") == 0
    rows = {r["case"]: r for r in read_csv(tmp_path / "s.csv")}
    assert sorted(rows) == ["A", "B"] and len(rows["A"]) == 13     # case + the 12 legacy columns
    for reg in ("WT", "TC", "ET"):
        assert float(rows["A"][f"dice_{reg}"]) == 0.0 and float(rows["A"][f"hd95_{reg}"]) == 9.0
        assert float(rows["B"][f"dice_{reg}"]) == 1.0 and float(rows["B"][f"hd95_{reg}"]) == 0.0
    out = capsys.readouterr().out.strip().splitlines()
    assert "not scored, in reference only: C" in out
    assert out[-13].startswith("metric ") and out[-1].startswith("spec_ET ")   # the summary table ends it


BRATS_TO = {"brats2023": {1: 1, 2: 2, 4: 3}, "msd": {1: 2, 2: 1, 4: 3}}


def relabel(arr, table):
    out = np.zeros_like(arr)
    for src, dst in table.items():
        out[arr == src] = dst
    return out


@pytest.mark.parametrize("labels", ["brats2023", "msd"])
def test_predict_writes_the_chosen_label_convention(trained, oracle, oracle_predicted, tmp_path, labels):
    brats = array(oracle_predicted / f"{ONE}.nii.gz")
    assert set(np.unique(brats)) == {0, 1, 2, 4}     # all three labels occur, so the mapping is seen
    out = tmp_path / f"{ONE}.nii.gz"
    assert predict_with(oracle, "--model", trained / "logs", "--case", trained / "cases" / ONE, "--out", out,
                        "--labels", labels) == 0
    assert np.array_equal(array(out), relabel(brats, BRATS_TO[labels]))


@pytest.mark.parametrize("layout", ["brats2023", "msd"])
def test_evaluate_scores_each_label_convention(tmp_path, capsys, layout):
    from unet.data.layouts import find_cases
    from unet.data.synth import main as synth
    root, pred = tmp_path / "ref", tmp_path / "pred"
    assert synth(["--out", str(root), "--cases", "1", "--shape", "24,64,64", "--layout", layout, "--seed", "1",
                  "--anatomy", "sphere"]) == 0
    case = find_cases(str(root))[0]
    pred.mkdir()
    shutil.copy(case.seg, pred / f"{case.case_id}.nii.gz")
    assert set(np.unique(array(case.seg))) == {0, 1, 2, 3}
    # the reference against itself, as a dataset root in its own layout
    assert evaluate("--pred_dir", pred, "--ref_dir", root, "--labels", layout, "--csv", tmp_path / "s.csv") == 0
    (row,) = read_csv(tmp_path / "s.csv")
    assert all(float(row[f"dice_{r}"]) == 1.0 and float(row[f"hd95_{r}"]) == 0.0 for r in ("WT", "TC", "ET"))
    # the same predictions scored under BraTS 1/2/4: label 3 is not in that convention
    capsys.readouterr()
    assert evaluate("--pred_dir", pred, "--ref_dir", root) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"unet-evaluate: error: case {case.case_id}: ") and "label values [3]" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("labels", ["brats2023", "msd"])
def test_evaluate_predictions_in_another_convention_than_the_reference(trained, tmp_path, labels):
    pred = tmp_path / "pred"; pred.mkdir()
    seg = sitk.ReadImage(str(trained / "cases" / ONE / f"{ONE}_seg.nii.gz"))
    out = sitk.GetImageFromArray(relabel(sitk.GetArrayFromImage(seg), BRATS_TO[labels]))
    out.CopyInformation(seg)
    sitk.WriteImage(out, str(pred / f"{ONE}.nii.gz"))
    assert evaluate("--pred_dir", pred, "--ref_dir", trained / "cases", "--labels", labels,
                    "--csv", tmp_path / "s.csv") == 0
    (row,) = read_csv(tmp_path / "s.csv")
    assert all(float(row[f"dice_{r}"]) == 1.0 for r in ("WT", "TC", "ET"))


def test_case_takes_the_files_of_one_case_in_any_layout(trained, oracle, oracle_predicted, tmp_path, capsys):
    src = trained / "cases" / ONE
    want = array(oracle_predicted / f"{ONE}.nii.gz")
    assert want.any()
    files = [src / f"{ONE}_{m}.nii.gz" for m in MODS]
    # BraTS 2017-22 names, in any order
    assert predict_with(oracle, "--model", trained / "logs", "--case", *files[::-1],
                        "--out", tmp_path / "a.nii.gz") == 0
    assert np.array_equal(array(tmp_path / "a.nii.gz"), want)
    # BraTS 2023 names
    gli = tmp_path / "gli"; gli.mkdir()
    for f, suf in zip(files, ("t2f", "t1n", "t1c", "t2w")):
        shutil.copy(f, gli / f"BraTS-GLI-00001-000-{suf}.nii.gz")
    assert predict_with(oracle, "--model", trained / "logs", "--case", *sorted(gli.iterdir()),
                        "--out", tmp_path / "b.nii.gz") == 0
    assert np.array_equal(array(tmp_path / "b.nii.gz"), want)
    # one MSD 4-D file (FLAIR, T1w, T1gd, T2w)
    sitk.WriteImage(sitk.JoinSeries([sitk.ReadImage(str(f)) for f in files]), str(tmp_path / "BRATS_001.nii.gz"))
    assert predict_with(oracle, "--model", trained / "logs", "--case", tmp_path / "BRATS_001.nii.gz",
                        "--out", tmp_path / "c.nii.gz") == 0
    assert np.array_equal(array(tmp_path / "c.nii.gz"), want)
    # files of two cases: one line, nothing written
    capsys.readouterr()
    other = trained / "cases" / "BraTS20_Training_002" / "BraTS20_Training_002_t1.nii.gz"
    assert predict("--model", trained / "logs", "--case", files[0], other, "--out", tmp_path / "d.nii.gz") == 2
    err = capsys.readouterr().err
    assert err == "unet-predict: error: files of more than one case given: BraTS20_Training_001, BraTS20_Training_002\n"


def test_scoring_a_model_on_two_ranks(trained, tmp_path):
    p = run_mpi(2, ["-m", "unet.evaluation.evaluate", "--model", str(trained / "logs"), "--data", str(trained / "d.h5"),
                    "--csv", str(tmp_path / "m.csv"), "--pred_dir", str(tmp_path / "p")])
    assert p.returncode == 0, p.stderr[-2000:]
    val = val_ids(trained / "d.h5")
    assert len(val) == 2
    rows = read_csv(tmp_path / "m.csv")
    assert [r["case"] for r in rows] == val
    assert sorted(os.listdir(tmp_path / "p")) == [f"{c}.nii.gz" for c in val]
    assert p.stdout.count("volume-level scores over") == 1 and p.stdout.count("lesion-wise scores over") == 1
    lines = p.stdout.strip().splitlines()
    assert lines[-1].startswith("all_instance_f1 ")                     # the summaries are printed last,
    assert lines[-10].split() == ["metric", "WT", "TC", "ET", "NETC", "SNFH"]   # the lesion-wise one at the end
    assert lines[-9].startswith("lesionwise_dsc_mean ") and lines[-8].startswith("lesionwise_hd95_mean ")
    # each rank scored its own share: disjoint, non-empty, together the validation cases
    shares = {int(r): set(c.split(", ")) for r, n, c in
              re.findall(r"^rank (\d) scored (\d+) case\(s\): (.+)$", p.stdout, re.M)}
    assert sorted(shares) == [0, 1] and all(shares.values()), p.stdout
    assert shares[0].isdisjoint(shares[1]) and sorted(shares[0] | shares[1]) == val
    # each rank ran its own engine, the default (fastest recorded), on its share of the cores
    from unet.inference.engines import default_engine
    with open(trained / "logs" / "model.json") as f:
        fastest = default_engine(str(trained / "logs"), json.load(f))
    engines = re.findall(r"^rank (\d) engine (\w+) threads (\d+) ", p.stdout, re.M)
    assert sorted(r for r, _, _ in engines) == ["0", "1"] and {e for _, e, _ in engines} == {fastest}, p.stdout
    assert sum(int(t) for _, _, t in engines) <= len(os.sched_getaffinity(0))
    # rank 0's TensorBoard summary holds the CSV's means
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray
    acc = EventAccumulator(str(trained / "logs" / "evaluation"), size_guidance={"tensors": 0})
    acc.Reload()
    from unet.evaluation.lesionwise import SUMMARY
    legacy = [c for c in rows[0] if c != "case"][:12]
    # lesion-wise: the summary's metrics of each region some case has (NaN where neither side has it)
    lesionwise = [c for c in rows[0] if c.rsplit("_", 1)[0] in SUMMARY
                  and not all(np.isnan(float(r[c])) for r in rows)]
    assert "lesionwise_dsc_mean_wt" in lesionwise and "all_instance_f1_wt" in lesionwise
    assert sorted(acc.Tags()["tensors"]) == sorted([f"volume_{c}" for c in legacy] + lesionwise)
    for tag, c in [(f"volume_{c}", c) for c in legacy] + [(c, c) for c in lesionwise]:
        (event,) = acc.Tensors(tag)
        values = [float(r[c]) for r in rows if not np.isnan(float(r[c]))]
        assert float(make_ndarray(event.tensor_proto)) == pytest.approx(np.mean(values), abs=1e-5), c


def test_a_bad_case_under_model_is_one_line(trained, tmp_path, capsys):
    shutil.copytree(trained / "cases", tmp_path / "cases")
    bad = val_ids(trained / "d.h5")[0]
    flair = tmp_path / "cases" / bad / f"{bad}_flair.nii.gz"
    flair.write_bytes(flair.read_bytes()[:2000])
    shutil.copy(trained / "d.h5", tmp_path / "d.h5")
    with h5py.File(tmp_path / "d.h5", "a") as f:
        f.attrs["source"] = str(tmp_path / "cases")
    assert evaluate("--model", trained / "logs", "--data", tmp_path / "d.h5") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"unet-evaluate: error: case {bad}: {flair}: cannot read")
    assert len(err.strip().splitlines()) == 1


def test_png_shows_input_prediction_and_reference_in_region_colours(trained, oracle_predicted):
    import cv2

    from unet.data.labels import regions_from_labels
    png = cv2.imread(str(trained / "oracle_png" / f"{ONE}.png"))
    ref = regions_from_labels(array(trained / "cases" / ONE / f"{ONE}_seg.nii.gz"), "brats")
    pred = regions_from_labels(array(oracle_predicted / f"{ONE}.nii.gz"), "brats")
    # rows: the 3 slices with the most reference tumour; columns: input | prediction | reference
    assert png.shape == (3 * 80, 3 * 80, 3)
    chosen = sorted(np.argsort(ref[..., 0].reshape(40, -1).sum(1))[::-1][:3])
    for row, z in enumerate(chosen):
        tiles = [png[row * 80:(row + 1) * 80, col * 80:(col + 1) * 80].astype(int) for col in range(3)]
        b, g, r = np.moveaxis(tiles[0], -1, 0)
        assert np.array_equal(b, g) and np.array_equal(g, r)            # the input is grey
        for tile, m in ((tiles[1], pred[z]), (tiles[2], ref[z])):
            b, g, r = np.moveaxis(tile, -1, 0)
            wt, tc, et = (m[..., k].astype(bool) for k in range(3))
            assert np.array_equal((b == g) & (g == r), ~wt)       # grey exactly where WT is empty
            assert ((g - b >= 100) & (b == r))[wt & ~tc].all()    # WT only: green
            assert ((r - b >= 100) & (g > r))[tc & ~et].all()     # TC: yellow over green
            assert (r - g >= 100)[et].all()                       # ET: red over both
        assert ref[z, ..., 0].any()
    assert all(pred[chosen, ..., k].any() for k in range(3))   # every region's colour is in the prediction tiles


@pytest.fixture(scope="module")
def cropped(trained):
    """The module's cases converted with --inplane crop_resize (each head's square box, 60-70 voxels
    of the 80 x 80 grid, resized to 48 x 48), and a model trained on them."""
    p = py("unet.data.convert", "--input", trained / "cases", "--output", trained / "crop.h5", "--size", 48,
           "--inplane", "crop_resize", "--val_fraction", 0.5, "--no_progress")
    assert p.returncode == 0, p.stderr
    t = run_mpi(1, [os.path.join(ROOT, "train_hvd.py"), "--data", str(trained / "crop.h5"),
                    "--logdir", str(trained / "crop_logs"), "--batch_size", "4", "--epochs", "1",
                    "--steps_per_epoch", "1", "--export", "none"])
    assert t.returncode == 0, t.stderr[-2000:]
    return trained


def reference_round_trip(case, pred):
    """The case's reference regions carried to the network grid as unet-convert carries masks and
    returned as a perfect network's probabilities are (to_case_grid, threshold 0.5): (z, y, x, 3)."""
    from unet.data import preprocess as P
    from unet.data.labels import regions_from_labels
    chans, seg, _ = pred.read(case)
    inp = pred.network_input(chans)
    ref = regions_from_labels(seg, case.layout)
    small = np.stack([P.apply_inplane(r, inp.plan, is_mask=True) for r in ref]).astype(np.float32)
    return P.to_case_grid(small, inp) > 0.5, ref, inp.plan


def test_crop_resize_model_cuts_the_head_box_and_returns_predictions_into_it(cropped, tmp_path):
    from unet.data.layouts import find_cases
    from unet.inference.predict import Predictor
    from unet.metrics import dice
    logs = cropped / "crop_logs"
    with open(logs / "model.json") as f:
        attrs = json.load(f)["data"]["attrs"]
    assert (attrs["inplane"], attrs["crop_margin"]) == ("crop_resize", 2)   # recorded from the file
    pred = Predictor(str(logs))
    cases = {c.case_id: c for c in find_cases(str(cropped / "cases"))}
    with h5py.File(cropped / "crop.h5") as f:                 # the slices it was trained on, bit for bit
        g, geometry = f["val"], {k: json.loads(v) for k, v in f["cases"].attrs.items()}
        ids = g["case_id"].asstr()[:]
        for cid in sorted(set(ids)):
            chans, _, _ = pred.read(cases[cid])
            inp = pred.network_input(chans)
            assert inp.plan == geometry[cid]["plan"] and 48 < inp.plan["side"] < 80
            assert np.array_equal(inp.slices, g["images"][np.flatnonzero(ids == cid)])
    # the trained model through unet-predict: labels on the 80 x 80 x 40 input grid
    assert predict("--model", logs, "--case", cropped / "cases" / ONE, "--out", tmp_path / "p.nii.gz") == 0
    assert array(tmp_path / "p.nii.gz").shape == (40, 80, 80)
    # a perfect network through unet-evaluate --model scores what the reference carried through scores
    oracle_net = OracleNetwork(cropped / "crop.h5")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Predictor, "model", property(lambda self: oracle_net))
        assert evaluate("--model", logs, "--data", cropped / "crop.h5", "--csv", tmp_path / "s.csv",
                        "--metrics", "legacy", "--pred_dir", tmp_path / "pred", *RAW) == 0
    rows = read_csv(tmp_path / "s.csv")
    assert [r["case"] for r in rows] == val_ids(cropped / "crop.h5")
    for row in rows:
        want, ref, plan = reference_round_trip(cases[row["case"]], pred)
        got = brats_regions(array(tmp_path / "pred" / f"{row['case']}.nii.gz"))
        assert np.array_equal(got, want)                       # voxel for voxel, box placed where it was cut
        y0, x0, side = plan["y0"], plan["x0"], plan["side"]
        outside = np.ones((80, 80), bool)
        outside[max(y0, 0):y0 + side, max(x0, 0):x0 + side] = False
        assert outside.any() and not got[:, outside].any()      # outside the box: background
        for k, r in enumerate(("WT", "TC", "ET")):
            assert float(row[f"dice_{r}"]) == pytest.approx(dice(want[..., k], ref[..., k]), abs=1e-6)
            assert float(row[f"dice_{r}"]) > 0.5    # 48 pixels for a ~65-voxel head: a thin ET suffers


def brats_regions(labels):
    from unet.data.labels import regions_from_labels
    return regions_from_labels(labels, "brats").astype(bool)


def test_crop_resize_model_without_its_margin_is_refused(cropped, tmp_path, capsys):
    with open(cropped / "crop_logs" / "model.json") as f:
        meta = json.load(f)
    meta["data"]["attrs"].pop("crop_margin")
    (tmp_path / "model.json").write_text(json.dumps(meta))
    os.symlink(cropped / "crop_logs" / "model.keras", tmp_path / "model.keras")
    assert predict("--model", tmp_path, "--case", cropped / "cases" / ONE, "--out", tmp_path / "x.nii.gz") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"unet-predict: error: {tmp_path / 'model.json'}: data.attrs.crop_margin None: ")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.nii.gz").exists()
