"""One error path: every command line reports a UsageError as one line, once per job, exit status 2."""
import ast
import configparser
import pathlib

import pytest

from unet.cli import USAGE, command, launcher_rank, run_cli
from unet.errors import UsageError
from unet.inference.postprocess import PostError
from unet.launch.hostfile import HostfileError

ROOT = pathlib.Path(__file__).resolve().parent.parent
# the command lines beside the console scripts: the launchers' scripts and the hostfile check run these
MODULE_COMMANDS = ["unet.launch.commands:main", "unet.launch.hostfile:main"]


def fails(error):
    def main(argv=None):
        raise error
    return main


@pytest.mark.parametrize("error", [UsageError("--x 3: no such thing"), PostError("--threshold must be in (0, 1)"),
                                   HostfileError("hosts:2: bad host name '-a'")])
def test_a_usage_error_is_one_line_and_status_2(error, capsys, monkeypatch):
    for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "HOROVOD_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert run_cli("unet-x", fails(error)) == USAGE == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"unet-x: error: {error}\n")


def test_only_rank_0_reports_an_agreed_error(capsys, monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    assert launcher_rank() == 1
    assert command("unet-x")(fails(UsageError("--data d.h5: no such file")))() == 2
    assert capsys.readouterr().err == ""
    # an error this rank found alone (no agreement possible) is said by this rank
    assert command("unet-x")(fails(UsageError("ckpt.npz: not a checkpoint", local=True)))() == 2
    assert capsys.readouterr().err == "unet-x: error: ckpt.npz: not a checkpoint\n"


def test_a_bug_still_raises():
    with pytest.raises(ZeroDivisionError):
        run_cli("unet-x", fails(ZeroDivisionError("bug")))


def test_the_exit_status_passes_through():
    assert command("unet-x")(lambda argv=None: 0)() == 0


def entry_points():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return [line.split("=", 1)[1].strip() for line in lines] + MODULE_COMMANDS


def goes_through_the_wrapper(fn: ast.FunctionDef) -> bool:
    decorated = any(isinstance(d, ast.Call) and getattr(d.func, "id", None) == "command" for d in fn.decorator_list)
    calls = any(isinstance(n, ast.Call) and getattr(n.func, "id", None) == "run_cli" for n in ast.walk(fn))
    return decorated or calls


@pytest.mark.parametrize("target", entry_points())
def test_every_command_line_reports_through_the_wrapper(target):
    module, func = target.split(":")
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == func)
    assert goes_through_the_wrapper(fn), f"{target} does not report errors through unet.cli"
