"""The Python API and the CLI end to end on a tiny random GPT-2 that carries the REAL GPT-2
vocabulary (llama.cpp's ggml-vocab-gpt-2.gguf): text in, text out, against transformers.

References: transformers' GPT2LMHeadModel (logits, greedy ``generate``) on the same weights, and
the tokenizer's own encode/decode for the text round trip.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import gptjax
from gptjax.formats.gguf import read_gguf
from gptjax.sampling import Greedy, Sampler

from tiny_models import gpt2_gguf_metadata, gpt2_gguf_tensors, rel_err, save_hf_dir, tiny_gpt2
from gguf_factory import write_gguf

VOCAB = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "llama.cpp-vocab" / "ggml-vocab-gpt-2.gguf"
LOGITS_RTOL = 1e-5        # float32 end to end (the model tests' bound)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torch model, GGUF path with the real GPT-2 vocab, HF dir) — V = 50257, context 96."""
    model = tiny_gpt2(vocab_size=50257, n_positions=96, seed=3)
    vocab_md = {k: v for k, v in read_gguf(VOCAB).metadata.items() if k.startswith("tokenizer.")}
    md = {**gpt2_gguf_metadata(model.config), **vocab_md}
    d = tmp_path_factory.mktemp("tiny_gpt2_vocab")
    path = write_gguf(d / "tiny-gpt2.gguf", "gpt2", metadata=md, tensors=gpt2_gguf_tensors(model))
    hf_dir = save_hf_dir(model, d / "hf")
    return model, str(path), hf_dir


@pytest.fixture(scope="module")
def m(tiny):
    return gptjax.load(tiny[1])


def test_load_exposes_config_and_tokenizer(m, tiny):
    assert m.config.arch == "gpt2" and m.config.vocab_size == 50257 and m.config.context_length == 96
    assert m.tokenizer.vocab_size == 50257 and m.tokenizer.eos_id == 50256
    text = "Hello world, héllo wörld! 123"
    assert m.tokenizer.decode(m.encode(text)) == text


def test_logits_match_transformers(m, tiny):
    import torch

    ids = m.encode("The quick brown fox jumps over the lazy dog.")
    ref = tiny[0](input_ids=torch.tensor([ids])).logits[0].detach().numpy()
    assert rel_err(m.logits(ids), ref) < LOGITS_RTOL


def test_greedy_text_matches_transformers_generate(m, tiny):
    import torch

    prompt = "Once upon a time"
    ids = m.encode(prompt)
    n = 32
    out = tiny[0].generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=50256,
                           eos_token_id=None)
    ref_ids = out[0, len(ids):].tolist()
    res = m.complete(prompt, max_new_tokens=n, eos_ids=())
    comp = res.completions[0]
    assert list(comp.token_ids) == ref_ids
    assert comp.text == m.tokenizer.decode(ref_ids)            # text is the decoded ids
    assert m.generate(prompt, max_new_tokens=n) == m.tokenizer.decode(
        ref_ids[:ref_ids.index(50256)] if 50256 in ref_ids else ref_ids)


def test_stream_concatenates_to_generate(m):
    prompt = "Streaming text, piece by piece:"
    whole = m.generate(prompt, max_new_tokens=24, sampler=Sampler(temperature=0.9, top_k=50), seed=7)
    stream = m.stream(prompt, max_new_tokens=24, sampler=Sampler(temperature=0.9, top_k=50), seed=7)
    pieces = list(stream)
    assert "".join(pieces) == whole == stream.result.completions[0].text
    assert len(pieces) >= 2                                    # it really streamed


def test_batch_equals_one_by_one(m):
    prompts = ["A", "Two words", "A longer prompt with several more tokens in it"]
    batch = m.generate(prompts, max_new_tokens=12)
    assert batch == [m.generate(p, max_new_tokens=12) for p in prompts]


