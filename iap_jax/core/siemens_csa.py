"""Siemens private headers: the CSA image and series headers, and MOSAIC geometry.

A Siemens scanner keeps its own header in two private elements of the creator "SIEMENS
CSA HEADER": (0029,xx10) for the image, (0029,xx20) for the series. Both are a list of
named elements, each with a list of text values. Two layouts exist:

- CSA2 starts with "SV10" and 4 unused bytes; CSA1 has no such prefix.
- Then (int32 little endian throughout) the number of elements and 4 unused bytes; per
  element a 64-byte NUL-terminated name, the value multiplicity, a 4-byte VR, the syngo
  data type, the number of items and 4 unused bytes; per item 4 int32 and the item's
  bytes, padded to a multiple of 4. The item's length is the second int32 in CSA2; in CSA1
  it is the first int32 less the first element's item count.

A MOSAIC (ImageType contains MOSAIC) holds a whole volume in one image: its slices are
tiles of a square grid, row-major, tiles_per_row = ceil(sqrt(NumberOfImagesInMosaic)), the
tiles after the last image left blank. Its ImagePositionPatient is not the first tile's:
it is where the top-left voxel would be if one tile's field of view were the whole image
(the scanner keeps one tile's geometry but the mosaic's size), so the first tile lies half
the size difference further along the rows and columns. Tile k lies k slice spacings from
the first along the CSA SliceNormalVector, whose sign tells in which direction the tiles go.
"""
from __future__ import annotations

import dataclasses
import math
import struct

import numpy as np
from pydicom.dataset import Dataset

CSA_CREATOR = "SIEMENS CSA HEADER"
_ELEMENTS = {"image": 0x10, "series": 0x20}
_MAX_COUNT = 1000  # elements per header and items per element; more means a corrupt header
_NORMAL_TOLERANCE = 1e-3  # |cos| of the CSA normal and the orientation's normal, from 1


def parse_csa(raw: bytes) -> dict[str, tuple[str, ...]]:
    """A CSA1 or CSA2 header as element name -> its values (text, stripped, as many as
    the value multiplicity says, or every item where it says 0; empty ones dropped at the
    end). ValueError where the bytes are no CSA header."""
    if not isinstance(raw, (bytes, bytearray)):
        raise ValueError(f"a CSA header is bytes, not {type(raw).__name__}")
    raw = bytes(raw)
    csa2 = raw.startswith(b"SV10")
    offset = 8 if csa2 else 0
    try:
        count = struct.unpack_from("<I", raw, offset)[0]
        if not 0 < count <= _MAX_COUNT:
            raise ValueError(f"{count} elements in a CSA header")
        offset += 8
        first_items = None
        header: dict[str, tuple[str, ...]] = {}
        for _ in range(count):
            name = raw[offset:offset + 64].split(b"\0", 1)[0].decode("latin-1")
            vm, items = struct.unpack_from("<i", raw, offset + 64)[0], struct.unpack_from("<i", raw, offset + 76)[0]
            offset += 84
            if not 0 <= items <= _MAX_COUNT:
                raise ValueError(f"{items} items in CSA element {name!r}")
            if first_items is None:
                first_items = items
            wanted = vm if vm > 0 else items
            values = []
            for item in range(items):
                first, second = struct.unpack_from("<2i", raw, offset)
                offset += 16
                length = second if csa2 else first - first_items
                if length < 0 or offset + length > len(raw):
                    if csa2:
                        raise ValueError(f"CSA element {name!r} runs past the header's end")
                    break  # CSA1 ends an element's list with such an item
                if item < wanted:
                    values.append(raw[offset:offset + length].split(b"\0", 1)[0].decode("latin-1").strip())
                offset += (length + 3) // 4 * 4
            while values and not values[-1]:
                values.pop()
            header[name] = tuple(values)
        return header
    except struct.error:
        raise ValueError("CSA header cut off") from None


def csa_header(ds: Dataset, kind: str = "image") -> dict[str, tuple[str, ...]] | None:
    """The CSA image or series header of a dataset, None where it has none; ValueError
    where the element is there but no CSA header."""
    try:
        raw = ds.private_block(0x0029, CSA_CREATOR)[_ELEMENTS[kind]].value
    except (KeyError, ValueError):
        return None
    return None if raw is None or raw == b"" else parse_csa(raw)


