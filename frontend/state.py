"""`ProgramState` (the `s` a program receives) and `ProgramStateGroup` (what `s.fork(n)` returns)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from radixflow.frontend import ir
from radixflow.frontend.interpreter import StreamExecutor


class ProgramState:
    """The state of a running program: `s += expr`, `s["name"]`, `s.text()`, `s.messages()`,
    `s.fork(n)`, streaming iterators. `ret_value` holds the program function's return value."""

    def __init__(self, executor: StreamExecutor) -> None:
        self.executor = executor
        self.ret_value: Any = None

    def __iadd__(self, other: Any) -> ProgramState:
        self.executor.submit(ir.to_expr(other))
        return self

    def __getitem__(self, name: str) -> Any:
        return self.executor.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.executor.set_var(name, value)

    def get_var(self, name: str) -> Any:
        """The value of a variable (waits for a pending gen/select; KeyError if never set)."""
        return self.executor.get_var(name)

    def set_var(self, name: str, value: Any) -> None:
        self.executor.set_var(name, value)

    def get_meta_info(self, name: str) -> dict[str, Any]:
        """The runtime's meta_info of the gen that set `name` (for a select: its scores)."""
        self.executor.get_var(name)
        return self.executor.meta_info[name]

    def text(self) -> str:
        """The whole text so far, after all queued expressions ran."""
        self.executor.sync()
        return self.executor.text

    def messages(self) -> list[dict[str, str]]:
        """The chat messages (role, content) of the completed roles."""
        self.executor.sync()
        return [dict(m) for m in self.executor.messages]

    def sync(self) -> None:
        """Wait for queued expressions; raise the program's error if one failed."""
        self.executor.sync()

    def error(self) -> BaseException | None:
        """The failure of this state, if any (without raising it)."""
        return self.executor.error

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """Pieces of the text (or of one variable) as they are generated; with stream=False, the
        pieces arrive one whole gen at a time."""
        return self.executor.iter_text(var_name)

    async def text_async_iter(self, var_name: str | None = None) -> AsyncIterator[str]:
        """`text_iter` for asyncio code (the waiting happens on a worker thread)."""
        it = self.text_iter(var_name)
        done = object()
        loop = asyncio.get_running_loop()
        while True:
            piece = await loop.run_in_executor(None, next, it, done)
            if piece is done:
                return
            yield piece

    def fork(self, n: int = 1) -> ProgramStateGroup:
        """n branches continuing from the current text; the shared prefix is cached once first."""
        return ProgramStateGroup([ProgramState(e) for e in self.executor.fork(n)], self)

    @contextmanager
    def copy(self) -> Iterator[ProgramState]:
        """One branch, joined back (variables gathered) when the block ends."""
        group = self.fork(1)
        try:
            yield group[0]
        finally:
            group.join()

    @contextmanager
    def _role(self, role: str) -> Iterator[None]:
        self.executor.submit(ir.RoleBegin(role))
        yield
        self.executor.submit(ir.RoleEnd(role))

    def system(self, expr: Any = None) -> Any:
        """`s.system(expr)` appends a system message; `with s.system():` wraps a block."""
        return self._role("system") if expr is None else self.__iadd__(ir.ExprList(
            [ir.RoleBegin("system"), ir.to_expr(expr), ir.RoleEnd("system")]))

    def user(self, expr: Any = None) -> Any:
        """`s.user(expr)` appends a user message; `with s.user():` wraps a block."""
        return self._role("user") if expr is None else self.__iadd__(ir.ExprList(
            [ir.RoleBegin("user"), ir.to_expr(expr), ir.RoleEnd("user")]))

    def assistant(self, expr: Any = None) -> Any:
        """`s.assistant(expr)` appends an assistant message; `with s.assistant():` wraps a block."""
        return self._role("assistant") if expr is None else self.__iadd__(ir.ExprList(
            [ir.RoleBegin("assistant"), ir.to_expr(expr), ir.RoleEnd("assistant")]))

    def __repr__(self) -> str:
        return f"ProgramState({self.executor.text!r})"  # no waiting: the text so far


class ProgramStateGroup:
    """The branches of a fork: index or iterate them; `forks += expr` adds to every branch
    (`forks += lambda i: expr_i` or a list gives each its own); `join()` gathers variables back."""

    def __init__(self, states: list[ProgramState], parent: ProgramState) -> None:
        self.states = states
        self.parent = parent

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.states)

    def __iadd__(self, other: Any) -> ProgramStateGroup:
        if isinstance(other, (list, tuple)):
            if len(other) != len(self.states):
                raise ValueError(f"{len(other)} expressions for {len(self.states)} branches")
            for s, e in zip(self.states, other):
                s += e
        elif callable(other) and not isinstance(other, ir.Expr):
            fn: Callable[[int], Any] = other
            for i, s in enumerate(self.states):
                s += fn(i)
        else:
            for s in self.states:
                s += other
        return self

    def join(self, mode: str = "gather_variable") -> None:
        """Wait for every branch, then merge back into the parent. "gather_variable": each variable
        a branch created becomes a list (in branch order) on the parent, and so does its meta info.
        "concate_and_append": the text each branch added is appended to the parent, in branch order.
        Re-raises a branch's error."""
        if mode not in ("gather_variable", "concate_and_append"):
            raise ValueError(f"join mode must be 'gather_variable' or 'concate_and_append', got {mode!r}")
        for s in self.states:
            s.executor.end()
            s.executor.sync()
        parent = self.parent.executor
        parent.sync()
        if mode == "gather_variable":
            with parent.cond:
                before = set(parent.variables)
                for s in self.states:
                    child = s.executor
                    for k, v in child.variables.items():
                        if k not in before:
                            parent.variables.setdefault(k, []).append(v)
                            parent.meta_info.setdefault(k, []).append(child.meta_info.get(k))
        else:
            self.parent += "".join(s.executor.text[s.executor.fork_start:] for s in self.states)
