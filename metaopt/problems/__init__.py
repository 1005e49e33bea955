"""What meta-learners train on: problems with an inner and an outer loss, few-shot episodes and their
samplers, optimizees and their streams."""