def _numbers(header: dict[str, tuple[str, ...]], name: str) -> list[float]:
    """The values of an element as numbers (ValueError if any is no finite number)."""
    numbers = [float(v) for v in header.get(name, ())]
    if not all(math.isfinite(n) for n in numbers):
        raise ValueError(f"{name} {header[name]!r}")
    return numbers


def _images(header: dict[str, tuple[str, ...]] | None) -> int | None:
    try:
        numbers = _numbers(header or {}, "NumberOfImagesInMosaic")
    except ValueError:
        return None
    if not numbers or numbers[0] != int(numbers[0]) or numbers[0] <= 0:
        return None
    return int(numbers[0])


def csa_images_in_mosaic(ds: Dataset) -> int | None:
    """NumberOfImagesInMosaic from the CSA image header, None where there is no such
    positive whole number."""
    try:
        return _images(csa_header(ds))
    except ValueError:
        return None


def is_mosaic(ds: Dataset) -> bool:
    image_type = ds.get("ImageType") or []
    values = [image_type] if isinstance(image_type, (str, bytes)) else image_type
    return "MOSAIC" in [str(v).strip().upper() for v in values]


def mosaic_tiles_per_row(ds: Dataset) -> int | None:
    """Tiles per row of a MOSAIC (None if it is not one or the count is unknown):
    ceil(sqrt(images)) from the CSA header's image count, as dcm2niix and nibabel do, else
    Columns over the acquisition matrix's column steps (a FOV needs no more; slices do:
    see mosaic_layout)."""
    if not is_mosaic(ds):
        return None
    images = csa_images_in_mosaic(ds)
    if images:
        return math.ceil(math.sqrt(images))
    columns = int(ds.get("Columns") or 0)
    matrix = ds.get("AcquisitionMatrix")
    try:
        tile_columns = int(matrix[1]) or int(matrix[3])
    except (TypeError, ValueError, IndexError):
        return None
    return columns // tile_columns if tile_columns and columns % tile_columns == 0 else None


class MosaicError(ValueError):
    """A MOSAIC whose tiles cannot be told apart (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Mosaic:
    """How a MOSAIC's image splits into slices: `images` tiles of tile_rows x tile_columns,
    row-major in a grid of tiles_per_row x tiles_per_row, each a slice."""

    images: int
    tiles_per_row: int
    tile_rows: int
    tile_columns: int
    # Per tile: ImagePositionPatient of its first voxel and its position along the
    # orientation's slice normal (row x column direction); None and NaN without geometry.
    origins: tuple[tuple[float, float, float], ...] | None
    positions: tuple[float, ...]


def _vector(ds: Dataset, keyword: str, size: int) -> np.ndarray | None:
    try:
        values = np.array([float(v) for v in ds.get(keyword) or []], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return values if values.shape == (size,) and np.all(np.isfinite(values)) else None


def _found(header: dict[str, tuple[str, ...]], name: str) -> str:
    """What an element unusable as a number holds, for a skip's detail ("" where absent)."""
    return f" (it holds {list(header[name])[:4]!r})" if header.get(name) else ""


def _spacing(ds: Dataset) -> float | None:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            spacing = float(ds.get(keyword))
        except (TypeError, ValueError):
            continue
        if math.isfinite(spacing) and spacing > 0:
            return spacing
    return None


