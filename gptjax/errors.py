"""Typed errors: every failure a user can cause is a :class:`GptjaxError`.

Messages name the file, key or tensor involved and say what was expected, so that
one line on stderr is enough to act on.  ``GptjaxError`` derives from ``ValueError``
because almost every failure is bad input.
"""
from __future__ import annotations


class GptjaxError(ValueError):
    """Base class of every error gptjax raises on purpose."""


class GGUFError(GptjaxError):
    """A GGUF file is malformed, truncated, hostile or inconsistent."""


class FormatError(GptjaxError):
    """A Hugging Face directory (config.json, safetensors, tokenizer.json) is malformed."""


class ConfigError(GptjaxError):
    """Model hyper-parameters are missing, out of range or inconsistent."""


class UnsupportedModelError(GptjaxError):
    """The architecture, tensor type or tokenizer kind is not supported (yet)."""


class WeightsError(GptjaxError):
    """The tensors of a file do not fill the model's parameters exactly once with the right shapes."""


class TokenizerError(GptjaxError):
    """The tokenizer data is malformed, or a token id is out of range."""


class GenerationError(GptjaxError):
    """A generation request is invalid (bad sampler settings, prompt longer than the context, ...)."""


class ChatTemplateError(GptjaxError):
    """A chat template is missing, fails to compile or raises while rendering, or the chat messages
    handed to it are malformed."""


__all__ = [
    "GptjaxError",
    "GGUFError",
    "FormatError",
    "ConfigError",
    "UnsupportedModelError",
    "WeightsError",
    "TokenizerError",
    "GenerationError",
    "ChatTemplateError",
]
