"""Cross-validation: folds in the converted file, --fold in the trainer, out-of-fold and ensemble scoring,
the bootstrap interval of the summary, scripts/crossval.sh."""
import csv
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import HANG, ROOT, mpi_env

from unet.data.convert import assign_folds

SMALL = ["--shape", "40,64,64"]
K = 3
PY = sys.executable


def run(*args, **kw):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=HANG, cwd=ROOT, **kw)


def convert(*args):
    return run(PY, "-m", "unet.data.convert", "--no_progress", *args)


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    """7 sphere-phantom cases: 2 validation cases, 5 training cases in 3 folds; and the same conversion
    without folds."""
    root = tmp_path_factory.mktemp("cv")
    from unet.data.synth import main as synth
    assert synth(["--out", str(root / "cases"), "--cases", "7", *SMALL, "--seed", "2", "--anatomy", "sphere"]) == 0
    base = ["--input", root / "cases", "--size", 64, "--slices", "tumour", "--val_fraction", 0.25]
    p = convert(*base, "--output", root / "folds.h5", "--folds", K)
    assert p.returncode == 0, p.stderr
    q = convert(*base, "--output", root / "plain.h5")
    assert q.returncode == 0, q.stderr
    return SimpleNamespace(root=root, h5=root / "folds.h5", plain=root / "plain.h5", stdout=p.stdout)


def case_info(h5):
    with h5py.File(h5) as f:
        return {c: json.loads(v) for c, v in f["cases"].attrs.items()}


def group_rows(h5, group):
    with h5py.File(h5) as f:
        g = f[group]
        return list(zip(g["case_id"].asstr()[:], g["slice_index"][:].tolist()))


# -- folds ----------------------------------------------------------------------------------------------

def test_folds_deal_each_block_of_k_cases_by_volume_to_k_different_folds():
    rng = np.random.default_rng(0)
    vols = {f"c{i:02d}": float(v) for i, v in enumerate(rng.lognormal(3, 1, 23))}
    folds = assign_folds(vols, 5, seed=7)
    assert sorted(folds) == sorted(vols) and set(folds.values()) == set(range(5))
    assert sorted(np.bincount(list(folds.values()))) == [4, 4, 5, 5, 5]        # sizes differ by at most one
    order = sorted(vols, key=vols.get)
    for b in range(0, 20, 5):                                                  # every full block of 5 by volume
        assert sorted(folds[c] for c in order[b:b + 5]) == [0, 1, 2, 3, 4]
    assert len({folds[c] for c in order[20:]}) == 3                           # the last 3 in 3 different folds
    assert assign_folds(vols, 5, seed=7) == folds and assign_folds(vols, 5, seed=8) != folds
    # balanced: each fold holds one case of every block of 5 by volume, so its median volume lies
    # between the 20th and 80th percentiles of all volumes
    med = [np.median([vols[c] for c in folds if folds[c] == k]) for k in range(5)]
    lo, hi = np.quantile(list(vols.values()), [0.2, 0.8])
    assert all(lo <= m <= hi for m in med), (med, lo, hi)
    with pytest.raises(ValueError):
        assign_folds(vols, 1, seed=0)


