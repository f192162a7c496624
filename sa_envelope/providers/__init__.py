"""Key providers: what holds the master key. :class:`~.base.KeyProvider` is
the interface (and the encryption context every wrapped key is bound to);
:mod:`.local` a key file, :mod:`.aws` AWS KMS, :mod:`.spec` a provider named
by one string. Nothing here knows tables or SQLAlchemy."""
