"""Built-in demo data: seeded formatting rules, a non-IID partition, and exact-match scoring.

Each *family* is one deterministic string transformation with a short, checkable answer
(`date: 2023-04-17` -> `17.04.2023`). The base SmolLM2-135M-Instruct knows what a date is but
answers in prose, never in the exact target form, so its exact match is ~0; a rank-8 LoRA learns
a rule from a few dozen examples because each rule is a re-arrangement of tokens already in the
prompt (copying is what attention does well).

Partition (non-IID, after the "pathological" label-skew splits of McMahan et al. 2017): with
`families_per_client = k`, client c owns families [c·k, (c+1)·k) and draws a `own_fraction`
share of its examples from them; the rest is spread uniformly over the other families. A
client training alone therefore sees the other clients' rules only a handful of times.

The held-out eval set is balanced over families and disjoint (by prompt) from every client's
training data. Records use the chat form with a short system prompt, so training (through
the GGUF chat template) and inference (`EdgeModel.chat`) render identical tokens and the
template's default 20-token system prompt is not paid on every example.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_sdk.validators import require_positive_ints

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = "Apply the rule."
"""System message of every built-in example (and of the demo's chat exchange)."""

_WORDS = [
    "cat",
    "dog",
    "owl",
    "fox",
    "bee",
    "elk",
    "ant",
    "cow",
    "hen",
    "yak",
    "ram",
    "emu",
    "bat",
    "eel",
    "pig",
    "rat",
    "red",
    "blue",
    "green",
    "gold",
    "pink",
    "gray",
    "lime",
    "teal",
    "navy",
    "rose",
    "sun",
    "moon",
    "star",
    "rain",
    "snow",
    "wind",
    "fire",
    "ice",
    "rock",
    "sand",
    "tree",
    "leaf",
    "lake",
    "hill",
    "road",
    "ship",
]
_FIRST = [
    "Ada",
    "Alan",
    "Grace",
    "Linus",
    "Marie",
    "Isaac",
    "Nikola",
    "Rosa",
    "Carl",
    "Emmy",
    "Niels",
    "Katherine",
    "John",
    "Barbara",
    "Edsger",
    "Donald",
    "Frances",
    "Tim",
    "Hedy",
    "Claude",
    "Dennis",
    "Ken",
    "Margaret",
    "Sophie",
    "Lise",
    "Alice",
    "Kurt",
    "Paul",
]
_LAST = [
    "Lovelace",
    "Turing",
    "Hopper",
    "Torvalds",
    "Curie",
    "Newton",
    "Tesla",
    "Parks",
    "Gauss",
    "Noether",
    "Bohr",
    "Johnson",
    "Backus",
    "Liskov",
    "Dijkstra",
    "Knuth",
    "Allen",
    "Lee",
    "Lamarr",
    "Shannon",
    "Ritchie",
    "Thompson",
    "Hamilton",
    "Germain",
    "Meitner",
    "Smith",
    "Godel",
    "Dirac",
]


def _date(rng: random.Random) -> tuple[str, str]:
    y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    return f"{y:04d}-{m:02d}-{d:02d}", f"{d:02d}.{m:02d}.{y:04d}"


def _phone(rng: random.Random) -> tuple[str, str]:
    digits = "".join(str(rng.randint(0, 9)) for _ in range(10))
    return digits, f"({digits[:3]}) {digits[3:6]}-{digits[6:]}"


def _name(rng: random.Random) -> tuple[str, str]:
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    return f"{first} {last}", f"{last}, {first[0]}."


def _brackets(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, 3)
    return " ".join(words), "[" + ", ".join(words) + "]"


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, 3)
    return " ".join(words), " ".join(reversed(words))


def _initials(rng: random.Random) -> tuple[str, str]:
    names = [rng.choice(_FIRST), rng.choice(_FIRST), rng.choice(_LAST)]
    return " ".join(names), "".join(n[0] + "." for n in names)


def _snake(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, 3)
    return " ".join(w.capitalize() for w in words), "_".join(words)


def _tag(rng: random.Random) -> tuple[str, str]:
    tag, word = rng.choice(("b", "i", "em", "li", "td", "h1")), rng.choice(_WORDS)
    return f"{tag} {word}", f"<{tag}>{word}</{tag}>"


