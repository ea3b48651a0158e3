"""A small deterministic tokenizer shared by the generated tasks, and teacher-side variants of it.

Vocabulary (default, `Tokenizer()`): 7 special tokens, then single characters (digits, lower-case letters,
punctuation, space, newline), then a few whole words of the text world, < 128 ids in all.
`Tokenizer.spaced()` adds those words and the digits with their leading space (" key", " 1"), 181 ids: the
text world's default.

    id 0 <pad>   1 <bos>   2 <eos>   3 <think>   4 </think>   5 <eot> (end of turn)   6 <obs> (observation)

Encoding is greedy longest match over special-token strings and pieces, so it is exact and deterministic:
`decode(encode(s)) == s` for every string over the vocabulary's characters (special tokens written as
their strings, e.g. "<think>"). `decode` stops at the first EOS or PAD. A character outside the vocabulary
raises ValueError (nothing is silently replaced).

Failure mode 3 of the paper (arXiv 2603.25562 §4.3) needs a teacher whose special-token conventions differ
from the student's: `Tokenizer.variant(think_as_pieces=True, eos_token="<|endoftext|>")` spells the think
markers as ordinary pieces (`<`, `think`, `>`) and ends with a differently named EOS at a different id. The
two vocabularies are then connected only through an explicitly declared `TokenMapping`;
`require_compatible` refuses a pair whose vocabularies differ when none is declared.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PAD_ID = 0

# role -> default token string; the order is the default id order.
DEFAULT_SPECIALS: dict[str, str] = {
    "pad": "<pad>",
    "bos": "<bos>",
    "eos": "<eos>",
    "think_open": "<think>",
    "think_close": "</think>",
    "eot": "<eot>",
    "obs": "<obs>",
}

_CHARS: tuple[str, ...] = tuple(string.digits) + tuple(string.ascii_lowercase) + tuple(" \n+-*=(),.:;?!'<>/|_")

# Whole-word pieces: the text world's action grammar, places, objects and the most frequent observation
# words. Anything else still encodes, one character at a time.
_WORDS: tuple[str, ...] = tuple(
    " ".join(
        [
            "go to take from put in open look inventory",  # actions
            "you are the see arrive at is closed Nothing nothing happens carrying task pick up can and on it",
            "kitchen bedroom bathroom hall",  # rooms
            "fridge cabinet drawer table counter shelf sink desk bed dresser",  # receptacles
            "apple bread egg mug plate knife book pen key towel soap phone",  # objects
        ]
    ).split()
)

# The same words and the digits with a leading space (" key", " 1"), as BPE vocabularies have them: see
# `Tokenizer.spaced`.
_SPACED: tuple[str, ...] = tuple(" " + w for w in _WORDS + tuple(string.digits))


class Tokenizer:
    """Greedy longest-match tokenizer with named special tokens. See the module docstring.

    Attributes: `pad_id` (always 0), `bos_id`, `eos_id`, `think_open_id`, `think_close_id`, `eot_id`,
    `obs_id` (None when this vocabulary has no such special token), `vocab_size`, `special_ids`
    (role -> id, e.g. {"eos": 2}), `special_tokens` (token string -> id), `name`.
    """

    pad_id: int = PAD_ID

    def __init__(
        self,
        pieces: Sequence[str] | None = None,
        specials: dict[str, str] | None = None,
        *,
        specials_first: Sequence[str] | None = None,
        name: str = "default",
    ):
        """Build a vocabulary.

        pieces: ordinary pieces (default: characters + text-world words).
        specials: role -> token string (default `DEFAULT_SPECIALS`); must contain "pad" and "bos".
        specials_first: roles placed before the ordinary pieces, in this order (default: all of them);
            the remaining roles go after the pieces. PAD must come first (id 0).
        """
        pieces = list(_CHARS + _WORDS) if pieces is None else list(pieces)
        specials = dict(DEFAULT_SPECIALS) if specials is None else dict(specials)
        for role in ("pad", "bos", "eos"):
            if role not in specials:
                raise ValueError(f"specials: role {role!r} is required, got roles {sorted(specials)}")
        first = list(specials) if specials_first is None else list(specials_first)
        if not first or first[0] != "pad":
            raise ValueError(f"specials_first: must start with 'pad' (PAD_ID = 0), got {first}")
        unknown = [r for r in first if r not in specials]
        if unknown:
            raise ValueError(f"specials_first: unknown roles {unknown}, allowed {sorted(specials)}")
        rest = [r for r in specials if r not in first]
        special_strings = [specials[r] for r in first] + pieces + [specials[r] for r in rest]
        if len(set(special_strings)) != len(special_strings):
            raise ValueError("Tokenizer: duplicate token strings in specials + pieces")
        if any(p == "" for p in pieces):
            raise ValueError("pieces: the empty string is not a piece")

        self.name = name
        self.pieces: tuple[str, ...] = tuple(pieces)
        self._id_to_token: list[str] = special_strings
        self._token_to_id: dict[str, int] = {t: i for i, t in enumerate(special_strings)}
        self.special_ids: dict[str, int] = {r: self._token_to_id[s] for r, s in specials.items()}
        self.special_tokens: dict[str, int] = {s: self._token_to_id[s] for s in specials.values()}
        self.roles: dict[str, str] = dict(specials)  # role -> token string
        self.vocab_size: int = len(special_strings)
        self._max_len = max(len(t) for t in special_strings)
        self._stop_ids = {self.special_ids["eos"], PAD_ID}

        self.bos_id: int = self.special_ids["bos"]
        self.eos_id: int = self.special_ids["eos"]
        self.think_open_id: int | None = self.special_ids.get("think_open")
        self.think_close_id: int | None = self.special_ids.get("think_close")
        self.eot_id: int | None = self.special_ids.get("eot")
        self.obs_id: int | None = self.special_ids.get("obs")
        assert self.special_ids["pad"] == PAD_ID

    # -- variants -------------------------------------------------------------------------------------

    @classmethod
    def spaced(cls, name: str = "spaced") -> Tokenizer:
        """The default vocabulary plus every word and digit with its leading space as one piece (" key", " 1").

        The text world's default (and the multi-task runs', whose student shares one vocabulary across tasks).
        Why: with the space as a token of its own, each word is two tokens after the previous one, and the
        tiny text-world teacher never learned to copy names from the task line (0% held-out success after
        1000 SFT steps, name tokens at 0.93 nats); with spaced pieces it solved 39% after 300 steps, and 100%
        after 2000 steps on 8192 episodes. Ids of the default pieces are unchanged, so arithmetic encodes
        identically."""
        return cls(list(_CHARS + _WORDS + _SPACED), name=name)

    @classmethod
    def variant(
        cls,
        *,
        think_as_pieces: bool | Sequence[str] = False,
        eos_token: str | None = None,
        eot_token: str | None = None,
        spaced: bool = False,
        name: str = "variant",
    ) -> Tokenizer:
        """A tokenizer with different special-token conventions from the default (a teacher-side vocabulary).

        think_as_pieces: True -> there are no think special tokens; "<think>" encodes as the ordinary
            pieces `<`, `think`, `>` (a "think" piece is added). A sequence of strings adds those pieces
            instead (e.g. ("<th", "ink", ">") as in the paper's example).
        eos_token / eot_token: rename EOS / end-of-turn (e.g. "<|endoftext|>", "<|im_end|>").
        spaced: also the pieces of `Tokenizer.spaced` (words and digits with their leading space).
        Ids differ from the default: only PAD and BOS precede the ordinary pieces; all other special
        tokens come after them, so e.g. the EOS id is not 2.
        """
        specials = dict(DEFAULT_SPECIALS)
        pieces = list(_CHARS + _WORDS + (_SPACED if spaced else ()))
        if think_as_pieces:
            del specials["think_open"], specials["think_close"]
            extra = ["think"] if think_as_pieces is True else list(think_as_pieces)
            pieces += [p for p in extra if p not in pieces]
        if eos_token is not None:
            specials["eos"] = eos_token
        if eot_token is not None:
            specials["eot"] = eot_token
        return cls(pieces, specials, specials_first=["pad", "bos"], name=name)

    @classmethod
    def shared_conventions(cls, base: Tokenizer | None = None, *, eos_token: str = "<eot>",
                           think_as_pieces: bool = True, name: str = "teacher-conventions") -> Tokenizer:
        """The same vocabulary as `base` (default `Tokenizer()`; same ids, `same_vocabulary` is True) read with
        other special-token conventions: a teacher that shares the student's ids but was trained otherwise.

        eos_token: an existing token of `base` that ends this side's text (default "<eot>", not "<eos>");
            its other role (end of turn) is dropped, so EOS is the only role it holds.
        think_as_pieces: "<think>" / "</think>" encode as ordinary pieces (`<`, `t`, ... `>`) and are no
            longer special; their ids stay in the vocabulary (decoding them still gives the same text).
        Why: the paper's failure mode 3 with one shared vocabulary (issue 12 R7) -- every objective, LSM
        included, applies, while the teacher never saw the student's think or EOS ids as targets."""
        import copy

        base = cls() if base is None else base
        if eos_token not in base._token_to_id:
            raise ValueError(f"eos_token: expected a token of {base.name!r}, got {eos_token!r}")
        view = copy.copy(base)
        roles = {r: s for r, s in base.roles.items() if s != eos_token or r == "eos"}
        roles["eos"] = eos_token
        hidden = set()
        if think_as_pieces:
            hidden = {roles.pop(r) for r in ("think_open", "think_close") if r in roles}
        view.name = name
        view.roles = roles
        view._token_to_id = {t: i for t, i in base._token_to_id.items() if t not in hidden}
        view.special_ids = {r: base._token_to_id[s] for r, s in roles.items()}
        view.special_tokens = {s: base._token_to_id[s] for s in roles.values()}
        view._stop_ids = {view.special_ids["eos"], PAD_ID}
        view.eos_id = view.special_ids["eos"]
        view.think_open_id = view.special_ids.get("think_open")
        view.think_close_id = view.special_ids.get("think_close")
        view.eot_id = view.special_ids.get("eot")
        view.obs_id = view.special_ids.get("obs")
        return view

    # -- encode / decode ------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Greedy longest match; raises ValueError on a character outside the vocabulary."""
        ids: list[int] = []
        i, n, table = 0, len(text), self._token_to_id
        while i < n:
            for length in range(min(self._max_len, n - i), 0, -1):
                tid = table.get(text[i : i + length])
                if tid is not None:
                    ids.append(tid)
                    i += length
                    break
            else:
                raise ValueError(f"Tokenizer.encode: character {text[i]!r} at offset {i} is not in the vocabulary")
        return ids

    def decode(self, ids, *, stop: bool = True) -> str:
        """Concatenate token strings; stops at the first EOS or PAD unless `stop=False` (then PAD is skipped)."""
        out = []
        for t in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if t in self._stop_ids:
                if stop:
                    break
                if t == PAD_ID:
                    continue
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"Tokenizer.decode: id {t} outside [0, {self.vocab_size})")
            out.append(self._id_to_token[t])
        return "".join(out)

    def id_to_token(self, i: int) -> str:
        if not 0 <= int(i) < self.vocab_size:
            raise ValueError(f"Tokenizer.id_to_token: id {i} outside [0, {self.vocab_size})")
        return self._id_to_token[int(i)]

    def token_to_id(self, token: str) -> int:
        if token not in self._token_to_id:
            raise ValueError(f"Tokenizer.token_to_id: {token!r} is not a token of {self.name!r}")
        return self._token_to_id[token]

    @property
    def vocabulary(self) -> tuple[str, ...]:
        return tuple(self._id_to_token)

    def same_vocabulary(self, other: Tokenizer) -> bool:
        return self._id_to_token == other._id_to_token

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size})"