def test_hf_directory_gives_the_same_model(tiny):
    hf = gptjax.load(tiny[2])
    gg = gptjax.load(tiny[1])
    ids = list(range(100, 140))
    assert rel_err(hf.logits(ids), gg.logits(ids)) < LOGITS_RTOL
    assert hf.tokenizer is None                                 # save_pretrained wrote no tokenizer.json
    with pytest.raises(gptjax.GenerationError, match="no tokenizer"):
        hf.generate("text")
    # Without a tokenizer, ids in, ids out; no EOS set, so compare with the GGUF model's EOS off.
    assert hf.generate(ids[:5], max_new_tokens=4) == \
        gg.complete(ids[:5], max_new_tokens=4, eos_ids=()).completions[0].token_ids


def test_seeds(m):
    s = Sampler(temperature=1.0)
    a = m.generate("Seeds:", max_new_tokens=16, sampler=s, seed=1)
    assert a == m.generate("Seeds:", max_new_tokens=16, sampler=s, seed=1)
    assert a != m.generate("Seeds:", max_new_tokens=16, sampler=s, seed=2)
    assert m.generate("Seeds:", max_new_tokens=16, sampler=Sampler(temperature=1.0, top_k=1), seed=5) == \
        m.generate("Seeds:", max_new_tokens=16, sampler=Greedy())


def test_bad_requests_raise_typed_errors(m):
    with pytest.raises(gptjax.GenerationError):
        m.generate(" ".join(f"word{i}" for i in range(100)), max_new_tokens=4)   # > 96-token context
    with pytest.raises(gptjax.GenerationError):
        m.logits([0, 50257])
    with pytest.raises(gptjax.GenerationError):
        m.generate("hi", max_new_tokens=0)


def test_context_full_is_reported(m):
    ids = list(range(1000, 1090))                               # 90 of 96 positions used
    res = m.complete(ids, max_new_tokens=50, eos_ids=())
    c = res.completions[0]
    assert c.stop_reason == "context_full" and len(c.token_ids) == 6


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "gptjax.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_generate_streams_text_and_reports_speed(m, tiny):
    prompt = "The meaning of life is"
    proc = _cli("generate", "-m", tiny[1], "-p", prompt, "-n", "10")
    assert proc.returncode == 0, proc.stderr
    expected = m.generate(prompt, max_new_tokens=10)
    assert proc.stdout == expected + "\n"
    assert "tok/s" in proc.stderr and "prefill" in proc.stderr and "decode" in proc.stderr


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    proc = _cli("generate", "-m", str(bad), "-p", "hi", "-n", "2")
    assert proc.returncode == 2
    err = [l for l in proc.stderr.splitlines() if l.startswith("gptjax: error:")]
    assert len(err) == 1 and str(bad) in err[0] and "Traceback" not in proc.stderr
    proc = _cli("generate", "-m", str(tmp_path / "missing.gguf"), "-p", "hi")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("script", ["generate.py", "stream.py", "batch.py"])
def test_examples_run(tiny, script):
    ex = Path(__file__).resolve().parents[1] / "examples" / script
    proc = subprocess.run([sys.executable, str(ex), tiny[1]], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tok/s" in proc.stdout


def test_cli_perplexity_equals_api(m, tiny, tmp_path):
    text = " ".join(f"The number {i} follows {i - 1}." for i in range(1, 40))
    f = tmp_path / "text.txt"
    f.write_text(text)
    expected = m.perplexity(text, ctx=32)
    proc = _cli("perplexity", "-m", tiny[1], "-f", str(f), "--ctx", "32")
    assert proc.returncode == 0, proc.stderr
    line = [l for l in proc.stdout.splitlines() if l.startswith("perplexity:")][0]
    assert abs(float(line.split()[1]) - expected) <= 1e-4 * expected
    assert "chunk" in proc.stderr                                # the progress bar
    proc = _cli("perplexity", "-m", tiny[1], "-f", str(tmp_path / "missing.txt"))
    assert proc.returncode == 2 and "missing.txt" in proc.stderr and "Traceback" not in proc.stderr