def test_convert_records_the_folds_and_keeps_every_slice_of_the_training_cases(folded):
    info = case_info(folded.h5)
    with h5py.File(folded.h5) as f:
        assert f.attrs["folds"] == K and sorted(f) == ["cases", "rest", "train", "val"]
    train_cases = sorted(c for c, d in info.items() if d["split"] == "train")
    val_cases = sorted(c for c, d in info.items() if d["split"] == "val")
    assert len(train_cases) == 5 and len(val_cases) == 2
    assert all("fold" not in info[c] for c in val_cases)
    assert sorted(np.bincount([info[c]["fold"] for c in train_cases])) == [1, 2, 2]
    # the fold recorded is the one assign_folds gives the recorded whole-tumour volumes, which are the
    # label maps' (1 mm voxels: ml = voxels / 1000)
    for c in train_cases + val_cases:
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(folded.root / "cases" / c / f"{c}_seg.nii.gz")))
        assert info[c]["wt_ml"] == pytest.approx(np.count_nonzero(seg) / 1000, abs=1e-4)
    assert assign_folds({c: info[c]["wt_ml"] for c in train_cases}, K, 816) == {c: info[c]["fold"] for c in train_cases}
    # train + rest: every slice of every training case exactly once; train alone is the file without folds'
    train, rest = group_rows(folded.h5, "train"), group_rows(folded.h5, "rest")
    assert sorted(train + rest) == sorted((c, z) for c in train_cases for z in range(40))
    assert train == group_rows(folded.plain, "train")
    assert group_rows(folded.h5, "val") == group_rows(folded.plain, "val")
    assert len(rest) > 0 and not set(train) & set(rest)
    assert re.search(r"^unet-convert: 3 folds of the training cases \(by whole-tumour volume\): 0: \d case\(s\), WT",
                     folded.stdout, re.M), folded.stdout


@pytest.mark.parametrize("args,msg", [
    (["--folds", "1"], "--folds must be 0 (no folds) or >= 2 (got 1)"),
    (["--folds", "6"], "--folds 6: more folds than the 5 training case(s) of"),
    (["--folds", "2", "--format", "npy"], "--folds needs --format h5"),
])
def test_bad_folds_is_one_line_and_writes_nothing(folded, tmp_path, args, msg):
    p = convert("--input", folded.root / "cases", "--output", tmp_path / "o.h5", "--size", 64, "--val_fraction",
                0.25, *args)
    assert p.returncode == 2 and p.stderr.startswith(f"unet-convert: error: {msg}"), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not os.listdir(tmp_path)


# -- --fold in the trainer ------------------------------------------------------------------------------

def sources(*argv):
    from unet.data.sources import DataOptions, open_sources
    from unet.training.config import parse_args
    return open_sources(DataOptions.from_flags(parse_args(list(map(str, argv)))))


def rows_of(src):
    """(case, slice) of each row of a source (an H5Source view or a ConcatSource of views)."""
    out = []
    for part in getattr(src, "parts", [src]):
        g = part.f[part.images.parent.name]
        ids, zs = g["case_id"].asstr()[:], g["slice_index"][:]
        rows = np.arange(len(ids)) if part.rows is None else part.rows
        out += [(ids[i], int(zs[i])) for i in rows]
    return out


