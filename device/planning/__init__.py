"""Planning (pure): cost models, the fidelity table, the flash model and the joint search. Never imports the split client."""
