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

class CommandKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMMAND_KIND_UNSPECIFIED: _ClassVar[CommandKind]
    COMMAND_KIND_FULL_STATS: _ClassVar[CommandKind]
PROTOCOL_VERSION_UNSPECIFIED: ProtocolVersion
PROTOCOL_VERSION_CURRENT: ProtocolVersion
NON_FINITE_FLAG_UNSPECIFIED: NonFiniteFlag
NON_FINITE_FLAG_LOSS: NonFiniteFlag
NON_FINITE_FLAG_GRADIENT: NonFiniteFlag
NON_FINITE_FLAG_WEIGHT: NonFiniteFlag
COMMAND_KIND_UNSPECIFIED: CommandKind
COMMAND_KIND_FULL_STATS: CommandKind

class AgentFrame(_message.Message):
    __slots__ = ("seq", "hello", "report", "event", "heartbeat", "goodbye")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    hello: Hello
    report: StepReport
    event: Event
    heartbeat: Heartbeat
    goodbye: Goodbye
    def __init__(self, seq: _Optional[int] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., report: _Optional[_Union[StepReport, _Mapping]] = ..., event: _Optional[_Union[Event, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., goodbye: _Optional[_Union[Goodbye, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol_version", "run_id", "job_name", "rank", "world_size", "local_rank", "host", "pid", "session_id", "agent_version", "torch_version", "device_kind", "full_stats_interval", "schema")
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
    def __init__(self, protocol_version: _Optional[int] = ..., run_id: _Optional[str] = ..., job_name: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., local_rank: _Optional[int] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ..., session_id: _Optional[str] = ..., agent_version: _Optional[str] = ..., torch_version: _Optional[str] = ..., device_kind: _Optional[str] = ..., full_stats_interval: _Optional[int] = ..., schema: _Optional[_Union[LayerSchema, _Mapping]] = ...) -> None: ...

class LayerSchema(_message.Message):
    __slots__ = ("names", "module_types", "param_counts")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    MODULE_TYPES_FIELD_NUMBER: _ClassVar[int]
    PARAM_COUNTS_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    module_types: _containers.RepeatedScalarFieldContainer[str]
    param_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, names: _Optional[_Iterable[str]] = ..., module_types: _Optional[_Iterable[str]] = ..., param_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class StepReport(_message.Message):
    __slots__ = ("step", "wall_time", "step_duration_s", "loss", "has_loss", "learning_rates", "grad_sum_squares", "non_finite", "first_non_finite_layer", "optimizer_step", "agent_time_s", "layers")
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
    def __init__(self, step: _Optional[int] = ..., wall_time: _Optional[float] = ..., step_duration_s: _Optional[float] = ..., loss: _Optional[float] = ..., has_loss: bool = ..., learning_rates: _Optional[_Iterable[float]] = ..., grad_sum_squares: _Optional[float] = ..., non_finite: _Optional[int] = ..., first_non_finite_layer: _Optional[int] = ..., optimizer_step: _Optional[int] = ..., agent_time_s: _Optional[float] = ..., layers: _Optional[_Union[LayerStats, _Mapping]] = ...) -> None: ...

class LayerStats(_message.Message):
    __slots__ = ("grad_norm", "grad_max_abs", "grad_mean", "grad_non_finite", "grad_zero_fraction", "weight_norm", "weight_max_abs", "weight_mean", "weight_non_finite", "weight_zero_fraction")
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
    def __init__(self, grad_norm: _Optional[bytes] = ..., grad_max_abs: _Optional[bytes] = ..., grad_mean: _Optional[bytes] = ..., grad_non_finite: _Optional[bytes] = ..., grad_zero_fraction: _Optional[bytes] = ..., weight_norm: _Optional[bytes] = ..., weight_max_abs: _Optional[bytes] = ..., weight_mean: _Optional[bytes] = ..., weight_non_finite: _Optional[bytes] = ..., weight_zero_fraction: _Optional[bytes] = ...) -> None: ...

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
    __slots__ = ("wall_time", "step", "dropped")
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
    wall_time: float
    step: int
    dropped: _containers.ScalarMap[str, int]
    def __init__(self, wall_time: _Optional[float] = ..., step: _Optional[int] = ..., dropped: _Optional[_Mapping[str, int]] = ...) -> None: ...

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
    __slots__ = ("protocol_version", "server_version", "acked_seq")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACKED_SEQ_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    server_version: str
    acked_seq: int
    def __init__(self, protocol_version: _Optional[int] = ..., server_version: _Optional[str] = ..., acked_seq: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("kind", "steps", "reason")
    KIND_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    kind: CommandKind
    steps: int
    reason: str
    def __init__(self, kind: _Optional[_Union[CommandKind, str]] = ..., steps: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

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
