"""Evaluations of candidate settings (query views, preprocessing, JPEG draft decoding): search quality and
its cost, each run against a real server on the sample catalog."""
