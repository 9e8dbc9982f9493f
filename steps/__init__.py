"""Pipeline steps: one thin command line program per stage (see docs/steps.md for the contract)."""
