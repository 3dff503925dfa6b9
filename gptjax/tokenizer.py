"""Text <-> token ids, on top of Hugging Face `tokenizers`.

Two sources build the same :class:`Tokenizer`:

* the vocabulary embedded in a GGUF file (``tokenizer.ggml.*`` keys), which is turned into a
  `tokenizers` pipeline that reproduces llama.cpp's tokenizer (``src/llama-vocab.cpp``,
  ``src/unicode.cpp``), and
* a Hugging Face ``tokenizer.json`` (plus the ``tokenizer_config.json`` /
  ``generation_config.json`` beside it, when present).

GGUF, ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE, GPT-2 ``encoder.py``)::

    text --Split(regex_1) ... Split(regex_k)--> words        (one regex list per tokenizer.ggml.pre)
         --ByteLevel: byte b -> printable char u(b)--> words over the 256-char byte alphabet
         --BPE: merge the adjacent pair of lowest rank (rank = index in tokenizer.ggml.merges),
                ties to the leftmost pair, until no pair is in the merge list--> ids

  With ``ignore_merges`` (llama3 family) a word that is itself a token is emitted whole.

GGUF, ``tokenizer.ggml.model == "llama"`` (SentencePiece BPE as llama.cpp runs it)::

    text --prepend " " to each text fragment that starts the input or follows an added token
           (add_space_prefix), then " " -> "\u2581"-->
         --start from single characters; merge the adjacent pair whose concatenation is the
           token of highest score (tokenizer.ggml.scores), ties to the leftmost pair-->
         --characters that are no token -> byte tokens <0xXX>--> ids

  `tokenizers` runs merges by rank, so the merge list is derived from the vocabulary: every
  split ``t = a + b`` with both halves in the vocabulary is a merge, ranked by ``-score(t)``.

Special tokens (GGUF ``tokenizer.ggml.token_type``, gguf-py ``TokenType``): CONTROL (3) and
UNKNOWN (2) become *special* added tokens, matched in the text only with ``parse_special=True``
and dropped by ``decode(skip_special=True)``; USER_DEFINED (4) become ordinary added tokens,
always matched whole and always rendered (llama.cpp ``tokenizer_st_partition``).

Decoding is byte-exact: every id maps to a byte string (byte-level: inverse of u(b); SPM:
"\u2581" -> " " and <0xXX> -> the byte; added tokens: their text in UTF-8), the bytes are joined
and decoded as UTF-8 with U+FFFD for invalid sequences. :meth:`Tokenizer.stream_decoder` does
the same incrementally and never emits part of a character.
"""
from __future__ import annotations

import codecs
import json
import os
import re
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from gptjax.errors import FormatError, TokenizerError, UnsupportedModelError

__all__ = ["Tokenizer", "StreamDecoder", "TokenType", "SUPPORTED_GGUF_MODELS",
           "SUPPORTED_GGUF_PRES"]


