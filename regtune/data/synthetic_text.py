"""Generated English-like text for smoke studies and tests (no download).

A tiny grammar with structure a language model can learn: number agreement
between subject and verb ("the cat sits" / "the cats sit"), fixed phrase
templates, counting runs ("one two three four") and wikitext-like headings and
blank lines. Deterministic given the seed. ``write_text_dir`` writes the
``train.txt`` / ``valid.txt`` / ``test.txt`` files that
``regtune.data.text.prepare`` reads, and marks the directory as generated
(``regtune.data.provenance``; ``prepare`` carries the mark into ``meta.json``,
and paper-scale studies refuse such tokens); ``make_smoke_data`` writes and tokenizes
them for every text task's corpus in one call (what a smoke study runs first).

Not from any paper: this only stands in for wikitext / minipile / OpenWebText
in CI-sized runs.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

_NOUNS = ["cat", "dog", "bird", "child", "farmer", "river", "king", "ship", "teacher", "horse", "city", "song"]
_PLURAL = {"child": "children", "city": "cities"}
_VERBS = ["sit", "run", "sing", "wait", "sleep", "work", "fall", "grow"]
_TRANSITIVE = ["see", "follow", "help", "find", "carry", "watch"]
_ADJ = ["old", "small", "red", "quiet", "happy", "dark", "tall", "young"]
_PREP = ["on", "near", "under", "behind", "beside", "with"]
_PLACES = ["the hill", "the market", "the old bridge", "the river bank", "the castle", "the garden"]
_NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _plural(noun: str) -> str:
    return _PLURAL.get(noun, noun + "s")


def _noun_phrase(rng: random.Random, plural: bool) -> str:
    noun = rng.choice(_NOUNS)
    words = ["the"]
    if rng.random() < 0.5:
        words.append(rng.choice(_ADJ))
    words.append(_plural(noun) if plural else noun)
    return " ".join(words)


def _verb(verb: str, plural: bool) -> str:
    if plural:
        return verb
    if verb.endswith(("ch", "sh", "s", "x")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def sentence(rng: random.Random) -> str:
    """One sentence; verbs agree with their subject in number."""
    kind = rng.random()
    plural = rng.random() < 0.5
    subject = _noun_phrase(rng, plural)
    if kind < 0.4:
        return f"{subject} {_verb(rng.choice(_VERBS), plural)} {rng.choice(_PREP)} {rng.choice(_PLACES)} ."
    if kind < 0.75:
        obj = _noun_phrase(rng, rng.random() < 0.5)
        return f"{subject} {_verb(rng.choice(_TRANSITIVE), plural)} {obj} ."
    if kind < 0.9:
        start = rng.randrange(0, 5)
        run = " ".join(_NUMBERS[start:start + rng.randrange(3, 6)])
        return f"{subject} {'count' if plural else 'counts'} {run} ."
    return f"in {rng.choice(_PLACES)} , {subject} {_verb(rng.choice(_VERBS), plural)} ."


def synthetic_lines(n_lines: int, seed: int) -> list[str]:
    """``n_lines`` lines of text (paragraphs, headings, blank lines), newline-terminated."""
    rng = random.Random(seed)
    lines: list[str] = []
    while len(lines) < n_lines:
        r = rng.random()
        if r < 0.08:
            lines.append(f" = The {rng.choice(_ADJ)} {rng.choice(_NOUNS)} = \n")
        elif r < 0.2:
            lines.append(" \n")
        else:
            lines.append(" " + " ".join(sentence(rng) for _ in range(rng.randrange(1, 4))) + " \n")
    return lines


def write_text_dir(directory: str | Path, *, train_lines: int = 2000, val_lines: int = 300,
                   test_lines: int = 300, seed: int = 0) -> Path:
    """Write ``train.txt``, ``valid.txt`` and ``test.txt`` of generated text into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for offset, (name, n) in enumerate((("train.txt", train_lines), ("valid.txt", val_lines),
                                        ("test.txt", test_lines))):
        (directory / name).write_text("".join(synthetic_lines(n, seed * 1000 + offset)), encoding="utf-8")
    from regtune.data.provenance import mark_generated

    mark_generated(directory, by="regtune.data.synthetic_text",
                   what=f"{train_lines} / {val_lines} / {test_lines} lines of generated English-like text (seed {seed})")
    return directory


SMOKE_TOKENIZERS = {
    "wikitext2": "word",
    "wikitext103": "local-bpe",
    "minipile": "local-bpe",
    "openwebtext": "local-bpe",
}


def make_smoke_data(data_dir: str | Path, corpora: Iterable[str] | None = None, *, train_lines: int = 3000,
                    val_lines: int = 400, vocab_size: int = 512, seed: int = 0, log=None) -> dict[str, Path]:
    """Generate text and token files for the smoke presets of the text tasks.

    For each corpus (default: all of ``SMOKE_TOKENIZERS``) writes generated text
    to ``data_dir/<corpus>/text`` and tokenizes it into
    ``data_dir/<corpus>/<tokenizer>`` (``word`` for wikitext2, a locally trained
    byte-level BPE of ``vocab_size`` for the others), exactly where the tasks'
    ``smoke`` size looks. Existing token directories are kept. Returns
    corpus -> token directory.
    """
    from regtune.data.text import prepare, token_dir

    out: dict[str, Path] = {}
    for i, corpus in enumerate(corpora or SMOKE_TOKENIZERS):
        tokenizer = SMOKE_TOKENIZERS[corpus]
        target = token_dir(data_dir, corpus, tokenizer)
        if not (target / "meta.json").exists():
            text = write_text_dir(Path(data_dir) / corpus / "text", train_lines=train_lines, val_lines=val_lines,
                                  test_lines=val_lines, seed=seed + i)
            prepare(corpus, text_dir=text, out_dir=target, tokenizer=tokenizer,
                    vocab_size=vocab_size if tokenizer == "local-bpe" else None, log=log)
        out[corpus] = target
    return out
