"""Tokenized text corpora: tokenize once with ``prepare``, memory-map in every trial.

Used by the language tasks of the IRE paper (Wang et al., NeurIPS 2024,
https://arxiv.org/abs/2405.20763: wikitext-2, wikitext-103, minipile,
OpenWebText) and the CPR paper's GPT-2 run (Franke et al., NeurIPS 2024,
https://arxiv.org/abs/2311.09058: OpenWebText). Layout as in nanoGPT: a token
directory holds ``train.bin``, ``val.bin`` (and ``test.bin`` where the corpus
has one) as flat uint16/uint32 arrays plus ``meta.json`` (vocabulary size,
tokenizer, dtype, end-of-text id, token counts; ``"generated": true`` when the
text came from ``regtune.data.synthetic_text``, see ``regtune.data.provenance``). Trials open them with
``np.memmap``; nothing is tokenized at train time.

Tokenizers:

* ``word``: the classic word-level LM setup (PyTorch ``word_language_model``):
  every line is split on whitespace and ends with ``<eos>`` (blank lines give a
  lone ``<eos>``); the vocabulary is built from the training split only, in
  order of first appearance after ``<unk>`` (id 0) and ``<eos>`` (id 1); words
  of other splits not in it become ``<unk>``. On the hub corpus we read the
  pre-tokenized ``wikitext-2-v1`` (rare words already ``<unk>``; 33,278 types).
* ``gpt2``: the GPT-2 byte-level BPE (50,257 types) from the Hugging Face hub
  (or its local cache); ``<|endoftext|>`` (50256) ends every document.
* ``local-bpe``: a byte-level BPE trained here on the training split with the
  ``tokenizers`` library (``vocab_size`` a parameter); saved as
  ``tokenizer.json``. This is what runs offline (tests, smoke studies).

Sources: ``text_dir`` with ``train.txt``, ``valid.txt`` (and optionally
``test.txt``), or, without it, the public corpus from the hub through the
``datasets`` package (network needed; never used in tests). A local text file
is one stream: BPE encodes it in chunks of lines (lossless for byte-level BPE)
and appends one end-of-text token; hub corpora made of documents (minipile,
OpenWebText) get one after every document, as nanoGPT does. OpenWebText has
only a train split; its validation split is carved out as in nanoGPT
(``test_size=0.0005, seed=2357``).

Batches (``train_starts`` / ``eval_starts`` / ``window_batch``): training draws
``batch_size`` random windows of ``context + 1`` tokens from a generator seeded
by ``(seed, step)``, so the batch of a step is a pure function of the two;
inputs are the first ``context`` tokens of each window and targets the last
``context`` (shifted by one). Evaluation uses fixed windows spread evenly over
the split (non-overlapping), independent of the run seed, so every trial is
scored on the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from regtune.data import DataMissing, store
from regtune.data.provenance import generated_mark
from regtune.space import ConfigError

FORMAT_VERSION = 1
TOKENIZERS = ("word", "gpt2", "local-bpe")
TEXT_FILES = {"train": "train.txt", "val": "valid.txt", "test": "test.txt"}
REQUIRED = ("meta.json", "train.bin", "val.bin")
UNK, EOS, EOT = "<unk>", "<eos>", "<|endoftext|>"
_CHUNK_LINES = 2000  # lines a BPE chunk holds (chunks end at line boundaries)
_BATCH_DOCS = 1000


@dataclass(frozen=True)
class Corpus:
    """A public corpus: where it lives on the hub and how its rows are shaped."""

    name: str
    hub_id: str
    raw_config: str | None  # dataset config of the raw text (BPE)
    word_config: str | None  # pre-tokenized config for the word tokenizer (None: use the raw one)
    hub_splits: Mapping[str, str]  # our split -> hub split; without "val" nanoGPT's split is carved from train
    documents: bool  # rows are documents (end-of-text after each) rather than lines of one stream
    default_tokenizer: str
    doc: str


CORPORA: dict[str, Corpus] = {c.name: c for c in (
    Corpus("wikitext2", "Salesforce/wikitext", "wikitext-2-raw-v1", "wikitext-2-v1",
           {"train": "train", "val": "validation", "test": "test"}, False, "word",
           "WikiText-2 (2M words); word-level for the IRE small transformer"),
    Corpus("wikitext103", "Salesforce/wikitext", "wikitext-103-raw-v1", "wikitext-103-v1",
           {"train": "train", "val": "validation", "test": "test"}, False, "gpt2",
           "WikiText-103 (103M words); IRE LLaMA-60M"),
    Corpus("minipile", "JeanKaddour/minipile", None, None,
           {"train": "train", "val": "validation", "test": "test"}, True, "gpt2",
           "MiniPile (1M documents); IRE LLaMA-119M"),
    Corpus("openwebtext", "Skylion007/openwebtext", None, None, {"train": "train"}, True, "gpt2",
           "OpenWebText (8M documents); IRE LLaMA-229M, CPR GPT-2 small"),
)}


class MissingTokensError(DataMissing):
    """Token files a task needs are not there; the message says how to make them."""


def default_data_dir() -> Path:
    """``$REGTUNE_DATA_DIR``, else ``~/.cache/regtune/data``."""
    return Path(os.environ.get("REGTUNE_DATA_DIR") or Path.home() / ".cache" / "regtune" / "data").expanduser()


def token_dir(data_dir: str | Path | None, corpus: str, tokenizer: str) -> Path:
    """Where ``prepare`` writes and tasks read: ``<data_dir>/<corpus>/<tokenizer>``."""
    return Path(data_dir).expanduser() / corpus / tokenizer if data_dir else default_data_dir() / corpus / tokenizer


# --------------------------------------------------------------------------
# sources: split -> a callable returning a fresh iterator of text pieces
Source = Callable[[], Iterator[str]]


def _read_lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        yield from f


def local_sources(text_dir: str | Path) -> dict[str, Source]:
    """Lines of ``train.txt`` / ``valid.txt`` (/ ``test.txt``) in ``text_dir``."""
    text_dir = Path(text_dir)
    missing = [TEXT_FILES[s] for s in ("train", "val") if not (text_dir / TEXT_FILES[s]).is_file()]
    if missing:
        raise FileNotFoundError(
            f"text directory {text_dir} lacks {', '.join(missing)}: expected train.txt and valid.txt"
            " (test.txt optional), UTF-8, one line of text a line")
    return {split: (lambda p=text_dir / name: _read_lines(p))
            for split, name in TEXT_FILES.items() if (text_dir / name).is_file()}


def hub_sources(spec: Corpus, tokenizer: str) -> dict[str, Source]:  # pragma: no cover - needs the network
    """Rows of the public corpus through ``datasets.load_dataset`` (network or HF cache)."""
    try:
        import datasets
    except ImportError as e:
        raise RuntimeError(
            f"reading {spec.hub_id} from the Hugging Face hub needs the `datasets` package (pip install datasets);"
            " offline, pass --text-dir with train.txt and valid.txt") from e
    config = spec.word_config if tokenizer == "word" and spec.word_config else spec.raw_config
    ds = datasets.load_dataset(spec.hub_id, config) if config else datasets.load_dataset(spec.hub_id)
    splits = dict(spec.hub_splits)
    if "val" not in splits:  # nanoGPT's openwebtext split
        parts = ds["train"].train_test_split(test_size=0.0005, seed=2357, shuffle=True)
        ds, splits = {"train": parts["train"], "val": parts["test"]}, {"train": "train", "val": "val"}
    return {ours: (lambda d=ds[theirs]: (row["text"] for row in d)) for ours, theirs in splits.items()}


# --------------------------------------------------------------------------
# tokenizers
class WordVocab:
    """Word-level vocabulary: ``<unk>`` = 0, ``<eos>`` = 1, then words by first appearance."""

    def __init__(self, itos: Sequence[str] = (UNK, EOS)):
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def add_line(self, line: str) -> None:
        for w in line.split():
            if w not in self.stoi:
                self.stoi[w] = len(self.itos)
                self.itos.append(w)

    def encode_line(self, line: str) -> list[int]:
        unk = self.stoi[UNK]
        return [self.stoi.get(w, unk) for w in line.split()] + [self.stoi[EOS]]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[i] for i in ids]


def train_local_bpe(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style pre-tokenizer, ``<|endoftext|>`` = id 0) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise ConfigError(f"vocab_size={vocab_size!r} is not allowed for local-bpe: expected >= 258 (256 bytes + "
                          "end-of-text + at least one merge)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def gpt2_tokenizer():  # pragma: no cover - needs the network or the HF cache
    """The GPT-2 tokenizer (tokenizer files only, no weights) from the Hugging Face hub."""
    from tokenizers import Tokenizer

    return Tokenizer.from_pretrained("gpt2")


def _chunks(lines: Iterable[str], n: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class _Writer:
    """Append token ids to ``<split>.bin`` (written to a temporary name, renamed on close)."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype, self.count = path, dtype, 0
        self.tmp = path.with_name(path.name + ".tmp")
        self.f = open(self.tmp, "wb")  # noqa: SIM115 (kept open across writes; closed by close())

    def write(self, ids: Sequence[int] | np.ndarray) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self.f.write(arr.tobytes())
        self.count += arr.size

    def close(self) -> int:
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.count


