from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Source(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOURCE_UNSPECIFIED: _ClassVar[Source]
    SOURCE_FUSION: _ClassVar[Source]
    SOURCE_AVERAGE: _ClassVar[Source]

class FallbackReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FALLBACK_REASON_UNSPECIFIED: _ClassVar[FallbackReason]
    FALLBACK_REASON_DISABLED: _ClassVar[FallbackReason]
    FALLBACK_REASON_WARMING_UP: _ClassVar[FallbackReason]
    FALLBACK_REASON_WRONG_EXPERT_COUNT: _ClassVar[FallbackReason]
    FALLBACK_REASON_UNDERPERFORMING: _ClassVar[FallbackReason]

class Direction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIRECTION_UNSPECIFIED: _ClassVar[Direction]
    DIRECTION_UP: _ClassVar[Direction]
    DIRECTION_DOWN: _ClassVar[Direction]
SOURCE_UNSPECIFIED: Source
SOURCE_FUSION: Source
SOURCE_AVERAGE: Source
FALLBACK_REASON_UNSPECIFIED: FallbackReason
FALLBACK_REASON_DISABLED: FallbackReason
FALLBACK_REASON_WARMING_UP: FallbackReason
FALLBACK_REASON_WRONG_EXPERT_COUNT: FallbackReason
FALLBACK_REASON_UNDERPERFORMING: FallbackReason
DIRECTION_UNSPECIFIED: Direction
DIRECTION_UP: Direction
DIRECTION_DOWN: Direction

class ExpertForecast(_message.Message):
    __slots__ = ("name", "prob_up", "prob_down", "confidence")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROB_UP_FIELD_NUMBER: _ClassVar[int]
    PROB_DOWN_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    prob_up: float
    prob_down: float
    confidence: float
    def __init__(self, name: _Optional[str] = ..., prob_up: _Optional[float] = ..., prob_down: _Optional[float] = ..., confidence: _Optional[float] = ...) -> None: ...

class ExpertWeight(_message.Message):
    __slots__ = ("name", "weight")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: float
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("experts", "features", "event_id")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertForecast]
    features: _containers.ScalarMap[str, float]
    event_id: str
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertForecast, _Mapping]]] = ..., features: _Optional[_Mapping[str, float]] = ..., event_id: _Optional[str] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("prob_up", "prob_down", "source", "reason", "attention", "model_version", "event_id")
    PROB_UP_FIELD_NUMBER: _ClassVar[int]
    PROB_DOWN_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    prob_up: float
    prob_down: float
    source: Source
    reason: FallbackReason
    attention: _containers.RepeatedCompositeFieldContainer[ExpertWeight]
    model_version: int
    event_id: str
    def __init__(self, prob_up: _Optional[float] = ..., prob_down: _Optional[float] = ..., source: _Optional[_Union[Source, str]] = ..., reason: _Optional[_Union[FallbackReason, str]] = ..., attention: _Optional[_Iterable[_Union[ExpertWeight, _Mapping]]] = ..., model_version: _Optional[int] = ..., event_id: _Optional[str] = ...) -> None: ...

class RecordOutcomeRequest(_message.Message):
    __slots__ = ("experts", "features", "event_id", "actual_direction")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_DIRECTION_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertForecast]
    features: _containers.ScalarMap[str, float]
    event_id: str
    actual_direction: Direction
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertForecast, _Mapping]]] = ..., features: _Optional[_Mapping[str, float]] = ..., event_id: _Optional[str] = ..., actual_direction: _Optional[_Union[Direction, str]] = ...) -> None: ...

class RecordOutcomeResponse(_message.Message):
    __slots__ = ("duplicate", "samples_trained", "model_version", "used_predict_inputs")
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_TRAINED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    USED_PREDICT_INPUTS_FIELD_NUMBER: _ClassVar[int]
    duplicate: bool
    samples_trained: int
    model_version: int
    used_predict_inputs: bool
    def __init__(self, duplicate: _Optional[bool] = ..., samples_trained: _Optional[int] = ..., model_version: _Optional[int] = ..., used_predict_inputs: _Optional[bool] = ...) -> None: ...