@pytest.mark.parametrize("k", range(K))
def test_fold_trains_on_the_other_folds_and_validates_on_every_slice_of_its_own(folded, k):
    info = case_info(folded.h5)
    mine = {c for c, d in info.items() if d.get("fold") == k}
    others = {c for c, d in info.items() if d.get("fold") not in (None, k)}
    train, val, data = sources("--data", folded.h5, "--fold", k)
    tr, va = rows_of(train), rows_of(val)
    assert {c for c, _ in tr} == others                                     # never a slice of fold k
    assert tr == [r for r in group_rows(folded.h5, "train") if r[0] in others]   # the converter's choice
    assert sorted(va) == sorted((c, z) for c in mine for z in range(40))    # all 40 slices of fold k's cases
    assert len(train) == len(tr) and len(val) == len(va)
    # what the views read is what the file stores for those rows
    with h5py.File(folded.h5) as f:
        where = {(c, z): (g, i) for g in ("train", "rest")
                 for i, (c, z) in enumerate(zip(f[g]["case_id"].asstr()[:], f[g]["slice_index"][:].tolist()))}
        pick = [0, len(val) // 2, len(val) - 1]
        imgs, msks = val.read(pick)
        for j, i in enumerate(pick):
            g, row = where[va[i]]
            assert np.array_equal(imgs[j], f[g]["images"][row]) and np.array_equal(msks[j], f[g]["masks"][row])
    assert data.to_json()["fold"] == k and data.to_json()["folds"] == K


def test_without_fold_a_file_with_folds_reads_as_its_train_and_val_split(folded):
    train, val, data = sources("--data", folded.h5)
    assert rows_of(train) == group_rows(folded.h5, "train") and rows_of(val) == group_rows(folded.h5, "val")
    assert data.to_json()["fold"] is None and data.to_json()["folds"] == K
    assert "fold" not in sources("--data", folded.plain)[2].to_json()       # a file without folds: as before


@pytest.mark.parametrize("make,fold,msg", [
    ("folds", 3, "--fold 3: {h5} has 3 folds, so --fold must be in 0..2"),
    ("folds", -1, "--fold -1: {h5} has 3 folds, so --fold must be in 0..2"),
    ("plain", 0, "--fold 0: {h5} has no folds (convert it with unet-convert --folds K)"),
    ("npy", 0, "--fold 0: {h5} is a folder of npy files, which have no folds"),
    ("synthetic", 0, "--fold selects cases of a --data file converted with --folds, not of --synthetic data"),
])
def test_bad_fold_is_one_line_naming_the_flag_and_the_file(folded, tmp_path, make, fold, msg):
    if make == "npy":
        p = convert("--input", folded.root / "cases", "--output", tmp_path / "npy", "--size", 64, "--format", "npy")
        assert p.returncode == 0, p.stderr
        data = tmp_path / "npy"
    else:
        data = {"folds": folded.h5, "plain": folded.plain}.get(make)
    where = ["--synthetic"] if make == "synthetic" else ["--data", data]
    p = run(PY, os.path.join(ROOT, "train_hvd.py"), *where, "--fold", fold, "--export", "none",
            "--logdir", tmp_path / "logs")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith(f"train_hvd.py: error: {msg.format(h5=data)}") and not (tmp_path / "logs").exists()


# -- scoring with several models ------------------------------------------------------------------------

class FakeNetwork:
    """Stands in for a model's network: returns ``scale`` x the masks the file stores for each input slice
    (found by its exact values) and records which cases it was shown."""

    def __init__(self, table, scale):
        self.table, self.scale, self.seen = table, scale, set()

    def __call__(self, batch, training=False):
        out = []
        for s in np.asarray(batch):
            case, masks = self.table.get(s.tobytes(), (None, None))
            if masks is None:
                assert not s.any(), "an input slice that is not in the file"
                masks = np.zeros(s.shape[:2] + (3,), np.float32)
            elif case:
                self.seen.add(case)
            out.append(self.scale * masks)
        return np.stack(out).astype(np.float32)


def slice_table(h5):
    """slice bytes -> (case id, masks), the case None for slices that occur in more than one case."""
    table = {}
    with h5py.File(h5) as f:
        for g in ("train", "rest", "val"):
            for c, img, m in zip(f[g]["case_id"].asstr()[:], f[g]["images"][:], f[g]["masks"][:]):
                key = img.tobytes()
                if key in table and table[key][0] != c:
                    c = None
                table[key] = (c, m.astype(np.float32))
    return table


def model_folder(path, h5, fold=None):
    """A model folder as the trainer leaves it (model.json from the file's metadata; the network is faked)."""
    with h5py.File(h5) as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v.tolist() if hasattr(v, "tolist") else v)
                 for k, v in f.attrs.items()}
    data = {"height": 64, "width": 64, "channels": 4, "regions": 3, "modalities": json.loads(attrs["modalities"]),
            "region_names": ["WT", "TC", "ET"], "attrs": attrs, "file": str(h5)}
    if fold is not None:
        data.update(folds=K, fold=fold)
    os.makedirs(path)
    (path / "model.json").write_text(json.dumps({"data": data}))
    (path / "model.keras").write_bytes(b"")
    return str(path)


RAW = ["--wt_components", "all", "--et_min_mm3", "0", "--engine", "tensorflow", "--metrics", "legacy"]


