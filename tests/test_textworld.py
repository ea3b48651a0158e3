"""The agentic text world: dynamics, expert planner, limits, conversation tokens and masks, splits."""

from collections import deque
from dataclasses import replace

import numpy as np
import pytest

from opd.tasks import PAD_ID, make_task
from opd.tasks.textworld import (
    ERROR_OBSERVATION,
    TextWorldTask,
    _transition,
    generate_world,
    goal_reached,
    is_openable,
    parse_action,
)


@pytest.fixture(scope="module")
def env():
    return make_task("textworld")


def all_actions(state):
    w = state.world
    names = list(w.rooms) + [r for r, _ in w.receptacles]
    recs = [r for r, _ in w.receptacles]
    acts = [f"go to {n}" for n in names] + [f"open {r}" for r in recs] + ["look", "inventory"]
    for o in w.objects:
        acts += [f"take {o} from {r}" for r in recs] + [f"put {o} in {r}" for r in recs]
    return acts


def bfs_shortest(state, limit=10):
    """Length of the shortest successful action sequence, by breadth-first search over dynamic states."""
    frontier, seen = deque([(state, 0)]), {state.key()}
    while frontier:
        s, d = frontier.popleft()
        if d >= limit:
            continue
        for a in all_actions(s):
            nxt, _ = _transition(s, a)
            if goal_reached(nxt):
                return d + 1
            if nxt.key() not in seen:
                seen.add(nxt.key())
                frontier.append((nxt, d + 1))
    return None


def test_expert_always_succeeds(env):
    lengths = []
    for seed in range(400):
        ep = env.demonstration_episode(seed)
        assert ep.success and ep.state.end_reason == "success", (seed, ep.actions)
        assert ep.state.turns == len(ep.actions) <= env.max_turns
        assert ERROR_OBSERVATION not in env.tokenizer.decode(ep.conversation.tokens(), stop=False)
        lengths.append(len(ep.conversation))
    assert 150 <= np.median(lengths) and max(lengths) <= env.max_tokens


def test_expert_is_shortest(env):
    for seed in range(12):
        state, _ = env.reset(seed)
        assert len(env.expert_actions(state)) == bfs_shortest(state), seed


def test_expert_recovers_from_midway_states():
    env = TextWorldTask(max_turns=30, max_tokens=2000)
    for seed in range(40):
        state, _ = env.reset(seed)
        rng = np.random.default_rng(seed)
        for _ in range(5):  # wander with random (possibly invalid) actions first
            acts = all_actions(state)
            state, _, done, _ = env.step(state, acts[int(rng.integers(len(acts)))])
            if done:
                break
        if state.done:
            continue
        for a in env.expert_actions(state):
            state, obs, done, success = env.step(state, a)
            assert obs != ERROR_OBSERVATION
        assert success and done


class _FixedWorlds(TextWorldTask):
    """A text world whose episode `i` is `worlds[i]` (to compare worlds that differ only in hidden details)."""

    def __init__(self, worlds, **kwargs):
        super().__init__(**kwargs)
        self.worlds = worlds

    def world(self, seed):
        return self.worlds[seed]


def _variants(w, rng):
    """Worlds that differ from `w` in what the agent cannot see at the start: where the goal object and the
    other objects lie, which receptacles are closed, which receptacle is the goal."""
    recs = [r for r, _ in w.receptacles]
    out = [w]
    for _ in range(6):
        placements = tuple((o, recs[int(rng.integers(len(recs)))]) for o in w.objects)
        closed = frozenset(r for r in recs if is_openable(r) and rng.random() < 0.5)
        src = dict(placements)[w.goal_object]
        dst = w.goal_receptacle if rng.random() < 0.5 else recs[int(rng.integers(len(recs)))]
        if dst != src:
            out.append(replace(w, placements=placements, closed=closed, goal_receptacle=dst))
    return out


def test_expert_actions_are_a_function_of_the_visible_context():
    """The expert may only act on what the conversation shows: two episodes whose conversations are identical
    up to a turn get the same expert action at that turn. (An expert walking straight to the goal object's
    hidden receptacle fails this: the same prompt would be followed by different actions.)"""
    rng = np.random.default_rng(0)
    worlds = [v for seed in range(150) for v in _variants(generate_world(seed), rng)]
    env = _FixedWorlds(worlds, max_turns=12, max_tokens=2000, max_prompt_len=200)
    next_action, shared = {}, 0
    for i in range(len(worlds)):
        ep = env.demonstration_episode(i)
        assert ep.success
        context, actions = [], iter(ep.actions)
        for ids, is_student in ep.conversation.segments:
            if is_student:
                key, action = tuple(context), next(actions)
                shared += key in next_action
                assert next_action.setdefault(key, action) == action, (i, action, next_action[key])
            context += ids
    assert shared > 100  # many contexts were reached by several worlds: the check is not vacuous


