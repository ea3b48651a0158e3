"""Tokenizer, teacher-side variant + mapping, arithmetic task, prompt/demonstration encoding."""

import numpy as np
import pytest

from opd.tasks import (
    PAD_ID,
    Tokenizer,
    TokenMapping,
    encode_demonstrations,
    encode_prompts,
    make_task,
    pad_sequences,
    require_compatible,
)
from opd.tasks.arithmetic import ArithmeticTask, parse_answer, solve


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def task():
    return make_task("arithmetic")


# ---------------------------------------------------------------- tokenizer


def test_special_ids_and_vocab(tok):
    assert tok.pad_id == PAD_ID == 0
    ids = [tok.pad_id, tok.bos_id, tok.eos_id, tok.think_open_id, tok.think_close_id, tok.eot_id, tok.obs_id]
    assert ids == list(range(7))
    assert tok.special_ids == {"pad": 0, "bos": 1, "eos": 2, "think_open": 3, "think_close": 4, "eot": 5, "obs": 6}
    assert tok.vocab_size < 128
    assert tok.id_to_token(tok.think_open_id) == "<think>"
    assert tok.encode("<think>") == [tok.think_open_id] and tok.encode("</think>") == [tok.think_close_id]


@pytest.mark.parametrize(
    "text",
    [
        "<bos>347+085=<think>c0:7,5|0+7=07+5=12\n</think>432",
        "task: put the apple in fridge 1.<obs>you arrive at fridge 1. fridge 1 is closed.<eot>open fridge 1<eot>",
        "think, thinking <think> </think> <t a|b_c;d?e!f'g(h)i*j-k/l",
        "",
    ],
)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_decode_stops_at_eos_and_pad(tok):
    ids = tok.encode("12+3") + [tok.eos_id] + tok.encode("99")
    assert tok.decode(ids) == "12+3"
    assert tok.decode(tok.encode("ab") + [PAD_ID] + tok.encode("cd")) == "ab"
    assert tok.decode(np.array(tok.encode("<eos>x"))) == ""


def test_unknown_character_is_refused(tok):
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.encode("Apple")  # upper case is outside the vocabulary
    with pytest.raises(ValueError):
        tok.decode([tok.vocab_size])


def test_spaced_tokenizer_keeps_default_ids(tok):
    spaced = Tokenizer.spaced()
    assert [spaced.id_to_token(i) for i in range(tok.vocab_size)] == [tok.id_to_token(i) for i in range(tok.vocab_size)]
    text = "task: put the key in drawer 12.<obs>you see key, pen.<eot>take key from drawer 12<eot>"
    assert [spaced.id_to_token(i) for i in spaced.encode(text)][:9] == [
        "task", ":", " put", " the", " key", " in", " drawer", " 1", "2"]
    assert spaced.decode(spaced.encode(text)) == text and len(spaced.encode(text)) < len(tok.encode(text)) * 0.75
    arithmetic = make_task("arithmetic")  # no word follows a space there: identical ids in both vocabularies
    for p in arithmetic.problems("train", 20, 0):
        assert spaced.encode(p.prompt + p.solution) == tok.encode(p.prompt + p.solution)
    variant = Tokenizer.variant(eos_token="<|endoftext|>", spaced=True)
    assert variant.encode(" key") == [variant.token_to_id(" key")] and variant.eos_id != spaced.eos_id


def test_variant_tokenizer_conventions(tok):
    teacher = Tokenizer.variant(think_as_pieces=True, eos_token="<|endoftext|>", name="teacher")
    assert teacher.think_open_id is None and teacher.think_close_id is None
    assert teacher.eos_id != tok.eos_id and teacher.id_to_token(teacher.eos_id) == "<|endoftext|>"
    assert teacher.pad_id == 0 and teacher.vocab_size < 128
    pieces = [teacher.id_to_token(i) for i in teacher.encode("<think>")]
    assert pieces == ["<", "think", ">"]
    text = "<think>c0:1,2|0+1=01+2=03\n</think>3<|endoftext|>"
    ids = teacher.encode(text)
    assert ids[-1] == teacher.eos_id and teacher.decode(ids) == text[: -len("<|endoftext|>")]
    paper = Tokenizer.variant(think_as_pieces=("<th", "ink", ">"))
    assert [paper.id_to_token(i) for i in paper.encode("<think>")] == ["<th", "ink", ">"]


