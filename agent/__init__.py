"""gradwatch agent: in-process statistics and the background sender.

Importing this package imports nothing heavy; `gradwatch.attach` loads `gradwatch.agent.monitor` on first use,
and grpc is imported only when an enabled Monitor starts.

Module map (each module's docstring states its contract):
    api.py       Monitor: the public interface attach() returns (AgentMonitor and NoopMonitor implement it)
    monitor.py   attach(), AgentMonitor, NoopMonitor: the step (training thread)
    dispatch.py  process-wide hooks filtered to the attached modules and optimizers (nothing stored on them)
    assembly.py  one report's device vector from everything the hooks captured
    hooks.py     optimizer step hooks: gradients, weights, updates, learning rates
    activations.py  forward hooks: activation, input and label statistics, NaN provenance
    amp.py       the GradScaler tap: skipped steps and the loss scale
    loss.py      the loss of a report, folded over gradient-accumulation micro steps
    budget.py    the overhead budget: stretches the full-statistics cadence
    actions.py   opt-in reactions to critical alerts (flag, callback, TrainingAlert)
    guard.py     the spike and NaN guard (settings guard_config.py, robust windows guard_window.py, the
                 global gradient norm guard_norm.py, state copies guard_state.py, rollback guard_rollback.py);
                 autopsy.py: the report's guard verdict, batch ids, top samples
    timing.py    when each step's first forward pass starts
    collectives.py  collective progress, stuck-thread stacks, monitor.pause(), the opt-in DDP timing hook
    checksum_cadence.py  when the parameter checksum is taken; replica.py: the replica group sent in Hello
    update_cadence.py    when the update ratio is measured between full-statistics steps
    clip.py      gradwatch.clip_grad_norm_: torch's clip, whose per-gradient norms the statistics reuse
    histogram.py log2-magnitude histograms on the device
    fold.py      per-parameter values folded into per-layer columns (sender thread)
    config.py    AgentConfig, RetryPolicy: every option, its GRADWATCH_* variable and default
    schema.py    the layer schema and the (device, dtype) parameter groups
    stats.py     on-device statistics with foreach kernels, no host sync; sampling.py: fixed block samples
    stacks.py    full-step reductions of same-shape tensors in stacks (a constant op count per shape)
    module_stats.py  statistics of one module output, or of a stack of same-shape outputs
    vector.py    where each value sits in the one tensor a report moves to the host
    snapshot.py  the only device→host transfer (pinned copy + event; waited on by the sender)
    items.py     plain data handed from the training thread to the sender
    sender.py    the sender thread: stream, acks, replay buffer, reconnect, close/flush
    stream.py    gRPC plumbing: one open Ingest.Stream, the one-shot Ingest.Flush
    transport.py the server replica (gradwatch.routing: rendezvous hashing), channel credentials, bearer token
    replay.py    the bounded replay buffer with the pinned first non-finite frame
    wire.py      items → gradwatch.v1 protobuf frames
    counters.py  sent/acked/dropped counters behind Monitor.counters()
    errors.py    the one choke point for internal errors (strict mode for tests)
    process.py   fork safety (inert children) and the atexit flush
"""