@dataclass(frozen=True)
class Family:
    """One formatting rule: the prompt is `"{name}: {input}"`, the answer its transform."""

    name: str
    make: Callable[[random.Random], tuple[str, str]]
    """rng -> (input, expected output)."""
    example: str
    """A human-readable example, for the report."""


FAMILIES: tuple[Family, ...] = (
    Family("date", _date, "2023-04-17 -> 17.04.2023"),
    Family("phone", _phone, "5551234567 -> (555) 123-4567"),
    Family("cite", _name, "Ada Lovelace -> Lovelace, A."),
    Family("list", _brackets, "cat dog owl -> [cat, dog, owl]"),
    Family("rev", _reverse, "cat dog owl -> owl dog cat"),
    Family("abbr", _initials, "Ada Grace Hopper -> A.G.H."),
    Family("snake", _snake, "Cat Dog Owl -> cat_dog_owl"),
    Family("tag", _tag, "b hello -> <b>hello</b>"),
)
FAMILY_NAMES: tuple[str, ...] = tuple(f.name for f in FAMILIES)


@dataclass(frozen=True)
class TaskConfig:
    """Shape of the built-in data."""

    clients: int = 4
    """Number of client partitions."""
    families_per_client: int = 1
    """Families each client owns; clients * families_per_client families are used."""
    train_per_client: int = 160
    """Training examples per client."""
    eval_per_family: int = 16
    """Held-out examples per family."""
    own_fraction: float = 0.9
    """Share of a client's examples drawn from its own families (1/F would be IID)."""
    seed: int = 0

    def __post_init__(self) -> None:
        require_positive_ints(
            self, "clients", "families_per_client", "train_per_client", "eval_per_family"
        )
        if self.num_families > len(FAMILIES):
            raise ValueError(
                f"`clients` * `families_per_client` = {self.num_families} exceeds the "
                f"{len(FAMILIES)} built-in families"
            )
        if not 0.0 < self.own_fraction <= 1.0:
            raise ValueError(f"`own_fraction` should be in (0, 1], got {self.own_fraction!r}")
        if self.num_families == self.families_per_client and self.own_fraction < 1.0:
            raise ValueError(
                "`own_fraction` < 1 needs families owned by other clients (clients >= 2)"
            )

    @property
    def num_families(self) -> int:
        return self.clients * self.families_per_client

    @property
    def families(self) -> tuple[Family, ...]:
        return FAMILIES[: self.num_families]

    def owned(self, client: int) -> tuple[str, ...]:
        """Family names client `client` owns."""
        k = self.families_per_client
        return tuple(f.name for f in self.families[client * k : (client + 1) * k])


@dataclass(frozen=True)
class Example:
    """One task instance."""

    family: str
    prompt: str
    """User message, e.g. `date: 2023-04-17`."""
    answer: str
    system: str | None = SYSTEM_PROMPT
    """System message; None renders none (the chat template may add its default)."""

    def messages(self, with_answer: bool = True) -> list[dict[str, str]]:
        msgs = [] if self.system is None else [{"role": "system", "content": self.system}]
        msgs.append({"role": "user", "content": self.prompt})
        if with_answer:
            msgs.append({"role": "assistant", "content": self.answer})
        return msgs

    def to_record(self) -> dict[str, object]:
        """The trainer's chat JSONL record (`family` is extra and ignored by the trainer)."""
        return {"messages": self.messages(), "family": self.family}


@dataclass
class TaskData:
    """Per-client training examples and the shared held-out set."""

    clients: list[list[Example]]
    eval: list[Example]
    config: TaskConfig


def _draw(family: Family, rng: random.Random, taken: set[str], tries: int = 1000) -> Example:
    """A fresh example of `family` whose prompt is not in `taken` (and add it)."""
    for _ in range(tries):
        x, y = family.make(rng)
        prompt = f"{family.name}: {x}"
        if prompt not in taken:
            taken.add(prompt)
            return Example(family.name, prompt, y)
    raise ValueError(f"family {family.name!r} ran out of distinct examples after {tries} draws")


