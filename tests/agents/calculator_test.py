"""The calculator tool against an independent reference: Python's own parser (``ast``, whitelisted nodes only)
with exact ``fractions.Fraction`` arithmetic, and its refusals."""
import ast
import fractions
import operator

import numpy as np
import pytest

from rlj.agents import calculator as calc

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def reference(python_expression: str) -> fractions.Fraction:
  """The exact value of a Python arithmetic expression: only + - * / on int and float literals are walked."""

  def walk(node):
    if isinstance(node, ast.Expression):
      return walk(node.body)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
      return _BINOPS[type(node.op)](walk(node.left), walk(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
      return _UNARY[type(node.op)](walk(node.operand))
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
      return fractions.Fraction(repr(node.value))  # the shortest repr of a short decimal literal is the literal
    raise AssertionError(f"the reference does not evaluate {ast.dump(node)}")

  return walk(ast.parse(python_expression, mode="eval"))


@pytest.mark.parametrize("expression, python", [
    ("2 - 3 - 4", "2 - 3 - 4"), ("8 / 2 / 2", "8 / 2 / 2"), ("2 + 3 * 4", "2 + 3 * 4"), ("2 * 3 + 4", "2 * 3 + 4"),
    ("(2 + 3) * 4", "(2 + 3) * 4"), ("2 - (3 - 4)", "2 - (3 - 4)"), ("-3 * -4", "-3 * -4"), ("--5", "--5"),
    ("-(2 + 3)", "-(2 + 3)"), ("+7 - -2", "+7 - -2"), ("2 * -3 - 1", "2 * -3 - 1"), ("0.1 + 0.2", "0.1 + 0.2"),
    (".5 * 4", ".5 * 4"), ("1.25 / 0.5", "1.25 / 0.5"), ("7 / 2 * 2", "7 / 2 * 2"), ("1,234 + 1", "1234 + 1"),
    ("1,234,567.5 * 2", "1234567.5 * 2"), ("6 × 7", "6 * 7"), ("84 ÷ 2 ÷ 3", "84 / 2 / 3"),
    ("  ((1 + 2)) * (3)  ", "((1 + 2)) * (3)"), ("37*48", "37 * 48"), ("10 / 4", "10 / 4"),
])
def test_precedence_associativity_and_syntax(expression, python):
  assert calc.evaluate(expression) == reference(python)


def _random_expression(rng, depth):
  """(calculator text, Python text) of a random expression: numbers, + - * /, unary signs, parentheses."""
  kind = rng.integers(4) if depth > 0 else 0
  if kind == 0:
    if rng.random() < 0.3:
      whole, frac = int(rng.integers(0, 100)), int(rng.integers(0, 1000))
      text = f"{whole}.{frac}" if rng.random() < 0.8 else f".{frac}"
      return text, text
    n = int(rng.integers(0, 10 ** int(rng.integers(1, 5))))
    return (f"{n:,}" if rng.random() < 0.3 else str(n)), str(n)
  if kind == 1:
    sign = "-+"[int(rng.integers(2))]
    a, pa = _random_expression(rng, depth - 1)
    return f"{sign}{a}", f"{sign}{pa}"
  if kind == 2:
    a, pa = _random_expression(rng, depth - 1)
    return f"({a})", f"({pa})"
  op = "+-*/"[int(rng.integers(4))]
  shown = {"*": "*×", "/": "/÷"}.get(op, op * 2)[int(rng.integers(2))]   # × and ÷ half the time
  a, pa = _random_expression(rng, depth - 1)
  b, pb = _random_expression(rng, depth - 1)
  space = " " * int(rng.integers(0, 2))
  return f"{a}{space}{shown}{space}{b}", f"{pa} {op} {pb}"


def test_random_expressions_equal_reference():
  rng = np.random.default_rng(0)
  checked = refused = 0
  while checked < 400:
    text, python = _random_expression(rng, int(rng.integers(1, 5)))
    text = " " * int(rng.integers(0, 2)) + text + " \t\n"[:int(rng.integers(0, 4))]
    if len(text) > calc.MAX_CHARS:
      continue
    checked += 1
    try:
      want = reference(python)
    except ZeroDivisionError:
      with pytest.raises(calc.CalculatorError, match="^division by zero$"):
        calc.evaluate(text)
      refused += 1
      continue
    assert calc.evaluate(text) == want, (text, python)
    assert calc.calculator(text) == calc.format_value(want)
  assert refused < checked // 4   # most expressions are evaluated, not refused


def test_format_value():
  f = fractions.Fraction
  assert calc.format_value(f(1776)) == "1776"
  assert calc.format_value(f(-42)) == "-42"
  assert calc.format_value(f(10) ** 40) == "1" + "0" * 40      # integers in full, never in exponent form
  assert calc.format_value(f(14, 2)) == "7"
  assert calc.format_value(f(-7, 2)) == "-3.5"
  assert calc.format_value(f("0.1") + f("0.2")) == "0.3"
  assert calc.format_value(f("1234.5678")) == "1234.5678"
  for value in (f(1, 3), f(2, 3), f(-22, 7), f(123456789, 1000), f(1, 7000)):
    text = calc.format_value(value)
    digits = text.lstrip("-").replace(".", "").lstrip("0")
    assert len(digits) <= 10, text
    assert abs(f(text) - value) <= abs(value) * f(1, 10 ** 9), text   # rounded to 10 significant digits
  assert calc.format_value(f(2, 3)) == "0.6666666667"
  assert calc.calculator("37 * 48") == "1776" and calc.calculator("1 / 8") == "0.125"


@pytest.mark.parametrize("expression, match", [
    ("1 / 0", "division by zero"), ("1 / (2 - 2)", "division by zero"), ("5 ÷ 0.0", "division by zero"),
    ("", "empty"), ("   ", "empty"), ("(1 + 2", "ends too early"), ("(1 + 2 (", "not closed"),
    ("1 + 2)", r"unexpected '\)'"), ("()", "expected a number"), ("2 +", "ends too early"),
    ("2 + x", "unexpected character 'x'"), ("2 ** 3", "expected a number or '\\(' but found '\\*'"),
    ("__import__('os')", "unexpected character '_'"), ("2 3", "unexpected '3'"), ("1e5", "unexpected character 'e'"),
    ("1" + " + 1" * 60, f"longer than {calc.MAX_CHARS} characters"),
    ("(" * (calc.MAX_DEPTH + 1) + "1" + ")" * (calc.MAX_DEPTH + 1), f"more than {calc.MAX_DEPTH} nested"),
    ("-" * (calc.MAX_DEPTH + 1) + "1", f"more than {calc.MAX_DEPTH} nested"),
    ("9" * 59 + " * " + "9" * 59, f"beyond {calc.MAX_DIGITS} digits"),
    ("1 / " + "9" * 59 + " / " + "9" * 59, f"beyond {calc.MAX_DIGITS} digits"),
    ("1" * (calc.MAX_DIGITS + 1), f"longer than {calc.MAX_DIGITS} digits"),
])
def test_refusals_are_one_line(expression, match):
  with pytest.raises(calc.CalculatorError, match=match) as e:
    calc.calculator(expression)
  assert "\n" not in str(e.value) and str(e.value)


def test_bounds_allow_the_largest_accepted_inputs():
  assert calc.evaluate("(" * calc.MAX_DEPTH + "1" + ")" * calc.MAX_DEPTH) == 1
  assert calc.evaluate("-" * calc.MAX_DEPTH + "1") == 1
  assert calc.evaluate("9" * 29 + " * " + "9" * 29) == (10 ** 29 - 1) ** 2
  assert calc.evaluate("1" + " + 1" * ((calc.MAX_CHARS - 1) // 4)) == 1 + (calc.MAX_CHARS - 1) // 4
  with pytest.raises(calc.CalculatorError, match="must be a string"):
    calc.evaluate(12)
