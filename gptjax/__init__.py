"""gptjax: GPT-family language models from GGUF files and Hugging Face checkpoints on JAX.

    import gptjax
    m = gptjax.load("model.gguf")                 # or a Hugging Face directory
    print(m.generate("The capital of France is", max_new_tokens=32))
    for piece in m.stream("Once upon a time", sampler=gptjax.Sampler(temperature=0.8, top_p=0.95), seed=1):
        print(piece, end="")

The heavy modules (JAX, the models) load on first use of these names.
"""
from gptjax.errors import (
    ChatTemplateError,
    ConfigError,
    FormatError,
    GenerationError,
    GGUFError,
    GptjaxError,
    TokenizerError,
    UnsupportedModelError,
    WeightsError,
)

__version__ = "0.1.0"

_LAZY = {
    "load": ("gptjax.api", "load"),
    "Model": ("gptjax.api", "Model"),
    "ChatReply": ("gptjax.api", "ChatReply"),
    "ModelConfig": ("gptjax.config", "ModelConfig"),
    "Tokenizer": ("gptjax.tokenizer", "Tokenizer"),
    "Sampler": ("gptjax.sampling", "Sampler"),
    "Greedy": ("gptjax.sampling", "Greedy"),
    "read_gguf": ("gptjax.formats.gguf", "read_gguf"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gptjax' has no attribute {name!r}")


__all__ = sorted([*_LAZY, "ChatTemplateError", "ConfigError", "FormatError", "GenerationError", "GGUFError",
                  "GptjaxError", "TokenizerError", "UnsupportedModelError", "WeightsError", "__version__"])