def generate(config: TaskConfig) -> TaskData:
    """Seeded, non-IID per-client data and a balanced held-out set (disjoint prompts)."""
    rng = random.Random(f"fedlm-demo:{config.seed}")
    families = config.families
    by_name = {f.name: f for f in families}
    taken: set[str] = set()
    # Eval first, so the held-out set does not depend on the partition settings.
    evalset = [_draw(f, rng, taken) for f in families for _ in range(config.eval_per_family)]
    clients: list[list[Example]] = []
    for c in range(config.clients):
        own = config.owned(c)
        others = [f.name for f in families if f.name not in own]
        n_own = (
            round(config.train_per_client * config.own_fraction)
            if others
            else config.train_per_client
        )
        names = [own[i % len(own)] for i in range(n_own)]
        names += [others[i % len(others)] for i in range(config.train_per_client - n_own)]
        rng.shuffle(names)
        clients.append([_draw(by_name[n], rng, taken) for n in names])
    return TaskData(clients=clients, eval=evalset, config=config)


def family_shares(examples: Sequence[Example]) -> dict[str, float]:
    """Fraction of `examples` per family."""
    counts = Counter(e.family for e in examples)
    total = max(1, len(examples))
    return {name: counts[name] / total for name in sorted(counts)}


# --------------------------------------------------------------------------- files


def write_jsonl(path: str | os.PathLike[str], examples: Sequence[Example]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps(ex.to_record(), ensure_ascii=False) + "\n")
    return out


def write_task_data(data: TaskData, out_dir: str | os.PathLike[str]) -> tuple[list[Path], Path]:
    """`client_{i}.jsonl` per client and `eval.jsonl` under `out_dir`; returns their paths."""
    root = Path(out_dir)
    paths = [write_jsonl(root / f"client_{i}.jsonl", ex) for i, ex in enumerate(data.clients)]
    return paths, write_jsonl(root / "eval.jsonl", data.eval)


def read_examples(path: str | os.PathLike[str]) -> list[Example]:
    """Examples of a JSONL file for exact-match scoring.

    Accepts chat records (the last assistant turn is the answer, the user turn before it the
    prompt, a leading system message is kept; earlier turns are not) with an optional `family`,
    and `{"prompt", "completion"}` records (no system message, as the trainer renders them).
    Lines that are neither are skipped: the trainer's own parser reports malformed data.
    """
    out: list[Example] = []
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            rec = json.loads(line)
            family = str(rec.get("family", "user"))
            if "messages" in rec:
                msgs = rec["messages"]
                if not msgs or msgs[-1].get("role") != "assistant":
                    continue
                users = [m["content"] for m in msgs[:-1] if m.get("role") == "user"]
                system = msgs[0]["content"] if msgs[0].get("role") == "system" else None
                out.append(Example(family, users[-1] if users else "", msgs[-1]["content"], system))
            elif "prompt" in rec and "completion" in rec:
                out.append(Example(family, rec["prompt"], rec["completion"], None))
    return out


# --------------------------------------------------------------------------- scoring


def normalize(text: str) -> str:
    """What exact match compares: surrounding whitespace and end-of-turn markers dropped."""
    return text.replace("<|im_end|>", "").replace("<|endoftext|>", "").strip()


def exact_match(prediction: str, answer: str) -> bool:
    return normalize(prediction) == normalize(answer)


def score(
    predictions: Sequence[str], examples: Sequence[Example]
) -> tuple[float, dict[str, float]]:
    """(overall exact match, per-family exact match) of `predictions` against `examples`."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    if not examples:
        raise ValueError("no examples to score")
    hits: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for pred, ex in zip(predictions, examples):
        totals[ex.family] += 1
        hits[ex.family] += exact_match(pred, ex.answer)
    per_family = {f: hits[f] / totals[f] for f in sorted(totals)}
    return sum(hits.values()) / len(examples), per_family


__all__ = [
    "FAMILIES",
    "FAMILY_NAMES",
    "SYSTEM_PROMPT",
    "Example",
    "Family",
    "TaskConfig",
    "TaskData",
    "exact_match",
    "family_shares",
    "generate",
    "normalize",
    "read_examples",
    "score",
    "write_jsonl",
    "write_task_data",
]
