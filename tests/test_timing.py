"""The one timing loop of the engines: every engine on every item, none always after another."""
from unet.inference.timing import interleaved


def test_every_engine_runs_every_item_and_each_goes_first_as_often():
    calls = []
    engines = {name: (lambda item, name=name: calls.append((name, item)) or f"{name}:{item}") for name in "abc"}
    done = interleaved(engines, ["x", "y"], rounds=3)
    assert {n: [r for _, r in v] for n, v in done.items()} == {n: [f"{n}:x", f"{n}:y"] * 3 for n in "abc"}
    firsts = [calls[i][0] for i in range(0, len(calls), 3)]       # who ran first at each of the 6 items
    assert sorted(firsts) == ["a", "a", "b", "b", "c", "c"]


def test_one_round_reads_an_iterable_one_item_at_a_time():
    read = []

    def items():
        for i in range(3):
            read.append(i)
            yield i

    seen = []
    done = interleaved({"fp32": lambda i: seen.append(("fp32", i, len(read))),
                        "int8": lambda i: seen.append(("int8", i, len(read)))}, items())
    assert [len(v) for v in done.values()] == [3, 3]
    # alternating, as int8's cost measures fp32 and int8 case by case; never more than one case read ahead
    assert seen == [("fp32", 0, 1), ("int8", 0, 1), ("int8", 1, 2), ("fp32", 1, 2), ("fp32", 2, 3), ("int8", 2, 3)]
