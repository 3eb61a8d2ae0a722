"""Text cleaning, quality filters, exact + near-duplicate removal (MinHash LSH), and the stable train/val split."""
from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
import zlib
from dataclasses import dataclass

import numpy as np

# the zero-width joiners U+200C/U+200D stay: emoji sequences (👨‍👩‍👧) and Persian or Indic words are written with them
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u2028\u2029\ufeff\ufffd]")
_BLANK_LINES = re.compile(r"\n{3,}")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")


# Unicode normalisation forms of the text (stage 2 writes, stage 1 trains on): NFC by default, as Qwen's tokenizers
# normalise; NFKC also folds compatibility forms, full-width `，？：（）１Ａ` into ASCII, so a Chinese corpus would
# train on (and the model write) ASCII commas, and the full-width punctuation users type would be text it never saw
NORMALIZATIONS = ("NFC", "NFKC", "none")
DEFAULT_NORMALIZATION = "NFC"


def normalize(text: str, form: str = DEFAULT_NORMALIZATION) -> str:
    """Unicode normalisation, control/invisible characters removed, newlines unified, blank-line runs squeezed."""
    if form and form.lower() != "none":
        text = unicodedata.normalize(form.upper(), text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("\n", text)
    return _BLANK_LINES.sub("\n\n", text).strip()


@dataclass
class Filters:
    min_chars: int = 10
    max_chars: int = 200_000  # conversations and pairs
    max_dup_line_frac: float = 0.3  # share of characters on lines that repeat an earlier line (Gopher's rule)
    min_compress_ratio: float = 0.2  # zlib size / raw size; very repetitive text compresses far below real prose
    repetition_min_bytes: int = 256  # short texts compress badly anyway: the ratio is only checked above this

    def reason(self, text: str, pretraining: bool = True) -> str | None:
        """Why the text is dropped ('too_short', 'too_long', 'repetitive'), or None to keep it. A pretraining document
        is never too long (it is packed across rows and counts in full); only it is checked for repetition."""
        if len(text) < self.min_chars:
            return "too_short"
        if not pretraining and len(text) > self.max_chars:
            return "too_long"
        if pretraining and self.is_repetitive(text):
            return "repetitive"
        return None

    def is_repetitive(self, text: str) -> bool:
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        if len(lines) > 2:
            counts: dict[str, int] = {}
            for line in lines:
                counts[line] = counts.get(line, 0) + 1
            # the repeats only, not each line's first time: a song's refrain twice is not a spam page's line
            duplicated = sum(len(line) * (n - 1) for line, n in counts.items() if n > 1)
            if duplicated > self.max_dup_line_frac * sum(len(line) for line in lines):
                return True
        raw = text.encode("utf-8")
        return len(raw) >= self.repetition_min_bytes and len(zlib.compress(raw)) < self.min_compress_ratio * len(raw)


class Deduper:
    """Exact duplicates by content hash; near duplicates by MinHash over character 5-grams with LSH.

    Texts shorter than near_min_chars only get the exact check (a few changed characters in a short templated
    text, e.g. a different number in a question, move its Jaccard similarity a lot but it is a new example).
    `check` does both; `seen_exact`, `wants_minhash` and `seen_near` are its steps, for a caller that computes the
    MinHash values elsewhere (`minhash_values`, in worker processes) and checks them in the input's order.
    """

    def __init__(self, threshold: float = 0.85, num_perm: int = 64, shingle: int = 5, near_min_chars: int = 200,
                 seed: int = 1):
        from datasketch import MinHashLSH  # here: it loads in a second, and only deduplication needs it

        self.exact: set[bytes] = set()
        self.near = MinHashLSH(threshold=threshold, num_perm=num_perm) if threshold < 1 else None
        self.num_perm, self.seed, self.shingle, self.near_min_chars = num_perm, seed, shingle, near_min_chars
        self.count = 0

    def seen_exact(self, text: str) -> bool:
        """Whether the same text came before (else it is remembered)."""
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if digest in self.exact:
            return True
        self.exact.add(digest)
        return False

    def wants_minhash(self, text: str) -> bool:
        return self.near is not None and len(text) >= self.near_min_chars

    def minhash_values(self, text: str) -> np.ndarray:
        return minhash_values(text, self.num_perm, self.seed, self.shingle)

    def seen_near(self, values: np.ndarray) -> bool:
        """Whether a text with these MinHash values is a near duplicate of one before (else it is remembered)."""
        from datasketch import LeanMinHash

        minhash = LeanMinHash(seed=self.seed, hashvalues=values, scheme=_empty_minhash(self.num_perm, self.seed).scheme)
        if self.near.query(minhash):
            return True
        self.near.insert(str(self.count), minhash)
        self.count += 1
        return False

    def check(self, text: str) -> str | None:
        """'exact_dup' / 'near_dup' if seen before (else remember the text and return None)."""
        if self.seen_exact(text):
            return "exact_dup"
        if self.wants_minhash(text) and self.seen_near(self.minhash_values(text)):
            return "near_dup"
        return None


@functools.cache
def _empty_minhash(num_perm: int, seed: int):
    """A MinHash of nothing, copied for each text: its random permutations are drawn once, not per text."""
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=seed)


def minhash_values(text: str, num_perm: int = 64, seed: int = 1, shingle: int = 5) -> np.ndarray:
    """The MinHash of the text's character shingles, case and whitespace runs ignored."""
    text = " ".join(text.lower().split())
    minhash = _empty_minhash(num_perm, seed).copy()
    grams = {text[i: i + shingle] for i in range(max(1, len(text) - shingle + 1))}
    minhash.update_batch([g.encode("utf-8") for g in grams])
    return minhash.hashvalues


def many_minhash_values(texts: list[str], num_perm: int, seed: int, shingle: int) -> list[np.ndarray]:
    """minhash_values of each text: one work item of a process pool."""
    return [minhash_values(text, num_perm, seed, shingle) for text in texts]


def split_of(key: str, val_frac: float, seed: int = 0) -> str:
    """'val' for a stable val_frac share of keys (hash-based, independent of order and machine)."""
    value = int.from_bytes(hashlib.blake2b(f"{seed}|{key}".encode("utf-8"), digest_size=8).digest(), "big")
    return "val" if value / 2**64 < val_frac else "train"


def length_summary(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {"count": 0}
    array = np.asarray(lengths)
    return {"count": int(array.size), "total": int(array.sum()), "mean": round(float(array.mean()), 1),
            "min": int(array.min()), "p50": int(np.percentile(array, 50)), "p95": int(np.percentile(array, 95)),
            "max": int(array.max())}
