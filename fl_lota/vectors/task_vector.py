"""Sparse task vectors: the update a LoTA client trains, stores and sends.

A task vector is ``tuned - base`` (Ilharco et al., 2023). LoTA's task vectors are sparse by
construction, so we keep them as, per parameter tensor, the flat sorted indices of the kept
entries and their values. A tensor whose ``indices`` is ``None`` is dense (every entry kept,
values in flat order): that is how full fine-tuning and LoRA deltas are represented, without
paying for an index per entry. Indices are held as int32 wherever the tensor allows (at most
2^31 entries; every tensor of the models fl-lota trains): half the memory of int64 for the
server's registered masks and decoded uploads (an indexing op may still widen them to int64
for its own duration). Files keep int64 (the format's type).

A vector may hold a tensor *packed* (``PackedTensor``): one bit per entry for the support and
the values dense, which is smaller than positions and values once the support is dense
enough (above about a third of the entries for bf16 values and int32 positions). The
server's global update ``G``, the union of every client's mask, is held this way where it is
dense, so its memory stops growing with the clients. Reading a packed tensor
(``tv[name]``) gives the same ``SparseTensor`` the sparse form holds, built for the reader.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ["PackedTensor", "SparseTaskVector", "SparseTensor", "index_dtype"]


def index_dtype(numel: int) -> torch.dtype:
    """The dtype flat positions into a tensor of ``numel`` entries are held in: int32 when
    every position fits (numel <= 2^31), else int64."""
    return torch.int32 if numel <= 2**31 else torch.int64


@dataclass(frozen=True)
class SparseTensor:
    """One parameter's share of a task vector.

    shape:   the parameter's shape.
    indices: (nnz,) flat row-major positions in [0, numel) (checked), strictly increasing;
             None = dense. Given as int32 or int64, held as ``index_dtype(numel)``.
    values:  (nnz,) values at those positions (numel values when dense).
    """

    shape: tuple[int, ...]
    indices: torch.Tensor | None
    values: torch.Tensor

    def __post_init__(self) -> None:
        numel = math.prod(self.shape)
        if self.values.dim() != 1:
            raise ValueError(f"values must be 1-D, got shape {tuple(self.values.shape)}")
        if self.indices is None:
            if self.values.numel() != numel:
                raise ValueError(f"dense values hold {self.values.numel()} entries, shape needs {numel}")
            return
        if self.indices.dtype not in (torch.int32, torch.int64) or self.indices.dim() != 1:
            raise ValueError(f"indices must be a 1-D int32 or int64 tensor, got {self.indices.dtype}")
        if self.indices.numel():  # in range, also so that narrowing them is exact
            lo, hi = torch.aminmax(self.indices)
            if int(lo) < 0 or int(hi) >= numel:
                raise ValueError(f"indices outside [0, {numel}): {int(lo)}..{int(hi)}")
        want = index_dtype(numel)
        if self.indices.dtype != want:
            object.__setattr__(self, "indices", self.indices.to(want))
        if self.indices.numel() != self.values.numel():
            raise ValueError(f"{self.indices.numel()} indices but {self.values.numel()} values")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def is_dense(self) -> bool:
        return self.indices is None

    def flat_indices(self) -> torch.Tensor:
        """(nnz,) positions (``index_dtype(numel)``), materialised for dense tensors too."""
        if self.indices is None:
            return torch.arange(self.numel, dtype=index_dtype(self.numel), device=self.values.device)
        return self.indices

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense tensor, in ``dtype`` (default: the values' dtype; float32 for values
        held as bfloat16, as a decoded vector's would be)."""
        dtype = dtype or (torch.float32 if self.values.dtype == torch.bfloat16 else self.values.dtype)
        if self.indices is None:
            return self.values.to(dtype).reshape(self.shape).clone()
        out = torch.zeros(self.numel, dtype=dtype, device=self.values.device)
        out[self.indices] = self.values.to(dtype)
        return out.reshape(self.shape)

    @classmethod
    def from_held(cls, shape: tuple[int, ...], values: torch.Tensor, held: torch.Tensor) -> SparseTensor:
        """From flat dense ``values`` and the flat bool ``held`` entries: dense when every
        entry is held, else the held entries (the form ``SparseTaskVector.add`` gives)."""
        if bool(held.all()):
            return cls(shape, None, values)
        idx = torch.nonzero(held).reshape(-1)
        return cls(shape, idx, values[idx])

    def mask(self) -> torch.Tensor:
        """Boolean tensor of ``shape``: True where an entry is kept."""
        if self.indices is None:
            return torch.ones(self.shape, dtype=torch.bool)
        out = torch.zeros(self.numel, dtype=torch.bool)
        out[self.indices] = True
        return out.reshape(self.shape)


