"""The grammar machinery's threads around the scheduler loop: the engine's and the server's loops
sleep while only grammars compile (woken when a choice is made, a compile ends or its deadline
passes), and closing a grammar manager or an engine ends every grammar thread."""

from __future__ import annotations

import re


def _thread_cpu_s(native_id: int) -> float:
    """CPU seconds (user + system) used so far by a thread of this process."""
    import psutil

    t = next(t for t in psutil.Process().threads() if t.id == native_id)
    return t.user_time + t.system_time


def test_engine_loop_sleeps_while_only_a_grammar_compiles(engine, monkeypatch):
    """With one request waiting for a slow compile and nothing else to do, the scheduler thread
    sleeps: over a second it steps a few times at most and uses a small part of a second of CPU
    (a polling loop steps thousands of times, on as much CPU as the machine gives it). When the
    compile finishes, the request runs and matches its regex."""
    import threading
    import time
    import uuid

    from radixflow.grammars.xgrammar_backend import XGrammarBackend

    compiling, release = threading.Event(), threading.Event()
    real = XGrammarBackend._compile

    def slow_compile(self, kind: str, spec: str):
        compiling.set()
        release.wait(120)
        return real(self, kind, spec)

    monkeypatch.setattr(XGrammarBackend, "_compile", slow_compile)
    steps = [0]
    real_step = engine.scheduler.step

    def counted_step():
        steps[0] += 1
        return real_step()

    monkeypatch.setattr(engine.scheduler, "step", counted_step)
    pattern = f"(yes|no) {uuid.uuid4().hex[:6]}"  # not in the compile cache
    done: dict = {}
    caller = threading.Thread(target=lambda: done.update(engine.generate("Answer:", {
        "regex": pattern, "max_new_tokens": 16, "temperature": 0})))
    caller.start()
    try:
        assert compiling.wait(60)  # the backend is chosen (and built, on first use): only the compile is left
        time.sleep(0.1)
        steps0, cpu0, wall0 = steps[0], _thread_cpu_s(engine._thread.native_id), time.monotonic()
        time.sleep(1.0)
        cpu, wall = _thread_cpu_s(engine._thread.native_id) - cpu0, time.monotonic() - wall0
        stepped = steps[0] - steps0
        assert engine.get_server_info()["num_waiting"] == 1  # still compiling: the window measured the wait
    finally:
        release.set()
        caller.join(120)
    assert stepped < 20 and cpu < 0.5 * wall, (stepped, cpu, wall)
    assert re.fullmatch(pattern, done["text"]), done


def test_grammar_manager_wakes_its_loop_when_a_choice_is_made_and_at_the_deadline(default_model_path,
                                                                                  monkeypatch):
    """`wake` is called when the backend choice is done and, with the compile still blocked, when
    the deadline passes; then `poll` returns the request aborted with the timeout."""
    import threading

    from radixflow.grammars.xgrammar_backend import XGrammarBackend
    from radixflow.runtime.config import EngineConfig
    from radixflow.runtime.req import Req
    from radixflow.runtime.sampling_params import SamplingParams
    from radixflow.runtime.scheduler.grammar_manager import GrammarManager

    release = threading.Event()
    real = XGrammarBackend._compile
    monkeypatch.setattr(XGrammarBackend, "_compile", lambda self, k, s: release.wait(120) and real(self, k, s))
    woken = threading.Semaphore(0)
    manager = GrammarManager(EngineConfig(grammar_compile_timeout=1.0), str(default_model_path), 49152, [2],
                             tokenizer=None, wake=woken.release)
    manager.backend("xgrammar")  # built before the clock starts
    try:
        manager.submit(Req("r", [1, 2], SamplingParams(regex="(a|b)c", max_new_tokens=4)))
        assert woken.acquire(timeout=30)  # the choice is made
        assert manager.poll() == [] and manager.only_compiling()  # now compiling (blocked)
        assert woken.acquire(timeout=30)  # the deadline
        assert not manager.only_compiling()
        [req] = manager.poll()
        assert req.finish_reason["message"] == "grammar compilation took longer than 1s"
    finally:
        release.set()
        manager.close()


def _grammar_threads() -> set:
    """The live threads of grammar managers and backends (deadline alarm, choice and compile pools)."""
    import threading

    return {t for t in threading.enumerate() if t.name.startswith("grammar")}


def _wait_gone(threads: set, timeout: float = 5.0) -> set:
    """`threads` still alive after up to `timeout` s."""
    import time

    deadline = time.monotonic() + timeout
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        time.sleep(0.02)
    return {t for t in threads if t.is_alive()}


