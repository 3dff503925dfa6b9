"""One chat turn through the file's chat template (harmony for gpt-oss).

    python examples/chat.py [MODEL.gguf | HF_DIR]
"""
import gptjax
from _common import model_path

m = gptjax.load(model_path())
messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
print(m.chat_prompt(messages))
reply = m.chat(messages, max_new_tokens=64)
print("assistant:", reply.text)
if reply.reasoning:
    print("reasoning:", reply.reasoning)
