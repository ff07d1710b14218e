"""fl_lota.federated.downlink: clients keep G, the server sends what changed since the version each holds;
every client ends with the server's G bit for bit, whatever rounds it missed or state it lost."""

from __future__ import annotations

import random

import pytest
import torch

from fl_lota.federated.downlink import (
    DownlinkError,
    canonical,
    change,
    digest,
    encode_exact,
    held_from,
    overwrite,
    receive,
    rounded,
    same_support,
    to_keep,
)
from fl_lota.federated.downlink_server import Downlink
from fl_lota.federated.protocol import EMPTY, GlobalRef, ProtocolError
from fl_lota.vectors import codec
from fl_lota.vectors.task_vector import PackedTensor, SparseTaskVector, SparseTensor

SHAPES = {"a": (40, 50), "b": (300,), "c": (8, 8)}


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def _random_update(gen: torch.Generator, density: float) -> SparseTaskVector:
    out = {}
    for name, shape in SHAPES.items():
        numel = int(torch.tensor(shape).prod())
        if name == "c":  # one tensor dense, as FFT's are
            out[name] = SparseTensor(shape, None, torch.randn(numel, generator=gen))
            continue
        idx = torch.nonzero(torch.rand(numel, generator=gen) < density).reshape(-1)
        out[name] = SparseTensor(shape, idx, torch.randn(idx.numel(), generator=gen))
    return SparseTaskVector(out)


def _as_server_holds(tv: SparseTaskVector, values: str = "bf16") -> SparseTaskVector:
    """G as the server keeps it: decoded from its wire encoding."""
    return codec.decode(codec.encode(tv, values=values))


def _same(x: SparseTaskVector, y: SparseTaskVector) -> bool:
    if list(x) != list(y):
        return False
    for n in x:
        a, b = x[n], y[n]
        if a.shape != b.shape or (a.indices is None) != (b.indices is None):
            return False
        if a.indices is not None and not torch.equal(a.indices, b.indices):
            return False
        if not torch.equal(a.values.float(), b.values.float()):
            return False
    return True


def test_a_change_rebuilds_the_new_update_exactly():
    gen = torch.Generator().manual_seed(0)
    old = _as_server_holds(_random_update(gen, 0.1))
    new = _as_server_holds(old.add(_random_update(gen, 0.05)))
    ch = change(old, new)
    assert ch is not None and 0 < ch.nnz < new.nnz + 1
    assert _same(overwrite(old, ch), new) and digest(overwrite(old, ch)) == digest(new)
    # entries left as they were are not sent
    untouched = change(new, new)
    assert untouched is not None and untouched.nnz == 0
    # from nothing, the change is the whole update
    assert _same(overwrite(SparseTaskVector(), change(SparseTaskVector(), new)), new)


