"""The `radixflow` command line: help for every option, --version, no abbreviations, one-line
errors for environments that cannot run an option, and the scheduler's log line rates."""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys

import pytest

from radixflow.runtime.server.cli import build_parser
from radixflow.runtime.server.scheduler_process import _StepLogger

CLI = [sys.executable, "-m", "radixflow.runtime.server.cli"]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_every_option_has_help_and_its_default(command: str) -> None:
    missing = []
    for action in _subparsers()[command]._actions:
        if not action.option_strings or action.dest == "help":
            continue
        text = action.help or ""
        if not re.sub(r"\(default: [^)]*\)", "", text).strip() or (
                action.default is not argparse.SUPPRESS and action.default is not None and "default" not in text
                and not isinstance(action.default, bool)):
            missing.append(action.option_strings[-1])
    assert not missing, f"{command}: options without help text or default: {missing}"


def run(*args: str) -> subprocess.CompletedProcess:
    # Without TRITON_INTERPRET, which the kernel test modules set in this process at import.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, env=env)


def test_version() -> None:
    res = run("--version")
    assert res.returncode == 0 and re.fullmatch(r"radixflow \d+\.\d+\.\d+\S*\n", res.stdout), res


def test_abbreviations_are_refused() -> None:
    res = run("generate", "hi", "--temp", "0.5")
    assert res.returncode == 2 and "unrecognized arguments: --temp" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "--help" in res.stderr


@pytest.mark.parametrize(("args", "advice"), [
    (["serve", "--device", "cuda"], "--device cpu"),
    (["generate", "hi", "--attention-backend", "triton", "--device", "cpu"], "--attention-backend torch"),
    (["serve", "--model", "/no/such/model"], "a .gguf file"),
    (["serve", "--model", "/"], "no config.json"),
    (["serve", "--schedule-policy", "random"], "schedule_policy must be one of"),
    (["serve", "--max-total-tokens", "many"], "invalid int value"),
])
def test_environment_errors_are_one_line(args: list[str], advice: str) -> None:
    if "cuda" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    res = run(*args)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("radixflow: error: ") and advice in lines[0]


class _Sched:
    """The two things _StepLogger reads of a scheduler, set by the test."""

    def __init__(self) -> None:
        self.stats = {"steps": 0}
        self.info = {"generated_tokens": 0, "computed_prompt_tokens": 0, "pool_size": 100, "free_slots": 100,
                     "evictable_slots": 0, "num_running": 0, "num_waiting": 0, "cache": {"hit_rate": 0.0},
                     "retractions": 0}

    def get_info(self) -> dict:
        return self.info


def test_log_line_rates_are_over_busy_time(caplog: pytest.LogCaptureFixture) -> None:
    sched, log = _Sched(), _StepLogger(interval=10)
    log.last_time -= 30.0  # 30 s of wall time since the last line, of which 0.5 s were steps
    log.add_busy(0.5)
    sched.stats["steps"], sched.info["generated_tokens"] = 10, 20
    with caplog.at_level(logging.INFO, logger="radixflow.scheduler"):
        log.maybe_log(sched)
    line = caplog.records[-1].getMessage()
    assert "gen 40.0 tok/s" in line and "over 0.5 s busy" in line, line
