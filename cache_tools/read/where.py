"""A small, safe expression language over structure metadata columns (never ``eval``).

    method == 'X-RAY DIFFRACTION' and resolution <= 2.5 and deposited < 2020-01-01
    polymer == 'RNA' or (chains >= 4 and not models > 1)
    id in ('1abc', '2xyz')

Grammar (keywords case-insensitive)::

    expr    := conj ('or' conj)*
    conj    := neg ('and' neg)*
    neg     := 'not' neg | '(' expr ')' | compare
    compare := COLUMN OP literal | COLUMN ['not'] 'in' '(' literal (',' literal)* ')'
    OP      := '==' | '!=' | '<' | '<=' | '>' | '>='
    literal := NUMBER | 'string' | "string" | YYYY-MM-DD

Columns and their types are listed in ``structure_meta.COLUMNS``. Types are checked
before anything runs: numbers compare with numbers, dates with dates, ``method`` and
``polymer`` (sets: ``==`` means "includes") with a known name. An absent value (NaN
resolution, unknown date) matches no comparison (``not`` still inverts the result). Evaluation is vectorized: one numpy
boolean mask over all structures.

Outside quotes only ASCII counts: digits are 0-9 and spaces are ASCII whitespace, so a
fullwidth ``２`` or an ideographic space is refused rather than read as ``2`` or a blank.
Parentheses and ``not`` nest at most ``MAX_DEPTH`` deep: a deeper expression is refused
in one line instead of exhausting Python's recursion limit.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from cache_tools import format as fmt
from cache_tools.read.structure_meta import COLUMNS, VOCABULARY, StructureColumns


class ExpressionError(ValueError):
    """The expression cannot be used; str() is one line naming the position and the reason."""


MAX_DEPTH = 100  # nesting of parentheses and 'not'; far beyond a hand-written filter

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<date>\d{4}-\d{2}-\d{2})
  | (?P<number>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<string>'[^']*'|"[^"]*")
  | (?P<op>==|!=|<=|>=|<|>|\(|\)|,)
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
""", re.VERBOSE | re.ASCII)
_KEYWORDS = {"and", "or", "not", "in"}


@dataclass(frozen=True)
class Token:
    kind: str   # date, number, string, op, word, keyword, end
    text: str
    pos: int    # 1-based character position, for messages


def tokenize(text: str) -> list[Token]:
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            if text[pos] in "'\"":
                raise ExpressionError(f"position {pos + 1}: unterminated string")
            hint = " (outside quotes, only ASCII letters, digits and spaces)" if not text[pos].isascii() else ""
            raise ExpressionError(f"position {pos + 1}: unexpected character {text[pos]!r}{hint}")
        kind = m.lastgroup
        if kind != "ws":
            word = m.group()
            if kind == "word" and word.lower() in _KEYWORDS:
                kind, word = "keyword", word.lower()
            if kind == "number" and m.end() < len(text) and (text[m.end()].isalpha() or text[m.end()] == "_"):
                raise ExpressionError(f"position {pos + 1}: bad number {text[pos:m.end() + 1]!r}")
            tokens.append(Token(kind, word, pos + 1))
        pos = m.end()
    tokens.append(Token("end", "", len(text) + 1))
    return tokens


# --- the tree --------------------------------------------------------------------------

@dataclass(frozen=True)
class Compare:
    column: str
    op: str            # == != < <= > >= in
    values: tuple      # checked literal values (floats, day numbers, bit masks, lower-case ids)
    negate: bool = False


@dataclass(frozen=True)
class BoolOp:
    op: str            # and, or, not
    args: tuple


Node = Union[Compare, BoolOp]


