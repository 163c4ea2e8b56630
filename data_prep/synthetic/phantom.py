"""Seeded procedural 3D anatomy of a prone breast MRI patient.

Patient coordinates follow DICOM (LPS, millimetres): +x towards the patient's left,
+y posterior, +z superior. The breasts hang anteriorly (-y) from the chest wall. Smooth
body structures are analytic shapes evaluated at each pixel; fine breast structure
(fibroglandular tissue, vessels, lesion margin) comes from smoothed 3D random fields on
a coarse grid, interpolated to the pixel grid and thresholded there so edges stay sharp.

A slice is returned as partial-volume fractions of every tissue (tissues.TISSUES),
shape (n_tissues, rows, columns), summing to one at every pixel.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from data_prep.synthetic.tissues import N_TISSUES, TISSUE_INDEX

DENSITY_CLASSES = ("fatty", "scattered", "heterogeneous", "extremely_dense")
# Target fraction of the breast interior that is fibroglandular, per density class.
DENSITY_FGT_RANGE = {"fatty": (0.05, 0.18), "scattered": (0.2, 0.4),
                     "heterogeneous": (0.45, 0.65), "extremely_dense": (0.7, 0.85)}
LESION_KINETICS = ("persistent", "plateau", "washout")
BPE_LEVELS = {"minimal": 0.5, "mild": 1.0, "moderate": 2.0, "marked": 3.5}

T = TISSUE_INDEX


@dataclass(frozen=True)
class BreastShape:
    center_x: float  # mm, base centre on the chest wall
    radius: float  # lateral half-width at the base, mm
    length: float  # anterior projection from the chest wall, mm
    z_half: float  # superior-inferior half-extent, mm
    tilt: float  # lateral splay of the breast axis, radians


@dataclass(frozen=True)
class PhantomParams:
    age: int
    body_half_width: float
    body_half_depth: float
    subcutaneous_fat: float
    skin: float
    chest_wall: float
    left: BreastShape
    right: BreastShape
    breast_fat_margin: float
    breast_density: str
    fgt_target: float
    bpe: str
    heart_z: float
    has_lesion: bool
    lesion_side: str
    lesion_center: tuple[float, float, float]
    lesion_radius: float
    lesion_kinetics: str

    @property
    def body_width_mm(self) -> float:
        return 2 * self.body_half_width

    def facts(self) -> dict:
        """Phantom facts reported in cohort.csv."""
        vol = sum(np.pi / 2 * b.radius * b.length * b.z_half * 4 / 3 / 1000
                  for b in (self.left, self.right))
        return {
            "patient_age": self.age,
            "body_width_mm": round(self.body_width_mm, 1),
            "breast_volume_ml": round(vol / 2, 1),
            "breast_density": self.breast_density,
            "fgt_target_fraction": round(self.fgt_target, 3),
            "bpe": self.bpe,
            "has_lesion": int(self.has_lesion),
            "lesion_side": self.lesion_side if self.has_lesion else "",
            "lesion_diameter_mm": round(2 * self.lesion_radius, 1) if self.has_lesion else 0,
            "lesion_kinetics": self.lesion_kinetics if self.has_lesion else "",
        }


def sample_params(rng: np.random.Generator) -> PhantomParams:
    age = int(rng.integers(28, 82))
    # Younger women have denser breasts; larger breasts are fattier.
    density_probs = np.array([0.1, 0.4, 0.4, 0.1]) * np.array(
        [1 + (age - 55) / 40, 1.0, 1 - (age - 55) / 60, 1 - (age - 55) / 30])
    density_probs = np.clip(density_probs, 0.02, None)
    density = DENSITY_CLASSES[rng.choice(4, p=density_probs / density_probs.sum())]
    a = float(np.clip(rng.normal(160, 16), 125, 200))
    size = a / 160
    b = a * rng.uniform(0.6, 0.72)
    fatness = {"fatty": 1.25, "scattered": 1.1, "heterogeneous": 0.95, "extremely_dense": 0.85}[density]
    radius = rng.uniform(50, 72) * size * fatness ** 0.5
    length = float(np.clip(rng.uniform(55, 125) * size * fatness, 40, 150))
    sep = a * rng.uniform(0.42, 0.52)
    z_half = radius * rng.uniform(1.0, 1.25)

    def breast(sign: float) -> BreastShape:
        asym = rng.uniform(0.93, 1.07)
        return BreastShape(center_x=sign * sep * rng.uniform(0.97, 1.03), radius=radius * asym,
                           length=length * asym, z_half=z_half,
                           tilt=sign * rng.uniform(0.05, 0.3))

    left, right = breast(1.0), breast(-1.0)
    has_lesion = bool(rng.random() < 0.85)
    side = "left" if rng.random() < 0.5 else "right"
    host = left if side == "left" else right
    depth = rng.uniform(0.25, 0.65) * host.length
    lateral = rng.uniform(-0.4, 0.4) * host.radius
    lesion_z = rng.uniform(-0.45, 0.45) * host.z_half
    lesion_radius = float(rng.uniform(4, 14))
    return PhantomParams(
        age=age, body_half_width=a, body_half_depth=b,
        subcutaneous_fat=float(rng.uniform(6, 22) * size ** 2), skin=float(rng.uniform(1.5, 2.5)),
        chest_wall=float(rng.uniform(10, 16)), left=left, right=right,
        breast_fat_margin=float(rng.uniform(3, 9)), breast_density=density,
        fgt_target=float(rng.uniform(*DENSITY_FGT_RANGE[density])),
        bpe=str(rng.choice(list(BPE_LEVELS), p=[0.4, 0.35, 0.17, 0.08])),
        heart_z=float(-z_half * rng.uniform(0.5, 0.9)), has_lesion=has_lesion, lesion_side=side,
        lesion_center=(host.center_x + lateral, -depth, lesion_z),
        lesion_radius=lesion_radius,
        lesion_kinetics=str(rng.choice(LESION_KINETICS, p=[0.2, 0.3, 0.5])))


def _ramp(signed_distance: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume occupancy from a signed distance (negative inside), float32."""
    return np.clip(0.5 - signed_distance / width, 0.0, 1.0).astype(np.float32, copy=False)


