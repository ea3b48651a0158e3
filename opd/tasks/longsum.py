"""Long worked multi-operand addition: the testbed regime of issue 12, where the paper's failure modes exist.

One problem space, a teacher's style and three student styles, one shared vocabulary (the default `Tokenizer()`):

    prompt:   a7 b5 c9 d3 ... =          operand_form=listed: min_terms..max_terms labelled one-digit operands
              s37 x3 y8 n11=             operand_form=cycled: start 37, then +3, +8, +3, ... for 11 terms

    worked    (the teacher's, long and free; ~20-26 tokens per operand at width 3)
              <think>take a7 mug is 000+7=007
              put b5 pen on 5+007=012 closed 012
              put b5 pen on 5+007=012 closed 012
              ...
              </think>153<eot>
      every line writes its operand next to its label and adds it to the running sum, with genuine freedom:
      an opening word (1 of 12), an aside word (1 of 8), a linking word (1 of 8), the order of the two
      addends (`swap_prob`) and an optional check that repeats the new sum with a check word (`check_prob`,
      1 of 4); with `repeat_prob` a line is written again, identically, as a recheck. The freedom is drawn
      per item from a hash of its prompt, so the demonstration distribution is multimodal and the teacher's next-token
      distribution is too. In the listed form each line looks its operand up by label, an induction-head
      lookup per line that the tiny CPU models do not learn at CPU budgets; in the cycled form every line
      reads one of two fixed keys (results/notes/30_regime.md).

    chain     (a student's, terse: the worked line's steps with no freedom and no words; ~12 tokens per
              operand at width 3)
              <think>a:000+7=007
              b:007+5=012
              ...
              </think>153<eos>

    brief     (a student's: its first `brief_head` lines in the worked format with fixed choices, then the
              chain, so its early tokens read like the teacher's data and the rest do not)
              <think>take a7 apple is 000+7=007
              take b5 apple is 007+5=012
              c:012+9=021
              ...
              </think>153<eos>
      chain and brief lines are rechecked (written twice) with `student_repeat_prob`.

    direct    (a student's, short: ~4 tokens per operand, ~70 tokens)
              <think>a7 b12 c21 ...</think>153<eos>
      running sums only, unpadded: each step is a lookup and an addition with nothing written down to check.

`operation="sub"` (cycled operands only) is the countdown, a second task of the same shape for the multi-task
table: the running value starts at `start` + 9 x max_terms (never negative) and each line subtracts its
operand ("take a7 mug is 207-7=200"; no swap, subtraction does not commute); its prompts end with "-" instead
of "=", so the two tasks never share a prompt.

Sums are zero-padded to `width` digits (default: the largest sum's). `LongSumTask` is the student's side of a
route (`style`, the student's conventions);
`teacher_view()` is the same problem space as the teacher writes it (`teacher_style`, and with
`teacher_conventions="paper"` the teacher's special-token conventions read from the SAME vocabulary through
`Tokenizer.shared_conventions`: "<think>"/"</think>" spelled as ordinary pieces, "<eot>" ending the text,
as OpenThinker3 relative to Qwen2.5-Instruct). The teacher therefore shares every id with the student (every
objective, LSM included, applies) and never saw the student's think or EOS ids as targets: the mismatched
special ids the paper masks are exactly the student's `special_ids()` (think_open, think_close, eos).

The verifier is style-free (the integer after the one "</think>"), so a student that moves towards the
teacher's style during OPD is scored the same way. The response budget is at least `budget_factor` x the
median worked length, so a student can learn to sustain the teacher's length. Train and eval problems are a
hash partition of the prompt strings: they never overlap.
"""

from __future__ import annotations

import math

import numpy as np

from opd.tasks.arithmetic import LABELS, parse_answer
from opd.tasks.common import (
    Problem,
    SingleTurnTask,
    check_split,
    draw_distinct,
    hash_bucket,
    split_index,
    split_of_key,
)
from opd.tasks.tokenizer import Tokenizer