def test_mapping_round_trip_and_alignment(tok, task):
    teacher = Tokenizer.variant(think_as_pieces=True, eos_token="<|endoftext|>")
    surface = TokenMapping.from_tokenizers(tok, teacher)  # literal spelling of special tokens
    role = TokenMapping.from_tokenizers(tok, teacher, specials="role")  # EOS -> the teacher's EOS
    p = task.problems("train", 1, 0)[0]
    student_ids = tok.encode(p.prompt + p.solution)
    t_ids, owner = surface.map_ids_with_alignment(student_ids)
    # the teacher spelling decodes to the same text (student EOS spelled literally as "<eos>")
    assert teacher.decode(t_ids) == p.prompt + p.solution
    assert [teacher.id_to_token(i) for i in surface.map_ids([tok.think_open_id])] == ["<", "think", ">"]
    assert [teacher.id_to_token(i) for i in surface.map_ids([tok.eos_id])] == list("<eos>")
    assert role.map_ids([tok.eos_id]) == [teacher.eos_id]
    role_ids = role.map_ids(student_ids)
    assert teacher.decode(role_ids) == p.prompt + p.solution[: -len("<eos>")]  # decode stops at teacher EOS
    # alignment: owners are non-decreasing, cover every student position, segment strings match
    assert owner == sorted(owner) and sorted(set(owner)) == list(range(len(student_ids)))
    for pos, sid in enumerate(student_ids):
        seg = [t for t, o in zip(t_ids, owner) if o == pos]
        assert "".join(teacher.id_to_token(t) for t in seg) == tok.id_to_token(sid)


def test_map_batch_keeps_layout(tok):
    teacher = Tokenizer.variant(think_as_pieces=True)
    m = TokenMapping.from_tokenizers(tok, teacher)
    toks, mask = encode_prompts(tok, ["a1 b2=", "a11 b22 c33="], 16)
    out, out_mask, owner = m.map_batch(toks, mask)
    for b in range(2):
        real = owner[b][out_mask[b] == 1]
        assert set(real.tolist()) == set(np.nonzero(mask[b])[0].tolist())
        assert teacher.decode(out[b][out_mask[b] == 1], stop=False) == tok.decode(toks[b][mask[b] == 1], stop=False)
    assert (out[out_mask == 0] == PAD_ID).all() and (owner[out_mask == 0] == -1).all()


def test_require_compatible(tok):
    assert require_compatible(tok, Tokenizer()).is_identity
    teacher = Tokenizer.variant(think_as_pieces=True, eos_token="<|endoftext|>")
    with pytest.raises(ValueError, match="no token mapping is declared") as e:
        require_compatible(tok, teacher)
    assert "\n" not in str(e.value)
    m = TokenMapping.from_tokenizers(tok, teacher)
    assert require_compatible(tok, teacher, m) is m
    with pytest.raises(ValueError, match="vocab sizes"):
        require_compatible(teacher, tok, m)
    with pytest.raises(ValueError, match="no teacher spelling"):
        TokenMapping.from_dict({0: [0]}, tok.vocab_size, teacher.vocab_size)


# ---------------------------------------------------------------- arithmetic


STYLES = [
    dict(style="column", digits=3, min_terms=3, max_terms=5),
    dict(style="chain", digits=1, min_terms=8, max_terms=11),
]


@pytest.mark.parametrize("kw", STYLES, ids=lambda kw: kw["style"])
def test_solver_demonstrations_verify(kw):
    task = ArithmeticTask(**kw)
    tk = task.tokenizer
    for split in ("train", "eval"):
        for p in task.problems(split, 500, 3):
            assert int(p.answer) == sum(task.operands(p))
            demo = task.demonstration(p)
            ids = tk.encode(demo)
            assert ids[-1] == tk.eos_id and ids.count(tk.eos_id) == 1
            assert len(ids) <= task.max_response_len
            assert len([tk.bos_id] + tk.encode(p.prompt)) <= task.max_prompt_len
            assert task.score(p, tk.decode(ids)) == 1.0


