from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Extent(_message.Message):
    __slots__ = ("region", "first_layer", "layers", "offset", "layer_stride", "block_stride", "bytes", "at")
    REGION_FIELD_NUMBER: _ClassVar[int]
    FIRST_LAYER_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LAYER_STRIDE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_STRIDE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    region: int
    first_layer: int
    layers: int
    offset: int
    layer_stride: int
    block_stride: int
    bytes: int
    at: int
    def __init__(self, region: _Optional[int] = ..., first_layer: _Optional[int] = ..., layers: _Optional[int] = ..., offset: _Optional[int] = ..., layer_stride: _Optional[int] = ..., block_stride: _Optional[int] = ..., bytes: _Optional[int] = ..., at: _Optional[int] = ...) -> None: ...

class KVLayout(_message.Message):
    __slots__ = ("num_layers", "num_blocks", "block_bytes", "chunk_bytes", "layer_stride", "block_stride", "offset", "block_slots", "slot_map", "extents")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAYER_STRIDE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_STRIDE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SLOTS_FIELD_NUMBER: _ClassVar[int]
    SLOT_MAP_FIELD_NUMBER: _ClassVar[int]
    EXTENTS_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_blocks: int
    block_bytes: int
    chunk_bytes: int
    layer_stride: int
    block_stride: int
    offset: int
    block_slots: int
    slot_map: bytes
    extents: _containers.RepeatedCompositeFieldContainer[Extent]
    def __init__(self, num_layers: _Optional[int] = ..., num_blocks: _Optional[int] = ..., block_bytes: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., layer_stride: _Optional[int] = ..., block_stride: _Optional[int] = ..., offset: _Optional[int] = ..., block_slots: _Optional[int] = ..., slot_map: _Optional[bytes] = ..., extents: _Optional[_Iterable[_Union[Extent, _Mapping]]] = ...) -> None: ...

