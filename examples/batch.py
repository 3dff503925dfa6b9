"""Several prompts of different lengths in one batched call (one prefill, one decode loop).

    python examples/batch.py [MODEL.gguf | HF_DIR]
"""
import gptjax
from _common import model_path

m = gptjax.load(model_path())
prompts = ["The capital of France is", "Water boils at", "A short poem about the sea:\n"]
res = m.complete(prompts, max_new_tokens=32)
for p, c in zip(prompts, res.completions):
    print(f"{p!r} -> {c.text!r}  [{c.stop_reason}]")
s = res.stats
print(f"batch {s.batch}: {s.generated_tokens} tokens, {s.decode_tokens_per_s:.1f} tok/s aggregate")
