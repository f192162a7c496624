"""Tests that need no database server: format vectors, declarations, the cache, providers, argument parsing."""
