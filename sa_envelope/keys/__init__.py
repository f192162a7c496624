"""Data keys: the key table (:mod:`.table`), the bounded plaintext cache
(:mod:`.cache`), the transaction tracker (:mod:`.tracking`), the store that
finds, creates, unwraps and rolls keys over (:mod:`.store`), the roll-over
policy (:mod:`.rollover`) and provider calls off the event loop
(:mod:`.offload`). Above envelope/ and providers/, below everything else."""