class TokenType:
    """GGUF token types (gguf-py ``TokenType``; llama.cpp ``llama_token_type``)."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


_SPECIAL_TYPES = (TokenType.CONTROL, TokenType.UNKNOWN)  # matched only with parse_special
_ADDED_TYPES = (TokenType.CONTROL, TokenType.UNKNOWN, TokenType.USER_DEFINED)

# GGUF metadata keys (gguf-py ``Keys.Tokenizer``).
K_MODEL = "tokenizer.ggml.model"
K_PRE = "tokenizer.ggml.pre"
K_TOKENS = "tokenizer.ggml.tokens"
K_TOKEN_TYPE = "tokenizer.ggml.token_type"
K_SCORES = "tokenizer.ggml.scores"
K_MERGES = "tokenizer.ggml.merges"
K_BOS = "tokenizer.ggml.bos_token_id"
K_EOS = "tokenizer.ggml.eos_token_id"
K_EOT = "tokenizer.ggml.eot_token_id"
K_EOM = "tokenizer.ggml.eom_token_id"
K_UNK = "tokenizer.ggml.unknown_token_id"
K_PAD = "tokenizer.ggml.padding_token_id"
K_ADD_BOS = "tokenizer.ggml.add_bos_token"
K_ADD_EOS = "tokenizer.ggml.add_eos_token"
K_ADD_PREFIX = "tokenizer.ggml.add_space_prefix"
K_CHAT_TEMPLATE = "tokenizer.chat_template"

# ---------------------------------------------------------------------------------------------
# Pre-tokenizer regexes per tokenizer.ggml.pre (llama.cpp llm_tokenizer_bpe constructor and the
# pre-name switch of llama_vocab::impl::load). Each entry is a list of regexes applied one after
# the other, every match and every gap between matches becoming its own piece ("isolated").
# `tokenizers` compiles them with Oniguruma, which has lookahead, \p{..} and (?i:..).
# ---------------------------------------------------------------------------------------------

# GPT-2 encoder.py. llama.cpp's hand-written matcher for this regex
# (unicode_regex_split_custom_gpt2) also takes a whitespace run that \s+(?!\S) leaves behind, i.e. the trailing |\s+ alternative.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# llama.cpp's spelling of the case-insensitive contractions (?i:'s|'t|...) in ASCII classes.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2: the llama3 regex with single digits.
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# o200k_base / o200k_harmony (tiktoken) and the Llama-4 tokenizer.json. llama.cpp runs a
# lookahead rewrite of it that treats every non-ASCII letter as both upper and lower case and
# leaves out combining marks (\p{M}); we keep the original, which the models were trained with.
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Mistral tekken (original tokenizer.json regex, same caveat as gpt-4o).
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class _PreTokenizer:
    splits: tuple[str, ...]
    ignore_merges: bool = False  # a word that is a token is emitted whole (llama.cpp ignore_merges)
    add_bos: bool = False  # llama.cpp's default when tokenizer.ggml.add_bos_token is absent


_PRE_GROUPS: tuple[tuple[tuple[str, ...], _PreTokenizer], ...] = (
    (("default",),
     _PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))),
    (("gpt-2", "phi-2", "mpt", "olmo", "jais", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de",
      "gigachat", "exaone4"),
     _PreTokenizer((_GPT2,))),
    (("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral"),
     _PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)),
    (("dbrx", "smaug-bpe"), _PreTokenizer((_LLAMA3,))),
    (("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"), _PreTokenizer((_QWEN2,))),
    (("starcoder", "smollm", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
     _PreTokenizer((r"\p{N}", _GPT2))),
    (("gpt-4o", "llama4", "kanana2", "talkie"), _PreTokenizer((_GPT4O,))),
    (("falcon",), _PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"))),
    (("tekken",), _PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True)),
)
_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {n: spec for names, spec in _PRE_GROUPS for n in names}

SUPPORTED_GGUF_MODELS = ("gpt2", "llama")
SUPPORTED_GGUF_PRES = tuple(sorted(_PRE_TOKENIZERS))

# Token texts llama.cpp takes as end-of-turn when tokenizer.ggml.eot_token_id is absent; we take
# the first one present in this order (llama.cpp takes whichever its hash map yields first).
_EOT_NAMES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]",
              "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>")
# Token texts llama.cpp adds to the end-of-generation set (llama_vocab::impl::load).
_EOG_NAMES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
              "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<\uff5cend\u2581of\u2581sentence\uff5c>")

_SPM_SPACE = "\u2581"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (encoder.py ``bytes_to_unicode``).

    Bytes that are printable Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ') map to themselves; the other 68
    map, in byte order, to U+0100, U+0101, ...
    """
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(0x100 + n)
            n += 1
    return table


_BYTE_DECODER: dict[str, int] = {c: b for b, c in _bytes_to_unicode().items()}


# ---------------------------------------------------------------------------------------------
# metadata validation
# ---------------------------------------------------------------------------------------------

def _as_list(value: Any) -> list | None:
    if isinstance(value, np.ndarray):
        return value.tolist() if value.ndim == 1 else None
    if isinstance(value, (list, tuple)):
        return list(value)
    return None


def _req_str_list(md: Mapping, key: str, source: str) -> list[str]:
    value = md.get(key)
    items = _as_list(value)
    if items is None:
        raise TokenizerError(f"{source}: {key} must be an array of strings, got "
                             f"{type(value).__name__}")
    if not all(isinstance(s, str) for s in items):
        i, s = next((i, s) for i, s in enumerate(items) if not isinstance(s, str))
        raise TokenizerError(f"{source}: {key}[{i}] must be a string, got {type(s).__name__}")
    return items


def _opt_bool(md: Mapping, key: str, source: str) -> bool | None:
    value = md.get(key)
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TokenizerError(f"{source}: {key} must be a bool, got {value!r}")


