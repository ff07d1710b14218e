"""fl-lota: Lottery Ticket Adaptation (LoTA) for federated multi-task fine-tuning.

Pure PyTorch; never imports flwr. Grouped by layer, each importing only the layers before
it (a test checks this):

    vectors/    sparse task vectors and the FLTV wire format
    training/   example streams, masks, masked optimizers, the shared loop, LoTA, LoRA
    merging/    mask_aware, ties, task_arithmetic, fedavg from three tensor functions
    tasks/      the task suite, prompting, evaluation, federation partitions
    federated/  the round without Flower: protocol, run config, node, aggregator, downlink,
                checkpoint, report, driving ``flwr run``
    compare/    the comparison protocol: single-task runs, plan, runner, tables
    cli, tune   the ``fl-lota`` command and its single-task ``tune``
"""

from fl_lota.merging.merge import merge
from fl_lota.training.masks import extract_mask, overlap
from fl_lota.training.methods import FINETUNE_METHODS, FinetuneResult, finetune
from fl_lota.training.train import TrainConfig
from fl_lota.vectors.codec import CodecError, decode, encode
from fl_lota.vectors.task_vector import SparseTaskVector, SparseTensor

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
