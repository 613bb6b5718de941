"""Benchmarks (few-shot segmentation, the service); tables and plots go to ``bench/results/``."""
