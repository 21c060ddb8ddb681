"""builtin:pkgdocs: ids, order, skipping, no imports, and the manifest's `sources`.

Fast: the real packages are read only through small subsets (tqdm, datasketch), and the
rules are checked on a fake package written to tmp_path whose import would raise.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import textwrap
import types

import pytest

from retrolm.corpora import pkgdocs
from retrolm.corpora.reader import Document, read_corpus

LONG = "Explains in plenty of words what this object does and why. " * 4  # >= 200 chars
SHORT = "Too short to keep."


def _write_fake_package(root):
    pkg = root / "fakepkg_retrolm"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "tests").mkdir()
    (pkg / "__init__.py").write_text(f'"""{LONG}"""\nraise RuntimeError("fakepkg_retrolm was imported")\n')
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "zeta.py").write_text(textwrap.dedent(f'''
        def first():
            """{LONG}"""

        class Widget:
            """{LONG}"""

            @property
            def size(self):
                """{LONG} getter"""

            @size.setter
            def size(self, value):
                """{LONG} setter"""

            def _private(self):
                """{LONG}"""

            def short(self):
                """{SHORT}"""

        try:
            import numpy
        except ImportError:
            def fallback():
                """{LONG}"""

        if True:
            def conditional():
                """{LONG}"""
    '''))
    (pkg / "sub" / "alpha.py").write_text(f'def a():\n    """{LONG}"""\n')
    (pkg / "tests" / "test_x.py").write_text(f'def test_x():\n    """{LONG}"""\n')
    (pkg / "broken.py").write_text("def (:\n")
    return pkg


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    _write_fake_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(pkgdocs, "PACKAGES", (("fakepkg_retrolm", "fakepkg-retrolm"), ("no_such_pkg_x", "x")))
    yield "fakepkg_retrolm"
    assert "fakepkg_retrolm" not in sys.modules


def test_fake_package_ids_order_and_rules(fake_package):
    docs = pkgdocs.documents()
    ids = [d.doc_id for d in docs]
    assert ids == [
        "fakepkg_retrolm",
        "fakepkg_retrolm.sub.alpha.a",
        "fakepkg_retrolm.sub.zeta.first",
        "fakepkg_retrolm.sub.zeta.Widget",
        "fakepkg_retrolm.sub.zeta.Widget.size",
        "fakepkg_retrolm.sub.zeta.Widget.size#2",
        "fakepkg_retrolm.sub.zeta.Widget._private",
        "fakepkg_retrolm.sub.zeta.fallback",
        "fakepkg_retrolm.sub.zeta.conditional",
    ]  # modules sorted, source order within, tests/, short and unparsable skipped
    assert docs[5].text.endswith("setter") and docs[5].title == "fakepkg_retrolm.sub.zeta.Widget.size"
    assert [d.doc_id for d in pkgdocs.documents()] == ids
    assert pkgdocs.sources() == {"fakepkg-retrolm": "unknown"}  # installed without metadata


def test_builtin_spec_reads_and_reports_sources(fake_package):
    docs, stats = read_corpus("builtin:pkgdocs")
    assert len(docs) == 9 and stats.sources == {"fakepkg-retrolm": "unknown"}


def test_real_packages_subset_stable_and_versioned():
    first = pkgdocs.documents(["tqdm", "datasketch"])
    second = pkgdocs.documents(["datasketch", "tqdm"])
    ids = [d.doc_id for d in first]
    assert ids == [d.doc_id for d in second] and len(set(ids)) == len(ids) > 50
    assert all(len(d.text) >= pkgdocs.MIN_CHARS for d in first)
    assert "datasketch.minhash.MinHash" in ids and ids[0].startswith("datasketch")  # PACKAGES order
    assert {i.split(".")[0] for i in ids} == {"tqdm", "datasketch"}
    src = pkgdocs.sources()
    assert src["torch"] == importlib.metadata.version("torch")
    assert src["datasketch"] == importlib.metadata.version("datasketch")
    assert list(src) == [d for _, d in pkgdocs.PACKAGES if d in src]


def test_no_package_is_imported():
    names = [name for name, _ in pkgdocs.PACKAGES]
    code = textwrap.dedent(f"""
        import sys
        from retrolm.corpora import pkgdocs
        pkgdocs.sources()
        docs = pkgdocs.documents(["pyarrow", "datasketch"])
        assert any(d.doc_id.startswith("pyarrow.") for d in docs)
        print([n for n in {names!r} if n in sys.modules])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_manifest_and_info_record_sources(tmp_path, monkeypatch, capsys):
    from conftest import synthetic_documents
    from retrolm.cli import main
    from retrolm.db.database import RetrievalDB

    fake = types.ModuleType("retrolm.corpora.fake_sourced")
    fake.documents = lambda: [Document(f"d{i}", t) for i, t in enumerate(synthetic_documents(60))]
    fake.sources = lambda: {"zoo": "1.2.3", "torch": "9.9"}
    monkeypatch.setitem(sys.modules, "retrolm.corpora.fake_sourced", fake)
    db = RetrievalDB.build("builtin:fake_sourced", tmp_path / "db", retriever="bm25", chunk_size=16,
                           vocab_size=300, neighbors=2, split=(80, 10, 10), progress=False)
    manifest = json.loads((tmp_path / "db" / "manifest.json").read_text())
    assert manifest["sources"] == {"zoo": "1.2.3", "torch": "9.9"} == db.info()["sources"]
    main(["db", "info", str(tmp_path / "db")])
    assert "  sources torch 9.9, zoo 1.2.3\n" in capsys.readouterr().out  # manifest keys are sorted