class Region(_message.Message):
    __slots__ = ("shm_name", "cuda_ipc_handle", "size", "device", "offset", "device_uuid")
    SHM_NAME_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    shm_name: str
    cuda_ipc_handle: bytes
    size: int
    device: int
    offset: int
    device_uuid: bytes
    def __init__(self, shm_name: _Optional[str] = ..., cuda_ipc_handle: _Optional[bytes] = ..., size: _Optional[int] = ..., device: _Optional[int] = ..., offset: _Optional[int] = ..., device_uuid: _Optional[bytes] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("group", "rank", "world_size", "parity", "layout", "region", "pid", "keep_survivors", "namespace", "regions", "last_step")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PARITY_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    KEEP_SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    group: str
    rank: int
    world_size: int
    parity: int
    layout: KVLayout
    region: Region
    pid: int
    keep_survivors: bool
    namespace: str
    regions: _containers.RepeatedCompositeFieldContainer[Region]
    last_step: int
    def __init__(self, group: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., parity: _Optional[int] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., region: _Optional[_Union[Region, _Mapping]] = ..., pid: _Optional[int] = ..., keep_survivors: _Optional[bool] = ..., namespace: _Optional[str] = ..., regions: _Optional[_Iterable[_Union[Region, _Mapping]]] = ..., last_step: _Optional[int] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("role", "session", "protected_step", "next_step")
    class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        NEW: _ClassVar[RegisterResponse.Role]
        REJOINED: _ClassVar[RegisterResponse.Role]
        REPLACEMENT: _ClassVar[RegisterResponse.Role]
    NEW: RegisterResponse.Role
    REJOINED: RegisterResponse.Role
    REPLACEMENT: RegisterResponse.Role
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    PROTECTED_STEP_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_FIELD_NUMBER: _ClassVar[int]
    role: RegisterResponse.Role
    session: str
    protected_step: int
    next_step: int
    def __init__(self, role: _Optional[_Union[RegisterResponse.Role, str]] = ..., session: _Optional[str] = ..., protected_step: _Optional[int] = ..., next_step: _Optional[int] = ...) -> None: ...

class RequestTokens(_message.Message):
    __slots__ = ("request_id", "tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tokens: int
    def __init__(self, request_id: _Optional[str] = ..., tokens: _Optional[int] = ...) -> None: ...

class Commit(_message.Message):
    __slots__ = ("step", "dirty", "request_ids", "request_tokens", "freed_blocks", "finished_requests", "fills", "released_blocks", "records", "cuda_event")
    STEP_FIELD_NUMBER: _ClassVar[int]
    DIRTY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FREED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FILLS_FIELD_NUMBER: _ClassVar[int]
    RELEASED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    CUDA_EVENT_FIELD_NUMBER: _ClassVar[int]
    step: int
    dirty: bytes
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    request_tokens: _containers.RepeatedScalarFieldContainer[int]
    freed_blocks: _containers.RepeatedScalarFieldContainer[int]
    finished_requests: _containers.RepeatedScalarFieldContainer[str]
    fills: bytes
    released_blocks: _containers.RepeatedScalarFieldContainer[int]
    records: _containers.RepeatedCompositeFieldContainer[RequestRecord]
    cuda_event: bytes
    def __init__(self, step: _Optional[int] = ..., dirty: _Optional[bytes] = ..., request_ids: _Optional[_Iterable[str]] = ..., request_tokens: _Optional[_Iterable[int]] = ..., freed_blocks: _Optional[_Iterable[int]] = ..., finished_requests: _Optional[_Iterable[str]] = ..., fills: _Optional[bytes] = ..., released_blocks: _Optional[_Iterable[int]] = ..., records: _Optional[_Iterable[_Union[RequestRecord, _Mapping]]] = ..., cuda_event: _Optional[bytes] = ...) -> None: ...

class RequestRecord(_message.Message):
    __slots__ = ("request_id", "tokens", "blocks", "reset")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    blocks: _containers.RepeatedScalarFieldContainer[int]
    reset: bool
    def __init__(self, request_id: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ..., blocks: _Optional[_Iterable[int]] = ..., reset: _Optional[bool] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("group", "rank", "session")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    group: str
    rank: int
    session: str
    def __init__(self, group: _Optional[str] = ..., rank: _Optional[int] = ..., session: _Optional[str] = ...) -> None: ...

class Goodbye(_message.Message):
    __slots__ = ("release_region",)
    RELEASE_REGION_FIELD_NUMBER: _ClassVar[int]
    release_region: bool
    def __init__(self, release_region: _Optional[bool] = ...) -> None: ...

class WorkerMessage(_message.Message):
    __slots__ = ("hello", "commit", "goodbye")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    commit: Commit
    goodbye: Goodbye
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., commit: _Optional[_Union[Commit, _Mapping]] = ..., goodbye: _Optional[_Union[Goodbye, _Mapping]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("protected_step", "watermarks")
    PROTECTED_STEP_FIELD_NUMBER: _ClassVar[int]
    WATERMARKS_FIELD_NUMBER: _ClassVar[int]
    protected_step: int
    watermarks: _containers.RepeatedCompositeFieldContainer[RequestTokens]
    def __init__(self, protected_step: _Optional[int] = ..., watermarks: _Optional[_Iterable[_Union[RequestTokens, _Mapping]]] = ...) -> None: ...

class GroupEvent(_message.Message):
    __slots__ = ("kind", "rank", "detail")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        RANK_LOST: _ClassVar[GroupEvent.Kind]
        RANK_RESTORED: _ClassVar[GroupEvent.Kind]
        STEP_FAILED: _ClassVar[GroupEvent.Kind]
    RANK_LOST: GroupEvent.Kind
    RANK_RESTORED: GroupEvent.Kind
    STEP_FAILED: GroupEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    kind: GroupEvent.Kind
    rank: int
    detail: str
    def __init__(self, kind: _Optional[_Union[GroupEvent.Kind, str]] = ..., rank: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class DaemonMessage(_message.Message):
    __slots__ = ("ack", "event")
    ACK_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    ack: Ack
    event: GroupEvent
    def __init__(self, ack: _Optional[_Union[Ack, _Mapping]] = ..., event: _Optional[_Union[GroupEvent, _Mapping]] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("group", "rank", "session")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    group: str
    rank: int
    session: str
    def __init__(self, group: _Optional[str] = ..., rank: _Optional[int] = ..., session: _Optional[str] = ...) -> None: ...

class RestoreResponse(_message.Message):
    __slots__ = ("protected_step", "restored_bytes", "unrecoverable_blocks", "unrecoverable_bytes", "corrupt_chunks", "watermarks", "seconds")
    PROTECTED_STEP_FIELD_NUMBER: _ClassVar[int]
    RESTORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    UNRECOVERABLE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    UNRECOVERABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    WATERMARKS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    protected_step: int
    restored_bytes: int
    unrecoverable_blocks: _containers.RepeatedScalarFieldContainer[int]
    unrecoverable_bytes: int
    corrupt_chunks: int
    watermarks: _containers.RepeatedCompositeFieldContainer[RequestTokens]
    seconds: float
    def __init__(self, protected_step: _Optional[int] = ..., restored_bytes: _Optional[int] = ..., unrecoverable_blocks: _Optional[_Iterable[int]] = ..., unrecoverable_bytes: _Optional[int] = ..., corrupt_chunks: _Optional[int] = ..., watermarks: _Optional[_Iterable[_Union[RequestTokens, _Mapping]]] = ..., seconds: _Optional[float] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("tokens", "namespace")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    tokens: bytes
    namespace: str
    def __init__(self, tokens: _Optional[bytes] = ..., namespace: _Optional[str] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("group", "request_id", "tokens", "blocks", "block_slots")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SLOTS_FIELD_NUMBER: _ClassVar[int]
    group: str
    request_id: str
    tokens: int
    blocks: _containers.RepeatedScalarFieldContainer[int]
    block_slots: int
    def __init__(self, group: _Optional[str] = ..., request_id: _Optional[str] = ..., tokens: _Optional[int] = ..., blocks: _Optional[_Iterable[int]] = ..., block_slots: _Optional[int] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("source_group", "source_rank", "source_blocks", "tokens", "group", "rank", "session", "blocks")
    SOURCE_GROUP_FIELD_NUMBER: _ClassVar[int]
    SOURCE_RANK_FIELD_NUMBER: _ClassVar[int]
    SOURCE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    source_group: str
    source_rank: int
    source_blocks: _containers.RepeatedScalarFieldContainer[int]
    tokens: int
    group: str
    rank: int
    session: str
    blocks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, source_group: _Optional[str] = ..., source_rank: _Optional[int] = ..., source_blocks: _Optional[_Iterable[int]] = ..., tokens: _Optional[int] = ..., group: _Optional[str] = ..., rank: _Optional[int] = ..., session: _Optional[str] = ..., blocks: _Optional[_Iterable[int]] = ...) -> None: ...

class FetchResponse(_message.Message):
    __slots__ = ("fetched_bytes", "rebuilt", "unrecoverable_blocks", "corrupt_chunks", "seconds", "source")
    FETCHED_BYTES_FIELD_NUMBER: _ClassVar[int]
    REBUILT_FIELD_NUMBER: _ClassVar[int]
    UNRECOVERABLE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    fetched_bytes: int
    rebuilt: bool
    unrecoverable_blocks: _containers.RepeatedScalarFieldContainer[int]
    corrupt_chunks: int
    seconds: float
    source: str
    def __init__(self, fetched_bytes: _Optional[int] = ..., rebuilt: _Optional[bool] = ..., unrecoverable_blocks: _Optional[_Iterable[int]] = ..., corrupt_chunks: _Optional[int] = ..., seconds: _Optional[float] = ..., source: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("group", "rank", "session", "step", "request_ids", "blocks")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    group: str
    rank: int
    session: str
    step: int
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    blocks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, group: _Optional[str] = ..., rank: _Optional[int] = ..., session: _Optional[str] = ..., step: _Optional[int] = ..., request_ids: _Optional[_Iterable[str]] = ..., blocks: _Optional[_Iterable[int]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReclaimRequest(_message.Message):
    __slots__ = ("bytes",)
    BYTES_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    def __init__(self, bytes: _Optional[int] = ...) -> None: ...

class ReclaimResponse(_message.Message):
    __slots__ = ("free_bytes", "dropped_groups")
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_GROUPS_FIELD_NUMBER: _ClassVar[int]
    free_bytes: int
    dropped_groups: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, free_bytes: _Optional[int] = ..., dropped_groups: _Optional[_Iterable[str]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: str
    def __init__(self, group: _Optional[str] = ...) -> None: ...

class RankStatus(_message.Message):
    __slots__ = ("rank", "state", "pid", "committed_step", "region", "process_ended")
    RANK_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_STEP_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    PROCESS_ENDED_FIELD_NUMBER: _ClassVar[int]
    rank: int
    state: str
    pid: int
    committed_step: int
    region: str
    process_ended: bool
    def __init__(self, rank: _Optional[int] = ..., state: _Optional[str] = ..., pid: _Optional[int] = ..., committed_step: _Optional[int] = ..., region: _Optional[str] = ..., process_ended: _Optional[bool] = ...) -> None: ...

class LastRestore(_message.Message):
    __slots__ = ("rank", "seconds", "restored_bytes", "unrecoverable_bytes", "unix_time")
    RANK_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    RESTORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    UNRECOVERABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    UNIX_TIME_FIELD_NUMBER: _ClassVar[int]
    rank: int
    seconds: float
    restored_bytes: int
    unrecoverable_bytes: int
    unix_time: float
    def __init__(self, rank: _Optional[int] = ..., seconds: _Optional[float] = ..., restored_bytes: _Optional[int] = ..., unrecoverable_bytes: _Optional[int] = ..., unix_time: _Optional[float] = ...) -> None: ...

class GroupStatus(_message.Message):
    __slots__ = ("group", "world_size", "parity", "state", "protected_step", "newest_step", "lag_steps", "kv_bytes", "protected_bytes", "parity_bytes", "parity_arena_bytes", "ranks", "watermarks", "last_restore", "layout", "ended_seconds", "held_bytes", "expires_seconds", "lag_seconds", "mirrored_step", "remote_bytes")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PARITY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROTECTED_STEP_FIELD_NUMBER: _ClassVar[int]
    NEWEST_STEP_FIELD_NUMBER: _ClassVar[int]
    LAG_STEPS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROTECTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARITY_ARENA_BYTES_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    WATERMARKS_FIELD_NUMBER: _ClassVar[int]
    LAST_RESTORE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    ENDED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HELD_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MIRRORED_STEP_FIELD_NUMBER: _ClassVar[int]
    REMOTE_BYTES_FIELD_NUMBER: _ClassVar[int]
    group: str
    world_size: int
    parity: int
    state: str
    protected_step: int
    newest_step: int
    lag_steps: int
    kv_bytes: int
    protected_bytes: int
    parity_bytes: int
    parity_arena_bytes: int
    ranks: _containers.RepeatedCompositeFieldContainer[RankStatus]
    watermarks: _containers.RepeatedCompositeFieldContainer[RequestTokens]
    last_restore: LastRestore
    layout: KVLayout
    ended_seconds: float
    held_bytes: int
    expires_seconds: float
    lag_seconds: float
    mirrored_step: int
    remote_bytes: int
    def __init__(self, group: _Optional[str] = ..., world_size: _Optional[int] = ..., parity: _Optional[int] = ..., state: _Optional[str] = ..., protected_step: _Optional[int] = ..., newest_step: _Optional[int] = ..., lag_steps: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., protected_bytes: _Optional[int] = ..., parity_bytes: _Optional[int] = ..., parity_arena_bytes: _Optional[int] = ..., ranks: _Optional[_Iterable[_Union[RankStatus, _Mapping]]] = ..., watermarks: _Optional[_Iterable[_Union[RequestTokens, _Mapping]]] = ..., last_restore: _Optional[_Union[LastRestore, _Mapping]] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., ended_seconds: _Optional[float] = ..., held_bytes: _Optional[int] = ..., expires_seconds: _Optional[float] = ..., lag_seconds: _Optional[float] = ..., mirrored_step: _Optional[int] = ..., remote_bytes: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("groups", "version", "node", "store")
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[GroupStatus]
    version: str
    node: str
    store: str
    def __init__(self, groups: _Optional[_Iterable[_Union[GroupStatus, _Mapping]]] = ..., version: _Optional[str] = ..., node: _Optional[str] = ..., store: _Optional[str] = ...) -> None: ...

class ScrubRequest(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: str
    def __init__(self, group: _Optional[str] = ...) -> None: ...

class ScrubResponse(_message.Message):
    __slots__ = ("chunks_checked", "parity_mismatches", "checksum_mismatches", "bad_blocks", "bad_ranks", "parity_checked")
    CHUNKS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    PARITY_MISMATCHES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_MISMATCHES_FIELD_NUMBER: _ClassVar[int]
    BAD_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BAD_RANKS_FIELD_NUMBER: _ClassVar[int]
    PARITY_CHECKED_FIELD_NUMBER: _ClassVar[int]
    chunks_checked: int
    parity_mismatches: int
    checksum_mismatches: int
    bad_blocks: _containers.RepeatedScalarFieldContainer[int]
    bad_ranks: _containers.RepeatedScalarFieldContainer[int]
    parity_checked: bool
    def __init__(self, chunks_checked: _Optional[int] = ..., parity_mismatches: _Optional[int] = ..., checksum_mismatches: _Optional[int] = ..., bad_blocks: _Optional[_Iterable[int]] = ..., bad_ranks: _Optional[_Iterable[int]] = ..., parity_checked: _Optional[bool] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: str
    def __init__(self, group: _Optional[str] = ...) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("kind", "group", "rank", "rank_state", "process_ended", "protected_step", "state", "detail", "ranks")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        SNAPSHOT: _ClassVar[WatchEvent.Kind]
        RANK_STATE: _ClassVar[WatchEvent.Kind]
        RANK_RESTORED: _ClassVar[WatchEvent.Kind]
        STEP_PROTECTED: _ClassVar[WatchEvent.Kind]
        GROUP_ENDED: _ClassVar[WatchEvent.Kind]
        GROUP_DROPPED: _ClassVar[WatchEvent.Kind]
    SNAPSHOT: WatchEvent.Kind
    RANK_STATE: WatchEvent.Kind
    RANK_RESTORED: WatchEvent.Kind
    STEP_PROTECTED: WatchEvent.Kind
    GROUP_ENDED: WatchEvent.Kind
    GROUP_DROPPED: WatchEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    RANK_STATE_FIELD_NUMBER: _ClassVar[int]
    PROCESS_ENDED_FIELD_NUMBER: _ClassVar[int]
    PROTECTED_STEP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    kind: WatchEvent.Kind
    group: str
    rank: int
    rank_state: str
    process_ended: bool
    protected_step: int
    state: str
    detail: str
    ranks: _containers.RepeatedCompositeFieldContainer[RankStatus]
    def __init__(self, kind: _Optional[_Union[WatchEvent.Kind, str]] = ..., group: _Optional[str] = ..., rank: _Optional[int] = ..., rank_state: _Optional[str] = ..., process_ended: _Optional[bool] = ..., protected_step: _Optional[int] = ..., state: _Optional[str] = ..., detail: _Optional[str] = ..., ranks: _Optional[_Iterable[_Union[RankStatus, _Mapping]]] = ...) -> None: ...

class DropRequest(_message.Message):
    __slots__ = ("group", "unlink_regions")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    UNLINK_REGIONS_FIELD_NUMBER: _ClassVar[int]
    group: str
    unlink_regions: bool
    def __init__(self, group: _Optional[str] = ..., unlink_regions: _Optional[bool] = ...) -> None: ...

class DropResponse(_message.Message):
    __slots__ = ("released_bytes",)
    RELEASED_BYTES_FIELD_NUMBER: _ClassVar[int]
    released_bytes: int
    def __init__(self, released_bytes: _Optional[int] = ...) -> None: ...
