

def test_bm25s_is_imported_without_letting_jax_take_the_gpu(monkeypatch):
    from msa_core.memory.lexical import import_bm25s

    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    assert import_bm25s().BM25 is not None
    import os

    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "true")  # a user's own choice is kept
    import_bm25s()
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"
