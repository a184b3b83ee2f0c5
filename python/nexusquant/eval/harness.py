"""Quality against real compression, for nexusquant and its peers, on the same model and inputs.

For each text and prefix length ``P``, every method

1. prefills the first ``P`` tokens of the text into a fresh cache of its own (nexusquant and the
   eviction peers compress when the prefill's attention has run), then scores the next ``C``
   tokens teacher-forced, one token per forward through that cache, as ``generate`` does. The
   first continuation token is predicted by the prefill's last logits. Perplexity is
   ``exp(mean NLL)`` over the ``C`` tokens; the uncompressed run goes through the same loop with
   transformers' ``DynamicCache``, and its one-forward perplexity is recorded as a check;
2. reports the bytes its cache actually holds after the prefill ("prompt") and after the last
   continuation token ("end"), and the ratio to the fp16 bytes transformers' cache would hold for
   the same tokens;
3. answers the pass-key trials of :mod:`nexusquant.eval.retrieval`.

Eviction peers are matched to the real prompt ratio nexusquant reached with the same preset on the
same prefix: they keep ``round(P / ratio)`` tokens at 16 bits.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import platform
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch

from .._core import NexusQuantError, __version__
from ..architecture import layer_plan
from ..compat import cache_kwarg
from . import peers
from .methods import DEFAULT_METHODS, Method, evict_for_ratio, expand_methods
from .models import load_model
from .names import DEFAULT_TEXTS, FULL_EVAL_COMMAND
from .plotting import plot_results
from .report import format_table, write_json
from .retrieval import make_trials, run_trial

if TYPE_CHECKING:  # annotations only: importing it loads transformers' modeling code
    from transformers import PreTrainedModel

__all__ = ["evaluate", "run", "load_texts", "corpus_texts", "EvalText", "DEFAULT_TEXTS", "FULL_EVAL_COMMAND"]

_KIND_ORDER = {"baseline": 0, "nexusquant": 1, "evict": 2, "quantized-cache": 3, "int": 4}


@dataclass
class EvalText:
    """A text to evaluate on: ``ids`` are its tokens (no special tokens added)."""

    name: str
    path: Optional[str]
    sha256: str
    ids: list[int]


def corpus_texts() -> dict[str, Path]:
    """The texts shipped in ``nexusquant/eval/corpus`` by name (file name with and without extension)."""
    root = Path(__file__).resolve().parent / "corpus"
    out: dict[str, Path] = {}
    for p in sorted(root.iterdir()):
        if p.is_file() and p.suffix in (".txt", ".c") and not p.name.endswith(".LICENSE"):
            out[p.name] = p
            out.setdefault(p.stem, p)
    return out


def load_texts(specs: Iterable[Union[str, Path, tuple[str, str]]], tokenizer: Any) -> list[EvalText]:
    """Tokenize texts given as file paths, names of packaged texts (``alice29``, ``GPL-3``,
    ``lcet10``, ``decode.c``) or ``(name, text)`` pairs."""
    packaged = corpus_texts()
    texts = []
    for spec in specs:
        if isinstance(spec, tuple):
            name, body, path = spec[0], spec[1], None
        else:
            p = Path(spec)
            if not p.is_file():
                if str(spec) not in packaged:
                    raise NexusQuantError(
                        f"text {str(spec)!r} is neither a file nor a packaged text ({', '.join(sorted(set(packaged)))})"
                    )
                p = packaged[str(spec)]
            name, path = p.stem if p.suffix == ".txt" else p.name, str(p)
            body = p.read_text(encoding="utf-8", errors="replace")
        ids = tokenizer(body, add_special_tokens=False).input_ids
        texts.append(EvalText(name, path, hashlib.sha256(body.encode("utf-8")).hexdigest(), list(ids)))
    return texts


class _Forward:
    """One forward of the model over a cache; returns the last position's logits ``(V,)`` in float32."""

    def __init__(self, model: torch.nn.Module):
        self.cache_kw = cache_kwarg(model)
        self.keep = "logits_to_keep" in inspect.signature(type(model).forward).parameters
        self.model = model
        self.device = next(model.parameters()).device

    def __call__(self, ids: torch.Tensor, cache: Any, keep: int = 1) -> torch.Tensor:
        kw: dict[str, Any] = {self.cache_kw: cache, "use_cache": True}
        if self.keep:
            kw["logits_to_keep"] = keep
        out = self.model(input_ids=ids.to(self.device), **kw)
        return out.logits[0, -keep:].float().squeeze(0)

    def full(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        """Logits of the last ``keep`` positions of one forward without a cache ``(keep, V)``."""
        kw: dict[str, Any] = {"use_cache": False}
        if self.keep:
            kw["logits_to_keep"] = keep
        out = self.model(input_ids=ids.to(self.device), **kw)
        return out.logits[0, -keep:].float()


def _bytes_record(cache: Any, config: Any, tokens: int) -> dict[str, Any]:
    held = peers.held_nbytes(cache)
    ref = peers.fp16_reference_nbytes(config, tokens)
    return {
        "tokens": tokens,
        "nbytes": held,
        "fp16_nbytes": ref,
        "ratio": ref / held if held else math.nan,
        "bits_per_element": 16.0 * held / ref if ref else math.nan,
    }


def _score_continuation(
    fwd: _Forward, cache: Any, ids: list[int], prefix: int, continuation: int, config: Any
) -> dict[str, Any]:
    seq = torch.tensor([ids[: prefix + continuation]])
    logits = fwd(seq[:, :prefix], cache)
    prompt = _bytes_record(cache, config, prefix)
    nll = [float(torch.nn.functional.cross_entropy(logits[None], seq[0, prefix : prefix + 1]).item())]
    for i in range(continuation - 1):
        logits = fwd(seq[:, prefix + i : prefix + i + 1], cache)
        target = seq[0, prefix + i + 1 : prefix + i + 2]
        nll.append(float(torch.nn.functional.cross_entropy(logits[None], target).item()))
    end = _bytes_record(cache, config, prefix + continuation - 1)
    mean = sum(nll) / len(nll)
    return {"nll_mean": mean, "ppl": math.exp(mean), "nll": [round(x, 5) for x in nll], "prompt": prompt, "end": end}


def _one_forward_ppl(fwd: _Forward, ids: list[int], prefix: int, continuation: int) -> float:
    seq = torch.tensor([ids[: prefix + continuation]])
    logits = fwd.full(seq[:, : prefix + continuation - 1], continuation)
    nll = torch.nn.functional.cross_entropy(logits, seq[0, prefix : prefix + continuation])
    return math.exp(float(nll.item()))


def _trial_seed(seed: int, text: EvalText, prefix: int) -> int:
    return (seed * 1_000_003 + prefix * 7919 + zlib.crc32(text.name.encode())) & 0x7FFFFFFF


def _environment(model: PreTrainedModel, model_name: Optional[str]) -> dict[str, Any]:
    import transformers

    cfg = model.config.get_text_config(decoder=True)
    return {
        "nexusquant": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": torch.get_num_threads(),
        "device": str(next(model.parameters()).device),
        "model": {
            "name": model_name or getattr(cfg, "_name_or_path", None) or type(model).__name__,
            "model_type": cfg.model_type,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "layers": cfg.num_hidden_layers,
            "attention_heads": cfg.num_attention_heads,
            "kv_heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        },
    }


def evaluate(
    model: PreTrainedModel,
    tokenizer: Any,
    texts: Optional[Sequence[Union[str, Path, tuple[str, str]]]] = None,
    prefixes: Sequence[int] = (512,),
    continuation: int = 64,
    methods: Sequence[str] = DEFAULT_METHODS,
    presets: Sequence[str] = ("balanced",),
    retrieval_trials: int = 5,
    seed: int = 0,
    progress: bool = True,
    model_name: Optional[str] = None,
    on_result: Optional[Callable[[dict[str, Any]], None]] = None,
    variants: Sequence[Union[str, dict]] = (),
) -> dict[str, Any]:
    """Measure quality against real compression for ``methods`` on a loaded model.

    Parameters
    ----------
    model, tokenizer
        A transformers causal LM (batch 1 is used) and its tokenizer.
    texts : sequence, optional
        File paths, names of packaged texts, or ``(name, text)`` pairs (default: alice29).
    prefixes : sequence of int
        Prefix lengths ``P`` (tokens prefilled and compressed).
    continuation : int
        Tokens ``C`` scored after the prefix, one forward each.
    methods : sequence of str
        Families (``nexusquant``, ``nexusquant-e8``, ``snapkv``, ``expected-attention``, ``knorm``,
        ``streamingllm``, ``quanto``, ``hqq``, ``int``), single methods (``int2``, ``quanto-int4``...)
        or ``"all"``. The uncompressed baseline always runs.
    presets : sequence of str
        nexusquant presets to run; eviction peers run once per preset, at its real prompt ratio.
    retrieval_trials : int
        Pass-key trials per (text, prefix, method); 0 skips retrieval.
    seed : int
        Seed of the trials' keys, offsets and of nothing else.
    progress : bool
        Show a tqdm progress bar (stderr).
    on_result : callable, optional
        Called with each result row as it is finished.
    variants : sequence of str or dict
        Extra nexusquant methods with explicit knobs, e.g. ``"evict=0,demote=0"`` (quantization
        only, on the balanced preset) or ``"max:evict=0.75"``; see
        :func:`~nexusquant.eval.methods.parse_variant`.

    Returns
    -------
    dict
        ``{"environment", "config", "texts", "results", "baselines", "notes"}``, JSON-serialisable.
    """
    from tqdm.auto import tqdm

    if continuation < 1:
        raise NexusQuantError(f"continuation must be at least 1 token, got {continuation}")
    if retrieval_trials < 0:
        raise NexusQuantError(f"retrieval_trials must be >= 0, got {retrieval_trials}")
    prefixes = sorted({int(p) for p in prefixes})
    if not prefixes or prefixes[0] < 16:
        raise NexusQuantError(f"prefix lengths must be at least 16 tokens, got {prefixes}")
    method_list, notes = expand_methods(list(methods), list(presets), variants)
    if any(w is not None for w in layer_plan(model.config)) and any(m.kind == "quantized-cache" for m in method_list):
        # transformers' QuantizedCache refuses models with sliding-window layers (Gemma-2/3, Mistral).
        method_list = [m for m in method_list if m.kind != "quantized-cache"]
        notes.append("QuantizedCache (quanto, HQQ): left out, transformers supports it only for full-attention models")
    method_list.sort(key=lambda m: _KIND_ORDER[m.kind])
    texts_loaded = load_texts(texts if texts is not None else DEFAULT_TEXTS, tokenizer)
    for t in texts_loaded:
        need = prefixes[-1] + continuation
        if len(t.ids) < need:
            raise NexusQuantError(
                f"text {t.name!r} has {len(t.ids)} tokens; "
                f"prefix {prefixes[-1]} + continuation {continuation} needs {need}"
            )
    fwd = _Forward(model)
    config = model.config
    results: list[dict[str, Any]] = []
    baselines: list[dict[str, Any]] = []
    units = len(texts_loaded) * len(prefixes) * len(method_list) * (1 + retrieval_trials)
    bar = tqdm(total=units, desc="nexusquant eval", disable=not progress, unit="run", dynamic_ncols=True)
    try:
        with torch.inference_mode():
            for text in texts_loaded:
                for prefix in prefixes:
                    trials = make_trials(tokenizer, text.ids, prefix, retrieval_trials, _trial_seed(seed, text, prefix))
                    anchors: dict[str, float] = {}
                    base_row: Optional[dict[str, Any]] = None
                    for method in method_list:
                        bar.set_postfix_str(f"{text.name} P={prefix} {method.name}")
                        row = _run_method(
                            method, model, fwd, tokenizer, config, text, prefix, continuation, trials, anchors, bar
                        )
                        if method.kind == "baseline":
                            row["one_forward_ppl"] = _one_forward_ppl(fwd, text.ids, prefix, continuation)
                            base_row = row
                            baselines.append(
                                {
                                    "text": text.name,
                                    "prefix": prefix,
                                    "ppl": row["ppl"],
                                    "one_forward_ppl": row["one_forward_ppl"],
                                    "retrieval_accuracy": row["retrieval"]["accuracy"],
                                }
                            )
                        if method.family == "nexusquant":
                            anchors[method.preset or ""] = row["prompt"]["ratio"]
                        assert base_row is not None
                        row["ppl_delta_pct"] = 100.0 * (row["ppl"] / base_row["ppl"] - 1.0)
                        row["retrieval"]["baseline_accuracy"] = base_row["retrieval"]["accuracy"]
                        results.append(row)
                        if on_result is not None:
                            on_result(row)
    finally:
        bar.close()
    return {
        "environment": _environment(model, model_name),
        "config": {
            "prefixes": prefixes,
            "continuation": continuation,
            "methods": [m.name for m in method_list],
            "presets": list(presets),
            "variants": [m.name for m in method_list if m.family == "nexusquant-variant"],
            "retrieval_trials": retrieval_trials,
            "seed": seed,
        },
        "texts": [{"name": t.name, "path": t.path, "sha256": t.sha256, "tokens": len(t.ids)} for t in texts_loaded],
        "results": results,
        "baselines": baselines,
        "notes": notes,
    }


def _run_method(
    method: Method,
    model: PreTrainedModel,
    fwd: _Forward,
    tokenizer: Any,
    config: Any,
    text: EvalText,
    prefix: int,
    continuation: int,
    trials: list,
    anchors: dict[str, float],
    bar: Any,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    evict = target = None
    if method.kind == "evict":
        assert method.preset is not None
        if method.preset not in anchors:
            # nexusquant with this preset did not run here: measure its prompt ratio with one prefill.
            anchor = Method(f"nexusquant-{method.preset}", "nexusquant", preset=method.preset)
            with anchor.open(model) as run:
                cache = run.new_cache()
                fwd(torch.tensor([text.ids[:prefix]]), cache)
                anchors[method.preset] = _bytes_record(cache, config, prefix)["ratio"]
        target = anchors[method.preset]
        evict = evict_for_ratio(prefix, target)
    with method.open(model, evict=evict) as run:
        scored = _score_continuation(fwd, run.new_cache(), text.ids, prefix, continuation, config)
        bar.update(1)
        outcomes = []
        for trial in trials:
            forward = functools.partial(fwd, cache=run.new_cache())  # one fresh cache per trial
            outcomes.append(
                run_trial(
                    step=forward,
                    prefill=forward,
                    trial=trial,
                    tokenizer=tokenizer,
                )
            )
            bar.update(1)
    by_depth: dict[str, list[int]] = {}
    for o in outcomes:
        d = by_depth.setdefault(f"{o['depth']:.1f}", [0, 0])
        d[0] += int(o["correct"])
        d[1] += 1
    correct = sum(int(o["correct"]) for o in outcomes)
    return {
        "text": text.name,
        "prefix": prefix,
        "continuation": continuation,
        "method": method.name,
        "family": method.family,
        "label": method.label,
        "kind": method.kind,
        "preset": method.preset,
        "bits": method.bits,
        "settings": run.settings,
        "matched_ratio": target,
        "evict": evict,
        **scored,
        "retrieval": {
            "trials": len(outcomes),
            "correct": correct,
            "accuracy": correct / len(outcomes) if outcomes else None,
            "by_depth": by_depth,
            "answers": [[o["key"], o["answer"]] for o in outcomes],
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }


def run(
    model: str = "smollm2",
    dtype: str = "bfloat16",
    texts: Optional[Sequence[Union[str, Path]]] = None,
    prefixes: Sequence[int] = (512,),
    continuation: int = 64,
    methods: Sequence[str] = DEFAULT_METHODS,
    presets: Sequence[str] = ("balanced",),
    retrieval_trials: int = 5,
    seed: int = 0,
    threads: Optional[int] = None,
    out: Union[str, Path, None] = "nexusquant-eval",
    variants: Sequence[Union[str, dict]] = (),
    plot: bool = True,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Load a model, :func:`evaluate` it, print the table and write ``eval.json`` and ``eval.png``.

    ``model`` is a packaged model name (``"smollm2"``, ``"gemma3-270m"``) or a local transformers
    directory, loaded with :func:`nexusquant.eval.models.load_model` in ``dtype``. ``threads`` sets
    ``torch.set_num_threads``. ``out`` is the output directory (None: write nothing). Other
    parameters as for :func:`evaluate`. Returns the results, with ``"json_path"`` and
    ``"plot_path"`` where written.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    from transformers.utils import logging as hf_logging

    # transformers' per-tensor "Loading weights" bar would bury the evaluation's own.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        lm, tok = load_model(model, dtype=dtype)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    echo(f"model {model} ({dtype}), {torch.get_num_threads()} threads, loaded in {time.perf_counter() - t0:.1f} s")
    on_result = None
    if out is not None:
        # Rows are appended as they finish, so a long run that is stopped keeps what it measured.
        Path(out).mkdir(parents=True, exist_ok=True)
        partial = Path(out) / "eval.partial.jsonl"
        partial.write_text("")

        def on_result(row: dict[str, Any]) -> None:
            import json

            with open(partial, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, allow_nan=True) + "\n")

    result = evaluate(
        lm,
        tok,
        texts,
        prefixes,
        continuation,
        methods,
        presets,
        retrieval_trials,
        seed,
        progress,
        model_name=model,
        on_result=on_result,
        variants=variants,
    )
    result["environment"]["wall_seconds"] = round(time.perf_counter() - t0, 1)
    echo(format_table(result))
    for note in result["notes"]:
        echo(f"note: {note}")
    if out is not None:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        result["json_path"] = str(out_dir / "eval.json")
        if plot:
            result["plot_path"] = str(out_dir / "eval.png")
            plot_results(result, result["plot_path"])
        write_json(result, result["json_path"])
        (out_dir / "eval.partial.jsonl").unlink(missing_ok=True)
        echo(f"wrote {result['json_path']}" + (f" and {result['plot_path']}" if plot else ""))
    echo(f"wall time {result['environment']['wall_seconds']} s")
    return result
