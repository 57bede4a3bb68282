"""Default corpus: real local text (Python docs prose, stdlib code, arithmetic) plus labelled noise.

Everything comes from the running Python installation or a seeded RNG, so the corpus needs no
network and is identical for a given seed and interpreter. Noise is injected into the train split
only, after splitting, with a ``noise_label`` so selection methods can be scored against it.
"""
from __future__ import annotations

import json
import re
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from components.data.arithmetic_formats import ArithmeticFormattedSource, formatted_arithmetic_docs
from components.data.corpus import CorpusBuilder
from components.data.schema import DOCUMENT_COLUMNS, validate_documents
from components.registry import MethodParams, Paper


class DataSourceError(FileNotFoundError):
    """A corpus source could not be read; the message names the path / dataset and recipe key."""


# ----------------------------------------------------------------------------- source params


class PydocTopicsSource(MethodParams):
    """English prose: the help topics shipped with Python (``pydoc_data.topics``)."""

    type: Literal["pydoc_topics"] = "pydoc_topics"
    target_words: int = Field(200, ge=20, description="approximate words per document (paragraph chunks)")
    max_docs: int | None = Field(None, ge=1, description="keep only the first N documents")
    domain: str = Field("prose", min_length=1)


class StdlibCodeSource(MethodParams):
    """Python code: a seeded sample of the running interpreter's standard-library ``.py`` files."""

    type: Literal["stdlib_code"] = "stdlib_code"
    max_files: int = Field(150, ge=1, description="number of stdlib files sampled")
    target_lines: int = Field(60, ge=5, description="approximate lines per document")
    max_chunks_per_file: int | None = Field(8, ge=1, description="cap so huge files do not dominate")
    domain: str = Field("code", min_length=1)


class ArithmeticSource(MethodParams):
    """Synthetic integer addition / subtraction, one equation per line (``347+68=415``)."""

    type: Literal["arithmetic"] = "arithmetic"
    n_docs: int = Field(1500, ge=1)
    max_digits: int = Field(3, ge=1, le=18, description="operands have 1..max_digits digits")
    min_lines: int = Field(8, ge=1, description="equations per document, lower bound")
    max_lines: int = Field(16, ge=1, description="equations per document, upper bound")
    domain: str = Field("arithmetic", min_length=1)

    @model_validator(mode="after")
    def _lines_ordered(self):
        if self.min_lines > self.max_lines:
            raise ValueError(f"min_lines ({self.min_lines}) > max_lines ({self.max_lines})")
        return self


class _LocalFileSource(MethodParams):
    path: Path = Field(description="local file")
    text_field: str = Field("text", min_length=1)
    domain: str | None = Field(
        None, description="domain for every row; None = the file's `domain` column, else 'text'"
    )
    max_docs: int | None = Field(None, ge=1)


class JsonlSource(_LocalFileSource):
    """A local JSON-lines file, one object per document."""

    type: Literal["jsonl"] = "jsonl"


class ParquetSource(_LocalFileSource):
    """A local parquet file, one row per document."""

    type: Literal["parquet"] = "parquet"


class HfSource(MethodParams):
    """A Hugging Face dataset via ``datasets.load_dataset`` (a hub name or a local directory)."""

    type: Literal["hf"] = "hf"
    name: str = Field(min_length=1, description="dataset name or local directory")
    config: str | None = None
    split: str = "train"
    text_field: str = Field("text", min_length=1)
    domain: str | None = Field(None, description="None = the dataset's `domain` column, else 'text'")
    max_docs: int | None = Field(None, ge=1)
    cache_dir: Path | None = Field(None, description="datasets cache; None = the datasets default")


Source = Annotated[
    Union[PydocTopicsSource, StdlibCodeSource, ArithmeticSource, ArithmeticFormattedSource, JsonlSource,
          ParquetSource, HfSource],
    Field(discriminator="type"),
]


class NoiseParams(MethodParams):
    """Noise docs to inject, as fractions of the clean train document count."""

    boilerplate: float = Field(0.04, ge=0, le=1, description="cookie / legal / navigation boilerplate")
    gibberish: float = Field(0.04, ge=0, le=1, description="random character strings / vocabulary salad")
    exact_duplicate: float = Field(0.04, ge=0, le=1, description="verbatim copies of clean docs")
    near_duplicate: float = Field(0.04, ge=0, le=1, description="copies with a few words changed")
    spam: float = Field(0.04, ge=0, le=1, description="repeated phrases / keyword stuffing")


