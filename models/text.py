"""Report tokenizer: part of the model definition, identical at every site.

The default is a WordPiece vocabulary shipped with the project behind the BERT pipeline
(``radiology_vocab``, also shipped, adds chest radiography's words):
BERT normaliser (lower case, accents stripped), BERT pre-tokenizer, ``[CLS] ... [SEP]``
post-processing. ``scripts/build_report_vocab.py`` builds it from public report terminology
and the synthetic templates - never from site data - and writes the whole pipeline as
``models/assets/report_vocab/tokenizer.json`` (JSON because Flower app bundles carry
``*.json`` but not ``*.txt``). ``load_tokenizer`` reads any local directory holding a
``tokenizer.json`` (Hugging Face layout) or a ``vocab.txt`` (BERT WordPiece); nothing is ever
fetched from a hub.

A job names its tokenizer only by a shipped name (``SHIPPED_TOKENIZERS``) or by the sha256 of
a shipped tokenizer file (``shipped_tokenizer``): a path in a task option would let the
coordinator make a site read a file of its choosing, so it is refused before anything is read.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from torch import Tensor

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEFAULT_TOKENIZER_DIR = ASSETS_DIR / "report_vocab"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")     # looked for in this order
PAD_TOKENS = ("[PAD]", "<pad>")
# Tokenizers shipped with the code, by the name a job may give (closed: never a path).
# radiology_vocab: report_vocab's words plus chest radiography's (scripts/build_report_vocab.py).
SHIPPED_TOKENIZERS: dict[str, Path] = {"report_vocab": DEFAULT_TOKENIZER_DIR,
                                       "radiology_vocab": ASSETS_DIR / "radiology_vocab"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def shipped_tokenizer(name: str | None) -> Path:
    """The directory of the shipped tokenizer a job names (``None`` = the default).

    ``name`` is a key of ``SHIPPED_TOKENIZERS`` or the sha256 of a shipped tokenizer file;
    anything else (a path above all) is refused without touching the filesystem.
    """
    if name is None:
        return DEFAULT_TOKENIZER_DIR
    if isinstance(name, str) and name in SHIPPED_TOKENIZERS:
        return SHIPPED_TOKENIZERS[name]
    if isinstance(name, str) and _SHA256.fullmatch(name):
        for directory in SHIPPED_TOKENIZERS.values():
            if tokenizer_fingerprint(directory) == name:
                return directory
        raise ValueError(f"no shipped tokenizer hashes to {name}; shipped: "
                         f"{', '.join(sorted(SHIPPED_TOKENIZERS))}")
    raise ValueError(f"tokenizer must be a shipped tokenizer's name "
                     f"({', '.join(sorted(SHIPPED_TOKENIZERS))}) or its sha256, got {name!r}: "
                     "a site never reads a path named by the job")


def tokenizer_file(directory: str | Path | None) -> Path:
    """The file a tokenizer directory is loaded from (``None`` = the shipped default)."""
    directory = DEFAULT_TOKENIZER_DIR if directory is None else Path(directory)
    if not directory.is_dir():
        raise ValueError(f"tokenizer directory {str(directory)!r} does not exist; give a local "
                         f"directory with one of {', '.join(TOKENIZER_FILES)}, or null for the "
                         "shipped default vocabulary")
    for name in TOKENIZER_FILES:
        if (directory / name).is_file():
            return directory / name
    raise ValueError(f"tokenizer directory {str(directory)!r} has none of "
                     f"{', '.join(TOKENIZER_FILES)}")


def load_tokenizer(directory: str | Path | None = None) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from a local directory (``None`` = shipped default)."""
    path = tokenizer_file(directory)
    if path.name == "tokenizer.json":
        tokenizer = Tokenizer.from_file(str(path))
    else:
        tokenizer = wordpiece_tokenizer(path)
    configured = _configured_pad(path.parent)
    if pad_id(tokenizer) is None and configured is not None \
            and tokenizer.token_to_id(configured) is not None:
        # e.g. CLIP pads with its end-of-text token, named only in tokenizer_config.json
        tokenizer.enable_padding(pad_id=tokenizer.token_to_id(configured), pad_token=configured)
    if pad_id(tokenizer) is None:
        raise ValueError(f"tokenizer in {str(path.parent)!r} has no padding token "
                         f"({' or '.join(PAD_TOKENS)})")
    return tokenizer


def _configured_pad(directory: Path) -> str | None:
    """The padding token a Hugging Face ``tokenizer_config.json`` beside it names, if any."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        pad = json.loads(path.read_text()).get("pad_token")
    except (json.JSONDecodeError, AttributeError):
        return None
    pad = pad.get("content") if isinstance(pad, dict) else pad
    return pad if isinstance(pad, str) else None


def wordpiece_tokenizer(vocab: Path | list[str]) -> Tokenizer:
    """The BERT WordPiece pipeline around a ``vocab.txt`` (one token per line, id = line)
    or a list of tokens (id = position)."""
    model = (WordPiece.from_file(str(vocab), unk_token="[UNK]") if isinstance(vocab, Path)
             else WordPiece(vocab={token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                      strip_accents=True, lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    if cls is None or sep is None or tokenizer.token_to_id("[UNK]") is None:
        raise ValueError("the WordPiece vocabulary lacks [CLS], [SEP] or [UNK]; a BERT "
                         "vocab.txt lists them")
    tokenizer.post_processor = processors.BertProcessing(("[SEP]", sep), ("[CLS]", cls))
    return tokenizer


def pad_id(tokenizer: Tokenizer) -> int | None:
    """Id of the padding token (the one the tokenizer is set to pad with, else ``[PAD]`` or
    ``<pad>``), or None if the vocabulary has none."""
    if tokenizer.padding:
        return int(tokenizer.padding["pad_id"])
    for token in PAD_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return None


def vocab_size(tokenizer: Tokenizer) -> int:
    """Rows the text tower's embedding needs: every id the tokenizer can emit."""
    return tokenizer.get_vocab_size(with_added_tokens=True)


def tokenizer_fingerprint(directory: str | Path | None = None) -> str:
    """SHA-256 of the tokenizer file: equal fingerprints mean equal tokenization."""
    return hashlib.sha256(tokenizer_file(directory).read_bytes()).hexdigest()


def tokenize(tokenizer: Tokenizer, texts: list[str], max_length: int) -> dict[str, Tensor]:
    """Fixed-length token ids for a list of texts.

    Returns ``input_ids`` and ``attention_mask`` ``[B, max_length]`` (int64) and
    ``truncated [B]`` (bool): texts longer than ``max_length`` tokens lose their end, and
    that is counted rather than hidden.
    """
    # A copy: padding/truncation settings are per call, and the caller's tokenizer is shared.
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.enable_truncation(max_length=max_length)
    pad = pad_id(tok)
    tok.enable_padding(length=max_length, pad_id=pad, pad_token=tok.id_to_token(pad))
    encodings = tok.encode_batch(list(texts))
    if not encodings:
        empty = torch.zeros(0, max_length, dtype=torch.long)
        return {"input_ids": empty, "attention_mask": empty.clone(),
                "truncated": torch.zeros(0, dtype=torch.bool)}
    return {
        "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long),
        "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long),
        "truncated": torch.tensor([bool(e.overflowing) for e in encodings]),
    }


__all__ = ["DEFAULT_TOKENIZER_DIR", "SHIPPED_TOKENIZERS", "load_tokenizer", "shipped_tokenizer", "pad_id", "tokenize", "tokenizer_file",
           "tokenizer_fingerprint", "vocab_size", "wordpiece_tokenizer"]
