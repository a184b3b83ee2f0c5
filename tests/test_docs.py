"""Every ```python block of README.md and docs/*.md runs here, as written.

As tokenizers and safetensors test their docs: a block's own code is executed unchanged; only the
names it takes from its surroundings are provided (``SETUP`` below): a model directory ``path``
holding a tiny random Llama with SmolLM2's tokenizer where the text names a real model, short
texts where it names long ones. A block that cannot run here is listed in ``SLOW`` with the reason;
nothing is skipped silently. An example a newcomer copies fails CI when it stops working.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Blocks that do not run in the test suite, by (file, first line of the block), with the reason.
# Set NEXUSQUANT_SLOW_DOCS=1 to run them anyway.
SLOW = {
    ("docs/EVAL.md", 14): "runs the whole quick evaluation (SmolLM2-135M, about 70 s on 2 cores) and an all-methods "
    "evaluation at 2048 tokens with 20 pass-key trials (an hour); tests/test_eval.py runs "
    "evaluate() on small inputs",
}


def _blocks():
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
            line = text[: m.start()].count("\n") + 1
            yield pytest.param(
                doc.relative_to(ROOT).as_posix(), line, m.group(1), id=f"{doc.relative_to(ROOT).as_posix()}:{line}"
            )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The names the docs' blocks take from their surroundings."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from nexusquant.eval.models import cache_dir, load_model

    smollm2 = cache_dir() / "models" / "smollm2"
    if not (smollm2 / "config.json").exists():
        load_model("smollm2")  # converts the packaged GGUF once
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("docs-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    text = (ROOT / "python" / "nexusquant" / "eval" / "corpus" / "alice29.txt").read_text(
        encoding="utf-8", errors="replace"
    )
    long_document = text[:3000]
    ids = tokenizer(long_document, return_tensors="pt").input_ids
    (path / "my.txt").write_text(text[:4000], encoding="utf-8")
    return {
        "path": str(path),  # a model directory: config, weights and tokenizer
        "model": model,
        "tokenizer": tokenizer,
        "input_ids": ids[:, :200],
        "long_document": long_document,
        "question": "\nQuestion: what was Alice tired of? Answer:",
        "prefix_ids": ids[:, :300],
        "new_ids": ids[:, 300:310],
        "_workdir": path,
    }


@pytest.mark.parametrize("doc,line,code", list(_blocks()))
# transformers 5.24 deprecates `past_key_values=` in favour of `cache=`; the README's examples keep
# the name that every supported version (5.2 to 5.24) accepts.
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_doc_block_runs(doc, line, code, setup, monkeypatch):
    import os

    reason = SLOW.get((doc, line))
    if reason is not None and os.environ.get("NEXUSQUANT_SLOW_DOCS") != "1":
        pytest.skip(reason)
    monkeypatch.chdir(setup["_workdir"])  # files a block writes (prefix.nqkv) go to a temporary directory
    namespace = {k: v for k, v in setup.items() if not k.startswith("_")}
    namespace["__name__"] = "__doc_block__"
    exec(compile(code, f"{doc}:{line}", "exec"), namespace)


def test_every_doc_block_is_collected():
    """The extraction finds the README's blocks (a changed fence would otherwise test nothing)."""
    found = {(d, l) for d, l, _ in (p.values for p in _blocks())}
    assert sum(d == "README.md" for d, _ in found) >= 2
    assert set(SLOW) <= found, "a SLOW entry names a block that no longer exists"
