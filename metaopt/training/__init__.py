"""The outer loop: configs, the one trainer, checkpoints, logging, schedules, and the experiment layer
that turns a config into a finished run."""
