"""Chat prompts: Jinja chat templates as Hugging Face renders them, and gpt-oss's harmony format.

Two halves, both text-only (no tokenizer import: callers pass the template string and the special
token strings they need).

**Templates.** :func:`render_chat` renders a model's chat template the way HF transformers'
``tokenizer.apply_chat_template(messages, tokenize=False)`` does (documented in the transformers
"Chat templates" guide; behaviour checked against transformers 5.x in tests/test_chat.py):

* jinja2's ``ImmutableSandboxedEnvironment`` (a template from a downloaded file is untrusted code;
  it cannot touch Python internals or mutate its inputs), ``trim_blocks=True``,
  ``lstrip_blocks=True`` and the ``loopcontrols`` extension (``{% break %}``, ``{% continue %}``);
* the ``{% generation %}...{% endgeneration %}`` tag, rendered as its body (HF uses it to mark
  assistant tokens for training masks; templates that contain it must still render here);
* globals ``raise_exception(msg)`` (aborts rendering with ``msg``) and ``strftime_now(fmt)``
  (local time, ``datetime.now().strftime(fmt)``; pin it with ``now=``);
* the ``tojson`` filter as ``json.dumps(x, ensure_ascii=False, indent=None, separators=None,
  sort_keys=False)`` with those options available to the template (jinja's own filter would
  HTML-escape ``<``, ``>``, ``&`` and ``'``);
* variables ``messages``, ``tools``, ``documents`` (None unless given), ``add_generation_prompt``,
  ``bos_token``, ``eos_token`` and any extra keyword (``reasoning_effort``, ``model_identity``,
  ``builtin_tools``, ``enable_thinking``, ...);
* messages are copied first; keys whose value is None are dropped (OpenAI-style ``content=None``
  beside ``tool_calls`` would otherwise render as "None"), and reasoning given under any of
  ``reasoning_content``, ``thinking`` or ``reasoning`` is made visible under both ``thinking``
  (which the gpt-oss template reads) and ``reasoning_content``, as transformers 5 does.

Differences from transformers, on purpose: ``bos_token``/``eos_token`` default to "" (transformers
leaves a token the tokenizer lacks undefined); ``tools`` must be JSON-schema dicts (transformers also
converts Python functions); messages, tools and extra values must be plain JSON-like data (dict, list,
tuple, str, int, float, bool, None) and the message list must be non-empty, else
:class:`~gptjax.errors.ChatTemplateError` names the offending entry.

**Which template.** :func:`select_chat_template` takes the file's own template
(GGUF ``tokenizer.chat_template`` or tokenizer_config.json ``chat_template``).  A file without one is
an error by default: guessing a format silently produces prompts the model was never trained on.
Two exceptions: gpt-oss files get OpenAI's harmony template bundled in ``gptjax/templates/
gpt_oss.jinja`` (gpt-oss only knows harmony, so nothing is guessed), and ``fallback="chatml"`` opts
in to :data:`CHATML_TEMPLATE`, a generic ``<|im_start|>role\\ncontent<|im_end|>\\n`` format.

**Harmony.** gpt-oss speaks OpenAI's harmony format (MODEL_FORMATS.md §7; openai/harmony
``docs/format.md``): every message is ``<|start|>{header}<|message|>{content}{end}`` where the header
is a role, optionally ``<|channel|>analysis|commentary|final``, a recipient ``to=functions.NAME`` and a
content type (``<|constrain|>json``), and ``{end}`` is ``<|end|>``, ``<|return|>`` (end of the
assistant's turn) or ``<|call|>`` (a tool call).  :func:`render_harmony` builds the prompt (ending in
``<|start|>assistant``); generation stops at :data:`HARMONY_STOP_TOKENS`; :func:`parse_harmony` and
:class:`HarmonyStreamParser` split the completion into reasoning, commentary, tool calls and the
final answer so that no markup reaches the user.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import importlib.resources
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

from gptjax.errors import ChatTemplateError

__all__ = [
    "CHATML_TEMPLATE",
    "HARMONY_STOP_TOKENS",
    "HarmonyEvent",
    "HarmonyMessage",
    "HarmonyResult",
    "HarmonyStreamParser",
    "ToolCall",
    "gpt_oss_template",
    "harmony_stop_ids",
    "parse_harmony",
    "render_chat",
    "render_harmony",
    "select_chat_template",
]

# ------------------------------------------------------------------------------------------------
# Template environment
# ------------------------------------------------------------------------------------------------

# jinja2 < 3.1.6 has known sandbox escapes (CVE-2024-56201, CVE-2024-56326, CVE-2025-27516), and a
# chat template read from a downloaded file is untrusted code.
_MIN_JINJA = (3, 1, 6)


def _jinja_version() -> tuple[int, ...]:
    parts = []
    for p in jinja2.__version__.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _raise_exception(message: Any) -> None:
    """``raise_exception(msg)`` in a template: stop rendering with the template's own message."""
    raise jinja2.exceptions.TemplateError(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """The ``tojson`` filter of HF chat templates: plain ``json.dumps`` (no HTML escaping), with
    ``ensure_ascii=False`` by default so that non-ASCII text is kept as is."""
    if isinstance(separators, list):      # json.dumps wants a tuple; a Jinja list literal is a list
        separators = tuple(separators)
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _clock_strftime(fmt: str) -> str:
    return _dt.datetime.now().strftime(fmt)


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}body{% endgeneration %}`` renders ``body`` unchanged, in its own scope (the
    body is a call block, i.e. a macro, as in transformers, so ``set`` inside does not leak out)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses attribute names starting with "_" (the sandbox already hides
    such names on reads; this closes the write side as well)."""

    def __init__(*args, **kwargs):       # jinja's own signature trick: `self` may be a kwarg name
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for key in attrs:
            _Namespace._check(key)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, key, value):
        _Namespace._check(key)
        jinja2.utils.Namespace.__setitem__(self, key, value)

    @staticmethod
    def _check(key):
        if isinstance(key, str) and key.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"a namespace attribute may not start with '_' (got {key!r})")


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    if _jinja_version() < _MIN_JINJA:
        raise ChatTemplateError(
            f"chat templates need jinja2 >= {'.'.join(map(str, _MIN_JINJA))} (older versions have "
            f"sandbox escapes); found jinja2 {jinja2.__version__}: pip install -U jinja2")
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _clock_strftime
    env.globals["namespace"] = _Namespace
    return env


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(
            f"chat template does not compile: line {e.lineno}: {e.message}") from None


def _template_line(exc: BaseException) -> int | None:
    """The template line being rendered when ``exc`` was raised (jinja maps its generated code back
    to the template's lines in the traceback, under the file name "<template>")."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


# ------------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------------

_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _plain(value: Any, where: str) -> Any:
    """A deep copy of ``value`` made only of dict/list/tuple/str/int/float/bool/None (subclasses,
    e.g. enums, reduced to the base type), so the template sees data and nothing else."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ChatTemplateError(f"{where}: dict keys must be str, got {k!r}")
            out[str.__str__(k)] = _plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, list):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise ChatTemplateError(
        f"{where}: expected JSON-like data (dict, list, str, int, float, bool, None), "
        f"got {type(value).__name__}")


def _check_messages(messages: Any) -> list[dict]:
    """Validate the chat and return a plain copy in the form templates receive it."""
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(
            f"messages: expected a list of dicts like {{'role': 'user', 'content': 'Hi'}}, "
            f"got {type(messages).__name__}")
    if not messages:
        raise ChatTemplateError("messages: the chat is empty; give at least one message")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise ChatTemplateError(f"{where}: expected a dict with 'role' and 'content', "
                                    f"got {type(msg).__name__}")
        # Drop None values first: OpenAI-style {"content": None, "tool_calls": [...]} means "no content".
        msg = {k: v for k, v in msg.items() if v is not None}
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise ChatTemplateError(f"{where}['role']: expected a non-empty str, got {role!r}")
        tool_calls = msg.get("tool_calls")
        if tool_calls is not None:
            if not isinstance(tool_calls, (list, tuple)) or not all(
                    isinstance(c, Mapping) for c in tool_calls):
                raise ChatTemplateError(
                    f"{where}['tool_calls']: expected a list of dicts like {{'type': 'function', "
                    f"'function': {{'name': ..., 'arguments': {{...}}}}}}, got {tool_calls!r}")
        if "content" not in msg:
            if tool_calls is None:
                raise ChatTemplateError(
                    f"{where} (role {role!r}): 'content' is missing (only a message with "
                    f"'tool_calls' may leave it out)")
        else:
            content = msg["content"]
            if isinstance(content, (list, tuple)):
                for j, part in enumerate(content):
                    if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
                        raise ChatTemplateError(
                            f"{where}['content'][{j}]: expected a part like "
                            f"{{'type': 'text', 'text': ...}}, got {part!r}")
            elif not isinstance(content, str):
                raise ChatTemplateError(
                    f"{where}['content']: expected a str or a list of parts, "
                    f"got {type(content).__name__}")
        msg = _plain(msg, where)
        reasoning = next((msg[k] for k in _REASONING_KEYS if k in msg), None)
        if reasoning is not None:
            # Same key order as transformers 5 (visible to templates that iterate a message's items).
            aliased = {"thinking": reasoning}
            aliased.update(msg)
            aliased["reasoning_content"] = reasoning
            msg = aliased
        out.append(msg)
    return out


def _check_tools(tools: Any) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise ChatTemplateError(
            f"tools: expected a list of JSON-schema dicts, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ChatTemplateError(
                f"tools[{i}]: expected a JSON-schema dict like {{'type': 'function', 'function': "
                f"{{'name': ..., 'description': ..., 'parameters': {{...}}}}}}, "
                f"got {type(tool).__name__}")
    return [_plain(t, f"tools[{i}]") for i, t in enumerate(tools)]


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------

def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", tools: list[dict] | None = None,
                now: _dt.datetime | None = None, **extra: Any) -> str:
    """Render ``messages`` with the Jinja chat ``template`` exactly as transformers'
    ``apply_chat_template(messages, tokenize=False, ...)`` does (see the module docstring).

    Args:
      template: the template source (GGUF ``tokenizer.chat_template``, tokenizer_config.json
        ``chat_template``, or :func:`select_chat_template`'s choice).
      messages: ``[{"role": str, "content": str | [{"type": "text", "text": str}, ...]}, ...]``;
        an assistant message may carry ``tool_calls`` (and then may omit ``content``) and reasoning
        under ``thinking`` / ``reasoning_content``.
      add_generation_prompt: end with the header of an assistant turn, ready for generation.
      bos_token, eos_token: the special-token strings the template may print.
      tools: JSON-schema tool definitions (``{"type": "function", "function": {...}}``).
      now: the time ``strftime_now`` reports (default: the local clock at render time); pass a fixed
        datetime for reproducible prompts, e.g. the gpt-oss "Current date:" line.
      **extra: further template variables (``reasoning_effort``, ``model_identity``, ...); they win
        over the defaults above, as in transformers.

    Returns the prompt text; special tokens appear in it as text, so encode it with special-token
    parsing on.  Raises :class:`ChatTemplateError` for a bad template, a template that raises (its own
    message, e.g. from ``raise_exception``, and the template line), or malformed messages.
    """
    if not isinstance(template, str):
        raise ChatTemplateError(f"chat template: expected a str, got {type(template).__name__}")
    msgs = _check_messages(messages)
    tool_list = _check_tools(tools)
    variables: dict[str, Any] = {
        "messages": msgs,
        "tools": tool_list,
        "documents": None,
        "add_generation_prompt": bool(add_generation_prompt),
        "bos_token": bos_token,
        "eos_token": eos_token,
    }
    if now is not None:
        if not isinstance(now, _dt.datetime):
            raise ChatTemplateError(f"now: expected a datetime.datetime, got {type(now).__name__}")
        variables["strftime_now"] = now.strftime
    for key, value in extra.items():
        variables[key] = _plain(value, key)
    compiled = _compile(template)
    try:
        return compiled.render(**variables)
    except jinja2.exceptions.TemplateError as e:
        line = _template_line(e)
        at = f" (template line {line})" if line is not None else ""
        raise ChatTemplateError(f"chat template error{at}: {e}") from e
    except Exception as e:        # the template is code: any failure of it is a template failure
        line = _template_line(e)
        at = f" (template line {line})" if line is not None else ""
        raise ChatTemplateError(
            f"chat template failed{at}: {type(e).__name__}: {e}") from e


# ------------------------------------------------------------------------------------------------
# Which template
# ------------------------------------------------------------------------------------------------

#: A generic ChatML template (``<|im_start|>{role}\n{content}<|im_end|>\n`` per message, then
#: ``<|im_start|>assistant\n``), used only when asked for with ``fallback="chatml"``.  Content given as
#: a list of parts renders its text parts in order.  Its markers are special tokens only in vocabularies
#: that define them (SmolLM2, Qwen2, ...); in others they are plain text the model never saw in training.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] }}"
    "{%- elif message['content'] is defined %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_FALLBACKS = ("chatml",)


@functools.lru_cache(maxsize=1)
def gpt_oss_template() -> str:
    """OpenAI's harmony chat template for gpt-oss (Apache-2.0, see the header of
    gptjax/templates/gpt_oss.jinja), bundled as package data."""
    return (importlib.resources.files("gptjax") / "templates" / "gpt_oss.jinja").read_text("utf-8")


def select_chat_template(file_template: str | None, *, arch: str | None = None,
                         fallback: str | None = None, source: str = "the model file") -> str:
    """The chat template to use for a model.

    1. ``file_template`` when it is a non-empty string (the file's own template always wins);
    2. for ``arch == "gpt-oss"``: the bundled OpenAI harmony template (:func:`gpt_oss_template`);
    3. ``fallback="chatml"``: :data:`CHATML_TEMPLATE`;
    4. otherwise :class:`ChatTemplateError` naming ``source`` and the ways out.
    """
    if file_template is not None and not isinstance(file_template, str):
        raise ChatTemplateError(
            f"{source}: chat template must be a str, got {type(file_template).__name__}")
    if file_template and file_template.strip():
        return file_template
    if arch == "gpt-oss":
        return gpt_oss_template()
    if fallback == "chatml":
        return CHATML_TEMPLATE
    if fallback is not None:
        raise ChatTemplateError(f"fallback: expected None or one of {_FALLBACKS}, got {fallback!r}")
    raise ChatTemplateError(
        f"{source} has no chat template (GGUF key 'tokenizer.chat_template' / tokenizer_config.json "
        f"'chat_template'); pass a template string explicitly, or fallback='chatml' to use a generic "
        f"ChatML template (only right for models trained on ChatML), or use plain-text prompts")


# ------------------------------------------------------------------------------------------------
# Harmony: prompt and stop tokens
# ------------------------------------------------------------------------------------------------

#: Tokens that end an assistant generation in harmony: ``<|return|>`` (turn over) and ``<|call|>``
#: (tool call; run the tool, append its result, generate again).  openai/harmony ``registry.rs``
#: ``stop_tokens_for_assistant_actions``; ids 200002 and 200012 in o200k_harmony.
HARMONY_STOP_TOKENS = ("<|return|>", "<|call|>")

_REASONING_EFFORTS = ("low", "medium", "high")


def harmony_stop_ids(token_to_id: Callable[[str], int | None] | Mapping[str, int]) -> frozenset[int]:
    """Ids of :data:`HARMONY_STOP_TOKENS` in a vocabulary (``Tokenizer.token_to_id`` or a dict);
    ChatTemplateError when the vocabulary lacks one (then it is not a harmony vocabulary)."""
    lookup = token_to_id.get if isinstance(token_to_id, Mapping) else token_to_id
    ids = []
    for tok in HARMONY_STOP_TOKENS:
        i = lookup(tok)
        if i is None:
            raise ChatTemplateError(
                f"vocabulary has no {tok!r} token: not a harmony (gpt-oss) vocabulary")
        ids.append(int(i))
    return frozenset(ids)


def render_harmony(messages: list[dict], *, template: str | None = None,
                   reasoning_effort: str = "medium", tools: list[dict] | None = None,
                   model_identity: str | None = None, builtin_tools: Sequence[str] | None = None,
                   add_generation_prompt: bool = True, now: _dt.datetime | None = None,
                   **extra: Any) -> str:
    """A gpt-oss prompt: :func:`render_chat` with ``template`` (the file's) or the bundled OpenAI
    template, passing ``reasoning_effort`` (low | medium | high, written into the system message as
    "Reasoning: ..."), and ``model_identity`` / ``builtin_tools`` (``"browser"``, ``"python"``) when
    given.  The system message's "Current date:" comes from ``now`` (default: today).

    Assistant turns in the history carry their reasoning under ``thinking`` and tool calls as
    ``tool_calls=[{"type": "function", "function": {"name": ..., "arguments": {...}}}]`` with
    ``arguments`` a dict (the template JSON-encodes it; a str would be encoded as a JSON string), and
    tool results as ``{"role": "tool", "content": str}`` (:meth:`HarmonyResult.assistant_message`
    produces the assistant side).
    """
    if reasoning_effort not in _REASONING_EFFORTS:
        raise ChatTemplateError(
            f"reasoning_effort: expected one of {_REASONING_EFFORTS}, got {reasoning_effort!r}")
    if model_identity is not None:
        extra["model_identity"] = model_identity
    if builtin_tools is not None:
        extra["builtin_tools"] = list(builtin_tools)
    return render_chat(template if template else gpt_oss_template(), messages,
                       add_generation_prompt=add_generation_prompt, tools=tools, now=now,
                       reasoning_effort=reasoning_effort, **extra)


# ------------------------------------------------------------------------------------------------
# Harmony: parsing completions
# ------------------------------------------------------------------------------------------------

_START, _END, _MESSAGE = "<|start|>", "<|end|>", "<|message|>"
_CHANNEL, _CONSTRAIN = "<|channel|>", "<|constrain|>"
_RETURN, _CALL, _EOT = "<|return|>", "<|call|>", "<|endoftext|>"
_END_MARKERS = frozenset({_END, _RETURN, _CALL, _EOT})
# Special tokens with no role in a completion: dropped wherever they appear.
_IGNORED_MARKERS = frozenset({"<|startoftext|>", "<|endofprompt|>"})
_MARKERS = frozenset({_START, _MESSAGE, _CHANNEL, _CONSTRAIN}) | _END_MARKERS | _IGNORED_MARKERS
_RESERVED_PREFIX = "<|reserved_"          # <|reserved_200000|> ... <|reserved_201087|>: dropped too
_MAX_RESERVED_DIGITS = 12


def _reserved_len(s: str, i: int) -> int:
    """Length of a complete ``<|reserved_DIGITS|>`` marker at ``s[i:]``, else 0."""
    if not s.startswith(_RESERVED_PREFIX, i):
        return 0
    j = i + len(_RESERVED_PREFIX)
    k = j
    while k < len(s) and s[k].isdigit() and k - j < _MAX_RESERVED_DIGITS:
        k += 1
    return k + 2 - i if k > j and s.startswith("|>", k) else 0


def _may_become_marker(s: str) -> bool:
    """True when ``s`` (starting with "<") is a proper prefix of some marker: more text could
    complete it, so it must not be shown yet."""
    if any(m.startswith(s) for m in _MARKERS) or _RESERVED_PREFIX.startswith(s):
        return True
    if s.startswith(_RESERVED_PREFIX):
        tail = s[len(_RESERVED_PREFIX):]
        if tail.endswith("|"):
            tail = tail[:-1]
        return 0 < len(tail) <= _MAX_RESERVED_DIGITS and tail.isdigit()
    return False


class _Scanner:
    """Splits streamed text into text pieces and markers, holding back any tail that could still
    become a marker (so "<|" of "<|end|>" is never reported as text)."""

    def __init__(self):
        self._buf = ""

    def push(self, chunk: str, final: bool = False) -> list[tuple[bool, str]]:
        s = self._buf + chunk
        out: list[tuple[bool, str]] = []          # (is_marker, text)
        i = 0
        while i < len(s):
            j = s.find("<", i)
            if j < 0:
                out.append((False, s[i:]))
                i = len(s)
                break
            if j > i:
                out.append((False, s[i:j]))
            marker = next((m for m in _MARKERS if s.startswith(m, j)), None)
            if marker is not None:
                out.append((True, marker))
                i = j + len(marker)
                continue
            n = _reserved_len(s, j)
            if n:
                out.append((True, s[j:j + n]))
                i = j + n
                continue
            if not final and _may_become_marker(s[j:]):
                i = j
                break                               # hold s[j:] until more text decides it
            out.append((False, "<"))
            i = j + 1
        self._buf = s[i:]
        merged: list[tuple[bool, str]] = []          # adjacent text pieces as one
        for item in out:
            if merged and not item[0] and not merged[-1][0]:
                merged[-1] = (False, merged[-1][1] + item[1])
            else:
                merged.append(item)
        return merged


class HarmonyEvent(NamedTuple):
    """A piece of message content as it streams: ``channel`` is the header's channel ("final" when
    the header names none), ``recipient`` is set for tool calls (e.g. "functions.get_weather")."""

    channel: str
    text: str
    recipient: str | None = None


@dataclasses.dataclass(frozen=True)
class HarmonyMessage:
    """One harmony message of a completion.

    ``channel``, ``recipient`` and ``content_type`` are as the header spelled them (None when absent);
    ``end`` is the marker that closed the message (``<|end|>``, ``<|return|>``, ``<|call|>`` or
    ``<|endoftext|>``), or None when the output stopped inside it or a new message began without one.
    """

    role: str
    channel: str | None
    recipient: str | None
    content_type: str | None
    content: str
    end: str | None


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A call the assistant addressed to a tool: ``name`` is the recipient without its "functions."
    namespace (builtin tools keep theirs, e.g. "browser.search"); ``arguments`` is the raw text
    (JSON when ``content_type`` is "json")."""

    name: str
    arguments: str
    channel: str | None
    recipient: str
    content_type: str | None = None

    def parsed_arguments(self) -> Any:
        """``arguments`` decoded as JSON; ChatTemplateError when it is not valid JSON."""
        try:
            return json.loads(self.arguments)
        except json.JSONDecodeError as e:
            raise ChatTemplateError(
                f"tool call {self.recipient!r}: arguments are not valid JSON ({e}): "
                f"{self.arguments[:200]!r}") from None


@dataclasses.dataclass(frozen=True)
class HarmonyResult:
    """A parsed completion.

    ``reasoning`` joins the assistant's analysis-channel messages, ``commentary`` its commentary
    messages without a recipient (preambles meant for the user), ``final`` its final-channel messages
    and those whose header names no channel (each joined with "\\n" when there are several).
    Messages with a recipient are ``tool_calls``, whatever their channel.  ``complete`` is True when
    the output ended right after an end marker (``<|return|>``, ``<|call|>``, ``<|end|>``,
    ``<|endoftext|>``) with no message or header left open; a truncated output keeps its partial text
    and has ``complete`` False.
    """

    reasoning: str
    final: str
    tool_calls: list[ToolCall]
    messages: list[HarmonyMessage]
    complete: bool
    commentary: str = ""

    def assistant_message(self) -> dict:
        """This turn as a chat-history message for :func:`render_harmony`: reasoning under
        ``thinking``, then either ``tool_calls`` (arguments decoded from JSON when they parse) or the
        final text as ``content`` (the harmony docs' advice: store the turn with ``<|end|>``, which the
        template does, never ``<|return|>``)."""
        msg: dict[str, Any] = {"role": "assistant"}
        if self.reasoning:
            msg["thinking"] = self.reasoning
        if self.tool_calls:
            calls = []
            for tc in self.tool_calls:
                try:
                    args: Any = json.loads(tc.arguments)
                except json.JSONDecodeError:
                    args = tc.arguments
                calls.append({"type": "function", "function": {"name": tc.name, "arguments": args}})
            msg["tool_calls"] = calls
        else:
            msg["content"] = self.final
        return msg


def _parse_header(header: str, role: str | None, default_role: str):
    """Split a header into (role, channel, recipient, content_type).

    Accepts both placements of the recipient (``assistant to=functions.f<|channel|>commentary`` and
    ``<|channel|>commentary to=functions.f``) and both spellings of the content type
    (``<|constrain|>json`` and a bare ``json`` after the channel, as the gpt-oss template renders it).
    ``role`` is None when the header itself starts with the role (after ``<|start|>``).
    """
    head, has_channel, tail = header.partition(_CHANNEL)
    head_words = head.replace(_CONSTRAIN, " " + _CONSTRAIN + " ").split()
    tail_words = tail.replace(_CONSTRAIN, " " + _CONSTRAIN + " ").split()
    if role is None:
        role = head_words.pop(0) if head_words and not head_words[0].startswith("to=") \
            and head_words[0] != _CONSTRAIN else default_role
    channel = None
    if has_channel and tail_words and not tail_words[0].startswith("to=") \
            and tail_words[0] != _CONSTRAIN:
        channel = tail_words.pop(0)
    recipient = content_type = None
    words = head_words + tail_words
    k = 0
    while k < len(words):
        w = words[k]
        if w.startswith("to="):
            recipient = w[3:] or recipient
        elif w == _CONSTRAIN:
            if k + 1 < len(words) and not words[k + 1].startswith("to="):
                content_type = words[k + 1]
                k += 1
        elif content_type is None:
            content_type = w
        k += 1
    return role, channel, recipient, content_type


class HarmonyStreamParser:
    """Incremental harmony parser for streamed completions.

    Feed text chunks with :meth:`push` (markers are recognised as substrings; a tail that could
    still become a marker, e.g. "<|", "<|ch", is held back until the next chunk decides it) or
    decoded token pieces with :meth:`push_token` (a piece is a marker only when it *is* one, so
    marker-like text the model wrote with ordinary tokens stays text).  Each call returns the
    :class:`HarmonyEvent` s it completed; :meth:`finish` flushes held text and :meth:`result` gives the
    :class:`HarmonyResult` (callable at any time: an open message then counts as truncated).

    The parser starts right after the prompt's ``<|start|>assistant`` (``role``), so the output may
    begin with ``<|channel|>...``, with `` to=functions.f<|channel|>...`` (recipient placed after the
    role), or with ``<|start|>`` (a full message).  After each end marker it accepts the same three
    forms again.  Choices for malformed output, all lenient so that text is never lost:

    * text that starts where a header should and cannot be one (anything but whitespace, ``to=...``
      or a marker) opens a message without a header: role ``role``, channel None, counted as final;
    * ``<|channel|>`` inside content (``<|end|><|start|>assistant`` left out) closes the message
      (``end`` None) and opens the next header with the same role; ``<|start|>`` inside content closes
      it the same way; ``<|start|>`` inside a header discards that header;
    * ``<|message|>`` and ``<|constrain|>`` inside content, ``<|startoftext|>``, ``<|endofprompt|>``
      and ``<|reserved_N|>`` anywhere are dropped; an end marker inside a header closes an empty message;
    * at :meth:`finish`, a header without ``<|message|>`` is dropped and the result is incomplete.
    """

    def __init__(self, role: str = "assistant"):
        self._default_role = role
        self._scanner = _Scanner()
        self._state = "between"          # "between" | "header" | "content"
        self._pending = ""               # text seen between messages, not yet classified
        self._header: list[str] = []
        self._header_role: str | None = role   # None: the header starts with the role
        self._msg: dict[str, Any] | None = None
        self._messages: list[HarmonyMessage] = []
        self._ended = False              # the last meaningful thing seen was an end marker
        self._finished = False

    # -- input ---------------------------------------------------------------------------------
    def push(self, chunk: str) -> list[HarmonyEvent]:
        """Feed decoded text (special tokens kept as their text)."""
        self._check_open()
        if not isinstance(chunk, str):
            raise TypeError(f"push() takes str, got {type(chunk).__name__}")
        events: list[HarmonyEvent] = []
        for is_marker, piece in self._scanner.push(chunk):
            self._step(is_marker, piece, events)
        return events

    def push_token(self, piece: str) -> list[HarmonyEvent]:
        """Feed the decoded text of one token; the piece is a marker only if it equals one."""
        self._check_open()
        if not isinstance(piece, str):
            raise TypeError(f"push_token() takes str, got {type(piece).__name__}")
        events: list[HarmonyEvent] = []
        for is_marker, held in self._scanner.push("", final=True):    # text pushed before, if any
            self._step(is_marker, held, events)
        is_marker = piece in _MARKERS or (_reserved_len(piece, 0) == len(piece) > 0)
        if piece:
            self._step(is_marker, piece, events)
        return events

    def finish(self) -> list[HarmonyEvent]:
        """End of output: flush held-back text (a partial marker at the very end is literal text)."""
        events: list[HarmonyEvent] = []
        if self._finished:
            return events
        for is_marker, piece in self._scanner.push("", final=True):
            self._step(is_marker, piece, events)
        if self._state == "between" and self._pending.strip():
            self._open_headerless(events)          # leftover "t" / "to": headerless content
        self._finished = True
        return events

    def _check_open(self):
        if self._finished:
            raise ChatTemplateError("HarmonyStreamParser: push after finish()")

    # -- state machine -------------------------------------------------------------------------
    def _step(self, is_marker: bool, piece: str, events: list[HarmonyEvent]) -> None:
        if is_marker and (piece in _IGNORED_MARKERS or piece.startswith(_RESERVED_PREFIX)):
            return
        state = self._state
        if state == "between":
            if not is_marker:
                self._pending += piece
                s = self._pending.lstrip()
                if not s or "to=".startswith(s):
                    return                          # still undecided: whitespace, "t", "to"
                if s.startswith("to="):             # recipient right after the prompt's role
                    self._begin_header(self._default_role, self._pending)
                else:
                    self._open_headerless(events)   # no header at all: plain content
                return
            if piece == _START:
                self._begin_header(None, "")
            elif piece in (_CHANNEL, _CONSTRAIN):
                self._begin_header(self._default_role, self._pending + piece)
            elif piece == _MESSAGE:
                self._begin_header(self._default_role, self._pending)
                self._open_from_header()
            elif piece in _END_MARKERS:
                self._pending = ""
                self._ended = True
        elif state == "header":
            if not is_marker or piece in (_CHANNEL, _CONSTRAIN):
                self._header.append(piece)
            elif piece == _MESSAGE:
                self._open_from_header()
            elif piece == _START:
                self._begin_header(None, "")        # broken header: start over
            elif piece in _END_MARKERS:
                self._open_from_header()
                self._close(piece)
        else:  # content
            if not is_marker:
                self._append(piece, events)
            elif piece in _END_MARKERS:
                self._close(piece)
            elif piece == _START:
                self._close(None)
                self._begin_header(None, "")
            elif piece == _CHANNEL:
                role = self._msg["role"]
                self._close(None)
                self._begin_header(role, piece)
            # <|message|>, <|constrain|> inside content: dropped

    def _begin_header(self, role: str | None, text: str) -> None:
        self._state = "header"
        self._header = [text] if text else []
        self._header_role = role
        self._pending = ""
        self._ended = False

    def _open_from_header(self) -> None:
        role, channel, recipient, ctype = _parse_header(
            "".join(self._header), self._header_role, self._default_role)
        self._header = []
        self._msg = {"role": role, "channel": channel, "recipient": recipient,
                     "content_type": ctype, "parts": []}
        self._state = "content"
        self._ended = False

    def _open_headerless(self, events: list[HarmonyEvent]) -> None:
        """A message without header whose content starts with the pending text."""
        text = self._pending
        self._pending = ""
        self._msg = {"role": self._default_role, "channel": None, "recipient": None,
                     "content_type": None, "parts": []}
        self._state = "content"
        self._ended = False
        self._append(text, events)

    def _append(self, text: str, events: list[HarmonyEvent]) -> None:
        if not text:
            return
        m = self._msg
        m["parts"].append(text)
        events.append(HarmonyEvent(m["channel"] or "final", text, m["recipient"]))

    def _close(self, end: str | None) -> None:
        m = self._msg
        self._messages.append(HarmonyMessage(m["role"], m["channel"], m["recipient"],
                                             m["content_type"], "".join(m["parts"]), end))
        self._msg = None
        self._state = "between"
        self._pending = ""
        self._ended = end is not None

    # -- output --------------------------------------------------------------------------------
    def result(self) -> HarmonyResult:
        """The completion so far, split into reasoning / commentary / tool calls / final."""
        messages = list(self._messages)
        if self._msg is not None:
            m = self._msg
            messages.append(HarmonyMessage(m["role"], m["channel"], m["recipient"],
                                           m["content_type"], "".join(m["parts"]), None))
        complete = (self._state == "between" and self._ended and not self._pending.strip()
                    and not self._scanner._buf)
        reasoning, commentary, final, calls = [], [], [], []
        for m in messages:
            if m.role != self._default_role:
                continue                              # e.g. a tool's reply: kept in `messages` only
            if m.recipient is not None:
                name = m.recipient[len("functions."):] if m.recipient.startswith("functions.") \
                    else m.recipient
                calls.append(ToolCall(name, m.content, m.channel, m.recipient, m.content_type))
            elif m.channel == "analysis":
                reasoning.append(m.content)
            elif m.channel == "commentary":
                commentary.append(m.content)
            elif m.channel in (None, "final"):
                final.append(m.content)
        return HarmonyResult(reasoning="\n".join(reasoning), final="\n".join(final),
                             tool_calls=calls, messages=messages, complete=complete,
                             commentary="\n".join(commentary))


def parse_harmony(output: str | Iterable[str], *, role: str = "assistant") -> HarmonyResult:
    """Parse a gpt-oss completion (what follows the prompt's ``<|start|>assistant``).

    ``output`` is either the decoded text with special tokens kept (markers found as substrings) or
    an iterable of per-token decoded pieces (a piece is a marker only if it equals one: exact even
    when the model writes marker-like text).  See :class:`HarmonyStreamParser` for the rules and
    :class:`HarmonyResult` for what comes back.

    Example: ``"<|channel|>analysis<|message|>2+2 is 4.<|end|><|start|>assistant<|channel|>final"
    "<|message|>4<|return|>"`` gives reasoning "2+2 is 4.", final "4", complete True.
    """
    parser = HarmonyStreamParser(role)
    if isinstance(output, str):
        parser.push(output)
    else:
        for piece in output:
            parser.push_token(piece)
    parser.finish()
    return parser.result()
