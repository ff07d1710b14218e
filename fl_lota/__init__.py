"""fl-lota: Lottery Ticket Adaptation (LoTA) for federated multi-task fine-tuning.

Pure PyTorch; never imports flwr. Modules, one job each:
masks (scope, extraction, LoTTO), task_vector (SparseTaskVector), codec (FLTV wire
format), merge (mask_aware, ties, task_arithmetic, fedavg), optim (masked optimizers),
train (shared loop), lota (the three phases), lora (peft baseline), methods (registry),
models (loading), data (batches).
"""

from .codec import CodecError, decode, encode
from .masks import extract_mask, overlap
from .merge import merge
from .methods import FINETUNE_METHODS, FinetuneResult, finetune
from .task_vector import SparseTaskVector, SparseTensor
from .train import TrainConfig

__version__ = "0.1.0"

__all__ = [
    "FINETUNE_METHODS",
    "CodecError",
    "FinetuneResult",
    "SparseTaskVector",
    "SparseTensor",
    "TrainConfig",
    "decode",
    "encode",
    "extract_mask",
    "finetune",
    "merge",
    "overlap",
]