_PIECE = 1 << 23  # bits unpacked at a time (a multiple of 8)


def _is_support(t: SparseTensor) -> bool:
    """Whether ``t``'s values are one shared zero (a zero-stride view: ``support``)."""
    return t.nnz > 1 and t.values.stride(0) == 0 and not bool(t.values[:1].any())


@dataclass(frozen=True)
class PackedTensor:
    """A sparse tensor held as its support's bitmap and dense values.

    shape:  the parameter's shape.
    bits:   (ceil(numel / 8),) uint8: bit ``i`` (numpy's ``packbits`` order) set where entry
            ``i`` is held.
    dense:  (numel,) the held entries' values at their positions, zeros elsewhere (``add``
            relies on it); for a support (``SparseTaskVector.support``), one shared zero (a
            zero-stride view).
    nnz:    how many entries are held (the bits set).
    """

    shape: tuple[int, ...]
    bits: torch.Tensor
    dense: torch.Tensor
    nnz: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @staticmethod
    def smaller(numel: int, nnz: int, value_bytes: int) -> bool:
        """Whether the packed form of a tensor takes fewer bytes than positions and values
        (``value_bytes`` 0: a support, whose values cost nothing either way), and the
        tensor is not whole (a whole tensor is dense, smaller still)."""
        return nnz < numel and (numel + 7) // 8 + numel * value_bytes < nnz * (
            index_dtype(numel).itemsize + value_bytes
        )

    @classmethod
    def pack(cls, t: SparseTensor) -> PackedTensor:
        held = np.zeros(t.numel, dtype=bool)
        idx = t.flat_indices().cpu()
        held[idx.numpy()] = True
        if _is_support(t):  # its one shared zero stays shared
            dense = t.values[:1].expand(t.numel)
        else:
            dense = torch.zeros(t.numel, dtype=t.values.dtype)
            dense[idx] = t.values.detach().cpu()
        return cls(tuple(t.shape), torch.from_numpy(np.packbits(held)), dense, t.nnz)

    def held(self) -> torch.Tensor:
        """(numel,) bool: True where an entry is held."""
        return torch.from_numpy(np.unpackbits(self.bits.numpy(), count=self.numel).view(bool))

    def unpack(self) -> SparseTensor:
        """The same tensor as positions and values (each call builds them anew): positions
        found a piece of ``_PIECE`` bits at a time, straight into their int32 (or int64) array."""
        bits = self.bits.numpy()
        idx = np.empty(self.nnz, dtype=np.int32 if index_dtype(self.numel) == torch.int32 else np.int64)
        at = 0
        for lo in range(0, self.numel, _PIECE):
            held = np.unpackbits(bits[lo // 8 : (lo + _PIECE) // 8 + 1], count=min(_PIECE, self.numel - lo))
            piece = np.flatnonzero(held)
            idx[at : at + piece.size] = piece + lo
            at += piece.size
        if at != self.nnz:
            raise ValueError(f"a packed tensor's bitmap holds {at} entries, it says {self.nnz}")
        t = torch.from_numpy(idx)
        vals = self.dense[t] if self.dense.stride(0) else self.dense[:1].expand(self.nnz)
        return SparseTensor(self.shape, t, vals)


class SparseTaskVector(Mapping[str, SparseTensor]):
    """An ordered mapping ``parameter name -> SparseTensor``; a tensor may be stored packed
    (``PackedTensor``, see ``packed``) and is read as a ``SparseTensor`` all the same."""

    def __init__(self, tensors: Mapping[str, SparseTensor | PackedTensor] | None = None) -> None:
        if isinstance(tensors, SparseTaskVector):  # as stored: reading would unpack each
            tensors = tensors._tensors
        self._tensors: dict[str, SparseTensor | PackedTensor] = dict(tensors or {})

    def __getitem__(self, name: str) -> SparseTensor:
        t = self._tensors[name]
        return t.unpack() if isinstance(t, PackedTensor) else t

    def __contains__(self, name: object) -> bool:  # Mapping's would read (unpack) the tensor
        return name in self._tensors

    def stored(self, name: str) -> SparseTensor | PackedTensor:
        """Tensor ``name`` as stored (packed or not), without unpacking it."""
        return self._tensors[name]

    def packed(self) -> SparseTaskVector:
        """The same vector, each tensor packed where that is smaller (``PackedTensor.smaller``)."""
        out = {}
        for name, t in self._tensors.items():
            if isinstance(t, SparseTensor) and PackedTensor.smaller(
                t.numel,
                t.nnz,
                0 if _is_support(t) else t.values.element_size(),  # a support's values cost nothing
            ):
                t = PackedTensor.pack(t)
            out[name] = t
        return SparseTaskVector(out)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return f"SparseTaskVector({len(self)} tensors, nnz={self.nnz:,} of {self.numel:,})"

    @property
    def nnz(self) -> int:
        return sum(t.nnz for t in self._tensors.values())

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self._tensors.values())

    @property
    def density(self) -> float:
        return self.nnz / max(self.numel, 1)

    @classmethod
    def from_dense(
        cls,
        delta: Mapping[str, torch.Tensor],
        mask: Mapping[str, torch.Tensor] | None = None,
    ) -> SparseTaskVector:
        """Keep ``delta`` where ``mask`` is True; with no mask (or a tensor absent from it)
        the tensor is kept dense. Names in ``mask`` must exist in ``delta``."""
        mask = mask or {}
        missing = set(mask) - set(delta)
        if missing:
            raise ValueError(f"mask names tensors the delta lacks: {sorted(missing)[:5]}")
        out = {}
        for name, d in delta.items():
            flat = d.detach().reshape(-1)
            if name in mask:
                m = mask[name]
                if tuple(m.shape) != tuple(d.shape):
                    raise ValueError(f"{name}: mask shape {tuple(m.shape)} != delta shape {tuple(d.shape)}")
                idx = torch.nonzero(m.reshape(-1), as_tuple=False).reshape(-1)
                out[name] = SparseTensor(tuple(d.shape), idx, flat[idx].clone())
            else:
                out[name] = SparseTensor(tuple(d.shape), None, flat.clone())
        return cls(out)

    def to_dense(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {name: t.to_dense(dtype) for name, t in self.items()}

    def masks(self) -> dict[str, torch.Tensor]:
        return {name: t.mask() for name, t in self.items()}

    def support(self) -> SparseTaskVector:
        """The same entries with no values of their own: every value is one shared zero (a
        zero-stride view), so a layout to decode values-only payloads against costs its
        positions alone (shared with ``self``'s: the server's registered mask costs nothing
        beside the decoded upload it came with). A packed tensor stays packed."""
        zero = torch.zeros(1)
        out = {}
        for name in self:
            t = self._tensors[name]
            if isinstance(t, PackedTensor):
                out[name] = PackedTensor(t.shape, t.bits, zero.expand(t.numel), t.nnz)
            else:
                out[name] = SparseTensor(t.shape, t.indices, zero.expand(t.nnz))
        return SparseTaskVector(out)

    def with_values(self, values: Mapping[str, torch.Tensor]) -> SparseTaskVector:
        """Same layout (shapes and indices), new values."""
        return SparseTaskVector({n: SparseTensor(t.shape, t.indices, values[n]) for n, t in self.items()})

    @torch.no_grad()
    def add(self, other: SparseTaskVector, scale: float = 1.0) -> SparseTaskVector:
        """``self + scale * other`` on the union of both supports, tensor by tensor (one
        dense buffer of one tensor at a time). A tensor whose union covers every entry is
        stored dense. Shapes of shared names must agree."""
        out = {}
        for name in dict.fromkeys([*self._tensors, *other._tensors]):
            a, b = self._tensors.get(name), other._tensors.get(name)
            if a is not None and b is not None and a.shape != b.shape:
                raise ValueError(f"{name}: shapes {a.shape} and {b.shape} differ")
            shape = (a or b).shape
            numel = math.prod(shape)
            acc = torch.zeros(numel, dtype=torch.float32)
            held = torch.zeros(numel, dtype=torch.bool)
            for t, s in ((a, 1.0), (b, scale)):
                if t is None:
                    continue
                if isinstance(t, PackedTensor):  # its dense values and bitmap as they are stored
                    acc += t.dense.float() * s  # zeros where nothing is held
                    held |= t.held()
                    continue
                idx = t.flat_indices().cpu()
                acc.index_add_(0, idx, t.values.detach().float().cpu() * s)
                held[idx] = True
            out[name] = SparseTensor.from_held(shape, acc, held)
        return SparseTaskVector(out)

    @torch.no_grad()
    def apply_to(self, params: Mapping[str, torch.Tensor] | torch.nn.Module, scale: float = 1.0) -> None:
        """In place: ``param += scale * delta`` at the kept entries (accumulated in the
        parameter's dtype). Raises ValueError on a tensor the target lacks."""
        target = dict(params.named_parameters()) if isinstance(params, torch.nn.Module) else params
        for name, t in self.items():
            if name not in target:
                raise ValueError(f"task vector tensor {name!r} not found in the target")
            p = target[name]
            if tuple(p.shape) != t.shape:
                raise ValueError(f"{name}: shape {tuple(p.shape)} != task vector shape {t.shape}")
            flat = p.data.view(-1)
            vals = t.values.to(device=flat.device, dtype=flat.dtype)
            if scale != 1.0:
                vals = vals * scale
            if t.indices is None:
                flat.add_(vals)
            else:
                flat.index_add_(0, t.indices.to(flat.device), vals)

    def save(self, path: str | Path) -> None:
        """Store as safetensors: ``<name>::values`` (float32) and, for sparse tensors,
        ``<name>::indices`` (int64): the format's types, whatever the tensor holds in memory;
        shapes in the metadata. Never pickle."""
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, str] = {"format": "fl_lota.task_vector.v1", "names": json.dumps(list(self._tensors))}
        for name, t in self.items():
            v = t.values.float().contiguous()
            if v.untyped_storage().nbytes() != v.numel() * v.element_size():
                v = v.clone()  # a view into a decoded payload's one block: safetensors stores its own
            tensors[f"{name}::values"] = v
            if t.indices is not None:
                tensors[f"{name}::indices"] = t.indices.to(torch.int64).contiguous()
            meta[f"shape::{name}"] = ",".join(str(s) for s in t.shape)
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> SparseTaskVector:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"task vector file not found: {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "fl_lota.task_vector.v1":
            raise ValueError(f"{path} is not an fl_lota task vector (format={meta.get('format')!r})")
        raw = load_file(str(path))
        out = {}
        for name in json.loads(meta["names"]):  # metadata is a JSON object: keep order explicitly
            shape_s = meta[f"shape::{name}"]
            shape = tuple(int(s) for s in shape_s.split(",")) if shape_s else ()
            # popped: each file tensor is dropped once it is held in its own dtype
            out[name] = SparseTensor(shape, raw.pop(f"{name}::indices", None), raw.pop(f"{name}::values"))
        return cls(out)
