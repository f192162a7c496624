"""Jobs that move keys and values in batches: :mod:`.rewrap` (CMK
rotation), :mod:`.reencrypt` (values off a data key), :mod:`.copy` (fill a
column from another: column encryption), :mod:`.verify` (open every value),
:mod:`.warm` (load keys ahead of use). One loop for all: :mod:`.runner`,
with :mod:`.progress`. Jobs take a typed :class:`~sa_envelope.keys.store.KeyStore`."""