def test_closing_the_grammar_manager_ends_its_threads(default_model_path):
    """After `close()` the deadline thread (started by the first constrained request) and the
    manager's pools are gone, within a short wait; a later deadline starts no thread."""
    import threading
    import time

    from radixflow.runtime.config import EngineConfig
    from radixflow.runtime.req import Req
    from radixflow.runtime.sampling_params import SamplingParams
    from radixflow.runtime.scheduler.grammar_manager import GrammarManager

    before = _grammar_threads()
    woken = threading.Semaphore(0)
    manager = GrammarManager(EngineConfig(grammar_compile_timeout=60.0), str(default_model_path), 49152, [2],
                             tokenizer=None, wake=woken.release)
    manager.submit(Req("r", [1, 2], SamplingParams(regex="(a|b)c", max_new_tokens=4)))
    deadline = time.monotonic() + 60
    while not manager.poll() and time.monotonic() < deadline:  # chosen, then compiled
        woken.acquire(timeout=1)
    alarm = manager._alarm._thread
    assert alarm is not None and alarm.is_alive()  # waiting for the 60 s deadline
    mine = _grammar_threads() - before
    manager.close()
    assert not _wait_gone(mine), "grammar threads outlived close()"
    manager._alarm.add(time.monotonic())
    assert manager._alarm._thread is alarm and not alarm.is_alive()


def test_engine_shutdown_ends_the_grammar_deadline_thread(default_model_path):
    """An engine that served a constrained request leaves no grammar thread behind its shutdown."""
    from radixflow.runtime.engine import Engine

    before = _grammar_threads()
    eng = Engine(default_model_path, max_total_tokens=1024, max_running_requests=2)
    try:
        out = eng.generate("Answer: ", {"regex": "(yes|no)", "max_new_tokens": 4, "temperature": 0})
        assert out["text"] in ("yes", "no")
        alarm = eng.scheduler.grammar._alarm._thread
        assert alarm is not None and alarm.is_alive()
        mine = _grammar_threads() - before
    finally:
        eng.shutdown()
    assert alarm in mine and not _wait_gone(mine), "grammar threads outlived Engine.shutdown()"


class _LoopDone(BaseException):
    """Ends the server loop under test (not an Exception, so the loop does not handle it)."""


class _CompilingScheduler:
    """The part of the Scheduler the server loop uses, with one request waiting for a compile."""

    stats = {"steps": 0}

    def __init__(self) -> None:
        import threading

        self.compiled = threading.Event()
        self.wake = None
        self.steps = 0

    def set_grammar_wakeup(self, wake) -> None:
        self.wake = wake

    def has_work(self) -> bool:
        return True

    def only_compiling(self) -> bool:
        return not self.compiled.is_set()

    def step(self) -> list:
        self.steps += 1
        if self.compiled.is_set():
            raise _LoopDone
        return []

    def drain_outputs(self) -> list:
        return []


def test_server_loop_sleeps_while_only_a_grammar_compiles(monkeypatch):
    """The scheduler process's loop, fed by real ZeroMQ sockets, sleeps while the scheduler only
    has compiles pending (a few steps at most over a second, little CPU), and the wakeup, not
    the idle timeout (set to a minute here), brings it back when the compile is done."""
    import os
    import threading
    import time

    import zmq

    from radixflow.runtime.server import scheduler_process

    monkeypatch.setattr(scheduler_process, "_IDLE_POLL_MS", 60_000)
    ctx = zmq.Context()
    pull, push, sink = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    pull.bind("inproc://sched-in")
    sink.bind("inproc://sched-out")
    push.connect("inproc://sched-out")
    sched = _CompilingScheduler()
    ended: list[BaseException] = []

    def serve() -> None:
        try:
            scheduler_process._serve(sched, pull, push, scheduler_process._StepLogger(0), os.getpid())
        except _LoopDone as e:
            ended.append(e)

    loop = threading.Thread(target=serve, daemon=True)
    loop.start()
    try:
        time.sleep(0.2)
        sched.steps, cpu0, wall0 = 0, _thread_cpu_s(loop.native_id), time.monotonic()
        time.sleep(1.0)
        cpu, wall = _thread_cpu_s(loop.native_id) - cpu0, time.monotonic() - wall0
        stepped = sched.steps
        assert stepped < 20 and cpu < 0.5 * wall, (stepped, cpu, wall)
    finally:
        sched.compiled.set()
        sched.wake()
        loop.join(30)
        for s in (pull, push, sink):
            s.close(linger=0)
        ctx.term()
    assert ended and not loop.is_alive()