class _Parser:
    def __init__(self, text: str):
        self.tokens = tokenize(text)
        self.i = 0
        self.depth = 0  # parentheses and 'not' open around the current token

    def peek(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def expect(self, kind: str, text: str | None = None) -> Token:
        tok = self.take()
        if tok.kind != kind or (text is not None and tok.text != text):
            want = repr(text) if text else kind
            raise ExpressionError(f"position {tok.pos}: expected {want}, found {_describe(tok)}")
        return tok

    def parse(self) -> Node:
        if self.peek().kind == "end":
            raise ExpressionError("empty expression")
        node = self.expr()
        tok = self.peek()
        if tok.kind != "end":
            raise ExpressionError(f"position {tok.pos}: expected 'and', 'or' or the end, found {_describe(tok)}")
        return node

    def expr(self) -> Node:
        args = [self.conj()]
        while self.peek().kind == "keyword" and self.peek().text == "or":
            self.take()
            args.append(self.conj())
        return args[0] if len(args) == 1 else BoolOp("or", tuple(args))

    def conj(self) -> Node:
        args = [self.neg()]
        while self.peek().kind == "keyword" and self.peek().text == "and":
            self.take()
            args.append(self.neg())
        return args[0] if len(args) == 1 else BoolOp("and", tuple(args))

    def neg(self) -> Node:
        tok = self.peek()
        if tok.kind == "keyword" and tok.text == "not" or tok.kind == "op" and tok.text == "(":
            if self.depth >= MAX_DEPTH:
                raise ExpressionError(f"position {tok.pos}: nested deeper than {MAX_DEPTH} levels of "
                                      "parentheses and 'not'; simplify the expression")
            self.take()
            self.depth += 1
            if tok.text == "not":
                node = BoolOp("not", (self.neg(),))
            else:
                node = self.expr()
                self.expect("op", ")")
            self.depth -= 1
            return node
        return self.compare()

    def compare(self) -> Compare:
        tok = self.take()
        if tok.kind != "word":
            raise ExpressionError(f"position {tok.pos}: expected a column name, found {_describe(tok)}")
        column = tok.text.lower()
        if column not in COLUMNS:
            raise ExpressionError(f"position {tok.pos}: unknown column {tok.text!r} "
                                  f"(columns: {', '.join(COLUMNS)})")
        op = self.take()
        negate = False
        if op.kind == "keyword" and op.text == "not":
            negate, op = True, self.take()
            if not (op.kind == "keyword" and op.text == "in"):
                raise ExpressionError(f"position {op.pos}: expected 'in' after 'not', found {_describe(op)}")
        if op.kind == "keyword" and op.text == "in":
            self.expect("op", "(")
            literals = [self.take()]
            while self.peek().kind == "op" and self.peek().text == ",":
                self.take()
                literals.append(self.take())
            self.expect("op", ")")
            return Compare(column, "in", tuple(_check(column, "==", lit) for lit in literals), negate)
        if op.kind != "op" or op.text in "(),":
            raise ExpressionError(f"position {op.pos}: expected a comparison (== != < <= > >= in) after "
                                  f"{column!r}, found {_describe(op)}")
        return Compare(column, op.text, (_check(column, op.text, self.take()),))


def _describe(tok: Token) -> str:
    return "the end" if tok.kind == "end" else repr(tok.text)


def _check(column: str, op: str, lit: Token) -> Any:
    """The literal as the column's type, or an ExpressionError saying why it does not fit."""
    kind = COLUMNS[column][0]
    if lit.kind in ("end", "op", "keyword", "word"):
        hint = " (quote strings)" if lit.kind == "word" else ""
        raise ExpressionError(f"position {lit.pos}: expected a value after {column} {op}, "
                              f"found {_describe(lit)}{hint}")
    value_kind = {"number": "number", "string": "string", "date": "date"}[lit.kind]
    wants = {"float": "number", "int": "number", "date": "date", "set": "string", "str": "string"}[kind]
    if value_kind != wants:
        raise ExpressionError(f"position {lit.pos}: type mismatch: {column} is a {kind_name(kind)}, "
                              f"{lit.text} is a {value_kind}")
    if kind in ("set", "str") and op not in ("==", "!="):
        raise ExpressionError(f"position {lit.pos}: type mismatch: {column} supports == != in, not {op}")
    if kind in ("float", "int"):
        return float(lit.text)
    if kind == "date":
        try:
            return fmt.date_to_days(lit.text)
        except ValueError as exc:
            raise ExpressionError(f"position {lit.pos}: {exc}") from None
    text = lit.text[1:-1]
    if kind == "str":
        return text.lower()
    vocab = VOCABULARY[column]
    names = {" ".join(v.upper().split()): i for i, v in enumerate(vocab)}
    key = " ".join(text.upper().split())
    if key not in names:
        raise ExpressionError(f"position {lit.pos}: unknown {column} {text!r} (one of: {', '.join(vocab)})")
    return 1 << names[key]


def kind_name(kind: str) -> str:
    return {"float": "number", "int": "number", "date": "date (YYYY-MM-DD)",
            "set": "name (compare with == or != and a quoted name)", "str": "string"}[kind]


def parse(text: str) -> Node:
    """Parse and type-check ``text``; raises ExpressionError with a one-line reason."""
    return _Parser(text).parse()


def columns_of(node: Node) -> set[str]:
    if isinstance(node, Compare):
        return {node.column}
    return set().union(*(columns_of(a) for a in node.args))


# --- evaluation ------------------------------------------------------------------------

def evaluate(node: Node, cols: StructureColumns) -> np.ndarray:
    """Boolean mask over all structures of the cache."""
    if isinstance(node, BoolOp):
        masks = [evaluate(a, cols) for a in node.args]
        if node.op == "not":
            return ~masks[0]
        return np.logical_and.reduce(masks) if node.op == "and" else np.logical_or.reduce(masks)
    kind = COLUMNS[node.column][0]
    values = cols.values(node.column)
    if kind == "str":
        mask = np.isin(np.array([v.lower() for v in values], dtype=object), list(node.values))
        return ~mask if (node.op == "!=") != node.negate else mask
    if node.op == "in" or kind == "set":
        if kind == "set":
            bits = np.uint64(sum(node.values)) if node.op == "in" else np.uint64(node.values[0])
            mask = (values.astype(np.uint64) & bits) != 0
        else:
            # As ==: a float column compares in its own dtype (1e40 is infinity there), an integer
            # one in float64 (1.5 is no count, 1e40 no int32).
            dtype = values.dtype if values.dtype.kind == "f" else np.float64
            with np.errstate(over="ignore"):
                mask = np.isin(values, np.array(node.values, dtype=dtype))
        negate = node.negate or node.op == "!="
        return ~mask if negate else mask
    x = node.values[0]
    compare = {"==": np.equal, "!=": np.not_equal, "<": np.less, "<=": np.less_equal,
               ">": np.greater, ">=": np.greater_equal}[node.op]
    with np.errstate(over="ignore"):  # a literal beyond float32 (1e40) compares as infinity, silently
        mask = compare(values, x)
    if kind == "float":
        mask &= ~np.isnan(values)   # an absent resolution matches nothing
    elif kind == "date":
        mask &= values != fmt.DATE_MISSING
    return mask


def select(root, text: str) -> np.ndarray:
    """Sorted global structure rows where ``text`` holds (int64)."""
    node = parse(text)
    cols = StructureColumns(root)
    return np.flatnonzero(evaluate(node, cols))
