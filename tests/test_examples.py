"""Each example runs as a script on the default model, exits 0 and prints what it promises."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str) -> str:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py")], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_hello():
    out = run_example("hello")
    assert re.search(r"^greeting: \S", out, re.M)
    assert "'role': 'assistant'" in out and re.search(r"^streamed: \S", out, re.M)


def test_multi_turn_chat():
    out = run_example("multi_turn_chat")
    assert out.count("assistant: ") == 3
    cached = [int(x) for x in re.findall(r"(\d+) from the cache", out)]
    assert len(cached) == 3 and cached[1] > 0 and cached[2] > cached[1]  # later turns reuse earlier ones


def test_json_extraction():
    out = run_example("json_extraction")
    people = re.findall(r"-> (\{.*\})", out)
    assert len(people) == 3
    for p in people:  # printed as Python dicts
        person = ast.literal_eval(p)
        assert set(person) == {"name", "age", "city"} and isinstance(person["age"], int)


def test_react_agent():
    out = run_example("react_agent")
    assert re.search(r"^Action: calculator\[\d+ [-+*/] \d+\]$", out, re.M)
    assert re.search(r"^Observation: -?[\d.e+]+$", out, re.M)
    assert re.search(r"^final answer: -?\d+(\.\d+)?$", out, re.M)


def test_tree_of_thought():
    out = run_example("tree_of_thought")
    m = re.search(r"^(\d+) leaves, judge scores .*: \[(.*)\]$", out, re.M)
    assert m and int(m.group(1)) == 9 and len(m.group(2).split(",")) == 9
    assert out.count("Thought:") == 2 and "So the answer is" in out


@pytest.mark.parametrize("name", ["branch_solve_merge"])
def test_branch_solve_merge(name):
    out = run_example(name)
    assert len(re.findall(r"^- (correctness|clarity|conciseness): [1-5]/5, ", out, re.M)) == 3
    assert re.search(r"^verdict: (Yes|No)\.", out, re.M)
