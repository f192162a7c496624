"""Row scope: one data key per row, for crypto-shredding. :mod:`.keys`
(creation, loading, the row-key cache, shredding one key), :mod:`.binding`
(keys bound to their row by a keyed digest), :mod:`.specs` (a table's
row-scoped columns), :mod:`.orm` (the Session hooks that give each row its
key in its own transaction), :mod:`.shred` (every key a row ever had) and
:mod:`.prefetch` (the keys a SELECT needs, loaded in batches before its rows
are processed, and the binding checked). Above columns/ and keys/."""
