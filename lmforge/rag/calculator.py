"""Safe arithmetic for the agent's calculator tool: the expression is parsed with `ast` and only
numbers, + - * / // % **, unary +/- and parentheses are evaluated (never `eval`). Sizes are
bounded so that hostile input such as `9**9**9` fails at once instead of eating the machine."""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

MAX_CHARS = 200
MAX_EXPONENT = 10_000
MAX_INT_BITS = 1024  # about 308 decimal digits, the size of the largest float

_BINARY: dict[type[ast.operator], Callable[[int | float, int | float], int | float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[int | float], int | float]] = {
    ast.UAdd: operator.pos, ast.USub: operator.neg,
}
_SYMBOLS = {ast.BitXor: "^", ast.BitAnd: "&", ast.BitOr: "|", ast.LShift: "<<", ast.RShift: ">>",
            ast.MatMult: "@", ast.Invert: "~", ast.Not: "not"}
_NODE_NAMES = {ast.Call: "function calls", ast.Attribute: "attribute access", ast.Subscript: "subscripts",
               ast.Lambda: "lambda", ast.NamedExpr: "assignment", ast.IfExp: "conditional expressions",
               ast.Compare: "comparisons", ast.BoolOp: "boolean operators", ast.JoinedStr: "f-strings",
               ast.List: "lists", ast.Tuple: "tuples", ast.Set: "sets", ast.Dict: "dicts",
               ast.ListComp: "comprehensions", ast.SetComp: "comprehensions", ast.DictComp: "comprehensions",
               ast.GeneratorExp: "comprehensions", ast.Starred: "starred expressions", ast.Await: "await",
               ast.Yield: "yield", ast.YieldFrom: "yield", ast.Slice: "slices"}


class CalculatorError(ValueError):
    """An expression the calculator refuses or cannot evaluate."""


def calculate(expression: str) -> int | float:
    """Evaluate an arithmetic expression, e.g. `calculate("(3 + 4) * 2 ** 3")` → 56.

    Raises `CalculatorError` for anything but arithmetic on int and float literals, for input
    longer than `MAX_CHARS`, division by zero, exponents above `MAX_EXPONENT`, integers above
    `MAX_INT_BITS` bits and results that overflow a float."""
    if not isinstance(expression, str):
        raise CalculatorError(f"expected an expression string, got {type(expression).__name__}")
    expression = expression.strip()
    if not expression:
        raise CalculatorError("empty expression")
    if len(expression) > MAX_CHARS:
        raise CalculatorError(f"expression too long ({len(expression)} characters, at most {MAX_CHARS})")
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise CalculatorError(f"not a valid arithmetic expression: {expression!r}") from None
    try:
        return _evaluate(tree.body)
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("result too large") from None
    except RecursionError:
        raise CalculatorError("expression nested too deeply") from None


def _evaluate(node: ast.expr) -> int | float:
    if isinstance(node, ast.Constant):
        if type(node.value) in (int, float):
            return _checked(node.value)
        kind = "strings" if isinstance(node.value, (str, bytes)) else f"{type(node.value).__name__} values"
        raise CalculatorError(f"{kind} are not allowed, only numbers")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return _checked(_BINARY[type(node.op)](left, right))
    if isinstance(node, (ast.UnaryOp, ast.BinOp)):
        symbol = _SYMBOLS.get(type(node.op), type(node.op).__name__)
        raise CalculatorError(f"operator {symbol} is not allowed, only + - * / // % **")
    if isinstance(node, ast.Name):
        raise CalculatorError(f"names are not allowed (got {node.id!r}), only numbers")
    what = _NODE_NAMES.get(type(node), type(node).__name__)
    raise CalculatorError(f"{what} are not allowed, only arithmetic on numbers")


def _check_power(base: int | float, exponent: int | float) -> None:
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"exponent too large ({exponent}, at most {MAX_EXPONENT})")
    # |base| >= 2**(bits-1), so the power has at least (bits-1)*exponent bits.
    if isinstance(base, int) and isinstance(exponent, int) and (abs(base).bit_length() - 1) * exponent > MAX_INT_BITS:
        raise CalculatorError(f"result too large (more than {MAX_INT_BITS} bits)")
    if base < 0 and not float(exponent).is_integer():
        raise CalculatorError("a negative number to a fractional power is not a real number")


def _checked(value: int | float) -> int | float:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError(f"result too large (more than {MAX_INT_BITS} bits)")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result too large" if math.isinf(value) else "result is not a number")
    return value