# --------------------------------------------------------------------------
def prepare(
    corpus: str,
    *,
    out_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    text_dir: str | Path | None = None,
    tokenizer: str | None = None,
    vocab_size: int | None = None,
    synthetic_lines: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Tokenize ``corpus`` once into ``out_dir`` (default ``<data_dir>/<corpus>/<tokenizer>``).

    ``text_dir``: local ``train.txt`` / ``valid.txt`` [/ ``test.txt``]; without
    it the public corpus is read from the hub; ``synthetic_lines``: generated
    text of that many training lines instead (smoke runs; kept in ``<out_dir>/text``).
    ``tokenizer``: ``word``, ``gpt2`` or ``local-bpe`` (default: the corpus's own,
    see ``CORPORA``); ``vocab_size`` only for ``local-bpe`` (default 8192).
    The directory is built under a temporary name beside ``out_dir`` and renamed
    into place, under a lock (``regtune.data.store``): a concurrent prepare waits,
    a reader never sees a mixture. Returns the meta dict also written to ``meta.json``.
    """
    log = log or (lambda msg: None)
    if corpus not in CORPORA:
        raise ConfigError(f"corpus={corpus!r} is not allowed: expected one of {', '.join(CORPORA)}")
    spec = CORPORA[corpus]
    tokenizer = tokenizer or spec.default_tokenizer
    if tokenizer not in TOKENIZERS:
        raise ConfigError(f"tokenizer={tokenizer!r} is not allowed: expected one of {', '.join(TOKENIZERS)}")
    if vocab_size is not None and tokenizer != "local-bpe":
        raise ConfigError(f"vocab_size={vocab_size!r} is not allowed with tokenizer {tokenizer!r}: only local-bpe "
                          "takes a vocabulary size")
    out = Path(out_dir) if out_dir else token_dir(data_dir, corpus, tokenizer)
    if text_dir and Path(text_dir).resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"--text-dir {str(text_dir)!r} is not allowed inside the output directory {str(out)!r}, "
                          "which prepare replaces")
    sources = local_sources(text_dir) if text_dir and not synthetic_lines else None
    with store.exclusive(out, log), store.staging(out) as tmp:
        if synthetic_lines:
            from regtune.data.synthetic_text import write_text_dir

            n = max(50, synthetic_lines // 8)
            sources = local_sources(write_text_dir(tmp / "text", train_lines=synthetic_lines, val_lines=n,
                                                   test_lines=n))
            source = f"synthetic:{out.resolve() / 'text'}"
        else:
            source = f"local:{Path(text_dir).resolve()}" if text_dir else f"hub:{spec.hub_id}"
            sources = sources or hub_sources(spec, tokenizer)
        documents = spec.documents and not (text_dir or synthetic_lines)
        read_from = tmp / "text" if synthetic_lines else text_dir
        mark = generated_mark(read_from) if read_from else None
        if mark and not synthetic_lines:  # generated text handed in as --text-dir: paper-scale studies refuse it
            source = f"generated:{Path(text_dir).resolve()}"
        meta = _tokenize(tmp, corpus, tokenizer, vocab_size, sources, documents, source, mark)
        store.publish(tmp, out)
    log(f"prepared {corpus} ({tokenizer}, vocab {meta['vocab_size']:,}) in {out}: "
        + ", ".join(f"{s} {n:,} tokens" for s, n in meta["counts"].items()))
    return meta


def _tokenize(out: Path, corpus: str, tokenizer: str, vocab_size: int | None, sources: dict[str, Source],
              documents: bool, source: str, mark: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the token files of every split and ``meta.json`` into ``out``."""
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "corpus": corpus,
        "tokenizer": tokenizer,
        "source": source,
        "documents": documents,
    }
    if mark:  # generated text (regtune.data.synthetic_text): paper-scale studies refuse it
        meta.update(generated=True, generated_by=mark.get("by", "unknown"))
    counts: dict[str, int] = {}
    if tokenizer == "word":
        vocab = WordVocab()
        for line in sources["train"]():
            vocab.add_line(line)
        dtype = _dtype_for(len(vocab.itos))
        for split, src in sources.items():
            w = _Writer(out / f"{split}.bin", dtype)
            for line in src():
                w.write(vocab.encode_line(line))
            counts[split] = w.close()
        (out / "vocab.json").write_text(json.dumps(vocab.itos, ensure_ascii=False), encoding="utf-8")
        meta.update(vocab_size=len(vocab.itos), eos_id=vocab.stoi[EOS], eos_token=EOS, unk_id=vocab.stoi[UNK],
                    tokenizer_file="vocab.json")
    else:
        if tokenizer == "gpt2":
            tok = gpt2_tokenizer()
        else:
            tok = train_local_bpe(sources["train"](), vocab_size or 8192)
        tok.save(str(out / "tokenizer.json"))
        eot = tok.token_to_id(EOT)
        dtype = _dtype_for(tok.get_vocab_size())
        for split, src in sources.items():
            w = _Writer(out / f"{split}.bin", dtype)
            if documents:
                for batch in _chunks(src(), _BATCH_DOCS):
                    for enc in tok.encode_batch(batch):
                        w.write(enc.ids + [eot])
            else:
                for batch in _chunks(("".join(c) for c in _chunks(src(), _CHUNK_LINES)), 16):
                    for enc in tok.encode_batch(batch):
                        w.write(enc.ids)
                w.write([eot])
            counts[split] = w.close()
        meta.update(vocab_size=tok.get_vocab_size(), eos_id=eot, eos_token=EOT, tokenizer_file="tokenizer.json")
    meta.update(dtype=dtype.name, counts=counts)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def tokens_problem(directory: str | Path, *, tokens: int = 1) -> str | None:
    """What is wrong with a prepared token directory for a task reading windows of ``tokens`` tokens, or None:
    ``meta.json``, every split file with the size ``meta.json`` promises, train and val long enough. Stats only."""
    directory = Path(directory)
    missing = [name for name in REQUIRED if not (directory / name).is_file()]
    if missing:
        return f"missing {directory}/{{{', '.join(missing)}}}"
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        itemsize = np.dtype(meta["dtype"]).itemsize
        counts = {k: int(v) for k, v in meta["counts"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{directory}/meta.json is unreadable ({type(e).__name__})"
    for split, count in counts.items():
        path = directory / f"{split}.bin"
        size = path.stat().st_size if path.is_file() else 0
        if size != count * itemsize:
            return f"{path} holds {size} bytes, meta.json promises {count * itemsize}"
    for split in ("train", "val"):
        if counts.get(split, 0) < tokens:
            return f"{directory}: the {split} split has {counts.get(split, 0)} tokens, a window needs {tokens}"
    return None


# --------------------------------------------------------------------------
@dataclass
class TokenData:
    """Memory-mapped token splits of one prepared directory."""

    directory: Path
    meta: dict[str, Any]
    splits: dict[str, np.ndarray]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])


