"""Generated chat data for real tokenizers: JSONL lines of a generated task with worked solutions.

Each line is a conversation whose assistant turn is a worked solution in plain chat text, and the answer the
exact-match verifier checks (opd.tasks.jsonl):

    {"messages": [{"role": "user", "content": "Add 23, 7 and 41. End with 'Answer: <number>'."},
                  {"role": "assistant", "content": "23 + 7 = 30\\n30 + 41 = 71\\nAnswer: 71"}],
     "answer": "71"}

The JSONL task renders the turns through the checkpoint's own chat template, so the same file trains a
teacher by SFT (the assistant turn is the target) and supplies the student's OPD prompts.

    path = write_jsonl_data({"kind": "sums", "n": 2000, "seed": 0}, ".cache/opd/data")

The file name is a hash of the spec and the generator version, and the file is written atomically, so a
spec names one file and is generated once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

GENERATOR_VERSION = 1  # bump when a kind's text changes: the cached files are then regenerated


def sums_conversation(terms: list[int]) -> tuple[list[dict[str, str]], str]:
    """The conversation (user question, worked assistant answer) of adding `terms`, and the answer."""
    listed = ", ".join(str(t) for t in terms[:-1]) + f" and {terms[-1]}"
    question = f"Add {listed}. Work step by step and end with 'Answer: <number>'."
    lines, total = [], terms[0]
    for t in terms[1:]:
        lines.append(f"{total} + {t} = {total + t}")
        total += t
    lines.append(f"Answer: {total}")
    return ([{"role": "user", "content": question}, {"role": "assistant", "content": "\n".join(lines)}],
            str(total))


KINDS = {"sums": sums_conversation}
SPEC_KEYS = {"kind": str, "n": int, "seed": int, "min_terms": int, "max_terms": int, "max_value": int}
SPEC_DEFAULTS = {"min_terms": 3, "max_terms": 4, "max_value": 99}


def check_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A complete, validated copy of a data spec; a bad key or value is one ValueError naming it."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"generate: expected a mapping {{kind, n, seed, ...}}, got {spec!r:.60}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"generate.{unknown[0]}: not a key (allowed: {sorted(SPEC_KEYS)})")
    out = {**SPEC_DEFAULTS, **spec}
    for key, kind in SPEC_KEYS.items():
        if key not in out:
            raise ValueError(f"generate.{key}: required")
        value = out[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"generate.{key}: expected {kind.__name__}, got {value!r}")
    if out["kind"] not in KINDS:
        raise ValueError(f"generate.kind: expected one of {sorted(KINDS)}, got {out['kind']!r}")
    for key in ("n", "min_terms", "max_value"):
        minimum = 2 if key == "min_terms" else 1
        if out[key] < minimum:
            raise ValueError(f"generate.{key}: expected an integer >= {minimum}, got {out[key]}")
    if out["max_terms"] < out["min_terms"]:
        raise ValueError(f"generate.max_terms: expected >= min_terms={out['min_terms']}, got {out['max_terms']}")
    if out["seed"] < 0:
        raise ValueError(f"generate.seed: expected an integer >= 0, got {out['seed']}")
    return out


def generate_lines(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The JSONL objects of a spec: `n` distinct problems drawn with `seed`."""
    spec = check_spec(spec)
    rng = np.random.default_rng(spec["seed"])
    seen: set[tuple[int, ...]] = set()
    lines = []
    for _ in range(100 * spec["n"] + 1000):
        if len(lines) == spec["n"]:
            break
        count = int(rng.integers(spec["min_terms"], spec["max_terms"] + 1))
        terms = tuple(int(t) for t in rng.integers(1, spec["max_value"] + 1, count))
        if terms in seen:
            continue
        seen.add(terms)
        messages, answer = KINDS[spec["kind"]](list(terms))
        lines.append({"messages": messages, "answer": answer})
    if len(lines) < spec["n"]:
        raise ValueError(f"generate.n: only {len(lines)} distinct problems exist for this spec, asked {spec['n']}")
    return lines


def write_jsonl_data(spec: Mapping[str, Any], root: str | os.PathLike) -> Path:
    """The JSONL file of `spec` under `root`, generated on first use (atomically)."""
    spec = check_spec(spec)
    name = hashlib.sha256(json.dumps({**spec, "version": GENERATOR_VERSION}, sort_keys=True).encode()).hexdigest()
    path = Path(root) / f"{spec['kind']}-{spec['n']}-{name[:12]}.jsonl"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in generate_lines(spec)), encoding="utf-8")
    tmp.replace(path)
    return path
