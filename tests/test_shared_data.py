"""Every shared real dataset loads with the statistics its README states."""

from __future__ import annotations

import numpy as np
import pytest

from convrec.data import load_dataset
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"shared datasets not found at {SHARED_DATA}"
)

# users, items, interactions, attribute ids, mean attributes per item (from the READMEs)
EXPECTED = {
    "s3rec/Beauty": (22363, 12101, 198502, 637, 3.72),
    "s3rec/Toys_and_Games": (19412, 11924, 167597, 1027, 4.28),
    "s3rec/LastFM": (1090, 3646, 52551, 388, 31.52),
    "ml-100k": (943, 1682, 100000, 19, 1.72),
    "ml-100k/recbole_atomic": (943, 1682, 100000, None, None),
    "ml-latest-small": (610, 9724, 100836, 19, 2.26),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_statistics(name: str) -> None:
    users, items, interactions, attributes, per_item = EXPECTED[name]
    data = load_dataset(SHARED_DATA / name)
    assert (data.num_users, data.num_items, data.num_interactions) == (users, items, interactions)
    if attributes is not None:
        assert data.num_attributes == attributes
        assert data.stats()["attributes_per_item"] == pytest.approx(per_item, abs=0.005)
    assert data.dropped_users == 0


def test_s3rec_ids_are_kept() -> None:
    data = load_dataset(SHARED_DATA / "s3rec/Beauty")
    assert data.item_ids[1:] == [str(i) for i in range(1, 12102)]
    first = (SHARED_DATA / "s3rec/Beauty.txt").read_text().split("\n", 1)[0].split()
    assert data.user_ids[0] == first[0] and data.sequences[0].tolist() == [
        int(t) for t in first[1:]
    ]


def test_lastfm_negatives_and_beauty_times() -> None:
    lastfm = load_dataset(SHARED_DATA / "s3rec/LastFM")
    assert lastfm.sample_negatives is not None
    assert {len(n) for n in lastfm.sample_negatives} == {99}
    beauty = load_dataset(
        SHARED_DATA / "s3rec/Beauty", timestamps=SHARED_DATA / "s3rec_time/Beauty_time.txt"
    )
    assert all((np.diff(t) >= 0).all() for t in beauty.timestamps)
    assert beauty.timestamps[1][:2].tolist() == [1392422400, 1396224000]


def test_movielens_sorted_with_ties() -> None:
    data = load_dataset(SHARED_DATA / "ml-latest-small")
    assert data.stats()["length_max"] == 2698
    assert all((np.diff(t) >= 0).all() for t in data.timestamps)
