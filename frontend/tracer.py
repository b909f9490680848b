"""Find a program's constant prefix by running it on placeholders, without generating anything.

Arguments become `Placeholder` strings that carry a marker; the prefix is the text appended before
the first gen / select / fork / read of generated state or the first marked text. A placeholder is
a str, so f-strings and concatenation work; code that needs a real value (indexing a list
argument, int(s["x"])) raises, and the prefix found up to that point stands. Control flow that
depends on argument values can make the traced prefix wrong: it then only costs one wasted cache
request, never a wrong answer.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from radixflow.frontend import ir
from radixflow.frontend.chat_template import ChatTemplate

logger = logging.getLogger(__name__)
_MARK = "\x00"


class Placeholder(str):
    """Stands for an argument (or a generated value) while tracing."""

    def __new__(cls, name: str) -> Placeholder:
        return super().__new__(cls, f"{_MARK}{name}{_MARK}")


class TracerState:
    """Records constant text like ProgramState would build it; anything unknown closes the prefix."""

    def __init__(self, template: ChatTemplate) -> None:
        self.template = template
        self.prefix = ""
        self.closed = False
        self._messages: list[dict[str, str]] = []
        self.role: tuple[str, int, str] | None = None
        self.ret_value: Any = None

    def _add_text(self, text: str) -> None:
        if self.closed:
            return
        cut = text.find(_MARK)
        if cut >= 0:
            self.prefix += text[:cut]
            self.closed = True
        else:
            self.prefix += text

    def __iadd__(self, other: Any) -> TracerState:
        for e in ir.flatten(other):
            if self.closed:
                break
            if isinstance(e, ir.Constant):
                self._add_text(e.text)
            elif isinstance(e, ir.RoleBegin):
                prefix, suffix = self.template.role_affixes(self._messages, e.role)
                self._add_text(prefix)
                self.role = (e.role, len(self.prefix), suffix)
            elif isinstance(e, ir.RoleEnd) and self.role is not None:
                self._messages.append({"role": self.role[0], "content": self.prefix[self.role[1]:]})
                self._add_text(self.role[2])
                self.role = None
            else:
                self.closed = True
        return self

    def __getitem__(self, name: str) -> Placeholder:
        self.closed = True
        return Placeholder(name)

    get_var = __getitem__

    def __setitem__(self, name: str, value: Any) -> None:
        pass

    set_var = __setitem__

    def get_meta_info(self, name: str) -> dict[str, Any]:
        self.closed = True
        return {}

    def text(self) -> Placeholder:
        self.closed = True
        return Placeholder("text")

    def messages(self) -> list[dict[str, str]]:
        self.closed = True
        return []

    def sync(self) -> None:
        pass

    def fork(self, n: int = 1) -> _TracerGroup:
        self.closed = True
        branches = [TracerState(self.template) for _ in range(n)]
        for b in branches:
            b.closed = True
        return _TracerGroup(branches)

    @contextmanager
    def _role(self, role: str) -> Iterator[None]:
        self += ir.RoleBegin(role)
        yield
        self += ir.RoleEnd(role)

    def system(self, expr: Any = None) -> Any:
        return self._role("system") if expr is None else self.__iadd__(
            ir.ExprList([ir.RoleBegin("system"), ir.to_expr(expr), ir.RoleEnd("system")]))

    def user(self, expr: Any = None) -> Any:
        return self._role("user") if expr is None else self.__iadd__(
            ir.ExprList([ir.RoleBegin("user"), ir.to_expr(expr), ir.RoleEnd("user")]))

    def assistant(self, expr: Any = None) -> Any:
        return self._role("assistant") if expr is None else self.__iadd__(
            ir.ExprList([ir.RoleBegin("assistant"), ir.to_expr(expr), ir.RoleEnd("assistant")]))


class _TracerGroup(list):
    """A fork while tracing: accepts everything, records nothing."""

    def __iadd__(self, other: Any) -> _TracerGroup:
        return self

    def join(self, mode: str = "gather_variable") -> None:
        pass


def trace_prefix(func: Callable[..., Any], bound: dict[str, Any], template: ChatTemplate) -> str:
    """The constant text `func(s, **args)` appends first, for any arguments (bound ones fixed)."""
    params = list(inspect.signature(func).parameters.values())[1:]
    args = {p.name: bound.get(p.name, Placeholder(p.name)) for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    state = TracerState(template)
    try:
        state.ret_value = func(state, **args)
    except Exception as e:  # the program needed a real value: the prefix so far is still constant
        logger.debug("tracing %s stopped at %r; prefix of %d chars", getattr(func, "__name__", func), e,
                     len(state.prefix))
    return state.prefix
