"""A calculator tool: exact arithmetic on + - * / ( ) and decimal numbers, parsed by hand (never ``eval``).

Grammar (recursive descent, left-associative, the usual precedence)::

  expr   := term (("+" | "-") term)*
  term   := unary (("*" | "/") unary)*
  unary  := ("+" | "-") unary | atom
  atom   := number | "(" expr ")"
  number := digits ["." digits]       (commas inside digits are allowed: "1,234")

Values are ``fractions.Fraction`` so that ``0.1 + 0.2`` is ``0.3`` and ``7 / 2 * 2`` is ``7``; the result prints as
an integer when it is one, else as a plain decimal (no exponent) rounded to 10 significant digits. Bounds keep a
hostile model output cheap: at most ``MAX_CHARS`` characters, ``MAX_DEPTH`` nested parentheses and results below ``10 ** MAX_DIGITS``.
Every failure raises ``CalculatorError`` with a one-line message the model can read as its observation.
"""
from __future__ import annotations

import decimal
import fractions
import re

MAX_CHARS = 200
MAX_DEPTH = 32
MAX_DIGITS = 60
_TOKEN = re.compile(r"\s*(?:(\d[\d,]*(?:\.\d+)?|\.\d+)|(\S))")


class CalculatorError(ValueError):
  """An expression the calculator refuses (one line)."""


def _tokens(expression: str) -> list[str]:
  out = []
  for m in _TOKEN.finditer(expression):
    number, other = m.groups()
    if number is not None:
      out.append(number.replace(",", ""))
    elif other is not None:
      if other not in "+-*/()×÷":
        raise CalculatorError(f"unexpected character {other!r}; use numbers, + - * / and parentheses")
      out.append({"×": "*", "÷": "/"}.get(other, other))
  return out


class _Parser:

  def __init__(self, tokens: list[str]):
    self.tokens, self.i, self.depth = tokens, 0, 0

  def peek(self) -> str | None:
    return self.tokens[self.i] if self.i < len(self.tokens) else None

  def take(self) -> str:
    tok = self.peek()
    if tok is None:
      raise CalculatorError("the expression ends too early")
    self.i += 1
    return tok

  def expr(self) -> fractions.Fraction:
    value = self.term()
    while self.peek() in ("+", "-"):
      value = value + self.term() if self.take() == "+" else value - self.term()
      _check_size(value)
    return value

  def term(self) -> fractions.Fraction:
    value = self.unary()
    while self.peek() in ("*", "/"):
      op, rhs = self.take(), self.unary()
      if op == "/" and rhs == 0:
        raise CalculatorError("division by zero")
      value = value * rhs if op == "*" else value / rhs
      _check_size(value)
    return value

  def unary(self) -> fractions.Fraction:
    if self.peek() in ("+", "-"):
      sign = self.take()
      self.depth += 1
      if self.depth > MAX_DEPTH:
        raise CalculatorError(f"more than {MAX_DEPTH} nested signs or parentheses")
      value = self.unary()
      self.depth -= 1
      return -value if sign == "-" else value
    return self.atom()

  def atom(self) -> fractions.Fraction:
    tok = self.take()
    if tok == "(":
      self.depth += 1
      if self.depth > MAX_DEPTH:
        raise CalculatorError(f"more than {MAX_DEPTH} nested signs or parentheses")
      value = self.expr()
      if self.take() != ")":
        raise CalculatorError("a '(' is not closed")
      self.depth -= 1
      return value
    if tok[0].isdigit() or tok[0] == ".":
      if len(tok) > MAX_DIGITS:
        raise CalculatorError(f"a number longer than {MAX_DIGITS} digits")
      return fractions.Fraction(tok)
    raise CalculatorError(f"expected a number or '(' but found {tok!r}")


def _check_size(value: fractions.Fraction) -> None:
  if abs(value) >= 10 ** MAX_DIGITS or value.denominator >= 10 ** MAX_DIGITS:
    raise CalculatorError(f"a value beyond {MAX_DIGITS} digits")


def evaluate(expression: str) -> fractions.Fraction:
  """The exact value of ``expression`` (module docstring)."""
  if not isinstance(expression, str):
    raise CalculatorError(f"the expression must be a string, got {type(expression).__name__}")
  if len(expression) > MAX_CHARS:
    raise CalculatorError(f"the expression is longer than {MAX_CHARS} characters")
  tokens = _tokens(expression)
  if not tokens:
    raise CalculatorError("the expression is empty")
  parser = _Parser(tokens)
  value = parser.expr()
  if parser.peek() is not None:
    raise CalculatorError(f"unexpected {parser.peek()!r} after a complete expression")
  return value


def format_value(value: fractions.Fraction) -> str:
  """An integer as itself, anything else as a decimal of at most 10 significant digits (trailing zeros cut)."""
  if value.denominator == 1:
    return str(value.numerator)
  with decimal.localcontext() as ctx:
    ctx.prec = 10
    text = format(decimal.Decimal(value.numerator) / decimal.Decimal(value.denominator), "f")
  return text.rstrip("0").rstrip(".") if "." in text else text


def calculator(expression: str) -> str:
  """Evaluates an arithmetic expression with + - * / and parentheses, e.g. "37 * 48"."""
  return format_value(evaluate(expression))
