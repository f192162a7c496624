"""The reliability suite (``make reliability``: ``pytest -m reliability``):
faults, crashes, races and tampering, with its machinery: a fault-injecting
KMS proxy (kms_proxy), crash scenarios (crash, scenarios, rotation_scenarios,
rowkey_scenarios) and their subprocess worker (``python -m reliability.worker``),
the reliability table shape and its rows (rows), and the tampering helpers
(tamper)."""
