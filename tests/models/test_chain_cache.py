"""Stored propagation chains (:mod:`segassist.models.chain_cache`): read back, extended, cut
short, never wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segassist.models.chain_cache import ChainCache, chains_of
from segassist.models.features import compute_feature_maps
from segassist.models.pretrain import Encoder, PretrainConfig
from segassist.models.propagation import PropagationConfig, propagate
from tests.models.sparse_slices import sparse_on
from tests.models.test_propagation import SLICES, _moving_disc


class _Counted:
    """The disc's features, counting the slices read (one read per step, plus each chain's
    start)."""

    def __init__(self, feats: np.ndarray) -> None:
        self.feats = feats
        self.reads = 0

    def __call__(self, z: int) -> np.ndarray:
        self.reads += 1
        return self.feats[z]


@pytest.mark.parametrize("config", [PropagationConfig(), PropagationConfig(max_voxels=5000)])
def test_a_corrected_slice_recomputes_only_the_chains_next_to_it(
    tmp_path: Path, config: PropagationConfig
) -> None:
    truth, feats = _moving_disc(smoothing=3.0)
    cache = ChainCache(tmp_path / "chains")
    first = sparse_on(truth, [3, 11])
    fresh = _Counted(feats)
    propagate(fresh, first, 2, 2, config, cache)
    # chains 0–2 and 4–10 from slice 3, 10–4 and 12–14 from slice 11, + the 4 chains' starts
    assert fresh.reads == 3 + 7 + 7 + 3 + 4

    # the annotator adds slice 7: the chains from 3 up and from 11 down stop short of it and
    # are read back; only slice 7's own chains (4–6 and 8–10) are computed
    again = sparse_on(truth, [3, 7, 11])
    counted = _Counted(feats)
    cached = propagate(counted, again, 2, 2, config, cache)
    assert counted.reads == 6 + 2
    exact = propagate(lambda z: feats[z], again, 2, 2, config)
    np.testing.assert_array_equal(cached.probabilities, exact.probabilities)
    np.testing.assert_array_equal(cached.labels, exact.labels)

    # slice 7 removed again: the chains from 3 up and 11 down resume from their stored steps
    resumed = _Counted(feats)
    back = propagate(resumed, first, 2, 2, config, cache)
    assert resumed.reads == 0  # their full length is still stored
    np.testing.assert_array_equal(
        back.probabilities, propagate(lambda z: feats[z], first, 2, 2, config).probabilities
    )


def test_a_chain_longer_than_stored_resumes_from_its_last_stored_step(tmp_path: Path) -> None:
    truth, feats = _moving_disc()
    cache = ChainCache(tmp_path)
    propagate(lambda z: feats[z], sparse_on(truth, [3, 7]), 2, 2, chains=cache)
    counted = _Counted(feats)
    longer = propagate(counted, sparse_on(truth, [3, 11]), 2, 2, chains=cache)
    # from 3: down stored (0–2), up stored to 6 and resumed 7–10 (one more read: slice 6);
    # from 11: both chains new (10 → 4 and 12–14, + its start read twice)
    assert counted.reads == 4 + 1 + 7 + 3 + 2
    exact = propagate(lambda z: feats[z], sparse_on(truth, [3, 11]), 2, 2)
    np.testing.assert_array_equal(longer.probabilities, exact.probabilities)


def test_a_redrawn_slice_or_other_settings_are_other_chains(tmp_path: Path) -> None:
    truth, feats = _moving_disc()
    cache = ChainCache(tmp_path)
    sparse = sparse_on(truth, [7])
    propagate(lambda z: feats[z], sparse, 2, 2, chains=cache)
    redrawn = sparse.copy()
    redrawn[:, :, 7] = 0  # the annotator erased the disc on slice 7
    counted = _Counted(feats)
    result = propagate(counted, redrawn, 2, 2, chains=cache)
    assert counted.reads == SLICES - 1 + 2
    exact = propagate(lambda z: feats[z], redrawn, 2, 2)
    np.testing.assert_array_equal(result.probabilities, exact.probabilities)
    counted = _Counted(feats)
    propagate(counted, sparse, 2, 2, PropagationConfig(topk=5), cache)
    assert counted.reads == SLICES - 1 + 2  # another top-k: computed, not read back
    assert len(list(tmp_path.glob("*.npy"))) == 6


def test_unreadable_chains_are_computed_and_the_oldest_go_beyond_the_budget(
    tmp_path: Path,
) -> None:
    truth, feats = _moving_disc()
    sparse = sparse_on(truth, [7])
    cache = ChainCache(tmp_path)
    propagate(lambda z: feats[z], sparse, 2, 2, chains=cache)
    stored = sorted(tmp_path.glob("*.npy"))
    assert len(stored) == 2
    for path in stored:
        path.write_bytes(b"half a file")  # e.g. a disk that filled up
    counted = _Counted(feats)
    result = propagate(counted, sparse, 2, 2, chains=cache)
    assert counted.reads == SLICES - 1 + 2
    exact = propagate(lambda z: feats[z], sparse, 2, 2)
    np.testing.assert_array_equal(result.probabilities, exact.probabilities)

    one_chain = np.load(stored[0]).nbytes
    small = ChainCache(tmp_path / "small", max_bytes=3 * one_chain)
    for slice_index in (3, 7, 11):  # 2 chains each, about the same size
        propagate(lambda z: feats[z], sparse_on(truth, [slice_index]), 2, 2, chains=small)
    assert sum(p.stat().st_size for p in small.folder.glob("*.npy")) <= small.max_bytes
    assert 0 < len(list(small.folder.glob("*.npy"))) < 6
    tiny = ChainCache(tmp_path / "tiny", max_bytes=one_chain)  # a chain above half: not stored
    propagate(lambda z: feats[z], sparse, 2, 2, chains=tiny)
    assert not list(tiny.folder.glob("*.npy"))


def test_chains_through_other_features_are_never_read(tmp_path: Path) -> None:
    truth, feats = _moving_disc()
    sparse = sparse_on(truth, [7])
    propagate(lambda z: feats[z], sparse, 2, 2, chains=ChainCache(tmp_path, source="maps a"))
    replaced = ChainCache(tmp_path, source="maps b")  # the entry recomputed in the same folder
    counted = _Counted(feats[::-1].copy())
    result = propagate(counted, sparse, 2, 2, chains=replaced)
    assert counted.reads == SLICES - 1 + 2
    exact = propagate(lambda z: feats[::-1][z], sparse, 2, 2)
    np.testing.assert_array_equal(result.probabilities, exact.probabilities)


def test_a_feature_entry_recomputed_in_place_gets_other_chains(tmp_path: Path) -> None:
    encoder = Encoder.random(PretrainConfig(channels=(4, 8), num_clusters=3, seed=0))
    volume = np.random.default_rng(0).random((16, 16, 6)).astype(np.float32)
    first = compute_feature_maps(encoder, volume, 2, tmp_path / "entry")
    again = compute_feature_maps(encoder, volume, 2, tmp_path / "entry")
    assert first.folder == again.folder and first.entry != again.entry != ""
    assert chains_of(first).folder == chains_of(again).folder == tmp_path / "entry" / "chains"
    drawn = np.zeros((16, 16), dtype=np.uint8)
    assert chains_of(first).key(3, 1, drawn, 2, "") != chains_of(again).key(3, 1, drawn, 2, "")