def test_expert_actions_name_only_what_was_seen(env):
    """Every name in an expert action (room, receptacle, object) appears in the prompt or an earlier
    observation, and every "open" answers an observation saying the receptacle is closed."""
    for seed in range(200):
        ep = env.demonstration_episode(seed)
        seen, actions = "", iter(ep.actions)
        for ids, is_student in ep.conversation.segments:
            if is_student:
                verb, args = parse_action(next(actions))
                assert all(a in seen for a in args), (seed, verb, args)
                if verb == "open":
                    assert seen.endswith(f"{args[0]} is closed.<eot>"), (seed, args)
            else:
                seen += env.tokenizer.decode(ids, stop=False)


def test_dynamics_example(env):
    state, obs = env.reset(0)
    w = state.world
    assert obs.startswith(f"you are in the {w.start_room}.")
    assert env.step(state, "inventory")[1] == "you are carrying nothing."
    src = state.location_of(w.goal_object)
    # a receptacle of another room cannot be reached directly
    other = next(r for r, rm in w.receptacles if rm != state.room)
    s2, obs, done, _ = env.step(state, f"go to {other}")
    assert obs == ERROR_OBSERVATION and not done and s2.at is None
    # taking from afar fails; the expert path works step by step
    assert env.step(state, f"take {w.goal_object} from {src}")[1] == ERROR_OBSERVATION
    for a in env.expert_actions(state):
        state, obs, done, success = env.step(state, a)
    assert success and obs == f"you put the {w.goal_object} in {w.goal_receptacle}."


@pytest.mark.parametrize("bad", ["", "fly away", "go to moon", "take the apple", "Go to hall", "put x in y", "lookk"])
def test_unparseable_action_continues(env, bad):
    state, _ = env.reset(3)
    new, obs, done, success = env.step(state, bad)
    assert obs == ERROR_OBSERVATION and not done and not success
    assert new.turns == 1 and new.key() == state.key()
    new, obs, done, _ = env.step(new, "look")
    assert obs != ERROR_OBSERVATION and not done


def test_parse_action():
    assert parse_action("  go   to  fridge 1 ") == ("go", ("fridge 1",))
    assert parse_action("take apple from table 2<eot>") == ("take", ("apple", "table 2"))
    assert parse_action("put apple in") is None and parse_action("looking") is None


def test_turn_limit_ends_as_failure():
    env = TextWorldTask(max_turns=3)
    state, _ = env.reset(5)
    for i in range(3):
        state, _, done, success = env.step(state, "look")
        assert done == (i == 2) and not success
    assert state.end_reason == "turn_limit" and not state.success
    with pytest.raises(ValueError, match="already over"):
        env.step(state, "look")
    # a limit equal to the expert's length still succeeds: success wins on the last turn
    for seed in range(20):
        s, _ = env.reset(seed)
        n = len(env.expert_actions(s))
        ep = TextWorldTask(max_turns=n).demonstration_episode(seed)
        assert ep.success
        if n > 1:
            ep = TextWorldTask(max_turns=n - 1).demonstration_episode(seed)
            assert not ep.success and ep.state.end_reason == "turn_limit"


def test_token_limit_ends_as_failure(env):
    tight = TextWorldTask(max_tokens=120)
    ep = tight.demonstration_episode(0)
    assert not ep.success and ep.state.end_reason == "token_limit"
    assert ep.state.tokens == len(ep.conversation) >= 120
    # the turn that crossed the limit is the last one
    assert len(ep.conversation) - len(ep.conversation.segments[-1][0]) - len(ep.conversation.segments[-2][0]) < 120
    # a babbling policy (no EOT, truncated turns) is cut per turn and then by the token limit
    ep = env.play(1, lambda ctx: [env.tokenizer.encode("a")[0]] * 50)
    assert not ep.success and ep.state.end_reason in ("token_limit", "turn_limit")
    student_turns = [ids for ids, s in ep.conversation.segments if s]
    assert all(len(t) == env.max_action_len for t in student_turns)
    assert ep.actions and all(a == "a" * env.max_action_len for a in ep.actions)
    obs_turns = [env.tokenizer.decode(ids[1:-1]) for ids, s in ep.conversation.segments[1:] if not s]
    assert set(obs_turns) == {ERROR_OBSERVATION}