def evaluate_with(nets, *args):
    """unet-evaluate in this process, each --model folder's network replaced by nets[folder]."""
    from unet.evaluation.evaluate import main
    from unet.inference.predict import Predictor
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Predictor, "model", property(lambda self: nets[self.folder]))
        return main([str(a) for a in args] + RAW)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_out_of_fold_scores_each_case_with_the_model_of_its_fold(folded, tmp_path, capsys):
    table = slice_table(folded.h5)
    models = [model_folder(tmp_path / f"fold_{k}", folded.h5, fold=k) for k in range(K)]
    nets = {m: FakeNetwork(table, 1.0) for m in models}
    assert evaluate_with(nets, "--model", *models[::-1], "--data", folded.h5, "--csv", tmp_path / "oof.csv") == 0
    out = capsys.readouterr().out
    info = case_info(folded.h5)
    for k, m in enumerate(models):
        assert nets[m].seen == {c for c, d in info.items() if d.get("fold") == k}, k
    rows = read_csv(tmp_path / "oof.csv")
    assert {r["case"]: int(r["fold"]) for r in rows} == {c: d["fold"] for c, d in info.items() if "fold" in d}
    assert all(float(r["dice_WT"]) == 1.0 for r in rows)          # the file's own masks, carried through
    assert "out of fold: 5 training case(s)" in out and "(folds 0,1,2)" in out
    # the per-fold table: each fold's mean of the CSV's values; the summary's bootstrap interval
    from unet.evaluation.stats import bootstrap_mean_ci
    for k in range(K):
        line = re.search(rf"^{k}\s+(\d+)\s+(\S+)\s+\S+\s+\S+\s+(\S+)", out, re.M)
        mine = [r for r in rows if int(r["fold"]) == k]
        assert int(line[1]) == len(mine)
        assert float(line[2]) == pytest.approx(np.mean([float(r["dice_WT"]) for r in mine]), abs=5e-5)
        assert float(line[3]) == pytest.approx(np.mean([float(r["hd95_WT"]) for r in mine]), abs=5e-5)
    sens = re.search(r"^sens_ET\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", out, re.M)
    values = [float(r["sens_ET"]) for r in rows]
    lo, hi = bootstrap_mean_ci(values)
    assert [float(x) for x in sens.groups()] == pytest.approx([np.mean(values), np.std(values), lo, hi], abs=5e-5)
    # one model of a fold scores that fold's cases; a model without a fold cannot score out of fold
    nets = {m: FakeNetwork(table, 1.0) for m in models}
    assert evaluate_with(nets, "--model", models[1], "--data", folded.h5, "--csv", tmp_path / "one.csv") == 0
    assert {r["case"] for r in read_csv(tmp_path / "one.csv")} == {c for c, d in info.items() if d.get("fold") == 1}
    plain = model_folder(tmp_path / "plain", folded.h5)
    nets[plain] = FakeNetwork(table, 1.0)
    capsys.readouterr()
    assert evaluate_with(nets, "--model", models[0], plain, "--data", folded.h5) == 2
    assert capsys.readouterr().err == (f"unet-evaluate: error: --model {plain}: its model.json records no fold "
                                       f"(trained without --fold): out-of-fold scoring needs models trained with "
                                       f"--fold; --ensemble averages any models\n")
    assert evaluate_with(nets, "--model", models[0], models[0], "--data", folded.h5) == 2
    assert "both hold out fold 0" in capsys.readouterr().err


@pytest.mark.parametrize("scales,dice", [((0.9, 0.3), 1.0), ((0.9, 0.0), 0.0), ((0.3, 0.3), 0.0)])
def test_ensemble_thresholds_the_mean_of_the_models_probabilities(folded, tmp_path, capsys, scales, dice):
    """Hand check: the models return 0.9 and 0.3 where the tumour is: mean 0.6 > 0.5, the tumour is found
    (the lower alone, or a minimum, would miss it); 0.9 and 0: mean 0.45 < 0.5, nothing is found (a maximum
    would find it)."""
    table = slice_table(folded.h5)
    models = [model_folder(tmp_path / f"m{i}", folded.h5, fold=i) for i in range(2)]
    nets = {m: FakeNetwork(table, s) for m, s in zip(models, scales)}
    assert evaluate_with(nets, "--model", *models, "--ensemble", "--data", folded.h5, "--csv", tmp_path / "e.csv") == 0
    rows = read_csv(tmp_path / "e.csv")
    val = sorted(c for c, d in case_info(folded.h5).items() if d["split"] == "val")
    assert [r["case"] for r in rows] == val and "fold" not in rows[0]
    assert [float(r["dice_WT"]) for r in rows] == [dice] * len(val)
    assert all(n.seen == set(val) for n in nets.values())                     # both models saw every case
    assert "ensemble: the mean of 2 models' probabilities on 2 case(s)" in capsys.readouterr().out


