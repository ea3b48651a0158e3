"""A small ALFWorld-like multi-turn text world, its expert planner, and its token-level conversation format.

World (generated from an integer seed): 2-3 rooms (kitchen, bedroom, bathroom, hall), 2-3 receptacles per
room ("fridge 1", "cabinet 2"; fridges, cabinets, drawers and dressers open and close), 3-4 objects lying in
receptacles, and a goal "put the <object> in <receptacle>". The agent starts in a room, hands empty.

The task line states where the goal's two ends are: the receptacle (and its room) holding the goal object,
and the goal receptacle's room, e.g.

    task: put the apple in cabinet 2. the apple is in drawer 1 in the bedroom. cabinet 2 is in the kitchen.

so every expert action is inferable from the visible conversation: a copy from the task line ("go to
bedroom", "go to drawer 1", "take apple from drawer 1", ...) skipped when the first observation shows the
agent already is in that room, or a reaction to the last observation ("drawer 1 is closed." -> "open drawer
1"). An expert that walks to hidden locations (as ALFWorld's does) cannot be imitated: its demonstrations
teach guessing, and a model SFT'd on them solved 0% of held-out episodes. Stating the locations (instead of
an expert that searches) keeps the expert shortest and the conversations short; the closed/open state of
receptacles and the other objects stay hidden until observed. This makes imitation possible, not easy: the
names must be copied from the task line, and a tiny model learns that only when each word is one token
with its leading space (`Tokenizer.spaced`, the default here; with the space as a token of its own,
tiny_teacher stayed at 0% held-out success after 1200 SFT steps).

Actions (the whole grammar; anything else, or an action impossible in the current state, gets the normal
error observation "Nothing happens." and the episode goes on):

    go to <room>              go to <receptacle>   (a receptacle of the current room)
    open <receptacle>         take <object> from <receptacle>     put <object> in <receptacle>
    look                      inventory

Reward: success (1) iff the goal object is put in the goal receptacle before a limit is hit. Limits: at most
`max_turns` actions, at most `max_tokens` tokens of conversation; an episode that reaches a limit without
success ends as a failure with `end_reason` "turn_limit" or "token_limit" (counted by callers).

Conversation format (one context, docs/interfaces.md conventions):

    prompt   <bos>task: put the apple in cabinet 2. the apple is in ...<obs>you are in the kitchen. ...<eot>
    student  go to bedroom<eot>                                     (student mask 1, EOT included)
    env      <obs>you are in the bedroom. you see bed 1, ...<eot>    (student mask 0)
    student  ...

The student samples each turn with `stop_ids=(eot_id,)`; environment tokens are never student tokens.
Train and eval episodes are a hash partition of generated worlds (by their full description), so the two
seed sets never share a world.

Measured over seeds 0-1999 (`Tokenizer.spaced`): prompts 49-54 tokens (median 51), expert conversations
4-8 actions and 122-223 tokens (median 172, 99th percentile 217), so max_prompt_len 64 and max_tokens 256
fit every episode.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from opd.tasks.common import (
    Rollouts,
    check_split,
    draw_distinct,
    pad_sequences,
    special_token_ids,
    split_index,
    split_of_key,
)
from opd.tasks.tokenizer import Tokenizer

ERROR_OBSERVATION = "Nothing happens."

ROOMS: dict[str, tuple[str, ...]] = {
    "kitchen": ("fridge", "cabinet", "drawer", "counter", "table", "sink", "shelf"),
    "bedroom": ("bed", "desk", "dresser", "drawer", "shelf", "table"),
    "bathroom": ("sink", "cabinet", "shelf", "counter", "drawer"),
    "hall": ("table", "shelf", "cabinet", "drawer", "desk"),
}
OPENABLE = frozenset({"fridge", "cabinet", "drawer", "dresser"})
OBJECTS = ("apple", "bread", "egg", "mug", "plate", "knife", "book", "pen", "key", "towel", "soap", "phone")


@dataclass(frozen=True)
class World:
    rooms: tuple[str, ...]
    receptacles: tuple[tuple[str, str], ...]  # (receptacle name, room), e.g. ("cabinet 2", "kitchen")
    placements: tuple[tuple[str, str], ...]  # (object, receptacle) at the start
    closed: frozenset  # openable receptacles closed at the start
    goal_object: str
    goal_receptacle: str
    start_room: str

    def room_of(self, receptacle: str) -> str:
        return dict(self.receptacles)[receptacle]

    def receptacles_in(self, room: str) -> list[str]:
        return [r for r, rm in self.receptacles if rm == room]

    @property
    def objects(self) -> tuple[str, ...]:
        return tuple(o for o, _ in self.placements)

    @property
    def goal_source(self) -> str:
        """The receptacle holding the goal object at the start."""
        return dict(self.placements)[self.goal_object]

    def goal_text(self) -> str:
        return f"put the {self.goal_object} in {self.goal_receptacle}"

    def task_text(self) -> str:
        """The task line of the prompt: the goal plus where its two ends are (see the module docstring)."""
        obj, src, dst = self.goal_object, self.goal_source, self.goal_receptacle
        return (
            f"{self.goal_text()}. the {obj} is in {src} in the {self.room_of(src)}. "
            f"{dst} is in the {self.room_of(dst)}"
        )

    def signature(self) -> str:
        """A canonical description of the whole episode (world + goal + start), the key of the split."""
        return repr(
            (
                self.rooms,
                sorted(self.receptacles),
                sorted(self.placements),
                sorted(self.closed),
                self.goal_object,
                self.goal_receptacle,
                self.start_room,
            )
        )


def is_openable(receptacle: str) -> bool:
    return receptacle.split(" ")[0] in OPENABLE


@dataclass(frozen=True)
class State:
    world: World
    room: str
    at: str | None  # receptacle the agent stands at, or None (in the middle of `room`)
    holding: str | None
    contents: tuple[tuple[str, tuple[str, ...]], ...]  # receptacle -> objects in it, sorted by receptacle
    closed: frozenset
    turns: int = 0
    tokens: int = 0  # conversation tokens so far (prompt included)
    done: bool = False
    success: bool = False
    end_reason: str | None = None  # "success" | "turn_limit" | "token_limit"
    history: tuple[str, ...] = field(default=(), compare=False)

    def content(self, receptacle: str) -> tuple[str, ...]:
        return dict(self.contents)[receptacle]

    def location_of(self, obj: str) -> str | None:
        for r, objs in self.contents:
            if obj in objs:
                return r
        return None

    def key(self):
        """The dynamic state (for search): location, hands, contents, open/closed."""
        return (self.room, self.at, self.holding, self.contents, self.closed)


def generate_world(
    seed: int, *, min_rooms: int = 2, max_rooms: int = 3, min_objects: int = 3, max_objects: int = 4
) -> World:
    rng = np.random.default_rng([int(seed), 7919])
    n_rooms = int(rng.integers(min_rooms, max_rooms + 1))
    rooms = tuple(str(r) for r in rng.choice(list(ROOMS), size=n_rooms, replace=False))
    counters: dict[str, int] = {}
    receptacles = []
    for room in rooms:
        k = int(rng.integers(2, 4))
        for kind in rng.choice(ROOMS[room], size=k, replace=False):
            counters[str(kind)] = counters.get(str(kind), 0) + 1
            receptacles.append((f"{kind} {counters[str(kind)]}", room))
    names = [r for r, _ in receptacles]
    n_obj = int(rng.integers(min_objects, max_objects + 1))
    objects = [str(o) for o in rng.choice(OBJECTS, size=n_obj, replace=False)]
    placements = tuple((o, names[int(rng.integers(len(names)))]) for o in objects)
    closed = frozenset(r for r in names if is_openable(r) and rng.random() < 0.7)
    goal_idx = int(rng.integers(n_obj))
    goal_object, source = placements[goal_idx]
    targets = [r for r in names if r != source]
    goal_receptacle = targets[int(rng.integers(len(targets)))]
    start_room = rooms[int(rng.integers(n_rooms))]
    return World(rooms, tuple(receptacles), placements, closed, goal_object, goal_receptacle, start_room)


def initial_state(world: World) -> State:
    contents = {r: [] for r, _ in world.receptacles}
    for o, r in world.placements:
        contents[r].append(o)
    return State(
        world=world,
        room=world.start_room,
        at=None,
        holding=None,
        contents=tuple(sorted((r, tuple(objs)) for r, objs in contents.items())),
        closed=world.closed,
    )


# ---------------------------------------------------------------------------------------------------------
# Observations and dynamics
# ---------------------------------------------------------------------------------------------------------


def _list(items: Sequence[str]) -> str:
    return ", ".join(items) if items else "nothing"


def describe_room(state: State) -> str:
    w = state.world
    exits = [r for r in w.rooms if r != state.room]
    return f"you are in the {state.room}. you see {_list(w.receptacles_in(state.room))}. you can go to {_list(exits)}."


def describe_receptacle(state: State, receptacle: str, verb: str) -> str:
    head = f"you {verb} {receptacle}."
    if receptacle in state.closed:
        return f"{head} {receptacle} is closed."
    prep = "in" if is_openable(receptacle) else "on"
    return f"{head} {prep} {receptacle} you see {_list(state.content(receptacle))}."


_ACTION_RE = [
    ("go", re.compile(r"go to (.+)")),
    ("open", re.compile(r"open (.+)")),
    ("take", re.compile(r"take (\S+) from (.+)")),
    ("put", re.compile(r"put (\S+) in (.+)")),
    ("look", re.compile(r"look")),
    ("inventory", re.compile(r"inventory")),
]


def parse_action(text: str) -> tuple[str, tuple[str, ...]] | None:
    """(verb, arguments) for a grammatical action, else None. Whitespace is normalised; nothing else."""
    text = " ".join(text.replace("<eot>", " ").split())
    for verb, rx in _ACTION_RE:
        m = rx.fullmatch(text)
        if m:
            return verb, m.groups()
    return None


def _transition(state: State, action_text: str) -> tuple[State, str]:
    """Apply one action (no limits, no bookkeeping): (new dynamic state, observation)."""
    parsed = parse_action(action_text)
    if parsed is None:
        return state, ERROR_OBSERVATION
    verb, args = parsed
    w = state.world
    recs = dict(w.receptacles)
    if verb == "go":
        (target,) = args
        if target in w.rooms:
            s = replace(state, room=target, at=None)
            return s, describe_room(s)
        if target in recs and recs[target] == state.room:
            s = replace(state, at=target)
            return s, describe_receptacle(s, target, "arrive at")
        return state, ERROR_OBSERVATION
    if verb == "open":
        (target,) = args
        if target == state.at and target in state.closed:
            s = replace(state, closed=state.closed - {target})
            return s, describe_receptacle(s, target, "open")
        return state, ERROR_OBSERVATION
    if verb == "take":
        obj, src = args
        if src == state.at and src not in state.closed and state.holding is None and obj in state.content(src):
            contents = tuple(
                (r, tuple(o for o in objs if o != obj) if r == src else objs) for r, objs in state.contents
            )
            s = replace(state, holding=obj, contents=contents)
            return s, f"you pick up the {obj} from {src}."
        return state, ERROR_OBSERVATION
    if verb == "put":
        obj, dst = args
        if dst == state.at and dst not in state.closed and state.holding == obj:
            contents = tuple((r, objs + (obj,) if r == dst else objs) for r, objs in state.contents)
            s = replace(state, holding=None, contents=contents)
            return s, f"you put the {obj} in {dst}."
        return state, ERROR_OBSERVATION
    if verb == "look":
        if state.at is not None:
            return state, describe_receptacle(state, state.at, "are at")
        return state, describe_room(state)
    # inventory
    return state, f"you are carrying {'the ' + state.holding if state.holding else 'nothing'}."


def goal_reached(state: State) -> bool:
    w = state.world
    return w.goal_object in state.content(w.goal_receptacle)


# ---------------------------------------------------------------------------------------------------------
# Conversation (token level)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Conversation:
    """Token segments of one multi-turn episode: the prompt, then alternating student and environment turns."""

    segments: list[tuple[list[int], bool]] = field(default_factory=list)  # (ids, is_student)

    def add(self, ids: Sequence[int], is_student: bool) -> None:
        self.segments.append(([int(i) for i in ids], bool(is_student)))

    def tokens(self) -> list[int]:
        return [t for ids, _ in self.segments for t in ids]

    def student_mask(self) -> list[int]:
        return [int(s) for ids, s in self.segments for _ in ids]

    def __len__(self) -> int:
        return sum(len(ids) for ids, _ in self.segments)


def conversation_arrays(conv: Conversation) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_L, student_mask_L) as int32: the mask is 1 exactly on student-generated tokens."""
    return np.asarray(conv.tokens(), np.int32), np.asarray(conv.student_mask(), np.int32)