class SplitParams(MethodParams):
    """Held-out fractions, applied per domain so every domain appears in every split."""

    validation: float = Field(0.05, ge=0, lt=1)
    test: float = Field(0.05, ge=0, lt=1)

    @model_validator(mode="after")
    def _leaves_train(self):
        if self.validation + self.test >= 1:
            raise ValueError(f"validation + test must be < 1, got {self.validation} + {self.test}")
        return self


def _default_sources() -> list:
    return [PydocTopicsSource(), StdlibCodeSource(), ArithmeticSource()]


# ----------------------------------------------------------------------------- text sources


_MIN_WORDS_TO_DEDUP_PARAGRAPH = 8  # short headings like "Notes:" may repeat
_MIN_WORDS_PER_PYDOC_DOC = 20


def pydoc_topics_file() -> Path:
    """The module the prose source reads (``pydoc_data/topics.py`` of this Python)."""
    import pydoc_data.topics

    return Path(pydoc_data.topics.__file__)


def _pydoc_docs(src: PydocTopicsSource) -> list[str]:
    from pydoc_data.topics import topics

    docs: list[str] = []
    seen: set[str] = set()
    for name in sorted(topics):
        # Topics repeat whole sections (``compound`` contains ``if``, ``specialnames`` contains
        # ``customization``...). Dropping repeated paragraphs keeps clean docs free of real
        # duplicates, so only injected copies count as duplicates when selection is scored.
        paragraphs = []
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            normalized = " ".join(paragraph.split())
            if not normalized or normalized in seen:
                continue
            if len(normalized.split()) >= _MIN_WORDS_TO_DEDUP_PARAGRAPH:
                seen.add(normalized)
            paragraphs.append(paragraph.strip("\n"))
        chunks: list[list[str]] = []
        current: list[str] = []
        words = 0
        for paragraph in paragraphs:
            current.append(paragraph)
            words += len(paragraph.split())
            if words >= src.target_words:
                chunks.append(current)
                current, words = [], 0
        if current:
            if chunks and words < src.target_words // 3:
                chunks[-1].extend(current)  # a short tail reads better attached to its predecessor
            else:
                chunks.append(current)
        # A topic whose sections all appeared earlier is left with only its heading.
        docs.extend("\n\n".join(c) for c in chunks if sum(len(p.split()) for p in c) >= _MIN_WORDS_PER_PYDOC_DOC)
    return docs[: src.max_docs] if src.max_docs else docs


# Generated tables (encodings), tests, the IDE and 2to3 are not representative library code.
_STDLIB_EXCLUDED_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "encodings"}