def test_solution_format_example():
    text, ans = solve([347, 85, 912], 3)
    assert ans == 1344
    assert text == (
        "<think>c0:7,5,2|0+7=07+5=12+2=14\nc1:4,8,1|1+4=05+8=13+1=14\nc2:3,0,9|1+3=04+0=04+9=13\n</think>1344<eos>"
    )
    assert solve([1, 2, 3], 2)[0].endswith("</think>6<eos>")
    chain = ArithmeticTask(style="chain", digits=1, min_terms=2, max_terms=12).make_problem([7, 5, 9])
    assert chain.prompt == "a7 b5 c9="
    assert chain.solution == "<think>a:000+7=007\nb:007+5=012\nc:012+9=021\n</think>21<eos>"


@pytest.mark.parametrize(
    "kw, numbers",
    [(dict(style="column", digits=3, min_terms=3, max_terms=5), [347, 85, 912]), ({}, [9, 8, 7, 6, 5, 4, 3, 2, 1])],
    ids=["column", "chain"],
)
def test_verifier_rejects_wrong_and_malformed(kw, numbers):
    task = ArithmeticTask(**kw)
    p = task.make_problem(numbers)
    ans = p.answer
    assert ans == str(sum(numbers))
    good = p.solution[: -len("<eos>")]
    think = good[: good.index("</think>") + len("</think>")]
    assert task.score(p, good) == 1.0
    assert task.score(p, think + f" {ans} ") == 1.0
    assert task.score(p, think + "0" + ans) == 1.0  # same integer
    for bad in [
        think + str(int(ans) + 1),
        think + str(int(ans) - 10),
        think + "",
        think + ans + "</think>",
        think + ans + " " + ans,
        think + ans[0] + "a" + ans[1:],
        think + "-" + ans,
        ans,
        good.replace("<think>", "", 1),
        "<think>" + good,
        good.replace("</think>", ""),
        "",
    ]:
        assert task.score(p, bad) == 0.0, bad
    assert parse_answer("<think>x</think>42") == 42 and parse_answer("<think>x</think>4 2") is None


@pytest.mark.parametrize("kw", STYLES, ids=lambda kw: kw["style"])
def test_train_eval_disjoint_and_partition(kw):
    task = ArithmeticTask(**kw)
    train = task.problems("train", 4000, 0)
    evals = task.problems("eval", 1000, 0)
    train_p, eval_p = {p.prompt for p in train}, {p.prompt for p in evals}
    assert len(train_p) == 4000 and len(eval_p) == 1000  # distinct within a split
    assert not train_p & eval_p
    # the partition is a function of the problem alone: other seeds never cross it either
    assert all(task.split_of(p) == "train" for p in task.problems("train", 500, 7))
    assert all(task.split_of(p) == "eval" for p in task.problems("eval", 500, 7))
    # the validation split is disjoint from both
    val_p = {p.prompt for p in task.problems("validation", 1000, 0)}
    assert len(val_p) == 1000 and not val_p & train_p and not val_p & eval_p
    assert all(task.split_of(p) == "validation" for p in val_p)
    # the eval share of random prompts is about eval_fraction
    rng = np.random.default_rng(0)
    shares = [
        task.split_of(task.format_prompt(list(rng.integers(0, 10**task.digits, 8)))) == "eval" for _ in range(4000)
    ]
    assert 0.08 < np.mean(shares) < 0.12


def test_problems_deterministic(task):
    a = task.problems("train", 50, 11)
    assert a == task.problems("train", 50, 11)
    assert a[:20] == task.problems("train", 20, 11)
    assert a != task.problems("train", 50, 12)


def test_demonstration_length_distribution(task):
    lens = np.array([len(task.tokenizer.encode(p.solution)) for p in task.problems("train", 1000, 0)])
    assert np.median(lens) >= 100
    assert lens.min() >= 95 and lens.max() == task.max_response_len == 115
    assert task.max_prompt_len == 34


