"""Sparse task vectors and their wire format: ``task_vector`` (SparseTaskVector), ``codec``
(FLTV bytes), ``lowrank`` (LoRA updates as their factors)."""
