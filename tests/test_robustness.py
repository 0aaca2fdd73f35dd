"""The pieces of scripts/robustness.py that decide its verdicts: the cells it runs, their command lines,
the validation history read back from a training.log, what counts as collapsed and the seeds' spread."""
import importlib.util
import os
import shlex
import subprocess
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("robustness", os.path.join(ROOT, "scripts", "robustness.py"))
rb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rb)


def test_grid_holds_every_batch_and_rate_the_default_cells_seeds_twice_its_rate_and_the_flag_defaults():
    names = [c["name"] for c in rb.cells()]
    assert names[:9] == [f"b{b}_lr{r}" for b in (2, 4, 8) for r in ("2.5e-4", "5e-4", "1e-3")]
    assert names[9:] == ["b4_lr1e-3_seed1", "b4_lr1e-3_seed2", "b4_lr2e-3", "defaults"]
    assert [c["rate"] for c in rb.cells()][:3] == [0.00025, 0.0005, 0.001]
    # the recipe before: its grid and names as they were
    old = [c["name"] for c in rb.cells(4e-4)]
    assert old[:9] == [f"b{b}_lr{r}" for b in (2, 4, 8) for r in ("1e-4", "2e-4", "4e-4")]
    assert old[9:11] == ["b4_lr4e-4_seed1", "b4_lr4e-4_seed2"]


def demo_train_flags() -> tuple[list[str], dict]:
    """The training flags of scripts/demo.sh's trainer command (--dry-run) but for its data, logging and the
    grid's own (batch, rate, epochs), and the values of those."""
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "demo.sh"), "--dry-run"], capture_output=True,
                         text=True, check=True).stdout
    argv = shlex.split(next(line for line in out.splitlines() if "train_hvd.py" in line))
    argv = argv[next(i for i, w in enumerate(argv) if w.endswith("train_hvd.py")) + 1:]
    own, rest, i = {}, [], 0
    while i < len(argv):
        if argv[i] in ("--data", "--log_every", "--logdir", "--batch_size", "--learningrate", "--epochs"):
            own[argv[i]] = argv[i + 1]
            i += 2
        else:
            rest.append(argv[i])
            i += 1
    return rest, own


def test_grid_cells_run_the_demos_flags_and_the_defaults_cell_none():
    rest, own = demo_train_flags()
    assert rest == shlex.split(rb.DEMO_FLAGS), "robustness.py's DEMO_FLAGS are not the demo's training flags"
    assert (int(own["--batch_size"]), float(own["--learningrate"])) == rb.DEFAULT_CELL
    assert int(own["--epochs"]) == rb.EPOCHS
    a = SimpleNamespace(out="/o", np=2, preload="", trainer="t.py", data="d.h5", epochs=3,
                        flags="--bce_weight 2")
    by_name = {c["name"]: c for c in rb.cells()}
    cmd = rb.cell_command(by_name["b2_lr2.5e-4"], a)
    assert cmd[:4] == ["mpirun", "-np", "2", "--oversubscribe"]
    i = cmd.index("--batch_size")
    assert cmd[i:i + 8] == ["--batch_size", "2", "--learningrate", "0.00025", "--epochs", "3", "--seed", "816"]
    assert cmd[i + 8:i + 10] == ["--bce_weight", "2"]
    assert "--bce_weight" not in rb.cell_command(by_name["defaults"], a)


def test_validation_history_takes_the_last_line_of_a_resumed_epoch(tmp_path):
    log = tmp_path / "training.log"
    log.write_text("step 10 loss 0.9\n"
                   "validation epoch 1 step 56 loss 0.51000 dice_WT 0.400 dice_TC 0.300 dice_ET 0.200\n"
                   "validation epoch 2 step 112 loss 0.41000 dice_WT 0.600 dice_TC 0.500 dice_ET 0.050\n"
                   "validation epoch 2 step 112 loss 0.40000 dice_WT 0.610 dice_TC 0.520 dice_ET 0.150\n")
    history = rb.validation_history(str(log))
    assert history == [[0.4, 0.3, 0.2], [0.61, 0.52, 0.15]]
    assert not rb.collapsed(history[-1])
    assert rb.collapsed([0.61, 0.52, 0.099]) and rb.collapsed([0.499, 0.9, 0.9])


