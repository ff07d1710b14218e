"""fl-lota: Lottery Ticket Adaptation (LoTA) for federated multi-task fine-tuning.

Pure PyTorch; never imports flwr. Modules, one job each:
masks (scope, extraction, LoTTO), task_vector (SparseTaskVector), codec (FLTV wire
format), merge (mask_aware, ties, task_arithmetic, fedavg), optim (masked optimizers),
train (shared loop), lota (the three phases), lora (peft baseline), lowrank (LoRA factors
on the wire), methods (registry), models (loading), data (example streams and batches),
prompting (chat formatting), tasks/ (task suite, metrics, custom task specs), evaluate
(generation and scoring), partition (federation strings, client data), runconfig (the run
config), fedclient / fedserver (a round without Flower), checkpoint (server state on disk),
isolated (single-task runs: references and tuning), compare/ (the comparison protocol and
its table), report (one run's summary), launch (driving ``flwr run``), cli (``fl-lota``),
tune (the single-task command).
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
