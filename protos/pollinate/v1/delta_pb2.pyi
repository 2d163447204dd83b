from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    ENCODING_FP32: _ClassVar[Encoding]
    ENCODING_FP16: _ClassVar[Encoding]
    ENCODING_BF16: _ClassVar[Encoding]
    ENCODING_INT8: _ClassVar[Encoding]
    ENCODING_INT8_ROW: _ClassVar[Encoding]
    ENCODING_TOPK_TERNARY: _ClassVar[Encoding]
    ENCODING_TOPK_INT8: _ClassVar[Encoding]
    ENCODING_SIGN: _ClassVar[Encoding]
    ENCODING_INT4_ROW: _ClassVar[Encoding]
    ENCODING_SIGN2: _ClassVar[Encoding]

class IndexCoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INDEX_CODING_DENSE: _ClassVar[IndexCoding]
    INDEX_CODING_DELTA_VARINT: _ClassVar[IndexCoding]
    INDEX_CODING_BITMAP: _ClassVar[IndexCoding]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT64: DType
ENCODING_UNSPECIFIED: Encoding
ENCODING_FP32: Encoding
ENCODING_FP16: Encoding
ENCODING_BF16: Encoding
ENCODING_INT8: Encoding
ENCODING_INT8_ROW: Encoding
ENCODING_TOPK_TERNARY: Encoding
ENCODING_TOPK_INT8: Encoding
ENCODING_SIGN: Encoding
ENCODING_INT4_ROW: Encoding
ENCODING_SIGN2: Encoding
INDEX_CODING_DENSE: IndexCoding
INDEX_CODING_DELTA_VARINT: IndexCoding
INDEX_CODING_BITMAP: IndexCoding

class TensorEntry(_message.Message):
    __slots__ = ("name", "shape", "dtype", "encoding", "index_coding", "indices", "values", "scales", "numel", "nnz", "crc32")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    INDEX_CODING_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    NNZ_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    encoding: Encoding
    index_coding: IndexCoding
    indices: bytes
    values: bytes
    scales: _containers.RepeatedScalarFieldContainer[float]
    numel: int
    nnz: int
    crc32: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., index_coding: _Optional[_Union[IndexCoding, str]] = ..., indices: _Optional[bytes] = ..., values: _Optional[bytes] = ..., scales: _Optional[_Iterable[float]] = ..., numel: _Optional[int] = ..., nnz: _Optional[int] = ..., crc32: _Optional[int] = ...) -> None: ...

class AdapterDelta(_message.Message):
    __slots__ = ("magic", "codec_version", "run_id", "round", "base_version", "target_version", "tensors", "base_digest")
    MAGIC_FIELD_NUMBER: _ClassVar[int]
    CODEC_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    BASE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    magic: int
    codec_version: int
    run_id: int
    round: int
    base_version: int
    target_version: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorEntry]
    base_digest: bytes
    def __init__(self, magic: _Optional[int] = ..., codec_version: _Optional[int] = ..., run_id: _Optional[int] = ..., round: _Optional[int] = ..., base_version: _Optional[int] = ..., target_version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorEntry, _Mapping]]] = ..., base_digest: _Optional[bytes] = ...) -> None: ...
