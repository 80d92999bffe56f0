"""Benchmark magne against dramatiq and celery (see ../shared/benchmarks.md and README)."""
