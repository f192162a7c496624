"""The stored bytes: the value envelope (:mod:`.format`), the Python-value
codecs (:mod:`.codecs`) and the key algorithms and row-key wrap
(:mod:`.ciphers`). Nothing here knows SQLAlchemy tables, providers or keys
tables: it is the bottom layer, with known-answer vectors in the tests."""
