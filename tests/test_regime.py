"""The issue-12 regime: the long-sum task (demonstrations, verifier, multimodality, budget), the teacher's
special-token conventions on the shared vocabulary, and the regime report's measurements and JSON line."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from experiments import regime
from opd import failure_modes as fm
from opd.tasks import Tokenizer, make_task
from opd.tasks.longsum import ASIDES, CHECK_WORDS, LINKS, MAX_REPEATS, OPENERS, LongSumTask, worked_lines
from opd.train.config import register_configs, validate

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()

# opener, label, operand, aside, link, addend, addend, new sum, (check word, check)
_LINE = re.compile(r"^(\w+) ([a-z])(\d) (\w+) (\w+) (\d+)\+(\d+)=(\d+)( (\w+) (\d+))?$")


@pytest.fixture(scope="module")
def task():
    return LongSumTask()


@pytest.fixture(scope="module")
def teacher(task):
    return task.teacher_view()


# -- the shared vocabulary with the teacher's conventions --------------------------------------------------


def test_shared_conventions_same_ids_other_specials():
    base = Tokenizer()
    view = Tokenizer.shared_conventions(base)
    assert view.same_vocabulary(base) and view.vocab_size == base.vocab_size
    assert (base.eos_id, base.think_open_id, base.think_close_id) == (2, 3, 4)  # the student's, unchanged
    assert view.eos_id == base.token_to_id("<eot>") != base.eos_id
    assert view.think_open_id is None and view.think_close_id is None
    ids = view.encode("<think>7</think>7<eot>")
    assert len(ids) > 5 and not {2, 3, 4} & set(ids) and ids[-1] == view.eos_id  # markers as ordinary pieces
    assert view.decode(ids) == "<think>7</think>7" == base.decode(base.encode("<think>7</think>7<eos>"))
    with pytest.raises(ValueError, match="eos_token"):
        Tokenizer.shared_conventions(base, eos_token="<|endoftext|>")


# -- demonstrations and verifier ------------------------------------------------------------------------


def _check_worked(p, text):
    assert text.startswith("<think>") and text.endswith("<eot>")
    body, _, tail = text[len("<think>"):].partition("</think>")
    numbers, total = [int(t[1:]) for t in p.prompt[:-1].split(" ")], 0
    lines = body.rstrip("\n").split("\n")
    assert len(lines) == len(numbers)
    for label, x, line in zip("abcdefghijklmnopq", numbers, lines, strict=False):
        m = _LINE.match(line)
        assert m, line
        opener, lab, copied, aside, link, a, b, new = m.group(1, 2, 3, 4, 5, 6, 7, 8)
        assert opener in OPENERS and aside in ASIDES and link in LINKS and lab == label and int(copied) == x
        assert sorted([int(a), int(b)]) == sorted([total, x]) and int(new) == total + x
        assert m.group(10) in (None, *CHECK_WORDS) and m.group(11) in (None, new)
        total += x
    assert tail == f"{total}<eot>" and int(p.answer) == total


def test_demonstrations_are_correct_and_scored(task, teacher):
    for p in teacher.items("train", 40, 0):
        _check_worked(p, teacher.demonstration(p))
        assert teacher.score(p, teacher.tokenizer.decode(teacher.tokenizer.encode(teacher.demonstration(p)))) == 1
    for p in task.items("train", 40, 0):
        text = task.tokenizer.decode(task.tokenizer.encode(task.demonstration(p)))
        sums = [int(t[1:]) for t in text[len("<think>"):text.index("</think>")].split(" ")]
        assert sums == list(np.cumsum(task.operands(p))) and task.score(p, text) == 1.0
        assert task.score(p, text.replace(f"</think>{p.answer}", f"</think>{int(p.answer) + 1}")) == 0.0
        assert task.score(p, text[len("<think>"):]) == 0.0  # malformed
    chain = LongSumTask(style="chain", width=4)
    for p in chain.items("train", 40, 0):
        lines = chain.demonstration(p)[len("<think>"):].split("</think>")[0].rstrip("\n").split("\n")
        total = 0
        assert len(lines) == len(chain.operands(p))
        for label, x, line in zip("abcdefghijklmnopq", chain.operands(p), lines, strict=False):
            assert line == f"{label}:{total:04d}+{x}={total + x:04d}"
            total += x
        assert chain.score(p, chain.tokenizer.decode(chain.tokenizer.encode(chain.demonstration(p)))) == 1.0
    # the same prompts on both sides; splits never overlap
    assert [p.prompt for p in task.items("eval", 20, 3)] == [p.prompt for p in teacher.items("eval", 20, 3)]
    assert not {p.prompt for p in task.items("train", 300, 0)} & {p.prompt for p in task.items("eval", 300, 0)}


def test_encoded_layout_and_budget(task, teacher):
    for w in OPENERS + ASIDES + LINKS + CHECK_WORDS:
        assert len(task.tokenizer.encode(w)) == 1, w
    tok, _attn, target = teacher.demonstrations(teacher.items("train", 64, 0))
    lengths = target.sum(axis=1)
    assert tok.shape[1] == teacher.max_prompt_len + teacher.demo_len and lengths.max() <= teacher.demo_len
    assert np.median(lengths) >= 256  # R4's teacher length, in the teacher's own conventions
    assert set(tok[target > 0].tolist()).isdisjoint({2, 3, 4})  # never the student's EOS or think ids
    assert (tok[np.arange(64), teacher.max_prompt_len + lengths - 1] == teacher.tokenizer.eos_id).all()
    s_tok, _, s_target = task.demonstrations(task.items("train", 64, 0))
    assert s_target.sum(axis=1).max() < 100 and s_tok.shape[1] < tok.shape[1]  # the student's short style
    assert task.max_response_len == teacher.max_response_len >= 2 * task.median_teacher_len() >= 512
    assert task.special_ids() == {"think_open": 3, "think_close": 4, "eos": 2} and teacher.special_ids() == {"eos": 5}


def test_demonstration_distribution_is_multimodal(teacher):
    """Next-token frequencies of the demonstrations after the same context type are spread (the teacher's
    target is multimodal): the line opener, the first addend and whether a check follows."""
    openers, first_addend, check = Counter(), Counter(), Counter()
    for p in teacher.items("train", 300, 1):
        for line in teacher.demonstration(p).split("</think>")[0][len("<think>"):].rstrip("\n").split("\n"):
            m = _LINE.match(line)
            openers[m.group(1)] += 1
            first_addend[len(m.group(6)) > 1] += 1
            check[m.group(9) is not None] += 1
    for counts, top in ((openers, 0.25), (first_addend, 0.6), (check, 0.6)):
        assert max(counts.values()) / sum(counts.values()) < top, counts
    assert set(openers) == set(OPENERS)
    # deterministic per item: the same prompt always has the same paraphrase
    p = teacher.items("train", 1, 5)[0]
    assert teacher.demonstration(p) == teacher.teacher_view().demonstration(p)


def test_cycled_operands_alternate_two_digits_from_a_start():
    """operand_form=cycled: "s37 x3 y8 n11=" is 37 + 3 + 8 + 3 + ... (11 terms); every style writes the same
    running sums from the start, and the splits still never overlap."""
    chain = LongSumTask(style="chain", width=4, min_terms=10, max_terms=12, operand_form="cycled")
    worked = chain.teacher_view()
    assert worked.operand_form == "cycled" and worked.width == 4
    items = chain.items("train", 60, 0)
    for p in items:
        m = re.fullmatch(r"s(\d+) x(\d) y(\d) n(\d+)=", p.prompt)
        start, x, y, n = (int(g) for g in m.groups())
        assert 10 <= n <= 12 and chain.operands(p) == [(x, y)[i % 2] for i in range(n)]
        assert int(p.answer) == start + sum(chain.operands(p))
        lines = chain.demonstration(p)[len("<think>"):].split("</think>")[0].rstrip("\n").split("\n")
        total = start
        assert len(lines) == n
        for label, v, line in zip("abcdefghijkl", chain.operands(p), lines, strict=False):
            assert line == f"{label}:{total:04d}+{v}={total + v:04d}"
            total += v
    for p in worked.items("train", 20, 0):
        body = worked.demonstration(p)[len("<think>"):].split("</think>")[0].rstrip("\n").split("\n")
        start, numbers = worked.parse_prompt(p.prompt)
        first = _LINE.match(body[0])
        assert sorted([int(first.group(6)), int(first.group(7))]) == sorted([start, numbers[0]])
        assert worked.score(p, worked.tokenizer.decode(worked.tokenizer.encode(worked.demonstration(p)))) == 1.0
    assert len({p.prompt for p in items}) == 60
    assert not {p.prompt for p in chain.items("eval", 300, 0)} & {p.prompt for p in chain.items("validation", 300, 0)}
    assert chain.max_response_len >= 2 * chain.median_teacher_len()
    with pytest.raises(ValueError, match="cycled"):
        chain.make_problem([1, 2, 3, 1, 2, 1, 2, 1, 2, 1], 5)
    with pytest.raises(ValueError, match="start"):
        LongSumTask().make_problem([1] * 13, 5)


def test_the_countdown_subtracts_from_a_start_that_never_goes_negative():
    """operation=sub (the second task of the same shape): "s171 x5 y2 n12-" is 171 - 5 - 2 - 5 - ... (12 terms),
    from a start with room for every nine; every style writes the same running values, its prompts are never
    the sum's, and the teacher's lines never swap the operands (subtraction does not commute)."""
    kw = {"width": 3, "min_terms": 10, "max_terms": 12, "operand_form": "cycled"}
    chain = LongSumTask(style="chain", operation="sub", **kw)
    worked = chain.teacher_view()
    assert worked.operation == "sub" and worked.swap_prob > 0
    items = chain.items("train", 60, 0)
    for p in items:
        start, x, y, n = (int(g) for g in re.fullmatch(r"s(\d+) x(\d) y(\d) n(\d+)-", p.prompt).groups())
        assert chain.operands(p) == [(x, y)[i % 2] for i in range(n)]
        assert 9 * 12 <= start <= 9 * 12 + 99 and int(p.answer) == start - sum(chain.operands(p)) >= 0
        total = start
        for label, v, line in zip("abcdefghijkl"[:n], chain.operands(p), _lines(chain, p), strict=True):
            assert line == f"{label}:{total:03d}-{v}={total - v:03d}"
            total -= v
        assert chain.score(p, chain.tokenizer.decode(chain.tokenizer.encode(chain.demonstration(p)))) == 1.0
    for p in worked.items("train", 20, 0):
        start, numbers = worked.parse_prompt(p.prompt)
        first = re.search(r" (\d+)-(\d+)=(\d+)", _lines(worked, p)[0]).groups()
        assert [int(g) for g in first] == [start, numbers[0], start - numbers[0]]
        assert worked.score(p, worked.tokenizer.decode(worked.tokenizer.encode(worked.demonstration(p)))) == 1.0
    sums = {p.prompt for p in LongSumTask(style="chain", **kw).items("train", 300, 0)}
    assert not sums & {p.prompt for p in chain.items("train", 300, 0)}
    assert chain.max_response_len >= 2 * chain.median_teacher_len()
    with pytest.raises(ValueError, match="start"):
        chain.make_problem([1, 2] * 5, 50)  # below the countdown's smallest start


def test_every_countdown_demonstration_fits_its_padded_length():
    """The padded length bounds every demonstration: the countdown's answer is written unpadded and its
    all-nines worst case ends at its smallest value, so the bound takes the largest value's digits (the
    regime's teacher SFT set, seed 0, holds a 3-digit answer after 3 repeated lines, one token past the old
    bound)."""
    kw = {"min_terms": 10, "max_terms": 12, "width": 3, "operand_form": "cycled", "check_prob": 0.6,
          "repeat_prob": 0.15, "teacher_conventions": "paper", "operation": "sub"}
    teacher = LongSumTask(style="brief", **kw).teacher_view()
    _tok, _attn, target = teacher.demonstrations(teacher.items("train", 8192, 0))  # raises if one is longer
    assert target.sum(axis=1).max() <= teacher.demo_len


@pytest.mark.parametrize("kwargs, match", [
    ({"style": "long"}, "style"), ({"teacher_conventions": "qwen"}, "teacher_conventions"),
    ({"min_terms": 9, "max_terms": 8}, "min_terms"), ({"check_prob": 1.5}, "check_prob"),
    ({"budget_factor": 0.5}, "budget_factor"), ({"max_terms": 27}, "max_terms"), ({"width": 1}, "width"),
    ({"operand_form": "sorted"}, "operand_form"), ({"operand_form": "cycled", "width": 2}, "width"),
    ({"repeat_prob": -0.1}, "repeat_prob"), ({"student_repeat_prob": 2}, "student_repeat_prob"),
    ({"brief_head": 14}, "brief_head"), ({"operation": "mul"}, "operation"),
    ({"operation": "sub"}, "operation")])  # the countdown needs cycled operands
def test_bad_task_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_task("longsum", **kwargs)


def _lines(task, p):
    return task.demonstration(p)[len("<think>"):].split("</think>")[0].rstrip("\n").split("\n")


def test_repeated_lines_and_the_brief_style():
    """repeat_prob: a teacher line is sometimes written twice in a row, identically (a recheck the teacher has
    seen, so it can endorse a student's repetition); at most MAX_REPEATS per response. The brief student
    style: `brief_head` worked lines with fixed choices, then the terse chain, its own repeats from
    student_repeat_prob; without repeats both write exactly one line per operand."""
    kw = {"min_terms": 10, "max_terms": 12, "width": 3, "operand_form": "cycled"}
    brief = LongSumTask(style="brief", brief_head=2, repeat_prob=0.3, student_repeat_prob=0.3, **kw)
    worked = brief.teacher_view()
    repeats = []
    for view, fmt in ((worked, "worked"), (brief, "brief")):
        for p in view.items("train", 60, 0):
            lines = _lines(view, p)
            dedup = [line for i, line in enumerate(lines) if i == 0 or line != lines[i - 1]]
            assert len(dedup) == len(view.operands(p))  # a repeat is always identical to the line before
            assert len(lines) - len(dedup) <= MAX_REPEATS
            repeats.append(len(lines) - len(dedup))
            if fmt == "brief":
                assert all(line.startswith(f"{OPENERS[0]} {lab}") and f" {ASIDES[0]} {LINKS[0]} " in line
                           for lab, line in zip("ab", dedup[:2], strict=True))
                assert all(re.fullmatch(r"[a-l]:\d{3}\+\d=\d{3}", line) for line in dedup[2:]), dedup
            assert view.score(p, view.tokenizer.decode(view.tokenizer.encode(view.demonstration(p)))) == 1.0
    assert 0.1 < np.mean(repeats) / 11 < 0.5  # about 0.3 per line, capped
    plain = LongSumTask(style="brief", **kw)
    assert all(len(_lines(plain, p)) == len(plain.operands(p)) for p in plain.items("train", 30, 0))
    # padded demonstrations hold the longest response, repeats included: every check written, MAX_REPEATS copies
    longest = worked_lines([9] * 12, 3, np.random.default_rng(0), swap_prob=0.0, check_prob=1.0, start=99,
                           repeat_prob=1.0)
    text = "<think>" + longest + "</think>207" + worked.tokenizer.roles["eos"]
    assert len(worked.tokenizer.encode(text)) <= worked.demo_len
    for view in (worked, brief):
        _tok, _attn, target = view.demonstrations(view.items("train", 200, 1))
        assert target.sum(axis=1).max() <= view.demo_len


def test_pad_columns_stacks_step1_batches():
    a, b = np.ones((2, 3)), 2 * np.ones((1, 5))
    out = regime.pad_columns([a, b])
    assert out.shape == (3, 5) and (out[:2, 3:] == 0).all() and (out[:2, :3] == 1).all() and (out[2] == 2).all()


def test_teacher_cache_ignores_student_only_keys():
    """The teacher's SFT cache key: the task section without the keys only the student reads, so a new
    student style reuses the teacher; a key the teacher reads still changes it."""
    from opd.tasks.common import teacher_cache_section

    task = LongSumTask()
    section = {"style": "brief", "student_repeat_prob": 0.1, "brief_head": 2, "repeat_prob": 0.15, "width": 3}
    other = {**section, "style": "chain", "student_repeat_prob": 0.0, "brief_head": 0}
    assert teacher_cache_section(task, section) == teacher_cache_section(task, other) == {"repeat_prob": 0.15,
                                                                                          "width": 3}
    assert teacher_cache_section(task, {**section, "repeat_prob": 0.2}) != teacher_cache_section(task, section)
    assert teacher_cache_section(object(), section) == section  # tasks without student-only keys: all of it


def test_regime_config_composes():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="opd", overrides=["experiment=regime"])
    assert cfg.tasks.arithmetic.task.name == "longsum" and cfg.loss.name == "sampled_token"
    task = make_task("longsum", **{k: v for k, v in cfg.tasks.arithmetic.task.items() if k != "name"})
    assert cfg.student.max_seq_len >= task.sequence_length() and cfg.tasks.arithmetic.teacher.max_seq_len >= (
        task.sequence_length())
    route = validate(cfg)["routes"]["arithmetic"]  # the teacher is prepared on its own style and conventions
    assert (route["task"].style, route["teacher_task"].style) == ("brief", "worked")
    assert route["teacher_task"].tokenizer.eos_id != route["task"].tokenizer.eos_id
    assert route["task"].max_response_len >= 2 * route["task"].median_teacher_len() >= 512


# -- the report's measurements -------------------------------------------------------------------------


def test_top1_mass_and_gap_iqr_ratio():
    lp = np.log(np.array([[[0.6, 0.3], [0.9, 0.1], [0.2, 0.1]]]))
    assert regime.top1_mass(lp, np.array([[1, 1, 0]])) == pytest.approx(0.75)
    rng = np.random.default_rng(0)
    b, length = 64, 40
    mask = np.ones((b, length))
    scale = np.where(np.arange(length) < 30, 0.5, 3.0)  # positions 30-39 = the last quarter spread 6x wider
    gap = rng.normal(size=(b, length)) * scale
    ratio = regime.gap_iqr_ratio(gap, np.zeros_like(gap), mask, np.full(b, length))
    assert 4.5 < ratio < 8.0
    assert regime.gap_iqr_ratio(gap * 0 + 1.0, np.zeros_like(gap), mask, np.full(b, length)) is None
    assert regime.gap_iqr_ratio(gap, np.zeros_like(gap), mask, np.full(b, 2)) is None


def test_endorsed_loop_frac():
    body = [7, 8, 9] * 4  # a 12-token loop of period 3
    rows = np.array([[1, *body, 2, 2, 2], [1, *body, 2, 2, 2], [1, 5, 0, 0, 0, 6, 4, 5, 6, 7, 4, 3, 5, 6, 7, 8]])
    mask = np.ones_like(rows)
    mask[:, 0] = 0
    student = np.full(rows.shape, np.log(0.9))
    teacher = np.full(rows.shape, np.log(0.8))
    teacher[1] = np.log(0.1)  # row 1 loops but the teacher does not endorse it; row 2's "000" is too short
    assert regime.endorsed_loop_frac(rows, mask, student, teacher) == pytest.approx(1 / 3)
    assert regime.endorsed_loop_frac(rows, mask, student, teacher, min_teacher_prob=0.05) == pytest.approx(2 / 3)


def test_a_whole_worked_line_written_three_times_is_a_loop():
    """R6 searches blocks as long as one of the regime's worked lines (19-26 tokens): a line written three
    times back to back is the paper's Fig 3 loop, whatever its length in tokens."""
    task = LongSumTask(style="brief", brief_head=5, min_terms=10, max_terms=12, width=3, operand_form="cycled")
    line = task.tokenizer.encode("take a5 apple is 063+5=068\n")
    assert 16 < len(line) <= fm.LOOP_MAX_PERIOD
    rows = np.array([[1, *(line * 3), 2]])
    mask = np.ones_like(rows)
    endorsed = np.full(rows.shape, np.log(0.8))
    assert regime.endorsed_loop_frac(rows, mask, endorsed, endorsed) == 1.0


def test_passes_and_report_line():
    good = {"teacher_accuracy": 0.9, "student_accuracy": 0.3, "capacity_accuracy": 0.85, "teacher_top1_mass": 0.8,
            "teacher_median_response_len": 300.0, "gap_iqr_ratio": 2.5, "neg_reward_frac_step1": 0.6,
            "endorsed_loop_frac": 0.02, "eos_logprob_mapped": -25.0}
    kw = {"budget": 608, "shared_vocabulary": True, "conventions_differ": True}
    assert regime.passes(good, **kw) == ["R1", "R2", "R3", "R4", "R5", "R6", "R7"]
    bad = {**good, "student_accuracy": 0.6, "teacher_top1_mass": 0.95, "gap_iqr_ratio": None,
           "eos_logprob_mapped": -5.0}
    assert regime.passes(bad, **kw) == ["R2", "R5", "R6"]
    assert "R4" not in regime.passes(good, **{**kw, "budget": 500})  # budget < 2 x median
    assert "R7" not in regime.passes(good, **{**kw, "shared_vocabulary": False})
    line = json.loads(regime.report_line({**good, "gap_iqr_ratio": math.inf, "eos_logprob_mapped": None},
                                         ["R1"]))
    assert list(line) == [*regime.KEYS, "passes"] and line["gap_iqr_ratio"] is None
    assert line["eos_logprob_mapped"] is None and line["passes"] == ["R1"]


@pytest.mark.slow  # ~20 s of CPU: sampler and scorer compiles for four model/task pairs
def test_measure_on_tiny_models_prints_every_key(monkeypatch, tmp_path):
    """The whole report on untrained tiny models and a 2-operand task (SFT replaced by fresh models)."""
    from flax import nnx

    from opd.model import Transformer
    from opd.train import sft
    from opd.train.config import validate

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="opd", overrides=[
            "experiment=regime", "chunk_size=null", "tasks.arithmetic.task.min_terms=2",
            "tasks.arithmetic.task.brief_head=1", "tasks.arithmetic.task.max_terms=2", "eval_problems=4",
            "eval_batch_size=4",
            "rollout.prompts_per_step=2", "rollout.group_size=2", "train_problems=8",
            "student.hidden_size=16", "student.num_layers=1", "student.intermediate_size=32",
            "tasks.arithmetic.teacher.hidden_size=16", "tasks.arithmetic.teacher.num_layers=1",
            "tasks.arithmetic.teacher.intermediate_size=32", "tasks.arithmetic.teacher.num_heads=2",
            "tasks.arithmetic.teacher.num_kv_heads=1", f"checkpoint_root={tmp_path}"])
    built = validate(cfg)
    prepared = []

    def fake_prepare(label, model_cfg, tasks, sections, sft_cfg, **kw):
        prepared.append((label, tasks[0].style))
        # a held-out accuracy stored with the model is reused only when measured the same way: the student's
        # is (0.5, which untrained models never reach); the teacher's spec does not say its batch size
        spec = kw["eval_spec"]
        if label.startswith("teacher"):
            spec = {k: v for k, v in spec.items() if k != "batch_size"}
        meta = {"sft_eval_spec": spec, "sft_eval": {"accuracy": 0.5}} if label != "capacity/arithmetic" else {}
        meta["path"] = str(tmp_path)  # where the teacher's Lion phase starts (its weights are not read here)
        return Transformer(model_cfg, rngs=nnx.Rngs(len(prepared))), meta

    monkeypatch.setattr(sft, "prepare", fake_prepare)
    r = regime.measure(cfg, built, log=lambda _m: None)
    ctx = r.pop("_context")
    assert prepared == [("teacher/arithmetic", "worked"), ("teacher/arithmetic then", "worked"),
                        ("student/arithmetic", "brief"), ("capacity/arithmetic", "worked")]
    assert ctx["shared_vocabulary"] and ctx["conventions_differ"]
    line = json.loads(regime.report_line(r, regime.passes(r, **{k: ctx[k] for k in (
        "budget", "shared_vocabulary", "conventions_differ")})))
    assert list(line) == [*regime.KEYS, "passes"]
    assert 0 <= line["teacher_top1_mass"] <= 1 and 0 <= line["neg_reward_frac_step1"] <= 1
    assert line["teacher_accuracy"] == 0.0 and "R2" not in line["passes"]  # untrained models solve nothing
    assert line["student_accuracy"] == 0.5
    # capacity_sft_steps=0: the capacity model is never prepared, its accuracy is null, the rest is measured
    prepared.clear()
    cfg.capacity_sft_steps = 0
    skipped = regime.measure(cfg, built, log=lambda _m: None)
    skipped.pop("_context")
    assert prepared == [("teacher/arithmetic", "worked"), ("teacher/arithmetic then", "worked"),
                        ("student/arithmetic", "brief")]
    assert skipped["capacity_accuracy"] is None and set(skipped) == set(r)


