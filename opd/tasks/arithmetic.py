"""Generated multi-term addition with a long, left-to-right learnable chain of thought, and its exact verifier.

Two solution styles (config `style`); the default is "chain".

chain (default: 9-11 one-digit operands, demonstrations 95-115 tokens, median 105). Operands carry letter
labels; each line adds one operand to the running sum (sums zero-padded to a fixed width):

    prompt:    a7 b5 c9=
    solution:  <think>a:000+7=007
               b:007+5=012
               c:012+9=021
               </think>21<eos>

  Every token is a local step -- the next label (alphabet successor), a copy of the previous line's sum (fixed
  offset), the operand after the matching label in the prompt (an induction-head lookup), or a one-digit
  addition -- so a ~0.6M-parameter Transformer learns it in a few hundred SFT steps with a few operands,
  while errors compound along the chain for weaker models.

column (e.g. digits=3, min_terms=3, max_terms=5; ~85-130 tokens): zero-padded numbers, one line per column,
ones first: the column's digits copied from the prompt, then added one at a time to the carry-in:

    prompt:    347+085+912=
    solution:  <think>c0:7,5,2|0+7=07+5=12+2=14
               c1:4,8,1|1+4=05+8=13+1=14
               c2:3,0,9|1+3=04+0=04+9=13
               </think>1344<eos>

  The carry-in of a line is the tens digit of the previous line's last sum; the answer is the last tens digit
  (if not 0) then the lines' ones digits, last line first. Harder to learn: the column fetch is positional.

Train and eval problems are a hash partition of the problem space (the prompt string): they never overlap.
"""

from __future__ import annotations

import re

import numpy as np

from opd.tasks.common import (
    Problem,
    SingleTurnTask,
    check_split,
    draw_distinct,
    split_index,
    split_of_key,
)
from opd.tasks.tokenizer import Tokenizer

_ANSWER_RE = re.compile(r"\s*(\d+)\s*")
LABELS = "abcdefghijklmnopqrstuvwxyz"
STYLES = ("column", "chain")


