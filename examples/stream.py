"""Stream a continuation piece by piece as tokens arrive (whole UTF-8 characters only).

    python examples/stream.py [MODEL.gguf | HF_DIR]
"""
import sys

import gptjax
from _common import model_path

m = gptjax.load(model_path())
stream = m.stream("Once upon a time", max_new_tokens=64,
                  sampler=gptjax.Sampler(temperature=0.7, top_p=0.9), seed=42)
for piece in stream:
    sys.stdout.write(piece)
    sys.stdout.flush()
print(f"\n[{stream.result.completions[0].stop_reason}, {stream.result.stats.decode_tokens_per_s:.1f} tok/s]")