def test_ensemble_probabilities_are_the_mean_of_the_models(folded, tmp_path):
    from unet.data.layouts import find_cases
    from unet.evaluation.crossval import Ensemble
    from unet.inference.predict import Predictor
    preds = [Predictor(model_folder(tmp_path / f"m{i}", folded.h5), engine="tensorflow") for i in range(2)]
    rng = np.random.default_rng(3)
    weights = [rng.uniform(0, 1, (4, 3)).astype(np.float32) for _ in preds]
    for p, w in zip(preds, weights):       # a different smooth function of the input per model
        p._model = lambda x, training=False, w=w: 1 / (1 + np.exp(-np.asarray(x) @ w))
    case = find_cases(str(folded.root / "cases"))[0]
    chans, _, _ = preds[0].read(case)
    (pa, brain), (pb, _) = (p.probabilities(chans) for p in preds)
    mean, brain_e = Ensemble(preds, ["a", "b"]).probabilities(chans)
    assert np.array_equal(brain_e, brain) and pa.std() > 0.01 and np.abs(pa - pb).max() > 0.1
    assert mean.dtype == np.float32 and np.array_equal(mean, (pa + pb) / 2)   # the same float32 sum and halving


def test_ensemble_refuses_models_of_other_channels(folded, tmp_path):
    from unet.evaluation.crossval import Ensemble, EvalError
    from unet.inference.predict import Predictor
    a = Predictor(model_folder(tmp_path / "a", folded.h5), engine="tensorflow")
    b = Predictor(model_folder(tmp_path / "b", folded.h5), engine="tensorflow")
    b.modalities = ("FLAIR",)
    with pytest.raises(EvalError, match=r"--model b: takes FLAIR -> WT,TC,ET, --model a FLAIR,T1,T1ce,T2"):
        Ensemble([a, b], ["a", "b"])


# -- the bootstrap interval -----------------------------------------------------------------------------

def reference_ci(values, level, resamples, seed, block):
    """The module docstring's recipe, written out: blocks of resamples, block j from default_rng([seed, j])."""
    v = np.asarray(values, float)
    means = []
    j = 0
    while len(means) < resamples:
        rows = min(block, resamples - len(means))
        idx = np.random.default_rng([seed, j]).integers(0, len(v), (rows, len(v)))
        means += [float(np.mean(v[i])) for i in idx]
        j += 1
    return tuple(np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2]))


def test_bootstrap_interval_follows_its_recipe_and_a_hand_computation():
    from unet.evaluation.stats import BLOCK, bootstrap_mean_ci
    v = [0.91, 0.72, 0.85, 0.40, 0.99, 0.66, 0.80]
    assert bootstrap_mean_ci(v, resamples=2500, seed=4) == pytest.approx(reference_ci(v, 0.95, 2500, 4, BLOCK),
                                                                         rel=1e-12)
    assert bootstrap_mean_ci(v, seed=4) == bootstrap_mean_ci(v, seed=4) != bootstrap_mean_ci(v, seed=5)
    # by hand: 3 values have 27 equally likely ordered resamples; the smallest mean, 0 (0,0,0), and the
    # largest, 5 (5,5,5), each have probability 1/27 = 3.7 % > 2.5 %, so the interval is [0, 5]
    assert bootstrap_mean_ci([0.0, 1.0, 5.0]) == (0.0, 5.0)
    assert bootstrap_mean_ci([0.7] * 9) == pytest.approx((0.7, 0.7), abs=1e-12)
    lo, hi = bootstrap_mean_ci([])
    assert np.isnan(lo) and np.isnan(hi)


