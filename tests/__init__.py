"""Tests of metaopt, one file per module."""
