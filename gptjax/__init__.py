"""gptjax: GPT-family language models from GGUF files and Hugging Face checkpoints on JAX."""
from gptjax.errors import (
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

__all__ = [
    "ConfigError",
    "FormatError",
    "GenerationError",
    "GGUFError",
    "GptjaxError",
    "TokenizerError",
    "UnsupportedModelError",
    "WeightsError",
    "__version__",
]
