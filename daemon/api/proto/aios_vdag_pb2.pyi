from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class vDAGFileInfo(_message.Message):
    __slots__ = ("metadata", "file_data")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    FILE_DATA_FIELD_NUMBER: _ClassVar[int]
    metadata: str
    file_data: bytes
    def __init__(self, metadata: _Optional[str] = ..., file_data: _Optional[bytes] = ...) -> None: ...

class vDAGInferencePacket(_message.Message):
    __slots__ = ("session_id", "seq_no", "frame_ptr", "data", "ts", "files", "vdag", "deadline_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_NO_FIELD_NUMBER: _ClassVar[int]
    FRAME_PTR_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    VDAG_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    seq_no: int
    frame_ptr: bytes
    data: str
    ts: float
    files: _containers.RepeatedCompositeFieldContainer[vDAGFileInfo]
    vdag: str
    deadline_s: float
    def __init__(self, session_id: _Optional[str] = ..., seq_no: _Optional[int] = ..., frame_ptr: _Optional[bytes] = ..., data: _Optional[str] = ..., ts: _Optional[float] = ..., files: _Optional[_Iterable[_Union[vDAGFileInfo, _Mapping]]] = ..., vdag: _Optional[str] = ..., deadline_s: _Optional[float] = ...) -> None: ...