def mosaic_layout(ds: Dataset) -> Mosaic | None:
    """The tiling and tile positions of a MOSAIC, None for any other image. MosaicError
    where its slices cannot be known: no (or an unreadable) CSA image header, no
    NumberOfImagesInMosaic or SliceNormalVector in it, a grid that does not divide the
    image, several frames, a normal across the image's orientation, no slice spacing."""
    if not is_mosaic(ds):
        return None
    try:
        header = csa_header(ds)
    except ValueError as err:
        raise MosaicError(f"unreadable CSA image header: {err}") from None
    if header is None:
        raise MosaicError("no CSA image header: the number of tiles is unknown")
    images = _images(header)
    if images is None:
        raise MosaicError("no NumberOfImagesInMosaic in the CSA image header: the number of tiles "
                          "is unknown" + _found(header, "NumberOfImagesInMosaic"))
    frames = str(ds.get("NumberOfFrames") or "").strip()
    if frames not in ("", "0", "1"):
        raise MosaicError(f"NumberOfFrames {frames[:16]!r}: a mosaic is one image")
    per_row = math.ceil(math.sqrt(images))
    rows, columns = int(ds.Rows), int(ds.Columns)
    tile_rows, tile_columns = rows // per_row, columns // per_row
    if tile_rows * per_row != rows or tile_columns * per_row != columns or not tile_rows or not tile_columns:
        raise MosaicError(f"{images} images make {per_row} x {per_row} tiles, which do not divide "
                          f"{rows} x {columns} pixels")
    try:
        normal = np.array(_numbers(header, "SliceNormalVector"), dtype=np.float64)
    except ValueError:
        normal = np.zeros(0)
    length = float(np.linalg.norm(normal)) if normal.shape == (3,) else 0.0
    if length == 0:
        raise MosaicError("no SliceNormalVector in the CSA image header: the order of the tiles "
                          "is unknown" + _found(header, "SliceNormalVector"))
    normal = normal / length
    orientation = _vector(ds, "ImageOrientationPatient", 6)
    position = _vector(ds, "ImagePositionPatient", 3)
    spacing = _spacing(ds)
    geometry = None
    if orientation is not None:
        row_dir, column_dir = orientation[:3], orientation[3:]
        cross = np.cross(row_dir, column_dir)
        if np.linalg.norm(cross) > 0:
            cross /= np.linalg.norm(cross)
            cosine = float(cross @ normal)
            if abs(abs(cosine) - 1) > _NORMAL_TOLERANCE:
                raise MosaicError(f"the CSA SliceNormalVector {[round(float(v), 4) for v in normal]} is not "
                                  "along the ImageOrientationPatient's normal")
            # The orientation's normal, exactly across the image, signed as the CSA one.
            geometry = row_dir, column_dir, cross, math.copysign(1.0, cosine)
    if geometry is None or position is None:
        return Mosaic(images, per_row, tile_rows, tile_columns, None, (math.nan,) * images)
    if spacing is None and images > 1:
        raise MosaicError("no SpacingBetweenSlices or SliceThickness: the tiles' positions are unknown")
    row_dir, column_dir, cross, sign = geometry
    pixel_spacing = _vector(ds, "PixelSpacing", 2)
    if pixel_spacing is None:  # the position along the normal needs no in-plane shift
        pixel_spacing = np.zeros(2)
    # PixelSpacing is (between rows, between columns): along the column and row directions.
    shift = ((rows - tile_rows) / 2 * pixel_spacing[0] * column_dir
             + (columns - tile_columns) / 2 * pixel_spacing[1] * row_dir)
    first = position + shift
    step = (spacing or 0.0) * sign * cross
    origins = tuple(tuple(float(v) for v in first + k * step) for k in range(images))
    positions = tuple(float(np.dot(origin, cross)) for origin in origins)
    return Mosaic(images, per_row, tile_rows, tile_columns, origins, positions)


def cut_tile(pixels: np.ndarray, mosaic: Mosaic, tile: int) -> np.ndarray:
    """Tile `tile` (a slice) of a mosaic's pixels [rows, columns]; ValueError for a tile
    that is no slice (blank padding or beyond the grid) or pixels of another size."""
    if not 0 <= tile < mosaic.images:
        raise ValueError(f"tile {tile} of a mosaic of {mosaic.images} images")
    expected = (mosaic.tiles_per_row * mosaic.tile_rows, mosaic.tiles_per_row * mosaic.tile_columns)
    if pixels.shape != expected:
        raise ValueError(f"mosaic pixels of shape {pixels.shape}, expected {expected}")
    row, column = divmod(tile, mosaic.tiles_per_row)
    return pixels[row * mosaic.tile_rows:(row + 1) * mosaic.tile_rows,
                  column * mosaic.tile_columns:(column + 1) * mosaic.tile_columns]