class KeysComputedError(Exception):
    """Raised by record_keys' prepare() once it has computed the last key a test needs."""


def record_keys(monkeypatch, keys: dict, last: str, root: Path) -> None:
    """Replace sft.prepare by one that records each model's cache key in `keys` and trains, loads and
    evaluates nothing (a model's path under `root` holds only its key, for an SFT phase that starts from it);
    after the key of `last` it raises KeysComputedError."""
    from opd.train import checkpoints, sft

    def key_only(label, model_cfg, tasks, sections, sft_cfg, **kw):
        keys[label] = sft.sft_cache_key(sections, tasks, int(sft_cfg.seed), kw.get("init_from"))
        if label == last:
            raise KeysComputedError
        path = root / keys[label]
        (path / "params").mkdir(parents=True, exist_ok=True)
        (path / checkpoints.META).write_text(json.dumps({"key": keys[label]}))
        return None, {"sft_eval_spec": kw["eval_spec"], "sft_eval": {"accuracy": 0.0}, "path": str(path)}

    monkeypatch.setattr(sft, "prepare", key_only)


def not_in_store(keys: dict) -> dict:
    """The recorded keys that results/models does not hold, by label."""
    stored = {p.name[: -len(".tar.gz")] for p in (CONF.parent / "results" / "models").glob("*.tar.gz")}
    return {label: key for label, key in keys.items() if key not in stored}


