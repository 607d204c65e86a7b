"""The embedded corpus: present, split deterministically by relative path hash, no test suites."""

from twinpipe.data.corpus import (HELDOUT_PERCENT, embedded_corpus_files,
                                  embedded_corpus_fingerprint, files_fingerprint, heldout_by_hash,
                                  stdlib_root)


def test_corpus_exists_and_splits_disjointly():
    root = stdlib_root()
    train, heldout = embedded_corpus_files("train"), embedded_corpus_files("heldout")
    assert len(train) > 100 and len(heldout) > 5
    assert all(f.suffix == ".py" and f.is_file() for f in train + heldout)
    assert not set(train) & set(heldout)
    # the held-out share is about HELDOUT_PERCENT of the files
    share = 100 * len(heldout) / (len(train) + len(heldout))
    assert HELDOUT_PERCENT / 2 < share < HELDOUT_PERCENT * 2
    for f in heldout:
        assert heldout_by_hash(f.relative_to(root).as_posix())
    for f in train:
        parts = f.relative_to(root).parts
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts)


def test_split_is_deterministic_and_sorted():
    root = stdlib_root()
    first = embedded_corpus_files("train")
    assert first == embedded_corpus_files("train")
    rel = [f.relative_to(root).as_posix() for f in first]
    assert rel == sorted(rel)
    # the rule depends only on the relative path: pinned on two fixed names
    assert heldout_by_hash("json/decoder.py") == heldout_by_hash("json/decoder.py")
    assert sum(heldout_by_hash(f"pkg/mod{i}.py") for i in range(1000)) in range(25, 80)


def test_include_tests_adds_files_and_bad_split_is_named():
    assert len(embedded_corpus_files("train", include_tests=True)) > len(embedded_corpus_files("train"))
    try:
        embedded_corpus_files("validation")
    except ValueError as err:
        assert "validation" in str(err) and "heldout" in str(err)
    else:
        raise AssertionError("an unknown split must be refused")


def test_fingerprint_follows_content(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    before = files_fingerprint([a, b], tmp_path)
    assert before == files_fingerprint([a, b], tmp_path)
    b.write_text("y = 3\n")
    assert files_fingerprint([a, b], tmp_path) != before
    assert len(embedded_corpus_fingerprint("heldout")) == 64
