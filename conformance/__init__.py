"""The Flora conformance suite: one suite, run once per installed stack."""
