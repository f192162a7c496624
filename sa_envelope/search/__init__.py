"""Search beyond equality on encrypted columns: :mod:`.indexes` (the prefix
and substring indexes, and what every index shares), :mod:`.ranges` (the
range index: buckets and their cover), :mod:`.tokens` (the token table and
how a token is derived), :mod:`.writes` (tokens kept in step on every write
path), :mod:`.query` (candidates and exact lookups), :mod:`.verify` (every
token checked against its row). Above rows/, below jobs/."""

__all__: list[str] = []
