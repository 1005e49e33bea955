"""Tests of metaopt.algorithms, one file per algorithm."""