STYLES = ("direct", "chain", "brief", "worked")
CONVENTIONS = ("paper", "same")
# listed: "a7 b5 c9 ..." (each line looks its operand up by label: an induction-head lookup per line);
# cycled: "s37 x3 y8 n11=" (start 37, then +3, +8, +3, ... for 11 terms: every line reads one of two fixed keys).
OPERAND_FORMS = ("listed", "cycled")
OPERATIONS = ("add", "sub")  # add: the long sum; sub: the countdown (a second task, same shape)
SIGN = {"add": "+", "sub": "-"}
MAX_START = 99
# Single-token pieces of the default vocabulary (the tests check that each encodes as one id).
OPENERS = ("take", "put", "and", "go", "look", "open", "pick", "see", "can", "you", "the", "arrive")
LINKS = ("is", "at", "on", "in", "to", "from", "up", "are")
ASIDES = ("apple", "bread", "egg", "mug", "plate", "knife", "book", "pen")
CHECK_WORDS = ("it", "closed", "happens", "carrying")
MAX_REPEATS = 3  # repeated lines per response at most (bounds the padded demonstration length)
# Keys of the task section that only the student's side reads: changing them must not retrain the teacher.
STUDENT_ONLY_KEYS = ("style", "student_repeat_prob", "brief_head")
MEDIAN_SAMPLE = 256  # problems whose worked length sets the response budget


def cycled(x: int, y: int, n: int) -> list[int]:
    """The operands of a cycled prompt: x, y, x, y, ... (n terms)."""
    return [(x, y)[i % 2] for i in range(n)]


def step(total: int, x: int, operation: str) -> int:
    """The running value after one operand."""
    return total + x if operation == "add" else total - x


def worked_line(label: str, x: int, total: int, width: int, opener: str, aside: str, link: str, swap: bool,
                check_word: str | None, operation: str = "add") -> str:
    """One worked line, e.g. "open a5 mug is 063+5=068 it 068\\n" (a countdown's: "... 207-7=200 ...")."""
    new = step(total, x, operation)
    a, b = f"{total:0{width}d}", str(x)
    if swap and operation == "add":
        a, b = b, a
    check = f" {check_word} {new:0{width}d}" if check_word is not None else ""
    return f"{opener} {label}{x} {aside} {link} {a}{SIGN[operation]}{b}={new:0{width}d}{check}\n"


def with_repeats(lines: list[str], repeat_prob: float, choices: np.random.Generator) -> str:
    """The lines, each followed by an identical copy (a recheck) with probability `repeat_prob`, at most
    MAX_REPEATS copies per response."""
    out, repeats = [], 0
    for line in lines:
        out.append(line)
        if repeat_prob > 0 and repeats < MAX_REPEATS and choices.random() < repeat_prob:
            out.append(line)
            repeats += 1
    return "".join(out)


def worked_lines(numbers: list[int], width: int, choices: np.random.Generator, *, swap_prob: float,
                 check_prob: float, start: int = 0, repeat_prob: float = 0.0, operation: str = "add") -> str:
    """The worked solution's lines (without the think markers): one line per operand from a running sum
    that begins at `start`, free choices from `choices` (see the module docstring)."""
    lines, total = [], start
    for label, x in zip(LABELS, numbers, strict=False):
        opener = OPENERS[int(choices.integers(len(OPENERS)))]
        aside = ASIDES[int(choices.integers(len(ASIDES)))]
        link = LINKS[int(choices.integers(len(LINKS)))]
        swap = bool(choices.random() < swap_prob)
        check = CHECK_WORDS[int(choices.integers(len(CHECK_WORDS)))] if choices.random() < check_prob else None
        lines.append(worked_line(label, x, total, width, opener, aside, link, swap, check, operation))
        total = step(total, x, operation)
    return with_repeats(lines, repeat_prob, choices)


def chain_line(label: str, x: int, total: int, width: int, operation: str = "add") -> str:
    """The terse chain line "a:0000+7=0007\\n" (label, running value, operand, new value)."""
    return f"{label}:{total:0{width}d}{SIGN[operation]}{x}={step(total, x, operation):0{width}d}\n"


def chain_lines(numbers: list[int], width: int, start: int = 0, *, head: int = 0,
                operation: str = "add") -> list[str]:
    """The terse chain style's lines, one fixed-format line per operand with no freedom and no words; the
    first `head` lines in the worked format with fixed choices (the brief style)."""
    lines, total = [], start
    for i, (label, x) in enumerate(zip(LABELS, numbers, strict=False)):
        lines.append(worked_line(label, x, total, width, OPENERS[0], ASIDES[0], LINKS[0], False, None, operation)
                     if i < head else chain_line(label, x, total, width, operation))
        total = step(total, x, operation)
    return lines


def direct_lines(numbers: list[int], start: int = 0, operation: str = "add") -> str:
    total, parts = start, []
    for label, x in zip(LABELS, numbers, strict=False):
        total = step(total, x, operation)
        parts.append(f"{label}{total}")
    return " ".join(parts)