def solve(numbers: list[int], digits: int) -> tuple[str, int]:
    """(solution text including "<think>" ... "</think>ANSWER<eos>", answer) for the sum of `numbers`."""
    lines = []
    carry = 0
    ones = []
    for col in range(digits):
        column = [(x // 10**col) % 10 for x in numbers]
        s = carry
        chain = [str(carry)]
        for d in column:
            s += d
            chain.append(f"+{d}={s:02d}")
        lines.append(f"c{col}:" + ",".join(map(str, column)) + "|" + "".join(chain) + "\n")
        ones.append(s % 10)
        carry = s // 10
    answer = sum(numbers)
    digits_text = (str(carry) if carry else "") + "".join(str(d) for d in reversed(ones))
    digits_text = digits_text.lstrip("0") or "0"
    assert int(digits_text) == answer, (numbers, digits_text)
    return "<think>" + "".join(lines) + "</think>" + digits_text + "<eos>", answer


def solve_chain(numbers: list[int], digits: int, width: int) -> tuple[str, int]:
    """Labelled running-sum solution: one line per operand, "<label>:<sum so far>+<operand>=<new sum>"."""
    lines, total = [], 0
    for label, x in zip(LABELS, numbers, strict=False):
        new = total + x
        lines.append(f"{label}:{total:0{width}d}+{x:0{digits}d}={new:0{width}d}\n")
        total = new
    return "<think>" + "".join(lines) + "</think>" + str(total) + "<eos>", total


def parse_answer(response_text: str) -> int | None:
    """The integer after the first "</think>", or None when malformed.

    Malformed: no "</think>", an opening "<think>" missing at the start, anything but one integer after the
    marker (whitespace allowed), or a second "</think>".
    """
    if not response_text.startswith("<think>"):
        return None
    head, sep, tail = response_text.partition("</think>")
    if not sep or "</think>" in tail or "<think>" in head[len("<think>") :]:
        return None
    m = _ANSWER_RE.fullmatch(tail)
    if m is None:
        return None
    return int(m.group(1))


class ArithmeticTask(SingleTurnTask):
    """Sums of `min_terms..max_terms` zero-padded `digits`-digit numbers (see the module docstring)."""

    name = "arithmetic"
    metric = "accuracy"

    def __init__(
        self,
        digits: int = 1,
        min_terms: int = 9,
        max_terms: int = 11,
        eval_fraction: float = 0.1,
        style: str = "chain",
        tokenizer: Tokenizer | None = None,
    ):
        if style not in STYLES:
            raise ValueError(f"style: expected one of {list(STYLES)}, got {style!r}")
        if not 1 <= digits <= 9:
            raise ValueError(f"digits: expected an integer in [1, 9], got {digits}")
        if not 2 <= min_terms <= max_terms:
            raise ValueError(f"min_terms/max_terms: expected 2 <= min_terms <= max_terms, got {min_terms}, {max_terms}")
        if style == "column" and max_terms > 11:
            raise ValueError(f"max_terms: at most 11 (partial sums are written with two digits), got {max_terms}")
        if style == "chain" and max_terms > len(LABELS):
            raise ValueError(f"max_terms: at most {len(LABELS)} (one letter label per operand), got {max_terms}")
        if not 0.0 < eval_fraction < 0.5:
            raise ValueError(f"eval_fraction: expected a value in (0, 0.5) (validation takes as much again), "
                             f"got {eval_fraction}")
        self.digits, self.min_terms, self.max_terms, self.style = digits, min_terms, max_terms, style
        self.sum_width = len(str(max_terms * (10**digits - 1)))
        self.eval_fraction = eval_fraction
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer()
        self.max_prompt_len = 1 + len(self.tokenizer.encode(self.format_prompt([0] * max_terms)))
        worst = [10**digits - 1] * max_terms
        self.max_response_len = len(self.tokenizer.encode(self.demonstration(self.make_problem(worst))))

    # -- problems -------------------------------------------------------------------------------------

    def format_prompt(self, numbers: list[int]) -> str:
        if self.style == "chain":
            return " ".join(f"{label}{x:0{self.digits}d}" for label, x in zip(LABELS, numbers, strict=False)) + "="
        return "+".join(f"{x:0{self.digits}d}" for x in numbers) + "="

    def operands(self, p: Problem) -> list[int]:
        body = p.prompt[:-1]
        if self.style == "chain":
            return [int(t[1:]) for t in body.split(" ")]
        return [int(t) for t in body.split("+")]

    def make_problem(self, numbers: list[int]) -> Problem:
        if not self.min_terms <= len(numbers) <= self.max_terms:
            raise ValueError(f"numbers: expected {self.min_terms}..{self.max_terms} terms, got {len(numbers)}")
        if any(not 0 <= x < 10**self.digits for x in numbers):
            raise ValueError(f"numbers: each must be in [0, {10**self.digits}), got {numbers}")
        if self.style == "chain":
            solution, answer = solve_chain(list(numbers), self.digits, self.sum_width)
        else:
            solution, answer = solve(list(numbers), self.digits)
        return Problem(self.format_prompt(numbers), str(answer), solution)

    def split_of(self, p: Problem | str) -> str:
        """Return "train" or "eval": a hash partition of prompts, fixed for a given eval_fraction."""
        prompt = p if isinstance(p, str) else p.prompt
        return split_of_key(prompt, self.eval_fraction)

    def problems(self, split: str, n: int, seed: int) -> list[Problem]:
        """`n` distinct problems of `split`, deterministic given (split, n, seed); prefixes agree across n."""
        check_split(split)
        if n < 0:
            raise ValueError(f"n: expected a non-negative count, got {n}")
        rng = np.random.default_rng([int(seed), split_index(split)])

        def draw() -> list[int]:
            k = int(rng.integers(self.min_terms, self.max_terms + 1))
            return [int(x) for x in rng.integers(0, 10**self.digits, size=k)]

        error = f"problems: the {split} split of this difficulty has fewer than {n} distinct problems"
        numbers = draw_distinct(n, draw, self.format_prompt, lambda _, prompt: self.split_of(prompt) == split,
                                error=error)
        return [self.make_problem(x) for x in numbers]

    # -- targets and scoring --------------------------------------------------------------------------

    def demonstration(self, p: Problem) -> str:
        """The solution in this task's tokenizer conventions (`p.solution` ends with the default "<eos>";
        a variant tokenizer's EOS string replaces it, and its think markers encode as its own pieces)."""
        eos = self.tokenizer.roles["eos"]
        return p.solution if eos == "<eos>" else p.solution[: -len("<eos>")] + eos

    def score(self, p: Problem, response_text: str) -> float:
        """1.0 iff the response is "<think>...</think>" followed by exactly the right integer (EOS already
        stripped by decode); 0.0 otherwise, including malformed responses."""
        got = parse_answer(response_text)
        return 1.0 if got is not None and got == int(p.answer) else 0.0

    def __repr__(self) -> str:
        return (
            f"ArithmeticTask(style={self.style!r}, digits={self.digits}, min_terms={self.min_terms}, "
            f"max_terms={self.max_terms})"
        )
