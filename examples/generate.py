"""Greedy and sampled continuations of one prompt.

    python examples/generate.py [MODEL.gguf | HF_DIR]
"""
import gptjax
from _common import model_path

m = gptjax.load(model_path())
prompt = "The capital of France is"
print("greedy :", repr(m.generate(prompt, max_new_tokens=24)))
sampler = gptjax.Sampler(temperature=0.8, top_k=40, top_p=0.95)
print("sampled:", repr(m.generate(prompt, max_new_tokens=24, sampler=sampler, seed=0)))
res = m.complete(prompt, max_new_tokens=24, stop=["\n"])
c = res.completions[0]
print(f"until newline: {c.text!r} (stop: {c.stop_reason}; decode {res.stats.decode_tokens_per_s:.1f} tok/s)")
