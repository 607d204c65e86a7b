"""Local file sources: each format, folders, streaming, and bad data named by file."""

import gzip
import json
import logging
import lzma

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twinpipe.data.sources import TextSource, first_invalid_utf8, resolve_files, split_document


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


@pytest.mark.parametrize("streaming", [False, True])
def test_formats_and_folders(tmp_path, streaming):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first document\nwith two lines\n", encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "json one", "id": 1}, {"text": "json two", "id": 2}])
    pq.write_table(pa.table({"text": ["parquet doc"]}), tmp_path / "sub" / "c.parquet")
    (tmp_path / "notes.csv").write_text("ignored,in,folders\n")
    src = TextSource(tmp_path, streaming=streaming, cache_dir=tmp_path / ".hf")
    assert [f.name for f in src.files] == ["a.txt", "b.jsonl", "c.parquet"]
    assert list(src) == ["first document\nwith two lines\n", "json one", "json two", "parquet doc"]


def test_compressed_files(tmp_path, caplog):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "zipped json"}) + "\n")
    with lzma.open(tmp_path / "b.txt.xz", "wb") as f:
        f.write("xz text".encode())
    with gzip.open(tmp_path / "c.txt.gz", "wb") as f:
        f.write(b"abc\xff")
    (tmp_path / "d.parquet.gz").write_bytes(b"not a thing we read")
    with caplog.at_level(logging.WARNING, logger="twinpipe.data.sources"):
        assert list(TextSource(tmp_path)) == ["zipped json", "xz text"]
    assert "c.txt.gz: invalid UTF-8 at byte 3" in caplog.text
    with pytest.raises(ValueError, match=r"d\.parquet\.gz.*'\.parquet\.gz'"):
        resolve_files(tmp_path / "d.parquet.gz")


def test_text_field_and_arrow(tmp_path):
    table = pa.table({"content": ["x" * 10, "y"]})
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    assert list(TextSource(tmp_path / "d.arrow", text_field="content")) == ["x" * 10, "y"]
    with pytest.raises(KeyError, match=r"d\.arrow.*'text'.*content"):
        list(TextSource(tmp_path / "d.arrow"))


def test_missing_and_unknown_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        TextSource(tmp_path / "nothing.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"data\.csv.*\.csv"):
        resolve_files(tmp_path / "data.csv")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_dir"):
        TextSource(tmp_path / "empty_dir")


def test_empty_and_invalid_utf8_are_skipped_with_the_file_named(tmp_path, caplog):
    (tmp_path / "0_empty.txt").write_bytes(b"")
    (tmp_path / "1_bad.txt").write_bytes(b"ok so far \xff\xfe broken")
    (tmp_path / "2_bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "x\xc3y"}\n')
    (tmp_path / "3_good.txt").write_text("the good one", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="twinpipe.data.sources"):
        docs = list(TextSource(tmp_path))
    assert docs == ["the good one"]
    text = caplog.text
    assert "0_empty.txt" in text
    assert "1_bad.txt: invalid UTF-8 at byte 10" in text
    assert "2_bad.jsonl: invalid UTF-8 at byte 28" in text


def test_all_empty_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"")
    write_jsonl(tmp_path / "b.jsonl", [{"text": ""}])
    with pytest.raises(ValueError, match="no documents.*a.txt"):
        list(TextSource(tmp_path))


def test_bad_records_name_the_file(tmp_path, caplog):
    write_jsonl(tmp_path / "partial.jsonl", [{"text": "keep"}, {"other": "no text here"}])
    with caplog.at_level(logging.WARNING, logger="twinpipe.data.sources"):
        assert list(TextSource(tmp_path / "partial.jsonl")) == ["keep"]
    assert "partial.jsonl: skipped 1 records" in caplog.text
    write_jsonl(tmp_path / "nofield.jsonl", [{"body": "a"}, {"body": "b"}])
    for streaming in (False, True):
        with pytest.raises(KeyError, match="nofield.jsonl.*'text'"):
            list(TextSource(tmp_path / "nofield.jsonl", streaming=streaming))
    write_jsonl(tmp_path / "typed.jsonl", [{"text": ["a", "list"]}])
    with pytest.raises(TypeError, match="typed.jsonl.*list"):
        list(TextSource(tmp_path / "typed.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": \n{"text": "c"}\n')
    for streaming in (False, True):  # the file and its line, however datasets reads it
        with pytest.raises(ValueError, match=r"broken\.jsonl line 4: Expecting value \(column \d+\): not valid JSON$"):
            list(TextSource(tmp_path / "broken.jsonl", streaming=streaming))
    (tmp_path / "doc.json").write_text('[\n {"text": "a"},\n {"text": "b"\n]\n')
    with pytest.raises(ValueError, match=r"doc\.json line 4: Expecting ',' delimiter"):
        list(TextSource(tmp_path / "doc.json"))


def test_huge_documents_are_split(tmp_path):
    text = "".join(f"line {i}\n" for i in range(3000))
    pieces = list(split_document(text, 1000))
    assert "".join(pieces) == text
    assert all(len(p) <= 1000 for p in pieces)
    assert all(p.endswith("\n") for p in pieces)  # cut at line breaks when one is near
    assert list(split_document("x" * 25, 10)) == ["x" * 10, "x" * 10, "x" * 5]
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    assert list(TextSource(tmp_path / "big.txt", max_doc_chars=1000)) == pieces


def test_first_invalid_utf8_across_chunks(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes("aé".encode() * 10 + b"\xff")  # the 2-byte é straddles chunk edges
    assert first_invalid_utf8(f, chunk_bytes=4) == 30
    f.write_bytes("aé".encode() * 10)
    assert first_invalid_utf8(f, chunk_bytes=4) is None