class RecordOutcomeBatch(_message.Message):
    __slots__ = ("outcomes",)
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[RecordOutcomeRequest]
    def __init__(self, outcomes: _Optional[_Iterable[_Union[RecordOutcomeRequest, _Mapping]]] = ...) -> None: ...

class RejectedOutcome(_message.Message):
    __slots__ = ("index", "event_id", "code", "message")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    index: int
    event_id: str
    code: str
    message: str
    def __init__(self, index: _Optional[int] = ..., event_id: _Optional[str] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class RecordOutcomesResponse(_message.Message):
    __slots__ = ("accepted", "duplicates", "rejected", "rejected_outcomes", "journal_sequence")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    JOURNAL_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicates: int
    rejected: int
    rejected_outcomes: _containers.RepeatedCompositeFieldContainer[RejectedOutcome]
    journal_sequence: int
    def __init__(self, accepted: _Optional[int] = ..., duplicates: _Optional[int] = ..., rejected: _Optional[int] = ..., rejected_outcomes: _Optional[_Iterable[_Union[RejectedOutcome, _Mapping]]] = ..., journal_sequence: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrainingStats(_message.Message):
    __slots__ = ("samples_trained", "train_steps", "train_loss", "val_loss", "best_val_loss", "current_lr", "is_overfitting", "patience_counter", "avg_attention_entropy", "train_buffer_size", "val_buffer_size", "enabled", "ready", "min_samples", "last_source", "last_reason", "n_models", "expert_names", "feature_names", "last_grad_norm", "early_stops")
    SAMPLES_TRAINED_FIELD_NUMBER: _ClassVar[int]
    TRAIN_STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    BEST_VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_LR_FIELD_NUMBER: _ClassVar[int]
    IS_OVERFITTING_FIELD_NUMBER: _ClassVar[int]
    PATIENCE_COUNTER_FIELD_NUMBER: _ClassVar[int]
    AVG_ATTENTION_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    TRAIN_BUFFER_SIZE_FIELD_NUMBER: _ClassVar[int]
    VAL_BUFFER_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    MIN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LAST_SOURCE_FIELD_NUMBER: _ClassVar[int]
    LAST_REASON_FIELD_NUMBER: _ClassVar[int]
    N_MODELS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_NAMES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    LAST_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOPS_FIELD_NUMBER: _ClassVar[int]
    samples_trained: int
    train_steps: int
    train_loss: float
    val_loss: float
    best_val_loss: float
    current_lr: float
    is_overfitting: bool
    patience_counter: int
    avg_attention_entropy: float
    train_buffer_size: int
    val_buffer_size: int
    enabled: bool
    ready: bool
    min_samples: int
    last_source: Source
    last_reason: FallbackReason
    n_models: int
    expert_names: _containers.RepeatedScalarFieldContainer[str]
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    last_grad_norm: float
    early_stops: int
    def __init__(self, samples_trained: _Optional[int] = ..., train_steps: _Optional[int] = ..., train_loss: _Optional[float] = ..., val_loss: _Optional[float] = ..., best_val_loss: _Optional[float] = ..., current_lr: _Optional[float] = ..., is_overfitting: _Optional[bool] = ..., patience_counter: _Optional[int] = ..., avg_attention_entropy: _Optional[float] = ..., train_buffer_size: _Optional[int] = ..., val_buffer_size: _Optional[int] = ..., enabled: _Optional[bool] = ..., ready: _Optional[bool] = ..., min_samples: _Optional[int] = ..., last_source: _Optional[_Union[Source, str]] = ..., last_reason: _Optional[_Union[FallbackReason, str]] = ..., n_models: _Optional[int] = ..., expert_names: _Optional[_Iterable[str]] = ..., feature_names: _Optional[_Iterable[str]] = ..., last_grad_norm: _Optional[float] = ..., early_stops: _Optional[int] = ...) -> None: ...

class ServiceStats(_message.Message):
    __slots__ = ("predictions", "outcomes", "duplicates", "errors", "queue_depth", "uptime_seconds", "last_checkpoint", "journal_sequence", "applied_sequence", "training_lag")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    JOURNAL_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TRAINING_LAG_FIELD_NUMBER: _ClassVar[int]
    predictions: int
    outcomes: int
    duplicates: int
    errors: int
    queue_depth: int
    uptime_seconds: float
    last_checkpoint: str
    journal_sequence: int
    applied_sequence: int
    training_lag: int
    def __init__(self, predictions: _Optional[int] = ..., outcomes: _Optional[int] = ..., duplicates: _Optional[int] = ..., errors: _Optional[int] = ..., queue_depth: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., last_checkpoint: _Optional[str] = ..., journal_sequence: _Optional[int] = ..., applied_sequence: _Optional[int] = ..., training_lag: _Optional[int] = ...) -> None: ...

class SourceScore(_message.Message):
    __slots__ = ("outcomes", "accuracy", "log_loss", "brier", "ece")
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    LOG_LOSS_FIELD_NUMBER: _ClassVar[int]
    BRIER_FIELD_NUMBER: _ClassVar[int]
    ECE_FIELD_NUMBER: _ClassVar[int]
    outcomes: int
    accuracy: float
    log_loss: float
    brier: float
    ece: float
    def __init__(self, outcomes: _Optional[int] = ..., accuracy: _Optional[float] = ..., log_loss: _Optional[float] = ..., brier: _Optional[float] = ..., ece: _Optional[float] = ...) -> None: ...

class LiveScores(_message.Message):
    __slots__ = ("served", "fusion", "average", "underperforming", "switches", "log_loss_excess", "window")
    SERVED_FIELD_NUMBER: _ClassVar[int]
    FUSION_FIELD_NUMBER: _ClassVar[int]
    AVERAGE_FIELD_NUMBER: _ClassVar[int]
    UNDERPERFORMING_FIELD_NUMBER: _ClassVar[int]
    SWITCHES_FIELD_NUMBER: _ClassVar[int]
    LOG_LOSS_EXCESS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    served: SourceScore
    fusion: SourceScore
    average: SourceScore
    underperforming: bool
    switches: int
    log_loss_excess: float
    window: int
    def __init__(self, served: _Optional[_Union[SourceScore, _Mapping]] = ..., fusion: _Optional[_Union[SourceScore, _Mapping]] = ..., average: _Optional[_Union[SourceScore, _Mapping]] = ..., underperforming: _Optional[bool] = ..., switches: _Optional[int] = ..., log_loss_excess: _Optional[float] = ..., window: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("training", "attention", "service", "live")
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    training: TrainingStats
    attention: _containers.RepeatedCompositeFieldContainer[ExpertWeight]
    service: ServiceStats
    live: LiveScores
    def __init__(self, training: _Optional[_Union[TrainingStats, _Mapping]] = ..., attention: _Optional[_Iterable[_Union[ExpertWeight, _Mapping]]] = ..., service: _Optional[_Union[ServiceStats, _Mapping]] = ..., live: _Optional[_Union[LiveScores, _Mapping]] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("action", "name")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACTION_UNSPECIFIED: _ClassVar[CheckpointRequest.Action]
        ACTION_SAVE: _ClassVar[CheckpointRequest.Action]
        ACTION_RESTORE: _ClassVar[CheckpointRequest.Action]
        ACTION_LIST: _ClassVar[CheckpointRequest.Action]
    ACTION_UNSPECIFIED: CheckpointRequest.Action
    ACTION_SAVE: CheckpointRequest.Action
    ACTION_RESTORE: CheckpointRequest.Action
    ACTION_LIST: CheckpointRequest.Action
    ACTION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    action: CheckpointRequest.Action
    name: str
    def __init__(self, action: _Optional[_Union[CheckpointRequest.Action, str]] = ..., name: _Optional[str] = ...) -> None: ...

class CheckpointInfo(_message.Message):
    __slots__ = ("name", "samples_trained", "train_steps", "created_at", "size_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_TRAINED_FIELD_NUMBER: _ClassVar[int]
    TRAIN_STEPS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    samples_trained: int
    train_steps: int
    created_at: str
    size_bytes: int
    def __init__(self, name: _Optional[str] = ..., samples_trained: _Optional[int] = ..., train_steps: _Optional[int] = ..., created_at: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("checkpoints",)
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[CheckpointInfo]
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[CheckpointInfo, _Mapping]]] = ...) -> None: ...