def _opt_id(md: Mapping, key: str, n_vocab: int, source: str) -> int | None:
    value = md.get(key)
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TokenizerError(f"{source}: {key} must be an integer token id, got {value!r}")
    if not 0 <= int(value) < n_vocab:
        raise TokenizerError(f"{source}: {key} = {int(value)} is out of range for a vocabulary "
                             f"of {n_vocab} tokens")
    return int(value)


def _numeric_array(md: Mapping, key: str, n: int, kind: str, source: str) -> np.ndarray | None:
    value = md.get(key)
    if value is None:
        return None
    items = value if isinstance(value, np.ndarray) else _as_list(value)
    if items is None:
        raise TokenizerError(f"{source}: {key} must be an array of {kind}s, got "
                             f"{type(value).__name__}")
    arr = np.asarray(items)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in ("i", "u", "f")) \
            or (kind == "integer" and arr.size and arr.dtype.kind == "f"):
        raise TokenizerError(f"{source}: {key} must be a flat array of {kind}s")
    if arr.shape[0] != n:
        raise TokenizerError(f"{source}: {key} has {arr.shape[0]} entries but {K_TOKENS} has {n}")
    return arr


def _tokens_and_types(md: Mapping, source: str) -> tuple[list[str], np.ndarray]:
    tokens = _req_str_list(md, K_TOKENS, source)
    if not tokens:
        raise TokenizerError(f"{source}: {K_TOKENS} is empty")
    for i, t in enumerate(tokens):
        if not t:  # llama.cpp renames empty tokens the same way
            tokens[i] = f"[EMPTY_{i}]"
    types_arr = _numeric_array(md, K_TOKEN_TYPE, len(tokens), "integer", source)
    if types_arr is None:
        types = np.full(len(tokens), TokenType.NORMAL, np.int8)
    else:
        bad = np.flatnonzero((types_arr < 0) | (types_arr > TokenType.BYTE))
        if bad.size:
            i = int(bad[0])
            raise TokenizerError(f"{source}: {K_TOKEN_TYPE}[{i}] = {int(types_arr[i])} is not a "
                                 f"token type (0..6)")
        types = types_arr.astype(np.int8)
    return tokens, types


def _vocab_dict(tokens: list[str], source: str) -> dict[str, int]:
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        seen: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if t in seen:
                raise TokenizerError(f"{source}: {K_TOKENS} has {t!r} twice "
                                     f"(ids {seen[t]} and {i})")
            seen[t] = i
    return vocab


def _gguf_merges(md: Mapping, source: str) -> list[tuple[str, str]]:
    if K_MERGES not in md:
        raise TokenizerError(f"{source}: {K_MERGES} is missing (required for a BPE vocabulary)")
    merges = _req_str_list(md, K_MERGES, source)
    pairs = [tuple(m.split(" ")) for m in merges]
    if sum(map(len, pairs)) != 2 * len(pairs):  # some entry has no space, or several
        pairs = []
        for i, m in enumerate(merges):
            p = m.find(" ", 1)  # llama.cpp: the first space after index 0 separates the halves
            if p < 0:
                raise TokenizerError(f"{source}: {K_MERGES}[{i}] = {m!r} is not 'left right'")
            pairs.append((m[:p], m[p + 1:]))
    if len(set(merges)) != len(merges):
        # llama.cpp keeps the first rank of a repeated pair; `tokenizers` would keep the last.
        pairs = list(dict.fromkeys(pairs))
    return pairs


def _check_merges(pairs: list[tuple[str, str]], vocab: Mapping[str, int], source: str) -> None:
    for i, (a, b) in enumerate(pairs):
        for t in (a, b, a + b):
            if t not in vocab:
                raise TokenizerError(f"{source}: {K_MERGES} entry {a + ' ' + b!r} needs token "
                                     f"{t!r}, which is not in {K_TOKENS}")


def _spm_merges(tokens: list[str], scores: np.ndarray, vocab: Mapping[str, int]
                ) -> list[tuple[str, str]]:
    """Merges equivalent to SentencePiece-by-score: every split of a token into two tokens.

    Rank order: higher score of the merged token first, then lower token id, then split position.
    llama.cpp (llm_tokenizer_spm_session) merges the highest-scoring adjacent pair, so ranks that
    follow the score reproduce it; equal scores are the only place the two can differ.
    """
    entries = []
    get = vocab.get
    for i, t in enumerate(tokens):
        for k in range(1, len(t)):
            if get(t[:k]) is not None and get(t[k:]) is not None:
                entries.append((-float(scores[i]), i, k))
    entries.sort()
    return [(tokens[i][:k], tokens[i][k:]) for _, i, k in entries]


