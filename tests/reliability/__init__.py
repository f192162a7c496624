"""The reliability suite (``make reliability``: ``pytest -m reliability``):
faults, crashes, races and tampering, with its machinery: a fault-injecting
KMS proxy (kms_proxy), crash scenarios (crash, scenarios, rotation_scenarios,
rowkey_scenarios) and their subprocess worker (``python -m reliability.worker``),
the rows of the reliability table shape (rows; the shape itself is
``support.models.schema``) and the tampering world and mutations (tamper)."""