def test_difficulty_and_bad_config():
    easy = ArithmeticTask(digits=2, min_terms=2, max_terms=2)
    assert easy.max_response_len < make_task("arithmetic").max_response_len
    bad = [dict(digits=0), dict(min_terms=1), dict(min_terms=4, max_terms=3), dict(eval_fraction=0.0), dict(style="x")]
    for kw in bad:
        with pytest.raises(ValueError):
            ArithmeticTask(**kw)
    with pytest.raises(ValueError, match="allowed"):
        make_task("gsm8k")
    with pytest.raises(ValueError, match="arithmetic"):
        make_task("arithmetic", difficulty=3)


# ---------------------------------------------------------------- batch encoding


def test_encode_prompts_left_pads(tok):
    prompts = ["1+2=", "123+456+789="]
    ids, mask = encode_prompts(tok, prompts, 16)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (2, 16)
    for b, p in enumerate(prompts):
        n = 1 + len(tok.encode(p))
        assert (mask[b, -n:] == 1).all() and (mask[b, :-n] == 0).all()
        assert (ids[b, :-n] == PAD_ID).all() and ids[b, -n] == tok.bos_id
        assert tok.decode(ids[b, -n + 1 :]) == p
    with pytest.raises(ValueError, match="length"):
        encode_prompts(tok, ["123+456+789="], 5)


def test_encode_demonstrations_masks(task):
    tk = task.tokenizer
    ps = task.problems("train", 4, 0)
    toks, loss, attn = encode_demonstrations(
        tk, [p.prompt for p in ps], [p.solution for p in ps], task.max_prompt_len, task.max_response_len
    )
    P = task.max_prompt_len
    assert toks.shape == loss.shape == attn.shape == (4, P + task.max_response_len)
    assert (loss[:, :P] == 0).all() and (loss[:, 0] == 0).all()
    for b, p in enumerate(ps):
        n = len(tk.encode(p.solution))
        assert loss[b].sum() == n and (loss[b, P : P + n] == 1).all()
        assert tk.decode(toks[b][loss[b] == 1]) == p.solution[: -len("<eos>")]
        assert toks[b][loss[b] == 1][-1] == tk.eos_id
        assert ((attn[b] == 1) == (toks[b] != PAD_ID)).all()
    with pytest.raises(ValueError, match="response_len"):
        encode_demonstrations(tk, [ps[0].prompt], [ps[0].solution], P, 10)


def test_pad_sequences():
    toks, loss, attn = pad_sequences([[1, 5, 6, 2], [1, 7]], [[0, 1, 1, 1], [1, 1]], 6)
    assert toks.tolist() == [[1, 5, 6, 2, 0, 0], [1, 7, 0, 0, 0, 0]]
    assert loss.tolist() == [[0, 1, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0]]
    assert attn.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    with pytest.raises(ValueError):
        pad_sequences([[1, 2, 3]], [[1, 1, 1]], 2)


def test_task_in_teacher_conventions(tok):
    """A teacher trained in its own conventions: same problems, its EOS and its think spelling."""
    teacher_tok = Tokenizer.variant(think_as_pieces=True, eos_token="<|endoftext|>")
    student_task, teacher_task = ArithmeticTask(), ArithmeticTask(tokenizer=teacher_tok)
    p = student_task.problems("train", 1, 0)[0]
    assert teacher_task.problems("train", 1, 0)[0] == p
    t_ids = teacher_tok.encode(teacher_task.demonstration(p))
    assert t_ids[-1] == teacher_tok.eos_id and t_ids.count(teacher_tok.eos_id) == 1
    assert [teacher_tok.id_to_token(i) for i in t_ids[:3]] == ["<", "think", ">"]
    assert teacher_task.score(p, teacher_tok.decode(t_ids)) == 1.0
    assert teacher_task.max_response_len == student_task.max_response_len + 5  # <think>: 3 pieces, </think>: 4
    # the role mapping turns the student's demonstration into exactly the teacher's
    s_ids = tok.encode(student_task.demonstration(p))
    assert TokenMapping.from_tokenizers(tok, teacher_tok, specials="role").map_ids(s_ids) == t_ids
