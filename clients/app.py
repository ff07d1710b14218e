"""The ClientApp: one federated client, one task (``fl_lota.fedclient`` does the work).

Its partition comes from the node config (``partition-id``: set by the simulation engine,
or by ``flower-supernode --node-config "partition-id=0 num-partitions=4"``); its task and
every setting from the run config. The LoTA mask lives in the node state between rounds.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_lota.console import quiet_libraries
from fl_lota.fedclient import LocalNode
from fl_lota.runconfig import RunConfig

from .wire import ARRAYS, CONFIG, METRICS, PAYLOAD, STATE, fltv_array, payloads

app = ClientApp()

_NODES: dict[tuple[RunConfig, int], LocalNode] = {}


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


@app.train()
def train(msg: Message, context: Context) -> Message:
    node = _node(context)
    received = payloads(msg.content[ARRAYS])
    config = msg.content[CONFIG]
    run_tag = str(config.get("fl-lota-run", ""))
    state = context.state.array_records.get(STATE)
    mask_payload = payloads(state)[""] if state is not None and PAYLOAD in state else node.load_mask(run_tag)
    out = node.train(
        received[""],
        mask_payload,
        server_round=int(config["server-round"]),
        eval_start=bool(config.get("eval-start", False)),
        eval_local=bool(config.get("eval-local", False)),
        register_mask=bool(config.get("register-mask", False)),
    )
    if out.mask_payload is not None:  # keep the mask for the values-only rounds
        context.state[STATE] = ArrayRecord({PAYLOAD: fltv_array(out.mask_payload)})
        node.save_mask(run_tag, out.mask_payload)
    content = RecordDict({ARRAYS: ArrayRecord({PAYLOAD: fltv_array(out.payload)}), METRICS: MetricRecord(out.metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    node = _node(context)
    received = payloads(msg.content[ARRAYS])
    config = msg.content[CONFIG]
    primary = str(config.get("merge", "global"))
    candidates = {(name or primary): p for name, p in received.items()}
    return Message(content=RecordDict({METRICS: MetricRecord(node.evaluate(candidates))}), reply_to=msg)
