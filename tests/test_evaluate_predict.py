"""unet-predict and unet-evaluate on synthetic cases: geometry kept, scores right, errors named."""
import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ROOT, run_mpi

pytestmark = pytest.mark.mpi


def py(module, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    from unet.data.synth import main as synth
    assert synth(["--out", str(root / "cases"), "--cases", "3", "--shape", "40,64,64", "--seed", "4"]) == 0
    p = py("unet.data.convert", "--input", root / "cases", "--output", root / "d.h5", "--size", 64, "--no_progress")
    assert p.returncode == 0, p.stderr
    t = run_mpi(1, [os.path.join(ROOT, "train_hvd.py"), "--data", str(root / "d.h5"), "--logdir", str(root / "logs"),
                    "--batch_size", "4", "--epochs", "1", "--steps_per_epoch", "2"])
    assert t.returncode == 0, t.stderr[-2000:]
    return root


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_predict_writes_labels_on_the_input_geometry_and_scores_round_trip(trained, tmp_path):
    case = trained / "cases" / "BraTS20_Training_001"
    out = tmp_path / "pred"
    p = py("unet.predict", "--model", trained / "logs", "--case", trained / "cases", "--out", out, "--png", tmp_path / "png")
    assert p.returncode == 0, p.stderr
    ref = sitk.ReadImage(str(case / "BraTS20_Training_001_flair.nii.gz"))
    pred = sitk.ReadImage(str(out / "BraTS20_Training_001.nii.gz"))
    assert pred.GetSize() == ref.GetSize() == (64, 64, 40)
    assert pred.GetSpacing() == ref.GetSpacing() and pred.GetOrigin() == ref.GetOrigin()
    assert pred.GetDirection() == ref.GetDirection()
    assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2, 4}
    assert (tmp_path / "png" / "BraTS20_Training_001.png").stat().st_size > 1000
    e = py("unet.evaluate", "--pred_dir", out, "--ref_dir", trained / "cases", "--csv", tmp_path / "s.csv")
    assert e.returncode == 0, e.stderr
    rows = read_csv(tmp_path / "s.csv")
    assert [r["case"] for r in rows] == [f"BraTS20_Training_00{i}" for i in (1, 2, 3)]
    assert list(rows[0]) == ["case", "dice_WT", "dice_TC", "dice_ET", "hd95_WT", "hd95_TC", "hd95_ET",
                             "sens_WT", "sens_TC", "sens_ET", "spec_WT", "spec_TC", "spec_ET"]
    assert all(0 <= float(r["dice_WT"]) <= 1 for r in rows)
    assert "dice_WT" in e.stdout and "median" in e.stdout


def test_reference_against_itself_scores_perfectly_and_missing_cases_are_reported(trained, tmp_path):
    pred = tmp_path / "pred"; pred.mkdir()
    for i in (1, 2):
        cid = f"BraTS20_Training_00{i}"
        shutil.copy(trained / "cases" / cid / f"{cid}_seg.nii.gz", pred / f"{cid}.nii.gz")
    shutil.copy(pred / "BraTS20_Training_001.nii.gz", pred / "extra_case.nii.gz")
    e = py("unet.evaluate", "--pred_dir", pred, "--ref_dir", trained / "cases", "--csv", tmp_path / "s.csv")
    assert e.returncode == 0, e.stderr
    for r in read_csv(tmp_path / "s.csv"):
        for reg in ("WT", "TC", "ET"):
            assert float(r[f"dice_{reg}"]) == 1.0 and float(r[f"hd95_{reg}"]) == 0.0
    assert "not scored, in predictions only: extra_case" in e.stdout
    assert "not scored, in reference only: BraTS20_Training_003" in e.stdout


def test_geometry_mismatch_names_the_case(trained, tmp_path):
    pred = tmp_path / "pred"; pred.mkdir()
    cid = "BraTS20_Training_002"
    img = sitk.ReadImage(str(trained / "cases" / cid / f"{cid}_seg.nii.gz"))
    img.SetSpacing((1.0, 1.0, 3.0))
    sitk.WriteImage(img, str(pred / f"{cid}.nii.gz"))
    e = py("unet.evaluate", "--pred_dir", pred, "--ref_dir", trained / "cases")
    assert e.returncode == 2
    assert e.stderr.startswith(f"unet-evaluate: error: case {cid}: ") and "spacing" in e.stderr
    assert len(e.stderr.strip().splitlines()) == 1


def test_scoring_a_model_on_two_ranks(trained, tmp_path):
    p = run_mpi(2, ["-m", "unet.evaluate", "--model", str(trained / "logs"), "--data", str(trained / "d.h5"),
                    "--csv", str(tmp_path / "m.csv"), "--pred_dir", str(tmp_path / "p")])
    assert p.returncode == 0, p.stderr[-2000:]
    import h5py
    with h5py.File(trained / "d.h5") as f:
        val = sorted(set(f["val"]["case_id"].asstr()[:]))
    assert [r["case"] for r in read_csv(tmp_path / "m.csv")] == val
    assert sorted(os.listdir(tmp_path / "p")) == [f"{c}.nii.gz" for c in val]
    assert p.stdout.count("volume-level scores over") == 1