def _ellipse_distance(X, Y, cx, cy, ax, ay, power=2.0):
    rho = (np.abs((X - cx) / ax) ** power + np.abs((Y - cy) / ay) ** power) ** (1.0 / power)
    return (rho - 1.0) * (0.5 * (ax + ay))


def _smooth_min(a, b, k):
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1 - h)


def _unit_field(rng, shape, sigma_vox) -> np.ndarray:
    sigma = np.maximum(np.broadcast_to(np.asarray(sigma_vox, dtype=float), (3,)), 0.6)
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma,
                                    mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-6)


class Phantom:
    """One patient's anatomy; `fractions` renders the tissue maps of an axial slice."""

    def __init__(self, params: PhantomParams, rng: np.random.Generator, grid_mm: float):
        self.params = params
        self.grid_mm = grid_mm
        self._rng = rng  # the 3D fields are built on first use: geometry alone is cheap
        self.fields: np.ndarray | None = None
        self._thick_cache: dict[float, np.ndarray] = {}

    # ---- analytic geometry -------------------------------------------------------
    def chest_surface_y(self, x: np.ndarray) -> np.ndarray:
        p = self.params
        q = np.clip(np.abs(x) / p.body_half_width, 0.0, 1.0)
        return -p.body_half_depth * np.sqrt(1.0 - q ** 2.4) ** (1 / 1.2)

    def _breast_distance(self, X, Y, z, breast: BreastShape):
        zq = max(0.0, 1.0 - (z / breast.z_half) ** 2)
        if zq <= 0.0:
            return np.full(np.broadcast(X, Y).shape, 1e3, dtype=np.float32)
        radius = breast.radius * zq ** 0.5
        length = breast.length * zq ** 0.6
        base_y = float(self.chest_surface_y(np.array(breast.center_x))) + 0.15 * self.params.subcutaneous_fat
        c, s = np.cos(breast.tilt), np.sin(breast.tilt)
        dx, dy = X - breast.center_x, base_y - Y
        u = c * dx - s * dy  # across the breast axis
        v = s * dx + c * dy  # along it, anterior positive
        depth = np.where(v > 0, length, 30.0)
        rho = np.sqrt((u / radius) ** 2 + (v / depth) ** 2)
        return ((rho - 1.0) * np.minimum(radius, depth)).astype(np.float32)

    def anterior_extent_y(self) -> float:
        """Most anterior point of the body (breast tips), mm."""
        ys = []
        for b in (self.params.left, self.params.right):
            base = float(self.chest_surface_y(np.array(b.center_x)))
            ys.append(base + 0.15 * self.params.subcutaneous_fat - b.length * np.cos(b.tilt) - 6)
        return min(ys)


    # ---- coarse 3D fields --------------------------------------------------------
    def _build_fields(self, rng: np.random.Generator):
        p, g = self.params, self.grid_mm
        x_half = p.body_half_width + 10
        y0 = self.anterior_extent_y() - 10
        y1 = float(self.chest_surface_y(np.array(0.0))) + 15
        z_half = max(p.left.z_half, p.right.z_half) + 6
        self.field_origin = np.array([-z_half, y0, -x_half])
        shape = (int(2 * z_half / g) + 2, int((y1 - y0) / g) + 2, int(2 * x_half / g) + 2)
        zs = self.field_origin[0] + g * np.arange(shape[0])
        ys = self.field_origin[1] + g * np.arange(shape[1])
        xs = self.field_origin[2] + g * np.arange(shape[2])
        Z, Y, X = np.meshgrid(zs, ys, xs, indexing="ij", sparse=True)

        # Fibroglandular tissue: multi-scale texture plus a bias towards the central,
        # retroareolar breast; thresholded to the patient's target density.
        texture = (_unit_field(rng, shape, (5.0 / g, 8.0 / g, 4.0 / g))
                   + 0.55 * _unit_field(rng, shape, (1.5 / g, 3.0 / g, 1.2 / g)))
        bias = np.full(shape, -10.0, dtype=np.float32)
        interior = np.zeros(shape, dtype=bool)
        for breast in (p.left, p.right):
            d = np.stack([self._breast_distance(X[0], Y[0], float(z), breast) for z in zs])
            inside = d < -p.breast_fat_margin
            lateral = np.abs(X - breast.center_x) / breast.radius
            vertical = np.abs(Z) / breast.z_half
            b = 1.2 - 1.4 * lateral ** 2 - 1.0 * vertical ** 2
            bias = np.where(inside, np.maximum(bias, b), bias)
            interior |= inside
        fgt = (texture + 1.6 * bias).astype(np.float32)
        if interior.any():
            threshold = float(np.quantile(fgt[interior], 1.0 - p.fgt_target))
        else:
            threshold = 0.0
        fgt -= threshold

        # Vessels: where two independent smooth fields both cross zero (3D curves).
        f1, f2 = _unit_field(rng, shape, 5.0 / g), _unit_field(rng, shape, 5.0 / g)
        vessel = np.sqrt(f1 ** 2 + f2 ** 2) * 3.0  # roughly mm from a centreline

        # Lesion: an ellipsoid with an irregular, lobulated margin (signed mm).
        lesion = np.full(shape, 1e3, dtype=np.float32)
        if p.has_lesion:
            cx, cy, cz = p.lesion_center
            r = p.lesion_radius
            rho = np.sqrt(((X - cx) / r) ** 2 + ((Y - cy) / (0.8 * r)) ** 2 + ((Z - cz) / (0.9 * r)) ** 2)
            margin = _unit_field(rng, shape, 1.5 / g)
            lesion = ((rho - 1.0) * r + 0.18 * r * margin).astype(np.float32)
        self.fields = np.stack([fgt, vessel.astype(np.float32), lesion])  # (3, nz, ny, nx)

    def _fields_for_thickness(self, thickness_mm: float) -> np.ndarray:
        """Fields averaged through the slice profile (box of the slice thickness)."""
        if self.fields is None:
            self._build_fields(self._rng)
        key = round(thickness_mm, 3)
        if key not in self._thick_cache:
            size = int(round(thickness_mm / self.grid_mm))
            fields = self.fields
            if size >= 2:
                fields = ndimage.uniform_filter1d(fields, size, axis=1, mode="nearest")
            self._thick_cache[key] = fields
        return self._thick_cache[key]

    def _field_plane(self, z, thickness_mm, xs, ys):
        """Bilinear resampling of the coarse fields at height z onto the pixel grid."""
        fields = self._fields_for_thickness(thickness_mm)
        g = self.grid_mm
        nz, ny, nx = fields.shape[1:]
        fz = (z - self.field_origin[0]) / g
        outside = np.array([10.0, 100.0, 1e3], dtype=np.float32)[:, None, None]
        if fz < 0 or fz > nz - 1:
            return np.broadcast_to(outside, (3, len(ys), len(xs)))
        i0 = min(int(fz), nz - 2)
        w = np.float32(fz - i0)
        plane = fields[:, i0] * (1 - w) + fields[:, i0 + 1] * w

        def axis_weights(coords, origin, n):
            f = (coords - origin) / g
            valid = (f >= 0) & (f <= n - 1)
            i = np.clip(f.astype(int), 0, n - 2)
            return i, (np.clip(f - i, 0, 1)).astype(np.float32), valid

        iy, wy, vy = axis_weights(ys, self.field_origin[1], ny)
        ix, wx, vx = axis_weights(xs, self.field_origin[2], nx)
        out = np.empty((3, len(ys), len(xs)), dtype=np.float32)
        out[:] = outside
        rows, cols = np.nonzero(vy)[0], np.nonzero(vx)[0]
        if rows.size == 0 or cols.size == 0:
            return out
        # The fields cover the breasts only: resample that block of the slice.
        r, c = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
        iy, wy, ix, wx = iy[r], wy[r], ix[c], wx[c]
        block = plane[:, iy] * (1 - wy)[None, :, None] + plane[:, iy + 1] * wy[None, :, None]
        out[:, r, c] = block[:, :, ix] * (1 - wx) + block[:, :, ix + 1] * wx
        return out

    # ---- slice rendering ---------------------------------------------------------
    def fractions(self, xs: np.ndarray, ys: np.ndarray, z: float, thickness_mm: float) -> np.ndarray:
        """Tissue fractions (n_tissues, len(ys), len(xs)) of the slice at height z.

        xs are the patient x of each column (either direction), ys the y of each row.
        """
        p = self.params
        px = float(abs(xs[1] - xs[0])) if len(xs) > 1 else 1.0
        canvas = _Canvas(xs, ys)
        X, Y = xs[None, :].astype(np.float32), ys[:, None].astype(np.float32)

        # Body: chest superellipse united with the two breasts; skin shell; fat inside.
        chest = _ellipse_distance(X, Y, 0.0, 0.0, p.body_half_width, p.body_half_depth, 2.4)
        breast_l = self._breast_distance(X, Y, z, p.left)
        breast_r = self._breast_distance(X, Y, z, p.right)
        breasts = np.minimum(breast_l, breast_r)
        body = _smooth_min(chest, breasts, 18.0)
        canvas.paint_full(T["skin"], _ramp(body, px))
        for breast in (p.left, p.right):
            self._paint_nipple(canvas, z, breast, px)
        canvas.paint_full(T["fat"], _ramp(body + p.skin, px))

        # Chest wall muscle under the subcutaneous fat; thoracic cavity with lungs.
        sub = p.subcutaneous_fat
        canvas.paint_full(T["muscle"], _ramp(chest + sub, px))
        cav_a = p.body_half_width - sub - p.chest_wall
        cav_b = p.body_half_depth - sub - p.chest_wall * 0.8
        cav_cy = -0.12 * p.body_half_depth
        canvas.paint_full(T["lung"], _ramp(_ellipse_distance(X, Y, 0.0, cav_cy, cav_a, cav_b * 0.85, 2.2), px))
        self._paint_mediastinum(canvas, z, cav_a, cav_b, cav_cy, px)
        self._paint_bones(canvas, z, cav_a, cav_b, cav_cy, px)

        # Breast interior: fibroglandular tissue, vessels, lesion from the coarse fields.
        fgt, vessel, lesion = self._field_plane(z, thickness_mm, xs, ys)
        interior = _ramp(breasts + p.breast_fat_margin, px) * _ramp(
            Y - (self.chest_surface_y(X) - 2.0), px)
        fgt_width = 0.25 * (1.0 + thickness_mm / 2.0)
        canvas.paint_full(T["fibroglandular"], interior * _ramp(-fgt, fgt_width))
        canvas.paint_full(T["blood"], interior * _ramp(vessel - 1.2, px) * 0.9)
        if p.has_lesion:
            canvas.paint_full(T["lesion"], _ramp(lesion, px))
            core = p.lesion_radius * 0.45
            if p.lesion_radius > 8:
                canvas.paint_full(T["lesion_core"], _ramp(lesion + core, px))
        return canvas.fractions

    def _paint_nipple(self, canvas, z, breast, px):
        zq = 1.0 - (z / (0.12 * breast.z_half)) ** 2
        if zq <= 0:
            return
        base = float(self.chest_surface_y(np.array(breast.center_x))) + 0.15 * self.params.subcutaneous_fat
        tip = breast.length * np.sqrt(1.0 - (z / breast.z_half) ** 2) ** 0.6
        nx = breast.center_x + np.sin(breast.tilt) * tip
        ny = base - np.cos(breast.tilt) * tip
        canvas.paint_ellipse(T["skin"], nx, ny, 6 * zq ** 0.5 + 1, 5 * zq ** 0.5 + 1, px)

    def _paint_mediastinum(self, canvas, z, cav_a, cav_b, cav_cy, px):
        p = self.params
        heart_half_z = 65.0
        hq = 1.0 - ((z - p.heart_z) / heart_half_z) ** 2
        if hq > 0:
            s = hq ** 0.5
            hx, hy = 0.18 * cav_a, cav_cy - 0.05 * cav_b
            ax, ay = 0.42 * cav_a * s + 8, 0.5 * cav_b * s + 8
            canvas.paint_ellipse(T["fat"], hx, hy, ax + 4, ay + 4, px)
            canvas.paint_ellipse(T["myocardium"], hx, hy, ax, ay, px)
            canvas.paint_ellipse(T["blood"], hx + 0.25 * ax, hy + 0.1 * ay, 0.45 * ax, 0.55 * ay, px)
            canvas.paint_ellipse(T["blood"], hx - 0.4 * ax, hy - 0.25 * ay, 0.4 * ax, 0.4 * ay, px)
        if z > p.heart_z + 0.4 * heart_half_z:
            canvas.paint_ellipse(T["fat"], 0.0, cav_cy - 0.2 * cav_b, 40, 32, px)
            canvas.paint_ellipse(T["blood"], 12.0, cav_cy - 0.2 * cav_b, 15, 15, px)
            canvas.paint_ellipse(T["blood"], -16.0, cav_cy - 0.28 * cav_b, 13, 13, px)
        # Descending aorta beside the spine.
        spine_y = cav_cy + 0.85 * cav_b
        canvas.paint_ellipse(T["blood"], 24.0, spine_y - 28, 12, 12, px)

    def _paint_bones(self, canvas, z, cav_a, cav_b, cav_cy, px):
        p = self.params
        spine_y = cav_cy + 0.85 * cav_b
        canvas.paint_ellipse(T["cortical_bone"], 0.0, spine_y, 20, 18, px)
        canvas.paint_ellipse(T["marrow"], 0.0, spine_y, 17, 15, px)
        canvas.paint_ellipse(T["cortical_bone"], 0.0, spine_y + 30, 11, 10, px)
        canvas.paint_ellipse(T["csf"], 0.0, spine_y + 30, 8, 7, px)
        sternum_y = float(self.chest_surface_y(np.array(0.0))) + p.subcutaneous_fat + 8
        canvas.paint_ellipse(T["cortical_bone"], 0.0, sternum_y, 15, 7, px)
        canvas.paint_ellipse(T["marrow"], 0.0, sternum_y, 12, 4.5, px)
        # Ribs cross the slice obliquely: each appears as an oval at some heights only.
        for k, angle in enumerate(np.linspace(0.35, 2.8, 9)):
            if np.sin(2 * np.pi * z / 26.0 + 1.7 * k) < 0.2:
                continue
            rx = (cav_a + 6) * np.cos(angle + np.pi)
            ry = cav_cy - (cav_b * 0.85 + 6) * np.sin(angle)
            canvas.paint_ellipse(T["cortical_bone"], rx, ry, 9, 6, px)
            canvas.paint_ellipse(T["marrow"], rx, ry, 6.5, 3.5, px)