def test_bootstrap_interval_matches_scipy_and_normal_theory():
    from scipy import stats

    from unet.evaluation.stats import bootstrap_mean_ci
    x = np.random.default_rng(11).normal(0.8, 0.1, 60)
    lo, hi = bootstrap_mean_ci(x)
    ref = stats.bootstrap((x,), np.mean, confidence_level=0.95, n_resamples=10000, method="percentile",
                          random_state=np.random.default_rng(1)).confidence_interval
    se = x.std() / np.sqrt(len(x))
    # two Monte Carlo estimates of a 2.5 % quantile from 10,000 resamples each: standard error of their
    # difference ~0.04 standard errors of the mean; allowed 0.2 (5 x)
    assert lo == pytest.approx(ref.low, abs=0.2 * se) and hi == pytest.approx(ref.high, abs=0.2 * se)
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.1)                # the normal-theory width
    assert lo < x.mean() < hi


def test_per_fold_means():
    from unet.evaluation.stats import describe, per_fold_means
    rows = [{"fold": 0, "d": 1.0}, {"fold": 1, "d": 0.5}, {"fold": 0, "d": 0.0}, {"d": 9.0}]
    assert per_fold_means(rows, ["d"]) == {0: {"n": 2, "d": 0.5}, 1: {"n": 1, "d": 0.5}}
    d = describe([1.0, 2.0, 3.0, 6.0])
    assert (d["n"], d["mean"], d["std"]) == (4, 3.0, pytest.approx(np.sqrt(3.5)))


# -- scripts/crossval.sh --------------------------------------------------------------------------------

def crossval(*args):
    return run("bash", os.path.join(ROOT, "scripts", "crossval.sh"), *args, env=mpi_env(PY=PY))


def test_crossval_dry_run_prints_every_command(folded, tmp_path):
    p = crossval("--dry-run", "--data", folded.h5, "--logdir", tmp_path / "cv", "--epochs", 2)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == K + 2 and not (tmp_path / "cv").exists()
    for k in range(K):
        assert lines[k] == (f"mpirun -np 2 --oversubscribe {PY} {ROOT}/train_hvd.py --data {folded.h5} --fold {k} "
                            f"--logdir {tmp_path}/cv/fold_{k} --epochs 2 ")
    models = " ".join(f"{tmp_path}/cv/fold_{k}" for k in range(K))
    assert lines[K].startswith(f"mpirun -np 2 --oversubscribe {PY} -m unet.evaluation.evaluate --model {models} "
                               f"--data {folded.h5} --metrics all --csv {tmp_path}/cv/out_of_fold.csv")
    assert f"--model {models} --ensemble --data {folded.h5}" in lines[K + 1]


@pytest.mark.parametrize("tta,scored", [([], ""), (["--tta"], "--tta "), (["--tta", "lr"], "--tta lr "),
                                        (["--tta", "all"], "--tta all ")])
def test_crossval_passes_the_tta_choice_to_both_scorings_and_nothing_else(folded, tmp_path, tta, scored):
    p = crossval("--dry-run", "--data", folded.h5, "--logdir", tmp_path / "cv", *tta, "--epochs", 2)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert all(line.endswith("--epochs 2 ") for line in lines[:K])
    for line in lines[K:]:
        assert f"--metrics all {scored}--csv" in line


@pytest.mark.parametrize("args,msg", [
    (["--data", "/nonexistent.h5"], "--data /nonexistent.h5: no such file"),
    (["--data", "{plain}"], "--data {plain}: the file has no folds (convert it with unet-convert --folds K)"),
    (["--data", "{h5}", "--fold", "1"], "--fold: crossval.sh sets --fold, --logdir and --data of each run itself"),
    (["--data", "{h5}", "--np", "0"], "--np must be a whole number >= 1 (got 0)"),
    (["--data", "{h5}", "--metrics", "x"], "--metrics must be legacy, lesionwise or all (got x)"),
])
def test_crossval_bad_input_is_one_line(folded, args, msg):
    p = crossval("--dry-run", *[a.format(h5=folded.h5, plain=folded.plain) for a in args])
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and p.stdout == "" and len(lines) == 1, p.stderr
    assert lines[0].startswith(f"crossval.sh: error: {msg.format(h5=folded.h5, plain=folded.plain)}")


