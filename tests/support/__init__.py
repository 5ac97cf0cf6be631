"""Test doubles shared by the unit tests (the in-memory network lives in ``memnet``)."""
