"""The column types and what queries on them may do: :mod:`.encrypted`
(``EncryptedType``), :mod:`.blindindex` (``BlindIndexType`` and ``lookup``)
with its :mod:`.normalizers`, :mod:`.naming` (how a type learns its table and
column), :mod:`.operators` (the comparator: what an expression may do),
:mod:`.guard` (statements refused at execution), :mod:`.comparisons`
(comparisons with the column on the right, refused at execution) and :mod:`.rowvalue` (a
row-scoped value paired with its row's key). Above keys/, below rows/."""