def test_conversation_tokens_and_mask(env):
    tk = env.tokenizer
    for seed in range(30):
        tokens, mask = env.demonstration_conversation(seed)
        ep = env.demonstration_episode(seed)
        assert tokens.dtype == np.int32 and mask.shape == tokens.shape
        assert tokens[0] == tk.bos_id and mask[0] == 0
        # segments: the whole conversation is one encoding (segment boundaries are special tokens)
        assert tokens.tolist()[1:] == tk.encode(tk.decode(tokens[1:], stop=False))
        # student tokens are exactly the actions, each followed by EOT
        student = tokens[mask == 1].tolist()
        assert student == [t for a in ep.actions for t in tk.encode(a) + [tk.eot_id]]
        # every student turn directly follows an environment EOT; environment turns start with OBS
        runs = np.flatnonzero(np.diff(np.r_[0, mask]) == 1)
        assert all(tokens[i - 1] == tk.eot_id and mask[i - 1] == 0 for i in runs)
        env_starts = np.flatnonzero(np.diff(np.r_[1, mask]) == -1)[1:]  # [0] is the prompt
        assert len(env_starts) == len(runs) == len(ep.actions)
        assert all(tokens[i] == tk.obs_id for i in env_starts)
        assert mask[tokens == tk.obs_id].sum() == 0 and mask[tokens == tk.bos_id].sum() == 0
        # observations (masked) decode to what the environment said
        assert tk.decode(tokens[mask == 0], stop=False).count("<obs>") == len(ep.actions) + 1


def test_encode_demonstrations_batch(env):
    seeds = env.episodes("train", 4, 0)
    toks, loss, attn = env.encode_demonstrations(seeds)
    assert toks.shape == (4, env.max_tokens)
    for b, s in enumerate(seeds):
        t, m = env.demonstration_conversation(s)
        assert toks[b, : len(t)].tolist() == t.tolist() and (toks[b, len(t) :] == PAD_ID).all()
        assert loss[b, : len(t)].tolist() == m.tolist() and loss[b, len(t) :].sum() == 0
        assert attn[b].sum() == len(t)


def test_play_with_policy_matches_steps(env):
    """A policy-driven episode and manual stepping agree (the rollout driver's contract)."""
    seed = 11
    state, _ = env.reset(seed)
    plan = env.expert_actions(state)
    it = iter(plan)
    ep = env.play(seed, lambda ctx: env.action_ids(next(it)) + [7, 7, 7])  # tokens after EOT are dropped
    assert ep.success and ep.actions == plan
    tokens, mask = env.demonstration_conversation(seed)
    assert ep.conversation.tokens() == tokens.tolist() and ep.conversation.student_mask() == mask.tolist()


def test_train_eval_disjoint(env):
    train = env.episodes("train", 300, 0)
    evals = env.episodes("eval", 100, 0)
    assert len(set(train)) == 300 and len(set(evals)) == 100
    assert not set(train) & set(evals)
    sig_train = {env.world(s).signature() for s in train}
    sig_eval = {env.world(s).signature() for s in evals}
    assert len(sig_train) == 300 and not sig_train & sig_eval
    assert all(env.split_of(s) == "eval" for s in evals) and all(env.split_of(s) == "train" for s in train)
    assert env.episodes("train", 20, 0) == train[:20] and env.episodes("train", 20, 1) != train[:20]


def test_prompt_fits_and_bad_config(env):
    for s in env.episodes("train", 50, 2):
        state, obs = env.reset(s)
        assert state.tokens == len(env.prompt_ids(state.world, obs)) <= env.max_prompt_len
    with pytest.raises(ValueError, match="max_tokens"):
        TextWorldTask(max_tokens=10)
    with pytest.raises(ValueError, match="allowed"):
        make_task("alfworld")


def test_conversation_in_teacher_conventions():
    from opd.tasks import Tokenizer, TokenMapping

    student_tok = Tokenizer.spaced()  # the text world's default
    teacher_tok = Tokenizer.variant(eot_token="<|im_end|>", spaced=True)
    student, teacher = TextWorldTask(tokenizer=student_tok), TextWorldTask(tokenizer=teacher_tok)
    s_tokens, s_mask = student.demonstration_conversation(4)
    t_tokens, t_mask = teacher.demonstration_conversation(4)
    assert (
        teacher_tok.eot_id != student_tok.eot_id
        and (t_tokens == teacher_tok.eot_id).sum() == (s_tokens == student_tok.eot_id).sum()
    )
    role = TokenMapping.from_tokenizers(student_tok, teacher_tok, specials="role")
    assert role.map_ids(s_tokens) == t_tokens.tolist() and t_mask.tolist() == s_mask.tolist()
    # the surface mapping spells the student's EOT literally: "<", "e", "o", "t", ">" in the teacher vocabulary
    surface = TokenMapping.from_tokenizers(student_tok, teacher_tok)
    ids, owner = surface.map_ids_with_alignment(s_tokens)
    assert len(ids) == len(s_tokens) + 4 * int((s_tokens == student_tok.eot_id).sum())
    assert teacher_tok.decode(ids, stop=False) == student_tok.decode(s_tokens, stop=False)
    # per-student-token student mask carried over through the alignment
    assert np.asarray(s_mask)[owner].sum() == sum(
        len(surface.table[t]) for t, m in zip(s_tokens.tolist(), s_mask.tolist(), strict=True) if m
    )
