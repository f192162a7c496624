"""Row scope: one data key per row, for crypto-shredding. :mod:`.keys`
(creation, loading, the row-key cache, shredding), :mod:`.orm` (the Session
hooks that give each row its key in its own transaction) and
:mod:`.prefetch` (the keys a SELECT needs, loaded in batches before its rows
are processed). Above columns/ and keys/."""