def prepare_hint(corpus: str, tokenizer: str, directory: Path) -> str:
    return (f"python -m studies prepare {corpus} --tokenizer {tokenizer} --out-dir {directory}"
            " [--text-dir DIR holding train.txt and valid.txt; without it the corpus is downloaded]")


def load_tokens(directory: str | Path, *, corpus: str = "CORPUS", tokenizer: str = "TOKENIZER") -> TokenData:
    """Open a prepared token directory; ``MissingTokensError`` names what is missing and how to make it."""
    directory = Path(directory)
    missing = [name for name in REQUIRED if not (directory / name).is_file()]
    if missing:
        raise MissingTokensError(
            f"no prepared {corpus!r} tokens ({tokenizer}) in {directory}: missing {', '.join(missing)}"
            f" (expected {', '.join(REQUIRED)}, optionally test.bin); create them with: "
            + prepare_hint(corpus, tokenizer, directory))
    meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    dtype = np.dtype(meta["dtype"])
    splits = {}
    for split, count in meta["counts"].items():
        path = directory / f"{split}.bin"
        if not path.is_file() or path.stat().st_size != count * dtype.itemsize:
            raise MissingTokensError(
                f"{path} does not hold the {count:,} {dtype.name} tokens meta.json promises; re-create with: "
                + prepare_hint(corpus, tokenizer, directory))
        splits[split] = np.memmap(path, dtype=dtype, mode="r", shape=(count,))
    return TokenData(directory, meta, splits)


