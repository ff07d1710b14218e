"""The ClientApp: one federated client, one task (``fl_lota.federated.node`` does the work).

Its partition comes from the node config (``partition-id``: set by the simulation engine,
or by ``flower-supernode --node-config "partition-id=0 num-partitions=4"``); its task and
every setting from the run config. The node state keeps, between rounds, the LoTA mask and
the global update ``G`` this node holds: messages carry only the change of ``G`` since then
(``fl_lota.federated.downlink``), and a node that cannot rebuild the ``G`` the server names fails its
round with a named error (the server then sends it the whole of ``G``).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import fl_lota.preload  # noqa: F401  (first: the model libraries in one thread at a time)
from fl_lota.federated.console import quiet_libraries
from fl_lota.federated.downlink import held_from, receive, to_keep
from fl_lota.federated.node import LocalNode
from fl_lota.federated.protocol import EvalInstruction, GlobalRef, TrainInstruction
from fl_lota.federated.runconfig import RunConfig
from fl_lota.vectors.task_vector import SparseTaskVector
from wire import ARRAYS, METRICS, PAYLOAD, config_of, payload_record, payloads, primary, record

app = ClientApp()

_NODES: dict[tuple[RunConfig, int], LocalNode] = {}
# node state, kept between rounds: the LoTA mask (the payload that registered it), and the
# G this node holds as the payloads it came in (fl_lota.federated.downlink.to_keep) with its digest
MASK, HELD, HELD_VALUES, HELD_DIGEST = "fl-lota", "fl-lota-g", "fl-lota-g-values", "fl-lota-g-digest"
_DECODED: dict[str, SparseTaskVector] = {}  # digest -> the held G decoded (the last one, per process)


def gpu_share() -> str:
    """This client's share of the GPU, for an out-of-memory error: under the Ray simulation
    the GPU fraction its actor holds (``client-resources-num-gpus``); on a SuperNode, which
    runs one client per process, the whole of the GPUs that process sees."""
    try:
        import ray

        if ray.is_initialized():
            share = ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0)
            return f"client-resources-num-gpus={share:g} (Ray simulation)"
    except Exception:  # no Ray, or not in a Ray worker: a SuperNode
        pass
    return "the whole GPU (one client per SuperNode process)"


def _node(context: Context) -> LocalNode:
    cfg = RunConfig.from_run_config(context.run_config)
    if "partition-id" not in context.node_config:
        raise ValueError("node config lacks 'partition-id'; start the SuperNode with --node-config 'partition-id=N'")
    pid = int(context.node_config["partition-id"])
    if (cfg, pid) not in _NODES:  # data is built once per process and client
        quiet_libraries(cfg.verbose)
        _NODES.clear()
        _NODES[(cfg, pid)] = LocalNode(cfg, pid, gpu_share=gpu_share())
    return _NODES[(cfg, pid)]


def global_update(cfg: RunConfig, payload: bytes, ref: GlobalRef, context: Context) -> SparseTaskVector:
    """The G this message names, rebuilt from the node's copy and the change it carries;
    the node keeps the result for the next message."""
    state = context.state
    records = state.array_records
    held_digest = state.config_records[HELD_DIGEST]["digest"] if HELD_DIGEST in state.config_records else None
    layout = primary(records[HELD]) if held_digest is not None and HELD in records else None
    held = None
    if layout is not None:
        held = _DECODED.get(str(held_digest))
        if held is None:
            held = held_from(layout, primary(records[HELD_VALUES]) if HELD_VALUES in records else None)
    g, digest = receive(held, None if held is None else str(held_digest), payload, ref)
    if digest != held_digest:
        layout, values = to_keep(layout, g, payload, ref, cfg.values)
        state[HELD] = payload_record(layout)
        if values is not None:
            state[HELD_VALUES] = payload_record(values)
        elif HELD_VALUES in records:
            del state[HELD_VALUES]
        state[HELD_DIGEST] = ConfigRecord({"digest": digest})
    _DECODED.clear()
    _DECODED[digest] = g
    return g


@app.train()
def train(msg: Message, context: Context) -> Message:
    node = _node(context)
    received = record(msg, ARRAYS, ArrayRecord)
    todo = TrainInstruction.from_config(config_of(msg))
    g = global_update(node.cfg, primary(received), todo.g, context)
    kept = context.state.array_records.get(MASK)
    mask_payload = primary(kept) if kept is not None and PAYLOAD in kept else node.load_mask(todo.run_tag)
    out = node.train(
        g,
        mask_payload,
        server_round=todo.server_round,
        eval_start=todo.eval_start,
        eval_local=todo.eval_local,
        register_mask=todo.register_mask,
    )
    if out.mask_payload is not None:  # keep the mask for the values-only rounds
        context.state[MASK] = payload_record(out.mask_payload)
        node.save_mask(todo.run_tag, out.mask_payload)
    content = RecordDict({ARRAYS: payload_record(out.payload), METRICS: MetricRecord(out.report.to_metrics())})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    node = _node(context)
    received = payloads(record(msg, ARRAYS, ArrayRecord))
    todo = EvalInstruction.from_config(config_of(msg))
    # G as the change from what this node holds; the further merges' G whole (scored once)
    candidates = {
        (name or todo.merge): (global_update(node.cfg, p, todo.g, context) if not name else p)
        for name, p in received.items()
    }
    report = node.evaluate(candidates)
    return Message(content=RecordDict({METRICS: MetricRecord(report.to_metrics())}), reply_to=msg)
