"""TFRecord files of tf.train.Example without TensorFlow: framing, checksums, parsing.

A TFRecord file is a sequence of records, each
    uint64 length | uint32 masked CRC32C of the length bytes | data | uint32 masked CRC32C of data
(little endian). Every checksum is verified (google-crc32c, in C), so a damaged record is
named with its file and byte offset instead of being parsed as garbage.

tf.train.Example is parsed by the protobuf runtime (upb) from the message definitions of
TensorFlow's example.proto and feature.proto, declared below as a descriptor (the same
package, names and field numbers), so no generated code and no TensorFlow is needed.
`decode_example` turns one record into the prep's record layout (iap_jax.io.dataset_info).
"""
from __future__ import annotations

import dataclasses
import os
import struct
import zlib
from typing import IO, Iterator

import google_crc32c
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from iap_jax.core.iaps import IAP_NAMES

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8
# Bytes a record takes beyond its data: the length, its checksum and the data's checksum.
FRAMING_BYTES = _HEADER.size + _FOOTER.size


def masked_crc32c(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


class CorruptRecordError(ValueError):
    """A record that fails its checksum or is cut short; `framing` when the file cannot be
    read past it (its length is unreadable)."""

    def __init__(self, path: str, index: int, offset: int, reason: str, framing: bool):
        super().__init__(f"{path}: record {index} (byte {offset}): {reason}")
        self.path, self.index, self.offset, self.reason, self.framing = (
            path, index, offset, reason, framing)


# --- framing ---------------------------------------------------------------------------

def _read_header(f: IO[bytes], path: str, index: int, offset: int) -> int | None:
    """The data length of the record at `offset` (f positioned there); None at the end."""
    header = f.read(_HEADER.size)
    if not header:
        return None
    if len(header) < _HEADER.size:
        raise CorruptRecordError(path, index, offset, "file ends inside a record header", True)
    length, crc = _HEADER.unpack(header)
    if masked_crc32c(header[:8]) != crc:
        raise CorruptRecordError(path, index, offset, "length checksum mismatch", True)
    return length


def _check_data(data: bytes, footer: bytes, length: int, path: str, index: int,
                offset: int) -> None:
    if len(data) < length or len(footer) < _FOOTER.size:
        raise CorruptRecordError(path, index, offset, "file ends inside a record", True)
    if masked_crc32c(data) != _FOOTER.unpack(footer)[0]:
        raise CorruptRecordError(path, index, offset, "data checksum mismatch", False)


def iter_records(f: IO[bytes], path: str) -> Iterator[bytes | CorruptRecordError]:
    """Every record of an open file in order. A record whose data fails its checksum is
    yielded as its CorruptRecordError and reading goes on; a broken header or a cut file
    raises (nothing after it can be located)."""
    index, offset = 0, 0
    while True:
        length = _read_header(f, path, index, offset)
        if length is None:
            return
        data = f.read(length)
        footer = f.read(_FOOTER.size)
        try:
            _check_data(data, footer, length, path, index, offset)
            yield data
        except CorruptRecordError as err:
            if err.framing:
                raise
            yield err
        index += 1
        offset += length + FRAMING_BYTES


def frame(data: bytes) -> bytes:
    """One record as a TFRecord file holds it."""
    length = struct.pack("<Q", len(data))
    return (length + _FOOTER.pack(masked_crc32c(length)) + data
            + _FOOTER.pack(masked_crc32c(data)))


def scan_offsets(f: IO[bytes], path: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, lengths) of every record of an open file, from the headers alone (the data
    are skipped, and checked when read)."""
    offsets, lengths = [], []
    offset = 0
    while True:
        length = _read_header(f, path, len(offsets), offset)
        if length is None:
            break
        offsets.append(offset)
        lengths.append(length)
        offset += length + FRAMING_BYTES
        f.seek(offset)
    size = f.seek(0, os.SEEK_END)
    if offset > size:
        raise CorruptRecordError(path, len(offsets) - 1, offsets[-1], "file ends inside a record",
                                 True)
    return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)


def read_record_at(f: IO[bytes], path: str, index: int, offset: int, length: int) -> bytes:
    """The checked data of the record of `length` bytes at `offset` of an open file."""
    try:  # local files: one positional read, no file position shared between threads
        block = os.pread(f.fileno(), length + FRAMING_BYTES, offset)
    except (OSError, ValueError, AttributeError):  # a bucket's file object: no descriptor
        f.seek(offset)
        block = f.read(length + FRAMING_BYTES)
    header, data, footer = (block[:_HEADER.size], block[_HEADER.size:_HEADER.size + length],
                            block[_HEADER.size + length:])
    if len(header) < _HEADER.size or _HEADER.unpack(header)[0] != length:
        raise CorruptRecordError(path, index, offset, "record header changed since the file "
                                 "was indexed", True)
    _check_data(data, footer, length, path, index, offset)
    return data


# --- tf.train.Example ------------------------------------------------------------------

def _example_message_class():
    """tensorflow.Example from a descriptor of example.proto / feature.proto, in a pool of
    its own (so it never clashes with TensorFlow's in a process that has both)."""
    proto = descriptor_pb2.FileDescriptorProto(name="iap_jax_example.proto",
                                               package="tensorflow", syntax="proto3")
    F = descriptor_pb2.FieldDescriptorProto

    def message(name, *fields, map_entry=False, oneof=None):
        m = proto.message_type.add(name=name)
        if map_entry:
            m.options.map_entry = True
        if oneof:
            m.oneof_decl.add(name=oneof)
        for field_name, number, kind, type_name, label in fields:
            f = m.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                f.type_name = type_name
            if oneof:
                f.oneof_index = 0
        return m

    repeated, optional = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    message("BytesList", ("value", 1, F.TYPE_BYTES, "", repeated))
    message("FloatList", ("value", 1, F.TYPE_FLOAT, "", repeated))
    message("Int64List", ("value", 1, F.TYPE_INT64, "", repeated))
    message("Feature", ("bytes_list", 1, F.TYPE_MESSAGE, ".tensorflow.BytesList", optional),
            ("float_list", 2, F.TYPE_MESSAGE, ".tensorflow.FloatList", optional),
            ("int64_list", 3, F.TYPE_MESSAGE, ".tensorflow.Int64List", optional), oneof="kind")
    features = message("Features", ("feature", 1, F.TYPE_MESSAGE,
                                     ".tensorflow.Features.FeatureEntry", repeated))
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=optional)
    entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=optional,
                    type_name=".tensorflow.Feature")
    message("Example", ("features", 1, F.TYPE_MESSAGE, ".tensorflow.Features", optional))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


