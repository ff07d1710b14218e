"""Merging sparse task vectors: ``merge`` (mask_aware, ties, task_arithmetic, fedavg from
three tensor functions, one registry)."""