def test_a_tensor_with_no_entries_or_another_order_is_the_same_update():
    gen = torch.Generator().manual_seed(5)
    g = _random_update(gen, 0.1)
    empty = SparseTensor((7,), torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    with_empty = SparseTaskVector({"z": empty, **{n: g[n] for n in reversed(list(g))}})
    assert digest(with_empty) == digest(g)
    rebuilt = overwrite(SparseTaskVector(), change(SparseTaskVector(), with_empty))
    assert digest(rebuilt) == digest(with_empty)
    client = _Client()
    server = Downlink("float32")
    server.publish(with_empty)
    client.take(server.for_node("1"))  # the server's G holds an empty tensor; the client rebuilds it
    assert client.d == digest(g)


def test_a_change_cannot_remove_entries():
    t = SparseTaskVector({"b": SparseTensor((10,), torch.tensor([1, 2]), torch.ones(2))})
    smaller = SparseTaskVector({"b": SparseTensor((10,), torch.tensor([1]), torch.ones(1))})
    assert change(t, smaller) is None
    assert change(t, SparseTaskVector()) is None


def test_a_change_is_exact_in_the_runs_dtype_or_falls_back_to_float32():
    gen = torch.Generator().manual_seed(1)
    tv = _random_update(gen, 0.2)
    representable = tv.with_values({n: _bf16(t.values) for n, t in tv.items()})
    p = encode_exact(representable, "bf16")
    assert codec.peek(p).value_dtype == "bf16"
    assert _same(codec.decode(p), representable)
    # values bf16 cannot carry: float32, still exact
    p = encode_exact(tv, "bf16")
    assert codec.peek(p).value_dtype == "float32"
    assert _same(codec.decode(p), tv)
    # int8: a subset of G re-quantized with its own scale would round; it is sent exactly
    g = codec.decode(codec.encode(tv, values="int8"))
    sub = change(SparseTaskVector({"a": g["a"]}), g)
    assert _same(codec.decode(encode_exact(sub, "int8")), sub)


class _Client:
    """Keeps G as the ClientApp does: the payloads as they came (``to_keep``), read back
    (``held_from``) for every message, so what it keeps is what it rebuilds from."""

    def __init__(self, values: str = "bf16") -> None:
        self.values = values
        self.kept: tuple[bytes, bytes | None] | None = None
        self.g: SparseTaskVector | None = None
        self.d: str | None = None

    def take(self, sent) -> None:
        held = self.g if self.kept is None else held_from(*self.kept)
        if self.kept is not None:
            assert digest(held) == self.d  # what it kept is what it held
        self.g, d = receive(held, self.d, sent.payload, sent.ref)
        if d != self.d:
            layout = None if self.kept is None else self.kept[0]
            self.kept = to_keep(layout, self.g, sent.payload, sent.ref, self.values)
        self.d = d


@pytest.mark.parametrize("values", ["bf16", "int8", "float32"])
def test_clients_that_miss_rounds_or_lose_state_end_with_the_servers_update(values):
    rng, gen = random.Random(0), torch.Generator().manual_seed(2)
    server = Downlink(values, keep=2)
    clients = {str(i): _Client(values) for i in range(5)}
    g = SparseTaskVector()
    for rnd in range(8):
        sampled = [n for n in clients if rng.random() < 0.5] or ["0"]
        if rnd == 5:
            clients["3"] = _Client(values)  # lost its state (a restarted SuperNode)
        for n in sampled:
            sent = server.for_node(n)
            try:
                clients[n].take(sent)
            except DownlinkError as e:
                assert "lost its state" in str(e)
                server.forget(n)
                continue
            server.confirm(n)
            assert clients[n].d == server.digest and _same(clients[n].g, server.tv)
        g = _as_server_holds(g.add(_random_update(gen, 0.03)), values)
        server.publish(g)
        assert len(server.versions) <= 2
    for n, c in clients.items():  # one more message each: everyone holds G exactly
        sent = server.for_node(n)
        try:
            c.take(sent)
        except DownlinkError:
            server.forget(n)
            c.take(server.for_node(n))
        assert _same(c.g, g) and c.d == digest(g)


def test_clients_end_with_the_servers_update_when_the_server_holds_it_packed():
    """G grows dense enough that the server packs it (as the aggregator holds it); what the
    clients rebuild, from changes and values alone, is the same update."""
    gen = torch.Generator().manual_seed(5)
    server = Downlink("bf16", keep=2)
    clients = {str(i): _Client("bf16") for i in range(3)}
    g = SparseTaskVector()
    packed_seen = False
    for rnd in range(5):
        for n in clients if rnd != 2 else ["0"]:  # two clients miss round 2
            sent = server.for_node(n)
            clients[n].take(sent)
            server.confirm(n)
            assert clients[n].d == server.digest and _same(clients[n].g, server.tv)
        grow = g.add(_random_update(gen, 0.3)) if rnd < 3 else g.with_values({k: t.values * 2 for k, t in g.items()})
        g = codec.decode(codec.encode(grow, values="bf16"), native=True, pack=True)
        packed_seen |= any(isinstance(g.stored(k), PackedTensor) for k in g)
        server.publish(g)
        if packed_seen:  # the server keeps G as given: packed, no unpacked copy beside it
            assert any(isinstance(server.tv.stored(k), PackedTensor) for k in server.tv)
    assert packed_seen
    for n, c in clients.items():
        c.take(server.for_node(n))
        assert c.d == digest(g) and _same(c.g, g)


def test_a_client_that_holds_the_update_already_is_sent_almost_nothing_and_a_change_is_small():
    gen = torch.Generator().manual_seed(3)
    server, client = Downlink("bf16"), _Client()
    g = _as_server_holds(_random_update(gen, 0.3))
    server.publish(g)
    client.take(server.for_node("1"))
    server.confirm("1")
    whole = len(server.whole())
    again = server.for_node("1")
    assert again.base == server.digest and len(again.payload) < 200
    client.take(again)
    # a round that touched a tenth of G's entries
    touched = SparseTaskVector({"a": SparseTensor((40, 50), g["a"].indices[::10], torch.ones(g["a"].nnz // 10 + 1))})
    server.confirm("1")
    g2 = _as_server_holds(g.add(touched))
    server.publish(g2)
    sent = server.for_node("1")
    assert sent.base != "nothing" and len(sent.payload) < whole / 3
    client.take(sent)
    assert _same(client.g, g2)


def test_a_change_from_a_version_the_client_does_not_hold_is_refused():
    gen = torch.Generator().manual_seed(4)
    server = Downlink("bf16")
    a, b = _Client(), _Client()
    server.publish(_as_server_holds(_random_update(gen, 0.2)))
    a.take(server.for_node("a"))
    server.confirm("a")
    server.publish(_as_server_holds(server.tv.add(_random_update(gen, 0.05))))
    sent = server.for_node("a")
    with pytest.raises(DownlinkError, match="holds nothing"):
        b.take(sent)
    # a payload tampered with on the way: the digest says so
    ch = change(a.g, server.tv)
    name = next(iter(ch))
    tampered = ch.with_values({n: t.values + (1.0 if n == name else 0.0) for n, t in ch.items()})
    bad = type(sent)(codec.encode(tampered, values="float32"), sent.base, sent.digest)
    with pytest.raises(DownlinkError, match="does not match"):
        a.take(bad)
    with pytest.raises(ProtocolError, match="g-base"):
        receive(None, None, sent.payload, GlobalRef.from_config({}))


def test_a_change_on_the_same_support_goes_as_values_alone():
    """LoTA from round 2: every client trains its fixed mask, so every entry of G changes but
    its support does not: the change is G's values, no index."""
    gen = torch.Generator().manual_seed(6)
    g1 = _as_server_holds(_random_update(gen, 0.3))
    g2 = _as_server_holds(g1.add(g1.with_values({n: torch.randn(t.nnz, generator=gen) for n, t in g1.items()})))
    server, client = Downlink("bf16"), _Client()
    server.publish(g1)
    client.take(server.for_node("1"))
    server.confirm("1")
    server.publish(g2)
    sent = server.for_node("1")
    indexed = encode_exact(change(g1, g2), "bf16")
    assert sent.mode == "values" and len(sent.payload) < 0.9 * len(indexed)
    client.take(sent)
    assert _same(client.g, server.tv) and client.d == digest(g2)
    assert client.kept[1] is sent.payload  # kept as it came: the values beside the layout, no encoding
    server.confirm("1")
    g3 = _as_server_holds(g2.add(g2.with_values({n: torch.randn(t.nnz, generator=gen) for n, t in g2.items()})))
    server.publish(g3)
    sent3 = server.for_node("1")
    client.take(sent3)  # rebuilt from the kept layout and values
    assert sent3.mode == "values" and _same(client.g, server.tv)
    # values that do not fit the client's support are refused, not misplaced
    other = _Client()
    other.g, other.d = _as_server_holds(_random_update(gen, 0.1)), sent.base  # the base's name, another support
    with pytest.raises(DownlinkError):
        other.take(sent)
    with pytest.raises(DownlinkError, match="g-mode"):
        receive(None, None, sent.payload, GlobalRef.from_config(sent.ref.to_config() | {"g-base": "nothing"}))


def test_prepare_encodes_at_publish_what_each_node_is_then_sent(monkeypatch):
    """``prepare`` (called once G is published) encodes the change from every version a
    node holds and the whole update; ``for_node`` then encodes nothing and sends what it
    would have sent without ``prepare``."""
    import fl_lota.federated.downlink_server as dl

    gen = torch.Generator().manual_seed(11)
    g1 = _as_server_holds(_random_update(gen, 0.3))
    g2 = _as_server_holds(g1.add(g1.with_values({n: torch.randn(t.nnz, generator=gen) for n, t in g1.items()})))
    g3 = _as_server_holds(g2.add(_random_update(gen, 0.05)))  # the support grows: an indexed change
    sent = {}
    for prepared in (False, True):
        server = Downlink("bf16")
        server.publish(g1)
        for n in ("a", "b"):
            server.for_node(n)
            server.confirm(n)
        server.publish(g2)
        server.for_node("a")
        server.confirm("a")  # a holds g2, b holds g1
        server.publish(g3)
        if prepared:
            assert server.prepare() >= 0
            monkeypatch.setattr(dl, "encode_exact", lambda *a, **k: pytest.fail("for_node encoded after prepare"))
        sent[prepared] = {n: server.for_node(n) for n in ("a", "b", "new")}
        monkeypatch.undo()
    for n in ("a", "b", "new"):
        assert sent[True][n].payload == sent[False][n].payload and sent[True][n].ref == sent[False][n].ref, n
    assert sent[True]["a"].base != sent[True]["b"].base  # two versions held, two changes prepared


def test_a_node_whose_reply_never_came_is_sent_the_whole_update():
    """A message went out and no reply came back (a timeout): the node holds either that
    message's version or the one before, so the next message must suit both."""
    gen = torch.Generator().manual_seed(7)
    server, client = Downlink("bf16"), _Client()
    server.publish(_as_server_holds(_random_update(gen, 0.2)))
    client.take(server.for_node("1"))
    server.confirm("1")
    server.publish(_as_server_holds(server.tv.add(_random_update(gen, 0.05))))
    client.take(server.for_node("1"))  # applied, but the reply is lost: no confirm
    server.publish(_as_server_holds(server.tv.add(_random_update(gen, 0.05))))
    sent = server.for_node("1")
    assert sent.base == "nothing"
    client.take(sent)
    assert _same(client.g, server.tv)


def test_a_digest_does_not_depend_on_the_dtype_positions_are_held_in():
    """Positions are hashed as int64 bytes: a digest a client stored before indices were held
    as int32 names the same version now (else every client would be sent all of G again)."""
    import hashlib

    tv = SparseTaskVector({"w": SparseTensor((6,), torch.tensor([1, 4]), torch.tensor([0.5, -2.0]))})
    assert tv["w"].indices.dtype == torch.int32
    h = hashlib.blake2b(digest_size=16)
    h.update(b"w\0" + repr((6,)).encode())
    h.update(torch.tensor([1, 4], dtype=torch.int64).numpy().tobytes())
    h.update(torch.tensor([0.5, -2.0]).numpy().tobytes())
    assert digest(tv) == h.hexdigest()


def test_changes_between_packed_updates_are_those_between_unpacked_ones_and_leave_them_intact():
    gen = torch.Generator().manual_seed(9)
    old = _random_update(gen, 0.6)  # float32 values: packing is smaller above about 52%
    new = old.add(_random_update(gen, 0.2))
    p_old, p_new = old.packed(), new.packed()
    assert any(isinstance(p_old.stored(k), PackedTensor) for k in p_old)
    before = {k: t.values.clone() for k, t in p_old.items()}
    assert _same(change(p_old, p_new), change(old, new))
    assert same_support(canonical(p_old), canonical(old)) and not same_support(canonical(p_old), canonical(p_new))
    assert same_support(canonical(p_new), canonical(new.packed()))  # two bitmaps compared as bitmaps
    rebuilt = overwrite(p_old, change(p_old, p_new))
    assert digest(rebuilt) == digest(new)
    assert all(torch.equal(p_old[k].values, v) for k, v in before.items())  # float32, packed: not written into


def _lota_changes(gen: torch.Generator, rounds: int) -> list[SparseTaskVector]:
    """Each round's merge as LoTA makes it: round 1 makes the support, later rounds change
    every value on it (fixed masks)."""
    first = _random_update(gen, 0.2)
    return [first] + [first.with_values({n: 0.1 * torch.randn(t.nnz, generator=gen) for n, t in first.items()})] * (
        rounds - 1
    )


@pytest.mark.parametrize("values", ["int8", "int4"])
def test_a_rounding_downlink_sends_the_rounded_change_and_every_client_ends_with_the_servers_update(values):
    """downlink-values int8/int4: G is the held G plus the round's merge rounded. A client
    that holds the version before (round 1: the empty G its training message brought) gets
    the rounded change (codes; no indices once the support is fixed); a client that missed
    rounds, or holds nothing, gets that same G exactly; all end with the server's G bit for
    bit, within half a code step of the exact sum per round."""
    gen = torch.Generator().manual_seed(11)
    server = Downlink("bf16")
    every, late, missed = _Client(), _Client(), _Client()
    for c in (every, missed):  # round 1's training message: the empty G
        c.take(server.for_node(str(id(c))))
        server.confirm(str(id(c)))
    g = SparseTaskVector()
    for rnd, merged in enumerate(_lota_changes(gen, 4)):
        g_before = g
        g, step = rounded(g, merged, values)
        server.publish(g, encode_exact(g, "bf16"), step)
        sent = server.for_node(str(id(every)))
        assert sent.mode == ("add" if rnd == 0 else "add-values") and sent.payload is step.payload
        assert codec.peek(sent.payload).value_dtype == values
        assert codec.peek(sent.payload).values_only == (rnd > 0)
        every.take(sent)
        server.confirm(str(id(every)))
        assert every.d == server.digest == digest(g) and _same(every.g, g)
        code_max = {"int8": 127, "int4": 7}[values]
        want = canonical(g_before).add(merged)
        for name, t in canonical(g).items():
            err = (t.values.float() - want[name].values.float()).abs().max()
            assert err <= merged[name].values.abs().max() / code_max / 2 * (1 + 1e-5) + 1e-6
        assert any(not torch.equal(t.values.float(), want[n].values.float()) for n, t in canonical(g).items())
        if rnd == 0:  # round 1 only: "missed" sits out the later rounds
            missed.take(server.for_node(str(id(missed))))
            server.confirm(str(id(missed)))
    sent = server.for_node(str(id(missed)))  # holds round 1's G: an exact change to the rounded G
    assert sent.mode in ("entries", "values")  # exact: the step is from the version before the last
    missed.take(sent)
    sent = server.for_node("late")  # holds nothing: the rounded G whole, exactly
    assert sent.mode == "entries" and sent.base == EMPTY
    late.take(sent)
    for c in (late, missed):
        assert _same(c.g, every.g) and c.d == every.d
    # a rounded change is smaller than G's exact values on the same support
    exact_values = encode_exact(g, "bf16", values_only=True)
    assert len(server.for_node(str(id(every))).payload) < 256  # holds the current version: a header, no values
    assert len(step.payload) < (0.6 if values == "int8" else 0.35) * len(exact_values)


def test_a_rounded_change_applies_only_onto_the_version_it_is_from():
    gen = torch.Generator().manual_seed(12)
    c1, c2 = _lota_changes(gen, 2)
    g1_exact = c1
    g1, step1 = rounded(SparseTaskVector(), c1, "int4")
    g2, step2 = rounded(g1, c2, "int4")
    server = Downlink("bf16")
    server.publish(g1, None, step1)
    with pytest.raises(DownlinkError, match="published onto"):
        server.publish(g2, None, step1)  # a step from another version
    # a client holding another version than the step's base (the exact G1, not the rounded
    # one the step adds to) is refused, never misled
    ref = GlobalRef(step2.base, digest(g2), step2.mode)
    with pytest.raises(DownlinkError, match="lost its state"):
        receive(g1_exact, digest(g1_exact), step2.payload, ref)
    # the rounded change added to another G that claims the base's digest: the digest check refuses it
    with pytest.raises(DownlinkError, match="does not match"):
        receive(g1_exact, step2.base, step2.payload, ref)
    assert receive(g1, step2.base, step2.payload, ref)[1] == digest(g2)
    with pytest.raises(DownlinkError, match="g-mode"):
        receive(None, None, step2.payload, GlobalRef(EMPTY, digest(g2), "add-values"))
