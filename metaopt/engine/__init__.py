"""The engine: parameters as dicts, update rules, initialisers, the unrolled inner loop and its drivers,
task batching, batch-norm policies, and the learners built from them."""