def train_starts(n_tokens: int, context: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Start offsets of the training windows of ``step``: a pure function of ``(seed, step)``."""
    if n_tokens < context + 1:
        raise ConfigError(f"context={context!r} is not allowed: the training split has only {n_tokens} tokens")
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_tokens - context, size=batch_size)


def eval_starts(n_tokens: int, context: int, n_windows: int | None) -> np.ndarray:
    """Fixed, non-overlapping evaluation windows spread evenly over a split (all of them if ``None``)."""
    available = (n_tokens - 1) // context
    if available < 1:
        raise ConfigError(f"context={context!r} is not allowed: the split has only {n_tokens} tokens")
    n = available if n_windows is None else min(n_windows, available)
    if n == available:
        return np.arange(n, dtype=np.int64) * context
    return np.linspace(0, n_tokens - context - 1, n).round().astype(np.int64)


def window_batch(tokens: np.ndarray, starts: np.ndarray, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` [B, T] int64: windows ``tokens[s:s+T]`` and ``tokens[s+1:s+T+1]``."""
    idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(context + 1)
    windows = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return windows[:, :-1], windows[:, 1:]


# --------------------------------------------------------------------------
def prepare_main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m studies prepare CORPUS [--text-dir D] [--out-dir D] [--tokenizer T] ...``."""
    p = argparse.ArgumentParser(
        prog="python -m studies prepare",
        description="Tokenize a text corpus once into train.bin / val.bin [/ test.bin] + meta.json.")
    p.add_argument("corpus", choices=sorted(CORPORA), help="corpus name")
    p.add_argument("--text-dir", help="local text: a directory with train.txt, valid.txt [, test.txt]; "
                   "without it the public corpus is downloaded (needs `datasets` and the network)")
    p.add_argument("--out-dir", help="where the token files go (default: <data-dir>/<corpus>/<tokenizer>)")
    p.add_argument("--data-dir", help="root of the data dir (default: $REGTUNE_DATA_DIR or ~/.cache/regtune/data)")
    p.add_argument("--tokenizer", choices=TOKENIZERS,
                   help="word (vocabulary of the train split), gpt2 (hub tokenizer) or local-bpe (trained here); "
                        "default: word for wikitext2, gpt2 otherwise")
    p.add_argument("--vocab-size", type=int, help="vocabulary size of local-bpe (default 8192)")
    p.add_argument("--synthetic-lines", type=int,
                   help="generate this many lines of synthetic training text (smoke runs) instead of reading any")
    args = p.parse_args(argv)
    try:
        prepare(args.corpus, out_dir=args.out_dir, data_dir=args.data_dir, text_dir=args.text_dir,
                tokenizer=args.tokenizer, vocab_size=args.vocab_size, synthetic_lines=args.synthetic_lines, log=print)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}")
        return 2
    return 0