@lru_cache(maxsize=1)
def stdlib_python_files() -> tuple[Path, ...]:
    """Sorted stdlib ``.py`` files eligible for the code source (relative order is stable)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if any(part in _STDLIB_EXCLUDED_DIRS or part.startswith("dist-packages") for part in parts[:-1]):
            continue
        files.append(path)
    return tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))


def _chunk_lines(lines: list[str], target: int) -> list[str]:
    """Cut at the first blank line after ``target`` lines (or hard at 2x) so chunks end cleanly."""
    chunks, current = [], []
    for line in lines:
        current.append(line)
        if (len(current) >= target and not line.strip()) or len(current) >= 2 * target:
            chunks.append(current)
            current = []
    if current:
        if chunks and len(current) < target // 3:
            chunks[-1].extend(current)  # a short file tail belongs with the code before it
        else:
            chunks.append(current)
    texts = ["\n".join(chunk).strip("\n") for chunk in chunks]
    return [t for t in texts if t.strip()]


def _stdlib_docs(src: StdlibCodeSource, rng: np.random.Generator) -> list[str]:
    files = stdlib_python_files()
    if not files:
        raise DataSourceError(f"no standard-library .py files found under {sysconfig.get_paths()['stdlib']}")
    picked = np.sort(rng.choice(len(files), size=min(src.max_files, len(files)), replace=False))
    docs: list[str] = []
    for index in picked:
        try:
            text = files[index].read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few legacy files are not UTF-8; skipping them is deterministic
        chunks = _chunk_lines(text.splitlines(), src.target_lines)
        if src.max_chunks_per_file and len(chunks) > src.max_chunks_per_file:
            keep = np.sort(rng.choice(len(chunks), size=src.max_chunks_per_file, replace=False))
            chunks = [chunks[k] for k in keep]
        docs.extend(chunks)
    return docs


def _random_operands(rng: np.random.Generator, n: int, max_digits: int) -> np.ndarray:
    digits = rng.integers(1, max_digits + 1, size=n)
    low = np.where(digits == 1, 0, 10 ** (digits - 1))
    return rng.integers(low, 10**digits)


def _arithmetic_docs(src: ArithmeticSource, rng: np.random.Generator) -> list[str]:
    n_lines = rng.integers(src.min_lines, src.max_lines + 1, size=src.n_docs)
    total = int(n_lines.sum())
    a = _random_operands(rng, total, src.max_digits)
    b = _random_operands(rng, total, src.max_digits)
    subtract = rng.random(total) < 0.5
    a, b = np.where(subtract, np.maximum(a, b), a), np.where(subtract, np.minimum(a, b), b)
    result = np.where(subtract, a - b, a + b)
    lines = [f"{x}{'-' if s else '+'}{y}={r}" for x, y, s, r in zip(a.tolist(), b.tolist(), subtract, result.tolist())]
    bounds = np.concatenate([[0], np.cumsum(n_lines)])
    return ["\n".join(lines[bounds[i] : bounds[i + 1]]) for i in range(src.n_docs)]


def _rows_from_records(records: list[dict], src, where: str, key: str) -> list[tuple[str, str]]:
    rows = []
    for n, record in enumerate(records):
        if src.text_field not in record:
            raise DataSourceError(
                f"{where}: record {n} has no field {src.text_field!r} (set {key}.text_field); "
                f"fields: {sorted(record)}"
            )
        text = record[src.text_field]
        if not isinstance(text, str):
            raise ValueError(f"{where}: record {n} field {src.text_field!r} is {type(text).__name__}, not str")
        if not text.strip():
            continue  # blank rows carry nothing to train on
        domain = src.domain or str(record.get("domain") or "text")
        rows.append((text, domain))
        if src.max_docs and len(rows) >= src.max_docs:
            break
    return rows


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _local_rows(src, index: int) -> list[tuple[str, str]]:
    key = f"data.sources[{index}]"
    path = Path(src.path)
    if not path.is_file():
        raise DataSourceError(f"{key}.path: {src.type} file {path} does not exist")
    if src.type == "jsonl":
        records = []
        with path.open("rb") as handle:  # bytes: a bad line is named by number, never echoed
            for line_no, raw in enumerate(handle, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset "
                                     f"{err.start}); is this a binary file?") from None
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None
                if not isinstance(records[-1], dict):
                    raise ValueError(f"{path}:{line_no}: expected a JSON object per line")
                for field, value in records[-1].items():
                    if isinstance(value, str) and not _encodable(value):
                        raise ValueError(f"{path}:{line_no}: field {field!r} holds an unpaired UTF-16 surrogate "
                                         "(a \\ud800-\\udfff escape without its pair), which is not valid text")
    else:
        try:
            records = pd.read_parquet(path).to_dict("records")
        except Exception as err:  # pyarrow raises several unrelated types for bad files
            raise DataSourceError(f"{key}.path: cannot read parquet file {path}: {err}") from None
    return _rows_from_records(records, src, str(path), key)


def _hf_rows(src: HfSource, index: int) -> list[tuple[str, str]]:
    key = f"data.sources[{index}]"
    try:
        import datasets  # lazy: heavy import, only needed for this source

        dataset = datasets.load_dataset(
            src.name, src.config, split=src.split, cache_dir=str(src.cache_dir) if src.cache_dir else None
        )
        if src.max_docs:
            dataset = dataset.select(range(min(src.max_docs * 2, len(dataset))))  # headroom for blank rows
        records = dataset.to_list()
    except Exception as err:
        raise DataSourceError(
            f"{key}: could not load Hugging Face dataset {src.name!r} (config={src.config!r}, "
            f"split={src.split!r}): {type(err).__name__}: {err}. If you are offline or it is not "
            f"available, save it locally and use a `jsonl` or `parquet` source with a local path."
        ) from None
    return _rows_from_records(records, src, f"dataset {src.name!r}", key)


# ----------------------------------------------------------------------------- noise generators

_BOILERPLATE_LINES = [
    "We use cookies to improve your experience. By continuing to browse you accept our use of cookies.",
    "Accept all cookies | Reject non-essential cookies | Manage cookie preferences",
    "This website uses cookies and similar technologies to personalise content and ads.",
    "Copyright (c) {year} {company}. All rights reserved.",
    "Terms of Service | Privacy Policy | Cookie Policy | Accessibility",
    "Unauthorized reproduction or distribution of this content is strictly prohibited.",
    "{company} is a registered trademark. All rights reserved.",
    "Home | About Us | Products | Blog | Careers | Contact Us",
    "Skip to main content",
    "Sign in | Register | Forgot your password?",
    "Subscribe to our newsletter for the latest updates and offers.",
    "Follow us on Twitter, Facebook and Instagram.",
    "Share on Facebook | Share on Twitter | Share by email",
    "Back to top",
    "Read more >>",
    "You must enable JavaScript to view this page correctly.",
    "By using this site you agree to our Terms of Use and Privacy Policy.",
    "Powered by {company} CMS. All rights reserved.",
]
_COMPANIES = ["Acme Corp", "Globex", "Initech", "Umbrella Media", "Hooli", "Vandelay Industries", "Stark Digital"]
_SPAM_PHRASES = [
    "buy cheap watches online now",
    "best casino bonus free spins today",
    "lose weight fast with this one weird trick",
    "click here to claim your free prize",
    "cheap flights hotels and car rental deals",
    "earn money from home fast and easy",
    "limited time offer act now",
]
_SPAM_KEYWORDS = [
    "cheap", "loans", "casino", "bonus", "free", "viagra", "pills", "discount", "crypto",
    "forex", "winner", "deal", "replica", "watches", "seo", "backlinks", "followers",
]
_GIBBERISH_CHARS = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789@#$%^&*~_+=<>/\\|{}"))


def _boilerplate_doc(rng: np.random.Generator) -> str:
    n = int(rng.integers(6, 14))
    lines = rng.choice(len(_BOILERPLATE_LINES), size=n, replace=True)
    company = _COMPANIES[int(rng.integers(len(_COMPANIES)))]
    year = int(rng.integers(2005, 2025))
    return "\n".join(_BOILERPLATE_LINES[k].format(company=company, year=year) for k in lines)


def _gibberish_doc(rng: np.random.Generator, vocabulary: list[str]) -> str:
    n_words = int(rng.integers(60, 250))
    if rng.random() < 0.5 or not vocabulary:
        lengths = rng.integers(2, 16, size=n_words)
        chars = rng.choice(_GIBBERISH_CHARS, size=int(lengths.sum()))
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        words = ["".join(chars[bounds[i] : bounds[i + 1]]) for i in range(n_words)]
    else:  # vocabulary salad: distinct word types drawn uniformly, so function words are rare
        words = [vocabulary[k] for k in rng.integers(len(vocabulary), size=n_words)]
    per_line = int(rng.integers(8, 20))
    return "\n".join(" ".join(words[i : i + per_line]) for i in range(0, n_words, per_line))


def _spam_doc(rng: np.random.Generator) -> str:
    if rng.random() < 0.5:
        phrase = _SPAM_PHRASES[int(rng.integers(len(_SPAM_PHRASES)))]
        sep = ["\n", "! ", ". ", " "][int(rng.integers(4))]
        return sep.join([phrase] * int(rng.integers(10, 40)))
    keywords = rng.choice(_SPAM_KEYWORDS, size=int(rng.integers(3, 6)), replace=False)
    words = rng.choice(keywords, size=int(rng.integers(80, 200)))
    return " ".join(words)


def _shingles(words: list[str], n: int = 5) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(max(len(words) - n + 1, 1))}


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


NEAR_DUPLICATE_MIN_WORDS = 100  # one changed word then leaves Jaccard ~0.9
_NEAR_DUPLICATE_ATTEMPTS = 10
NEAR_DUPLICATE_MIN_JACCARD = 0.85  # margin above the usual 0.8 dedup threshold


def _near_duplicate(text: str, rng: np.random.Generator) -> str | None:
    """Replace 1-3 words with other words of the same doc, keeping 5-shingle Jaccard >= 0.85.

    Returns None when no tried edit keeps the similarity (docs made of repeated shingles).
    """
    pieces = re.split(r"(\s+)", text)  # keep whitespace so code layout survives
    word_positions = [i for i, p in enumerate(pieces) if p and not p.isspace()]
    words = [pieces[i] for i in word_positions]
    vocabulary = sorted(set(words))
    original = _shingles(words)
    n_changes = int(rng.integers(1, 4))
    for _attempt in range(_NEAR_DUPLICATE_ATTEMPTS):
        changed = list(pieces)
        for pos in rng.choice(len(word_positions), size=n_changes, replace=False):
            candidates = [w for w in vocabulary if w != words[pos]]
            changed[word_positions[pos]] = candidates[int(rng.integers(len(candidates)))]
        candidate = "".join(changed)
        if _jaccard(original, _shingles(candidate.split())) >= NEAR_DUPLICATE_MIN_JACCARD:
            return candidate
        n_changes = max(1, n_changes - 1)
    return None


# ----------------------------------------------------------------------------- the builder


class StandardCorpus(CorpusBuilder):
    """Local text sources, split per domain, with labelled noise injected into train."""

    key = "standard_corpus"
    paper = Paper(
        "paperdag default corpus: real local text with injected, labelled noise",
        url="https://docs.python.org/3/library/pydoc.html",
    )

    class Params(MethodParams):
        sources: list[Source] = Field(default_factory=_default_sources, min_length=1, description="text sources")
        noise: NoiseParams = Field(default_factory=NoiseParams, description="noise fractions (train only)")
        split: SplitParams = Field(default_factory=SplitParams, description="held-out fractions per domain")
        seed: int = Field(0, ge=0, description="drives every random choice")

    def _rng(self, purpose: int) -> np.random.Generator:
        return np.random.default_rng([self.params.seed, purpose])

    def input_files(self) -> dict[str, list[Path]]:
        """Every local file a source reads: data files, a local HF dataset directory, and the
        Python installation's own text (which differs between Python versions)."""
        files: dict[str, list[Path]] = {}
        for index, src in enumerate(self.params.sources):
            key = f"data.sources[{index}]"
            if src.type in ("jsonl", "parquet"):
                files[f"{key}.path"] = [Path(src.path)]
            elif src.type == "hf" and Path(src.name).is_dir():
                files[f"{key}.name"] = [Path(src.name)]
            elif src.type == "pydoc_topics":
                files[key] = [pydoc_topics_file()]
            elif src.type == "stdlib_code":
                files[key] = list(stdlib_python_files())
        return files

    def _source_rows(self) -> list[dict]:
        """Clean rows from every source, ids ``{source}-{n:06d}``, exact duplicates dropped."""
        rows: list[dict] = []
        seen_labels: dict[str, int] = {}
        seen_texts: set[str] = set()
        for index, src in enumerate(self.params.sources):
            seen_labels[src.type] = seen_labels.get(src.type, 0) + 1
            label = src.type if seen_labels[src.type] == 1 else f"{src.type}_{seen_labels[src.type]}"
            rng = self._rng(100 + index)
            if src.type == "pydoc_topics":
                pairs = [(t, src.domain) for t in _pydoc_docs(src)]
            elif src.type == "stdlib_code":
                pairs = [(t, src.domain) for t in _stdlib_docs(src, rng)]
            elif src.type == "arithmetic":
                pairs = [(t, src.domain) for t in _arithmetic_docs(src, rng)]
            elif src.type == "arithmetic_formatted":
                # no source index: sources with the same seed draw the same problems, so one corpus
                # can hold the same problem set in every format (equal data per format)
                own_rng = np.random.default_rng([self.params.seed, src.seed])
                pairs = [(t, src.domain) for t in formatted_arithmetic_docs(src, own_rng)]
            elif src.type in ("jsonl", "parquet"):
                pairs = _local_rows(src, index)
            else:
                pairs = _hf_rows(src, index)
            n = 0
            for text, domain in pairs:
                normalized = " ".join(text.split())
                if normalized in seen_texts:
                    continue  # real corpora repeat themselves; only injected copies should be labelled noise
                seen_texts.add(normalized)
                rows.append({"id": f"{label}-{n:06d}", "text": text, "domain": domain, "source": label})
                n += 1
        return rows

    def _assign_splits(self, docs: pd.DataFrame) -> pd.Series:
        split = pd.Series("train", index=docs.index, dtype=object)
        fractions = self.params.split
        for domain_index, (domain, group) in enumerate(docs.groupby("domain", sort=True)):
            n = len(group)
            n_val = max(1, round(fractions.validation * n)) if fractions.validation > 0 else 0
            n_test = max(1, round(fractions.test * n)) if fractions.test > 0 else 0
            if n - n_val - n_test < 1:
                raise ValueError(
                    f"domain {domain!r} has only {n} documents: too few for train/validation/test "
                    f"splits of {fractions.validation}/{fractions.test}; add documents or lower data.split"
                )
            # formatted arithmetic: one permutation for every format domain, so with equal n_docs the
            # same problem lands in the same split in every format (exact match compares like with like)
            formatted = group["source"].str.startswith("arithmetic_formatted").all()
            order = self._rng(300 if formatted else 200 + domain_index).permutation(len(group))
            order = group.index.to_numpy()[order]
            split.loc[order[:n_val]] = "validation"
            split.loc[order[n_val : n_val + n_test]] = "test"
        return split

    def _noise_rows(self, train: pd.DataFrame, next_id: dict[str, int]) -> list[dict]:
        noise = self.params.noise
        rng = self._rng(300)
        n_clean = len(train)
        prose = train[train["domain"] == "prose"]
        generated_hosts = prose if len(prose) else train
        long_enough = train[train["text"].str.split().str.len() >= NEAR_DUPLICATE_MIN_WORDS]
        vocabulary = sorted({w for t in generated_hosts["text"] for w in t.split() if w.isalpha()})
        rows = []

        def add(text: str, host: pd.Series, kind: str) -> None:
            number = next_id[host["source"]]
            next_id[host["source"]] = number + 1
            rows.append({"id": f"{host['source']}-{number:06d}", "text": text, "domain": host["domain"],
                         "source": host["source"], "noise_label": kind})

        def hosts(frame: pd.DataFrame, count: int, kind: str):
            if count and frame.empty:
                raise ValueError(
                    f"data.noise.{kind}: no suitable train documents to base {count} noise docs on "
                    f"(near duplicates need >= {NEAR_DUPLICATE_MIN_WORDS} words); set it to 0"
                )
            return [frame.iloc[k] for k in rng.integers(len(frame), size=count)] if count else []

        for host in hosts(generated_hosts, round(noise.boilerplate * n_clean), "boilerplate"):
            add(_boilerplate_doc(rng), host, "boilerplate")
        for host in hosts(generated_hosts, round(noise.gibberish * n_clean), "gibberish"):
            add(_gibberish_doc(rng, vocabulary), host, "gibberish")
        for host in hosts(train, round(noise.exact_duplicate * n_clean), "exact_duplicate"):
            add(host["text"], host, "exact_duplicate")
        n_near = round(noise.near_duplicate * n_clean)
        made = 0
        for host in hosts(long_enough, 4 * n_near, "near_duplicate"):  # spare hosts for rare failures
            if made == n_near:
                break
            text = _near_duplicate(host["text"], rng)
            if text is not None:
                add(text, host, "near_duplicate")
                made += 1
        if made < n_near:
            raise ValueError(
                f"data.noise.near_duplicate: could only make {made} of {n_near} near duplicates from the "
                f"train documents with >= {NEAR_DUPLICATE_MIN_WORDS} words; lower the fraction or add longer docs"
            )
        for host in hosts(generated_hosts, round(noise.spam * n_clean), "spam"):
            add(_spam_doc(rng), host, "spam")
        return rows

    def build(self) -> pd.DataFrame:
        clean = pd.DataFrame(self._source_rows(), columns=["id", "text", "domain", "source"])
        if clean.empty:
            raise ValueError("data.sources produced no documents")
        clean["split"] = self._assign_splits(clean)
        clean["noise_label"] = ""
        next_id = {source: int(group.size) for source, group in clean.groupby("source")}
        noise = pd.DataFrame(self._noise_rows(clean[clean["split"] == "train"], next_id))
        if not noise.empty:
            noise["split"] = "train"
        # Noise rows follow the clean rows so "keep the first copy" dedup keeps the original.
        docs = pd.concat([clean, noise], ignore_index=True)[list(DOCUMENT_COLUMNS)]
        docs = docs.astype({c: object for c in DOCUMENT_COLUMNS})
        return validate_documents(docs, where=f"{self.key} corpus (seed {self.params.seed})")