def _added_lookup(vocab: Mapping[str, int], types: np.ndarray):
    """token text -> id, for added (CONTROL/UNKNOWN/USER_DEFINED) tokens only.

    llama.cpp matches the end-of-turn / end-of-generation names against every token (and then
    forces the match to CONTROL); we skip ordinary tokens, so that e.g. the plain-text token
    "</s>" of Qwen2's vocabulary does not end generation.
    """
    def lookup(text: str) -> int | None:
        i = vocab.get(text)
        return i if i is not None and types[i] in _ADDED_TYPES else None
    return lookup


def _first_present(names: Iterable[str], lookup) -> int | None:
    for n in names:
        i = lookup(n)
        if i is not None:
            return i
    return None


def _eog_ids(lookup, eos: int | None, eot: int | None, extra: Iterable[int]) -> frozenset[int]:
    """llama.cpp's end-of-generation set: tokens named in _EOG_NAMES, eos, eot and eom.

    gpt-oss (o200k_harmony): when <|return|> and <|call|> are both end-of-generation, <|end|>
    (end of a message, not of the turn) is removed (llama_vocab::impl::load).
    """
    eog = {i for i in (lookup(n) for n in _EOG_NAMES) if i is not None}
    eog.update(i for i in (eos, eot, *extra) if i is not None)
    ret, call, end = lookup("<|return|>"), lookup("<|call|>"), lookup("<|end|>")
    if ret in eog and call in eog and end is not None:
        eog.discard(end)
    return frozenset(eog)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