class _Canvas:
    """Partial-volume painter: each layer covers the layers below by its occupancy."""

    def __init__(self, xs: np.ndarray, ys: np.ndarray):
        self.xs, self.ys = xs, ys
        self.fractions = np.zeros((N_TISSUES, len(ys), len(xs)), dtype=np.float32)
        self.fractions[T["air"]] = 1.0

    def paint_full(self, tissue: int, occupancy: np.ndarray):
        self._paint(tissue, occupancy, slice(None), slice(None))

    def _paint(self, tissue, occupancy, rows, cols):
        region = self.fractions[:, rows, cols]
        region *= 1.0 - occupancy
        region[tissue] += occupancy

    def paint_ellipse(self, tissue, cx, cy, ax, ay, px):
        cols = _index_range(self.xs, cx - ax - 2 * px, cx + ax + 2 * px)
        rows = _index_range(self.ys, cy - ay - 2 * px, cy + ay + 2 * px)
        if cols.start >= cols.stop or rows.start >= rows.stop:
            return
        X = self.xs[None, cols].astype(np.float32)
        Y = self.ys[rows, None].astype(np.float32)
        self._paint(tissue, _ramp(_ellipse_distance(X, Y, cx, cy, ax, ay), px), rows, cols)


def _index_range(coords: np.ndarray, lo: float, hi: float) -> slice:
    """Index slice of the monotonic `coords` falling within [lo, hi]."""
    inside = np.nonzero((coords >= lo) & (coords <= hi))[0]
    if inside.size == 0:
        return slice(0, 0)
    return slice(int(inside[0]), int(inside[-1]) + 1)

