from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProtocolVersion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROTOCOL_VERSION_UNSPECIFIED: _ClassVar[ProtocolVersion]
    PROTOCOL_VERSION_CURRENT: _ClassVar[ProtocolVersion]

class NonFiniteFlag(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NON_FINITE_FLAG_UNSPECIFIED: _ClassVar[NonFiniteFlag]
    NON_FINITE_FLAG_LOSS: _ClassVar[NonFiniteFlag]
    NON_FINITE_FLAG_GRADIENT: _ClassVar[NonFiniteFlag]
    NON_FINITE_FLAG_WEIGHT: _ClassVar[NonFiniteFlag]
    NON_FINITE_FLAG_INPUT: _ClassVar[NonFiniteFlag]
    NON_FINITE_FLAG_ACTIVATION: _ClassVar[NonFiniteFlag]

class GuardSkipReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GUARD_SKIP_REASON_UNSPECIFIED: _ClassVar[GuardSkipReason]
    GUARD_SKIP_REASON_LOSS_NON_FINITE: _ClassVar[GuardSkipReason]
    GUARD_SKIP_REASON_GRAD_NON_FINITE: _ClassVar[GuardSkipReason]
    GUARD_SKIP_REASON_LOSS_SPIKE: _ClassVar[GuardSkipReason]
    GUARD_SKIP_REASON_GRAD_SPIKE: _ClassVar[GuardSkipReason]
    GUARD_SKIP_REASON_ROLLED_BACK: _ClassVar[GuardSkipReason]

class CommandKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMMAND_KIND_UNSPECIFIED: _ClassVar[CommandKind]
    COMMAND_KIND_FULL_STATS: _ClassVar[CommandKind]
    COMMAND_KIND_ALERT: _ClassVar[CommandKind]

class RelayedColumnFlag(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RELAYED_COLUMN_FLAG_UNSPECIFIED: _ClassVar[RelayedColumnFlag]
    RELAYED_COLUMN_FLAG_HAS_LOSS: _ClassVar[RelayedColumnFlag]
    RELAYED_COLUMN_FLAG_HAS_SHARE: _ClassVar[RelayedColumnFlag]
    RELAYED_COLUMN_FLAG_HAS_CHECKSUM: _ClassVar[RelayedColumnFlag]
    RELAYED_COLUMN_FLAG_HAS_PRE_FORWARD: _ClassVar[RelayedColumnFlag]
    RELAYED_COLUMN_FLAG_HAS_BETWEEN: _ClassVar[RelayedColumnFlag]
    RELAYED_COLUMN_FLAG_SKIPPED_STEP: _ClassVar[RelayedColumnFlag]
    RELAYED_COLUMN_FLAG_OVER_BUDGET: _ClassVar[RelayedColumnFlag]
    RELAYED_COLUMN_FLAG_HAS_LOSS_SCALE: _ClassVar[RelayedColumnFlag]
    RELAYED_COLUMN_FLAG_HAS_OUTPUT_SPREAD: _ClassVar[RelayedColumnFlag]
    RELAYED_COLUMN_FLAG_HAS_OUTPUT_RMS: _ClassVar[RelayedColumnFlag]
PROTOCOL_VERSION_UNSPECIFIED: ProtocolVersion
PROTOCOL_VERSION_CURRENT: ProtocolVersion
NON_FINITE_FLAG_UNSPECIFIED: NonFiniteFlag
NON_FINITE_FLAG_LOSS: NonFiniteFlag
NON_FINITE_FLAG_GRADIENT: NonFiniteFlag
NON_FINITE_FLAG_WEIGHT: NonFiniteFlag
NON_FINITE_FLAG_INPUT: NonFiniteFlag
NON_FINITE_FLAG_ACTIVATION: NonFiniteFlag
GUARD_SKIP_REASON_UNSPECIFIED: GuardSkipReason
GUARD_SKIP_REASON_LOSS_NON_FINITE: GuardSkipReason
GUARD_SKIP_REASON_GRAD_NON_FINITE: GuardSkipReason
GUARD_SKIP_REASON_LOSS_SPIKE: GuardSkipReason
GUARD_SKIP_REASON_GRAD_SPIKE: GuardSkipReason
GUARD_SKIP_REASON_ROLLED_BACK: GuardSkipReason
COMMAND_KIND_UNSPECIFIED: CommandKind
COMMAND_KIND_FULL_STATS: CommandKind
COMMAND_KIND_ALERT: CommandKind
RELAYED_COLUMN_FLAG_UNSPECIFIED: RelayedColumnFlag
RELAYED_COLUMN_FLAG_HAS_LOSS: RelayedColumnFlag
RELAYED_COLUMN_FLAG_HAS_SHARE: RelayedColumnFlag
RELAYED_COLUMN_FLAG_HAS_CHECKSUM: RelayedColumnFlag
RELAYED_COLUMN_FLAG_HAS_PRE_FORWARD: RelayedColumnFlag
RELAYED_COLUMN_FLAG_HAS_BETWEEN: RelayedColumnFlag
RELAYED_COLUMN_FLAG_SKIPPED_STEP: RelayedColumnFlag
RELAYED_COLUMN_FLAG_OVER_BUDGET: RelayedColumnFlag
RELAYED_COLUMN_FLAG_HAS_LOSS_SCALE: RelayedColumnFlag
RELAYED_COLUMN_FLAG_HAS_OUTPUT_SPREAD: RelayedColumnFlag
RELAYED_COLUMN_FLAG_HAS_OUTPUT_RMS: RelayedColumnFlag

class AgentFrame(_message.Message):
    __slots__ = ("seq", "hello", "report", "event", "heartbeat", "goodbye", "batch")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    seq: int
    hello: Hello
    report: StepReport
    event: Event
    heartbeat: Heartbeat
    goodbye: Goodbye
    batch: FrameBatch
    def __init__(self, seq: _Optional[int] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., report: _Optional[_Union[StepReport, _Mapping]] = ..., event: _Optional[_Union[Event, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., goodbye: _Optional[_Union[Goodbye, _Mapping]] = ..., batch: _Optional[_Union[FrameBatch, _Mapping]] = ...) -> None: ...

class FrameBatch(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[AgentFrame]
    def __init__(self, frames: _Optional[_Iterable[_Union[AgentFrame, _Mapping]]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol_version", "run_id", "job_name", "rank", "world_size", "local_rank", "host", "pid", "session_id", "agent_version", "torch_version", "device_kind", "full_stats_interval", "schema", "activation_schema", "replica_group", "replica_group_size", "detector_settings")
    class DetectorSettingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_NAME_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_KIND_FIELD_NUMBER: _ClassVar[int]
    FULL_STATS_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    REPLICA_GROUP_FIELD_NUMBER: _ClassVar[int]
    REPLICA_GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_SETTINGS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    run_id: str
    job_name: str
    rank: int
    world_size: int
    local_rank: int
    host: str
    pid: int
    session_id: str
    agent_version: str
    torch_version: str
    device_kind: str
    full_stats_interval: int
    schema: LayerSchema
    activation_schema: LayerSchema
    replica_group: int
    replica_group_size: int
    detector_settings: _containers.ScalarMap[str, str]
    def __init__(self, protocol_version: _Optional[int] = ..., run_id: _Optional[str] = ..., job_name: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., local_rank: _Optional[int] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ..., session_id: _Optional[str] = ..., agent_version: _Optional[str] = ..., torch_version: _Optional[str] = ..., device_kind: _Optional[str] = ..., full_stats_interval: _Optional[int] = ..., schema: _Optional[_Union[LayerSchema, _Mapping]] = ..., activation_schema: _Optional[_Union[LayerSchema, _Mapping]] = ..., replica_group: _Optional[int] = ..., replica_group_size: _Optional[int] = ..., detector_settings: _Optional[_Mapping[str, str]] = ...) -> None: ...

class LayerSchema(_message.Message):
    __slots__ = ("names", "module_types", "param_counts", "local_param_counts")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    MODULE_TYPES_FIELD_NUMBER: _ClassVar[int]
    PARAM_COUNTS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PARAM_COUNTS_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    module_types: _containers.RepeatedScalarFieldContainer[str]
    param_counts: _containers.RepeatedScalarFieldContainer[int]
    local_param_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, names: _Optional[_Iterable[str]] = ..., module_types: _Optional[_Iterable[str]] = ..., param_counts: _Optional[_Iterable[int]] = ..., local_param_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class StepReport(_message.Message):
    __slots__ = ("step", "wall_time", "step_duration_s", "loss", "has_loss", "learning_rates", "grad_sum_squares", "non_finite", "first_non_finite_layer", "optimizer_step", "agent_time_s", "layers", "skipped_step", "loss_scale", "micro_steps", "grad_global_share", "first_non_finite_module", "activations", "output_spread", "input_mean", "input_std", "label_histogram", "full_stats_interval", "over_budget", "output_rms", "param_checksum", "pre_forward_s", "update_ratio", "guard_skip_reasons", "guard_rolled_back_to", "batch_ids", "top_samples", "collectives", "between_collectives_s")
    STEP_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    STEP_DURATION_S_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    HAS_LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATES_FIELD_NUMBER: _ClassVar[int]
    GRAD_SUM_SQUARES_FIELD_NUMBER: _ClassVar[int]
    NON_FINITE_FIELD_NUMBER: _ClassVar[int]
    FIRST_NON_FINITE_LAYER_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STEP_FIELD_NUMBER: _ClassVar[int]
    AGENT_TIME_S_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_SCALE_FIELD_NUMBER: _ClassVar[int]
    MICRO_STEPS_FIELD_NUMBER: _ClassVar[int]
    GRAD_GLOBAL_SHARE_FIELD_NUMBER: _ClassVar[int]
    FIRST_NON_FINITE_MODULE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SPREAD_FIELD_NUMBER: _ClassVar[int]
    INPUT_MEAN_FIELD_NUMBER: _ClassVar[int]
    INPUT_STD_FIELD_NUMBER: _ClassVar[int]
    LABEL_HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    FULL_STATS_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    OVER_BUDGET_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_RMS_FIELD_NUMBER: _ClassVar[int]
    PARAM_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    PRE_FORWARD_S_FIELD_NUMBER: _ClassVar[int]
    UPDATE_RATIO_FIELD_NUMBER: _ClassVar[int]
    GUARD_SKIP_REASONS_FIELD_NUMBER: _ClassVar[int]
    GUARD_ROLLED_BACK_TO_FIELD_NUMBER: _ClassVar[int]
    BATCH_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVES_FIELD_NUMBER: _ClassVar[int]
    BETWEEN_COLLECTIVES_S_FIELD_NUMBER: _ClassVar[int]
    step: int
    wall_time: float
    step_duration_s: float
    loss: float
    has_loss: bool
    learning_rates: _containers.RepeatedScalarFieldContainer[float]
    grad_sum_squares: float
    non_finite: int
    first_non_finite_layer: int
    optimizer_step: int
    agent_time_s: float
    layers: LayerStats
    skipped_step: bool
    loss_scale: float
    micro_steps: int
    grad_global_share: float
    first_non_finite_module: int
    activations: ActivationStats
    output_spread: float
    input_mean: bytes
    input_std: bytes
    label_histogram: bytes
    full_stats_interval: int
    over_budget: bool
    output_rms: float
    param_checksum: int
    pre_forward_s: float
    update_ratio: bytes
    guard_skip_reasons: int
    guard_rolled_back_to: int
    batch_ids: _containers.RepeatedScalarFieldContainer[str]
    top_samples: _containers.RepeatedCompositeFieldContainer[SampleLoss]
    collectives: CollectiveProgress
    between_collectives_s: float
    def __init__(self, step: _Optional[int] = ..., wall_time: _Optional[float] = ..., step_duration_s: _Optional[float] = ..., loss: _Optional[float] = ..., has_loss: bool = ..., learning_rates: _Optional[_Iterable[float]] = ..., grad_sum_squares: _Optional[float] = ..., non_finite: _Optional[int] = ..., first_non_finite_layer: _Optional[int] = ..., optimizer_step: _Optional[int] = ..., agent_time_s: _Optional[float] = ..., layers: _Optional[_Union[LayerStats, _Mapping]] = ..., skipped_step: bool = ..., loss_scale: _Optional[float] = ..., micro_steps: _Optional[int] = ..., grad_global_share: _Optional[float] = ..., first_non_finite_module: _Optional[int] = ..., activations: _Optional[_Union[ActivationStats, _Mapping]] = ..., output_spread: _Optional[float] = ..., input_mean: _Optional[bytes] = ..., input_std: _Optional[bytes] = ..., label_histogram: _Optional[bytes] = ..., full_stats_interval: _Optional[int] = ..., over_budget: bool = ..., output_rms: _Optional[float] = ..., param_checksum: _Optional[int] = ..., pre_forward_s: _Optional[float] = ..., update_ratio: _Optional[bytes] = ..., guard_skip_reasons: _Optional[int] = ..., guard_rolled_back_to: _Optional[int] = ..., batch_ids: _Optional[_Iterable[str]] = ..., top_samples: _Optional[_Iterable[_Union[SampleLoss, _Mapping]]] = ..., collectives: _Optional[_Union[CollectiveProgress, _Mapping]] = ..., between_collectives_s: _Optional[float] = ...) -> None: ...

class SampleLoss(_message.Message):
    __slots__ = ("id", "loss", "index")
    ID_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    id: str
    loss: float
    index: int
    def __init__(self, id: _Optional[str] = ..., loss: _Optional[float] = ..., index: _Optional[int] = ...) -> None: ...

class CollectiveGroup(_message.Message):
    __slots__ = ("group", "size", "entered", "completed", "pending_seq", "pending_op", "pending_numel", "pending_s")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ENTERED_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    PENDING_SEQ_FIELD_NUMBER: _ClassVar[int]
    PENDING_OP_FIELD_NUMBER: _ClassVar[int]
    PENDING_NUMEL_FIELD_NUMBER: _ClassVar[int]
    PENDING_S_FIELD_NUMBER: _ClassVar[int]
    group: str
    size: int
    entered: int
    completed: int
    pending_seq: int
    pending_op: str
    pending_numel: int
    pending_s: float
    def __init__(self, group: _Optional[str] = ..., size: _Optional[int] = ..., entered: _Optional[int] = ..., completed: _Optional[int] = ..., pending_seq: _Optional[int] = ..., pending_op: _Optional[str] = ..., pending_numel: _Optional[int] = ..., pending_s: _Optional[float] = ...) -> None: ...

class StackFrame(_message.Message):
    __slots__ = ("file", "line", "function")
    FILE_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    file: str
    line: int
    function: str
    def __init__(self, file: _Optional[str] = ..., line: _Optional[int] = ..., function: _Optional[str] = ...) -> None: ...

class CollectiveProgress(_message.Message):
    __slots__ = ("groups", "completions_known", "idle_s", "stack", "stack_still_s", "paused")
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    COMPLETIONS_KNOWN_FIELD_NUMBER: _ClassVar[int]
    IDLE_S_FIELD_NUMBER: _ClassVar[int]
    STACK_FIELD_NUMBER: _ClassVar[int]
    STACK_STILL_S_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[CollectiveGroup]
    completions_known: bool
    idle_s: float
    stack: _containers.RepeatedCompositeFieldContainer[StackFrame]
    stack_still_s: float
    paused: str
    def __init__(self, groups: _Optional[_Iterable[_Union[CollectiveGroup, _Mapping]]] = ..., completions_known: bool = ..., idle_s: _Optional[float] = ..., stack: _Optional[_Iterable[_Union[StackFrame, _Mapping]]] = ..., stack_still_s: _Optional[float] = ..., paused: _Optional[str] = ...) -> None: ...

class ActivationStats(_message.Message):
    __slots__ = ("mean", "std", "max_abs", "non_finite", "zero_fraction", "dead_fraction", "saturated_fraction", "log2_histogram", "unit_spread")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_FIELD_NUMBER: _ClassVar[int]
    NON_FINITE_FIELD_NUMBER: _ClassVar[int]
    ZERO_FRACTION_FIELD_NUMBER: _ClassVar[int]
    DEAD_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SATURATED_FRACTION_FIELD_NUMBER: _ClassVar[int]
    LOG2_HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    UNIT_SPREAD_FIELD_NUMBER: _ClassVar[int]
    mean: bytes
    std: bytes
    max_abs: bytes
    non_finite: bytes
    zero_fraction: bytes
    dead_fraction: bytes
    saturated_fraction: bytes
    log2_histogram: bytes
    unit_spread: bytes
    def __init__(self, mean: _Optional[bytes] = ..., std: _Optional[bytes] = ..., max_abs: _Optional[bytes] = ..., non_finite: _Optional[bytes] = ..., zero_fraction: _Optional[bytes] = ..., dead_fraction: _Optional[bytes] = ..., saturated_fraction: _Optional[bytes] = ..., log2_histogram: _Optional[bytes] = ..., unit_spread: _Optional[bytes] = ...) -> None: ...

class LayerStats(_message.Message):
    __slots__ = ("grad_norm", "grad_max_abs", "grad_mean", "grad_non_finite", "grad_zero_fraction", "weight_norm", "weight_max_abs", "weight_mean", "weight_non_finite", "weight_zero_fraction", "grad_min", "grad_max", "weight_min", "weight_max", "update_ratio", "grad_log2_histogram")
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    GRAD_MAX_ABS_FIELD_NUMBER: _ClassVar[int]
    GRAD_MEAN_FIELD_NUMBER: _ClassVar[int]
    GRAD_NON_FINITE_FIELD_NUMBER: _ClassVar[int]
    GRAD_ZERO_FRACTION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_NORM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_MAX_ABS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_MEAN_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_NON_FINITE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_ZERO_FRACTION_FIELD_NUMBER: _ClassVar[int]
    GRAD_MIN_FIELD_NUMBER: _ClassVar[int]
    GRAD_MAX_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_MIN_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_MAX_FIELD_NUMBER: _ClassVar[int]
    UPDATE_RATIO_FIELD_NUMBER: _ClassVar[int]
    GRAD_LOG2_HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    grad_norm: bytes
    grad_max_abs: bytes
    grad_mean: bytes
    grad_non_finite: bytes
    grad_zero_fraction: bytes
    weight_norm: bytes
    weight_max_abs: bytes
    weight_mean: bytes
    weight_non_finite: bytes
    weight_zero_fraction: bytes
    grad_min: bytes
    grad_max: bytes
    weight_min: bytes
    weight_max: bytes
    update_ratio: bytes
    grad_log2_histogram: bytes
    def __init__(self, grad_norm: _Optional[bytes] = ..., grad_max_abs: _Optional[bytes] = ..., grad_mean: _Optional[bytes] = ..., grad_non_finite: _Optional[bytes] = ..., grad_zero_fraction: _Optional[bytes] = ..., weight_norm: _Optional[bytes] = ..., weight_max_abs: _Optional[bytes] = ..., weight_mean: _Optional[bytes] = ..., weight_non_finite: _Optional[bytes] = ..., weight_zero_fraction: _Optional[bytes] = ..., grad_min: _Optional[bytes] = ..., grad_max: _Optional[bytes] = ..., weight_min: _Optional[bytes] = ..., weight_max: _Optional[bytes] = ..., update_ratio: _Optional[bytes] = ..., grad_log2_histogram: _Optional[bytes] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("kind", "step", "wall_time", "message", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    kind: str
    step: int
    wall_time: float
    message: str
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, kind: _Optional[str] = ..., step: _Optional[int] = ..., wall_time: _Optional[float] = ..., message: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("wall_time", "step", "dropped", "collectives")
    class DroppedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVES_FIELD_NUMBER: _ClassVar[int]
    wall_time: float
    step: int
    dropped: _containers.ScalarMap[str, int]
    collectives: CollectiveProgress
    def __init__(self, wall_time: _Optional[float] = ..., step: _Optional[int] = ..., dropped: _Optional[_Mapping[str, int]] = ..., collectives: _Optional[_Union[CollectiveProgress, _Mapping]] = ...) -> None: ...

class Goodbye(_message.Message):
    __slots__ = ("final_step", "reason")
    FINAL_STEP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    final_step: int
    reason: str
    def __init__(self, final_step: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ServerFrame(_message.Message):
    __slots__ = ("welcome", "ack", "command")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    ack: Ack
    command: Command
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., command: _Optional[_Union[Command, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("protocol_version", "server_version", "acked_seq", "max_batch_frames", "max_frame_bytes")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACKED_SEQ_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    server_version: str
    acked_seq: int
    max_batch_frames: int
    max_frame_bytes: int
    def __init__(self, protocol_version: _Optional[int] = ..., server_version: _Optional[str] = ..., acked_seq: _Optional[int] = ..., max_batch_frames: _Optional[int] = ..., max_frame_bytes: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("kind", "steps", "reason", "detector", "severity", "step", "rank")
    KIND_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    kind: CommandKind
    steps: int
    reason: str
    detector: str
    severity: str
    step: int
    rank: int
    def __init__(self, kind: _Optional[_Union[CommandKind, str]] = ..., steps: _Optional[int] = ..., reason: _Optional[str] = ..., detector: _Optional[str] = ..., severity: _Optional[str] = ..., step: _Optional[int] = ..., rank: _Optional[int] = ...) -> None: ...

class FlushRequest(_message.Message):
    __slots__ = ("hello", "frames")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    frames: _containers.RepeatedCompositeFieldContainer[AgentFrame]
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., frames: _Optional[_Iterable[_Union[AgentFrame, _Mapping]]] = ...) -> None: ...

class FlushResponse(_message.Message):
    __slots__ = ("acked_seq",)
    ACKED_SEQ_FIELD_NUMBER: _ClassVar[int]
    acked_seq: int
    def __init__(self, acked_seq: _Optional[int] = ...) -> None: ...

class RelayFrame(_message.Message):
    __slots__ = ("hello", "batch")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    hello: RelayHello
    batch: RelayBatch
    def __init__(self, hello: _Optional[_Union[RelayHello, _Mapping]] = ..., batch: _Optional[_Union[RelayBatch, _Mapping]] = ...) -> None: ...

class RelayHello(_message.Message):
    __slots__ = ("protocol_version", "relay_id", "server_version")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RELAY_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    relay_id: str
    server_version: str
    def __init__(self, protocol_version: _Optional[int] = ..., relay_id: _Optional[str] = ..., server_version: _Optional[str] = ...) -> None: ...

class RelayBatch(_message.Message):
    __slots__ = ("seq", "frames", "alerts", "dropped", "incidents", "columns")
    class DroppedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SEQ_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    INCIDENTS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    frames: _containers.RepeatedCompositeFieldContainer[RelayedFrame]
    alerts: _containers.RepeatedCompositeFieldContainer[RelayedAlert]
    dropped: _containers.ScalarMap[str, int]
    incidents: _containers.RepeatedCompositeFieldContainer[RelayedIncident]
    columns: RelayedColumns
    def __init__(self, seq: _Optional[int] = ..., frames: _Optional[_Iterable[_Union[RelayedFrame, _Mapping]]] = ..., alerts: _Optional[_Iterable[_Union[RelayedAlert, _Mapping]]] = ..., dropped: _Optional[_Mapping[str, int]] = ..., incidents: _Optional[_Iterable[_Union[RelayedIncident, _Mapping]]] = ..., columns: _Optional[_Union[RelayedColumns, _Mapping]] = ...) -> None: ...

class RelayedColumns(_message.Message):
    __slots__ = ("ref", "position", "seq", "step", "wall_time", "step_duration_s", "loss", "grad_sum_squares", "grad_global_share", "param_checksum", "pre_forward_s", "between_collectives_s", "non_finite", "flags", "optimizer_step", "agent_time_s", "full_stats_interval", "guard_skip_reasons", "micro_steps", "loss_scale", "output_spread", "output_rms")
    REF_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    STEP_DURATION_S_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRAD_SUM_SQUARES_FIELD_NUMBER: _ClassVar[int]
    GRAD_GLOBAL_SHARE_FIELD_NUMBER: _ClassVar[int]
    PARAM_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    PRE_FORWARD_S_FIELD_NUMBER: _ClassVar[int]
    BETWEEN_COLLECTIVES_S_FIELD_NUMBER: _ClassVar[int]
    NON_FINITE_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STEP_FIELD_NUMBER: _ClassVar[int]
    AGENT_TIME_S_FIELD_NUMBER: _ClassVar[int]
    FULL_STATS_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    GUARD_SKIP_REASONS_FIELD_NUMBER: _ClassVar[int]
    MICRO_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_SCALE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SPREAD_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_RMS_FIELD_NUMBER: _ClassVar[int]
    ref: bytes
    position: bytes
    seq: bytes
    step: bytes
    wall_time: bytes
    step_duration_s: bytes
    loss: bytes
    grad_sum_squares: bytes
    grad_global_share: bytes
    param_checksum: bytes
    pre_forward_s: bytes
    between_collectives_s: bytes
    non_finite: bytes
    flags: bytes
    optimizer_step: bytes
    agent_time_s: bytes
    full_stats_interval: bytes
    guard_skip_reasons: bytes
    micro_steps: bytes
    loss_scale: bytes
    output_spread: bytes
    output_rms: bytes
    def __init__(self, ref: _Optional[bytes] = ..., position: _Optional[bytes] = ..., seq: _Optional[bytes] = ..., step: _Optional[bytes] = ..., wall_time: _Optional[bytes] = ..., step_duration_s: _Optional[bytes] = ..., loss: _Optional[bytes] = ..., grad_sum_squares: _Optional[bytes] = ..., grad_global_share: _Optional[bytes] = ..., param_checksum: _Optional[bytes] = ..., pre_forward_s: _Optional[bytes] = ..., between_collectives_s: _Optional[bytes] = ..., non_finite: _Optional[bytes] = ..., flags: _Optional[bytes] = ..., optimizer_step: _Optional[bytes] = ..., agent_time_s: _Optional[bytes] = ..., full_stats_interval: _Optional[bytes] = ..., guard_skip_reasons: _Optional[bytes] = ..., micro_steps: _Optional[bytes] = ..., loss_scale: _Optional[bytes] = ..., output_spread: _Optional[bytes] = ..., output_rms: _Optional[bytes] = ...) -> None: ...

class RelayedIncident(_message.Message):
    __slots__ = ("body_json", "window")
    BODY_JSON_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    body_json: str
    window: bytes
    def __init__(self, body_json: _Optional[str] = ..., window: _Optional[bytes] = ...) -> None: ...

class RelayedFrame(_message.Message):
    __slots__ = ("run_id", "rank", "session_id", "hello", "frame", "closed", "ref")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    rank: int
    session_id: str
    hello: Hello
    frame: AgentFrame
    closed: bool
    ref: int
    def __init__(self, run_id: _Optional[str] = ..., rank: _Optional[int] = ..., session_id: _Optional[str] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., frame: _Optional[_Union[AgentFrame, _Mapping]] = ..., closed: bool = ..., ref: _Optional[int] = ...) -> None: ...

class RelayedAlert(_message.Message):
    __slots__ = ("run_id", "detector", "rank", "firing", "step", "value", "summary", "layer", "autopsy_json")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    FIRING_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    AUTOPSY_JSON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    detector: str
    rank: int
    firing: bool
    step: int
    value: float
    summary: str
    layer: str
    autopsy_json: str
    def __init__(self, run_id: _Optional[str] = ..., detector: _Optional[str] = ..., rank: _Optional[int] = ..., firing: bool = ..., step: _Optional[int] = ..., value: _Optional[float] = ..., summary: _Optional[str] = ..., layer: _Optional[str] = ..., autopsy_json: _Optional[str] = ...) -> None: ...

class RelayReply(_message.Message):
    __slots__ = ("welcome", "ack", "command")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    welcome: RelayWelcome
    ack: Ack
    command: RelayedCommand
    def __init__(self, welcome: _Optional[_Union[RelayWelcome, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., command: _Optional[_Union[RelayedCommand, _Mapping]] = ...) -> None: ...

class RelayWelcome(_message.Message):
    __slots__ = ("protocol_version", "server_version", "max_batch_entries", "columns")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    server_version: str
    max_batch_entries: int
    columns: bool
    def __init__(self, protocol_version: _Optional[int] = ..., server_version: _Optional[str] = ..., max_batch_entries: _Optional[int] = ..., columns: bool = ...) -> None: ...

class RelayedCommand(_message.Message):
    __slots__ = ("run_id", "rank", "command")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    rank: int
    command: Command
    def __init__(self, run_id: _Optional[str] = ..., rank: _Optional[int] = ..., command: _Optional[_Union[Command, _Mapping]] = ...) -> None: ...
