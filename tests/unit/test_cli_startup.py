"""The CLI's start-up: the garbage collector is paused and frozen only when `main()` runs the process."""

from __future__ import annotations

import gc
import subprocess
import sys

from llava_kit import cli


def test_main_with_arguments_leaves_the_collector_alone(capsys):
    frozen = gc.get_freeze_count()
    assert cli.main(["projectors", "--grid", "4", "--vision-width", "8", "--llm-width", "16"]) == 0
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    assert "mlp2x_gelu" in capsys.readouterr().out


def test_startup_done_resumes_only_a_collector_main_paused():
    gc.disable()
    try:
        cli._startup_done()  # not paused by main(): nothing to resume
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_program_runs_a_command_outside_the_fast_start_with_the_collector_on():
    code = ("import gc, sys; from llava_kit import cli; "
            "cli.cmd_projectors = lambda args: print(gc.isenabled(), file=args.results) or 0; "
            "sys.argv = ['llava-kit', 'projectors']; sys.exit(cli.main())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