# ---------------------------------------------------------------------------------------------------------
# Declared token mapping between two vocabularies
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenMapping:
    """An explicit map from every student id to a (non-empty) sequence of teacher ids.

    `table[i]` is the teacher spelling of student id `i`; PAD always maps to (PAD,).
    Build one with `TokenMapping.from_tokenizers` or from an explicit dict with `TokenMapping.from_dict`.
    """

    table: tuple[tuple[int, ...], ...]
    student_vocab_size: int
    teacher_vocab_size: int

    def __post_init__(self):
        if len(self.table) != self.student_vocab_size:
            raise ValueError(
                f"TokenMapping: table covers {len(self.table)} student ids, vocabulary has {self.student_vocab_size}"
            )
        for i, seq in enumerate(self.table):
            if not seq:
                raise ValueError(f"TokenMapping: student id {i} maps to an empty teacher sequence")
            bad = [t for t in seq if not 0 <= t < self.teacher_vocab_size]
            if bad:
                raise ValueError(
                    f"TokenMapping: student id {i} maps to teacher ids {bad} outside [0, {self.teacher_vocab_size})"
                )

    @classmethod
    def from_dict(
        cls, mapping: dict[int, Sequence[int]], student_vocab_size: int, teacher_vocab_size: int
    ) -> TokenMapping:
        missing = [i for i in range(student_vocab_size) if i not in mapping]
        if missing:
            raise ValueError(f"TokenMapping.from_dict: no teacher spelling declared for student ids {missing[:10]}")
        return cls(
            tuple(tuple(int(t) for t in mapping[i]) for i in range(student_vocab_size)),
            student_vocab_size,
            teacher_vocab_size,
        )

    @classmethod
    def from_tokenizers(cls, student: Tokenizer, teacher: Tokenizer, *, specials: str = "surface") -> TokenMapping:
        """Map each student token to the teacher's encoding of its string.

        specials="surface": special tokens too are spelled by their string, literally (the student's
            "<eos>" becomes the teacher pieces `<`,`e`,`o`,`s`,`>` when the teacher has no "<eos>" token) --
            what a vocabulary-level mapping between real model families does, and the source of the
            paper's failure mode 3.
        specials="role": a student special token maps to the teacher's special token of the same role
            (EOS -> the teacher's EOS) when the teacher has that role, else to its string's spelling.
        PAD always maps to PAD.
        """
        if specials not in ("surface", "role"):
            raise ValueError(f"specials: expected 'surface' or 'role', got {specials!r}")
        role_of = {sid: role for role, sid in student.special_ids.items()}
        table = []
        for i in range(student.vocab_size):
            if i == PAD_ID:
                table.append((PAD_ID,))
                continue
            role = role_of.get(i)
            if specials == "role" and role is not None and role in teacher.special_ids:
                table.append((teacher.special_ids[role],))
                continue
            try:
                table.append(tuple(teacher.encode(student.id_to_token(i))))
            except ValueError as e:
                raise ValueError(
                    f"TokenMapping.from_tokenizers: student token {student.id_to_token(i)!r}: {e}"
                ) from None
        return cls(tuple(table), student.vocab_size, teacher.vocab_size)

    @classmethod
    def identity(cls, vocab_size: int) -> TokenMapping:
        return cls(tuple((i,) for i in range(vocab_size)), vocab_size, vocab_size)

    @property
    def is_identity(self) -> bool:
        return self.student_vocab_size == self.teacher_vocab_size and all(
            seq == (i,) for i, seq in enumerate(self.table)
        )

    def map_ids(self, student_ids) -> list[int]:
        """Teacher ids for a student id sequence (each student id replaced by its teacher spelling)."""
        return self.map_ids_with_alignment(student_ids)[0]

    def map_ids_with_alignment(self, student_ids) -> tuple[list[int], list[int]]:
        """(teacher_ids, owner): owner[j] is the index in `student_ids` of the token that teacher id j spells."""
        teacher, owner = [], []
        for pos, s in enumerate(np.asarray(student_ids, dtype=np.int64).reshape(-1).tolist()):
            if not 0 <= s < self.student_vocab_size:
                raise ValueError(f"map_ids: student id {s} outside [0, {self.student_vocab_size})")
            seq = self.table[s]
            teacher.extend(seq)
            owner.extend([pos] * len(seq))
        return teacher, owner

    def map_batch(self, tokens_BxL, attention_mask_BxL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Map a batch row by row, keeping its layout: each real token (mask 1) is replaced by its teacher
        spelling, each masked position by one PAD; rows are right-padded to the longest.

        Returns (teacher_tokens_BxM, teacher_attention_mask_BxM, owner_BxM) as int32; owner is the source
        position in the student row, -1 on padding. Per-student-token teacher log-probs are segment sums
        over `owner` (log q of a multi-piece spelling = sum of its pieces' target-aligned log-probs).
        """
        tokens = np.asarray(tokens_BxL)
        mask = np.asarray(attention_mask_BxL)
        if tokens.ndim != 2 or tokens.shape != mask.shape:
            raise ValueError(
                f"map_batch: tokens and mask must be [B, L] of one shape, got {tokens.shape}, {mask.shape}"
            )
        rows = []
        for b in range(tokens.shape[0]):
            ids, msk, own = [], [], []
            for pos in range(tokens.shape[1]):
                if mask[b, pos]:
                    seq = self.table[int(tokens[b, pos])]
                    ids.extend(seq)
                    msk.extend([1] * len(seq))
                    own.extend([pos] * len(seq))
                else:
                    ids.append(PAD_ID)
                    msk.append(0)
                    own.append(-1)
            rows.append((ids, msk, own))
        m = max(len(r[0]) for r in rows)
        out = np.zeros((tokens.shape[0], m), np.int32)
        out_mask = np.zeros((tokens.shape[0], m), np.int32)
        out_owner = np.full((tokens.shape[0], m), -1, np.int32)
        for b, (ids, msk, own) in enumerate(rows):
            out[b, : len(ids)] = ids
            out_mask[b, : len(msk)] = msk
            out_owner[b, : len(own)] = own
        return out, out_mask, out_owner


def require_compatible(student: Tokenizer, teacher: Tokenizer, mapping: TokenMapping | None = None) -> TokenMapping:
    """Return the mapping to use between `student` and `teacher` ids, or raise ValueError (one line).

    Identical vocabularies -> the identity mapping (a declared one must then fit the sizes). Different
    vocabularies -> a declared `mapping` is required and must cover exactly these two vocabularies.
    """
    if mapping is None:
        if student.same_vocabulary(teacher):
            return TokenMapping.identity(student.vocab_size)
        raise ValueError(
            f"teacher tokenizer {teacher.name!r} (vocab {teacher.vocab_size}) differs from student tokenizer "
            f"{student.name!r} (vocab {student.vocab_size}) and no token mapping is declared; "
            "declare one (TokenMapping.from_tokenizers) or use the same tokenizer"
        )
    if mapping.student_vocab_size != student.vocab_size or mapping.teacher_vocab_size != teacher.vocab_size:
        raise ValueError(
            f"token mapping is for vocab sizes {mapping.student_vocab_size} -> {mapping.teacher_vocab_size}, "
            f"but the student has {student.vocab_size} and the teacher {teacher.vocab_size}"
        )
    return mapping
