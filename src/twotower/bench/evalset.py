"""The benchmark's eval set: fixed held-out prompts in the paper's three categories (math, code,
general text), each carrying what is needed to score it. `load_evalset` reads the committed JSONL;
`build_evalset` regenerates it, byte for byte, from the training corpus (`twotower data corpus`).

Where the items come from, and why none can have been trained on:
- math: `twotower.train.corpus.eval_problems`, the arithmetic problems whose canonical key hashes into
  the evaluation buckets; the corpus generator never emits them, whatever its seed.
- code: Python functions from code documents of the corpus that the packer holds out
  (`twotower.train.data.is_heldout`, the same rule and percentage that built `heldout.bin`). The
  prompt is the function up to and including the first compound-statement header of its body
  (`if ...:`, `for ...:`), so the prompt alone never parses and an empty completion fails.
- text: the first words of a prose paragraph from a held-out prose document; one paragraph per
  document, sources taken in turn.
Every code and text prompt is also checked NOT to occur verbatim in any training-split document
(`find_leaks`); the build drops candidates that do. To regenerate the committed file:

    python -c "from twotower.bench.evalset import *; save_evalset(build_evalset('runs/corpus'), evalset_path())"
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from ..train.corpus import eval_problems
from ..train.data import is_heldout
from .metrics import code_parses

CATEGORIES = ("math", "code", "text")
DEFAULT_COUNTS = {"math": 24, "code": 16, "text": 16}
# Generation budget per category: an answer and its EOS; a short function body; a sentence or two.
MAX_NEW_TOKENS = {"math": 16, "code": 64, "text": 48}
DEFAULT_HOLDOUT_PERCENT = 1.0  # `twotower data pack` default: the split the bundled model never saw
DEFAULT_SEED = 0
EVALSET_FILE = "evalset.jsonl"

CODE_EXCLUDED_SOURCES = ("python-stdlib:encodings/",)  # generated codec tables, near-copies of each other
CODE_ITEMS_PER_DOCUMENT = 2
CODE_REFERENCE_LINES = (1, 12)  # the held-out continuation after the prompt: min and max lines
TEXT_PROMPT_WORDS = 24
TEXT_REFERENCE_WORDS = 32
TEXT_MIN_PARAGRAPH_CHARS = 200
TEXT_MIN_PROSE_FRACTION = 0.97  # letters, spaces and sentence punctuation; drops markup, tables, code
_PROSE_CHARS = re.compile(r"[^\W\d_]|[ \n.,;:!?'\"()\-\u2018\u2019\u201c\u201d]")
_DEF_LINE = re.compile(r"^(?P<indent> *)def \w+\(.*\)(?: -> [^:]+)?:[ \t]*$")
_BLOCK_HEADER = re.compile(r"^ *(?:if|for|while|with|try|elif|else|except|finally)\b.*:[ \t]*$")


@dataclass(frozen=True)
class EvalItem:
    """One prompt and what scores its completion.

    answer: math only, the exact integer answer as text. reference: code and text only, how the
    held-out document itself continues (shown for reading; scores never use it).
    """

    id: str
    category: str
    prompt: str
    max_new_tokens: int
    source: str
    answer: str | None = None
    reference: str | None = None

    def validate(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"eval item {self.id}: unknown category {self.category!r}")
        if not self.prompt or self.max_new_tokens < 1:
            raise ValueError(f"eval item {self.id}: needs a prompt and max_new_tokens >= 1")
        if self.category == "math" and (self.answer is None or not re.fullmatch(r"-?\d+", self.answer)):
            raise ValueError(f"eval item {self.id}: a math item needs an integer answer")


# ---- reading and writing ---------------------------------------------------------------------------
def evalset_path() -> Path:
    """The committed eval set inside the package."""
    return Path(str(resources.files("twotower.bench") / "data" / EVALSET_FILE))


def load_evalset(
    path: str | Path | None = None, *, categories: Sequence[str] | None = None, limit: int | None = None
) -> list[EvalItem]:
    """Items of the committed (or given) JSONL, in file order; `categories` keeps those, `limit` keeps
    the first `limit` items of each category. Raises ValueError on a malformed file."""
    path = Path(path) if path is not None else evalset_path()
    if not path.is_file():
        raise FileNotFoundError(f"eval set {path} not found")
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = EvalItem(**json.loads(line))
            if not isinstance(item.max_new_tokens, int) or isinstance(item.max_new_tokens, bool):
                raise TypeError(f"max_new_tokens must be an integer, got {item.max_new_tokens!r}")
            item.validate()
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}:{lineno}: not an eval item ({err})") from None
        if any(item.id == other.id for other in items):
            raise ValueError(f"{path}:{lineno}: id {item.id!r} is used twice (outputs are matched by id)")
        items.append(item)
    return select(items, categories=categories, limit=limit)


def select(
    items: Sequence[EvalItem], *, categories: Sequence[str] | None = None, limit: int | None = None
) -> list[EvalItem]:
    wanted = CATEGORIES if categories is None else tuple(categories)
    unknown = sorted(set(wanted) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"unknown eval categories {unknown}; choose from {list(CATEGORIES)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    kept, seen = [], dict.fromkeys(wanted, 0)
    for item in items:
        if item.category in seen and (limit is None or seen[item.category] < limit):
            kept.append(item)
            seen[item.category] += 1
    return kept


def dumps(items: Iterable[EvalItem]) -> str:
    """The JSONL text of `items` (one object per line, keys in a fixed order)."""
    return "".join(json.dumps(asdict(item), ensure_ascii=False) + "\n" for item in items)


def save_evalset(items: Iterable[EvalItem], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(dumps(items), encoding="utf-8")


# ---- building ----------------------------------------------------------------------------------------
def build_evalset(
    corpus_dir: str | Path,
    *,
    counts: dict[str, int] | None = None,
    seed: int = DEFAULT_SEED,
    holdout_percent: float = DEFAULT_HOLDOUT_PERCENT,
) -> list[EvalItem]:
    """Regenerate the eval set: same corpus, counts, seed and holdout percentage -> same items.

    Raises ValueError when the corpus holds too few held-out candidates for the counts asked.
    """
    counts = {**DEFAULT_COUNTS, **(counts or {})}
    corpus = Path(corpus_dir)
    training = _training_text(corpus, holdout_percent)
    items = math_items(counts["math"])
    code_docs = [
        d for d in heldout_documents(corpus, "code", holdout_percent) if not d[1].startswith(CODE_EXCLUDED_SOURCES)
    ]
    items += code_items(code_docs, counts["code"], seed=seed, training=training)
    items += text_items(
        heldout_documents(corpus, "prose", holdout_percent), counts["text"], seed=seed, training=training
    )
    return items


def math_items(count: int) -> list[EvalItem]:
    """Reserved arithmetic problems in the corpus format, cut before the answer's leading space: with
    byte-level BPE the space belongs to the answer's first token (" 85"), so "A: " would end the prompt
    on a token the model never saw there."""
    return [
        EvalItem(
            id=f"math-{i:03d}",
            category="math",
            prompt=problem.prompt.rstrip(" "),
            max_new_tokens=MAX_NEW_TOKENS["math"],
            source="twotower.train.corpus.eval_problems",
            answer=str(problem.answer),
        )
        for i, problem in enumerate(eval_problems(count))
    ]


def code_items(documents: Sequence[tuple[str, str]], count: int, *, seed: int, training: str = "") -> list[EvalItem]:
    """Up to CODE_ITEMS_PER_DOCUMENT functions per (text, source) document, documents taken in turn."""
    rng = random.Random(f"evalset:code:{seed}")
    per_doc = []
    for text, source in documents:
        found = _shuffled_unseen(code_candidates(text), rng, training, CODE_ITEMS_PER_DOCUMENT)
        per_doc.append([(*c, source) for c in found])
    chosen = _take_in_turn(per_doc, count, what="code")
    return [
        EvalItem(f"code-{i:03d}", "code", prompt, MAX_NEW_TOKENS["code"], source, reference=reference)
        for i, (prompt, reference, source) in enumerate(chosen)
    ]


def text_items(documents: Sequence[tuple[str, str]], count: int, *, seed: int, training: str = "") -> list[EvalItem]:
    """One paragraph opening per (text, source) document; sources (python-docs, sqlite-docs, ...) in turn."""
    rng = random.Random(f"evalset:text:{seed}")
    by_group: dict[str, list] = {}
    for text, source in documents:
        found = _shuffled_unseen(text_candidates(text), rng, training, 1)
        if found:
            by_group.setdefault(source.split(":", 1)[0], []).append((*found[0], source))
    chosen = _take_in_turn([by_group[g] for g in sorted(by_group)], count, what="text")
    return [
        EvalItem(f"text-{i:03d}", "text", prompt, MAX_NEW_TOKENS["text"], source, reference=reference)
        for i, (prompt, reference, source) in enumerate(chosen)
    ]


def code_candidates(text: str) -> list[tuple[str, str]]:
    """(prompt, reference) for each single-line `def` of `text` whose body opens a block early on:
    prompt = the def through that block header; reference = the rest of the function."""
    lines = text.split("\n")
    out = []
    for start, line in enumerate(lines):
        match = _DEF_LINE.match(line)
        if not match:
            continue
        indent, end = len(match["indent"]), start + 1
        while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > indent):
            end += 1
        while end > start + 1 and not lines[end - 1].strip():
            end -= 1
        header = next((k for k in range(start + 1, end) if _BLOCK_HEADER.match(lines[k])), None)
        if header is None or not CODE_REFERENCE_LINES[0] <= end - header - 1 <= CODE_REFERENCE_LINES[1]:
            continue
        prompt = "\n".join(lines[start : header + 1])
        reference = "\n" + "\n".join(lines[header + 1 : end])
        opened_block = "\n" + " " * (_indent(lines[header]) + 4) + "pass"
        # the prompt must end exactly on an open block: alone it fails, with any body it parses
        if not code_parses(prompt, "") and code_parses(prompt, opened_block) and code_parses(prompt, reference):
            out.append((prompt, reference))
    return out


def text_candidates(text: str) -> list[tuple[str, str]]:
    """(prompt, reference) from each prose paragraph: its first TEXT_PROMPT_WORDS words (ending on a
    word, no trailing space) and the TEXT_REFERENCE_WORDS words after them."""
    out = []
    for paragraph in text.split("\n\n"):
        paragraph = paragraph.strip("\n")
        if len(paragraph) < TEXT_MIN_PARAGRAPH_CHARS or not paragraph[:1].isupper():
            continue
        if len(_PROSE_CHARS.findall(paragraph)) < TEXT_MIN_PROSE_FRACTION * len(paragraph):
            continue
        words = list(re.finditer(r"\S+", paragraph))
        if len(words) < TEXT_PROMPT_WORDS + TEXT_REFERENCE_WORDS:
            continue
        cut, end = words[TEXT_PROMPT_WORDS - 1].end(), words[TEXT_PROMPT_WORDS + TEXT_REFERENCE_WORDS - 1].end()
        out.append((paragraph[:cut], paragraph[cut:end]))
    return out


def _shuffled_unseen(candidates: list[tuple[str, str]], rng: random.Random, training: str, k: int) -> list:
    """Up to `k` candidates in a seeded random order, skipping any whose prompt occurs in `training`."""
    kept = []
    for candidate in rng.sample(candidates, len(candidates)):
        if len(kept) == k:
            break
        if candidate[0] not in training:
            kept.append(candidate)
    return kept


def _take_in_turn(groups: list[list], count: int, *, what: str) -> list:
    """First of each group, then second of each, ... until `count`."""
    chosen = [g[i] for i in range(max((len(g) for g in groups), default=0)) for g in groups if i < len(g)]
    if len(chosen) < count:
        raise ValueError(f"only {len(chosen)} held-out {what} candidates for {count} items; use a larger corpus")
    return chosen[:count]


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


# ---- the corpus and the leak check ---------------------------------------------------------------------
def corpus_documents(corpus_dir: Path, category: str) -> Iterator[tuple[str, str]]:
    """(text, source) of every document of one corpus category, in shard order."""
    shards = sorted(Path(corpus_dir).glob(f"{category}-*.jsonl"))
    if not shards:
        raise FileNotFoundError(f"no {category}-*.jsonl shards in corpus directory {corpus_dir}")
    for shard in shards:
        with shard.open(encoding="utf-8") as lines:
            for line in lines:
                record = json.loads(line)
                yield record["text"], record["source"]


def heldout_documents(corpus_dir: Path, category: str, holdout_percent: float) -> list[tuple[str, str]]:
    return [d for d in corpus_documents(corpus_dir, category) if is_heldout(d[0], holdout_percent=holdout_percent)]


def _training_text(corpus_dir: Path, holdout_percent: float) -> str:
    """Every training-split prose and code document, joined by NUL (which no prompt contains). Math
    documents are one short problem each: no code or text prompt fits inside one."""
    return "\0".join(
        text
        for category in ("prose", "code")
        for text, _ in corpus_documents(corpus_dir, category)
        if not is_heldout(text, holdout_percent=holdout_percent)
    )


def find_leaks(
    items: Iterable[EvalItem], corpus_dir: str | Path, *, holdout_percent: float = DEFAULT_HOLDOUT_PERCENT
) -> list[str]:
    """Ids of items seen in training: a code or text prompt occurring in a training-split document;
    a math problem, solved as the corpus writes it, equal to ANY math document (held out or not)."""
    items = list(items)
    training = _training_text(Path(corpus_dir), holdout_percent)
    math_shards = [p.read_text(encoding="utf-8") for p in sorted(Path(corpus_dir).glob("math-*.jsonl"))]
    leaks = []
    for item in items:
        if item.category == "math":
            quoted = json.dumps(f"{item.prompt} {item.answer}", ensure_ascii=False)  # the whole JSON string value
            leaked = any(quoted in shard for shard in math_shards)
        else:
            leaked = item.prompt in training
        if leaked:
            leaks.append(item.id)
    return leaks