Example = _example_message_class()
_LABEL_KEYS = tuple((name, f"labels/{name}/state", f"labels/{name}/value",
                     f"labels/{name}/number") for name in IAP_NAMES)


@dataclasses.dataclass
class DecodedExample:
    """One record in the prep's layout, its image still as stored (`image_bytes`)."""
    image_bytes: bytes
    scale: float
    offset: float
    patient: str
    series: str
    phase: int
    slice_index: int
    labels: dict  # IAP -> (state int, canonical value bytes, number float)


def decode_example(data: bytes) -> DecodedExample:
    """Raises ValueError for a record that is not a tf.train.Example of the prep's layout."""
    try:
        feature = Example.FromString(data).features.feature
        labels = {name: (feature[state].int64_list.value[0], feature[value].bytes_list.value[0],
                         feature[number].float_list.value[0])
                  for name, state, value, number in _LABEL_KEYS}
        return DecodedExample(feature["image"].bytes_list.value[0],
                              feature["intensity_scale"].float_list.value[0],
                              feature["intensity_offset"].float_list.value[0],
                              feature["patient"].bytes_list.value[0].decode(),
                              feature["series"].bytes_list.value[0].decode(),
                              int(feature["phase"].int64_list.value[0]),
                              int(feature["slice_index"].int64_list.value[0]), labels)
    except (IndexError, UnicodeDecodeError) as err:
        raise ValueError(f"not an example of the prep's record layout ({err})") from err
    except Exception as err:  # protobuf's DecodeError, whose class depends on the runtime
        raise ValueError(f"not a tf.train.Example ({type(err).__name__}: {err})") from err


def encode_example(image: np.ndarray, scale: float, offset: float, patient: str, series: str,
                   phase: int, slice_index: int, num_slices: int, labels: dict,
                   encoding: str = "zlib") -> bytes:
    """A record of the prep's layout, as TFDS writes it (its features.json decides the
    reading): for writing shards where TensorFlow is not installed (benchmarks, tests);
    the prep stage writes through TFDS. labels: IAP -> (state, canonical value, number)."""
    example = Example()
    feature = example.features.feature
    data = np.ascontiguousarray(image, np.uint16).tobytes()
    feature["image"].bytes_list.value.append(zlib.compress(data) if encoding == "zlib" else data)
    for key, number in (("intensity_scale", scale), ("intensity_offset", offset),
                        ("slice_position", slice_index / max(num_slices - 1, 1))):
        feature[key].float_list.value.append(number)
    for key, number in (("phase", phase), ("slice_index", slice_index),
                        ("num_slices", num_slices)):
        feature[key].int64_list.value.append(number)
    feature["patient"].bytes_list.value.append(patient.encode())
    feature["series"].bytes_list.value.append(series.encode())
    for name, state, value, number in _LABEL_KEYS:
        label_state, label_value, label_number = labels[name]
        feature[state].int64_list.value.append(int(label_state))
        feature[value].bytes_list.value.append(label_value.encode())
        feature[number].float_list.value.append(label_number)
    return example.SerializeToString()


def decode_image(stored: bytes, encoding: str, size: int) -> np.ndarray | int:
    """The uint16 [size, size] image of a record; the pixel count instead where the image
    has another size. Raises ValueError for bytes that do not decompress."""
    if encoding == "zlib":
        try:
            stored = zlib.decompress(stored)
        except zlib.error as err:
            raise ValueError(f"image does not decompress ({err})") from err
    pixels = len(stored) // 2
    if pixels != size * size or len(stored) % 2:
        return pixels
    return np.frombuffer(stored, np.uint16).reshape(size, size)
