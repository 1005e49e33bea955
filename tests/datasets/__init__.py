"""Tests of metaopt.datasets, one file per task source."""
