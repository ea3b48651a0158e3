"""Generated multi-term addition with a column-by-column chain of thought, and its exact verifier.

A problem adds `min_terms..max_terms` numbers of `digits` digits, written zero-padded so every column sits
at a fixed offset:

    prompt:    347+085+912=
    solution:  <think>c0:7,5,2|0+7=07+5=12+2=14
               c1:4,8,1|1+4=05+8=13+1=14
               c2:3,0,9|1+3=04+0=04+9=13
               </think>1344<eos>

Line `ci` handles column i (ones first): it copies that column's digits from the prompt, then adds them one
at a time to the carry-in, every partial sum written with two digits. The carry-in of a line is the tens digit
of the previous line's last sum; the answer is the last line's tens digit (if not 0) followed by the ones
digits of the lines, last line first. Every step is either a copy at a fixed offset or a one-digit addition,
so a small Transformer can learn it left to right; the chain is long (~85-130 tokens by default) so that
student rollouts have room to drift from the teacher's support.

Train and eval problems are a hash partition of the problem space (the prompt string): they never overlap.
"""

from __future__ import annotations

import re

import numpy as np

from opd.tasks.common import Problem, check_split, split_of_key
from opd.tasks.tokenizer import Tokenizer

_ANSWER_RE = re.compile(r"\s*(\d+)\s*")


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


class ArithmeticTask:
    """Sums of `min_terms..max_terms` zero-padded `digits`-digit numbers (see the module docstring)."""

    name = "arithmetic"

    def __init__(
        self,
        digits: int = 3,
        min_terms: int = 3,
        max_terms: int = 5,
        eval_fraction: float = 0.1,
        tokenizer: Tokenizer | None = None,
    ):
        if not 1 <= digits <= 9:
            raise ValueError(f"digits: expected an integer in [1, 9], got {digits}")
        if not 2 <= min_terms <= max_terms:
            raise ValueError(f"min_terms/max_terms: expected 2 <= min_terms <= max_terms, got {min_terms}, {max_terms}")
        if max_terms > 11:
            raise ValueError(f"max_terms: at most 11 (partial sums are written with two digits), got {max_terms}")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction: expected a value in (0, 1), got {eval_fraction}")
        self.digits, self.min_terms, self.max_terms = digits, min_terms, max_terms
        self.eval_fraction = eval_fraction
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer()
        # BOS + max_terms numbers each followed by "+" or "=".
        self.max_prompt_len = 1 + max_terms * (digits + 1)
        worst = [10**digits - 1] * max_terms
        self.max_response_len = len(self.tokenizer.encode(self.demonstration(self.make_problem(worst))))

    # -- problems -------------------------------------------------------------------------------------

    def format_prompt(self, numbers: list[int]) -> str:
        return "+".join(f"{x:0{self.digits}d}" for x in numbers) + "="

    def make_problem(self, numbers: list[int]) -> Problem:
        if not self.min_terms <= len(numbers) <= self.max_terms:
            raise ValueError(f"numbers: expected {self.min_terms}..{self.max_terms} terms, got {len(numbers)}")
        if any(not 0 <= x < 10**self.digits for x in numbers):
            raise ValueError(f"numbers: each must be in [0, {10**self.digits}), got {numbers}")
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
        rng = np.random.default_rng([int(seed), 0 if split == "train" else 1])
        out: list[Problem] = []
        seen: set[str] = set()
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 100 * n + 10_000:
                raise ValueError(f"problems: the {split} split of this difficulty has fewer than {n} distinct problems")
            k = int(rng.integers(self.min_terms, self.max_terms + 1))
            numbers = [int(x) for x in rng.integers(0, 10**self.digits, size=k)]
            prompt = self.format_prompt(numbers)
            if prompt in seen or self.split_of(prompt) != split:
                continue
            seen.add(prompt)
            out.append(self.make_problem(numbers))
        return out

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
        return f"ArithmeticTask(digits={self.digits}, min_terms={self.min_terms}, max_terms={self.max_terms})"