@dataclass
class Episode:
    """A finished (or abandoned) episode: its conversation and outcome."""

    conversation: Conversation
    state: State
    actions: list[str]

    @property
    def success(self) -> bool:
        return self.state.success


class TextWorldTask:
    """The text-world environment, expert planner and conversation format (see the module docstring)."""

    name = "textworld"
    metric = "success"

    def __init__(
        self,
        max_turns: int = 12,
        max_tokens: int = 256,
        max_action_len: int = 16,
        max_prompt_len: int = 64,
        min_rooms: int = 2,
        max_rooms: int = 3,
        min_objects: int = 3,
        max_objects: int = 4,
        eval_fraction: float = 0.1,
        tokenizer: Tokenizer | None = None,
    ):
        checks = [
            ("max_turns", max_turns >= 1, "an integer >= 1"),
            ("max_action_len", max_action_len >= 2, "an integer >= 2"),
            ("max_prompt_len", max_prompt_len >= 8, "an integer >= 8"),
            ("max_tokens", max_tokens > max_prompt_len, "an integer > max_prompt_len"),
            ("min_rooms/max_rooms", 1 <= min_rooms <= max_rooms <= len(ROOMS), f"1 <= min <= max <= {len(ROOMS)}"),
            ("min_objects/max_objects", 1 <= min_objects <= max_objects <= len(OBJECTS), "1 <= min <= max"),
            ("eval_fraction", 0.0 < eval_fraction < 0.5, "a value in (0, 0.5) (validation takes as much again)"),
        ]
        for key, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{key}: expected {allowed}")
        self.max_turns, self.max_tokens, self.max_action_len = max_turns, max_tokens, max_action_len
        self.max_prompt_len = max_prompt_len
        self.max_response_len = max_tokens - max_prompt_len  # everything after the prompt
        self.world_kwargs = dict(
            min_rooms=min_rooms, max_rooms=max_rooms, min_objects=min_objects, max_objects=max_objects
        )
        self.eval_fraction = eval_fraction
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer.spaced()
        if self.tokenizer.eot_id is None or self.tokenizer.obs_id is None:
            raise ValueError("tokenizer: the text world needs end-of-turn and observation special tokens")
        self.eot_id = self.tokenizer.eot_id
        self.stop_ids = (self.tokenizer.eot_id,)

    # -- episodes -------------------------------------------------------------------------------------

    def world(self, seed: int) -> World:
        return generate_world(seed, **self.world_kwargs)

    def split_of(self, seed: int) -> str:
        return split_of_key(self.world(seed).signature(), self.eval_fraction)

    def fits(self, seed: int) -> bool:
        """The episode's prompt fits max_prompt_len and its expert conversation fits the limits."""
        state, _ = self.reset(seed)
        if state.tokens > self.max_prompt_len:
            return False
        ep = self.demonstration_episode(seed)
        return ep.success and len(ep.conversation) <= self.max_tokens

    def episodes(self, split: str, n: int, seed: int) -> list[int]:
        """`n` distinct episode seeds of `split` (deterministic given split, n, seed).

        Seeds are kept only when their world falls in `split` (a hash of the world's full description, so
        train and eval never share a world) and the expert solves it within the limits.
        """
        check_split(split)
        rng = np.random.default_rng([int(seed), split_index(split), 31])
        return draw_distinct(
            n, lambda: int(rng.integers(0, 2**31 - 1)), lambda s: self.world(s).signature(),
            lambda s, sig: split_of_key(sig, self.eval_fraction) == split and self.fits(s),
            error=f"episodes: could not find {n} {split} episodes within the limits")

    def reset(self, seed: int) -> tuple[State, str]:
        """(initial state, first observation). `state.tokens` counts the prompt."""
        state = initial_state(self.world(seed))
        obs = describe_room(state)
        state = replace(state, tokens=len(self.prompt_ids(state.world, obs)))
        return state, obs

    def step(
        self, state: State, action_text: str, *, action_tokens: int | None = None, truncated: bool = False
    ) -> tuple[State, str, bool, bool]:
        """Apply one student action: (state, observation, done, success).

        action_tokens: how many tokens the student spent on this turn, EOT included (default: the
            canonical encoding of `action_text` + EOT). truncated: the turn hit `max_action_len` without
            EOT; the action is then not executed ("Nothing happens.").
        The turn and token limits end the episode as a failure (`end_reason` "turn_limit"/"token_limit").
        """
        if state.done:
            raise ValueError("step: the episode is already over")
        if action_tokens is None:
            try:
                action_tokens = len(self.action_ids(action_text))
            except ValueError:  # text outside the vocabulary (not model output): count characters
                action_tokens = len(action_text) + 1
        if truncated:
            new, obs = state, ERROR_OBSERVATION
        else:
            new, obs = _transition(state, action_text)
        tokens = state.tokens + action_tokens + len(self.observation_ids(obs))
        new = replace(new, turns=state.turns + 1, tokens=tokens, history=state.history + (action_text,))
        if goal_reached(new):
            new = replace(new, done=True, success=True, end_reason="success")
        elif new.turns >= self.max_turns:
            new = replace(new, done=True, end_reason="turn_limit")
        elif new.tokens >= self.max_tokens:
            new = replace(new, done=True, end_reason="token_limit")
        return new, obs, new.done, new.success

    # -- expert ---------------------------------------------------------------------------------------

    def expert_actions(self, state: State) -> list[str]:
        """A shortest action sequence from `state` to success (from a generated start; from other states a
        short one): fetch the goal object (go to its room, go to its receptacle, open it if closed, take),
        then go to the goal receptacle's room and receptacle, open it if closed, put.

        From a generated start every action is inferable from the conversation so far (the task line names
        the goal object's receptacle and both rooms; "open" follows an observation "... is closed.").
        From a midway state the goal object's location is where the conversation's actions left it."""
        w = state.world
        obj, dst = w.goal_object, w.goal_receptacle
        plan: list[str] = []
        s = state

        def do(action: str):
            nonlocal s
            s, obs = _transition(s, action)
            if obs == ERROR_OBSERVATION:
                raise AssertionError(f"expert action {action!r} failed")
            plan.append(action)

        def reach(receptacle: str):
            if w.room_of(receptacle) != s.room:
                do(f"go to {w.room_of(receptacle)}")
            if s.at != receptacle:
                do(f"go to {receptacle}")
            if receptacle in s.closed:
                do(f"open {receptacle}")

        if goal_reached(s):
            return plan
        if s.holding is not None and s.holding != obj:  # free the hands where we stand (or nearby)
            spot = s.at if s.at is not None else w.receptacles_in(s.room)[0]
            reach(spot)
            do(f"put {s.holding} in {spot}")
        if s.holding != obj:
            src = s.location_of(obj)
            reach(src)
            do(f"take {obj} from {src}")
        reach(dst)
        do(f"put {obj} in {dst}")
        return plan

    # -- conversation format --------------------------------------------------------------------------

    def prompt_text(self, world: World, first_observation: str) -> str:
        """Prompt text without BOS (encode_prompts prepends it)."""
        r = self.tokenizer.roles
        return f"task: {world.task_text()}.{r['obs']}{first_observation}{r['eot']}"

    def prompt_ids(self, world: World, first_observation: str) -> list[int]:
        return [self.tokenizer.bos_id] + self.tokenizer.encode(self.prompt_text(world, first_observation))

    def action_ids(self, action_text: str) -> list[int]:
        """A student turn: the action's tokens + EOT."""
        return self.tokenizer.encode(action_text) + [self.eot_id]

    def observation_ids(self, observation: str) -> list[int]:
        """An environment turn: OBS + observation tokens + EOT."""
        return [self.tokenizer.obs_id] + self.tokenizer.encode(observation) + [self.eot_id]

    def new_conversation(self, seed: int) -> tuple[State, Conversation]:
        state, obs = self.reset(seed)
        conv = Conversation()
        conv.add(self.prompt_ids(state.world, obs), False)
        return state, conv

    def decode_action(self, student_turn_ids: Sequence[int]) -> tuple[str, bool]:
        """(action text, truncated) for one sampled student turn (tokens after the context, EOT included if
        generated). Text stops at the first EOT (or EOS/PAD); truncated when no EOT was generated."""
        ids = [int(t) for t in student_turn_ids]
        truncated = self.eot_id not in ids
        if not truncated:
            ids = ids[: ids.index(self.eot_id)]
        return self.tokenizer.decode(ids), truncated

    def play(self, seed: int, policy: Callable[[list[int]], Sequence[int]]) -> Episode:
        """Run one episode with `policy(context_ids) -> student turn ids` (generation stops at EOT or after
        `max_action_len` tokens; a longer return is cut there). Returns the conversation, final state, actions."""
        state, conv = self.new_conversation(seed)
        actions = []
        while not state.done:
            turn = [int(t) for t in policy(conv.tokens())][: self.max_action_len]
            if self.eot_id in turn:
                turn = turn[: turn.index(self.eot_id) + 1]
            text, truncated = self.decode_action(turn)
            state, obs, _, _ = self.step(state, text, action_tokens=len(turn), truncated=truncated)
            conv.add(turn, True)
            conv.add(self.observation_ids(obs), False)
            actions.append(text)
        return Episode(conv, state, actions)

    def demonstration_episode(self, seed: int) -> Episode:
        state, _ = self.reset(seed)
        plan = iter(self.expert_actions(state) + ["look"] * self.max_turns)
        return self.play(seed, lambda _ctx: self.action_ids(next(plan)))

    def demonstration_conversation(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The expert's full conversation: (tokens_L, student_mask_L), int32 (mask 1 on action tokens + EOT)."""
        return conversation_arrays(self.demonstration_episode(seed).conversation)

    def encode_demonstrations(self, seeds: Sequence[int], length: int | None = None):
        """SFT batch of expert conversations, right-padded to `length` (default max_tokens):
        (tokens_BxL, loss_mask_BxL, attention_mask_BxL), int32; loss mask = student tokens."""
        convs = [self.demonstration_episode(s).conversation for s in seeds]
        return pad_sequences([c.tokens() for c in convs], [c.student_mask() for c in convs], length or self.max_tokens)

    def score(self, state: State) -> float:
        return 1.0 if state.success else 0.0

    # -- the trainer's Task protocol (opd.tasks.common.Task) -----------------------------------------

    def items(self, split: str, n: int, seed: int) -> list[int]:
        return self.episodes(split, n, seed)

    def sequence_length(self) -> int:
        """Width of a rollout batch: the token limit plus one more student turn. Every student token fits (a
        turn starts below the token limit); only the tail of the final observation can be cut."""
        return int(self.max_tokens + self.max_action_len)

    def demonstrations(self, seeds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens_BxL, attention_mask_BxL, target_mask_BxL) of the expert conversations."""
        tokens, loss, attn = self.encode_demonstrations(seeds, self.sequence_length())
        return tokens, attn, loss

    def special_ids(self) -> dict[str, int]:
        return special_token_ids(self.tokenizer)

    def rollout(self, model, seeds, rng, *, temperature: float, top_p: float, top_k: int = 0,
                sample_fn=None) -> Rollouts:
        """Play one episode per seed with `model`, all episodes batched turn by turn.

        Each turn re-prefills every unfinished conversation left-padded to `max_tokens` (a fixed width, so one
        compile), samples at most `max_action_len` tokens stopping at EOT, and steps the environment. The
        sampler's log-prob of every student token is stitched into the conversation at that token's place
        (left padding does not move RoPE positions, so it equals a forward pass over the finished rollout).
        The result is right-padded to `sequence_length()`."""
        from opd import sampling

        sample_fn = sample_fn or sampling.sample
        cfg = sampling.SamplingConfig(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                                      max_new_tokens=int(self.max_action_len))
        width, n = int(self.max_tokens), len(seeds)
        games = [self.new_conversation(int(s)) for s in seeds]
        states, convs = [g[0] for g in games], [g[1] for g in games]
        logprobs: list[list[float]] = [[0.0] * len(c) for c in convs]
        turn = 0
        while not all(s.done for s in states):
            ctx = np.zeros((n, width), np.int32)
            cmask = np.zeros((n, width), np.int32)
            for b, conv in enumerate(convs):
                ids = conv.tokens()[-width:]
                ctx[b, width - len(ids):] = ids
                cmask[b, width - len(ids):] = 1
            out = sample_fn(model, ctx, cmask, _fold_in(rng, turn), cfg, eos_id=self.tokenizer.eos_id,
                            stop_ids=self.stop_ids)
            gen, gmask = np.asarray(out.tokens_BxL)[:, width:], np.asarray(out.response_mask_BxL)[:, width:]
            glp = np.asarray(out.logprobs_BxL, np.float32)[:, width:]
            for b in range(n):
                if states[b].done:
                    continue
                keep = gmask[b] > 0
                ids = [int(t) for t in gen[b][keep]]
                text, truncated = self.decode_action(ids)
                states[b], obs, _, _ = self.step(states[b], text, action_tokens=len(ids), truncated=truncated)
                obs_ids = self.observation_ids(obs)
                convs[b].add(ids, True)
                convs[b].add(obs_ids, False)
                logprobs[b] += [float(x) for x in glp[b][keep]] + [0.0] * len(obs_ids)
            turn += 1
        length = self.sequence_length()
        tokens = np.zeros((n, length), np.int32)
        resp = np.zeros((n, length), np.int32)
        attn = np.zeros((n, length), np.int32)
        lps = np.zeros((n, length), np.float32)
        for b, conv in enumerate(convs):
            ids, m = conv.tokens()[:length], conv.student_mask()[:length]
            tokens[b, :len(ids)], resp[b, :len(m)], attn[b, :len(ids)] = ids, m, 1
            lps[b, :len(ids)] = logprobs[b][:length]
        return Rollouts(tokens=tokens, attention_mask=attn, response_mask=resp, logprobs=lps * (resp > 0),
                        response_len=resp.sum(axis=1),
                        truncated=np.asarray([s.end_reason in ("turn_limit", "token_limit") for s in states]),
                        score=np.asarray([self.score(s) for s in states], np.float32))

    def __repr__(self) -> str:
        return f"TextWorldTask(max_turns={self.max_turns}, max_tokens={self.max_tokens})"


def _fold_in(rng, turn: int):
    import jax

    return jax.random.fold_in(rng, turn)