def test_the_committed_store_holds_the_regime_models_under_the_keys_the_code_computes(monkeypatch, tmp_path):
    """A change to the task code or the regime's config changes the SFT cache keys (they hash a sample of the
    demonstrations); the committed models (results/models) would then be missed and retrained, over an hour
    on 2 cores, and the tables would no longer describe the models the code prepares. Keys only: nothing is
    trained or unpacked."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="opd", overrides=["experiment=regime"])
    keys = {}
    record_keys(monkeypatch, keys, last="capacity/arithmetic", root=tmp_path)
    # the measurements between the student and the capacity check need models; none is loaded here
    monkeypatch.setattr(regime, "teacher_rollout_stats", lambda *a, **k: {"teacher_truncated_frac": 0.0})
    monkeypatch.setattr(regime, "step1", lambda *a, **k: dict.fromkeys(
        ("neg_reward_frac_step1", "gap_iqr_ratio", "endorsed_loop_frac", "eos_teacher_logprob", "special_tokens")))
    with pytest.raises(KeysComputedError):
        regime.measure(cfg, validate(cfg), log=lambda _m: None)
    assert set(keys) == {"teacher/arithmetic", "teacher/arithmetic then", "student/arithmetic",
                         "capacity/arithmetic"}
    assert not_in_store(keys) == {}


def test_the_committed_store_holds_the_table2_models_under_the_keys_the_code_computes(monkeypatch, tmp_path):
    """Table 2's teachers (the sum's and the countdown's) and its two-task student are committed too: the
    countdown teacher alone is 80 minutes of SFT on 2 cores. Keys only, as above."""
    from experiments import opd as opd_experiment
    from opd.train import evaluate

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="opd", overrides=["experiment=table2"])
    keys = {}
    record_keys(monkeypatch, keys, last="student", root=tmp_path / "keys")
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: ({}, []))  # the teachers' held-out scores
    with pytest.raises(KeysComputedError):
        opd_experiment.run_experiment(cfg, validate(cfg), tmp_path, log=lambda _m: None,
                                      run={"dir": tmp_path, "resume_step": None, "config": {}})
    assert set(keys) == {"teacher/arithmetic", "teacher/countdown", "student"}
    assert not_in_store(keys) == {}


def test_table2_routes_reuse_the_regime_teacher_and_the_countdown_report_teacher():
    """Table 2's long-sum route is Table 1's without the teacher's Lion phase (the committed one-phase teacher it
    was measured with), and its countdown route is the configuration `python -m experiments.regime
    task@tasks.arithmetic.task=countdown tasks.arithmetic.sft.steps=3000 tasks.arithmetic.sft_then=null`
    measures, so R1-R6 measured there hold for the table's countdown teacher (the same task, model and SFT
    sections)."""
    from opd.train.config import to_container

    one_phase = "tasks.arithmetic.sft_then=null"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        table2 = to_container(compose(config_name="opd", overrides=["experiment=table2"]))["tasks"]
        table1 = to_container(compose(config_name="opd", overrides=["experiment=table1", one_phase]))["tasks"]
        report = to_container(compose(config_name="opd", overrides=[
            "experiment=regime", "task@tasks.arithmetic.task=countdown", "tasks.arithmetic.sft.steps=3000",
            one_phase]))["tasks"]
    assert table2["arithmetic"] == table1["arithmetic"]
    assert table2["countdown"] == report["arithmetic"]
    assert table2["countdown"]["task"]["operation"] == "sub" and "operation" not in table2["arithmetic"]["task"]


def test_the_teacher_base_is_sft_in_the_students_conventions_and_starts_the_teacher(tmp_path):
    """teacher_base_steps: the base writes the teacher's lines with the student's special ids (its EOS ends
    every demonstration, as the paper's teacher's base ended its turns with the student's EOS); the teacher's
    SFT starts from the base's weights and is cached under another key than a teacher from a random init."""
    import jax
    from flax import nnx
    from omegaconf import OmegaConf

    from opd.model import ModelConfig
    from opd.train.sft import prepare, prepare_base

    task = LongSumTask(style="brief", min_terms=2, max_terms=2, brief_head=1)
    base_view, teacher_view = task.base_view(), task.teacher_view()
    student_specials = {task.tokenizer.eos_id, task.tokenizer.think_open_id, task.tokenizer.think_close_id}
    items = task.items("train", 4, 0)
    base_tokens, _, base_target = base_view.demonstrations(items)
    teacher_tokens, _, teacher_target = teacher_view.demonstrations(items)
    for b in range(len(items)):
        base_fitted, teacher_fitted = base_tokens[b][base_target[b] > 0], teacher_tokens[b][teacher_target[b] > 0]
        assert base_fitted[-1] == task.tokenizer.eos_id and student_specials <= set(base_fitted.tolist())
        assert not student_specials & set(teacher_fitted.tolist())
        assert base_view.tokenizer.decode(base_fitted) == teacher_view.tokenizer.decode(teacher_fitted)
    mc = ModelConfig(vocab_size=task.tokenizer.vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                     num_kv_heads=1, intermediate_size=32, max_seq_len=task.max_prompt_len + task.max_response_len)
    sft = OmegaConf.create({"steps": 2, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "weight_decay": 0.01,
                            "grad_clip": 1.0, "eps": 1e-8, "optimizer": "adamw", "train_problems": 8,
                            "eval_problems": 4, "log_every": 1, "seed": 0})
    sections = {"model": mc.to_dict(), "task": {"name": "longsum"}, "sft": dict(sft)}
    logs: list[str] = []
    base = prepare_base("teacher", mc, base_view, sections, sft, 3, root=tmp_path, log=logs.append)
    assert any("[sft teacher base] step 3/3" in x for x in logs)
    frozen = OmegaConf.merge(sft, {"lr": 0.0})  # no update: the teacher must hold exactly the base's weights
    teacher, meta = prepare("teacher", mc, [teacher_view], {**sections, "sft": dict(frozen)}, frozen,
                            root=tmp_path, init_from=base, log=logs.append)
    _, scratch = prepare("teacher", mc, [teacher_view], {**sections, "sft": dict(frozen)}, frozen, root=tmp_path,
                         log=logs.append)
    assert len({meta["key"], scratch["key"], Path(base).name}) == 3
    base_model, _ = prepare("teacher base", mc, [base_view], {}, sft, checkpoint=base, root=tmp_path)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(base_model, nnx.Param), nnx.state(teacher, nnx.Param))