class LongSumTask(SingleTurnTask):
    """Sums of `min_terms..max_terms` labelled one-digit operands in a short (student) or long worked
    (teacher) style; see the module docstring."""

    name = "longsum"
    metric = "accuracy"
    student_only_keys = STUDENT_ONLY_KEYS

    def __init__(
        self,
        min_terms: int = 13,
        max_terms: int = 17,
        style: str = "direct",
        teacher_style: str = "worked",
        teacher_conventions: str = "paper",
        swap_prob: float = 0.5,
        check_prob: float = 0.5,
        repeat_prob: float = 0.0,
        student_repeat_prob: float = 0.0,
        brief_head: int = 2,
        budget_factor: float = 2.0,
        eval_fraction: float = 0.1,
        width: int | None = None,
        operand_form: str = "listed",
        operation: str = "add",
        tokenizer: Tokenizer | None = None,
    ):
        for key, value, allowed in (("style", style, STYLES), ("teacher_style", teacher_style, STYLES),
                                    ("teacher_conventions", teacher_conventions, CONVENTIONS),
                                    ("operand_form", operand_form, OPERAND_FORMS),
                                    ("operation", operation, OPERATIONS)):
            if value not in allowed:
                raise ValueError(f"{key}: expected one of {list(allowed)}, got {value!r}")
        if not 2 <= min_terms <= max_terms <= len(LABELS):
            raise ValueError(f"min_terms/max_terms: expected 2 <= min_terms <= max_terms <= {len(LABELS)}, "
                             f"got {min_terms}, {max_terms}")
        for key, value in (("swap_prob", swap_prob), ("check_prob", check_prob), ("repeat_prob", repeat_prob),
                           ("student_repeat_prob", student_repeat_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{key}: expected a probability in [0, 1], got {value}")
        if not 0 <= int(brief_head) <= min_terms:
            raise ValueError(f"brief_head: expected 0..min_terms ({min_terms}) worked lines, got {brief_head}")
        if not budget_factor >= 1.0:
            raise ValueError(f"budget_factor: expected a number >= 1, got {budget_factor}")
        if not 0.0 < eval_fraction < 0.5:
            raise ValueError(f"eval_fraction: expected a value in (0, 0.5) (validation takes as much again), "
                             f"got {eval_fraction}")
        self.min_terms, self.max_terms = int(min_terms), int(max_terms)
        self.style, self.teacher_style, self.teacher_conventions = style, teacher_style, teacher_conventions
        self.swap_prob, self.check_prob = float(swap_prob), float(check_prob)
        self.repeat_prob, self.student_repeat_prob = float(repeat_prob), float(student_repeat_prob)
        self.brief_head = int(brief_head)
        self.budget_factor, self.eval_fraction = float(budget_factor), float(eval_fraction)
        if operation == "sub" and operand_form != "cycled":
            raise ValueError(f"operation: expected add with operand_form={operand_form!r} (the countdown, sub, "
                             "needs operand_form=cycled)")
        self.operand_form, self.operation = operand_form, operation
        least = len(str(self._largest_value()))
        if width is not None and not least <= int(width) <= 8:
            raise ValueError(f"width: expected null or {least}..8 digits (the largest sum has {least}), got {width}")
        self.width = least if width is None else int(width)
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer()
        self.max_prompt_len = 1 + len(self.tokenizer.encode(self.format_prompt([9] * self.max_terms,
                                                                                     self._largest_start())))
        # Demonstrations are padded to this style's longest; rollouts get the whole budget.
        self.demo_len = self._worst_len(self.style)
        self.max_response_len = max(self.demo_len, self._worst_len(teacher_style),
                                    math.ceil(self.budget_factor * self.median_teacher_len()))

    def _kwargs(self) -> dict:
        return {"min_terms": self.min_terms, "max_terms": self.max_terms, "swap_prob": self.swap_prob,
                "check_prob": self.check_prob, "repeat_prob": self.repeat_prob,
                "student_repeat_prob": self.student_repeat_prob, "brief_head": self.brief_head,
                "budget_factor": self.budget_factor,
                "eval_fraction": self.eval_fraction, "teacher_style": self.teacher_style, "width": self.width,
                "operand_form": self.operand_form, "operation": self.operation}

    def teacher_view(self) -> LongSumTask:
        """The same problems as the teacher writes them: `teacher_style`, and the teacher's special-token
        conventions on the same vocabulary when teacher_conventions="paper"."""
        tok = (Tokenizer.shared_conventions(self.tokenizer) if self.teacher_conventions == "paper"
               else self.tokenizer)
        view = LongSumTask(style=self.teacher_style, teacher_conventions="same", tokenizer=tok, **self._kwargs())
        view.max_response_len = self.max_response_len  # one budget for both sides
        return view

    def base_view(self) -> LongSumTask:
        """The teacher's demonstrations in the student's special-token conventions: what the teacher's base is
        SFT'd on (a route's teacher_base_steps), as the paper's teacher starts from a model that ended its
        turns with the student's EOS."""
        view = LongSumTask(style=self.teacher_style, teacher_conventions="same", tokenizer=self.tokenizer,
                           **self._kwargs())
        view.max_response_len = self.max_response_len
        return view

    # -- problems: (start, numbers), the running sum's first value and the operands in line order ----------

    def format_prompt(self, numbers: list[int], start: int = 0) -> str:
        if self.operand_form == "cycled":
            return f"s{start} x{numbers[0]} y{numbers[1]} n{len(numbers)}{'=' if self.operation == 'add' else '-'}"
        return " ".join(f"{label}{x}" for label, x in zip(LABELS, numbers, strict=False)) + "="

    def parse_prompt(self, prompt: str) -> tuple[int, list[int]]:
        """(start, numbers) of a prompt of this task."""
        if self.operand_form == "cycled":
            s, x, y, n = (int(t[1:]) for t in prompt[:-1].split(" "))
            return s, cycled(x, y, n)
        return 0, [int(t[1:]) for t in prompt[:-1].split(" ")]

    def operands(self, p: Problem) -> list[int]:
        return self.parse_prompt(p.prompt)[1]

    def solution_text(self, numbers: list[int], style: str, start: int = 0) -> str:
        """The full response text in the default conventions ("<think>...</think>ANSWER<eos>"). Repeated
        lines: `repeat_prob` in the teacher's style, `student_repeat_prob` in any other."""
        prompt = self.format_prompt(numbers, start)
        if style == "worked":
            choices = np.random.default_rng(hash_bucket("longsum:" + prompt, 2**63))
            body = worked_lines(numbers, self.width, choices, swap_prob=self.swap_prob, check_prob=self.check_prob,
                                start=start, repeat_prob=self._repeat_prob(style), operation=self.operation)
        elif style in ("chain", "brief"):
            choices = np.random.default_rng(hash_bucket("longsum-student:" + prompt, 2**63))
            lines = chain_lines(numbers, self.width, start, head=self._head(style), operation=self.operation)
            body = with_repeats(lines, self._repeat_prob(style), choices)
        else:
            body = direct_lines(numbers, start, self.operation)
        return "<think>" + body + "</think>" + str(self.result(numbers, start)) + "<eos>"

    def result(self, numbers: list[int], start: int = 0) -> int:
        """The answer: the running value after every operand."""
        return start + sum(numbers) if self.operation == "add" else start - sum(numbers)

    def _repeat_prob(self, style: str) -> float:
        """Recheck probability of a style: `repeat_prob` for the teacher's, `student_repeat_prob` otherwise."""
        return self.repeat_prob if style == self.teacher_style else self.student_repeat_prob

    def _head(self, style: str) -> int:
        """Worked-format lines at the start of a chain-family style."""
        return self.brief_head if style == "brief" else 0

    def make_problem(self, numbers: list[int], start: int = 0) -> Problem:
        if not self.min_terms <= len(numbers) <= self.max_terms:
            raise ValueError(f"numbers: expected {self.min_terms}..{self.max_terms} terms, got {len(numbers)}")
        if any(not 0 <= x <= 9 for x in numbers):
            raise ValueError(f"numbers: each must be a digit 0..9, got {numbers}")
        lo = self._start_offset()
        if self.operand_form == "cycled" and (list(numbers) != cycled(numbers[0], numbers[1], len(numbers))
                                              or not lo <= start <= lo + MAX_START):
            raise ValueError(f"numbers/start: cycled operands alternate two digits from a start in "
                             f"{lo}..{lo + MAX_START}, got {numbers}, {start}")
        if self.operand_form == "listed" and start != 0:
            raise ValueError(f"start: listed operands sum from 0, got {start}")
        return Problem(self.format_prompt(numbers, start), str(self.result(list(numbers), start)),
                       self.solution_text(list(numbers), self.style, start))

    def _draw(self, rng: np.random.Generator) -> tuple[int, list[int]]:
        k = int(rng.integers(self.min_terms, self.max_terms + 1))
        if self.operand_form == "cycled":
            start, x, y = (int(v) for v in rng.integers(0, [MAX_START + 1, 10, 10]))
            return start + self._start_offset(), cycled(x, y, k)
        return 0, [int(x) for x in rng.integers(0, 10, size=k)]

    def split_of(self, p: Problem | str) -> str:
        return split_of_key(p if isinstance(p, str) else p.prompt, self.eval_fraction)

    def problems(self, split: str, n: int, seed: int) -> list[Problem]:
        """`n` distinct problems of `split`, deterministic given (split, n, seed), the same prompts in every
        style and view."""
        check_split(split)
        if n < 0:
            raise ValueError(f"n: expected a non-negative count, got {n}")
        rng = np.random.default_rng([int(seed), split_index(split)])
        drawn = draw_distinct(n, lambda: self._draw(rng), lambda d: self.format_prompt(d[1], d[0]),
                              lambda _, prompt: self.split_of(prompt) == split,
                              error=f"problems: the {split} split has fewer than {n} distinct problems")
        return [self.make_problem(numbers, start) for start, numbers in drawn]

    # -- lengths --------------------------------------------------------------------------------------

    def _encoded_len(self, text: str) -> int:
        return len(self.tokenizer.encode(self._convert(text)))

    def _worst_len(self, style: str) -> int:
        """Longest response of `style` in this tokenizer: every operand 9, every check written."""
        numbers, start = [9] * self.max_terms, self._largest_start()
        if style == "direct":
            return self._encoded_len(self.solution_text(numbers, style, start))
        if style == "worked":
            lines = worked_lines(numbers, self.width, np.random.default_rng(0), swap_prob=0.0, check_prob=1.0,
                                 start=start, operation=self.operation)
            # opener, aside, link and check word are one token each here; bound them anyway
            longest = max(len(self.tokenizer.encode(w)) for w in OPENERS + ASIDES + LINKS + CHECK_WORDS)
            extra = 4 * (longest - 1) * self.max_terms
        else:
            lines = "".join(chain_lines(numbers, self.width, start, head=self._head(style), operation=self.operation))
            extra = 0
        longest_line = max(len(self.tokenizer.encode(line)) for line in lines.splitlines(keepends=True)) + extra
        repeats = MAX_REPEATS if self._repeat_prob(style) else 0
        # The answer is written unpadded: the longest is the largest value, not this worst case's result (the
        # countdown's all-nines result is its smallest).
        return (self._encoded_len("<think>" + lines + "</think>" + str(self._largest_value()) + "<eos>") + extra
                + repeats * longest_line)

    def _start_offset(self) -> int:
        """The smallest start: 0 for a sum; for the countdown, room for max_terms nines (never negative)."""
        return 9 * self.max_terms if self.operation == "sub" else 0

    def _largest_start(self) -> int:
        return self._start_offset() + MAX_START if self.operand_form == "cycled" else 0

    def _largest_value(self) -> int:
        """The largest number a solution writes (what the zero padding must hold)."""
        return self._largest_start() + (9 * self.max_terms if self.operation == "add" else 0)

    def median_teacher_len(self) -> float:
        """Median token length of the teacher-style demonstration over a fixed sample of problems, in the
        teacher's conventions (what the budget is a multiple of)."""
        teacher_tok = (Tokenizer.shared_conventions(self.tokenizer) if self.teacher_conventions == "paper"
                       and self.style != self.teacher_style else self.tokenizer)
        rng = np.random.default_rng(12345)
        lengths = []
        for _ in range(MEDIAN_SAMPLE):
            start, numbers = self._draw(rng)
            text = self.solution_text(numbers, self.teacher_style, start)
            lengths.append(len(teacher_tok.encode(text[: -len("<eos>")] + teacher_tok.roles["eos"])))
        return float(np.median(lengths))

    # -- targets and scoring --------------------------------------------------------------------------

    def _convert(self, text: str) -> str:
        """Default-convention text -> this tokenizer's: its EOS string replaces "<eos>" (think markers
        encode as this tokenizer's own pieces or specials)."""
        eos = self.tokenizer.roles["eos"]
        return text if eos == "<eos>" else text[: -len("<eos>")] + eos

    def demonstration(self, p: Problem) -> str:
        return self._convert(p.solution)

    def score(self, p: Problem, response_text: str) -> float:
        """1.0 iff the response is "<think>...</think>" then exactly the right integer, whatever the style."""
        got = parse_answer(response_text)
        return 1.0 if got is not None and got == int(p.answer) else 0.0

    # -- the trainer's Task protocol: SingleTurnTask, with SFT demonstrations padded to this style's longest
    # (not the whole budget: SFT never pays for the budget's padding)

    def demonstration_length(self) -> int:
        return int(self.demo_len)

    def __repr__(self) -> str:
        # the sum's repr is unchanged by the countdown (stored evaluations are matched by it)
        countdown = "" if self.operation == "add" else f", operation={self.operation!r}"
        return (f"LongSumTask(style={self.style!r}, terms={self.min_terms}..{self.max_terms}{countdown}, "
                f"tokenizer={self.tokenizer.name!r})")
