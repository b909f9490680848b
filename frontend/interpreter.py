"""`StreamExecutor`: runs one program state's expressions in order, off the caller's thread.

`s += expr` only queues `expr`; a worker thread (started while work is queued, gone when the queue
is empty) executes it, so a program's branches generate concurrently and the runtime batches their
requests. run_batch's programs are already concurrent (one pool thread each): their states run
expressions inline, on the thread that adds them. Reading a variable waits for just that variable;
`sync()` waits for everything. A failed step stores its exception: later steps are skipped, and every wait
(sync, text, s["x"], text_iter) re-raises it in the caller.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

from radixflow.frontend import ir
from radixflow.frontend.backend import Backend
from radixflow.frontend.chat_template import ChatTemplate
from radixflow.frontend.choices import score_choices


class _End:
    """Queue marker: the program body has returned; nothing more will be queued."""


class StreamExecutor:
    """Text, messages and variables of one program state (one branch of a fork).

    All fields below are guarded by `cond`; the worker is the only writer of text/variables."""

    def __init__(self, backend: Backend, defaults: ir.SamplingArgs, stream: bool = False,
                 template: ChatTemplate | None = None, after: Future | None = None,
                 inline: bool = False) -> None:
        self.backend = backend
        self.defaults = defaults
        self.stream = stream
        self._template = template
        self.cond = threading.Condition()
        self.text = ""
        self.messages: list[dict[str, str]] = []
        self.variables: dict[str, Any] = {}
        self.partial: dict[str, str] = {}  # variables being streamed
        self.meta_info: dict[str, Any] = {}
        self.pending_vars: Counter[str] = Counter()  # queued gens/selects per variable name
        self.role: tuple[str, int, str] | None = None  # (role, content start, suffix) while open
        self.fork_start = 0
        self.body_thread: int | None = None  # thread id running a streamed program's body
        self.error: BaseException | None = None
        self.finished = False
        self._ending = False
        self._queue: deque[Any] = deque()
        self._busy = False
        self._after = after  # a prefix commit (a fork's, run_batch's), awaited before the first request
        # Run expressions on the thread that adds them instead of a worker thread: for run_batch's
        # programs, whose parallelism is the batch (no thread start and hand-off per program).
        self.inline = inline

    # ---- caller side --------------------------------------------------------------------------

    @property
    def template(self) -> ChatTemplate:
        if self._template is None:
            self._template = self.backend.chat_template()
        return self._template

    def submit(self, item: Any) -> None:
        """Queue an expression for the worker; raises the state's earlier failure, if any. An
        inline executor runs it before returning (a failure is raised at the next wait)."""
        with self.cond:
            self._raise()
            if self.finished or self._ending:
                raise RuntimeError("this program state has ended; no more expressions can be added")
            self.pending_vars.update(ir.var_names(item))
            start = self._enqueue(item)
        if start:
            self._start()

    def end(self) -> None:
        """Mark the program as complete once queued work is done (idempotent)."""
        with self.cond:
            start = not (self.finished or self._ending)
            if start:
                self._ending = True
                start = self._enqueue(_End())
        if start:
            self._start()

    def _enqueue(self, item: Any) -> bool:
        """Append `item`; True when a worker must be started for it. Caller holds cond."""
        self._queue.append(item)
        if self._busy:
            return False
        self._busy = True
        return True

    def _start(self) -> None:
        if self.inline:
            self._work()
        else:
            threading.Thread(target=self._work, name="radixflow-program", daemon=True).start()

    def sync(self) -> None:
        """Wait until every queued expression ran; re-raise the first failure."""
        with self.cond:
            self.cond.wait_for(lambda: not self._busy)
            self._raise()

    def get_var(self, name: str) -> Any:
        """The value of variable `name`, waiting while a queued expression will still set it. Read
        from outside a streamed program whose body is still running, it also waits for the body to
        queue the expression that sets it (or to end)."""

        def ready() -> bool:
            if self.error is not None or name in self.variables and name not in self.pending_vars:
                return True
            if name in self.pending_vars:
                return False
            return self.finished or not self.stream or threading.get_ident() == self.body_thread

        with self.cond:
            self.cond.wait_for(ready)
            self._raise()
            if name not in self.variables:
                raise KeyError(f"no variable {name!r} in this program state")
            return self.variables[name]

    def set_var(self, name: str, value: Any) -> None:
        with self.cond:
            self.variables[name] = value

    def iter_text(self, name: str | None = None) -> Iterator[str]:
        """New pieces of the text (or of variable `name`) as they appear, until the program ends
        (or the variable is complete); re-raises a failure after the pieces produced before it."""
        pos = 0
        while True:
            with self.cond:
                current, done = self._snapshot(name)
                while len(current) <= pos and not done:
                    self.cond.wait()
                    current, done = self._snapshot(name)
                error = self.error
            if len(current) > pos:
                yield current[pos:]
                pos = len(current)
            elif done:
                if error is not None:
                    raise error
                return

    def _snapshot(self, name: str | None) -> tuple[str, bool]:
        """(text so far, complete?) of the whole text or of variable `name`; caller holds cond."""
        if name is None:
            return self.text, self.finished
        if name in self.pending_vars:
            return self.partial.get(name, ""), False
        if name in self.variables:
            return str(self.variables[name]), True
        return "", self.finished

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def fail(self, error: BaseException) -> None:
        """Record a failure (from the worker, or from a streamed program body) and wake waiters."""
        with self.cond:
            if self.error is None:
                self.error = error
            self._queue.clear()
            self.pending_vars.clear()
            self.finished = True
            self.cond.notify_all()

    def fork(self, n: int) -> list[StreamExecutor]:
        """n executors continuing from this one's current text. The text is prefilled into the cache
        once (one max_new_tokens=0 request) and every branch waits for that before its first request,
        so each reuses it. The caller does not wait for the commit: a program forking many nodes
        sends all their commits at once and the runtime batches them."""
        if n < 1:
            raise ValueError(f"fork needs n >= 1, got {n}")
        self.sync()
        commit = self.backend.cache_prefix_async(self.text) if self.text else None
        children = []
        for _ in range(n):
            c = StreamExecutor(self.backend, self.defaults, self.stream, self._template, commit)
            c.text, c.messages, c.role = self.text, [dict(m) for m in self.messages], self.role
            c.variables, c.meta_info = dict(self.variables), dict(self.meta_info)
            c.fork_start, c.body_thread = len(self.text), self.body_thread
            children.append(c)
        return children

    # ---- worker side --------------------------------------------------------------------------

    def _work(self) -> None:
        if self._after is not None:
            # A failed commit is not this branch's failure: its own request reports the cause.
            self._after.exception()
            self._after = None
        while True:
            with self.cond:
                if not self._queue:
                    self._busy = False
                    self.cond.notify_all()
                    return
                item = self._queue.popleft()
            try:
                if isinstance(item, _End):
                    with self.cond:
                        self.finished = True
                        self.cond.notify_all()
                    continue
                for e in ir.flatten(item):
                    self._execute(e)
            except BaseException as e:  # noqa: BLE001 — stored and re-raised in the caller
                self.fail(e)

    def _append(self, text: str) -> None:
        with self.cond:
            self.text += text
            self.cond.notify_all()

    def _set(self, name: str | None, value: Any, meta: Any) -> None:
        with self.cond:
            if name is not None:
                self.variables[name] = value
                self.meta_info[name] = meta
                self.partial.pop(name, None)
                self.pending_vars[name] -= 1
                if self.pending_vars[name] <= 0:
                    del self.pending_vars[name]
            self.cond.notify_all()

    def _execute(self, e: ir.Expr) -> None:
        if isinstance(e, ir.Constant):
            self._append(e.text)
        elif isinstance(e, ir.Gen):
            self._gen(e)
        elif isinstance(e, ir.Select):
            decision = score_choices(self.backend, self.text, list(e.choices), e.method)
            self._append(decision.decision)
            self._set(e.name, decision.decision, decision.meta_info)
        elif isinstance(e, ir.RoleBegin):
            if self.role is not None:
                raise ValueError(f"cannot begin role {e.role!r} inside the open role {self.role[0]!r}")
            prefix, suffix = self.template.role_affixes(self.messages, e.role)
            self._append(prefix)
            self.role = (e.role, len(self.text), suffix)
        elif isinstance(e, ir.RoleEnd):
            if self.role is None or self.role[0] != e.role:
                raise ValueError(f"role end {e.role!r} does not match the open role "
                                 f"{self.role[0] if self.role else None!r}")
            role, start, suffix = self.role
            self.messages.append({"role": role, "content": self.text[start:]})
            self.role = None
            self._append(suffix)
        else:
            raise TypeError(f"unknown expression {e!r}")

    def _gen(self, e: ir.Gen) -> None:
        args = e.args.over(self.defaults)
        in_assistant = self.role is not None and self.role[0] == "assistant"
        params = args.wire(self.template.stop_strings if in_assistant else ())
        options = args.logprob_options()
        if not self.stream:
            result = self.backend.generate(self.text, params, **options)
            assert isinstance(result, dict)
            self._append(result["text"])
            self._set(e.name, result["text"], result["meta_info"])
            return
        base = len(self.text)
        result: dict[str, Any] = {"text": "", "meta_info": {}}
        for result in self.backend.generate_stream(self.text, params, **options):
            with self.cond:
                self.text = self.text[:base] + result["text"]
                if e.name is not None:
                    self.partial[e.name] = result["text"]
                self.cond.notify_all()
        self._set(e.name, result["text"], result["meta_info"])