@pytest.mark.mpi
def test_crossval_trains_every_fold_on_two_ranks_and_scores_out_of_fold(folded, tmp_path):
    cv = tmp_path / "cv"
    flags = ["--data", folded.h5, "--logdir", cv, "--metrics", "legacy", "--epochs", 1, "--batch_size", 2,
             "--export", "none"]
    p = crossval(*flags)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    info = case_info(folded.h5)
    for k in range(K):
        with open(cv / f"fold_{k}" / "model.json") as f:
            data = json.load(f)["data"]
        assert (data["fold"], data["folds"], data["file"]) == (k, K, str(folded.h5))
        # an epoch is the other folds' training slices, 4 a step (2 ranks x 2)
        n_train = sum(1 for c, _ in group_rows(folded.h5, "train") if info[c].get("fold") not in (None, k))
        assert f"logdir: {cv / f'fold_{k}'}" in p.stdout
        assert re.search(rf"global_batch=4 steps/epoch={-(-n_train // 4)} .*\n(.*\n)?data: {folded.h5}\n"
                         rf"logdir: {cv / f'fold_{k}'}\n", p.stdout), p.stdout
        assert "validation epoch 1" in (cv / f"fold_{k}" / "training.log").read_text()
    rows = read_csv(cv / "out_of_fold.csv")
    assert {r["case"]: int(r["fold"]) for r in rows} == {c: d["fold"] for c, d in info.items() if "fold" in d}
    assert "per-fold means" in (cv / "out_of_fold.txt").read_text()
    ens = read_csv(cv / "ensemble.csv")
    assert sorted(r["case"] for r in ens) == sorted(c for c, d in info.items() if d["split"] == "val")
    # run again: every fold is done, nothing is trained, the scores are the same
    q = crossval(*flags)
    assert q.returncode == 0, q.stderr[-3000:]
    assert q.stdout.count("done (") == K and "global_batch" not in q.stdout
    assert read_csv(cv / "out_of_fold.csv") == rows


def test_crossval_refuses_a_logdir_holding_another_fold(folded, tmp_path):
    (tmp_path / "cv" / "fold_0").mkdir(parents=True)
    (tmp_path / "cv" / "fold_0" / "model.json").write_text(json.dumps({"data": {"fold": 1, "file": str(folded.h5)}}))
    p = crossval("--data", folded.h5, "--logdir", tmp_path / "cv")
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.strip().splitlines() == [
        f"crossval.sh: error: {tmp_path}/cv/fold_0/model.json: trained on fold 1 of {folded.h5}, not fold 0 of "
        f"{folded.h5}: give another --logdir"]
    assert sorted(os.listdir(tmp_path / "cv")) == ["fold_0"]                 # nothing trained


@pytest.mark.mpi
def test_two_ranks_convert_the_same_folds_and_slices(folded, tmp_path):
    from conftest import run_mpi
    p = run_mpi(2, ["-m", "unet.data.convert", "--no_progress", "--input", str(folded.root / "cases"), "--size", "64",
                    "--slices", "tumour", "--val_fraction", "0.25", "--folds", str(K),
                    "--output", str(tmp_path / "m.h5")])
    assert p.returncode == 0, p.stderr[-2000:]
    assert case_info(tmp_path / "m.h5") == case_info(folded.h5)
    with h5py.File(tmp_path / "m.h5") as a, h5py.File(folded.h5) as b:
        assert a.attrs["folds"] == K
        for g in ("train", "rest", "val"):
            ra, rb = group_rows(tmp_path / "m.h5", g), group_rows(folded.h5, g)
            assert sorted(ra) == sorted(rb), g
            ia, ib = np.argsort([f"{c}/{z:04d}" for c, z in ra]), np.argsort([f"{c}/{z:04d}" for c, z in rb])
            assert np.array_equal(a[g]["masks"][:][ia], b[g]["masks"][:][ib])
            assert np.array_equal(a[g]["images"][:][ia], b[g]["images"][:][ib])
