"""Tests that check the documentation: its code runs, the demo works, the threat model names real tests."""