class Tokenizer:
    """Encoder/decoder for one vocabulary. Build it with :meth:`from_gguf`,
    :meth:`from_gguf_metadata` or :meth:`from_file`; the constructor is internal.

    Attributes: ``vocab_size``; special ids ``bos_id``, ``eos_id``, ``eot_id``, ``eom_id``,
    ``unk_id``, ``pad_id`` (None when the vocabulary has none); ``eog_ids`` (frozenset of ids that
    end generation); ``add_bos`` / ``add_eos`` (what ``encode(add_special=True)`` adds);
    ``chat_template`` (Jinja source or None); ``model`` ("gpt2", "llama" or, for tokenizer.json,
    the HF model type); ``pre`` (GGUF pre-tokenizer name or None); ``source``.
    """

    def __init__(self, tk: tokenizers.Tokenizer, *, source: str, model: str, pre: str | None,
                 decoding: str, token_types: np.ndarray, tokens: list[str] | None,
                 bos_id: int | None, eos_id: int | None, eot_id: int | None,
                 eom_id: int | None, unk_id: int | None, pad_id: int | None,
                 eog_ids: frozenset[int], add_bos: bool, add_eos: bool,
                 strip_leading_space: bool, chat_template: str | None):
        self._tk = tk
        self._lock = threading.Lock()
        self.source = source
        self.model = model
        self.pre = pre
        self._decoding = decoding  # "byte_level" | "spm" | "generic"
        self._types = token_types  # [V] int8 TokenType
        self._tokens = tokens
        self.vocab_size = int(token_types.shape[0])
        self.bos_id, self.eos_id, self.eot_id, self.eom_id = bos_id, eos_id, eot_id, eom_id
        self.unk_id, self.pad_id = unk_id, pad_id
        self.eog_ids = eog_ids
        self.add_bos, self.add_eos = add_bos, add_eos
        self._strip_leading_space = strip_leading_space
        self.chat_template = chat_template
        self._pieces: list[bytes | None] = [None] * self.vocab_size
        self._special = frozenset(np.flatnonzero(np.isin(token_types, _SPECIAL_TYPES)).tolist())
        if add_bos and bos_id is None:
            raise TokenizerError(f"{source}: add_bos is true but there is no BOS token id")
        if add_eos and eos_id is None:
            raise TokenizerError(f"{source}: add_eos is true but there is no EOS token id")

    # ----------------------------------------------------------------------------- builders

    @classmethod
    def from_gguf(cls, gguf_file) -> "Tokenizer":
        """From a :class:`gptjax.formats.gguf.GGUFFile` (or a path, read with ``read_gguf``)."""
        if isinstance(gguf_file, (str, os.PathLike)):
            from gptjax.formats.gguf import read_gguf
            gguf_file = read_gguf(gguf_file)
        return cls.from_gguf_metadata(gguf_file.metadata, source=str(gguf_file.path))

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], source: str = "<gguf metadata>"
                           ) -> "Tokenizer":
        """From GGUF metadata (plain values; arrays as lists or 1-D numpy arrays).

        Raises UnsupportedModelError for an unknown ``tokenizer.ggml.model`` / ``.pre`` and
        TokenizerError for malformed tokenizer keys, naming the key.
        """
        model = metadata.get(K_MODEL)
        if model is None:
            raise TokenizerError(f"{source}: {K_MODEL} is missing; the file has no tokenizer")
        if not isinstance(model, str):
            raise TokenizerError(f"{source}: {K_MODEL} must be a string, got {model!r}")
        if model not in SUPPORTED_GGUF_MODELS:
            raise UnsupportedModelError(
                f"{source}: {K_MODEL} = {model!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_GGUF_MODELS)}")
        pre = metadata.get(K_PRE)
        if pre is not None and not isinstance(pre, str):
            raise TokenizerError(f"{source}: {K_PRE} must be a string, got {pre!r}")

        tokens, types = _tokens_and_types(metadata, source)
        vocab = _vocab_dict(tokens, source)
        n = len(tokens)

        if model == "gpt2":
            if not pre:
                warnings.warn(f"{source}: {K_PRE} is missing; using llama.cpp's 'default' "
                              f"pre-tokenizer (output may differ from the original tokenizer)")
                pre = "default"
            spec = _PRE_TOKENIZERS.get(pre)
            if spec is None:
                raise UnsupportedModelError(
                    f"{source}: {K_PRE} = {pre!r} is not supported; supported: "
                    f"{', '.join(SUPPORTED_GGUF_PRES)}")
            merges = _gguf_merges(metadata, source)
            try:
                bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                 ignore_merges=spec.ignore_merges)
            except Exception as e:  # `tokenizers` raises a bare Exception; find the culprit
                _check_merges(merges, vocab, source)
                raise TokenizerError(f"{source}: {K_TOKENS}/{K_MERGES} rejected: {e}") from e
            tk = tokenizers.Tokenizer(bpe)
            tk.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in spec.splits]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            tk.decoder = decoders.ByteLevel()
            decoding, strip = "byte_level", False
            bos = eos = 11 if n > 11 else None  # llama.cpp's defaults for a BPE vocabulary
            unk = None
            add_bos = spec.add_bos
        else:  # "llama": SentencePiece BPE
            pre = None
            scores = _numeric_array(metadata, K_SCORES, n, "number", source)
            if scores is None:
                raise TokenizerError(f"{source}: {K_SCORES} is missing (required for a "
                                     f"SentencePiece vocabulary)")
            add_prefix = _opt_bool(metadata, K_ADD_PREFIX, source)
            add_prefix = True if add_prefix is None else add_prefix
            unk = _opt_id(metadata, K_UNK, n, source)
            unk = unk if unk is not None else (0 if n > 0 else None)
            merges = _spm_merges(tokens, scores.astype(np.float64), vocab)
            bpe = models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk], fuse_unk=True,
                             byte_fallback=True)
            tk = tokenizers.Tokenizer(bpe)
            norm = [normalizers.Replace(" ", _SPM_SPACE)]
            if add_prefix:
                norm.insert(0, normalizers.Prepend(_SPM_SPACE))
            tk.normalizer = normalizers.Sequence(norm)
            tk.pre_tokenizer = None
            tk.decoder = decoders.Sequence(
                [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                + ([decoders.Strip(" ", 1, 0)] if add_prefix else []))
            decoding, strip = "spm", add_prefix
            bos, eos = (1 if n > 1 else None), (2 if n > 2 else None)  # llama.cpp's defaults
            add_bos = True

        _add_typed_tokens(tk, tokens, types)

        bos = _opt_id(metadata, K_BOS, n, source) if K_BOS in metadata else bos
        eos = _opt_id(metadata, K_EOS, n, source) if K_EOS in metadata else eos
        if model == "gpt2":
            unk = _opt_id(metadata, K_UNK, n, source)
        pad = _opt_id(metadata, K_PAD, n, source)
        eom = _opt_id(metadata, K_EOM, n, source)
        lookup = _added_lookup(vocab, types)
        eot = _opt_id(metadata, K_EOT, n, source)
        if eot is None:
            eot = _first_present(_EOT_NAMES, lookup)
        flag = _opt_bool(metadata, K_ADD_BOS, source)
        add_bos = add_bos if flag is None else flag
        flag = _opt_bool(metadata, K_ADD_EOS, source)
        add_eos = False if flag is None else flag
        template = metadata.get(K_CHAT_TEMPLATE)
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{source}: {K_CHAT_TEMPLATE} must be a string")
        return cls(tk, source=source, model=model, pre=pre, decoding=decoding, token_types=types,
                   tokens=tokens, bos_id=bos, eos_id=eos, eot_id=eot, eom_id=eom, unk_id=unk,
                   pad_id=pad, eog_ids=_eog_ids(lookup, eos, eot, [eom]), add_bos=add_bos,
                   add_eos=add_eos, strip_leading_space=strip, chat_template=template)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """From a Hugging Face ``tokenizer.json``.

        Beside it, ``tokenizer_config.json`` gives bos/eos/pad/unk tokens, ``add_bos_token`` /
        ``add_eos_token`` and ``chat_template`` (or ``chat_template.jinja``), and
        ``generation_config.json`` more end-of-generation ids (``eos_token_id``). Without
        ``add_bos_token`` the tokenizer's post-processor decides: if it puts the BOS token in
        front, add_bos is true.
        """
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                spec = json.load(f)
            tk = tokenizers.Tokenizer.from_file(path)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise FormatError(f"{path}: cannot read tokenizer.json: {e}") from e
        except Exception as e:  # `tokenizers` raises bare Exceptions for bad content
            raise FormatError(f"{path}: not a valid tokenizer.json: {e}") from e
        if not isinstance(spec, dict):
            raise FormatError(f"{path}: tokenizer.json must hold a JSON object")
        folder = os.path.dirname(path)
        config = _read_json_opt(os.path.join(folder, "tokenizer_config.json"))
        gen_config = _read_json_opt(os.path.join(folder, "generation_config.json"))

        vocab = tk.get_vocab(with_added_tokens=True)
        n = max(vocab.values()) + 1 if vocab else 0
        if n == 0:
            raise FormatError(f"{path}: the tokenizer has an empty vocabulary")
        types = np.full(n, TokenType.NORMAL, np.int8)
        used = np.zeros(n, bool)
        used[list(vocab.values())] = True
        types[~used] = TokenType.UNUSED
        for i, added in tk.get_added_tokens_decoder().items():
            types[i] = TokenType.CONTROL if added.special else TokenType.USER_DEFINED

        decoding, strip = _hf_decoding(spec.get("decoder"))
        if decoding == "spm":
            for t, i in vocab.items():
                if types[i] == TokenType.NORMAL and _BYTE_TOKEN.fullmatch(t):
                    types[i] = TokenType.BYTE

        def special_id(name: str) -> int | None:
            value = config.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if value is None:
                return None
            if not isinstance(value, str):
                raise FormatError(f"{folder}/tokenizer_config.json: {name} must be a string")
            i = vocab.get(value)
            if i is None:
                raise FormatError(f"{folder}/tokenizer_config.json: {name} = {value!r} is not "
                                  f"in the vocabulary of {path}")
            return i

        bos, eos = special_id("bos_token"), special_id("eos_token")
        pad, unk = special_id("pad_token"), special_id("unk_token")
        if bos is None and isinstance(gen_config.get("bos_token_id"), int):
            bos = gen_config["bos_token_id"]
        extra = gen_config.get("eos_token_id")
        extra = [extra] if isinstance(extra, int) else [i for i in (extra or []) if
                                                         isinstance(i, int)]
        if eos is None and extra:
            eos = extra[0]
        for name, value in (("bos", bos), ("eos", eos)):
            if value is not None and not 0 <= value < n:
                raise FormatError(f"{folder}: {name} token id {value} is out of range [0, {n})")
        extra = [i for i in extra if 0 <= i < n]

        plain = tk.encode("a", add_special_tokens=False).ids
        full = tk.encode("a", add_special_tokens=True).ids
        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):
            add_bos = bos is not None and len(full) > len(plain) and full[0] == bos
        add_eos = config.get("add_eos_token")
        if not isinstance(add_eos, bool):
            add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos

        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {d.get("name"): d.get("template") for d in template if isinstance(d, dict)}
            template = named.get("default")
        jinja = os.path.join(folder, "chat_template.jinja")
        if template is None and os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                template = f.read()
        if template is not None and not isinstance(template, str):
            raise FormatError(f"{folder}/tokenizer_config.json: chat_template must be a string")

        lookup = _added_lookup(vocab, types)
        eot = _first_present(_EOT_NAMES, lookup)
        model_type = (spec.get("model") or {}).get("type", "unknown")
        return cls(tk, source=path, model=model_type, pre=None, decoding=decoding,
                   token_types=types, tokens=None, bos_id=bos, eos_id=eos, eot_id=eot,
                   eom_id=lookup("<|eom_id|>"), unk_id=unk, pad_id=pad,
                   eog_ids=_eog_ids(lookup, eos, eot, extra), add_bos=add_bos, add_eos=add_eos,
                   strip_leading_space=strip, chat_template=template)

    # ----------------------------------------------------------------------------- encode

    def encode(self, text: str, add_special: bool = False, parse_special: bool = False
               ) -> list[int]:
        """Token ids of ``text``.

        add_special: put BOS in front if ``add_bos`` and EOS at the end if ``add_eos``.
        parse_special: the text of a special (CONTROL/UNKNOWN) token becomes its id; when false
        it is tokenized as plain text. User-defined tokens are always matched whole.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects str, got {type(text).__name__}")
        with self._lock:  # encode_special_tokens is tokenizer-wide state
            self._tk.encode_special_tokens = not parse_special
            ids = self._tk.encode(text, add_special_tokens=False).ids
        if add_special:
            if self.add_bos:
                ids.insert(0, self.bos_id)
            if self.add_eos:
                ids.append(self.eos_id)
        return ids

    # ----------------------------------------------------------------------------- decode

    def _check_id(self, token_id) -> int:
        try:
            i = int(token_id)
        except (TypeError, ValueError):
            raise TokenizerError(f"token id must be an integer, got {token_id!r}") from None
        if i != token_id or not 0 <= i < self.vocab_size:
            raise TokenizerError(f"token id {token_id!r} is out of range [0, {self.vocab_size}) "
                                 f"for {self.source}")
        return i

    def _token_text(self, i: int) -> str:
        if self._tokens is not None:
            return self._tokens[i]
        return self._tk.id_to_token(i) or ""

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token ``token_id`` stands for (special tokens as their text)."""
        i = self._check_id(token_id)
        piece = self._pieces[i]
        if piece is None:
            piece = self._pieces[i] = self._make_piece(i)
        return piece

    def _make_piece(self, i: int) -> bytes:
        kind = int(self._types[i])
        text = self._token_text(i)
        if kind in _ADDED_TYPES:
            return text.encode("utf-8")
        if kind in (TokenType.UNUSED, TokenType.UNDEFINED):
            return b""  # llama.cpp token_to_piece renders nothing for these
        if self._decoding == "byte_level":
            try:
                return bytes(_BYTE_DECODER[c] for c in text)
            except KeyError:  # not spelled in the byte alphabet: take the text as is
                return text.encode("utf-8")
        if self._decoding == "spm":
            if kind == TokenType.BYTE:
                m = _BYTE_TOKEN.fullmatch(text)
                if m:
                    return bytes([int(m.group(1), 16)])
            return text.replace(_SPM_SPACE, " ").encode("utf-8")
        return self._tk.decode([i], skip_special_tokens=False).encode("utf-8")

    def _pieces_of(self, ids: Iterable, skip_special: bool) -> Iterable[bytes]:
        special = self._special
        for t in ids:
            i = self._check_id(t)
            if skip_special and i in special:
                continue
            yield self.token_bytes(i)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``: their bytes joined, decoded as UTF-8 (U+FFFD for invalid bytes).

        skip_special drops CONTROL/UNKNOWN tokens (user-defined ones are always kept). For an
        SPM vocabulary with add_space_prefix, one leading space is removed (the dummy prefix).
        """
        data = b"".join(self._pieces_of(_id_list(ids), skip_special))
        if self._strip_leading_space and data[:1] == b" ":
            data = data[1:]
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = False) -> "StreamDecoder":
        """An incremental decoder: ``push(id)`` returns the newly completed text."""
        return StreamDecoder(self, skip_special)

    # ----------------------------------------------------------------------------- lookups

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of ``token_id`` as stored (e.g. 'Ġhello', '▁hello')."""
        return self._token_text(self._check_id(token_id))

    def token_to_id(self, token: str) -> int | None:
        """The id of vocabulary entry ``token``, or None when it is not in the vocabulary."""
        return self._tk.token_to_id(token)

    def token_type(self, token_id: int) -> int:
        """The :class:`TokenType` of ``token_id``."""
        return int(self._types[self._check_id(token_id)])

    def is_special(self, token_id: int) -> bool:
        """True for CONTROL/UNKNOWN tokens (the ones ``skip_special`` drops)."""
        return self._check_id(token_id) in self._special

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special

    @property
    def hf_tokenizer(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (its ``encode_special_tokens`` flag is managed
        by :meth:`encode`)."""
        return self._tk

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        pre = f", pre={self.pre!r}" if self.pre else ""
        return (f"Tokenizer(model={self.model!r}{pre}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_id}, eos={self.eos_id}, source={self.source!r})")


class StreamDecoder:
    """Incremental detokenizer for one generated sequence.

    ``push(id)`` appends the token's bytes and returns the text completed by them; bytes of a
    character that is still incomplete are held back (Python's incremental UTF-8 decoder, with
    U+FFFD for invalid sequences). The concatenation of every ``push`` and the final ``flush``
    equals ``tokenizer.decode(ids, skip_special)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tok = tokenizer
        self._skip = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip = tokenizer._strip_leading_space
        self._started = False

    def push(self, token_id: int) -> str:
        tok = self._tok
        i = tok._check_id(token_id)
        if self._skip and i in tok._special:
            return ""
        piece = tok.token_bytes(i)
        if not self._started and piece:
            self._started = True
            if self._strip and piece[:1] == b" ":
                piece = piece[1:]
        return self._utf8.decode(piece, final=False)

    def flush(self) -> str:
        """Text of any held-back bytes (as U+FFFD, since they never completed a character)."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out


def _id_list(ids) -> list:
    """ids as a flat list: an int, a sequence, or a 1-D numpy/JAX array ([T])."""
    if isinstance(ids, (int, np.integer)):
        return [ids]
    if hasattr(ids, "__array__") and not isinstance(ids, (list, tuple)):
        arr = np.asarray(ids)
        if arr.ndim > 1:
            raise TokenizerError(f"decode expects a 1-D sequence of token ids, got shape "
                                 f"{arr.shape}")
        if arr.size and arr.dtype.kind not in ("i", "u"):
            raise TokenizerError(f"token ids must be integers, got dtype {arr.dtype}")
        return arr.reshape(-1).tolist()
    return list(ids)


def _add_typed_tokens(tk: tokenizers.Tokenizer, tokens: list[str], types: np.ndarray) -> None:
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i in np.flatnonzero(np.isin(types, _SPECIAL_TYPES)).tolist()]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i in np.flatnonzero(types == TokenType.USER_DEFINED).tolist()]
    if special:
        tk.add_special_tokens(special)
    if user:
        tk.add_tokens(user)


def _hf_decoding(decoder: Any) -> tuple[str, bool]:
    """How to turn a token into bytes, from a tokenizer.json decoder: (kind, strip first space)."""
    if not isinstance(decoder, dict):
        return "generic", False
    kind = decoder.get("type")
    if kind == "ByteLevel":
        return "byte_level", False
    if kind == "Metaspace":
        return "spm", decoder.get("prepend_scheme", "always") != "never" and \
            decoder.get("add_prefix_space", True) is not False
    if kind == "Sequence":
        parts = decoder.get("decoders") or []
        types = [d.get("type") for d in parts if isinstance(d, dict)]
        if "ByteLevel" in types and len(set(types) - {"ByteLevel", "Fuse"}) == 0:
            return "byte_level", False
        replaces_space = any(d.get("type") == "Replace" and d.get("content") == " " and
                             (d.get("pattern") or {}).get("String") == _SPM_SPACE
                             for d in parts if isinstance(d, dict))
        if replaces_space and set(types) <= {"Replace", "ByteFallback", "Fuse", "Strip"}:
            strip = any(d.get("type") == "Strip" and d.get("content") == " " and
                        d.get("start", 0) >= 1 for d in parts if isinstance(d, dict))
            return "spm", strip
    return "generic", False


def _read_json_opt(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(value, dict):
        raise FormatError(f"{path}: must hold a JSON object")
    return value