def result(name, seed, finals):
    return dict(name=name, batch=4, rate=1e-3, seed=seed, validation=finals, final=finals[-1],
                collapsed=rb.collapsed(finals[-1]), wall_s=1.0)


def test_seed_spread_is_the_largest_regions_range_over_all_seeds():
    assert abs(rb.seed_spread([[0.9, 0.8, 0.7], [0.92, 0.79, 0.69], [0.91, 0.83, 0.7]]) - 0.04) < 1e-12
    near = [result("b4_lr1e-3", 816, [[0.93, 0.92, 0.87]]), result("b4_lr1e-3_seed1", 1, [[0.94, 0.91, 0.86]]),
            result("b4_lr1e-3_seed2", 2, [[0.92, 0.93, 0.88]])]
    text = rb.table(near)
    assert "seeds 816, 1, 2: largest difference 0.020 (within 0.03)" in text
    assert "collapsed: 0 of 3 cells" in text
    far = near[:2] + [result("b4_lr1e-3_seed2", 2, [[0.88, 0.93, 0.88]])]
    assert "largest difference 0.060 (beyond 0.03)" in rb.table(far)


def test_held_out_scores_get_a_column_and_a_seed_verdict_of_their_own():
    score = "/runs/tune3.h5"
    runs = [dict(result("b4_lr1e-3", 816, [[0.935, 0.932, 0.874]]), scores={score: [0.951, 0.915, 0.887]}),
            dict(result("b4_lr1e-3_seed1", 1, [[0.869, 0.919, 0.859]]), scores={score: [0.947, 0.909, 0.865]}),
            result("b4_lr1e-3_seed2", 2, [[0.879, 0.924, 0.876]])]          # not scored: no column value
    text = rb.table(runs, score=score)
    head, rule, first, _, third = text.splitlines()[:5]
    assert "held-out Dice WT / TC / ET (tune3.h5)" in head and rule.count("|---") == head.count("|") - 1
    assert "| 0.935 / 0.932 / 0.874 | 0.951 / 0.915 / 0.887 |" in first and "| 0.879 / 0.924 / 0.876 | – |" in third
    assert "seeds 816, 1, 2: largest difference 0.066 (beyond 0.03)" in text
    assert "on tune3.h5's validation split, seeds 816, 1: largest difference 0.022 (within 0.03)" in text
    assert "held-out" not in rb.table(runs) and "validation split" not in rb.table(runs)


def test_case_scores_get_two_columns_and_a_seed_verdict_of_their_own():
    cases = "/runs/tune3"
    got = dict(cases=12, dice=[0.9521, 0.9258, 0.9173], lowest=[0.912, 0.801, 0.77], hd95_wt=16.62,
               hd95_wt_median=1.2, hd95_wt_over=3)
    runs = [dict(result("b4_lr1e-3", 816, [[0.935, 0.932, 0.874]]), case_scores={cases: got}),
            dict(result("b4_lr1e-3_seed1", 1, [[0.93, 0.92, 0.86]]),
                 case_scores={cases: dict(got, dice=[0.9401, 0.9258, 0.9073])}),
            result("b4_lr1e-3_seed2", 2, [[0.93, 0.92, 0.87]])]             # not scored
    text = rb.table(runs, score_cases=cases)
    head, rule, first, _, third = text.splitlines()[:5]
    assert "tune3: volume Dice WT / TC / ET (lowest case) | HD95 WT mean, median (cases > 4 mm)" in head
    assert rule.count("|---") == head.count("|") - 1 == first.count("|") - 1
    assert "| 0.952 / 0.926 / 0.917 (0.912 / 0.801 / 0.770) | 16.62, 1.20 (3 of 12) |" in first
    assert "| – | – |" in third
    assert "on tune3's cases (volume Dice), seeds 816, 1: largest difference 0.012 (within 0.03)" in text
    assert "tune3" not in rb.table(runs)
