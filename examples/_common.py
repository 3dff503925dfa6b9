"""Shared by the examples: the model path from argv[1], else the default SmolLM2 model."""
import sys

from gptjax.cli import default_model_path


def model_path() -> str:
    return sys.argv[1] if len(sys.argv) > 1 else default_model_path()
