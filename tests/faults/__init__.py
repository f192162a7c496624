"""Test-only machinery for the reliability suite: a fault-injecting KMS
proxy, crash scenarios and their subprocess worker, shared models."""
