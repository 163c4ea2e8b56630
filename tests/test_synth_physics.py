"""Physics of the synthetic generator, checked on small noise-free or uniform slices."""
import numpy as np
import pytest

from data_prep.synthetic import acquisition, tissues
from data_prep.synthetic.tissues import N_TISSUES, TISSUE_INDEX

SIZE = 64


def _maps(size=SIZE, b1=1.0) -> acquisition.FieldMaps:
    ones = np.ones((size, size), np.float32)
    return acquisition.FieldMaps(b1 * ones, ones, 0 * ones, ones, 0.0)


def _acq(noise_sigma=0.0, matrix=SIZE, partial_fourier=1.0, acceleration=1) -> acquisition.Acquisition:
    return acquisition.Acquisition(
        recon_size=SIZE, acq_frequency=matrix, acq_phase=matrix, phase_axis=1,
        partial_fourier=partial_fourier, conjugate_synthesis=False, acceleration=acceleration,
        filter_radius=1.5, filter_width=0.05, noise_sigma=noise_sigma, intensity_correction=0.0)


def _halves(left: str, right: str) -> np.ndarray:
    """Left half one tissue, right half another."""
    f = np.zeros((N_TISSUES, SIZE, SIZE), np.float32)
    f[TISSUE_INDEX[left], :, : SIZE // 2] = 1
    f[TISSUE_INDEX[right], :, SIZE // 2:] = 1
    return f


def _fat_to_fgt(flip, tr, field=1.5, te=2.3):
    model = acquisition.signal_model(field, flip, tr, te)
    image = acquisition.simulate_slice(_halves("fat", "fibroglandular"), model, _acq(), _maps(),
                                       "none", None)
    fat = image[8:-8, 8:SIZE // 2 - 8].mean()
    fgt = image[8:-8, SIZE // 2 + 8:-8].mean()
    return fat / fgt


def test_spgr_matches_closed_form():
    s = acquisition.spgr_signal(0.9, 1 / 296, 45, 10, 5.0, 2.0)
    alpha = np.deg2rad(10)
    e1 = np.exp(-5 / 296)
    expected = 0.9 * np.sin(alpha) * (1 - e1) / (1 - np.cos(alpha) * e1) * np.exp(-2 / 45)
    assert s == pytest.approx(expected, rel=1e-12)


def test_fat_parenchyma_contrast_moves_with_tr_and_flip():
    base = _fat_to_fgt(flip=10, tr=5.0)
    # T1 weighting grows with the flip angle and shrinks as TR lengthens.
    assert _fat_to_fgt(flip=15, tr=5.0) > base * 1.05
    assert _fat_to_fgt(flip=10, tr=10.0) < base / 1.05
    # And the ratio the image shows is the one the signal equation predicts.
    fi = tissues.field_index(1.5)
    fat_r1, fat_t2s = tissues.fat_compartment(1.5)
    fgt = tissues.TISSUE_PROPERTIES["fibroglandular"]
    predicted_direction = (
        acquisition.spgr_signal(1, fat_r1, fat_t2s, 15, 5.0, 2.3)
        / acquisition.spgr_signal(1, 1 / fgt.t1_ms[fi], fgt.t2star_ms[fi], 15, 5.0, 2.3)
        > acquisition.spgr_signal(1, fat_r1, fat_t2s, 10, 5.0, 2.3)
        / acquisition.spgr_signal(1, 1 / fgt.t1_ms[fi], fgt.t2star_ms[fi], 10, 5.0, 2.3))
    assert predicted_direction


def test_fat_suppression_lowers_fat_signal():
    fractions = _halves("fat", "fibroglandular")
    model = acquisition.signal_model(1.5, 10, 5.0, 2.3)
    maps = _maps()
    plain = acquisition.simulate_slice(fractions, model, _acq(), maps, "none", None)
    for fat_sat in ("FS", "SFS"):
        suppressed = acquisition.simulate_slice(fractions, model, _acq(), maps, fat_sat, None)
        fat_ratio = suppressed[8:-8, 8:24].mean() / plain[8:-8, 8:24].mean()
        fgt_ratio = suppressed[8:-8, 40:56].mean() / plain[8:-8, 40:56].mean()
        assert fat_ratio < 0.35, fat_sat
        assert fgt_ratio == pytest.approx(1.0, abs=0.02)


def test_fat_sat_is_worse_where_b1_is_off():
    good = acquisition.fat_residual(_maps(b1=1.0), "FS")
    poor = acquisition.fat_residual(_maps(b1=0.7), "FS")
    assert float(np.mean(poor)) > float(np.mean(good)) + 0.2


def test_noise_falls_as_field_strength_rises():
    fractions = np.zeros((N_TISSUES, SIZE, SIZE), np.float32)
    fractions[TISSUE_INDEX["fibroglandular"]] = 1
    noise, snr = {}, {}
    for field in (1.5, 3.0):
        sigma = 0.01 / acquisition.relative_snr(field, 1.0, 300, 150, 1, 400, 8)
        model = acquisition.signal_model(field, 10, 5.0, 2.0)
        clean = acquisition.simulate_slice(fractions, model, _acq(sigma), _maps(), "none", None)
        noisy = acquisition.simulate_slice(fractions, model, _acq(sigma), _maps(), "none",
                                           np.random.default_rng(0))
        noise[field] = (noisy - clean).std()
        snr[field] = clean.mean() / noise[field]
    assert noise[3.0] < noise[1.5] / 1.6
    # Longer T1 at 3 T costs some signal, but the image SNR still rises.
    assert snr[3.0] > 1.2 * snr[1.5]


def test_parallel_imaging_amplifies_noise():
    fractions = np.zeros((N_TISSUES, SIZE, SIZE), np.float32)
    fractions[TISSUE_INDEX["fibroglandular"]] = 1
    model = acquisition.signal_model(1.5, 10, 5.0, 2.0)
    maps = _maps()
    maps = acquisition.FieldMaps(maps.b1, maps.coil, maps.off_resonance_ppm,
                                 np.full_like(maps.b1, 1.5), 0.0)
    plain = acquisition.simulate_slice(fractions, model, _acq(0.002), maps, "none",
                                       np.random.default_rng(1))
    accelerated = acquisition.simulate_slice(fractions, model, _acq(0.002, acceleration=2), maps,
                                             "none", np.random.default_rng(1))
    assert accelerated[8:-8, 8:-8].std() > 1.3 * plain[8:-8, 8:-8].std()


def test_contrast_raises_lesion_r1_in_proportion_to_agent_r1():
    """Lesion R1 recovered from post-contrast signal: its rise scales with the agent's r1."""
    lesion = np.zeros((N_TISSUES, 4, 4), np.float32)
    lesion[TISSUE_INDEX["lesion"]] = 1
    b1 = np.ones((4, 4), np.float32)
    props = tissues.TISSUE_PROPERTIES["lesion"]
    field, flip, tr, te = 1.5, 10, 5.0, 2.4
    conc = tissues.concentrations(1.5, "washout", 1.0)
    pd, t2s = props.proton_density, props.t2star_ms[0]
    rises = {}
    for agent in ("MAGNEVIST", "GADAVIST", "MULTIHANCE"):
        r1 = tissues.AGENTS[agent].r1_per_mm_s[0]
        pre = acquisition.transverse_magnetisation(
            lesion, acquisition.signal_model(field, flip, tr, te), b1, 1.0).real.mean()
        post = acquisition.transverse_magnetisation(
            lesion, acquisition.signal_model(field, flip, tr, te, r1, conc), b1, 1.0).real.mean()
        assert post > pre * 1.3
        delta_r1 = (acquisition.r1_from_signal(post, pd, t2s, flip, tr, te)
                    - acquisition.r1_from_signal(pre, pd, t2s, flip, tr, te))
        rises[agent] = delta_r1 * 1000 / conc[TISSUE_INDEX["lesion"]]  # back to L/mmol/s
        assert rises[agent] == pytest.approx(r1, rel=0.02)
    assert rises["MAGNEVIST"] < rises["GADAVIST"] < rises["MULTIHANCE"]


def test_acquisition_matrix_truncation_blurs_edges():
    fractions = _halves("fat", "air")
    model = acquisition.signal_model(1.5, 10, 5.0, 2.3)
    full = acquisition.simulate_slice(fractions, model, _acq(matrix=SIZE), _maps(), "none", None)
    low = acquisition.simulate_slice(fractions, model, _acq(matrix=SIZE // 2), _maps(), "none", None)
    edge_full = np.abs(np.diff(full[SIZE // 2])).max()
    edge_low = np.abs(np.diff(low[SIZE // 2])).max()
    assert edge_low < 0.8 * edge_full
    # Gibbs ringing: the truncated image overshoots the plateau next to the edge.
    plateau = low[SIZE // 2, 8:20].mean()
    assert low[SIZE // 2, :SIZE // 2].max() > 1.05 * plateau


def test_partial_fourier_reduces_resolution_along_phase():
    fractions = np.zeros((N_TISSUES, SIZE, SIZE), np.float32)
    fractions[TISSUE_INDEX["fat"], 24:40, 24:40] = 1
    fractions[TISSUE_INDEX["air"]] = 1 - fractions[TISSUE_INDEX["fat"]]
    model = acquisition.signal_model(1.5, 10, 5.0, 2.3)
    full = acquisition.simulate_slice(fractions, model, _acq(), _maps(), "none", None)
    partial = acquisition.simulate_slice(fractions, model, _acq(partial_fourier=0.6), _maps(),
                                         "none", None)
    assert not np.allclose(full, partial, rtol=0.02)
