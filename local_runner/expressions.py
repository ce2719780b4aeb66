"""Argo's expressions as the local runner needs them, evaluated without ``eval``.

Three things in a rendered manifest are expressions:

* ``{{...}}`` placeholders (``{{tasks.T.outputs.parameters.X}}``, ``{{inputs.parameters.X}}``,
  ``{{workflow.status}}``, ...): ``substitute`` replaces them from a scope and refuses unknown ones,
  as Argo does ("unable to resolve");
* ``when`` conditions, which Argo hands to govaluate *after* substitution: ``evaluate_when``;
* ``depends`` expressions over task results (``a && (b.Succeeded || !c.Skipped)``):
  ``evaluate_depends``.

``when`` and ``depends`` share one small recursive-descent parser over this grammar::

    or      := and ("||" and)*
    and     := unary ("&&" unary)*
    unary   := "!" unary | compare
    compare := atom (("==" | "!=" | "<" | "<=" | ">" | ">=") atom)?
    atom    := "(" or ")" | 'quoted' | "quoted" | number | true | false | bare-word

As in govaluate after Argo's substitution, a bare word is a string (``{{workflow.status}} !=
Succeeded`` becomes ``Failed != Succeeded``), two numbers compare as numbers, anything else as
strings, and ``true``/``false`` are booleans. Nothing else is accepted: an expression outside this
grammar is an error that names it, never executed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from pipelines.structure import REFERENCE

DEPENDS_TERM = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z]+)?")
# The bare task name means "finished well" (Argo: a.Succeeded || a.Skipped || a.Daemoned).
BARE_DEPENDS_OK = {"Succeeded", "Skipped", "Daemoned"}

_TOKEN = re.compile(r"""
    \s*(?:
      (?P<op>&&|\|\||==|!=|<=|>=|<|>|!|\(|\))
    | '(?P<single>[^']*)'
    | "(?P<double>[^"]*)"
    | (?P<word>[^\s&|=!<>()'"]+)
    )""", re.VERBOSE)


class ExpressionError(ValueError):
    """An expression the local runner cannot evaluate (outside the grammar above)."""


@dataclass(frozen=True)
class _Token:
    kind: str  # "op", "str", "word"
    text: str


def _tokens(expression: str) -> list[_Token]:
    tokens, pos = [], 0
    text = expression.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise ExpressionError(f"cannot read {expression!r} at {text[pos:]!r}")
        pos = match.end()
        if match.group("op"):
            tokens.append(_Token("op", match.group("op")))
        elif match.group("single") is not None or match.group("double") is not None:
            tokens.append(_Token("str", match.group("single") if match.group("single") is not None
                                 else match.group("double")))
        else:
            tokens.append(_Token("word", match.group("word")))
    return tokens


Value = bool | float | str


def _atom_value(token: _Token) -> Value:
    if token.kind == "str":
        return token.text
    if token.text in ("true", "false"):
        return token.text == "true"
    try:
        return float(token.text)
    except ValueError:
        return token.text


def _compare(left: Value, op: str, right: Value) -> bool:
    if isinstance(left, bool) or isinstance(right, bool):
        # true == 'true' after substitution of an output that is the string "true"
        left, right = str(left).lower(), str(right).lower()
    elif not (isinstance(left, float) and isinstance(right, float)):
        left, right = _text(left), _text(right)
    operations: dict[str, Callable[[object, object], bool]] = {
        "==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,  # type: ignore[operator]
        "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,  # type: ignore[operator]
    }
    return operations[op](left, right)


def _text(value: Value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class _Parser:
    def __init__(self, expression: str):
        self.expression = expression
        self.tokens = _tokens(expression)
        self.pos = 0

    def parse(self) -> bool:
        if not self.tokens:
            raise ExpressionError("empty expression")
        value = self._or()
        if self.pos != len(self.tokens):
            raise ExpressionError(f"unexpected {self.tokens[self.pos].text!r} in {self.expression!r}")
        return _truth(value, self.expression)

    def _peek(self) -> _Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take(self, op: str) -> bool:
        token = self._peek()
        if token is not None and token.kind == "op" and token.text == op:
            self.pos += 1
            return True
        return False

    def _or(self) -> Value:
        value = self._and()
        while self._take("||"):
            right = self._and()
            value = _truth(value, self.expression) or _truth(right, self.expression)
        return value

    def _and(self) -> Value:
        value = self._unary()
        while self._take("&&"):
            right = self._unary()
            value = _truth(value, self.expression) and _truth(right, self.expression)
        return value

    def _unary(self) -> Value:
        if self._take("!"):
            return not _truth(self._unary(), self.expression)
        return self._compare()

    def _compare(self) -> Value:
        left = self._atom()
        token = self._peek()
        if token is not None and token.kind == "op" and token.text in ("==", "!=", "<", "<=", ">", ">="):
            self.pos += 1
            return _compare(left, token.text, self._atom())
        return left

    def _atom(self) -> Value:
        token = self._peek()
        if token is None:
            raise ExpressionError(f"{self.expression!r} ends too early")
        self.pos += 1
        if token.kind == "op":
            if token.text != "(":
                raise ExpressionError(f"unexpected {token.text!r} in {self.expression!r}")
            value = self._or()
            if not self._take(")"):
                raise ExpressionError(f"missing ')' in {self.expression!r}")
            return value
        return _atom_value(token)


def _truth(value: Value, expression: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ExpressionError(f"{expression!r}: {value!r} is not a condition (compare it, e.g. x == true)")


def evaluate_when(expression: str) -> bool:
    """A ``when`` condition after substitution (``true == true``, ``Failed != Succeeded && ...``)."""
    return _Parser(expression).parse()


def evaluate_depends(expression: str, statuses: dict[str, str]) -> bool:
    """Argo's ``depends`` over the statuses of the DAG's tasks (``Pending`` when not run)."""

    def result(match: re.Match[str]) -> str:
        name, _, outcome = match.group(0).partition(".")
        status = statuses.get(name, "Pending")
        if not outcome:
            ok = status in BARE_DEPENDS_OK
        elif outcome in ("AnySucceeded", "AllFailed"):
            raise ExpressionError(f"depends {expression!r}: {outcome} applies to withItems tasks, which kaiflow does not use")
        else:
            ok = status == outcome or (outcome == "Failed" and status == "Errored")
        return " true " if ok else " false "

    return _Parser(DEPENDS_TERM.sub(result, expression)).parse()


def substitute(value: str, scope: dict[str, str], where: str) -> str:
    """Replace every ``{{name}}`` from ``scope``; an unknown one is an error naming it and ``where``."""

    def replace(match: re.Match[str]) -> str:
        key = match.group(1).strip()
        if key not in scope:
            raise ExpressionError(f"{where}: unable to resolve {{{{{key}}}}}")
        return scope[key]

    return REFERENCE.sub(replace, value)
