"""Loaders on small fixtures written here, and the errors bad files get (file and line named)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from convrec.data import DataFormatError, detect_format, load_dataset


def _write(path: pathlib.Path, text: str, encoding: str = "utf-8") -> pathlib.Path:
    path.write_text(text, encoding=encoding)
    return path


@pytest.fixture
def s3rec(tmp_path: pathlib.Path) -> pathlib.Path:
    _write(tmp_path / "Toy.txt", "1 1 2 3 4\n2 2 3 5\n3 1 5\n")  # user 3 is too short
    _write(
        tmp_path / "Toy_item2attributes.json",
        json.dumps({"1": [1, 2], "2": [2], "3": [], "4": [3, 3], "5": [1]}),
    )
    return tmp_path / "Toy"


def test_s3rec(s3rec: pathlib.Path) -> None:
    with pytest.warns(UserWarning, match="dropped 1 of 3 users"):
        data = load_dataset(s3rec)
    assert detect_format(s3rec) == "s3rec"
    assert data.user_ids == ["1", "2"] and data.dropped_users == 1
    assert data.item_ids == ["", "1", "2", "3", "4", "5"]  # ids 1..N stay 1..N
    assert [s.tolist() for s in data.sequences] == [[1, 2, 3, 4], [2, 3, 5]]
    lists = [data.attribute_names[a] for a in data.attribute_lists()[4]]
    assert lists == ["3", "3"]  # repeats kept as weights
    assert data.timestamps is None and data.sample_negatives is None


def test_s3rec_with_negatives_and_times(s3rec: pathlib.Path) -> None:
    _write(s3rec.with_name("Toy_sample.txt"), "1 5\n2 1\n3 2\n")
    _write(s3rec.with_name("Toy_time.txt"), "1 10 20 20 30\n2 5 6 7\n3 1 2\n")
    with pytest.warns(UserWarning):
        data = load_dataset(s3rec)
    assert [n.tolist() for n in data.sample_negatives] == [[5], [1]]
    assert data.timestamps[0].tolist() == [10, 20, 20, 30]


@pytest.mark.parametrize(
    ("sequences", "message"),
    [
        ("1 1 2 x\n", r"Toy\.txt:1: item id 'x' is not an integer"),
        ("1 1 2 3\nz 1 2 3\n", r"Toy\.txt:2: user id 'z'"),
        ("1 1 2 3\n2\n", r"Toy\.txt:2: user 2 has no items"),
        ("1 1 2 3\n1 2 3 4\n", r"Toy\.txt:2: user 1 already listed on line 1"),
        ("1 1 2\n", "no user has at least 3 interactions"),
    ],
)
def test_s3rec_errors(tmp_path: pathlib.Path, sequences: str, message: str) -> None:
    _write(tmp_path / "Toy.txt", sequences)
    with pytest.raises(DataFormatError, match=message):
        load_dataset(tmp_path / "Toy", "s3rec")


def test_s3rec_attribute_and_negative_errors(s3rec: pathlib.Path) -> None:
    _write(s3rec.with_name("Toy_item2attributes.json"), json.dumps({"9": [1]}))
    with pytest.raises(DataFormatError, match=r"item '9', which no user has"):
        load_dataset(s3rec)
    _write(s3rec.with_name("Toy_item2attributes.json"), "{not json")
    with pytest.raises(DataFormatError, match=r"Toy_item2attributes\.json:1: invalid JSON"):
        load_dataset(s3rec)
    s3rec.with_name("Toy_item2attributes.json").unlink()
    _write(s3rec.with_name("Toy_sample.txt"), "1 5\n2 3\n")
    with pytest.raises(DataFormatError, match=r"Toy_sample\.txt:2: negative item 3 is in user 2's"):
        load_dataset(s3rec)
    _write(s3rec.with_name("Toy_sample.txt"), "1 5\n")
    with pytest.raises(DataFormatError, match="no negatives for 1 users"):
        load_dataset(s3rec)


def test_s3rec_time_file_must_align(s3rec: pathlib.Path) -> None:
    _write(s3rec.with_name("Toy_time.txt"), "1 10 20\n")
    with pytest.raises(DataFormatError, match=r"Toy_time\.txt:1: user 1 has 2 timestamps for 4"):
        load_dataset(s3rec)


@pytest.fixture
def recbole(tmp_path: pathlib.Path) -> pathlib.Path:
    folder = tmp_path / "toy"
    folder.mkdir()
    _write(
        folder / "toy.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "u1\ta\t5\t30\nu1\tb\t3\t10\nu1\tc\t4\t10\nu2\ta\t1\t1\nu2\tb\t1\t2\nu2\tc\t1\t3\n",
    )
    _write(
        folder / "toy.item",
        "item_id:token\tgenre:token_seq\tyear:token\na\tx y\t1999\nb\ty\t2000\nc\t\t2001\n",
    )
    return folder


def test_recbole(recbole: pathlib.Path) -> None:
    data = load_dataset(recbole)
    assert detect_format(recbole) == "recbole"
    # u1: b and c tie at t=10 -> file order (b before c), then a
    a, b, c = (data.item_index()[k] for k in "abc")
    assert data.sequences[0].tolist() == [b, c, a]
    assert data.timestamps[0].tolist() == [10, 10, 30]
    names = [data.attribute_names[i] for i in data.attribute_lists()[a]]
    assert names == ["genre=x", "genre=y", "year=1999"]
    only_genre = load_dataset(recbole / "toy.inter", attribute_fields=["genre"])
    assert only_genre.num_attributes == 2


@pytest.mark.parametrize(
    ("inter", "message"),
    [
        ("user_id:token\tuser_id:token\n", "duplicate header field 'user_id'"),
        ("user_id:token\titem_id:blob\n", "not 'name:type'"),
        ("user_id:token\titem:token\nu\ta\n", "no 'item_id' field"),
        ("user_id:token\titem_id:token\nu1\ta\nu1\n", r"toy\.inter:3: 1 columns, the header has 2"),
        (
            "user_id:token\titem_id:token\ttimestamp:float\nu1\ta\tnoon\n",
            r"toy\.inter:2: timestamp",
        ),
        ("", "missing 'field:type' header"),
        ("user_id:token\titem_id:token\n", "empty dataset"),
    ],
)
def test_recbole_errors(recbole: pathlib.Path, inter: str, message: str) -> None:
    (recbole / "toy.item").unlink()
    _write(recbole / "toy.inter", inter)
    with pytest.raises(DataFormatError, match=message):
        load_dataset(recbole, "recbole")


def test_recbole_item_for_unknown_item(recbole: pathlib.Path) -> None:
    with open(recbole / "toy.item", "a") as f:
        f.write("zz\tq\t1\n")
    with pytest.raises(DataFormatError, match=r"toy\.item:5: item 'zz' appears in no interaction"):
        load_dataset(recbole)


def test_movielens_100k_layout(tmp_path: pathlib.Path) -> None:
    _write(tmp_path / "u.data", "1\t10\t5\t300\n1\t20\t4\t100\n1\t30\t4\t200\n2\t10\t1\t5\n")
    _write(tmp_path / "u.genre", "Action|0\nComedy|1\n", "latin-1")
    _write(
        tmp_path / "u.item",
        "10|Ä|x||url|1|1\n20|B|x||url|0|1\n30|C|x||url|0|0\n40|D|x||url|1|0\n",
        "latin-1",
    )
    with pytest.warns(UserWarning, match="dropped 1 of 2"):
        data = load_dataset(tmp_path)
    assert data.item_ids == ["", "10", "20", "30"]  # movie 40 is never rated: ignored
    assert data.sequences[0].tolist() == [2, 3, 1]  # sorted by time
    assert [data.attribute_names[a] for a in data.attribute_lists()[1]] == ["Action", "Comedy"]


def test_movielens_dat_and_csv_layouts(tmp_path: pathlib.Path) -> None:
    one = tmp_path / "ml-1m"
    one.mkdir()
    _write(one / "ratings.dat", "1::1::5::3\n1::2::5::1\n1::3::5::2\n")
    _write(one / "movies.dat", "1::A::Drama|War\n2::B::Comedy\n3::C::Drama\n", "latin-1")
    data = load_dataset(one)
    assert data.sequences[0].tolist() == [2, 3, 1]
    assert data.num_attributes == 3
    latest = tmp_path / "latest"
    latest.mkdir()
    _write(
        latest / "ratings.csv", "userId,movieId,rating,timestamp\n1,5,4.0,2\n1,6,4.0,1\n1,7,1.0,3\n"
    )
    _write(
        latest / "movies.csv",
        'movieId,title,genres\n5,"Comma, The (1999)",Drama\n6,X,(no genres listed)\n7,Y,A|B\n',
    )
    data = load_dataset(latest)
    assert data.sequences[0].tolist() == [2, 1, 3]
    assert len(data.attribute_lists()[2]) == 0  # "(no genres listed)"
    _write(latest / "ratings.csv", "userId,userId,timestamp\n")
    with pytest.raises(DataFormatError, match=r"ratings\.csv:1: duplicate header"):
        load_dataset(latest)
    _write(latest / "ratings.csv", "userId,movieId,rating,timestamp\n1,5,4,x\n")
    with pytest.raises(DataFormatError, match=r"ratings\.csv:2: expected integer"):
        load_dataset(latest)


def test_unknown_format(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"dataset .*nothing does not exist"):
        load_dataset(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown format 'parquet'"):
        load_dataset(tmp_path, "parquet")


def test_k_core(tmp_path: pathlib.Path) -> None:
    _write(tmp_path / "K.txt", "1 1 2 3\n2 1 2 4\n3 1 2 3\n")
    data = load_dataset(tmp_path / "K", k_core=2)
    assert "4" not in data.item_ids  # item 4 has one user
    assert all(len(s) >= 2 for s in data.sequences)


def test_synthetic_is_deterministic_and_configurable() -> None:
    a = load_dataset("synthetic", synthetic_options={"num_users": 50, "seed": 3})
    b = load_dataset("synthetic", synthetic_options={"num_users": 50, "seed": 3})
    assert all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences, strict=True))
    long = load_dataset(
        "synthetic", synthetic_options={"num_users": 20, "mean_length": 3000, "max_length": 4000}
    )
    assert long.stats()["length_max"] > 2000
    assert long.timestamps is not None and all((np.diff(t) >= 0).all() for t in long.timestamps)


def test_data_format_errors_survive_pickling() -> None:
    import pickle

    from convrec.data.dataset import DataFormatError

    error = pickle.loads(pickle.dumps(DataFormatError("f.txt", 3, "bad id")))
    assert isinstance(error, DataFormatError) and str(error) == "f.txt:3: bad id"
